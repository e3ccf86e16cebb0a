"""``MANIFEST.sha256``: a checksum of every file in an export folder, and its check.

The format is ``sha256sum``'s (``<sha256>  <relative path>`` per line), so
``sha256sum -c MANIFEST.sha256`` checks a folder too. This module imports no
TensorFlow: the server verifies a folder before it loads any model file, and
a TFLite server never imports TensorFlow at all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from dermascan.artifacts import CHECKSUMS
from dermascan.errors import DermascanError


class ManifestError(DermascanError):
    """A folder does not match its MANIFEST.sha256: it must not be served."""


def sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def listed_files(folder: Path) -> list[str]:
    """Every file under ``folder`` but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != CHECKSUMS)


def write_manifest(folder: Path) -> Path:
    """Write ``MANIFEST.sha256`` for every other file in ``folder``."""
    folder = Path(folder)
    path = folder / CHECKSUMS
    path.write_text("".join(f"{sha256(folder / name)}  {name}\n" for name in listed_files(folder)))
    return path


def verify_manifest(folder: Path) -> int:
    """Check every file against ``MANIFEST.sha256``; return the number checked.

    Raises ManifestError, naming the files, when the folder or its manifest is
    missing, a line is malformed, or a file is missing, changed or unlisted.
    """
    folder = Path(folder)
    path = folder / CHECKSUMS
    if not folder.is_dir():
        raise ManifestError(f"export folder {folder} not found")
    if not path.is_file():
        raise ManifestError(f"{path} not found: refusing a folder without checksums (re-export it)")
    listed: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or not name or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ManifestError(f"{path}, line {number}: not a '<sha256>  <relative path>' line: {line[:120]!r}")
        listed[name] = digest
    problems = [f"missing: {n}" for n in listed if not (folder / n).is_file()]
    problems += [f"changed: {n}" for n, d in listed.items() if (folder / n).is_file() and sha256(folder / n) != d]
    problems += [f"not in the manifest: {n}" for n in listed_files(folder) if n not in listed]
    if problems:
        shown = "\n  ".join(problems[:10])
        raise ManifestError(f"{folder} does not match {CHECKSUMS} ({len(problems)} problem(s)):\n  {shown}")
    return len(listed)
