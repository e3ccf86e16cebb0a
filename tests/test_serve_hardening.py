"""Issue 12: scan bombs, memory per upload, and the settings that bound slow connections (no model, no server).

The server-level checks (two bombs in flight, aborted uploads, stalled
connections) are in tests/test_serve.py, next to its uvicorn fixtures.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from dermascan.serve.images import (
    ALPHA_PIXEL_SHARE,
    MAX_JPEG_SCANS,
    WEBP_PIXEL_SHARE,
    WIDE_PIXEL_SHARE,
    ImageTooLarge,
    TooManyScans,
    jpeg_scans,
    prepare_image,
    webp_size,
)

SOS = b"\xff\xda"


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def scan_bomb(side: int = 7000, repeats: int = 1000) -> bytes:
    """A progressive JPEG whose last (smallest) scan is repeated ``repeats`` times before EOI: tiny, slow to decode."""
    data = encode(Image.new("RGB", (side, side), (180, 120, 100)), "JPEG", progressive=True, quality=90)
    last = data.rindex(SOS)
    return data[:-2] + data[last:-2] * repeats + b"\xff\xd9"


# ---------------------------------------------------------------- item 1: progressive-JPEG scan bombs


def test_scan_bomb_decodes_slowly_with_pil_and_is_refused_before_decoding():
    bomb = scan_bomb(1500, 1000)
    assert len(bomb) < 200_000 and jpeg_scans(bomb, 10_000) == 1010
    started = time.perf_counter()
    img = Image.open(io.BytesIO(bomb))
    img.load()  # PIL decodes it without an error: only the time gives it away
    decode = time.perf_counter() - started
    assert img.size == (1500, 1500)
    started = time.perf_counter()
    with pytest.raises(TooManyScans) as err:
        prepare_image(bomb, 64)
    refuse = time.perf_counter() - started
    assert err.value.status == 422 and err.value.code == "too_many_scans" and str(MAX_JPEG_SCANS) in str(err.value)
    assert refuse < 0.05 and refuse < decode / 10, (refuse, decode)


def test_ordinary_jpegs_are_within_the_scan_limit():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), np.uint8))
    progressive = encode(img, "JPEG", progressive=True, quality=90)
    assert jpeg_scans(progressive, MAX_JPEG_SCANS) == progressive.count(SOS) == 10
    assert jpeg_scans(encode(img, "JPEG"), MAX_JPEG_SCANS) == 1
    assert jpeg_scans(encode(img.convert("L"), "JPEG", progressive=True), MAX_JPEG_SCANS) == 6
    prepare_image(progressive, 64)  # served
    # an APP1 (EXIF) block holding FF DA bytes (a thumbnail's scans) is not counted: markers are walked, not searched
    plain = encode(img, "JPEG")
    payload = b"Exif\0\0" + SOS * 200
    tagged = plain[:2] + b"\xff\xe1" + (len(payload) + 2).to_bytes(2, "big") + payload + plain[2:]
    assert tagged.count(SOS) > 200 and jpeg_scans(tagged, MAX_JPEG_SCANS) == 1
    prepare_image(tagged, 64)
    # the limit is the setting: exactly at it is served, one over is refused
    at_limit = scan_bomb(64, 20)
    assert jpeg_scans(at_limit, 100) == 30
    prepare_image(at_limit, 32, max_jpeg_scans=30)
    with pytest.raises(TooManyScans):
        prepare_image(at_limit, 32, max_jpeg_scans=29)


# ---------------------------------------------------------------- item 2: memory per upload

PEAK = """
import sys
from pathlib import Path
from dermascan.serve.images import prepare_image
def hwm():
    return next(int(l.split()[1]) for l in Path('/proc/self/status').read_text().splitlines() if l.startswith('VmHWM')) * 1024
data = Path(sys.argv[1]).read_bytes()
prepare_image(Path(sys.argv[2]).read_bytes(), 32)  # warm: plugins, numpy
idle = hwm()
prepare_image(data, 64, max_pixels=int(sys.argv[3]))
print(hwm() - idle)
"""


def peak_bytes(data: bytes, max_pixels: int, tmp_path) -> int:
    """Peak resident memory above idle of prepare_image on ``data``, in a fresh process (VmHWM sees C allocations)."""
    path, warm = tmp_path / "upload", tmp_path / "warm"
    path.write_bytes(data)
    warm.write_bytes(encode(Image.new("RGB", (40, 40)), "PNG"))
    out = subprocess.run([sys.executable, "-c", PEAK, str(path), str(warm), str(max_pixels)], capture_output=True,
                         text=True, check=True, timeout=120)
    return int(out.stdout)


def hostile(kind: str, side: int) -> bytes:
    ramp = np.tile((np.arange(side, dtype=np.uint32) * 65535 // side).astype(np.uint16), (side, 1))
    if kind == "png16":
        return encode(Image.fromarray(ramp), "PNG")
    if kind == "tiff32":
        return encode(Image.fromarray(ramp.astype(np.int32) * 3, "I"), "TIFF")
    if kind == "tiff_float":
        return encode(Image.fromarray(ramp.astype(np.float32) / 65535, "F"), "TIFF")
    if kind == "rgba":
        alpha = (ramp >> 8).astype(np.uint8)
        return encode(Image.fromarray(np.dstack([alpha, alpha[::-1], alpha.T, alpha]), "RGBA"), "PNG")
    return encode(Image.new("RGB", (side, side), (200, 100, 50)), "WEBP", lossless=True)


@pytest.mark.parametrize("kind", ["png16", "tiff32", "tiff_float", "webp", "rgba"])
def test_an_image_within_max_pixels_costs_at_most_4_bytes_per_allowed_pixel(kind, tmp_path):
    """The bound scales with max_pixels: checked at 4 MP and 9 MP (the old code took 23-27 bytes per pixel)."""
    for side in (2000, 3000):
        max_pixels = side * side
        data = hostile(kind, side)
        share = {"webp": WEBP_PIXEL_SHARE, "tiff32": WIDE_PIXEL_SHARE, "tiff_float": WIDE_PIXEL_SHARE,
                 "rgba": ALPHA_PIXEL_SHARE}.get(kind)
        if share:  # these get a share of max_pixels: refused from the header at side**2, served at share * side**2
            with pytest.raises(ImageTooLarge, match="limit for"):
                prepare_image(data, 64, max_pixels=max_pixels)
            max_pixels *= share
        peak = peak_bytes(data, max_pixels, tmp_path)
        assert peak <= 4 * max_pixels + 8 * 2**20, (kind, side, peak / max_pixels)


def test_high_bit_depth_conversion_is_unchanged_by_the_bands():
    """Banded conversion gives exactly the full-image formula, across band edges and for NaN/inf floats."""
    from dermascan.serve.images import BAND_PIXELS, to_8_bit

    rng = np.random.default_rng(1)
    rows = BAND_PIXELS // 9 * 2 + 7
    wide = rng.integers(-5, 70000, (rows, 9)).astype(np.int32)
    np.testing.assert_array_equal(to_8_bit(Image.fromarray(wide, "I")), np.clip(np.rint(wide / 257.0), 0, 255))
    floats = rng.random((rows, 9)).astype(np.float32)
    floats[3, 3], floats[300, 1] = np.nan, np.inf
    expected = np.nan_to_num(floats.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    np.testing.assert_array_equal(to_8_bit(Image.fromarray(floats, "F")), np.clip(np.rint(expected), 0, 255))


def test_grayscale_resized_before_rgb_equals_training_resize():
    from dermascan.data.cache import METHODS

    gray = Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 300), np.uint8), "L")
    for method, resample in METHODS.items():
        expected = np.asarray(gray.convert("RGB").resize((64, 64), resample))
        np.testing.assert_array_equal(prepare_image(encode(gray, "PNG"), 64, method).pixels, expected)


def test_webp_size_is_read_from_each_header_kind():
    img = Image.new("RGB", (300, 200), (1, 2, 3))
    assert webp_size(encode(img, "WEBP", lossless=True)) == (300, 200)
    assert webp_size(encode(img, "WEBP", quality=80)) == (300, 200)
    rgba = img.convert("RGBA")
    rgba.putalpha(100)
    assert webp_size(encode(rgba, "WEBP", quality=80, exif=b"Exif\0\0")) == (300, 200)  # VP8X
    assert webp_size(b"not a webp" * 4) is None


# ---------------------------------------------------------------- items 3-4: settings


def test_new_serve_settings_come_from_the_yaml_and_are_checked():
    import inspect

    from dermascan.config import ServeConfig
    from dermascan.errors import ConfigError
    from dermascan.serve.__main__ import server_options
    from dermascan.serve.app import create_app
    from dermascan.serve.settings import check
    from tests.conftest import compose_config

    served = compose_config("serve", ["export_dir=/e"], ServeConfig)
    params = inspect.signature(create_app).parameters
    for key in ("max_jpeg_scans", "body_timeout"):
        assert params[key].default == served[key], key
    assert inspect.signature(prepare_image).parameters["max_jpeg_scans"].default == served.max_jpeg_scans
    options = server_options(served.header_timeout, served.timeout_keep_alive, served.limit_concurrency)
    assert options["timeout_keep_alive"] == served.timeout_keep_alive and options["limit_concurrency"] == 100
    assert 10 <= served.header_timeout <= 30 and 10 <= served.body_timeout <= 30
    for bad in ("max_jpeg_scans=0", "header_timeout=0", "body_timeout=-1", "limit_concurrency=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            check(compose_config("serve", ["export_dir=x", bad], ServeConfig))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA", "P_transparency", "L_transparency"])
def test_transparency_is_composited_over_black_as_pillow_does(mode):
    """over_black works in bands; its pixels are Image.alpha_composite's over opaque black."""
    from dermascan.serve.images import over_black, to_rgb

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (300, 700, 4), dtype=np.uint8), "RGBA")  # 700 wide: several bands
    if mode == "P_transparency":
        img = rgba.convert("RGB").quantize(64)
        img.info["transparency"] = 5
    elif mode == "L_transparency":
        img = rgba.convert("L")
        img.info["transparency"] = 128
    else:
        img = rgba.convert(mode)
    expected = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA")).convert("RGB")
    np.testing.assert_array_equal(np.asarray(over_black(img)), np.asarray(expected))
    np.testing.assert_array_equal(np.asarray(to_rgb(img)), np.asarray(expected))
