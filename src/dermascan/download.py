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

import json
import logging
import os
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Optional

import hydra
from omegaconf import DictConfig

from dermascan import cli
from dermascan.config import DownloadConfig, Release, config_dir
from dermascan.data.fetch import fetch
from dermascan.errors import ConfigError, DownloadError

log = logging.getLogger("dermascan.download")

STATE_FILE = ".download_state.json"
STATE_VERSION = 1
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
# macOS resource-fork junk some zip tools add; never extracted.
_ZIP_JUNK = "__MACOSX"


@dataclass
class FileRecord:
    """What the state file remembers about one finished download."""

    url: str
    size: int
    sha256: str
    extracted: bool = False
    outputs: list[str] = field(default_factory=list)


class _BadArchive(DownloadError):
    """The archive itself is unusable: not a zip, corrupt, or unsafe paths."""


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
    known = set(Release)
    for key in settings.files:
        if key not in known:
            raise ConfigError(
                f"download.files.{key}: not a release (one of {', '.join(sorted(known))})"
            )
    names: list[str] = []
    for release in settings.releases:
        files = settings.files.get(str(release))
        if not files:
            raise ConfigError(f"download.files has no files for release {Release(release)}")
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
        log.info("release %s -> %s", release, dest)
        for path in settings.files[str(release)]:
            produced += _get_file(settings, dest, state, path)
    log.info("%d release(s) ready in %s", len(settings.releases), dest)
    return produced


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="download")
def main(cfg: DictConfig) -> None:
    cli.run(download, cfg, DownloadConfig)


if __name__ == "__main__":
    main()
