"""dermascan.serve.images: uploads -> model pixels, exactly as training resizes them (no model needed)."""

from __future__ import annotations

import functools
import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from dermascan.data.cache import resize_image
from dermascan.serve.images import (
    MAX_PIXELS,
    CorruptImage,
    EmptyImage,
    ImageTooLarge,
    UnsupportedImage,
    draft_scale,
    prepare_image,
)

SAMPLES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "isic-sample" / "images"

# EXIF orientation -> how the stored pixels relate to the upright image (stored = upright.transpose(op)).
STORED = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def samples(n: int | None = None) -> list[Path]:
    jpegs = sorted(SAMPLES.glob("*.jpg"))
    if len(jpegs) < 240:
        pytest.skip(f"the 240 real sample JPEGs were not found at {SAMPLES}")
    return jpegs[:n] if n else jpegs


def encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def upright(size=(300, 200)) -> Image.Image:
    """A non-square, non-symmetric real image: a sample resized to 300x200."""
    return Image.open(samples(1)[0]).convert("RGB").resize(size, Image.Resampling.BICUBIC)


def with_orientation(img: Image.Image, orientation: int, fmt: str) -> bytes:
    stored = img if STORED[orientation] is None else img.transpose(STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bomb(width: int = 40000, height: int = 40000, rows: int = 64) -> bytes:
    """A valid-looking RGB PNG header of width x height, with only ``rows`` rows of (zero) data: a few KB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = (b"\0" + b"\0" * (3 * width)) * rows
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw, 9)) + png_chunk(b"IEND", b"")


# ---------------------------------------------------------------- the same pixels as training


@pytest.mark.parametrize("size", [224, 64, 97])
def test_sample_jpegs_give_the_training_resize_exactly(size):
    for path in samples():
        served = prepare_image(path.read_bytes(), size, "bilinear").pixels
        assert served.shape == (size, size, 3) and served.dtype == np.uint8
        np.testing.assert_array_equal(served, np.asarray(resize_image(path, size, "bilinear")), err_msg=path.name)


@pytest.mark.parametrize("method", ["bilinear", "bicubic", "area", "nearest", "lanczos"])
def test_every_training_resize_method_is_matched(method, tmp_path):
    path = tmp_path / "photo.png"
    upright((333, 251)).save(path)
    np.testing.assert_array_equal(
        prepare_image(path.read_bytes(), 64, method).pixels, np.asarray(resize_image(path, 64, method))
    )


def test_the_comparison_can_fail():
    """A different filter gives different pixels: the exact-equality tests above would notice."""
    data = encode(upright((333, 251)), "PNG")
    assert not np.array_equal(prepare_image(data, 64, "bilinear").pixels, prepare_image(data, 64, "bicubic").pixels)


# ---------------------------------------------------------------- EXIF orientation


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_the_upright_pixels(orientation):
    img = upright()
    expected = prepare_image(encode(img, "PNG"), 64).pixels
    prepared = prepare_image(with_orientation(img, orientation, "PNG"), 64)
    assert prepared.orientation == orientation
    np.testing.assert_array_equal(prepared.pixels, expected)
    if orientation != 1:  # ignoring the tag would give other pixels
        stored = img.transpose(STORED[orientation])
        assert not np.array_equal(prepare_image(encode(stored, "PNG"), 64).pixels, expected)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_on_a_phone_style_jpeg(orientation):
    """A rotated JPEG: its decoded pixels, turned upright, resized as training does; close to the upright JPEG.

    (Full decode here; with draft decoding, the rotation is applied to the reduced-scale decode.)
    """
    img = upright((400, 300))
    data = with_orientation(img, orientation, "JPEG")
    decoded = Image.open(io.BytesIO(data)).convert("RGB")
    undo = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_270, 8: Image.Transpose.ROTATE_90}[orientation]
    expected = np.asarray(decoded.transpose(undo).resize((64, 64), Image.Resampling.BILINEAR))
    prepared = prepare_image(data, 64, draft_factor=None)
    np.testing.assert_array_equal(prepared.pixels, expected)
    straight = prepare_image(encode(img, "JPEG", quality=95), 64, draft_factor=None).pixels.astype(int)
    assert np.abs(prepared.pixels.astype(int) - straight).mean() < 1.5  # JPEG noise only
    ignored = np.asarray(decoded.resize((64, 64), Image.Resampling.BILINEAR)).astype(int)
    assert np.abs(ignored - straight).mean() > 10  # the check would catch an ignored tag


# ---------------------------------------------------------------- colour modes


def test_opaque_rgba_is_the_rgb_image():
    img = upright()
    rgba = img.copy()
    rgba.putalpha(255)
    np.testing.assert_array_equal(prepare_image(encode(rgba, "PNG"), 64).pixels, prepare_image(encode(img, "PNG"), 64).pixels)


def test_transparent_pixels_are_composited_over_black():
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))  # fully transparent white
    rgba.paste((200, 100, 50, 255), (0, 0, 32, 64))  # opaque left half
    half = Image.new("RGBA", (64, 64), (200, 100, 50, 128))
    pixels = prepare_image(encode(rgba, "PNG"), 64).pixels
    assert (pixels[:, :32] == [200, 100, 50]).all() and (pixels[:, 32:] == 0).all()
    np.testing.assert_allclose(prepare_image(encode(half, "PNG"), 64).pixels[0, 0], [100, 50, 25], atol=1)
    la = Image.new("LA", (64, 64), (180, 0))
    assert (prepare_image(encode(la, "PNG"), 64).pixels == 0).all()
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    np.testing.assert_array_equal(prepare_image(encode(palette, "PNG"), 64).pixels[0, 0], [10, 200, 30])
    palette.info["transparency"] = 1
    assert (prepare_image(encode(palette, "PNG", transparency=1), 64).pixels == 0).all()


def test_grayscale_and_bilevel_become_gray_rgb():
    gray = upright().convert("L")
    pixels = prepare_image(encode(gray, "PNG"), 64).pixels
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    np.testing.assert_array_equal(pixels[..., 0], np.asarray(gray.resize((64, 64), Image.Resampling.BILINEAR)))
    bilevel = prepare_image(encode(gray.convert("1"), "PNG"), 64).pixels
    assert bilevel.shape == (64, 64, 3) and 0 < bilevel.mean() < 255


def test_cmyk_jpeg_is_converted_as_training_converts_it():
    cmyk = upright().convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(prepare_image(data, 64).pixels, expected)
    original = prepare_image(encode(upright(), "PNG"), 64).pixels.astype(int)
    assert np.abs(prepare_image(data, 64).pixels.astype(int) - original).mean() < 3


def test_16_bit_images_are_scaled_not_clipped():
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)  # 0 .. 65520
    img16 = Image.fromarray(ramp)
    data = encode(img16, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    pixels = prepare_image(data, 64).pixels
    np.testing.assert_array_equal(pixels[..., 0], np.clip(np.rint(ramp / 257.0), 0, 255).astype(np.uint8))
    assert pixels.max() == 255 and pixels.min() == 0 and 120 < pixels.mean() < 135  # clipping would give ~254
    rgb48 = Image.fromarray(np.full((8, 8), 40000, np.int32), "I")  # 32-bit integer TIFF holding 16-bit values
    assert (prepare_image(encode(rgb48, "TIFF"), 8).pixels == round(40000 / 257)).all()
    small = Image.fromarray(np.full((8, 8), 200, np.int32), "I")  # values already 0-255 stay
    assert (prepare_image(encode(small, "TIFF"), 8).pixels == 200).all()
    unit = Image.fromarray(np.full((8, 8), 0.5, np.float32), "F")  # float 0-1
    assert (prepare_image(encode(unit, "TIFF"), 8).pixels == 128).all()


@pytest.mark.parametrize("fmt", ["WEBP", "BMP", "TIFF", "GIF"])
def test_other_formats_are_read(fmt):
    img = upright()
    prepared = prepare_image(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), 64)
    assert prepared.format == fmt and prepared.pixels.shape == (64, 64, 3)
    if fmt != "GIF":  # GIF is palette-quantised
        np.testing.assert_array_equal(prepared.pixels, prepare_image(encode(img, "PNG"), 64).pixels)


# ---------------------------------------------------------------- hostile uploads


def test_zero_bytes():
    with pytest.raises(EmptyImage) as err:
        prepare_image(b"", 64)
    assert err.value.status == 422


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"hello, this is not an image", "not a recognised image"),
        (b"%PDF-1.7\n" + b"x" * 100, "not a recognised image"),
        (b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + b"\0" * 64, "HEIC"),
        (b"\0\0\0\x1cftypavif\0\0\0\0avifmif1" + b"\0" * 64, "AVIF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "not a recognised image"),  # EPS is never parsed
    ],
)
def test_not_an_image_is_unsupported(data, fragment):
    with pytest.raises(UnsupportedImage) as err:
        prepare_image(data, 64)
    assert err.value.status == 415 and fragment in str(err.value)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.9])
def test_truncated_jpeg_is_corrupt(keep):
    data = samples(1)[0].read_bytes()
    with pytest.raises((CorruptImage, UnsupportedImage)) as err:
        prepare_image(data[: int(len(data) * keep)], 64)
    assert err.value.status in (415, 422)
    if keep >= 0.5:
        assert isinstance(err.value, CorruptImage) and "truncated" in str(err.value)


def test_corrupt_png_and_garbled_jpeg_are_corrupt():
    png = bytearray(encode(upright(), "PNG"))
    start = png.index(b"IDAT") + 4
    png[start : start + 2] = b"\x00\x00"  # an invalid zlib header: the pixel data cannot be inflated
    with pytest.raises(CorruptImage):
        prepare_image(bytes(png), 64)
    with pytest.raises(CorruptImage):
        prepare_image(bytes(png[: len(png) // 2]), 64)
    with pytest.raises(CorruptImage):
        prepare_image(b"\xff\xd8\xff\xe0" + b"\x00\x10JFIF" + b"\x13" * 500, 64)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_png_bomb_is_refused_from_its_header(monkeypatch):
    bomb = png_bomb()
    assert len(bomb) < 8_000  # "a 40000x40000 PNG of a few KB"

    def no_decode(self, *args, **kwargs):
        raise AssertionError("the bomb's pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    started = time.perf_counter()
    with pytest.raises(ImageTooLarge) as err:
        prepare_image(bomb, 224)
    assert time.perf_counter() - started < 0.5
    assert err.value.status == 413 and "1600000000 pixels" in str(err.value)
    with pytest.raises(ImageTooLarge) as err:  # one PIL lets through (< 179 MP) is refused by our limit
        prepare_image(png_bomb(12000, 12000), 224)
    assert "12000x12000" in str(err.value)


def test_image_over_max_pixels_is_refused_and_one_under_is_served():
    width = 1000
    over = png_bomb(width, MAX_PIXELS // width + 1, rows=1)
    with pytest.raises(ImageTooLarge):
        prepare_image(over, 64)
    small = prepare_image(encode(Image.new("RGB", (2000, 1500), (10, 20, 30)), "PNG"), 64, max_pixels=3_000_000)
    assert (small.pixels == [10, 20, 30]).all()
    with pytest.raises(ImageTooLarge):
        prepare_image(encode(Image.new("RGB", (2000, 1501)), "PNG"), 64, max_pixels=3_000_000)


# ---------------------------------------------------------------- reduced-scale JPEG decoding


def test_mpo_phone_jpegs_are_read_and_drafted_like_jpegs():
    """Phones often write MPO (a JPEG followed by more pictures); it is read as its first picture."""
    img = upright((1200, 900))
    mpo = encode(img, "MPO", save_all=True, append_images=[img.resize((300, 225))], quality=90)
    jpeg = encode(img, "JPEG", quality=90)
    prepared = prepare_image(mpo, 224)
    assert (prepared.format, prepared.draft_scale) == ("MPO", 2)
    np.testing.assert_array_equal(prepared.pixels, prepare_image(jpeg, 224).pixels)


def test_draft_scale_keeps_at_least_factor_times_the_target():
    assert draft_scale(4032, 3024, 224, 2) == 4  # 1008x756 >= 448
    assert draft_scale(4032, 3024, 224, 1) == 8  # 504x378 >= 224
    assert draft_scale(4032, 3024, 64, 2) == 8
    assert draft_scale(447, 2000, 224, 2) == 1  # short side under 2x: full decode
    assert draft_scale(4032, 3024, 224, 0) == 1 and draft_scale(4032, 3024, 224, None) == 1
    for width, height, size, factor in [(4032, 3024, 224, 2), (1200, 900, 224, 2), (3000, 4000, 299, 2), (900, 900, 224, 1)]:
        scale = draft_scale(width, height, size, factor)
        assert min(width, height) // scale >= factor * size


# (sample index, noise sigma): a smooth upscale, and two with sensor-like noise (harder for the JPEG decoder).
PHONE_CASES = ((100, 0.0), (150, 8.0), (101, 4.0))


@functools.cache
def phone_jpeg(index: int, noise: float) -> bytes:
    """A 4032x3024 phone-size JPEG (quality 90, 4:2:0) made from a real sample; shared with test_serve."""
    img = Image.open(samples()[index]).convert("RGB").resize((4032, 3024), Image.Resampling.BICUBIC)
    if noise:
        rng = np.random.default_rng(index)
        img = Image.fromarray(np.clip(np.asarray(img) + noise * rng.standard_normal((3024, 4032, 3), np.float32), 0, 255)
                              .astype(np.uint8))
    return encode(img, "JPEG", quality=90)


def test_draft_decoding_stays_closer_to_the_full_decode_than_the_training_cache_does():
    """Pixels: reduced-scale decode vs full decode, next to the q95 JPEG round trip the resize cache adds.

    Training and evaluation read the resize cache, a quality-95 JPEG of the
    resized image, so their pixels already carry that round trip's error.
    Draft decoding (factor 2: at least 2x the target kept) must stay below it.
    Measured here: draft max 3, mean 0.1-0.2 levels; q95 round trip mean about 0.9.
    """
    for index, noise in PHONE_CASES:
        data = phone_jpeg(index, noise)
        full = prepare_image(data, 224, draft_factor=None)
        draft = prepare_image(data, 224, draft_factor=2)
        assert (full.draft_scale, draft.draft_scale) == (1, 4)
        diff = np.abs(draft.pixels.astype(int) - full.pixels)
        cache = np.asarray(Image.open(io.BytesIO(encode(Image.fromarray(full.pixels), "JPEG", quality=95, subsampling=0))))
        cache_diff = np.abs(cache.astype(int) - full.pixels)
        print(f"\nphone JPEG {index} noise {noise}: draft vs full decode |pixel diff| max {diff.max()} mean {diff.mean():.3f}; "
              f"q95 cache round trip max {cache_diff.max()} mean {cache_diff.mean():.3f}")
        assert diff.max() <= 4 and diff.mean() <= 0.35, (diff.max(), diff.mean())
        assert diff.mean() < cache_diff.mean() / 2, (diff.mean(), cache_diff.mean())
