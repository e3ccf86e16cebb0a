"""The resize cache: each image decoded and resized once, then read every epoch.

ISIC 2019 holds images of 1024x1024 and larger; decoding them every epoch
wastes most of the input pipeline's time. The cache stores each image,
resized to ``size`` x ``size`` with ``method``, as a high-quality JPEG under
``<dir>/<size>px-<method>/<image_id>.jpg``. The key is the image id, size
and method, so several runs (and several experiments) share one cache, and
images already cached are never read again. Files are written to a
temporary name and renamed, so concurrent runs filling the same cache do not
see half-written images.

The resize squashes to a square, as ``ImageDataGenerator``'s
``target_size`` does; serving must resize the same way.
"""

from __future__ import annotations

import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Optional

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dermascan.config import ResizeMethod
from dermascan.errors import DataError

log = logging.getLogger("dermascan.data.cache")

# PIL's filter for each config.ResizeMethod.
METHODS = {
    ResizeMethod.nearest: Image.Resampling.NEAREST,
    ResizeMethod.bilinear: Image.Resampling.BILINEAR,
    ResizeMethod.bicubic: Image.Resampling.BICUBIC,
    ResizeMethod.lanczos: Image.Resampling.LANCZOS,
    ResizeMethod.area: Image.Resampling.BOX,
}
CHUNK = 32


def cache_folder(cache_dir: str | os.PathLike[str], size: int, method: str) -> Path:
    if method not in METHODS:
        raise DataError(f"unknown resize method {method!r}; expected one of {', '.join(METHODS)}")
    return Path(cache_dir) / f"{size}px-{method}"


def cached_paths(image_ids: Iterable[str], cache_dir: str | os.PathLike[str], size: int, method: str) -> list[Path]:
    folder = cache_folder(cache_dir, size, method)
    return [folder / f"{image_id}.jpg" for image_id in image_ids]


def resize_image(source: str | os.PathLike[str], size: int, method: str) -> Image.Image:
    """Decode ``source`` as RGB and resize it to ``size`` x ``size``."""
    with Image.open(source) as img:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), METHODS[method])
        return img


def _write_one(source: str, target: Path, size: int, method: str, quality: int) -> Optional[str]:
    try:
        img = resize_image(source, size, method)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        return f"{source}: {err}"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    img.save(tmp, format="JPEG", quality=quality, subsampling=0)
    os.replace(tmp, target)
    return None


def build_cache(
    image_ids: Iterable[str],
    sources: Iterable[str],
    cache_dir: str | os.PathLike[str],
    size: int,
    method: str = "bilinear",
    quality: int = 95,
    workers: int = 4,
) -> list[str]:
    """Make sure every image is in the cache; return the cache paths, in order.

    Only images missing from the cache are read. An original that cannot be
    decoded stops the run with a DataError naming it.
    """
    folder = cache_folder(cache_dir, size, method)
    folder.mkdir(parents=True, exist_ok=True)
    ids, sources = list(image_ids), list(sources)
    targets = cached_paths(ids, cache_dir, size, method)
    todo = [(src, dst) for src, dst in zip(sources, targets) if not dst.is_file()]
    if todo:
        log.info("resize cache %s: %d of %d images to resize", folder, len(todo), len(ids))
        chunks = [todo[i : i + CHUNK] for i in range(0, len(todo), CHUNK)]

        def work(chunk: list[tuple[str, Path]]) -> list[str]:
            return [e for src, dst in chunk if (e := _write_one(src, dst, size, method, quality))]

        errors: list[str] = []
        with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
            total=len(todo), desc="resize cache", unit="img", mininterval=1.0
        ) as bar:
            for chunk, failed in zip(chunks, pool.map(work, chunks)):
                errors += failed
                bar.update(len(chunk))
        if errors:
            shown = "\n  ".join(errors[:5])
            raise DataError(
                f"{len(errors)} image(s) could not be decoded for the resize cache:\n  {shown}\n"
                "They were readable when the manifest was built; re-run ingestion to exclude them."
            )
    return [str(t) for t in targets]
