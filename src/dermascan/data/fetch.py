"""One file over HTTP: resumable, retried, size- and sha256-checked (``python -m dermascan.download`` uses it).

A download goes to ``<name>.part`` first. An interrupted one resumes with an
HTTP ``Range`` request (or starts over when the server ignores it), and
connection errors and short reads are retried with backoff. The size is
checked against the caller's figure or the server's own, and the sha256 when
given; only then does the file take its final name, by an atomic rename.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

from tqdm import tqdm

from dermascan import __version__
from dermascan.errors import DownloadError

log = logging.getLogger("dermascan.data.fetch")

USER_AGENT = f"dermascan/{__version__} (python urllib)"
# HTTP statuses worth another try: the server may answer next time.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")


class _Transient(Exception):
    """A failure another attempt may get past (short read, 5xx, bad range)."""



_RETRYABLE = (
    _Transient,
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


@dataclass
class Fetched:
    size: int
    sha256: str


class _PartFile:
    """The ``.part`` file of one download, and the sha256 of the bytes in it."""

    def __init__(self, dest: Path) -> None:
        self.name = dest.name
        self.path = dest.with_name(dest.name + ".part")
        self._hash = hashlib.sha256()
        self._hashed = 0
        self.total: Optional[int] = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def sync(self) -> int:
        """Hash whatever is on disk but not hashed yet; return the size on disk."""
        size = self.size
        if size != self._hashed:
            self._hash = hashlib.sha256()
            with self.path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    self._hash.update(block)
            self._hashed = size
        return size

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
        self._hash = hashlib.sha256()
        self._hashed = 0

    def announce(self, total: Optional[int]) -> None:
        """Note the full size a response gives; a change from before means a changed file."""
        if total is None:
            return
        before, self.total = self.total, total
        if before is not None and total != before:
            self.clear()
            raise _Transient(f"its size on the server changed from {before} to {total} bytes")

    def open(self, offset: int) -> BinaryIO:
        if offset == 0:
            self.clear()
        return self.path.open("ab")

    def write(self, f: BinaryIO, chunk: bytes) -> None:
        f.write(chunk)
        self._hash.update(chunk)
        self._hashed += len(chunk)

    def hexdigest(self) -> str:
        self.sync()
        return self._hash.hexdigest()


def _parse_content_range(value: Optional[str]) -> tuple[Optional[int], Optional[int]]:
    """``bytes 100-199/1000`` -> (100, 1000); ``bytes */1000`` -> (None, 1000)."""
    match = _CONTENT_RANGE.fullmatch((value or "").strip())
    if match is None:
        return None, None
    start = int(match.group(1)) if match.group(1) is not None else None
    total = int(match.group(3)) if match.group(3) != "*" else None
    return start, total


def _http_error(err: urllib.error.HTTPError, url: str, part: _PartFile, offset: int) -> int:
    """Turn an HTTP error status into a total size (416 on a complete part) or an exception."""
    if err.code == 416 and offset:
        _, total = _parse_content_range(err.headers.get("Content-Range"))
        part.announce(total)
        if total == offset:
            return total
        log.warning("%s: server refused to resume at byte %d; starting over", part.name, offset)
        part.clear()
        raise _Transient(f"HTTP 416 for a resume at byte {offset}")
    if err.code in TRANSIENT_STATUSES:
        raise _Transient(f"HTTP {err.code} {err.reason}")
    raise DownloadError(f"{part.name}: HTTP {err.code} {err.reason} from {url}")


def _response_total(response: Any, part: _PartFile, offset: int) -> tuple[int, Optional[int]]:
    """Where this response's body starts in the file, and the file's full size if known."""
    length = response.headers.get("Content-Length")
    body = int(length) if length is not None and length.isdigit() else None
    if response.status == 206:
        start, total = _parse_content_range(response.headers.get("Content-Range"))
        if start != offset:
            part.clear()
            raise _Transient(f"server resumed at byte {start}, not {offset}")
        if total is None and body is not None:
            total = offset + body
        return offset, total
    if response.status == 200:
        if offset:
            log.info("%s: server does not resume downloads; starting over", part.name)
        return 0, body
    raise _Transient(f"unexpected HTTP status {response.status}")


def _attempt(
    url: str,
    part: _PartFile,
    *,
    expected_size: Optional[int],
    timeout_s: float,
    chunk_bytes: int,
    progress: bool,
) -> Optional[int]:
    """One request: add what the server sends to the part file; return the full size if known."""
    offset = part.sync()
    if expected_size is not None and offset > expected_size:
        part.clear()
        offset = 0
    if expected_size is not None and offset == expected_size:
        return expected_size
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        request = urllib.request.Request(url, headers=headers)
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as err:
        with err:
            return _http_error(err, url, part, offset)
    with response:
        start, total = _response_total(response, part, offset)
        part.announce(total)
        if expected_size is not None and total is not None and total != expected_size:
            part.clear()
            raise DownloadError(
                f"{part.name}: the server reports {total} bytes but the "
                f"config expects {expected_size} (download.sizes), at {url}"
            )
        _stream(response, part, start, total, chunk_bytes=chunk_bytes, progress=progress)
    size = part.size
    if total is not None and size < total:
        raise _Transient(f"connection closed after {size} of {total} bytes")
    return total


def _stream(
    response: Any,
    part: _PartFile,
    start: int,
    total: Optional[int],
    *,
    chunk_bytes: int,
    progress: bool,
) -> None:
    """Append the response body to the part file, with a progress bar."""
    bar = tqdm(
        total=total,
        initial=start,
        desc=part.name,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        disable=not progress,
        leave=False,
    )
    with bar, part.open(start) as f:
        while True:
            chunk = response.read(chunk_bytes)
            if not chunk:
                return
            part.write(f, chunk)
            bar.update(len(chunk))


def fetch(
    url: str,
    dest: Path,
    *,
    expected_size: Optional[int] = None,
    sha256: Optional[str] = None,
    timeout_s: float,
    retries: int,
    backoff_s: float,
    chunk_bytes: int,
    progress: bool,
) -> Fetched:
    """Download ``url`` to ``dest`` (via ``dest.part``, resuming), check it, return size and sha256.

    The transfer settings have no defaults here: ``download.yaml`` holds them.

    The size must equal ``expected_size`` when given, otherwise the size the
    server announced (Content-Length or Content-Range). ``sha256`` is checked
    when given. On any failure DownloadError is raised and ``dest`` does not
    exist; a partial ``.part`` is kept for the next run to resume, a complete
    but wrong one is deleted.
    """
    dest = Path(dest)
    part = _PartFile(dest)
    total: Optional[int] = None
    for attempt in range(retries + 1):
        try:
            total = _attempt(
                url,
                part,
                expected_size=expected_size,
                timeout_s=timeout_s,
                chunk_bytes=chunk_bytes,
                progress=progress,
            )
            break
        except _RETRYABLE as err:
            reason = getattr(err, "reason", None) or err
            if attempt == retries:
                raise DownloadError(
                    f"{dest.name}: download from {url} failed after "
                    f"{retries + 1} attempt(s): {reason}"
                ) from err
            delay = backoff_s * 2**attempt
            log.warning(
                "%s: %s; retry %d of %d in %.1f s", dest.name, reason, attempt + 1, retries, delay
            )
            time.sleep(delay)
        except OSError as err:
            raise DownloadError(f"{dest.name}: cannot write {part.path}: {err}") from err
    return _finish(url, dest, part, total=total, expected_size=expected_size, sha256=sha256)


def _finish(
    url: str,
    dest: Path,
    part: _PartFile,
    *,
    total: Optional[int],
    expected_size: Optional[int],
    sha256: Optional[str],
) -> Fetched:
    """Check the complete part file and give it its final name."""
    size = part.size
    want = expected_size if expected_size is not None else total
    if want is not None and size != want:
        part.clear()
        raise DownloadError(
            f"{dest.name}: got {size} bytes, expected {want}, from {url}; the download was deleted"
        )
    digest = part.hexdigest()
    if sha256 is not None and digest != sha256.lower():
        part.clear()
        raise DownloadError(
            f"{dest.name}: sha256 {digest} does not match the expected {sha256.lower()}, "
            f"from {url}; the download was deleted"
        )
    os.replace(part.path, dest)
    log.info("%s: downloaded %d bytes (sha256 %s)", dest.name, size, digest)
    return Fetched(size=size, sha256=digest)
