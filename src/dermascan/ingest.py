"""Ingestion: official ISIC files -> ``manifest.csv`` and ``manifest_summary.json``.

    python -m dermascan.ingest                          # the generated demo data
    python -m dermascan.ingest data=isic data.root=DIR  # the real releases

``ingest(cfg)`` is the function that training calls.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dermascan import cli
from dermascan.config import IngestConfig, MissingPolicy, SplitPolicy, config_dir
from dermascan.data import demo, manifest
from dermascan.data.images import check_images
from dermascan.data.isic import (
    HAM10000_METADATA,
    LESION_GROUPINGS_2018,
    METADATA_2019,
    RELEASE_ORDER,
    RELEASES,
    CsvRows,
    Excluded,
    read_ground_truth,
    read_metadata,
)
from dermascan.data.merge import merge_labels
from dermascan.data.split import grouped_split, kfold_split
from dermascan.errors import DataError

log = logging.getLogger("dermascan.ingest")

MISSING_SHOWN = 5


@dataclass
class Ingested:
    manifest: pd.DataFrame
    summary: dict[str, Any]
    manifest_path: Path
    summary_path: Path


def _resolve_paths(root: Path, frame: pd.DataFrame) -> pd.Series:
    """Each image's file: the first of its releases' input folders that has it.

    Ids were validated as plain ISIC ids, so every path is
    ``root/<official input folder>/<id>.jpg``; the check below makes sure no
    path ever leaves ``root``.
    """
    base = os.path.normpath(os.path.abspath(root))

    def locate(image_id: str, source: str) -> str:
        candidates = [os.path.join(base, RELEASES[r].input_dir, f"{image_id}.jpg") for r in source.split("+")]
        for path in candidates:
            if not os.path.normpath(path).startswith(base + os.sep):
                raise DataError(f"refusing to read {path}: outside data.root {base}")
            if os.path.isfile(path):
                return path
        return candidates[0]

    return pd.Series(
        [locate(i, s) for i, s in zip(frame["image_id"], frame["source"])], index=frame.index, dtype=object
    )


OUTSIDE_ROOT = "symlink to a file outside data.root"


def _outside_root(root: Path, paths: pd.Series) -> pd.Series:
    """True where a path resolves (through symlinks) to a file outside ``root``.

    An image folder may hold symlinks, but only to files under ``data.root``
    (itself resolved first, so ``data.root`` may be a symlink): one that
    points elsewhere is excluded with the reason OUTSIDE_ROOT rather than
    followed, so that nothing outside the data folder is ever read. Data kept
    elsewhere: point data.root at the real folder, or copy the files in.
    """
    base = os.path.realpath(root) + os.sep
    return paths.map(lambda path: not os.path.realpath(path).startswith(base))


def _missing_message(root: Path, paths: list[str], releases: list[str]) -> str:
    shown = "\n  ".join(paths[:MISSING_SHOWN])
    absent = [RELEASES[r].input_dir for r in releases if not (root / RELEASES[r].input_dir).is_dir()]
    hint = f" (folder(s) not found: {', '.join(absent)})" if absent else ""
    return (
        f"{len(paths)} image file(s) named in the ground truth are missing under {root}{hint}, e.g.\n  "
        f"{shown}\nDownload them (python -m dermascan.download), or set data.missing=skip to exclude "
        "them and record them in the summary."
    )


def assign_splits(frame: pd.DataFrame, data: DictConfig) -> pd.Series:
    """``data.split``: grouped (by lesion, stratified), official (ISIC 2018 Test/Val) or kfold (fold ``data.fold`` is val)."""
    val, test = data.val_fraction, data.test_fraction
    if data.split == SplitPolicy.kfold:
        return kfold_split(frame["label"], frame["lesion_id"], val, test, data.folds, data.fold, seed=data.seed)
    split = pd.Series(index=frame.index, dtype=object)
    rest = pd.Series(True, index=frame.index)
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    if data.split == SplitPolicy.official:
        split[frame["source"].str.contains("isic2018_test")] = "test"
        split[frame["source"].str.contains("isic2018_val") & split.isna()] = "val"
        # A lesion already in the fixed test or val split keeps all its
        # images there, so that nothing leaks into training.
        lesion_split = dict(zip(frame.loc[split.notna(), "lesion_id"], split[split.notna()]))
        follow = split.isna() & frame["lesion_id"].isin(lesion_split.keys())
        split[follow] = frame.loc[follow, "lesion_id"].map(lesion_split)
        rest = split.isna()
        fractions = {"train": 1.0 - val, "val": val}
    if rest.any():
        split[rest] = grouped_split(
            frame.loc[rest, "label"], frame.loc[rest, "lesion_id"], fractions, seed=data.seed
        )
    return split


def ingest(cfg: DictConfig) -> Ingested:
    """Build the manifest from ``cfg.data`` (a config validated against IngestConfig)."""
    data = cfg.data
    started = time.perf_counter()
    root = Path(data.root)
    if data.demo is not None:
        demo.ensure(root, demo.DemoSpec(**OmegaConf.to_container(data.demo)))
    releases = sorted((str(r) for r in data.releases), key=RELEASE_ORDER.index)
    if not root.is_dir():
        raise DataError(f"data.root {root} is not a directory; see README, 'Getting the data'")
    manifest.check_writable(Path(data.processed_dir))
    log.info("reading %s from %s", ", ".join(releases), root)

    excluded: list[Excluded] = []
    csv_rows = CsvRows()
    per_release = {}
    for name in releases:
        rows, dropped = read_ground_truth(root, RELEASES[name], csv_rows)
        per_release[name] = rows
        excluded += dropped
    keep = frozenset({"isic2018_test"}) if data.split == SplitPolicy.official else frozenset()
    merged = merge_labels(per_release, akiec=str(data.akiec), keep_unlabelled_akiec=keep)
    excluded += merged.excluded

    frame = merged.labels.merge(read_metadata(root, csv_rows), on="image_id", how="left")
    frame["lesion_id"] = frame["lesion_id"].fillna(frame["image_id"])
    frame["path"] = _resolve_paths(root, frame)

    exists = frame["path"].map(os.path.isfile)
    if not exists.all():
        missing = frame.loc[~exists]
        if data.missing == MissingPolicy.error:
            raise DataError(_missing_message(root, list(missing["path"]), releases))
        excluded += [Excluded(i, "missing file", s) for i, s in zip(missing["image_id"], missing["source"])]
        frame = frame[exists].reset_index(drop=True)

    outside = _outside_root(root, frame["path"])
    escaped = frame[outside]
    excluded += [Excluded(i, OUTSIDE_ROOT, s) for i, s in zip(escaped["image_id"], escaped["source"])]
    frame = frame[~outside].reset_index(drop=True)

    reasons = check_images(frame["path"], mode=str(data.verify), workers=data.workers)
    bad = pd.Series([r is not None for r in reasons], index=frame.index)
    excluded += [
        Excluded(i, reason, s)
        for i, s, reason in zip(frame["image_id"], frame["source"], reasons)
        if reason is not None
    ]
    frame = frame[~bad].reset_index(drop=True)
    if frame["label"].notna().sum() == 0:
        raise DataError(f"no usable images left under {root}; see the excluded images in the log")

    frame["split"] = assign_splits(frame, data)
    inputs = [
        root / f
        for f in [RELEASES[r].ground_truth for r in releases] + [METADATA_2019, HAM10000_METADATA, LESION_GROUPINGS_2018]
        if (root / f).is_file()
    ]
    settings = OmegaConf.to_container(data, resolve=True, enum_to_str=True)
    summary = manifest.summarise(frame, excluded, merged.duplicates, inputs, settings, csv_rows.as_dict())
    summary["seconds"] = round(time.perf_counter() - started, 2)
    manifest_path, summary_path = manifest.write(frame, summary, Path(data.processed_dir))
    log.info("manifest: %d images of %d lesions\n%s", summary["images"], summary["lesions"], manifest.format_table(summary))
    log.info("wrote %s and %s in %.1f s", manifest_path, summary_path, summary["seconds"])
    return Ingested(frame[manifest.COLUMNS], summary, manifest_path, summary_path)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="ingest")
def main(cfg: DictConfig) -> None:
    cli.run(ingest, cfg, IngestConfig)


if __name__ == "__main__":
    main()
