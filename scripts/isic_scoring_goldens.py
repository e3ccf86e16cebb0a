"""Write golden scores of the official ISIC challenge scorer for ``tests/test_metrics.py``.

The official scorer is the PyPI package ``isic-challenge-scoring``
(https://github.com/ImageMarkup/isic-challenge-scoring). Version 5.6.0 calls
``DataFrame.applymap``, which pandas 3 removed, so it cannot run in the
project's environment (pandas 3). It runs in a separate virtual environment
with pandas 2, and this script is the only thing that runs there; the tests
read the files it writes and need neither the scorer nor its environment.

Regenerate (from the repository root; needs the package registry)::

    python3 -m venv /tmp/isicvenv
    /tmp/isicvenv/bin/pip install "isic-challenge-scoring==5.6.0" "pandas<3"
    /tmp/isicvenv/bin/python scripts/isic_scoring_goldens.py

The committed goldens were made with isic-challenge-scoring 5.6.0, pandas
2.3.3, numpy 2.4.6, scikit-learn 1.9.1 (``goldens.json`` records the
versions it was made with). Everything is seeded, so a rerun with the same
versions rewrites identical files.

What it writes into ``tests/fixtures/isic_scoring/`` (or ``--out``):

* ``isic2019_truth.csv``, ``isic2019_predictions.csv``: a 2019-style
  8-class case (columns in the official 2019 order MEL, NV, BCC, AK, BKL,
  DF, VASC, SCC), imbalanced like ISIC 2019 (NV about half).
* ``isic2018_predictions_8class.csv``: 8-class probabilities of a second,
  HAM10000-like case; ``isic2018_predictions.csv`` the same folded into the
  ISIC 2018 Task 3 columns (MEL, NV, BCC, AKIEC, BKL, DF, VASC) with
  AKIEC = AK + SCC; ``isic2018_truth.csv`` its 7-class truth (AK and SCC
  images are AKIEC).
* ``goldens.json``: for each case, the scorer's balanced accuracy, its
  per-category metrics and their macro averages, and the versions used.

UNK: the official 2019 files have a ninth column, UNK. The scorer scores
exactly the columns of the truth file (a prediction file must have the same
columns), and it fails on any column without a positive truth row (5.6.0
with scikit-learn 1.9: ``ValueError: array of sample points is empty`` in
``auc_above_sensitivity``). A model of the 8 known classes has no UNK truth
rows to score, so the 2019 case is written without the UNK column, which the
scorer accepts as it is.

Other things the scorer does that the fixtures are built around:

* A row whose highest probability is tied counts as "undecided", always
  wrong, in its balanced accuracy; ``numpy.argmax`` would pick the first
  column. The generated rows have no tied maximum, so both agree.
* Its per-category sensitivity, specificity, PPV, NPV, dice and accuracy
  threshold each column at 0.5 on its own, not at the argmax; they are
  recorded but are not the argmax figures of ``dermascan.evaluation.metrics``. The
  per-category ``accuracy`` is Keras' binary accuracy of that column.
* Probabilities are multiples of 1/4096, so many scores tie within a
  column (the AUCs exercise tie handling), AK + SCC is exact in floating
  point, and the 12-decimal strings in the CSVs are exact: the scorer reads
  exactly the floats that ``dermascan.evaluation.metrics.to_isic2018`` computes from
  the 8-class file. The script checks that every CSV reads back (with
  pandas' default parser, as the scorer reads it) to the very same floats.
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
from isic_challenge_scoring.classification import (
    ClassificationMetric,
    ClassificationScore,
)

log = logging.getLogger("isic_scoring_goldens")

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "isic_scoring"

# Official column orders. The 2019 one drops UNK (see the module docstring).
COLUMNS_2019 = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
COLUMNS_2018 = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
FOLD_2019_TO_2018 = {"MEL": "MEL", "NV": "NV", "BCC": "BCC", "AK": "AKIEC", "SCC": "AKIEC",
                     "BKL": "BKL", "DF": "DF", "VASC": "VASC"}

# Images per true class, in COLUMNS_2019 order. Every class needs positives:
# the scorer fails on a column without any.
COUNTS_2019 = {"MEL": 60, "NV": 170, "BCC": 45, "AK": 12, "BKL": 35, "DF": 7, "VASC": 7, "SCC": 9}
COUNTS_2018 = {"MEL": 34, "NV": 200, "BCC": 16, "AK": 6, "BKL": 33, "DF": 5, "VASC": 6, "SCC": 5}

# How strongly the simulated model favours the true class (logit margin), per class.
SIGNAL = {"MEL": 1.6, "NV": 2.2, "BCC": 2.0, "AK": 1.3, "BKL": 1.5, "DF": 1.8, "VASC": 2.6, "SCC": 1.1}
# Probabilities are rounded to this dyadic grid; 12 decimals write its values exactly.
GRID = 4096
FLOAT_FORMAT = "%.12f"


def _simulate(counts: dict[str, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (labels [N] into COLUMNS_2019, probabilities [N, 8] on the 1/GRID grid, no tied row maximum)."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.full(n, COLUMNS_2019.index(c)) for c, n in counts.items()])
    labels = rng.permutation(labels)
    prior = np.log(np.array([counts[c] for c in COLUMNS_2019], dtype=float) / sum(counts.values()))
    logits = rng.normal(0.0, 1.0, size=(len(labels), len(COLUMNS_2019))) + 0.5 * prior
    logits[np.arange(len(labels)), labels] += np.array([SIGNAL[COLUMNS_2019[y]] for y in labels])
    # Melanoma and nevi are confused with each other, as in real dermoscopy.
    mel, nv = COLUMNS_2019.index("MEL"), COLUMNS_2019.index("NV")
    logits[labels == mel, nv] += 0.8
    logits[labels == nv, mel] += 0.6
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = np.round(probabilities / probabilities.sum(axis=1, keepdims=True) * GRID) / GRID
    while True:  # break tied row maxima (also after folding into 2018 columns) deterministically
        tied = _tied_rows(probabilities) | _tied_rows(fold_2018(probabilities))
        if not tied.any():
            return labels, probabilities
        rows = np.flatnonzero(tied)
        probabilities[rows, probabilities[rows].argmax(axis=1)] += 1.0 / GRID
        probabilities = np.clip(probabilities, 0.0, 1.0)


def _tied_rows(probabilities: np.ndarray) -> np.ndarray:
    return (probabilities == probabilities.max(axis=1, keepdims=True)).sum(axis=1) > 1


def fold_2018(probabilities: np.ndarray) -> np.ndarray:
    """[N, 8] in COLUMNS_2019 order -> [N, 7] in COLUMNS_2018 order, AKIEC = AK + SCC."""
    out = np.zeros((len(probabilities), len(COLUMNS_2018)))
    for i, code in enumerate(COLUMNS_2019):
        out[:, COLUMNS_2018.index(FOLD_2019_TO_2018[code])] += probabilities[:, i]
    return out


def _frame(ids: list[str], values: np.ndarray, columns: tuple[str, ...]) -> pd.DataFrame:
    frame = pd.DataFrame(values, columns=list(columns))
    frame.insert(0, "image", ids)
    return frame


def _write_exact(frame: pd.DataFrame, path: Path, float_format: str = FLOAT_FORMAT) -> None:
    """Write a CSV and check that it reads back (as the scorer reads it) to the very same floats."""
    frame.to_csv(path, index=False, float_format=float_format)
    back = pd.read_csv(path)
    values, read = frame.drop(columns="image").to_numpy(), back.drop(columns="image").to_numpy()
    if not np.array_equal(values, read):
        raise RuntimeError(f"{path} does not round-trip exactly")
    log.info("wrote %s (%d rows)", path, len(frame))


def _score(truth: Path, predictions: Path) -> dict:
    """The official scorer's result for one case, with per-category metrics keyed by category."""
    score = ClassificationScore.from_file(truth, predictions, ClassificationMetric.BALANCED_ACCURACY)
    result = score.to_dict(rocs=False)
    per_metric = result["per_category"]  # {metric: {category: value}}
    categories = list(score.per_category.index)
    return {
        "balanced_accuracy": float(result["aggregate"]["balanced_accuracy"]),
        "per_category": {c: {m: float(v[c]) for m, v in per_metric.items()} for c in categories},
        "macro_average": {m: float(v) for m, v in result["macro_average"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    goldens: dict = {
        "scorer": {
            "package": "isic-challenge-scoring",
            "version": version("isic-challenge-scoring"),
            "call": "ClassificationScore.from_file(truth, predictions, ClassificationMetric.BALANCED_ACCURACY)",
            "pandas": version("pandas"),
            "numpy": version("numpy"),
            "scikit-learn": version("scikit-learn"),
        },
        "notes": [
            (
                "per_category sensitivity/specificity/ppv/npv/dice/accuracy threshold each column at 0.5, "
                "not at the argmax; per_category accuracy is Keras' binary accuracy of that column"
            ),
            "the 2019 case has no UNK column: the scorer fails on a truth column without positives",
        ],
        "cases": {},
    }

    # 2019-style 8-class case.
    labels, probabilities = _simulate(COUNTS_2019, seed=2019)
    ids = [f"ISIC_{9_000_000 + i:07d}" for i in range(len(labels))]
    _write_exact(_frame(ids, np.eye(len(COLUMNS_2019))[labels], COLUMNS_2019), out / "isic2019_truth.csv", "%.1f")
    _write_exact(_frame(ids, probabilities, COLUMNS_2019), out / "isic2019_predictions.csv")
    goldens["cases"]["isic2019"] = {
        "truth": "isic2019_truth.csv",
        "predictions": "isic2019_predictions.csv",
        "columns": list(COLUMNS_2019),
        "n": len(labels),
        **_score(out / "isic2019_truth.csv", out / "isic2019_predictions.csv"),
    }

    # 2018 7-class case, from 8-class probabilities folded as AKIEC = AK + SCC.
    labels, probabilities = _simulate(COUNTS_2018, seed=2018)
    ids = [f"ISIC_{9_100_000 + i:07d}" for i in range(len(labels))]
    labels_2018 = np.array([COLUMNS_2018.index(FOLD_2019_TO_2018[COLUMNS_2019[y]]) for y in labels])
    _write_exact(_frame(ids, probabilities, COLUMNS_2019), out / "isic2018_predictions_8class.csv")
    _write_exact(_frame(ids, np.eye(len(COLUMNS_2018))[labels_2018], COLUMNS_2018), out / "isic2018_truth.csv",
                 "%.1f")
    _write_exact(_frame(ids, fold_2018(probabilities), COLUMNS_2018), out / "isic2018_predictions.csv")
    goldens["cases"]["isic2018"] = {
        "truth": "isic2018_truth.csv",
        "predictions": "isic2018_predictions.csv",
        "predictions_8class": "isic2018_predictions_8class.csv",
        "columns": list(COLUMNS_2018),
        "n": len(labels),
        **_score(out / "isic2018_truth.csv", out / "isic2018_predictions.csv"),
    }

    path = out / "goldens.json"
    path.write_text(json.dumps(goldens, indent=2, allow_nan=False) + "\n")
    for name, case in goldens["cases"].items():
        log.info("%s: balanced accuracy %.6f, mean AUC %.6f", name, case["balanced_accuracy"],
                 case["macro_average"]["auc"])
    log.info("wrote %s", path)


if __name__ == "__main__":
    main()
