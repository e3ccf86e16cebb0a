"""The manifest: one row per image, the table every later stage reads.

Columns: ``image_id, path, label, source, lesion_id, age, sex, site, split,
label_2018``. ``label`` is one of the 8 codes, except for ISIC 2018 Test
AKIEC images kept by the official split, whose 8-class label is unknown
(empty) and whose ``label_2018`` is AKIEC. ``manifest_summary.json`` beside
it holds the counts, every excluded image with its reason, the merged
duplicates and the input files with their sha256.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from dermascan.artifacts import MANIFEST, MANIFEST_SUMMARY
from dermascan.checksums import sha256
from dermascan.classes import CODES
from dermascan.data.isic import Excluded

COLUMNS = ["image_id", "path", "label", "source", "lesion_id", "age", "sex", "site", "split", "label_2018"]
SPLITS = ("train", "val", "test")


def counts(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Images per class x split, with totals; unlabelled rows count as ``none``."""
    labels = manifest["label"].fillna("none")
    table = pd.crosstab(labels, manifest["split"])
    index = list(CODES) + (["none"] if "none" in table.index else [])
    table = table.reindex(index=index, columns=list(SPLITS), fill_value=0)
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    return {str(k): {str(c): int(v) for c, v in row.items()} for k, row in table.iterrows()}


def summarise(
    manifest: pd.DataFrame,
    excluded: Iterable[Excluded],
    duplicates: dict[str, int],
    inputs: Iterable[Path],
    settings: dict[str, Any],
) -> dict[str, Any]:
    by_reason: dict[str, list[str]] = defaultdict(list)
    for row in excluded:
        by_reason[row.reason].append(row.image_id)
    return {
        "images": len(manifest),
        "lesions": int(manifest["lesion_id"].nunique()),
        "counts": counts(manifest),
        "sources": {str(k): int(v) for k, v in manifest["source"].value_counts().items()},
        "excluded": {
            "total": sum(len(ids) for ids in by_reason.values()),
            "by_reason": {reason: {"count": len(ids), "ids": sorted(ids)} for reason, ids in sorted(by_reason.items())},
        },
        "duplicates_merged": duplicates,
        "inputs": {str(path): sha256(path) for path in sorted(inputs)},
        "settings": settings,
    }


def write(manifest: pd.DataFrame, summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest_path, summary_path = out_dir / MANIFEST, out_dir / MANIFEST_SUMMARY
    tmp = manifest_path.with_suffix(".csv.tmp")
    manifest[COLUMNS].to_csv(tmp, index=False)
    tmp.replace(manifest_path)
    tmp = summary_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(summary, indent=2))
    tmp.replace(summary_path)
    return manifest_path, summary_path


def read(path: Path) -> pd.DataFrame:
    """Read a manifest written by ``write``, with its dtypes."""
    return pd.read_csv(
        path,
        dtype={"image_id": str, "path": str, "label": str, "source": str, "lesion_id": str,
               "sex": str, "site": str, "split": str, "label_2018": str},
    )


def format_table(summary: dict[str, Any]) -> str:
    """The short table printed at the end of ingestion."""
    rows = summary["counts"]
    header = f"{'class':<6}" + "".join(f"{s:>8}" for s in (*SPLITS, "total"))
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:<6}" + "".join(f"{row[s]:>8}" for s in (*SPLITS, "total")))
    excluded = summary["excluded"]
    lines.append(f"excluded: {excluded['total']}")
    for reason, entry in excluded["by_reason"].items():
        lines.append(f"  {entry['count']:>6}  {reason}")
    lines.append(f"images in several releases, merged: {summary['duplicates_merged'].get('images_in_several_releases', 0)}")
    return "\n".join(lines)


def evaluation_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of ``split`` that can be scored: an 8-class label, or an ISIC 2018 label (official test AKIEC)."""
    rows = manifest[manifest["split"] == split]
    return rows[rows["label"].notna() | rows["label_2018"].notna()].reset_index(drop=True)
