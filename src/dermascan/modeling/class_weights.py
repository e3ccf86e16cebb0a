"""Class weights for the loss: scikit-learn's "balanced" weights on the train split.

``balanced`` gives class c the weight n_samples / (n_classes * n_c), so each
class contributes equally to the loss; ``none`` gives every class 1.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np
from sklearn.utils.class_weight import compute_class_weight

from dermascan.classes import CODES, INDEX
from dermascan.config import ClassWeight
from dermascan.errors import ConfigError, DataError

log = logging.getLogger("dermascan.modeling.class_weights")
MODES = tuple(ClassWeight)


def class_weights(labels: Sequence[str], mode: str = "balanced") -> dict[str, float]:
    """Weight per class code, in ``CODES`` order, computed on ``labels`` (the train split)."""
    if mode not in MODES:
        raise ConfigError(f"train.class_weight must be one of {', '.join(MODES)}, got {mode!r}")
    labels = np.asarray(list(labels))
    if labels.size == 0:
        raise DataError("cannot compute class weights: the train split is empty")
    if mode == "none":
        return {code: 1.0 for code in CODES}
    present = [code for code in CODES if code in set(labels)]
    absent = [code for code in CODES if code not in present]
    if absent:
        log.warning("classes absent from the train split get weight 1.0: %s", ", ".join(absent))
    weights = compute_class_weight("balanced", classes=np.array(present), y=labels)
    out = {code: 1.0 for code in CODES}
    out.update({code: float(w) for code, w in zip(present, weights)})
    return out


def keras_class_weight(weights: dict[str, float]) -> dict[int, float]:
    """The ``class_weight`` argument of ``Model.fit``: class index -> weight."""
    return {INDEX[code]: weight for code, weight in weights.items()}


def _counts(labels: Sequence[str]) -> dict[str, int]:
    counts = Counter(labels)
    return {code: int(counts[code]) for code in CODES}


def format_table(weights: dict[str, float], labels: Sequence[str]) -> str:
    counts = _counts(labels)
    lines = [f"{'class':<6}{'train images':>14}{'weight':>10}"]
    lines += [f"{code:<6}{counts[code]:>14}{weights[code]:>10.3f}" for code in CODES]
    return "\n".join(lines)


def save(weights: dict[str, float], labels: Sequence[str], path: Path, mode: str) -> Path:
    path.write_text(json.dumps({"mode": mode, "weights": weights, "train_counts": _counts(labels)}, indent=2))
    return path
