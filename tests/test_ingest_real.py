"""Ingestion on the real, complete ISIC ground-truth and metadata CSVs.

The images are stand-ins (hard links to the real sample JPEGs), so every
step runs as on the real download: labels, merge, metadata, paths, header
checks, split and output files.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from dermascan.classes import CODES
from dermascan.config import IngestConfig
from dermascan.data.isic import RELEASES, read_ground_truth
from dermascan.data.layout import stand_in_layout
from dermascan.data.manifest import read as read_manifest
from dermascan.data.merge import merge_labels
from dermascan.ingest import ingest

from .conftest import compose_config

ISIC2019_COUNTS = {"NV": 12875, "MEL": 4522, "BCC": 3323, "BKL": 2624, "AK": 867, "SCC": 628, "VASC": 253, "DF": 239}


def labels_of_all_releases(csv_dir: Path) -> dict[str, pd.DataFrame]:
    out = {}
    for name, release in RELEASES.items():
        rows, excluded = read_ground_truth(csv_dir, release)
        assert excluded == [], f"{name}: the official file has no bad rows"
        out[name] = rows
    return out


def test_isic2019_counts(isic_csvs):
    rows, excluded = read_ground_truth(isic_csvs, RELEASES["isic2019_train"])
    assert rows["label"].value_counts().to_dict() == ISIC2019_COUNTS
    assert len(rows) == 25331 and excluded == []
    assert rows["image_id"].str.endswith("_downsampled").sum() == 2074


def test_union_counts_and_akiec_policy(isic_csvs):
    labels = labels_of_all_releases(isic_csvs)
    naive = sum(len(rows) for rows in labels.values())
    assert naive == 25331 + 10015 + 193 + 1512  # HAM10000 counted twice

    dropped = merge_labels(labels, akiec="drop")
    assert len(dropped.labels) == 26985
    assert dropped.duplicates["images_in_several_releases"] == 10015
    assert dropped.labels["image_id"].is_unique
    ambiguous = [e for e in dropped.excluded if "AKIEC" in e.reason]
    assert len(ambiguous) == len(dropped.excluded) == 51
    by_source = pd.Series([e.source for e in ambiguous]).value_counts().to_dict()
    assert by_source == {"isic2018_test": 43, "isic2018_val": 8}

    as_ak = merge_labels(labels, akiec="ak")
    assert len(as_ak.labels) == 27036 and as_ak.excluded == []
    only_2018_akiec = as_ak.labels[
        (as_ak.labels["label_2018"] == "AKIEC") & ~as_ak.labels["source"].str.contains("isic2019")
    ]
    assert len(only_2018_akiec) == 51 and set(only_2018_akiec["label"]) == {"AK"}


def test_ham10000_akiec_takes_the_isic2019_label(isic_csvs):
    merged = merge_labels(labels_of_all_releases(isic_csvs)).labels
    ham_akiec = merged[(merged["source"] == "isic2019_train+isic2018_train") & (merged["label_2018"] == "AKIEC")]
    assert ham_akiec["label"].value_counts().to_dict() == {"SCC": 197, "AK": 130}
    # Every other 2018 label maps one to one onto the 2019 label.
    other = merged[merged["label_2018"].notna() & (merged["label_2018"] != "AKIEC")]
    assert (other["label"] == other["label_2018"]).all()


def test_official_split_keeps_2018_test_akiec_for_2018_scoring(isic_csvs):
    labels = labels_of_all_releases(isic_csvs)
    merged = merge_labels(labels, akiec="drop", keep_unlabelled_akiec=frozenset({"isic2018_test"}))
    test = merged.labels[merged.labels["source"] == "isic2018_test"]
    assert len(test) == 1512
    unlabelled = test[test["label"].isna()]
    assert len(unlabelled) == 43 and set(unlabelled["label_2018"]) == {"AKIEC"}
    assert [e.source for e in merged.excluded] == ["isic2018_val"] * 8


@pytest.fixture(scope="session")
def real_layout(isic_csvs, sample_jpegs, tmp_path_factory) -> Path:
    return stand_in_layout(tmp_path_factory.mktemp("isic") / "raw", isic_csvs, sample_jpegs)


@pytest.fixture(scope="session")
def real_ingest(real_layout, tmp_path_factory):
    out = tmp_path_factory.mktemp("processed")
    cfg = compose_config(
        "ingest", ["data=isic", f"data.root={real_layout}", f"data.processed_dir={out}"], IngestConfig
    )
    return ingest(cfg)


@pytest.mark.integration
def test_full_union_ingests_to_the_expected_manifest(real_ingest):
    manifest = real_ingest.manifest
    assert len(manifest) == 26985 and manifest["image_id"].is_unique
    assert manifest["label"].isin(CODES).all()
    downsampled = manifest[manifest["image_id"].str.endswith("_downsampled")]
    assert len(downsampled) == 2074
    assert downsampled["path"].map(lambda p: Path(p).name.endswith("_downsampled.jpg") and Path(p).is_file()).all()
    # Metadata: lesion ids from the 2019 metadata, filled with the image id where empty.
    assert manifest["lesion_id"].notna().all()
    assert manifest.loc[manifest["image_id"] == "ISIC_0027419", "lesion_id"].item() == "HAM_0000118"
    assert manifest["site"].notna().mean() > 0.85 and manifest["age"].notna().mean() > 0.9

    on_disk = read_manifest(real_ingest.manifest_path)
    assert list(on_disk.columns) == [
        "image_id", "path", "label", "source", "lesion_id", "age", "sex", "site", "split", "label_2018",
    ]
    pd.testing.assert_frame_equal(on_disk, manifest.reset_index(drop=True), check_dtype=False)

    summary = json.loads(real_ingest.summary_path.read_text())
    assert summary["counts"]["total"]["total"] == 26985
    assert summary["excluded"]["by_reason"][
        "ambiguous AKIEC (AK or SCC) not relabelled by ISIC 2019 (data.akiec=drop)"
    ]["count"] == 51
    assert summary["duplicates_merged"]["images_in_several_releases"] == 10015
    assert len(summary["inputs"]) == 6 and all(len(h) == 64 for h in summary["inputs"].values())


def test_grouped_split_is_leak_free_and_stratified(real_ingest):
    manifest = real_ingest.manifest
    splits_per_lesion = manifest.groupby("lesion_id")["split"].nunique()
    assert (splits_per_lesion == 1).all()
    # HAM10000 lesions photographed several times really are grouped.
    assert manifest.groupby("lesion_id").size().max() > 1

    shares = pd.crosstab(manifest["label"], manifest["split"], normalize="index")
    assert set(shares.columns) == {"train", "val", "test"}
    assert (pd.crosstab(manifest["label"], manifest["split"]) > 0).all().all()
    overall = manifest["split"].value_counts(normalize=True)
    assert abs(overall["test"] - 0.15) < 0.01 and abs(overall["val"] - 0.15) < 0.01
    for split in ("train", "val", "test"):
        assert (shares[split] - overall[split]).abs().max() < 0.03, split

    class_share = manifest["label"].value_counts(normalize=True)
    for split, part in manifest.groupby("split"):
        assert (part["label"].value_counts(normalize=True) - class_share).abs().max() < 0.02, split


def test_grouped_split_is_seeded(real_ingest, real_layout, tmp_path):
    from dermascan.ingest import assign_splits

    manifest = real_ingest.manifest
    cfg = compose_config("ingest", ["data=isic", f"data.root={real_layout}"], IngestConfig)
    again = assign_splits(manifest, cfg.data)
    assert (again == manifest["split"]).all()
    cfg = compose_config("ingest", ["data=isic", f"data.root={real_layout}", "data.seed=7"], IngestConfig)
    assert (assign_splits(manifest, cfg.data) != manifest["split"]).any()


def test_kfold_splits_share_grouped_test_and_partition_the_rest_by_lesion(real_ingest, real_layout):
    """On the real 26,985-image manifest: every fold has the grouped split's test images, the 5 val folds
    are disjoint, cover train + val exactly once, keep each lesion in one fold, and are class-stratified."""
    from dermascan.ingest import assign_splits

    manifest = real_ingest.manifest
    base = ["data=isic", f"data.root={real_layout}", "data.split=kfold", "data.folds=5"]
    splits = [
        assign_splits(manifest, compose_config("ingest", [*base, f"data.fold={k}"], IngestConfig).data)
        for k in range(5)
    ]
    grouped_test = manifest["split"] == "test"
    rest = manifest.loc[~grouped_test]
    for split in splits:
        assert ((split == "test") == grouped_test).all()
        assert (split.groupby(manifest["lesion_id"]).nunique() == 1).all()
    in_val = pd.concat([(split == "val")[~grouped_test] for split in splits], axis=1)
    assert (in_val.sum(axis=1) == 1).all()  # each train+val image is val in exactly one fold
    fold_of = in_val.to_numpy().argmax(axis=1)
    assert (pd.Series(fold_of, index=rest.index).groupby(rest["lesion_id"]).nunique() == 1).all()
    shares = pd.crosstab(rest["label"], fold_of, normalize="index")
    assert (shares - 0.2).abs().max().max() < 0.02  # stratified: each class ~1/5 in each fold
    assert (pd.crosstab(rest["label"], fold_of) > 0).all().all()
    seven = compose_config("ingest", [*base, "data.fold=0", "data.seed=7"], IngestConfig).data
    assert (assign_splits(manifest, seven) != splits[0]).any()


@pytest.mark.parametrize(
    "override, message",
    [("data.folds=1", "data.folds must be >= 2"), ("data.fold=5", "data.fold must be in 0 .. 4"),
     ("data.fold=-1", "data.fold must be in 0 .. 4")],
)
def test_kfold_settings_are_checked(override, message):
    from dermascan.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        compose_config("ingest", ["data=isic", "data.split=kfold", override], IngestConfig)


@pytest.mark.integration
def test_official_split_end_to_end(isic_csvs, sample_jpegs, tmp_path):
    releases = ["isic2018_train", "isic2018_val", "isic2018_test"]
    root = stand_in_layout(tmp_path / "raw", isic_csvs, sample_jpegs, releases)
    (root / "ISIC_2019_Training_Metadata.csv").unlink()  # lesion ids from HAM10000_metadata.csv
    cfg = compose_config(
        "ingest",
        [
            "data=isic",
            f"data.root={root}",
            f"data.processed_dir={tmp_path / 'out'}",
            f"data.releases=[{','.join(releases)}]",
            "data.split=official",
        ],
        IngestConfig,
    )
    manifest = ingest(cfg).manifest
    test = manifest[manifest["split"] == "test"]
    assert len(test) == 1512 and (test["source"] == "isic2018_test").all()
    assert test["label_2018"].value_counts()["AKIEC"] == 43
    assert test["label"].isna().sum() == 43
    val = manifest[manifest["split"] == "val"]
    assert (val["source"] == "isic2018_val").sum() == 193 - 8
    train_val = manifest[manifest["source"] == "isic2018_train"]
    assert set(train_val["split"]) == {"train", "val"}
    assert (train_val.groupby("lesion_id")["split"].nunique() == 1).all()
    # HAM10000 metadata gives lesion ids and maps its sites onto the 2019 vocabulary.
    assert train_val["lesion_id"].str.startswith("HAM_").all()
    assert set(train_val["site"].dropna()) <= {
        "head/neck", "posterior torso", "anterior torso", "upper extremity",
        "lower extremity", "palms/soles", "oral/genital",
    }
