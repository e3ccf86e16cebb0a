"""The official ISIC files, read into plain tables.

Each reader returns a DataFrame and a list of ``Excluded`` rows: a row that
cannot be used is never dropped silently, it is reported with its reason.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dermascan.classes import ISIC2018_COLUMNS, ISIC2019_COLUMNS
from dermascan.errors import DataError

# A plain ISIC image id. Nothing else ever becomes part of a file path.
IMAGE_ID = re.compile(r"ISIC_[0-9]{7}(_downsampled)?")
# Longest value from an input file copied into a report: a hostile id of
# hundreds of MB is recorded by its start and its length, not whole.
SHOWN_CHARS = 64
# Examples of duplicate rows named per file in the summary.
SHOWN_ROWS = 20
MALFORMED = "malformed CSV row (more fields than the header)"


def shorten(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``value`` as a string of at most about ``limit`` characters, for reports and messages.

    Idempotent: the slack above ``limit`` fits the "... (N characters)" suffix.
    """
    text = str(value)
    return text if len(text) <= limit + 32 else f"{text[:limit]}... ({len(text)} characters)"


@dataclass(frozen=True)
class ReleaseFiles:
    """Where one official release lives under ``data.root``."""

    name: str
    ground_truth: str
    input_dir: str
    columns: tuple[str, ...]
    scheme: int  # 2018 or 2019 label scheme


RELEASES: dict[str, ReleaseFiles] = {
    "isic2019_train": ReleaseFiles(
        "isic2019_train",
        "ISIC_2019_Training_GroundTruth.csv",
        "ISIC_2019_Training_Input",
        ISIC2019_COLUMNS,
        2019,
    ),
    "isic2018_train": ReleaseFiles(
        "isic2018_train",
        "ISIC2018_Task3_Training_GroundTruth.csv",
        "ISIC2018_Task3_Training_Input",
        ISIC2018_COLUMNS,
        2018,
    ),
    "isic2018_val": ReleaseFiles(
        "isic2018_val",
        "ISIC2018_Task3_Validation_GroundTruth.csv",
        "ISIC2018_Task3_Validation_Input",
        ISIC2018_COLUMNS,
        2018,
    ),
    "isic2018_test": ReleaseFiles(
        "isic2018_test",
        "ISIC2018_Task3_Test_GroundTruth.csv",
        "ISIC2018_Task3_Test_Input",
        ISIC2018_COLUMNS,
        2018,
    ),
}
# Precedence when an image is in several releases: ISIC 2019 first (its
# labels are finer), then the 2018 releases.
RELEASE_ORDER: tuple[str, ...] = tuple(RELEASES)

METADATA_2019 = "ISIC_2019_Training_Metadata.csv"
HAM10000_METADATA = "HAM10000_metadata.csv"
LESION_GROUPINGS_2018 = "ISIC2018_Task3_Training_LesionGroupings.csv"

# HAM10000 `localization` -> ISIC 2019 `anatom_site_general`, so that the
# manifest has one vocabulary of sites whichever file an image's metadata
# came from.
HAM_SITE_TO_2019: dict[str, str] = {
    "scalp": "head/neck",
    "face": "head/neck",
    "ear": "head/neck",
    "neck": "head/neck",
    "back": "posterior torso",
    "chest": "anterior torso",
    "abdomen": "anterior torso",
    "trunk": "anterior torso",
    "upper extremity": "upper extremity",
    "hand": "upper extremity",
    "lower extremity": "lower extremity",
    "foot": "lower extremity",
    "acral": "palms/soles",
    "genital": "oral/genital",
}


@dataclass(frozen=True)
class Excluded:
    image_id: str
    reason: str
    source: str


@dataclass
class CsvRows:
    """Rows of the input CSVs that were not used as they stand, per file name, for the summary.

    ``malformed``: rows with more fields than the header (left out; the rest
    of the file is read). ``exact_duplicates``: rows identical to an earlier
    row of the same file (read once). ``repeated_ids``: ground-truth rows
    dropped because their image id was already listed with the same label
    (exact duplicates included; a different label excludes the image).
    """

    malformed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    exact_duplicates: dict[str, dict[str, Any]] = field(default_factory=dict)
    repeated_ids: dict[str, dict[str, Any]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "malformed": {k: {"count": len(v), "rows": v[:SHOWN_ROWS]} for k, v in sorted(self.malformed.items())},
            "exact_duplicates": dict(sorted(self.exact_duplicates.items())),
            "repeated_ids": dict(sorted(self.repeated_ids.items())),
        }


def _counted(ids: pd.Series) -> dict[str, Any]:
    return {"count": len(ids), "ids": [shorten(i) for i in ids.iloc[:SHOWN_ROWS]]}


def _header(path: Path) -> list[str]:
    """The header row; a DataError names any column that appears twice (pandas would keep the first silently)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            names = next(csv.reader(handle), [])
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: not a readable CSV ({shorten(err, 200)})") from None
    twice = [shorten(name) for name, n in Counter(names).items() if n > 1]
    if twice:
        raise DataError(f"{path.name}: duplicate column name(s) {', '.join(twice)}; each column must appear once")
    return names


def _parse(path: Path, malformed: list[list[str]]) -> pd.DataFrame:
    """Parse with the C engine; if some rows have too many fields, again with the Python engine, leaving them out."""
    options: dict[str, Any] = {"dtype": str, "keep_default_na": False}
    try:
        return pd.read_csv(path, **options)
    except pd.errors.ParserError as err:
        if "fields" not in str(err):
            raise
    return pd.read_csv(path, engine="python", on_bad_lines=lambda fields: malformed.append(fields), **options)


def read_csv(path: Path, required: tuple[str, ...], rows: CsvRows | None = None) -> pd.DataFrame:
    """Read an official CSV as strings; fail clearly on a missing file, a missing or duplicate column.

    A row with more fields than the header is left out and recorded in
    ``rows`` (the rest of the file is kept); so is the count of rows that
    repeat an earlier row exactly. Missing trailing fields read as "".
    """
    if not path.is_file():
        raise DataError(f"missing file {path}")
    header = _header(path)
    malformed: list[list[str]] = []
    try:
        frame = _parse(path, malformed).fillna("")
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise DataError(f"{path}: not a readable CSV ({shorten(err, 200)})") from None
    if rows is not None:
        if malformed:
            rows.malformed[path.name] = [
                {"first_field": shorten(f[0]) if f else "", "fields": len(f), "header_fields": len(header)}
                for f in malformed
            ]
        repeated = frame.duplicated()
        if repeated.any():
            rows.exact_duplicates[path.name] = _counted(frame.loc[repeated, frame.columns[0]])
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path.name}: missing column(s) {', '.join(missing)}; "
            f"expected {', '.join(required)}, found {', '.join(shorten(c) for c in frame.columns)}"
        )
    return frame


def read_ground_truth(
    root: Path, release: ReleaseFiles, csv_rows: CsvRows | None = None
) -> tuple[pd.DataFrame, list[Excluded]]:
    """One official ground-truth CSV -> ``image_id, label`` rows.

    ``label`` is the release's own column name (2018 files say AKIEC, 2019
    files AK/SCC/UNK). Excluded: rows with more fields than the header,
    invalid ids, rows that are not exactly one-hot, ``UNK`` rows, and ids
    listed twice with different labels. Ids in ``Excluded`` are shortened
    (``shorten``). Duplicate rows are counted in ``csv_rows``.
    """
    rows_report = csv_rows if csv_rows is not None else CsvRows()
    frame = read_csv(root / release.ground_truth, ("image", *release.columns), rows_report)
    excluded = [
        Excluded(shorten(row["first_field"]), MALFORMED, release.name)
        for row in rows_report.malformed.get(release.ground_truth, [])
    ]
    ids = frame["image"].str.strip()
    onehot = frame[list(release.columns)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    binary = np.isin(onehot, (0.0, 1.0)).all(axis=1)
    exactly_one = binary & (np.nan_to_num(onehot).sum(axis=1) == 1)
    labels = np.array(release.columns)[np.nan_to_num(onehot).argmax(axis=1)]

    keep = np.ones(len(frame), dtype=bool)
    for i, image_id in enumerate(ids):
        if not IMAGE_ID.fullmatch(image_id):
            reason = "invalid image id (not a plain ISIC id)"
        elif not exactly_one[i]:
            reason = "label row is not exactly one-hot"
        elif labels[i] == "UNK":
            reason = "UNK label"
        else:
            continue
        keep[i] = False
        excluded.append(Excluded(shorten(image_id), reason, release.name))

    rows = pd.DataFrame({"image_id": ids[keep].to_numpy(), "label": labels[keep]})
    n_labels = rows.groupby("image_id")["label"].nunique()
    conflicting = set(n_labels.index[n_labels > 1])
    excluded += [
        Excluded(i, "conflicting labels within one release", release.name) for i in sorted(conflicting)
    ]
    rows = rows[~rows["image_id"].isin(conflicting)]
    repeated = rows["image_id"].duplicated()
    if repeated.any():
        rows_report.repeated_ids[release.ground_truth] = _counted(rows.loc[repeated, "image_id"])
    return rows[~repeated].reset_index(drop=True), excluded


def read_metadata(root: Path, csv_rows: CsvRows | None = None) -> pd.DataFrame:
    """Age, sex, site and lesion id per image, from whichever files are present.

    ISIC 2019 metadata comes first; HAM10000 metadata (or the 2018 lesion
    groupings) fills the gaps. Returns columns ``image_id, lesion_id, age,
    sex, site``, one row per image, with NaN for unknown values. Malformed
    and duplicate rows are recorded in ``csv_rows``.
    """
    parts = []
    path = root / METADATA_2019
    if path.is_file():
        meta = read_csv(path, ("image", "age_approx", "anatom_site_general", "lesion_id", "sex"), csv_rows)
        parts.append(
            pd.DataFrame(
                {
                    "image_id": meta["image"],
                    "lesion_id": meta["lesion_id"],
                    "age": meta["age_approx"],
                    "sex": meta["sex"],
                    "site": meta["anatom_site_general"],
                }
            )
        )
    path = root / HAM10000_METADATA
    if path.is_file():
        ham = read_csv(path, ("lesion_id", "image_id", "age", "sex", "localization"), csv_rows)
        parts.append(
            pd.DataFrame(
                {
                    "image_id": ham["image_id"],
                    "lesion_id": ham["lesion_id"],
                    "age": ham["age"],
                    "sex": ham["sex"],
                    "site": ham["localization"].map(HAM_SITE_TO_2019),
                }
            )
        )
    path = root / LESION_GROUPINGS_2018
    if path.is_file():
        groups = read_csv(path, ("image", "lesion_id"), csv_rows)
        parts.append(pd.DataFrame({"image_id": groups["image"], "lesion_id": groups["lesion_id"]}))
    columns = ["image_id", "lesion_id", "age", "sex", "site"]
    if not parts:
        return pd.DataFrame(columns=columns)
    meta = pd.concat(parts, ignore_index=True).reindex(columns=columns)
    meta = meta.replace({"": np.nan, "unknown": np.nan})
    meta["age"] = pd.to_numeric(meta["age"], errors="coerce")
    # First non-null value per image, in file order (2019 first).
    return meta.groupby("image_id", sort=False).first().reset_index()
