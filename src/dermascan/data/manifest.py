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
import os
import tempfile
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from dermascan.artifacts import MANIFEST, MANIFEST_SUMMARY
from dermascan.checksums import sha256
from dermascan.classes import CODES
from dermascan.data.isic import Excluded, shorten
from dermascan.errors import DataError

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
    csv_rows: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The summary's content. Excluded ids and reasons are shortened (``isic.shorten``): a hostile
    input value is recorded by its start and length, so the summary stays small."""
    by_reason: dict[str, list[str]] = defaultdict(list)
    for row in excluded:
        by_reason[shorten(row.reason, 200)].append(shorten(row.image_id))
    summary = {
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
    if csv_rows is not None:
        summary["csv_rows"] = csv_rows
    return summary


def _unwritable(out_dir: Path, err: OSError) -> DataError:
    """One line naming the output folder and why it cannot be written."""
    for part in (out_dir, *out_dir.parents):
        if part.exists() and not part.is_dir():
            where = "is a file" if part == out_dir else f"is inside {part}, which is a file"
            return DataError(f"cannot write the manifest: output folder {out_dir} {where} (data.processed_dir)")
    why = err.strerror or str(err)
    return DataError(f"cannot write the manifest: output folder {out_dir} is not writable ({why}) (data.processed_dir)")


def check_writable(out_dir: Path) -> None:
    """Create ``out_dir`` and write a probe file in it; a DataError naming the folder if that fails.

    Called before the slow work, so that a bad ``data.processed_dir`` fails in
    a second, not after every image was checked. It writes for real instead of
    asking ``os.access``, which is wrong for root, ACLs and read-only mounts.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-probe-")
        os.close(handle)
        os.unlink(probe)
    except OSError as err:
        raise _unwritable(out_dir, err) from None


def write(manifest: pd.DataFrame, summary: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write both files, each through a temporary file; a DataError naming ``out_dir`` if it cannot be written."""
    manifest_path, summary_path = out_dir / MANIFEST, out_dir / MANIFEST_SUMMARY
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        # A temporary name of its own: concurrent jobs (a k-fold sweep) write the same files.
        tmp = manifest_path.with_name(f".{MANIFEST}.{uuid.uuid4().hex}.tmp")
        manifest[COLUMNS].to_csv(tmp, index=False)
        tmp.replace(manifest_path)
        tmp = summary_path.with_name(f".{MANIFEST_SUMMARY}.{uuid.uuid4().hex}.tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(summary_path)
    except OSError as err:
        raise _unwritable(out_dir, err) from None
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
    csv_rows = summary.get("csv_rows", {})
    texts = {"malformed": "malformed CSV rows left out", "exact_duplicates": "exact duplicate CSV rows read once"}
    for key, text in texts.items():
        if csv_rows.get(key):
            per_file = ", ".join(f"{name} {entry['count']}" for name, entry in csv_rows[key].items())
            lines.append(f"{text}: {per_file}")
    return "\n".join(lines)


def evaluation_rows(manifest: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of ``split`` that can be scored: an 8-class label, or an ISIC 2018 label (official test AKIEC)."""
    rows = manifest[manifest["split"] == split]
    return rows[rows["label"].notna() | rows["label_2018"].notna()].reset_index(drop=True)
