"""Ingestion hardening (issue 12, items 9-12): output folder, truncated images, CSV rows, symlinks.

Each test builds a bad input from the real sample data and checks the
documented outcome: a one-line DataError (exit 2 from the CLI), or the bad
item excluded with its reason while everything else is kept.
"""

from __future__ import annotations

import builtins
import io
import json
import logging
import os
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from dermascan import cli
from dermascan.config import IngestConfig
from dermascan.data import manifest
from dermascan.data.images import check_image
from dermascan.data.isic import RELEASES
from dermascan.errors import DataError
from dermascan.ingest import ingest

from .conftest import compose_config

R2019 = RELEASES["isic2019_train"]


def ingest_config(root: Path, out: Path, *overrides: str):
    return compose_config(
        "ingest",
        ["data=isic", f"data.root={root}", f"data.processed_dir={out}", "data.releases=[isic2019_train]", *overrides],
        IngestConfig,
    )


def run_ingest(root: Path, tmp_path: Path, *overrides: str):
    return ingest(ingest_config(root, tmp_path / "out", *overrides))


def reasons(result) -> dict[str, list[str]]:
    return {reason: entry["ids"] for reason, entry in result.summary["excluded"]["by_reason"].items()}


def images(root: Path) -> list[Path]:
    return sorted((root / R2019.input_dir).glob("*.jpg"))


# -- 9. An unwritable output folder: exit 2 and one line naming it ------------------------------------------------


def assert_exit_2_naming(root: Path, out: Path, caplog) -> str:
    """The CLI wrapper's outcome: SystemExit(2) and one error line that names ``out``; no traceback."""
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="dermascan"), pytest.raises(SystemExit) as exit_info:
        cli.run(ingest, ingest_config(root, out), IngestConfig)
    assert exit_info.value.code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    line = errors[0].getMessage()
    assert "\n" not in line and str(out) in line and line.startswith("DataError: ")
    return line


def test_output_path_that_is_a_file_exits_2_naming_it(small_root, tmp_path, caplog):
    out = tmp_path / "manifest-here"
    out.write_text("not a folder")
    assert "is a file" in assert_exit_2_naming(small_root, out, caplog)


def test_output_folder_under_a_file_exits_2_naming_it(small_root, tmp_path, caplog):
    parent = tmp_path / "a-file"
    parent.write_text("not a folder")
    line = assert_exit_2_naming(small_root, parent / "processed", caplog)
    assert f"inside {parent}, which is a file" in line


def chmod_stops_writes(folder: Path) -> bool:
    probe = folder / "probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return True
    probe.unlink()
    return False


def test_read_only_output_folder_exits_2_naming_it(small_root, tmp_path, caplog):
    out = tmp_path / "read-only"
    out.mkdir()
    out.chmod(0o555)
    try:
        if not chmod_stops_writes(out):
            pytest.skip("running as root (or with CAP_DAC_OVERRIDE): chmod 0o555 does not stop writes here; "
                        "test_unwritable_output_folder_as_root_exits_2_naming_it covers the case by injection")
        assert "not writable (Permission denied)" in assert_exit_2_naming(small_root, out, caplog)
    finally:
        out.chmod(0o755)


def test_unwritable_output_folder_as_root_exits_2_naming_it(small_root, tmp_path, caplog, monkeypatch):
    """The read-only case where chmod cannot make it (root): every attempt to create a file in the folder
    fails with EACCES, as it does in a read-only folder for a normal user."""
    out = tmp_path / "read-only"
    out.mkdir()

    def refusing(real):
        def opener(file, *args, **kwargs):
            if isinstance(file, (str, os.PathLike)) and Path(os.fspath(file)).parent == out:
                raise PermissionError(13, "Permission denied", os.fspath(file))
            return real(file, *args, **kwargs)
        return opener

    for module, name in ((os, "open"), (io, "open"), (builtins, "open")):
        monkeypatch.setattr(module, name, refusing(getattr(module, name)))
    assert "not writable (Permission denied)" in assert_exit_2_naming(small_root, out, caplog)


def test_write_failure_after_the_checks_is_a_data_error_naming_the_folder(tmp_path):
    """manifest.write itself (e.g. the folder replaced by a file while the images were being checked)."""
    out = tmp_path / "out"
    out.write_text("a file now")
    frame = pd.DataFrame({c: ["x"] for c in manifest.COLUMNS})
    with pytest.raises(DataError, match=f"output folder {out} is a file"):
        manifest.write(frame, {}, out)


# -- 10. Truncated images ---------------------------------------------------------------------------------------


def cut_with_end_marker(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)] + b"\xff\xd9")


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.95])
def test_jpeg_cut_short_with_an_end_marker_fails_decode(sample_jpegs, tmp_path, fraction):
    victim = tmp_path / sample_jpegs[0].name
    victim.write_bytes(sample_jpegs[0].read_bytes())
    assert check_image(victim, "decode") is None
    cut_with_end_marker(victim, fraction)
    assert check_image(victim, "decode") == "truncated JPEG (compressed data ends early)"


def test_progressive_jpeg_cut_short_fails_decode(sample_jpegs, tmp_path):
    buffer = io.BytesIO()
    with Image.open(sample_jpegs[1]) as img:
        img.save(buffer, "JPEG", progressive=True, quality=90)
    victim = tmp_path / "ISIC_0000001.jpg"
    victim.write_bytes(buffer.getvalue())
    assert check_image(victim, "decode") is None
    cut_with_end_marker(victim, 0.6)
    assert check_image(victim, "decode") == "truncated JPEG (compressed data ends early)"


def test_clean_images_pass_the_truncation_check(sample_jpegs):
    """No false alarms: every real sample JPEG is complete."""
    assert [check_image(p, "decode") for p in sample_jpegs[::8]] == [None] * len(sample_jpegs[::8])


@pytest.mark.parametrize("verify", ["header", "decode"])
def test_png_named_jpg_is_excluded_by_its_magic_bytes(small_root, tmp_path, verify):
    """ISIC images are JPEGs: a PNG (here a truncated one) under <id>.jpg is excluded, named by what its bytes are."""
    png, truncated_png, cut = images(small_root)[:3]
    for target, keep in ((png, 1.0), (truncated_png, 0.5)):
        buffer = io.BytesIO()
        with Image.open(target) as img:
            img.save(buffer, "PNG")
        data = buffer.getvalue()
        target.write_bytes(data[: int(len(data) * keep)])
    cut_with_end_marker(cut)

    result = run_ingest(small_root, tmp_path, f"data.verify={verify}")
    why = reasons(result)
    assert why["not a JPEG file (its bytes are PNG)"] == sorted([png.stem, truncated_png.stem])
    if verify == "decode":
        assert why["truncated JPEG (compressed data ends early)"] == [cut.stem]
        assert len(result.manifest) == 237
    else:  # the header check cannot see data that ends early behind an end marker; decode can
        assert len(result.manifest) == 238


# -- 11. CSV rows ---------------------------------------------------------------------------------------------


def test_row_with_an_extra_field_is_excluded_and_the_rest_kept(small_root, tmp_path):
    gt_path = small_root / R2019.ground_truth
    lines = gt_path.read_text().splitlines()
    victim = lines[5].split(",")[0]
    lines[5] += ",1"
    gt_path.write_text("\n".join(lines) + "\n")

    result = run_ingest(small_root, tmp_path)
    assert reasons(result) == {"malformed CSV row (more fields than the header)": [victim]}
    assert len(result.manifest) == 239 and victim not in set(result.manifest["image_id"])
    malformed = result.summary["csv_rows"]["malformed"][R2019.ground_truth]
    assert malformed["count"] == 1 and malformed["rows"][0] == {"first_field": victim, "fields": 11, "header_fields": 10}


def test_exact_duplicate_rows_are_counted_in_the_summary(small_root, tmp_path):
    gt_path = small_root / R2019.ground_truth
    gt = pd.read_csv(gt_path, dtype=str)
    pd.concat([gt, gt.iloc[[3, 3, 7]]]).to_csv(gt_path, index=False)

    result = run_ingest(small_root, tmp_path)
    assert len(result.manifest) == 240 and result.summary["excluded"]["total"] == 0
    rows = result.summary["csv_rows"]
    assert rows["exact_duplicates"][R2019.ground_truth] == {
        "count": 3, "ids": [gt.loc[3, "image"], gt.loc[3, "image"], gt.loc[7, "image"]]}
    assert rows["repeated_ids"][R2019.ground_truth]["count"] == 3
    on_disk = json.loads(result.summary_path.read_text())
    assert on_disk["csv_rows"]["exact_duplicates"][R2019.ground_truth]["count"] == 3
    assert "exact duplicate CSV rows read once: ISIC_2019_Training_GroundTruth.csv 3" in manifest.format_table(result.summary)


@pytest.mark.parametrize(("csv_name", "twice"), [(R2019.ground_truth, "NV"), ("ISIC_2019_Training_Metadata.csv", "sex")])
def test_duplicate_column_name_is_a_data_error_naming_it(small_root, tmp_path, csv_name, twice):
    """A second column of the same name, every required column present: pandas would read it as NV.1 and keep the first."""
    path = small_root / csv_name
    header, *rest = path.read_text().splitlines()
    path.write_text("\n".join([f"{header},{twice}", *(f"{line},0" for line in rest)]) + "\n")
    with pytest.raises(DataError, match=rf"{csv_name}: duplicate column name\(s\) {twice};"):
        run_ingest(small_root, tmp_path)


def test_huge_invalid_id_is_shortened_in_the_summary(small_root, tmp_path):
    gt_path = small_root / R2019.ground_truth
    gt = pd.read_csv(gt_path, dtype=str)
    huge = "ISIC_" + "9" * 4_000_000  # a few MB stands in for the 200 MB of the issue
    pd.concat([gt, gt.iloc[[0]].assign(image=huge)]).to_csv(gt_path, index=False)

    result = run_ingest(small_root, tmp_path)
    (shown,) = reasons(result)["invalid image id (not a plain ISIC id)"]
    assert shown.startswith("ISIC_999") and shown.endswith(f"... ({len(huge)} characters)") and len(shown) < 200
    assert result.summary_path.stat().st_size < 100_000
    assert len(result.manifest) == 240


# -- 12. Symlinks -----------------------------------------------------------------------------------------------


def test_symlink_to_a_file_outside_data_root_is_excluded(small_root, tmp_path):
    outside_dir = tmp_path / "elsewhere"
    outside_dir.mkdir()
    escaping, inside = images(small_root)[:2]
    target = outside_dir / escaping.name
    escaping.replace(target)
    escaping.symlink_to(target)
    # A symlink that stays under data.root is fine.
    spare = small_root / "spare" / inside.name
    spare.parent.mkdir()
    inside.replace(spare)
    inside.symlink_to(spare)

    result = run_ingest(small_root, tmp_path, "data.verify=decode")
    assert reasons(result) == {"symlink to a file outside data.root": [escaping.stem]}
    assert len(result.manifest) == 239 and inside.stem in set(result.manifest["image_id"])
    assert not result.manifest["path"].map(os.path.realpath).str.startswith(str(outside_dir.resolve())).any()


def test_data_root_may_itself_be_a_symlink(small_root, tmp_path):
    link = tmp_path / "root-link"
    link.symlink_to(small_root, target_is_directory=True)
    result = run_ingest(link, tmp_path)
    assert len(result.manifest) == 240 and result.summary["excluded"]["total"] == 0
