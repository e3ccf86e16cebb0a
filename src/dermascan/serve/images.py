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


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) and refuse what must not be decoded."""
    if not data:
        raise EmptyImage("the upload is empty (0 bytes): send a JPEG or PNG photo")
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


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB, as described in the module docstring."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in INTEGER_MODES or mode == "F":
        values = np.asarray(img)
        if mode == "F":
            values = values.astype(np.float64)
            values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0)
            if values.size and values.min() >= 0.0 and values.max() <= 1.0:
                values = values * 255.0
        else:
            values = values.astype(np.float64)
            if mode != "I" or (values.size and values.max() > 255):
                values = values / 257.0  # 65535 -> 255
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P" or (mode in ("L", "1") and "transparency" in img.info):
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        if img.mode == "RGB":
            return img
        mode = img.mode
    if mode in ALPHA_MODES:
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except ValueError as err:
        raise UnsupportedImage(f"images in colour mode {mode} are not supported ({err}); send an RGB JPEG or PNG") from None


def prepare_image(
    data: bytes,
    size: int,
    method: str = "bilinear",
    *,
    max_pixels: int = MAX_PIXELS,
    draft_factor: int | None = DRAFT_FACTOR,
) -> Prepared:
    """Decode an upload into the model's ``size`` x ``size`` RGB uint8 input.

    Raises an ImageError subclass (with its HTTP status) for anything that
    cannot be served.
    """
    if method not in METHODS:
        raise ValueError(f"unknown resize method {method!r}; expected one of {', '.join(METHODS)}")
    img = open_image(data, max_pixels)
    fmt, width, height, mode = img.format or "?", img.size[0], img.size[1], img.mode
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
