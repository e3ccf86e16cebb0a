"""Download the official ISIC 2018 Task 3 and ISIC 2019 training releases.

    python -m dermascan.download [download.releases=[isic2019_train]] [download.dest=DIR]

Each release is a few files on the challenge's public server (see
``configs/download.yaml``). They are laid out in ``download.dest`` the way
``data=isic`` expects them: CSV files as they are, zip archives extracted
(the ``*_Input/`` image folders at the top level, the ground-truth CSV lifted
out of its ``*_GroundTruth/`` folder).

A download goes to ``<name>.part`` first. An interrupted one resumes with an
HTTP ``Range`` request (or starts over when the server ignores it), and
connection errors and short reads are retried with backoff. Each file's size
is checked against the config or the server's own figure, and its sha256
where the config gives one; only then does it take its final name, by an
atomic rename. ``.download_state.json`` in ``dest`` records the finished
files and extractions, so a second run skips them without a request.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Optional

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from dermascan import __version__, cli
from dermascan.config import PathsConfig, Release, config_dir
from dermascan.errors import ConfigError, DownloadError

log = logging.getLogger("dermascan.download")

BASE_URL = "https://isic-challenge-data.s3.amazonaws.com/"

# Paths relative to the base URL, per release.
OFFICIAL_FILES: dict[str, list[str]] = {
    Release.isic2018_train.value: [
        "2018/ISIC2018_Task3_Training_Input.zip",
        "2018/ISIC2018_Task3_Training_GroundTruth.zip",
        "2018/ISIC2018_Task3_Training_LesionGroupings.csv",
    ],
    Release.isic2018_val.value: [
        "2018/ISIC2018_Task3_Validation_Input.zip",
        "2018/ISIC2018_Task3_Validation_GroundTruth.zip",
    ],
    Release.isic2018_test.value: [
        "2018/ISIC2018_Task3_Test_Input.zip",
        "2018/ISIC2018_Task3_Test_GroundTruth.zip",
    ],
    Release.isic2019_train.value: [
        "2019/ISIC_2019_Training_Input.zip",
        "2019/ISIC_2019_Training_GroundTruth.csv",
        "2019/ISIC_2019_Training_Metadata.csv",
    ],
}

STATE_FILE = ".download_state.json"
STATE_VERSION = 1
USER_AGENT = f"dermascan/{__version__} (python urllib)"
# HTTP statuses worth another try: the server may answer next time.
TRANSIENT_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_CONTENT_RANGE = re.compile(r"bytes\s+(?:(\d+)-(\d+)|\*)/(\d+|\*)")
# macOS resource-fork junk some zip tools add; never extracted.
_ZIP_JUNK = "__MACOSX"


@dataclass
class DownloadSettings:
    base_url: str = BASE_URL
    dest: str = "data/raw/isic"
    releases: list[Release] = field(default_factory=lambda: list(Release))
    files: dict[str, list[str]] = field(
        default_factory=lambda: {k: list(v) for k, v in OFFICIAL_FILES.items()}
    )
    sha256: dict[str, Optional[str]] = field(default_factory=dict)
    sizes: dict[str, Optional[int]] = field(default_factory=dict)
    timeout_s: float = 60.0
    retries: int = 5
    backoff_s: float = 2.0
    chunk_bytes: int = 1 << 20
    keep_archives: bool = False
    progress: bool = True


@dataclass
class DownloadConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    download: DownloadSettings = field(default_factory=DownloadSettings)


@dataclass
class FileRecord:
    """What the state file remembers about one finished download."""

    url: str
    size: int
    sha256: str
    extracted: bool = False
    outputs: list[str] = field(default_factory=list)


class _Transient(Exception):
    """A failure another attempt may get past (short read, 5xx, bad range)."""


class _BadArchive(DownloadError):
    """The archive itself is unusable: not a zip, corrupt, or unsafe paths."""


_RETRYABLE = (
    _Transient,
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
)


# --------------------------------------------------------------------------
# State file
# --------------------------------------------------------------------------


class DownloadState:
    """``.download_state.json``: file name -> FileRecord, saved after each change."""

    def __init__(self, path: Path, records: dict[str, FileRecord]) -> None:
        self.path = path
        self.records = records

    @classmethod
    def load(cls, dest: Path) -> DownloadState:
        path = dest / STATE_FILE
        if not path.is_file():
            return cls(path, {})
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            records = {name: FileRecord(**rec) for name, rec in raw["files"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            log.warning("ignoring unreadable state file %s (%s); checking every file", path, err)
            return cls(path, {})
        return cls(path, records)

    def get(self, name: str) -> Optional[FileRecord]:
        return self.records.get(name)

    def put(self, name: str, record: FileRecord) -> None:
        self.records[name] = record
        self.save()

    def drop(self, name: str) -> None:
        if self.records.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        payload = {
            "version": STATE_VERSION,
            "files": {name: asdict(rec) for name, rec in sorted(self.records.items())},
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------
# One file over HTTP
# --------------------------------------------------------------------------


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
    timeout_s: float = 60.0,
    retries: int = 5,
    backoff_s: float = 2.0,
    chunk_bytes: int = 1 << 20,
    progress: bool = True,
) -> Fetched:
    """Download ``url`` to ``dest`` (via ``dest.part``, resuming), check it, return size and sha256.

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


# --------------------------------------------------------------------------
# Archives
# --------------------------------------------------------------------------


def _check_member(name: str, archive: Path) -> None:
    """Refuse a member that would land outside the extraction folder (zip-slip)."""
    normal = name.replace("\\", "/")
    parts = PurePosixPath(normal).parts
    if normal.startswith("/") or ".." in parts or (parts and ":" in parts[0]):
        raise _BadArchive(
            f"{archive.name}: unsafe member path {name!r} (absolute or with '..'); not extracted"
        )


def _replace(src: Path, dst: Path) -> None:
    if dst.is_dir() and not dst.is_symlink():
        log.warning("replacing existing folder %s", dst)
        shutil.rmtree(dst)
    elif dst.exists() or dst.is_symlink():
        log.warning("replacing existing file %s", dst)
        dst.unlink()
    os.replace(src, dst)


def _lift_tables(staging: Path, stem: str) -> None:
    """An archive holding one folder named after it: move the CSV tables in it up a level."""
    folder = staging / stem
    if [p.name for p in staging.iterdir()] != [stem] or not folder.is_dir():
        return
    for table in sorted(folder.glob("*.csv")):
        os.replace(table, staging / table.name)
    if not any(folder.iterdir()):
        folder.rmdir()


def extract(archive: Path, dest: Path) -> list[Path]:
    """Extract zip ``archive`` into ``dest``; return the top-level paths it produced.

    Members are checked first (no absolute paths, no ``..``) and extracted
    into a staging folder, then moved into place, replacing what was there.
    When the archive holds a single folder named after the archive (as the
    ISIC ``*_GroundTruth.zip`` files do), its CSV files go to the top level.
    """
    staging = dest / f".{archive.name}.extracting"
    if staging.exists():
        shutil.rmtree(staging)
    try:
        with zipfile.ZipFile(archive) as zf:
            members = [m for m in zf.infolist() if not m.filename.startswith(_ZIP_JUNK + "/")]
            for member in members:
                _check_member(member.filename, archive)
            if not members:
                raise _BadArchive(f"{archive.name}: the archive is empty")
            zf.extractall(staging, members=members)
        _lift_tables(staging, archive.stem)
        names = sorted(p.name for p in staging.iterdir())
        for name in names:
            _replace(staging / name, dest / name)
    except (zipfile.BadZipFile, EOFError) as err:
        raise _BadArchive(f"{archive.name}: not a valid zip archive ({err})") from err
    except OSError as err:
        raise DownloadError(f"{archive.name}: cannot extract into {dest}: {err}") from err
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("%s: extracted %s", archive.name, ", ".join(names))
    return [dest / name for name in names]


# --------------------------------------------------------------------------
# Releases
# --------------------------------------------------------------------------


def _check_settings(settings: DictConfig) -> None:
    """Value checks the schema's types cannot express."""
    if not str(settings.base_url).startswith(("http://", "https://")):
        raise ConfigError(f"download.base_url must be an http(s) URL, got {settings.base_url!r}")
    if not settings.releases:
        raise ConfigError("download.releases is empty: name at least one release")
    known = {r.value for r in Release}
    for key in settings.files:
        if key not in known:
            raise ConfigError(
                f"download.files.{key}: not a release (one of {', '.join(sorted(known))})"
            )
    names: list[str] = []
    for release in settings.releases:
        files = settings.files.get(Release(release).value)
        if not files:
            raise ConfigError(f"download.files has no files for release {Release(release).value}")
        names += [PurePosixPath(p).name for p in files]
    every = {PurePosixPath(p).name for files in settings.files.values() for p in files}
    if len(names) != len(set(names)):
        raise ConfigError("download.files: two files have the same name")
    for key, value in settings.sha256.items():
        if key not in every:
            raise ConfigError(f"download.sha256: {key!r} is not a file in download.files")
        if value is not None and not _SHA256.fullmatch(value):
            raise ConfigError(f"download.sha256.{key}: not a sha256 hex digest: {value!r}")
    for key, value in settings.sizes.items():
        if key not in every:
            raise ConfigError(f"download.sizes: {key!r} is not a file in download.files")
        if value is not None and value < 0:
            raise ConfigError(f"download.sizes.{key} must be >= 0, got {value}")
    for key in ("retries", "backoff_s"):
        if settings[key] < 0:
            raise ConfigError(f"download.{key} must be >= 0, got {settings[key]}")
    for key in ("timeout_s", "chunk_bytes"):
        if settings[key] <= 0:
            raise ConfigError(f"download.{key} must be > 0, got {settings[key]}")


def _url(base_url: str, path: str) -> str:
    return base_url.rstrip("/") + "/" + path.lstrip("/")


def _is_current(record: FileRecord, sha256: Optional[str], size: Optional[int]) -> bool:
    """Does the recorded file still match what the config asks for?"""
    sha_ok = sha256 is None or record.sha256 == sha256.lower()
    return sha_ok and (size is None or record.size == size)


def _get_file(settings: DictConfig, dest: Path, state: DownloadState, path: str) -> list[Path]:
    """Download (and extract) one file unless the state says it is done; return what it produced."""
    name = PurePosixPath(path).name
    url = _url(settings.base_url, path)
    sha256, size = settings.sha256.get(name), settings.sizes.get(name)
    target = dest / name
    record = state.get(name)
    if record is not None and not _is_current(record, sha256, size):
        log.warning("%s: the recorded download differs from download.sha256/sizes", name)
        state.drop(name)
        target.unlink(missing_ok=True)
        record = None
    on_disk = record is not None and target.is_file() and target.stat().st_size == record.size
    if record is not None and record.extracted and all((dest / o).exists() for o in record.outputs):
        if on_disk or not target.exists():
            log.info("%s: already downloaded and extracted", name)
            return [dest / o for o in record.outputs]
    if record is None or not on_disk:
        record = _download_file(settings, url, target, state, sha256=sha256, size=size)
    elif not name.lower().endswith(".zip"):
        log.info("%s: already downloaded", name)
    if not name.lower().endswith(".zip"):
        return [target]
    return _extract_recorded(settings, url, target, state, record)


def _download_file(
    settings: DictConfig,
    url: str,
    target: Path,
    state: DownloadState,
    *,
    sha256: Optional[str],
    size: Optional[int],
) -> FileRecord:
    """Fetch one file the state has no valid record of, and record it."""
    name = target.name
    if state.get(name) is not None:
        state.drop(name)
        if target.exists():
            log.warning("%s: its size on disk differs from the state file; fetching it again", name)
            target.unlink()
    elif target.exists():
        log.info("%s: found without a state record; checking it against the server", name)
        os.replace(target, target.with_name(name + ".part"))
    log.info("%s: fetching %s", name, url)
    got = fetch(
        url,
        target,
        expected_size=size,
        sha256=sha256,
        timeout_s=settings.timeout_s,
        retries=settings.retries,
        backoff_s=settings.backoff_s,
        chunk_bytes=settings.chunk_bytes,
        progress=settings.progress,
    )
    record = FileRecord(url=url, size=got.size, sha256=got.sha256)
    state.put(name, record)
    return record


def _extract_recorded(
    settings: DictConfig, url: str, archive: Path, state: DownloadState, record: FileRecord
) -> list[Path]:
    """Extract a downloaded archive, record that, and drop the archive unless kept."""
    try:
        outputs = extract(archive, archive.parent)
    except _BadArchive as err:
        archive.unlink(missing_ok=True)
        state.drop(archive.name)
        raise DownloadError(f"{err} (downloaded from {url}); the archive was deleted") from err
    record.extracted = True
    record.outputs = [p.name for p in outputs]
    state.put(archive.name, record)
    if not settings.keep_archives:
        archive.unlink()
    return outputs


def download(cfg: DictConfig) -> list[Path]:
    """Fetch the releases in ``cfg.download.releases`` into ``cfg.download.dest``.

    ``cfg`` is a config validated against DownloadConfig. Returns the
    top-level paths the releases consist of (CSV files, image folders).
    """
    settings = cfg.download
    _check_settings(settings)
    dest = Path(settings.dest)
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DownloadError(f"cannot create download.dest {dest}: {err}") from err
    state = DownloadState.load(dest)
    produced: list[Path] = []
    for release in settings.releases:
        release = Release(release)
        log.info("release %s -> %s", release.value, dest)
        for path in settings.files[release.value]:
            produced += _get_file(settings, dest, state, path)
    log.info("%d release(s) ready in %s", len(settings.releases), dest)
    return produced


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="download")
def main(cfg: DictConfig) -> None:
    cli.run(download, cfg, DownloadConfig)


if __name__ == "__main__":
    main()
