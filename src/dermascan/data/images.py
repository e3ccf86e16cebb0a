"""Checking that image files exist and decode.

``header`` mode opens each image and reads its header (format, size) and,
for JPEGs, looks for the end-of-image marker in the file's tail, which
catches truncated downloads at the cost of one small read. ``decode`` mode
decodes every pixel, which also catches corrupt data inside the file.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

log = logging.getLogger("dermascan.data.images")

JPEG_EOI = b"\xff\xd9"
# Some encoders pad after the end-of-image marker; look this far back.
TAIL_BYTES = 4096
# Real dermoscopic images are at most a few tens of megapixels.
MAX_PIXELS = 200_000_000
# Images per task handed to a worker thread.
CHUNK = 128


def check_image(path: str | os.PathLike[str], mode: str = "header") -> Optional[str]:
    """Return None if the image is usable, else the reason it is not."""
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
        with Image.open(path) as img:
            width, height = img.size
            fmt = img.format
            if width <= 0 or height <= 0:
                return "undecodable image (zero size)"
            if width * height > MAX_PIXELS:
                return f"image too large ({width}x{height})"
            if mode == "decode":
                img.load()
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
