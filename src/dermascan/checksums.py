"""``MANIFEST.sha256``: a checksum of every file in an export folder, and its check.

The format is ``sha256sum``'s (``<sha256>  <relative path>`` per line), so
``sha256sum -c MANIFEST.sha256`` checks a folder too; and what
``sha256sum -c`` accepts is accepted here: hex in either case, one space or
tab before the name and an optional mode marker (`` `` text, ``*`` binary),
BSD-style ``SHA256 (<path>) = <sha256>`` lines (``sha256sum --tag``),
leading blanks, blank lines, ``#`` comments, and the backslash-escaped lines
``sha256sum`` writes for a name with a backslash or a newline. This module imports no
TensorFlow: the server verifies a folder before it loads any model file, and
a TFLite server never imports TensorFlow at all.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path, PurePosixPath

from dermascan.artifacts import CHECKSUMS
from dermascan.errors import DermascanError


class ManifestError(DermascanError):
    """A folder does not match its MANIFEST.sha256: it must not be served."""


# sha256sum's lines, as GNU coreutils' sha256sum -c reads them (tests/test_serve_exports.py checks both agree):
# 64 hex digits (either case), a blank, an optional mode (' ' text, '*' binary), then a non-empty name;
# or the BSD tag form. The mode is taken whenever it is there, so "<sha256>  " has no name.
LINE = re.compile(r"(?P<digest>[0-9a-fA-F]{64})[ \t](?P<rest>.*)")
TAGGED = re.compile(r"SHA256 ?\((?P<name>.+)\) *= *(?P<digest>[0-9a-fA-F]{64})")
ESCAPES = {"\\\\": "\\", "\\n": "\n", "\\r": "\r"}


def _parse(line: str) -> tuple[str, str] | None:
    """A manifest line's (lower-case digest, name), or None when sha256sum -c would call it improperly formatted."""
    line = line.lstrip(" \t")
    escaped = line.startswith("\\")
    if escaped:
        line = line[1:]
    tagged = TAGGED.fullmatch(line)
    if tagged:
        digest, name = tagged["digest"], tagged["name"]
    else:
        match = LINE.fullmatch(line)
        if not match:
            return None
        digest, rest = match["digest"], match["rest"]
        name = rest[1:] if rest[:1] in (" ", "*") else rest
    if escaped:
        name = re.sub(r"\\.", lambda m: ESCAPES.get(m.group(), m.group()), name)
    return (digest.lower(), name) if name else None


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
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ManifestError(f"{path} is not UTF-8 text: {err}") from None
    listed: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parsed = _parse(line)
        name = PurePosixPath(parsed[1]) if parsed else None
        if name is None or name.is_absolute() or ".." in name.parts or not name.parts:
            raise ManifestError(f"{path}, line {number}: not a '<sha256>  <relative path>' line: {line[:120]!r}")
        listed[name.as_posix()] = parsed[0]
    problems = [f"missing: {n}" for n in listed if not (folder / n).is_file()]
    problems += [f"changed: {n}" for n, d in listed.items() if (folder / n).is_file() and sha256(folder / n) != d]
    problems += [f"not in the manifest: {n}" for n in listed_files(folder) if n not in listed]
    if problems:
        shown = "\n  ".join(problems[:10])
        raise ManifestError(f"{folder} does not match {CHECKSUMS} ({len(problems)} problem(s)):\n  {shown}")
    return len(listed)
