"""The out-of-scope gate, fitted and measured: what ``evaluate`` runs after scoring the classifier.

The gate itself (its score, fit and Keras layer) is ``dermascan.modeling.ood``;
the offline out-of-scope sets and the AUROC / FPR figures are
``dermascan.evaluation.ood``. This module joins them to a run's manifest:
pooled features of the train sample (projection), of val (threshold) and of
the evaluated split and its corruptions (the figures), through evaluation's
own image pipeline.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import keras
import numpy as np
import pandas as pd

from dermascan.artifacts import (
    OUT_OF_SCOPE,
    OUT_OF_SCOPE_PLOT,
    OUT_OF_SCOPE_SCORES,
    PLOTS,
)
from dermascan.classes import INDEX
from dermascan.data.manifest import evaluation_rows
from dermascan.evaluation import ood, plots
from dermascan.modeling.inputs import evaluation_images
from dermascan.modeling.ood import FEATURES_LAYER, Gate, fit_gate
from dermascan.rundir import sample_rows

log = logging.getLogger("dermascan.evaluation.out_of_scope")


def features_model(model: keras.Model) -> keras.Model:
    """The model up to its pooled features (``gap``): what the gate scores. Inference mode, so no augmentation."""
    return keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output, name="pooled_features")


def has_features(model: keras.Model) -> bool:
    return any(layer.name == FEATURES_LAYER for layer in model.layers)


def pooled_features(extractor: keras.Model, frame: pd.DataFrame, image_size: int, batch_size: int,
                    cache: dict[str, Any]) -> np.ndarray:
    """Pooled features [N, d] of manifest rows, through evaluation's own image pipeline."""
    return np.asarray(extractor.predict(evaluation_images(frame, image_size, batch_size, cache), verbose=0))


def split_and_corrupted_features(extractor: keras.Model, frame: pd.DataFrame, image_size: int, batch_size: int,
                                 cache: dict[str, Any]) -> dict[str, np.ndarray]:
    """Pooled features of the rows' images and of each corruption of them (``ood.CORRUPTIONS``), in one pass.

    Batch by batch, so memory stays one batch's worth whatever the split's size.
    """
    found: dict[str, list[np.ndarray]] = {"split": [], **{name: [] for name in ood.CORRUPTIONS}}
    for batch in evaluation_images(frame, image_size, batch_size, cache):
        images = batch.numpy().astype(np.uint8)
        found["split"].append(np.asarray(extractor.predict_on_batch(images.astype(np.float32))))
        for name, corrupted in ood.corrupt(images, cache["method"]).items():
            found[name].append(np.asarray(extractor.predict_on_batch(corrupted.astype(np.float32))))
    return {name: np.concatenate(parts) for name, parts in found.items()}


def out_of_scope_skip_reason(model: keras.Model, settings: Any, train_rows: Optional[pd.DataFrame],
                             val_rows: pd.DataFrame) -> Optional[str]:
    """Why the gate cannot be fitted here (None: it can). ``train_rows`` None: the gate is given, not fitted."""
    if not settings.enabled:
        return "evaluate.out_of_scope.enabled is false"
    if not has_features(model):
        return f"the model has no {FEATURES_LAYER!r} layer (pooled features) to fit the gate on"
    if train_rows is not None and len(train_rows) < 2:
        return f"the train split holds {len(train_rows)} image(s) with an 8-class label; the gate needs at least 2"
    if not len(val_rows):
        return "no val split with labelled images to choose the gate's threshold on"
    return None


def gate_method(gate: Gate) -> str:
    """metrics.json's ``out_of_scope.method``, in words."""
    return (
        f"Mahalanobis distance of the L2-normalised pooled features ({FEATURES_LAYER!r} layer) to the nearest "
        "class mean, over "
        f"the {gate.projection.shape[1]} lowest-variance directions of a Ledoit-Wolf shared covariance fitted on "
        f"{gate.n_train} train images; out of scope when the score is above the threshold, the {gate.keep:g} "
        f"quantile of {gate.n_val} val images' scores (dermascan.modeling.ood)"
    )


Scores = dict[str, tuple[list[str], np.ndarray]]  # set -> (image names, gate scores)


@dataclass(frozen=True)
class GivenGate:
    """A gate fitted elsewhere, and the labelled rows its threshold was chosen on (scored again for the figures).

    For a model whose manifest has no val split it never trained on: an
    ensemble of k-fold members takes one member's own gate (``dermascan.ensemble``).
    """

    gate: Gate
    val_rows: pd.DataFrame
    source: str  # where the gate comes from, in words (metrics.json ``out_of_scope.fitted_on``)


def fit_out_of_scope_gate(extractor: keras.Model, train_rows: pd.DataFrame, val_rows: pd.DataFrame, settings: Any,
                          image_size: int, batch_size: int, cache: dict[str, Any]) -> tuple[Gate, np.ndarray]:
    """The gate fitted on the train rows' pooled features, its threshold on the val rows'; and val's scores."""
    started = time.perf_counter()
    log.info("out-of-scope gate: pooled features of %d train images ...", len(train_rows))
    train_features = pooled_features(extractor, train_rows, image_size, batch_size, cache)
    log.info("out-of-scope gate: pooled features of %d val images ...", len(val_rows))
    val_features = pooled_features(extractor, val_rows, image_size, batch_size, cache)
    gate = fit_gate(train_features, train_rows["label"].map(INDEX).to_numpy(), val_features, settings.dims,
                    settings.keep)
    log.info("out-of-scope gate fitted in %.0f s: threshold %.4f (keeps %g of val)", time.perf_counter() - started,
             gate.threshold, settings.keep)
    return gate, gate.score(val_features)


def score_out_of_scope_sets(extractor: keras.Model, gate: Gate, rows: pd.DataFrame, split: str, image_size: int,
                            batch_size: int, cache: dict[str, Any]) -> Scores:
    """The gate's scores of the split's images, of the offline out-of-scope sets, and of the split's corruptions."""
    log.info("out-of-scope gate: scoring %d %s images and their %d corruptions ...", len(rows), split,
             len(ood.CORRUPTIONS))
    features = split_and_corrupted_features(extractor, rows, image_size, batch_size, cache)
    ids = list(rows["image_id"])
    scores: Scores = {split: (ids, gate.score(features.pop("split")))}
    log.info("out-of-scope gate: scoring the offline out-of-scope sets ...")
    for name, images in ood.reference_sets(image_size, cache).items():
        pooled = extractor.predict(images.images.astype(np.float32), batch_size=batch_size, verbose=0)
        scores[name] = (images.names, gate.score(pooled))
    scores.update({name: (ids, gate.score(features[name])) for name in ood.CORRUPTIONS})
    return scores


def out_of_scope_figures(gate: Gate, scores: Scores, split: str) -> dict[str, Any]:
    """metrics.json's ``out_of_scope``: the gate, and its figures per set against ``split``'s images."""
    inside = scores[split][1]
    return {
        "method": gate_method(gate),
        "dims": int(gate.projection.shape[1]),
        "keep": gate.keep,
        "threshold": gate.threshold,
        "n_train": gate.n_train,
        "n_val": gate.n_val,
        "val_rejected": ood.rejected_share(scores["val"][1], gate.threshold),
        f"{split}_rejected": ood.rejected_share(inside, gate.threshold),
        "in_distribution": split,
        "sets": {name: ood.set_figures(inside, scores[name][1], gate.threshold) for name in ("skimage", "synthetic")},
        "corrupted": {name: ood.set_figures(inside, scores[name][1], gate.threshold) for name in ood.CORRUPTIONS},
        "corrupted_note": ood.CORRUPTED_NOTE,
    }


def evaluate_out_of_scope(
    model: keras.Model, manifest: pd.DataFrame, rows: pd.DataFrame, cfg: Any, image_size: int,
    cache: dict[str, Any], seed: int, out_dir: Path, given: Optional[GivenGate] = None,
) -> dict[str, Any]:
    """Fit the out-of-scope gate, save it, and score it against the offline sets: metrics.json's ``out_of_scope``.

    The projection is fitted on a seeded sample of at most
    ``max_train_images`` labelled train images, the threshold on val (all of
    its labelled images), and the rates are measured on ``cfg.split``, so
    the in-distribution rejection rate is honest when that is test. Writes
    ``out_of_scope.npz``, ``out_of_scope_scores.csv`` and the histograms'
    plot. Skipped, with a warning and ``{"skipped": why}``, when disabled, when
    the model has no pooled-feature layer, or without train or val images.
    ``given``: a gate already fitted (see ``GivenGate``), measured here as a fitted one is.
    """
    settings, split = cfg.out_of_scope, cfg.split
    if given is None:
        train_rows = evaluation_rows(manifest, "train")
        train_rows = sample_rows(train_rows[train_rows["label"].notna()], settings.max_train_images, seed)
        val_rows = evaluation_rows(manifest, "val")
        val_rows = val_rows[val_rows["label"].notna()].reset_index(drop=True)
    else:
        train_rows, val_rows = None, given.val_rows.reset_index(drop=True)
    why = out_of_scope_skip_reason(model, settings, train_rows, val_rows)
    if why is not None:
        log.warning("out-of-scope gate skipped: %s", why)
        return {"skipped": why}
    started = time.perf_counter()
    extractor = features_model(model)
    if given is None:
        gate, val_scores = fit_out_of_scope_gate(extractor, train_rows, val_rows, settings, image_size,
                                                 cfg.batch_size, cache)
    else:
        gate = given.gate
        val_scores = gate.score(pooled_features(extractor, val_rows, image_size, cfg.batch_size, cache))
        log.info("out-of-scope gate: %s (threshold %.4f)", given.source, gate.threshold)
    gate.save(out_dir / OUT_OF_SCOPE)
    scores = {"val": (list(val_rows["image_id"]), val_scores),
              **score_out_of_scope_sets(extractor, gate, rows, split, image_size, cfg.batch_size, cache)}
    ood.score_table(scores, gate.threshold).to_csv(out_dir / OUT_OF_SCOPE_SCORES, index=False)
    plots.out_of_scope_histograms({name: values for name, (_, values) in scores.items() if name != "val"},
                                  split, gate.threshold, out_dir / PLOTS / OUT_OF_SCOPE_PLOT)
    result = out_of_scope_figures(gate, scores, split)
    if given is not None:
        result["fitted_on"] = given.source
    if split == "val":
        log.warning("out-of-scope gate: the evaluated split is val, where the threshold is chosen, so its rejection "
                    "rate is not an honest estimate: evaluate evaluate.split=test")
    log.info("out-of-scope gate: %s rejected %.1f%% at the threshold from val; AUROC %s; %.0f s in all; saved %s",
             split, 100 * result[f"{split}_rejected"],
             ", ".join(f"{name} {r['auroc']:.3f}" for name, r in result["sets"].items() if r["auroc"] is not None),
             time.perf_counter() - started, out_dir / OUT_OF_SCOPE)
    return result
