"""Evaluation of a trained model on one split: predictions, metrics, report.

``predictions.csv`` holds one row per image: ``image`` and one probability
column per class (the ISIC submission layout), then the true label.
``metrics.json`` holds every metric of ``dermascan.metrics``, named exactly.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from dermascan.augment import AugmentParams
from dermascan.classes import CODES, INDEX
from dermascan.inputs import PipelineSpec, make_inputs
from dermascan.metrics import classification_metrics

log = logging.getLogger(__name__)


def predict(model: keras.Model, frame: pd.DataFrame, image_size: int, batch_size: int, cache: dict[str, Any]) -> np.ndarray:
    """Softmax probabilities [N, 8] for the manifest rows of ``frame``, in order."""
    spec = PipelineSpec(image_size=image_size, batch_size=batch_size)
    data = make_inputs(frame, spec, AugmentParams(), training=False, cache=cache)
    return model.predict(data.map(lambda images, labels: images), verbose=0)


def evaluate_split(
    model: keras.Model,
    manifest: pd.DataFrame,
    split: str,
    image_size: int,
    batch_size: int,
    cache: dict[str, Any],
    out_dir: Path,
) -> dict[str, Any]:
    """Predict ``split`` (rows with an 8-class label), write predictions.csv and metrics.json."""
    frame = manifest[(manifest["split"] == split) & manifest["label"].notna()].reset_index(drop=True)
    probabilities = predict(model, frame, image_size, batch_size, cache)
    truth = frame["label"].map(INDEX).to_numpy()
    metrics = classification_metrics(truth, probabilities)
    metrics["split"] = split
    predictions = pd.DataFrame(probabilities, columns=list(CODES))
    predictions.insert(0, "image", frame["image_id"])
    predictions["label"] = frame["label"]
    out_dir.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(out_dir / "predictions.csv", index=False, float_format="%.6f")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    log.info(
        "%s split, %d images: balanced accuracy %.3f, top-1 accuracy %.3f, mean AUC %s",
        split, metrics["n"], metrics["balanced_accuracy"], metrics["top1_accuracy"],
        "n/a" if metrics["mean_auc"] is None else f"{metrics['mean_auc']:.3f}",
    )
    return metrics
