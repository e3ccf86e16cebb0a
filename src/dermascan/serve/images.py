"""Uploaded bytes -> the model's input pixels, the same way training resized them.

``prepare_image(data, size, method)`` returns a ``size`` x ``size`` x 3 uint8
array. For an upright RGB image it gives exactly the pixels of
``dermascan.data.cache.resize_image`` (decode, ``convert("RGB")``, squash
with the same PIL filter), so the service answers as evaluation did. On top
of that it handles what phones and attackers send:

- **Only a few formats are tried** (JPEG/MPO, PNG, WebP, BMP, TIFF, GIF): PIL
  never gets to parse anything else (EPS, PSD, ...). HEIC/AVIF, the iPhone's
  native formats, are named in the error so the client knows to send JPEG.
- **Decompression bombs are refused from the header**, before any pixel is
  decoded: ``Image.open`` is lazy and reads only the dimensions, and an image
  over ``max_pixels`` is refused (``ImageTooLarge``, HTTP 413). PIL's own
  bomb check (about 179 MP) is caught too.
- **Progressive-JPEG scan bombs are refused before decoding**: a JPEG may
  repeat a scan thousands of times (a few hundred bytes each, each one a
  full pass over the image's coefficients: about 20 ms at 49 MP here), so a
  tiny file can hold a decoder for minutes. The scans (SOS markers) of the
  first image are counted from the marker structure and a JPEG with more
  than ``max_jpeg_scans`` (default 64; libjpeg writes 10 for a progressive
  colour JPEG, mozjpeg about as many) is refused (``TooManyScans``, 422).
- **Memory stays within about 4 bytes per allowed pixel**: WebP, which
  libwebp and PIL decode through four full-size RGBA buffers (752 MB for a
  2 KB 49 MP WebP), has a quarter of ``max_pixels``, refused from its
  header before the decoder allocates anything; 32-bit integer and float
  images, which PIL holds at 4 bytes a pixel (about 5 at the decoder's
  peak), have half; 16-bit, 32-bit and float images are scaled to 8 bits in
  bands of rows, never through a full-size float64 copy (1.2 GB for a 109 KB
  49 MP 16-bit PNG before); grayscale is resized before it is replicated to
  RGB; images with transparency, which hold the decoded RGBA and the
  composited RGB (7 bytes a pixel), have a third, and are composited over
  black in bands (``over_black``).
- **EXIF orientation** is applied (``ImageOps.exif_transpose``) before the
  resize, so a rotated phone photo gives the same pixels as the upright one.
- **Colour modes** become RGB: alpha (RGBA, LA, PA, P with transparency) is
  composited over black, the colour of a dermatoscope's vignette, so
  transparent pixels carry no hidden colour, and a fully opaque image is
  unchanged; grayscale is replicated; CMYK and YCbCr use PIL's conversion, as
  training's ``convert("RGB")`` does; 16-bit and 32-bit integer images (``I;16``,
  ``I``) are scaled from 0-65535 to 0-255 rather than clipped; float images
  (``F``) are read as 0-1 when they fit, else clipped to 0-255. Embedded ICC
  profiles are ignored, as in training.
- **Big JPEGs are decoded at reduced scale** (``draft``), only when the image
  is at least ``draft_factor`` times the target size on both sides, and only
  down to a scale that still leaves at least ``draft_factor`` x ``size``
  pixels on the short side, so the final resize always shrinks by that factor
  or more. tests/test_serve_images.py measures how close this stays to the
  full decode.
"""

from __future__ import annotations

import io
import logging
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from dermascan.data.cache import METHODS
from dermascan.errors import DermascanError

log = logging.getLogger("dermascan.serve.images")

# MPO (multi-picture JPEG, common from phones) is opened by the JPEG plugin.
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
MAX_PIXELS = 50_000_000
DRAFT_FACTOR = 2
MAX_JPEG_SCANS = 64
# Decoding a WebP costs about 4 full-size RGBA buffers (libwebp's canvas and frame, PIL's copies): a quarter of the pixels.
WEBP_PIXEL_SHARE = 4
# 32-bit integer and float images: 4 bytes a pixel decoded, about 5 at the decoder's peak, 1 more as 8-bit: half the pixels.
WIDE_MODES, WIDE_PIXEL_SHARE = ("I", "F"), 2
# Images with transparency: the decoded RGBA (4 bytes a pixel) and the composited RGB (3) are both held.
ALPHA_PIXEL_SHARE = 3
# Pixels converted at once from 16-bit, 32-bit and float images (2 MB of float64 per band).
BAND_PIXELS = 1 << 18
# A marker inside entropy-coded data: FF, then neither 00 (a stuffed FF), a restart marker (D0-D7) nor FF (fill).
ENTROPY_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
ORIENTATION = 0x0112  # the EXIF tag
INTEGER_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")
ALPHA_MODES = ("RGBA", "RGBa", "LA", "PA")
# ISO base-media brands of the formats phones write that PIL cannot read here.
UNSUPPORTED_BRANDS = {
    b"heic": "HEIC",
    b"heix": "HEIC",
    b"hevc": "HEIC",
    b"heim": "HEIC",
    b"heis": "HEIC",
    b"mif1": "HEIF",
    b"msf1": "HEIF",
    b"avif": "AVIF",
    b"avis": "AVIF",
}


SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"RIFF", "WEBP"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
)


class ImageError(DermascanError):
    """An upload that cannot be served; ``status`` is the HTTP status to answer with."""

    status = 422
    code = "invalid_image"


class EmptyImage(ImageError):
    code = "empty_image"


class UnsupportedImage(ImageError):
    status = 415
    code = "unsupported_image"


class CorruptImage(ImageError):
    code = "corrupt_image"


class ImageTooLarge(ImageError):
    status = 413
    code = "image_too_large"


class TooManyScans(ImageError):
    code = "too_many_scans"


@dataclass(frozen=True)
class Prepared:
    """The model input and what was learned about the upload on the way."""

    pixels: np.ndarray  # uint8 [size, size, 3]
    format: str
    width: int  # as uploaded, before EXIF rotation
    height: int
    mode: str
    orientation: int  # EXIF orientation tag, 1 when absent
    draft_scale: int  # 1 = full decode, 2/4/8 = JPEG DCT-domain reduction


def _sniff(data: bytes) -> tuple[str | None, bool]:
    """(format name, supported) from the magic bytes; (None, False) when unknown."""
    for magic, name in SIGNATURES:
        if data.startswith(magic) and (name != "WEBP" or data[8:12] == b"WEBP"):
            return name, True
    if len(data) >= 12 and data[4:8] == b"ftyp":
        return UNSUPPORTED_BRANDS.get(data[8:12], "an ISO media file (HEIC/AVIF/MP4)"), False
    return None, False


def webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a WebP's first chunk header (VP8X, VP8L or VP8); None when it cannot be read."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """How many scans (SOS markers) the first image of a JPEG has, counting no further than ``stop_after`` + 1.

    Walks the marker segments (so an EXIF thumbnail's scans are not counted)
    and skips each scan's entropy-coded data to the next marker. A malformed
    structure ends the count: the decoder reports it.
    """
    pos, scans, end = 2, 0, len(data)
    while pos + 4 <= end and scans <= stop_after:
        if data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xD9:  # EOI
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            found = ENTROPY_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    return scans


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) and refuse what must not be decoded."""
    if not data:
        raise EmptyImage("the upload is empty (0 bytes): send a JPEG or PNG photo")
    size = webp_size(data)  # before Image.open: libwebp allocates its canvas when the file is opened
    if size and size[0] * size[1] > max_pixels // WEBP_PIXEL_SHARE:
        raise ImageTooLarge(
            f"the WebP image is {size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.1f} megapixels; the limit for WebP is "
            f"{max_pixels // WEBP_PIXEL_SHARE / 1e6:g} megapixels (a quarter of {max_pixels / 1e6:g}: decoding WebP takes "
            "four times the memory); send a JPEG"
        )
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"the image is too large to decode safely: {err}") from None
    except UnidentifiedImageError:
        name, supported = _sniff(data)
        if supported:
            raise CorruptImage(f"the upload starts like a {name} image but its header is corrupt or truncated") from None
        hint = f"it looks like {name}, which this service does not read; " if name else "it is not a recognised image; "
        raise UnsupportedImage(f"cannot read the upload: {hint}send a JPEG, PNG, WebP, BMP, TIFF or GIF") from None
    except Exception as err:  # noqa: BLE001 - a malformed header, whatever the plugin raises
        raise CorruptImage(f"the image header is corrupt: {type(err).__name__}: {err}") from None
    width, height = img.size
    if width < 1 or height < 1:
        raise CorruptImage(f"the image has no pixels ({width}x{height})")
    if img.mode in ALPHA_MODES and width * height > max_pixels // ALPHA_PIXEL_SHARE:
        raise ImageTooLarge(
            f"the {img.mode} image (with transparency) is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit for images with an alpha channel is {max_pixels // ALPHA_PIXEL_SHARE / 1e6:g} megapixels "
            f"(a third of {max_pixels / 1e6:g}: the colour and the composited copy are both held); send a JPEG"
        )
    if img.mode in WIDE_MODES and width * height > max_pixels // WIDE_PIXEL_SHARE:
        raise ImageTooLarge(
            f"the {img.mode} (32-bit) image is {width}x{height} = {width * height / 1e6:.1f} megapixels; the limit for "
            f"32-bit images is {max_pixels // WIDE_PIXEL_SHARE / 1e6:g} megapixels (half of {max_pixels / 1e6:g}: they "
            "take twice the memory); send an 8-bit image"
        )
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"the image is {width}x{height} = {width * height / 1e6:.1f} megapixels; the limit is "
            f"{max_pixels / 1e6:g} megapixels"
        )
    return img


def draft_scale(width: int, height: int, size: int, factor: int | None) -> int:
    """The JPEG reduction (1, 2, 4 or 8) that keeps both sides >= factor * size; 1 when draft is off."""
    if not factor or factor < 1:
        return 1
    most = min(width, height) // (factor * size)
    for scale in (8, 4, 2):
        if most >= scale:
            return scale
    return 1


def _bands(img: Image.Image):
    """The image as float64 arrays of about BAND_PIXELS pixels, whole rows (NaN and infinities of floats made finite)."""
    width, height = img.size
    rows = max(1, BAND_PIXELS // width)
    for top in range(0, height, rows):
        band = np.asarray(img.crop((0, top, width, min(top + rows, height)))).astype(np.float64)
        if img.mode == "F":
            np.nan_to_num(band, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
        yield top, band


def to_8_bit(img: Image.Image) -> np.ndarray:
    """A 16-bit, 32-bit or float image as uint8 gray: 0-65535 scaled to 0-255, float 0-1 scaled, else clipped.

    Converted in bands of rows: a full-size float64 copy would cost 8 bytes
    per pixel, several times over (1.1 GB for a 95 KB 49 MP 16-bit PNG).
    """
    low, high = np.inf, -np.inf
    if img.mode in ("I", "F"):  # the scaling depends on the range: a first pass finds it
        for _, band in _bands(img):
            if band.size:
                low, high = min(low, band.min()), max(high, band.max())
    if img.mode == "F":
        scale, divisor = (255.0 if low >= 0.0 and high <= 1.0 else 1.0), 1.0
    else:
        scale, divisor = 1.0, (257.0 if img.mode != "I" or high > 255 else 1.0)  # 65535 -> 255
    gray = np.empty((img.size[1], img.size[0]), np.uint8)
    for top, band in _bands(img):
        band *= scale
        band /= divisor
        gray[top : top + len(band)] = np.clip(np.rint(band, out=band), 0, 255, out=band)
    return gray


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as described in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in INTEGER_MODES or mode == "F":
        return Image.fromarray(to_8_bit(img), "L").convert("RGB")
    if mode == "P" or (mode in ("L", "1") and "transparency" in img.info):
        return over_black(img) if "transparency" in img.info else img.convert("RGB")
    if mode in ALPHA_MODES:
        return over_black(img)
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise UnsupportedImage(f"images in colour mode {mode} are not supported ({err}); send an RGB JPEG or PNG") from None


def over_black(img: Image.Image) -> Image.Image:
    """An image with an alpha channel composited over opaque black, in bands of rows.

    The same pixels as ``Image.alpha_composite`` over black (round(c * a / 255)),
    without its three full-size RGBA copies (936 MB for a 49 MP PNG): only the
    RGB result is full size.
    """
    width, height = img.size
    out = Image.new("RGB", img.size)
    rows = max(1, BAND_PIXELS // max(1, width))
    for top in range(0, height, rows):
        box = (0, top, width, min(top + rows, height))
        band = np.asarray(img.crop(box).convert("RGBA"))
        rgb = band[..., :3].astype(np.uint16)  # 255 * 255 + 127 fits: no wider temporaries
        rgb *= band[..., 3:]
        rgb += 127
        rgb //= 255
        out.paste(Image.fromarray(rgb.astype(np.uint8), "RGB"), box[:2])
    return out


def prepare_image(
    data: bytes,
    size: int,
    method: str = "bilinear",
    *,
    max_pixels: int = MAX_PIXELS,
    draft_factor: int | None = DRAFT_FACTOR,
    max_jpeg_scans: int = MAX_JPEG_SCANS,
) -> Prepared:
    """Decode an upload into the model's ``size`` x ``size`` RGB uint8 input.

    Raises an ImageError subclass (with its HTTP status) for anything that
    cannot be served.
    """
    if method not in METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {', '.join(METHODS)}")
    img = open_image(data, max_pixels)
    fmt, width, height, mode = img.format or "?", img.size[0], img.size[1], img.mode
    if fmt in ("JPEG", "MPO") and (scans := jpeg_scans(data, max_jpeg_scans)) > max_jpeg_scans:
        raise TooManyScans(
            f"the JPEG has more than {max_jpeg_scans} scans (found {scans} before stopping); a photo has at most a few "
            "dozen, so it is refused rather than decoded; re-save it as a baseline JPEG"
        )
    scale = 1
    if fmt in ("JPEG", "MPO") and draft_scale(width, height, size, draft_factor) > 1:  # MPO: a phone's multi-picture JPEG
        # draft picks the largest reduction that keeps both sides >= the requested size
        img.draft(None, (draft_factor * size, draft_factor * size))
        scale = round(width / img.size[0])
    try:
        # The first load must succeed: PIL lets a second load() "succeed" on a half-decoded image.
        # (PNG's getexif() loads too, so the EXIF block is read only after this.)
        img.load()
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLarge(f"the image is too large to decode safely: {err}") from None
    except MemoryError:
        raise ImageTooLarge("the image is too large to decode in the memory available") from None
    except Exception as err:  # noqa: BLE001 - untrusted input: any decoder failure is the upload's fault
        raise CorruptImage(f"the {fmt} image is truncated or corrupt: {err}") from None
    orientation = 1
    try:
        orientation = int(img.getexif().get(ORIENTATION, 1) or 1)
        ImageOps.exif_transpose(img, in_place=True)
    except Exception as err:  # noqa: BLE001 - a broken EXIF block is ignored, not fatal
        log.warning("ignoring an unreadable EXIF orientation: %s", err)
    try:
        if img.mode in INTEGER_MODES or img.mode == "F":
            img = Image.fromarray(to_8_bit(img), "L")
        if img.mode == "L" and "transparency" not in img.info and img.size != (size, size):
            img = img.resize((size, size), METHODS[method])  # before to_rgb: a quarter of the memory, the same pixels
        img = to_rgb(img)
        if img.size != (size, size):
            img = img.resize((size, size), METHODS[method])
        pixels = np.asarray(img, dtype=np.uint8)
    except ImageError:
        raise
    except MemoryError:
        raise ImageTooLarge("the image is too large to convert in the memory available") from None
    except Exception as err:  # noqa: BLE001 - e.g. a mode PIL cannot convert
        raise UnsupportedImage(f"cannot convert this {fmt} image ({mode}) to RGB: {err}") from None
    return Prepared(pixels, fmt, width, height, mode, orientation, scale)
