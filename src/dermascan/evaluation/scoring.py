"""The files the official ISIC scorer reads: a submission and its ground truth, each in the official layout.

``isic-challenge-scoring classification TRUTH.csv SUBMISSION.csv`` refuses a
submission with any column besides ``image`` and the truth file's category
columns (``ScoreError: Extra columns in CSV``), and it needs the same images
in both files. So evaluation writes two files per scheme:

* ``predictions.csv``: ``image``, then one probability column per class,
  nothing else (the ISIC submission layout);
* ``ground_truth.csv``: ``image``, then the same class columns, one-hot 0.0/1.0
  (the layout of the official ground-truth CSVs), for the images with a label.

Column order is the model's (``CODES``); the scorer matches columns by name.
The 2018 pair (``predictions_isic2018.csv``, ``ground_truth_isic2018.csv``)
uses the ISIC 2018 Task 3 columns. Under ``data.split=official`` the ISIC 2018
Test AKIEC images have no 8-class label: they are in ``predictions.csv`` but
not in ``ground_truth.csv`` (they are scored in the 2018 pair instead), so the
8-class pair is scorable as it is only without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from dermascan.errors import DataError


def submission(image_ids: Sequence[str], probabilities: np.ndarray, columns: Sequence[str]) -> pd.DataFrame:
    """``image`` + one probability column per class, exactly."""
    table = pd.DataFrame(np.asarray(probabilities, dtype=float), columns=list(columns))
    table.insert(0, "image", list(image_ids))
    return table


def ground_truth(image_ids: Sequence[str], labels: Sequence[object], columns: Sequence[str]) -> pd.DataFrame:
    """``image`` + one-hot 0.0/1.0 class columns for the rows whose label is one of ``columns``; unlabelled rows left out."""
    frame = pd.DataFrame({"image": list(image_ids), "label": list(labels)})
    frame = frame[frame["label"].notna()].reset_index(drop=True)
    unknown = sorted(set(frame["label"]) - set(columns))
    if unknown:
        raise DataError(f"labels {unknown} are not among the columns {list(columns)}")
    one_hot = pd.DataFrame(
        (frame["label"].to_numpy()[:, None] == np.asarray(columns)[None, :]).astype(float), columns=list(columns)
    )
    return pd.concat([frame[["image"]], one_hot], axis=1)


def write(table: pd.DataFrame, path: Path, float_format: str | None = "%.6f") -> Path:
    """``table`` as CSV, no index; probabilities with 6 decimals, one-hot truth as ``0.0``/``1.0`` (``float_format=None``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path, index=False, float_format=float_format)
    return path


def labels(truth: pd.DataFrame, columns: Sequence[str]) -> pd.Series:
    """The class code of each image of a ground-truth table (``image`` + one-hot ``columns``), indexed by image.

    DataError when the header is not ``image`` + ``columns`` or a row is not one-hot.
    """
    expected = ["image", *columns]
    if list(truth.columns) != expected:
        raise DataError(f"a ground-truth file must have the columns {expected}, got {list(truth.columns)}")
    values = truth[list(columns)].to_numpy(dtype=float)
    if len(values) and not (np.isin(values, (0.0, 1.0)).all() and (values.sum(axis=1) == 1).all()):
        raise DataError("a ground-truth file must hold exactly one 1.0 per row")
    return pd.Series(np.asarray(columns)[values.argmax(axis=1)] if len(values) else [], index=truth["image"],
                     name="label", dtype="object")
