"""Classification metrics on numpy arrays (no TensorFlow).

Every metric is named for exactly what it is. ``balanced_accuracy`` (the
mean per-class recall of the argmax prediction) is the official ISIC
metric; ``top1_accuracy`` is the plain fraction of argmax predictions that
are right. Neither is Keras' ``binary_accuracy``, the one-vs-rest per-cell
accuracy that Keras calls "accuracy" under a binary cross-entropy loss.

A per-class AUC is undefined when the class has no positive (or no
negative) example; it is reported as None, never as 0.5, and left out of
the macro mean.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score

from dermascan.classes import CODES


def _auc(truth: np.ndarray, scores: np.ndarray) -> Optional[float]:
    if truth.all() or not truth.any():
        return None
    return float(roc_auc_score(truth, scores))


def classification_metrics(
    y_true: Sequence[int], probabilities: np.ndarray, classes: Sequence[str] = CODES
) -> dict[str, Any]:
    """Per-class and overall metrics of softmax ``probabilities`` [N, K] against ``y_true`` indices."""
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    k = len(classes)
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, labels=list(range(k)))
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    tp = np.diag(matrix)
    fn = support - tp
    fp = predicted - tp
    tn = matrix.sum() - tp - fn - fp

    per_class = {}
    for i, code in enumerate(classes):
        per_class[code] = {
            "support": int(support[i]),
            "auc": _auc(y_true == i, probabilities[:, i]),
            "sensitivity": float(tp[i] / support[i]) if support[i] else None,
            "specificity": float(tn[i] / (tn[i] + fp[i])) if tn[i] + fp[i] else None,
        }

    def mean(key: str) -> Optional[float]:
        values = [v[key] for v in per_class.values() if v[key] is not None]
        return float(np.mean(values)) if values else None

    present = support > 0
    return {
        "n": int(len(y_true)),
        "balanced_accuracy": float(np.mean(tp[present] / support[present])) if present.any() else None,
        "top1_accuracy": float(tp.sum() / len(y_true)) if len(y_true) else None,
        "mean_auc": mean("auc"),
        "mean_sensitivity": mean("sensitivity"),
        "mean_specificity": mean("specificity"),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "classes": list(classes),
    }
