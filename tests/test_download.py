"""Tests for ``python -m dermascan.download`` against a loopback HTTP server.

The server serves small generated zips and CSVs at the official paths
(``/2018/ISIC2018_Task3_Training_Input.zip`` ...), supports ``Range``
requests, records every request, and can misbehave on demand: drop the
connection part-way, announce more bytes than it sends, answer an error
status, or ignore ``Range``. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dermascan.config import DownloadConfig, Release, validate
from dermascan.config import compose as compose_validated
from dermascan.data.fetch import fetch
from dermascan.download import STATE_FILE, download, extract
from dermascan.errors import ConfigError, DownloadError

# The official files of each release, as configs/download.yaml must list them.
OFFICIAL_FILES: dict[str, list[str]] = {
    "isic2018_train": [
        "2018/ISIC2018_Task3_Training_Input.zip",
        "2018/ISIC2018_Task3_Training_GroundTruth.zip",
        "2018/ISIC2018_Task3_Training_LesionGroupings.csv",
    ],
    "isic2018_val": [
        "2018/ISIC2018_Task3_Validation_Input.zip",
        "2018/ISIC2018_Task3_Validation_GroundTruth.zip",
    ],
    "isic2018_test": [
        "2018/ISIC2018_Task3_Test_Input.zip",
        "2018/ISIC2018_Task3_Test_GroundTruth.zip",
    ],
    "isic2019_train": [
        "2019/ISIC_2019_Training_Input.zip",
        "2019/ISIC_2019_Training_GroundTruth.csv",
        "2019/ISIC_2019_Training_Metadata.csv",
    ],
}


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
NO_PROXY = {"no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost"}

# What each release looks like in dest once downloaded (besides the state file).
LAYOUT = {
    "isic2018_train": {
        "ISIC2018_Task3_Training_GroundTruth.csv",
        "ISIC2018_Task3_Training_Input",
        "ISIC2018_Task3_Training_LesionGroupings.csv",
    },
    "isic2018_val": {
        "ISIC2018_Task3_Validation_GroundTruth.csv",
        "ISIC2018_Task3_Validation_Input",
    },
    "isic2018_test": {"ISIC2018_Task3_Test_GroundTruth.csv", "ISIC2018_Task3_Test_Input"},
    "isic2019_train": {
        "ISIC_2019_Training_GroundTruth.csv",
        "ISIC_2019_Training_Metadata.csv",
        "ISIC_2019_Training_Input",
    },
}
BIG_CSV = "/2019/ISIC_2019_Training_GroundTruth.csv"
TRAIN_INPUT = "/2018/ISIC2018_Task3_Training_Input.zip"


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _images(folder: str, first: int, n: int = 3) -> dict[str, bytes]:
    rng = random.Random(first)
    return {
        f"{folder}/ISIC_{i:07d}.jpg": b"\xff\xd8\xff\xe0" + rng.randbytes(2000) + b"\xff\xd9"
        for i in range(first, first + n)
    }


def _ground_truth(first: int, n: int = 3) -> bytes:
    rows = "".join(f"ISIC_{i:07d},1.0,0.0,0.0,0.0,0.0,0.0,0.0\n" for i in range(first, first + n))
    return ("image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n" + rows).encode()


def isic_files() -> dict[str, bytes]:
    """Small stand-ins for the official files, keyed by URL path."""
    files: dict[str, bytes] = {}
    for split, first in (("Training", 0), ("Validation", 100), ("Test", 200)):
        stem = f"ISIC2018_Task3_{split}"
        files[f"/2018/{stem}_Input.zip"] = _zip(
            {**_images(f"{stem}_Input", first), f"{stem}_Input/LICENSE.txt": b"CC-BY-NC\n"}
        )
        gt = {f"{stem}_GroundTruth/{stem}_GroundTruth.csv": _ground_truth(first)}
        if split == "Training":
            gt[f"{stem}_GroundTruth/LICENSE.txt"] = b"CC-BY-NC\n"
        files[f"/2018/{stem}_GroundTruth.zip"] = _zip(gt)
    files["/2018/ISIC2018_Task3_Training_LesionGroupings.csv"] = (
        b"image,lesion_id,diagnosis_confirm_type\nISIC_0000000,HAM_0000001,histopathology\n"
    )
    files["/2019/ISIC_2019_Training_Input.zip"] = _zip(_images("ISIC_2019_Training_Input", 300))
    # Big enough to be read in many chunks, so a connection can drop mid-way.
    files[BIG_CSV] = b"image,MEL,NV\n" + random.Random(7).randbytes(256 * 1024)
    files["/2019/ISIC_2019_Training_Metadata.csv"] = b"image,age_approx,sex\nISIC_0000300,55,male\n"
    return files


@dataclass
class FakeISIC:
    """The loopback server's content, behaviour and request log."""

    files: dict[str, bytes]
    url: str = ""
    requests: list[tuple[str, Optional[str]]] = field(default_factory=list)
    # path -> bytes to send before dropping the connection (next request only)
    drop_after: dict[str, int] = field(default_factory=dict)
    # paths whose size is announced 100 bytes larger than what is ever sent
    truncate: set[str] = field(default_factory=set)
    # path -> HTTP error status to answer with
    status: dict[str, int] = field(default_factory=dict)
    ranges: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def paths(self) -> list[str]:
        with self.lock:
            return [path for path, _ in self.requests]


class _Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, *args: Any) -> None:
        """Keep the test output quiet."""

    def do_GET(self) -> None:
        fake: FakeISIC = self.server.fake
        path = urlsplit(self.path).path
        range_header = self.headers.get("Range")
        with fake.lock:
            fake.requests.append((path, range_header))
            drop = fake.drop_after.pop(path, None)
        if path in fake.status:
            self.send_error(fake.status[path])
            return
        body = fake.files.get(path)
        if body is None:
            self.send_error(404)
            return
        size = len(body) + (100 if path in fake.truncate else 0)
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", range_header or "")
        if match and fake.ranges:
            start = int(match.group(1))
            if start >= size:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Length", str(size - start))
        self.send_header("Accept-Ranges", "bytes" if fake.ranges else "none")
        self.end_headers()
        self.wfile.write(payload if drop is None else payload[:drop])
        self.close_connection = True


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeISIC]:
    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    fake = FakeISIC(files=isic_files(), url=f"http://127.0.0.1:{httpd.server_address[1]}/")
    httpd.fake = fake  # type: ignore[attr-defined]
    serve = {"poll_interval": 0.02}  # a quick shutdown
    thread = threading.Thread(target=httpd.serve_forever, kwargs=serve, daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def make_cfg(server: FakeISIC, dest: Path, **download_overrides: Any) -> DictConfig:
    settings = {
        "base_url": server.url,
        "dest": str(dest),
        "timeout_s": 5,
        "retries": 2,
        "backoff_s": 0,
        "chunk_bytes": 16 * 1024,
        "progress": False,
        **download_overrides,
    }
    paths = {"data_dir": str(dest.parent), "runs_dir": str(dest.parent / "runs")}
    return compose_validated("download", DownloadConfig, values={"paths": paths, "download": settings})


def names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


# ---------------------------------------------------------------------------
# Downloads that work
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("release", [r.value for r in Release])
def test_release_is_laid_out_like_the_official_one(
    server: FakeISIC, tmp_path: Path, release: str
) -> None:
    dest = tmp_path / "isic"
    produced = download(make_cfg(server, dest, releases=[release]))

    # The rest of a ground-truth folder (a licence) stays in the folder.
    leftovers = {"ISIC2018_Task3_Training_GroundTruth"} if release == "isic2018_train" else set()
    assert {p.name for p in produced} == LAYOUT[release] | leftovers
    assert names(dest) == LAYOUT[release] | {STATE_FILE} | leftovers
    for path in produced:
        assert path.exists()
    image_dir = next(p for p in produced if p.name.endswith("_Input"))
    assert len(list(image_dir.glob("ISIC_*.jpg"))) == 3
    table = next(p for p in produced if p.name.endswith("_GroundTruth.csv"))
    assert table.read_bytes().startswith(b"image,")
    if release == "isic2018_train":
        assert names(dest / "ISIC2018_Task3_Training_GroundTruth") == {"LICENSE.txt"}
    if release == "isic2019_train":
        assert (dest / "ISIC_2019_Training_GroundTruth.csv").read_bytes() == server.files[BIG_CSV]
    state = json.loads((dest / STATE_FILE).read_text())
    assert set(state["files"]) == {Path(p).name for p in OFFICIAL_FILES[release]}


def test_all_releases_by_default(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    download(make_cfg(server, dest))
    assert set().union(*LAYOUT.values()) <= names(dest)
    every = [f"/{p}" for files in OFFICIAL_FILES.values() for p in files]
    assert sorted(server.paths()) == sorted(every)


def test_second_run_makes_no_requests(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    cfg = make_cfg(server, dest, releases=["isic2018_train", "isic2019_train"])
    first = download(cfg)
    server.requests.clear()

    second = download(cfg)

    assert server.requests == []
    assert second == first


def test_second_run_fetches_only_what_went_missing(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    cfg = make_cfg(server, dest, releases=["isic2018_train"])
    download(cfg)
    server.requests.clear()
    for path in (dest / "ISIC2018_Task3_Training_Input").iterdir():
        path.unlink()
    (dest / "ISIC2018_Task3_Training_Input").rmdir()
    (dest / "ISIC2018_Task3_Training_LesionGroupings.csv").write_bytes(b"edited")

    download(cfg)

    groupings = "/2018/ISIC2018_Task3_Training_LesionGroupings.csv"
    assert sorted(server.paths()) == [TRAIN_INPUT, groupings]
    assert len(list((dest / "ISIC2018_Task3_Training_Input").glob("*.jpg"))) == 3


def test_keep_archives(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    cfg = make_cfg(server, dest, releases=["isic2018_val"], keep_archives=True)
    download(cfg)
    assert (dest / "ISIC2018_Task3_Validation_Input.zip").read_bytes() == server.files[
        "/2018/ISIC2018_Task3_Validation_Input.zip"
    ]
    server.requests.clear()
    download(cfg)
    assert server.requests == []


def test_resume_after_dropped_connection(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    server.drop_after[BIG_CSV] = 100_000

    download(make_cfg(server, dest, releases=["isic2019_train"]))

    assert [r for r in server.requests if r[0] == BIG_CSV] == [
        (BIG_CSV, None),
        (BIG_CSV, "bytes=100000-"),
    ]
    assert (dest / "ISIC_2019_Training_GroundTruth.csv").read_bytes() == server.files[BIG_CSV]
    assert not list(dest.glob("*.part"))


def test_resume_partial_file_from_an_earlier_run(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    dest.mkdir()
    (dest / "ISIC_2019_Training_GroundTruth.csv.part").write_bytes(server.files[BIG_CSV][:50_000])

    download(make_cfg(server, dest, releases=["isic2019_train"]))

    assert (BIG_CSV, "bytes=50000-") in server.requests
    assert (BIG_CSV, None) not in server.requests
    assert (dest / "ISIC_2019_Training_GroundTruth.csv").read_bytes() == server.files[BIG_CSV]


def test_server_without_range_support_starts_over(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    server.ranges = False
    server.drop_after[BIG_CSV] = 100_000

    download(make_cfg(server, dest, releases=["isic2019_train"]))

    assert [r for r in server.requests if r[0] == BIG_CSV] == [
        (BIG_CSV, None),
        (BIG_CSV, "bytes=100000-"),
    ]
    assert (dest / "ISIC_2019_Training_GroundTruth.csv").read_bytes() == server.files[BIG_CSV]


def test_unrecorded_complete_file_is_checked_not_fetched_again(
    server: FakeISIC, tmp_path: Path
) -> None:
    dest = tmp_path / "isic"
    dest.mkdir()
    (dest / "ISIC_2019_Training_GroundTruth.csv").write_bytes(server.files[BIG_CSV])

    download(make_cfg(server, dest, releases=["isic2019_train"]))

    # One range request past the end (answered 416 with the full size), no body.
    size = len(server.files[BIG_CSV])
    assert [r for r in server.requests if r[0] == BIG_CSV] == [(BIG_CSV, f"bytes={size}-")]
    assert (dest / "ISIC_2019_Training_GroundTruth.csv").read_bytes() == server.files[BIG_CSV]


def test_fetch_returns_size_and_sha256(server: FakeISIC, tmp_path: Path) -> None:
    body = server.files[BIG_CSV]
    digest = hashlib.sha256(body).hexdigest()
    got = fetch(
        server.url + BIG_CSV.lstrip("/"),
        tmp_path / "gt.csv",
        expected_size=len(body),
        sha256=digest.upper(),
        timeout_s=5,
        retries=2,
        backoff_s=0,
        chunk_bytes=4096,
        progress=False,
    )
    assert (got.size, got.sha256) == (len(body), digest)
    assert (tmp_path / "gt.csv").read_bytes() == body


# ---------------------------------------------------------------------------
# Downloads that fail
# ---------------------------------------------------------------------------


def test_wrong_sha256_leaves_no_file(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    wrong = {"ISIC_2019_Training_GroundTruth.csv": "0" * 64}
    cfg = make_cfg(server, dest, releases=["isic2019_train"], sha256=wrong)

    with pytest.raises(DownloadError, match="sha256") as err:
        download(cfg)

    assert "ISIC_2019_Training_GroundTruth.csv" in str(err.value)
    assert server.url + BIG_CSV.lstrip("/") in str(err.value)
    assert not (dest / "ISIC_2019_Training_GroundTruth.csv").exists()
    assert not (dest / "ISIC_2019_Training_GroundTruth.csv.part").exists()


def test_wrong_size_leaves_no_file(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    sizes = {"ISIC_2019_Training_Metadata.csv": 5}
    cfg = make_cfg(server, dest, releases=["isic2019_train"], sizes=sizes)

    with pytest.raises(DownloadError, match=r"ISIC_2019_Training_Metadata\.csv.*expects 5"):
        download(cfg)

    assert not list(dest.glob("ISIC_2019_Training_Metadata.csv*"))


def test_truncated_response_gives_up_after_retries(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    server.truncate.add(BIG_CSV)
    cfg = make_cfg(server, dest, releases=["isic2019_train"], retries=2)

    with pytest.raises(DownloadError, match="after 3 attempt") as err:
        download(cfg)

    assert server.url + BIG_CSV.lstrip("/") in str(err.value)
    assert server.paths().count(BIG_CSV) == 3
    assert all(rng is not None for path, rng in server.requests[-2:])  # each retry resumed
    assert not (dest / "ISIC_2019_Training_GroundTruth.csv").exists()


@pytest.mark.parametrize(("code", "attempts"), [(404, 1), (500, 3)])
def test_http_error_names_file_and_url(
    server: FakeISIC, tmp_path: Path, code: int, attempts: int
) -> None:
    dest = tmp_path / "isic"
    server.status[BIG_CSV] = code

    with pytest.raises(DownloadError, match=str(code)) as err:
        download(make_cfg(server, dest, releases=["isic2019_train"], retries=2))

    assert server.url + BIG_CSV.lstrip("/") in str(err.value)
    assert "ISIC_2019_Training_GroundTruth.csv" in str(err.value)
    assert server.paths().count(BIG_CSV) == attempts
    assert not (dest / "ISIC_2019_Training_GroundTruth.csv").exists()


def test_zip_slip_member_is_refused(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    server.files[TRAIN_INPUT] = _zip(
        {"ISIC2018_Task3_Training_Input/ok.jpg": b"x", "../evil.txt": b"boom"}
    )

    with pytest.raises(DownloadError, match="unsafe member") as err:
        download(make_cfg(server, dest, releases=["isic2018_train"]))

    assert server.url + TRAIN_INPUT.lstrip("/") in str(err.value)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "ISIC2018_Task3_Training_Input.zip").exists()
    assert not (dest / "ISIC2018_Task3_Training_Input").exists()


@pytest.mark.parametrize(
    "member", ["/etc/evil.txt", "a/../../evil.txt", "C:\\evil.txt", "a\\..\\..\\evil.txt"]
)
def test_extract_refuses_unsafe_paths(tmp_path: Path, member: str) -> None:
    archive = tmp_path / "bad.zip"
    archive.write_bytes(_zip({member: b"boom"}))
    (tmp_path / "out").mkdir()
    with pytest.raises(DownloadError, match="unsafe member"):
        extract(archive, tmp_path / "out")
    assert names(tmp_path / "out") == set()


def test_not_a_zip_is_deleted(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    server.files[TRAIN_INPUT] = b"<html>not a zip</html>"

    with pytest.raises(DownloadError, match="not a valid zip") as err:
        download(make_cfg(server, dest, releases=["isic2018_train"]))

    assert server.url + TRAIN_INPUT.lstrip("/") in str(err.value)
    assert not list(dest.glob("ISIC2018_Task3_Training_Input*"))
    state = json.loads((dest / STATE_FILE).read_text())
    assert "ISIC2018_Task3_Training_Input.zip" not in state["files"]


# ---------------------------------------------------------------------------
# Config and entry point
# ---------------------------------------------------------------------------


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="download", overrides=overrides)


def test_config_composes_and_validates() -> None:
    cfg = validate(_compose(["paths.data_dir=/data"]), DownloadConfig)

    assert cfg.download.dest == "/data/raw/isic"
    assert cfg.download.base_url == "https://isic-challenge-data.s3.amazonaws.com/"
    assert list(cfg.download.releases) == list(Release)
    assert OmegaConf.to_container(cfg.download.files) == OFFICIAL_FILES
    every = {Path(p).name for files in OFFICIAL_FILES.values() for p in files}
    assert set(cfg.download.sha256) == every and not any(cfg.download.sha256.values())
    assert set(cfg.download.sizes) == every and not any(cfg.download.sizes.values())


def test_config_overrides() -> None:
    overrides = ["download.releases=[isic2019_train]", "download.retries=1"]
    cfg = validate(_compose(overrides), DownloadConfig)
    assert list(cfg.download.releases) == [Release.isic2019_train]
    assert cfg.download.retries == 1


@pytest.mark.parametrize(
    "override",
    ["download.retries=abc", "download.releases=[isic2020]", "download.keep_archives=maybe"],
)
def test_bad_override_raises_config_error(override: str) -> None:
    with pytest.raises(ConfigError, match="download"):
        validate(_compose([override]), DownloadConfig)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"releases": []}, "releases is empty"),
        ({"retries": -1}, "retries"),
        ({"base_url": "ftp://example.org/"}, "base_url"),
        ({"sha256": {"ISIC_2019_Training_GroundTruth.csv": "abc"}}, "not a sha256"),
        ({"sha256": {"nope.zip": None}}, "not a file"),
    ],
)
def test_bad_values_raise_config_error(
    server: FakeISIC, tmp_path: Path, settings: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        download(make_cfg(server, tmp_path / "isic", **settings))
    assert server.requests == []


def _run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "dermascan.download",
            f"paths.runs_dir={tmp_path / 'runs'}",
            *overrides,
        ],
        cwd=tmp_path,
        env={**os.environ, **NO_PROXY},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.integration
def test_cli_downloads(server: FakeISIC, tmp_path: Path) -> None:
    dest = tmp_path / "isic"
    proc = _run_cli(
        tmp_path,
        f"download.base_url={server.url}",
        f"download.dest={dest}",
        "download.releases=[isic2019_train]",
    )
    assert proc.returncode == 0, proc.stderr
    assert LAYOUT["isic2019_train"] <= names(dest)
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_cli_failure_exits_2_with_message(server: FakeISIC, tmp_path: Path) -> None:
    server.status["/2019/ISIC_2019_Training_Input.zip"] = 404
    proc = _run_cli(
        tmp_path,
        f"download.base_url={server.url}",
        f"download.dest={tmp_path / 'isic'}",
        "download.releases=[isic2019_train]",
    )
    assert proc.returncode == 2, proc.stderr
    assert "DownloadError" in proc.stderr
    assert f"{server.url}2019/ISIC_2019_Training_Input.zip" in proc.stderr
    assert "Traceback" not in proc.stderr
