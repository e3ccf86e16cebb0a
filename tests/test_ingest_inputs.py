"""Ingestion of bad inputs: each gives its documented outcome, and the other rows survive."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from dermascan.config import IngestConfig
from dermascan.data.images import check_image
from dermascan.data.isic import RELEASES
from dermascan.errors import DataError
from dermascan.ingest import ingest

from .conftest import compose_config

R2019 = RELEASES["isic2019_train"]


def run_ingest(root: Path, tmp_path: Path, *overrides: str):
    cfg = compose_config(
        "ingest",
        ["data=isic", f"data.root={root}", f"data.processed_dir={tmp_path / 'out'}",
         "data.releases=[isic2019_train]", *overrides],
        IngestConfig,
    )
    return ingest(cfg)


def reasons(result) -> dict[str, list[str]]:
    return {reason: entry["ids"] for reason, entry in result.summary["excluded"]["by_reason"].items()}


def test_clean_sample_ingests_all_240(small_root, tmp_path):
    result = run_ingest(small_root, tmp_path, "data.verify=decode")
    assert len(result.manifest) == 240 and result.summary["excluded"]["total"] == 0
    assert result.manifest["label"].value_counts().to_dict() == {code: 30 for code in
                                                                  ("AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC")}


@pytest.mark.parametrize("verify", ["header", "decode"])
def test_truncated_and_empty_jpegs_are_excluded_with_reasons(small_root, tmp_path, verify):
    folder = small_root / R2019.input_dir
    truncated, empty = sorted(folder.glob("*.jpg"))[:2]
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")

    result = run_ingest(small_root, tmp_path, f"data.verify={verify}")
    why = reasons(result)
    assert why["empty file (0 bytes)"] == [empty.stem]
    truncated_reason = [r for r, ids in why.items() if ids == [truncated.stem]]
    assert len(truncated_reason) == 1 and "truncated" in truncated_reason[0]
    assert len(result.manifest) == 238
    assert not result.manifest["image_id"].isin([truncated.stem, empty.stem]).any()


def test_corrupt_pixel_data_is_caught_by_full_decode(small_root, tmp_path):
    victim = sorted((small_root / R2019.input_dir).glob("*.jpg"))[5]
    data = bytearray(victim.read_bytes())
    # A bogus component count in the start-of-scan segment: the header that
    # Image.open reads is intact, only decoding fails.
    sos = data.index(b"\xff\xda")
    data[sos + 4] = 9
    victim.write_bytes(bytes(data))
    assert check_image(victim, "header") is None
    assert check_image(victim, "decode").startswith("undecodable image")

    result = run_ingest(small_root, tmp_path, "data.verify=decode")
    assert list(reasons(result).values()) == [[victim.stem]]
    assert len(result.manifest) == 239


def test_bad_csv_rows_are_excluded_and_others_survive(small_root, tmp_path):
    gt_path = small_root / R2019.ground_truth
    gt = pd.read_csv(gt_path)
    two_ones = gt.loc[0, "image"]
    gt.loc[0, "MEL"] = gt.loc[0, "NV"] = 1
    gt.loc[0, ["BCC", "AK", "BKL", "DF", "VASC", "SCC"]] = 0
    traversal = gt.iloc[[1]].assign(image="../../etc/passwd")
    unk = gt.iloc[[2]].assign(image="ISIC_9999999")
    unk.loc[:, list(gt.columns[1:])] = 0
    unk["UNK"] = 1
    pd.concat([gt, traversal, unk]).to_csv(gt_path, index=False)

    result = run_ingest(small_root, tmp_path)
    why = reasons(result)
    assert why["label row is not exactly one-hot"] == [two_ones]
    assert why["invalid image id (not a plain ISIC id)"] == ["../../etc/passwd"]
    assert why["UNK label"] == ["ISIC_9999999"]
    assert len(result.manifest) == 239
    assert result.manifest["path"].map(lambda p: Path(p).resolve().is_relative_to(small_root.resolve())).all()


def test_conflicting_duplicate_rows_are_excluded(small_root, tmp_path):
    gt_path = small_root / R2019.ground_truth
    gt = pd.read_csv(gt_path)
    flipped = gt.iloc[[0]].copy()
    flipped.loc[:, list(gt.columns[1:])] = 0
    flipped["DF" if gt.loc[0, "DF"] == 0 else "NV"] = 1
    pd.concat([gt, flipped, gt.iloc[[1]]]).to_csv(gt_path, index=False)  # row 1 repeated identically

    result = run_ingest(small_root, tmp_path)
    assert reasons(result) == {"conflicting labels within one release": [gt.loc[0, "image"]]}
    assert len(result.manifest) == 239


def test_missing_csv_column_names_it(small_root, tmp_path):
    gt_path = small_root / R2019.ground_truth
    pd.read_csv(gt_path).drop(columns=["SCC"]).to_csv(gt_path, index=False)
    with pytest.raises(DataError, match=r"ISIC_2019_Training_GroundTruth\.csv: missing column\(s\) SCC"):
        run_ingest(small_root, tmp_path)


def test_missing_image_errors_by_default_and_is_recorded_with_skip(small_root, tmp_path):
    gone = sorted((small_root / R2019.input_dir).glob("*.jpg"))[:7]
    for path in gone:
        path.unlink()
    with pytest.raises(DataError, match=r"7 image file\(s\) .* missing") as err:
        run_ingest(small_root, tmp_path)
    assert gone[0].name in str(err.value) and "data.missing=skip" in str(err.value)

    result = run_ingest(small_root, tmp_path, "data.missing=skip")
    assert reasons(result) == {"missing file": sorted(p.stem for p in gone)}
    assert len(result.manifest) == 233


@pytest.mark.integration
def test_ingest_cli_on_real_files_and_on_bad_input(small_root, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    base = [sys.executable, "-m", "dermascan.ingest", "data=isic", f"data.root={small_root}",
            "data.releases=[isic2019_train]", f"data.processed_dir={tmp_path / 'out'}",
            f"paths.runs_dir={tmp_path / 'runs'}"]
    ok = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert "manifest: 240 images" in ok.stderr + ok.stdout
    assert (tmp_path / "out" / "manifest.csv").is_file()

    (small_root / R2019.ground_truth).write_text("image,MEL\nISIC_0000000,1\n")
    bad = subprocess.run(base, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert bad.returncode == 2
    assert "missing column(s) NV, BCC, AK" in bad.stderr + bad.stdout
    assert "Traceback" not in bad.stderr + bad.stdout
