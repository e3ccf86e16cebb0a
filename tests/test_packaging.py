"""A non-editable install finds its configs inside the wheel (pkg://dermascan.configs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

from .conftest import REPO


def test_wheel_ships_the_configs_and_ingest_runs_from_it(tmp_path):
    source = tmp_path / "checkout"
    for name in ("src", "configs"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist"), str(source)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("dermascan-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for config in ("ingest.yaml", "paths/default.yaml", "data/isic.yaml", "data/demo.yaml"):
        assert f"dermascan/configs/{config}" in names
    assert not any(name.startswith("configs/") for name in names)
    modules = sorted(str(p.relative_to(REPO / "src")) for p in (REPO / "src/dermascan").rglob("*.py"))
    assert [m for m in modules if m not in names] == [], "every module of src/ must ship in the wheel"

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONWARNINGS": "ignore"}
    where = subprocess.run(
        [sys.executable, "-c", "import dermascan.config as c; print(c.__file__); print(c.config_dir())"],
        capture_output=True, text=True, env=env, cwd=work, check=True,
    ).stdout.split()
    assert where == [str(site / "dermascan" / "config.py"), "pkg://dermascan.configs"]

    run = subprocess.run(
        [sys.executable, "-m", "dermascan.ingest", "data.demo.images_per_class=4", "data.demo.min_side=64", "data.demo.max_side=96"],
        capture_output=True, text=True, env=env, cwd=work, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert (work / "data" / "processed" / "demo" / "manifest.csv").is_file()
