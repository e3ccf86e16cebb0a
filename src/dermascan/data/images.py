"""Checking that image files exist and decode.

Every official ISIC image is a JPEG, so by default a file must *be* a JPEG:
its format is taken from its first bytes (the magic number), never from its
name. A PNG (or anything else) saved as ``<id>.jpg`` is excluded with the
format its bytes say ("not a JPEG file (its bytes are PNG)"): the loaders
would read it, but in an ISIC folder it is a sign of a wrong or damaged
download, and a truncated PNG would otherwise pass the header check.

``header`` mode reads the magic bytes and the image header (format, size)
and looks for the JPEG end-of-image marker in the file's tail, which catches
truncated downloads at the cost of one small read.

``decode`` mode decodes every pixel, which also catches corrupt data inside
the file, and checks that the compressed data did not end early. A JPEG cut
short and given an end marker decodes without an error in Pillow, OpenCV and
TensorFlow alike: libjpeg only *warns* ("premature end of data segment"),
fills the missing blocks with grey and none of them report the warning. So
the check asks the decoder itself: the image is decoded again with filler
bytes put in front of its end marker. A complete image never reads past its
last block, so the two decodes are identical; an image whose data ends early
reads the filler as its missing blocks, and they differ. Baseline JPEGs are
compared at 1/8 scale (the DCT scaling still decodes every block's DC
coefficient, at a fraction of the cost); progressive JPEGs, whose later scans
refine the AC coefficients, at full size.
"""

from __future__ import annotations

import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

log = logging.getLogger("dermascan.data.images")

JPEG_EOI = b"\xff\xd9"
# What a file's first bytes say it is. ISIC images must be JPEG.
MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"RIFF", "WEBP"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)
EXPECTED_FORMAT = "JPEG"
# Put before the end marker to see whether the decoder wants more data:
# every byte value except 0xFF, which would start a marker.
FILLER = bytes(range(255)) * 4
# Some encoders pad after the end-of-image marker; look this far back.
TAIL_BYTES = 4096
# Real dermoscopic images are at most a few tens of megapixels.
MAX_PIXELS = 200_000_000
# Images per task handed to a worker thread.
CHUNK = 128


def sniff(head: bytes) -> str:
    """The format that a file's first bytes say, or ``unknown``."""
    for magic, name in MAGIC:
        if head.startswith(magic):
            return name
    return "unknown"


def _decoded(blob: bytes, reduce: bool) -> bytes:
    with Image.open(io.BytesIO(blob)) as img:
        if reduce:
            img.draft(img.mode, (max(1, img.width // 8), max(1, img.height // 8)))
        img.load()
        return img.tobytes()


def jpeg_ends_early(data: bytes, progressive: bool) -> bool:
    """True if the JPEG's compressed data ends before its last block (see the module docstring)."""
    end = data.rfind(JPEG_EOI)
    if end < 0:
        return True
    reduce = not progressive
    return _decoded(data[: end + 2], reduce) != _decoded(data[:end] + FILLER + JPEG_EOI, reduce)


def check_image(
    path: str | os.PathLike[str], mode: str = "header", expected: str | None = EXPECTED_FORMAT
) -> str | None:
    """Return None if the image is usable, else the reason it is not.

    ``expected``: the format the file's bytes must have (None: any format Pillow reads).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "missing file"
    except OSError as err:
        return f"unreadable file ({err.strerror})"
    if size == 0:
        return "empty file (0 bytes)"
    try:
        with open(path, "rb") as handle:
            head = handle.read(16)
    except OSError as err:
        return f"unreadable file ({err.strerror})"
    if expected is not None and (said := sniff(head)) != expected:
        return f"not a {expected} file (its bytes are {said})"
    try:
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format
            progressive = bool(img.info.get("progressive") or img.info.get("progression"))
            if width <= 0 or height <= 0:
                return "undecodable image (zero size)"
            if width * height > MAX_PIXELS:
                return f"image too large ({width}x{height})"
            if mode == "decode":
                img.load()
        if mode == "decode" and fmt == "JPEG" and jpeg_ends_early(path.read_bytes(), progressive):
            return "truncated JPEG (compressed data ends early)"
    except UnidentifiedImageError:
        return "undecodable image (not a recognised image format)"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"undecodable image ({err})"
    if fmt == "JPEG" and mode == "header":
        with open(path, "rb") as handle:
            handle.seek(max(0, size - TAIL_BYTES))
            if JPEG_EOI not in handle.read():
                return "truncated JPEG (no end-of-image marker)"
    return None


def check_images(
    paths: Iterable[str], mode: str = "header", workers: int = 8, desc: str = "checking images"
) -> list[Optional[str]]:
    """``check_image`` over many files, threaded, with a progress bar."""
    paths = list(paths)
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    results: list[Optional[str]] = []
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), desc=desc, unit="img", mininterval=1.0
    ) as bar:
        for chunk_results in pool.map(lambda chunk: [check_image(p, mode) for p in chunk], chunks):
            results += chunk_results
            bar.update(len(chunk_results))
    return results
