"""Classification metrics on numpy arrays (no TensorFlow).

Every metric is named for exactly what it is. ``balanced_accuracy`` (the
mean per-class recall of the argmax prediction) is the official ISIC
metric; ``top1_accuracy`` is the plain fraction of argmax predictions that
are right. Neither is Keras' ``binary_accuracy``, the one-vs-rest per-cell
accuracy that Keras calls "accuracy" under a binary cross-entropy loss;
:func:`binary_accuracy` computes that figure only so that a report can show
it beside the real ones.

A per-class AUC is undefined when the class has no positive (or no
negative) example; it is reported as None, never as 0.5, and left out of
the macro mean. The same holds for every other ratio whose denominator is
zero (sensitivity, specificity, PPV, NPV, F1, sensitivity at a fixed
specificity): None, and left out of any mean.

Probabilities are ``[N, K]`` arrays whose columns follow ``classes``
(``dermascan.classes.CODES`` by default); ``y_true`` holds class indices
into the same order.

The module also holds:

* :func:`bootstrap_ci`: seeded percentile bootstrap intervals for
  ``balanced_accuracy`` and ``mean_auc``, vectorised over resamples (not
  stratified: images are drawn from the whole set, so class counts vary),
  in the shape of :func:`bootstrap_interval`.
* :func:`expected_calibration_error` and :func:`reliability_bins`: top-label
  calibration with equal-width confidence bins.
* :func:`to_isic2018`: 8-class probabilities folded into the ISIC 2018
  Task 3 columns (AKIEC = AK + SCC), so that a model can be scored against
  2018 ground truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from dermascan.classes import (
    AMBIGUOUS_2018,
    CODES,
    ISIC2018_COLUMNS,
    LABEL_MAP_2018_TO_2019,
)

#: Specificities at which ``sensitivity_at_specificity`` is reported by default.
DEFAULT_SPECIFICITIES: tuple[float, ...] = (0.80, 0.90, 0.95)

#: ISIC 2018 Task 3 column order (the official ground-truth columns).
CODES_2018: tuple[str, ...] = ISIC2018_COLUMNS

#: Each 8-class code -> the index of its ISIC 2018 column in ``CODES_2018``.
#: AK and SCC both map to AKIEC, which is why the map only runs this way.
LABEL_2018_INDEX: dict[str, int] = {
    **{code_2019: CODES_2018.index(code_2018) for code_2018, code_2019 in LABEL_MAP_2018_TO_2019.items()},
    **{code_2019: CODES_2018.index(code_2018) for code_2018, parts in AMBIGUOUS_2018.items() for code_2019 in parts},
}

# Floating-point slack when comparing a specificity with its target.
_SPEC_TOL = 1e-12
# Resamples processed at once by ``bootstrap_ci`` (bounds memory: chunk x N floats).
_BOOTSTRAP_CHUNK = 100


def _ratio(num: float, den: float) -> float | None:
    """``num / den`` as a float, or None when ``den`` is zero (the ratio is undefined)."""
    return float(num / den) if den else None


def _auc(truth: np.ndarray, scores: np.ndarray) -> float | None:
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, scores))


def specificity_key(specificity: float) -> str:
    """Dictionary key of a target specificity: 0.8 -> "0.80", 0.95 -> "0.95", 0.975 -> "0.975"."""
    if abs(specificity * 100 - round(specificity * 100)) < 1e-9:
        return f"{specificity:.2f}"
    return f"{specificity:g}"


def sensitivity_at_specificity(
    truth: np.ndarray, scores: np.ndarray, specificities: Sequence[float] = DEFAULT_SPECIFICITIES
) -> dict[str, float | None]:
    """Highest sensitivity reachable by thresholding ``scores`` with specificity >= each target.

    ``truth`` is a boolean one-vs-rest vector and ``scores`` that class's
    probability. Every distinct score is a candidate threshold (``score >= t``
    is called positive), plus "nothing positive" (sensitivity 0, specificity
    1), so the answer is defined whenever both a positive and a negative
    example exist, and None otherwise. The ROC curve is taken with
    ``drop_intermediate=False``: sklearn's default drops collinear points,
    which can be the best operating point under a specificity floor.
    """
    truth = np.asarray(truth, dtype=bool)
    keys = [specificity_key(s) for s in specificities]
    if truth.all() or not truth.any():
        return dict.fromkeys(keys)
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    specificity = 1.0 - fpr
    out: dict[str, float | None] = {}
    for key, target in zip(keys, specificities):
        ok = specificity >= target - _SPEC_TOL
        out[key] = float(tpr[ok].max())  # ok[0] is the (0, 0) point, always allowed
    return out


def _check(y_true: Any, probabilities: Any, n_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(y_true int [N], probabilities float [N, K])``; ValueError on a mismatch."""
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D [N, K] array, got shape {probabilities.shape}")
    if y_true.ndim != 1 or len(y_true) != len(probabilities):
        raise ValueError(
            f"y_true must be a 1-D array of {len(probabilities)} class indices, got shape {y_true.shape}"
        )
    if n_classes is not None and probabilities.shape[1] != n_classes:
        raise ValueError(f"probabilities have {probabilities.shape[1]} columns but there are {n_classes} classes")
    if len(y_true) and not np.issubdtype(y_true.dtype, np.integer) and not np.all(np.mod(y_true, 1) == 0):
        raise ValueError("y_true must hold integer class indices")
    y_true = y_true.astype(int)
    k = probabilities.shape[1]
    if len(y_true) and (y_true.min() < 0 or y_true.max() >= k):
        raise ValueError(f"y_true holds class indices outside [0, {k - 1}]")
    return y_true, probabilities


def classification_metrics(
    y_true: Sequence[int],
    probabilities: np.ndarray,
    classes: Sequence[str] = CODES,
    specificities: Sequence[float] = DEFAULT_SPECIFICITIES,
) -> dict[str, Any]:
    """Per-class and overall metrics of softmax ``probabilities`` [N, K] against ``y_true`` indices.

    Returns a JSON-ready dict::

        {
          "n": int,
          "balanced_accuracy": float | None,  # mean recall over classes present in y_true
          "top1_accuracy": float | None,
          "mean_auc": float | None,           # mean over classes whose AUC is defined
          "mean_sensitivity": float | None,
          "mean_specificity": float | None,
          "per_class": {code: {
              "support": int, "auc", "sensitivity", "specificity", "ppv", "npv", "f1": float | None,
              "sensitivity_at_specificity": {"0.80": float | None, "0.90": ..., "0.95": ...},
          }},
          "confusion_matrix": [[int]],        # rows: truth, columns: argmax prediction
          "classes": [code],
          "specificities": [float],
        }

    Sensitivity, specificity, PPV, NPV and F1 are one-vs-rest figures of the
    argmax prediction. ``sensitivity_at_specificity`` instead thresholds the
    class's own probability (see :func:`sensitivity_at_specificity`); for MEL
    it is the screening figure. Undefined values (a zero denominator) are None.
    """
    k = len(classes)
    y_true, probabilities = _check(y_true, probabilities, k)
    matrix = confusion_matrix(y_true, probabilities.argmax(axis=1), labels=list(range(k)))
    support, tp = matrix.sum(axis=1), np.diag(matrix)
    per_class = _per_class(matrix, y_true, probabilities, classes, specificities)

    def mean(key: str) -> float | None:
        values = [v[key] for v in per_class.values() if v[key] is not None]
        return float(np.mean(values)) if values else None

    present = support > 0
    return {
        "n": len(y_true),
        "balanced_accuracy": float(np.mean(tp[present] / support[present])) if present.any() else None,
        "top1_accuracy": float(tp.sum() / len(y_true)) if len(y_true) else None,
        "mean_auc": mean("auc"),
        "mean_sensitivity": mean("sensitivity"),
        "mean_specificity": mean("specificity"),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
        "specificities": [float(s) for s in specificities],
    }


def _per_class(
    matrix: np.ndarray, y_true: np.ndarray, probabilities: np.ndarray, classes: Sequence[str],
    specificities: Sequence[float],
) -> dict[str, dict[str, Any]]:
    """One-vs-rest figures of each class from the confusion matrix, and its threshold-free ones."""
    support, predicted, tp = matrix.sum(axis=1), matrix.sum(axis=0), np.diag(matrix)
    fn, fp = support - tp, predicted - tp
    tn = matrix.sum() - tp - fn - fp
    return {
        code: {
            "support": int(support[i]),
            "auc": _auc(y_true == i, probabilities[:, i]),
            "sensitivity": _ratio(tp[i], support[i]),
            "specificity": _ratio(tn[i], tn[i] + fp[i]),
            "ppv": _ratio(tp[i], tp[i] + fp[i]),
            "npv": _ratio(tn[i], tn[i] + fn[i]),
            "f1": _ratio(2 * tp[i], 2 * tp[i] + fp[i] + fn[i]),
            "sensitivity_at_specificity": sensitivity_at_specificity(y_true == i, probabilities[:, i], specificities),
        }
        for i, code in enumerate(classes)
    }


def binary_accuracy(y_true: Sequence[int], probabilities: np.ndarray, threshold: float = 0.5) -> float | None:
    """Keras' ``binary_accuracy`` on one-hot labels: NOT top-1 accuracy, and not an ISIC metric.

    Every cell of the ``[N, K]`` probability matrix is thresholded on its own
    (``p > threshold``, as Keras does) and compared with the one-hot truth;
    the result is the fraction of the N x K cells that agree. With K = 8
    classes a model that predicts "no" for every cell already scores 7/8 =
    0.875, so this figure is high whatever the model does. It is what Keras
    reports as "accuracy" when a softmax model is compiled with a binary
    cross-entropy loss and ``metrics=["accuracy"]``, and the reason a
    reference's "accuracy 0.914" is not comparable with ``top1_accuracy`` or
    ``balanced_accuracy``. It is provided only to show that side by side.
    None for an empty input.
    """
    y_true, probabilities = _check(y_true, probabilities)
    if not len(y_true):
        return None
    one_hot = np.zeros_like(probabilities, dtype=bool)
    one_hot[np.arange(len(y_true)), y_true] = True
    return float(np.mean((probabilities > threshold) == one_hot))


def to_isic2018(probabilities: np.ndarray, classes: Sequence[str] = CODES) -> np.ndarray:
    """Fold 8-class probabilities [N, 8] into ISIC 2018 Task 3 columns [N, 7] (order ``CODES_2018``).

    Each 2018 column is the sum of the 8-class columns that map to it
    (``LABEL_2018_INDEX``): AKIEC = AK + SCC, the others are copied.
    ``classes`` names the input columns (``dermascan.classes.CODES`` by default).
    """
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2 or probabilities.shape[1] != len(classes):
        raise ValueError(f"expected probabilities of shape [N, {len(classes)}], got {probabilities.shape}")
    if set(classes) != set(LABEL_2018_INDEX):
        raise ValueError(f"classes must be the 8 codes {sorted(LABEL_2018_INDEX)}, got {list(classes)}")
    out = np.zeros((len(probabilities), len(CODES_2018)))
    for i, code in enumerate(classes):
        out[:, LABEL_2018_INDEX[code]] += probabilities[:, i]
    return out


def to_isic2018_labels(y_true: Sequence[int], classes: Sequence[str] = CODES) -> np.ndarray:
    """8-class label indices -> ISIC 2018 label indices (into ``CODES_2018``); AK and SCC become AKIEC."""
    lookup = np.array([LABEL_2018_INDEX[code] for code in classes])
    return lookup[np.asarray(y_true, dtype=int)]


# ---------------------------------------------------------------------------
# Bootstrap
# ---------------------------------------------------------------------------


def _resample_metrics(
    y_true: np.ndarray, probabilities: np.ndarray, counts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-resample class recalls and AUCs, from multiplicities instead of copied rows.

    ``counts`` is a ``[B, N]`` matrix: how many times each row is drawn in
    each of B resamples. Returns ``(recall, recall_defined, auc, auc_defined)``,
    each ``[B, K]``. AUC is the Mann-Whitney statistic with ties counted as
    one half, which is exactly what ``roc_auc_score`` gives on the resampled
    rows.
    """
    n, k = probabilities.shape
    counts = np.asarray(counts, dtype=float)
    one_hot = np.zeros((n, k))
    one_hot[np.arange(n), y_true] = 1.0
    correct = (probabilities.argmax(axis=1) == y_true)[:, None] * one_hot

    positives = counts @ one_hot  # [B, K] positives per class
    hits = counts @ correct
    total = counts.sum(axis=1, keepdims=True)
    negatives = total - positives
    recall_defined = positives > 0
    recall = np.divide(hits, positives, out=np.zeros_like(hits), where=recall_defined)

    auc = np.zeros_like(positives)
    counts_int = counts.astype(np.int64)
    for c in range(k):
        # Twice the Mann-Whitney count of each resample, in exact integers: every positive row i
        # beats the drawn negatives scored below it and ties with those scored equal, i.e.
        # below_i + equal_i / 2 = (cum[lo_i] + cum[hi_i]) / 2, with cum the running count of
        # negatives in score order and lo_i / hi_i the left / right insertion points of s_i.
        is_pos = y_true == c
        neg_order = np.flatnonzero(~is_pos)[np.argsort(probabilities[~is_pos, c], kind="stable")]
        neg_scores = probabilities[neg_order, c]
        pos_rows = np.flatnonzero(is_pos)
        pos_scores = probabilities[pos_rows, c]
        lo = np.searchsorted(neg_scores, pos_scores, side="left")
        hi = np.searchsorted(neg_scores, pos_scores, side="right")
        cum = np.zeros((len(counts), len(neg_order) + 1), dtype=np.int64)
        np.cumsum(counts_int[:, neg_order], axis=1, out=cum[:, 1:])
        twice_wins = np.einsum("bp,bp->b", counts_int[:, pos_rows], cum[:, lo] + cum[:, hi])
        pairs = positives[:, c] * negatives[:, c]
        auc[:, c] = np.divide(twice_wins / 2, pairs, out=np.zeros(len(pairs)), where=pairs > 0)
    auc_defined = (positives > 0) & (negatives > 0)
    return recall, recall_defined, auc, auc_defined


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float | None, float | None]:
    """The (low, high) percentile bounds of bootstrap ``values`` at ``level``; (None, None) when there are none."""
    values = np.asarray(values, dtype=float)
    if not len(values):
        return None, None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_interval(values: np.ndarray, estimate: float | None, level: float, n_resamples: int) -> dict[str, Any]:
    """A percentile bootstrap interval of ``values`` (the metric on each usable resample), in metrics.json's CI shape.

    ``{"estimate", "low", "high", "level", "n_resamples", "n_used"}``: ``n_used``
    counts the resamples on which the metric was defined; ``low``/``high``
    are None when there is none (or no resampling at all).
    """
    low, high = percentile_interval(values, level)
    return {
        "estimate": estimate,
        "low": low,
        "high": high,
        "level": level,
        "n_resamples": n_resamples,
        "n_used": len(values),
    }


def bootstrap_ci(
    y_true: Sequence[int],
    probabilities: np.ndarray,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Percentile bootstrap confidence intervals of ``balanced_accuracy`` and ``mean_auc``.

    Rows are resampled with replacement (``numpy.random.default_rng(seed)``),
    so the same inputs and seed give the same interval. Returns::

        {"balanced_accuracy": {"estimate": float | None, "low": float | None, "high": float | None,
                               "level": 0.95, "n_resamples": 1000, "n_used": int},
         "mean_auc": {...same keys...}}

    ``estimate`` equals the value of :func:`classification_metrics`. A
    resample counts towards a metric (``n_used``) only if that metric is
    defined on it over the same classes as the estimate: every class present
    in ``y_true`` must be drawn at least once for ``balanced_accuracy``, and
    every class with a defined AUC must keep a positive and a negative for
    ``mean_auc``. Other resamples are skipped, so that each interval is about
    one fixed macro mean. ``low``/``high`` are None when no resample is used.

    Cost: about 2 s for 1,000 resamples of 5,000 rows x 8 classes on 2 cores.
    """
    y_true, probabilities = _check(y_true, probabilities)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be positive, got {n_resamples}")
    n = len(y_true)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one row")

    recall, recall_defined, auc, auc_defined = _resample_metrics(y_true, probabilities, np.ones((1, n)))
    present, has_auc = recall_defined[0], auc_defined[0]
    ba_estimate = float(recall[0, present].mean())
    auc_estimate = float(auc[0, has_auc].mean()) if has_auc.any() else None

    rng = np.random.default_rng(seed)
    ba_values, auc_values = [], []
    for start in range(0, n_resamples, _BOOTSTRAP_CHUNK):
        size = min(_BOOTSTRAP_CHUNK, n_resamples - start)
        draws = rng.integers(0, n, size=(size, n))
        counts = np.bincount((draws + n * np.arange(size)[:, None]).ravel(), minlength=size * n).reshape(size, n)
        recall, recall_defined, auc, auc_defined = _resample_metrics(y_true, probabilities, counts)
        ok = recall_defined[:, present].all(axis=1)
        ba_values.append(recall[ok][:, present].mean(axis=1))
        if auc_estimate is not None:
            ok = auc_defined[:, has_auc].all(axis=1)
            auc_values.append(auc[ok][:, has_auc].mean(axis=1))

    return {
        "balanced_accuracy": bootstrap_interval(np.concatenate(ba_values), ba_estimate, level, n_resamples),
        "mean_auc": bootstrap_interval(
            np.concatenate(auc_values) if auc_values else np.array([]), auc_estimate, level, n_resamples
        ),
    }


# ---------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------


def reliability_bins(y_true: Sequence[int], probabilities: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Top-label reliability diagram data, with ``n_bins`` equal-width confidence bins on [0, 1].

    The confidence of a row is its highest probability, and it is right when
    that class is the true one. Bin b holds confidences in ``(lower, upper]``
    (the first bin also holds 0). Returns parallel lists, one entry per bin::

        {"n_bins": int, "lower": [float], "upper": [float], "count": [int],
         "mean_confidence": [float | None], "accuracy": [float | None]}

    ``mean_confidence`` and ``accuracy`` are None for an empty bin.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    y_true, probabilities = _check(y_true, probabilities)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y_true).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    conf_sum = np.bincount(which, weights=confidence, minlength=n_bins)
    hit_sum = np.bincount(which, weights=correct, minlength=n_bins)
    return {
        "n_bins": int(n_bins),
        "lower": edges[:-1].tolist(),
        "upper": edges[1:].tolist(),
        "count": count.tolist(),
        "mean_confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
        "accuracy": [float(s / c) if c else None for s, c in zip(hit_sum, count)],
    }


def expected_calibration_error(y_true: Sequence[int], probabilities: np.ndarray, n_bins: int = 15) -> float:
    """Top-label expected calibration error: sum over bins of (count / N) x |accuracy - mean confidence|.

    Uses the equal-width bins of :func:`reliability_bins`. 0 is perfectly
    calibrated; ValueError on an empty input.
    """
    bins = reliability_bins(y_true, probabilities, n_bins)
    total = sum(bins["count"])
    if not total:
        raise ValueError("expected_calibration_error needs at least one row")
    return float(
        sum(
            c / total * abs(a - m)
            for c, a, m in zip(bins["count"], bins["accuracy"], bins["mean_confidence"])
            if c
        )
    )
