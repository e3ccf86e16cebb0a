"""Error analysis of a finished run: the logic behind ``notebooks/error_analysis.ipynb``.

    a = load(run_dir="runs/train/2026-11-26_12-00-00")    # or load(mlflow_run_id=..., tracking_uri=...)
    headline_table(a.metrics)                             # balanced accuracy first, with its CI
    worst_errors(a.table, 12)                             # the most confident mistakes
    breakdown(a.table, "site")                            # per-group n, balanced and top-1 accuracy
    referral_table(a.evaluation); subgroup_table(a.evaluation, "site")   # as evaluation scored them, with CIs
    out_of_scope_table(a.evaluation); nearest_threshold(out_of_scope_scores(a), threshold, 8, a.split)
    heatmaps = grad_cam(a.model(), a.images(ids))         # [N, h, w] in [0, 1]

``a.table`` is the run's ``predictions.csv`` (the ``evaluate.split``, default
test, exactly as scored: temperature scaling and TTA included) joined with
the manifest's label and metadata, one row per scored image; the labels are
checked against the run's ``ground_truth.csv``. Groups whose metadata is
missing are reported as ``"unknown"``; no row is dropped. Images without an
8-class label (ISIC 2018 Test AKIEC under the official split) stay in the
table with ``label`` NaN and are counted in ``n_unlabelled``; they cannot
be right or wrong.

Grad-CAM (Selvaraju et al. 2017) is taken on the last 4-D feature map of the
model's nested backbone, with the gradient of the class's logit (the input
of the final softmax). Keras 3 does not connect a nested Functional model's
inner tensors to the outer graph, so the forward pass is rebuilt: the
layers before the backbone, a sub-model of the backbone that outputs
[feature map, backbone output], then the head's layers. The rebuilt model
is checked against the original's output on every call.

Figures are built on the Agg canvas (no pyplot state); :func:`figure_png`
turns one into PNG bytes for display.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import keras
import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from dermascan.artifacts import (
    BEST,
    CONFIG,
    GROUND_TRUTH,
    METRICS,
    MLFLOW_RUN_ID,
    OUT_OF_SCOPE_SCORES,
    PREDICTIONS,
)
from dermascan.classes import CODES, INDEX
from dermascan.errors import DataError
from dermascan.evaluation import ood, scoring, subgroups
from dermascan.evaluation.metrics import classification_metrics
from dermascan.evaluation.referral import RATES
from dermascan.rundir import Run, load_images, load_run

log = logging.getLogger("dermascan.evaluation.analysis")

UNKNOWN = subgroups.UNKNOWN
#: Age bands, in order: the subgroups' (``dermascan.evaluation.subgroups``), so that both tell one story.
AGE_BANDS: tuple[str, ...] = subgroups.AGE_BANDS
#: ``breakdown`` dimensions -> the table column that holds the group.
BREAKDOWNS: dict[str, str] = {"source": "source", "site": "site", "age_band": "age_band", "sex": "sex"}
HEADLINE: tuple[tuple[str, str], ...] = (
    ("balanced_accuracy", "mean per-class recall of the argmax; the official ISIC metric"),
    ("top1_accuracy", "fraction of argmax predictions that are right"),
    ("mean_auc", "macro mean one-vs-rest AUC over classes with an AUC"),
    ("mean_sensitivity", "macro mean recall of the argmax"),
    ("mean_specificity", "macro mean specificity of the argmax"),
    ("expected_calibration_error", "top-label ECE, equal-width bins"),
)
RUN_DIR_TAG = "run_dir"


# Loading ---------------------------------------------------------------------------


@dataclass
class Analysis:
    """A finished run, ready for error analysis."""

    run: Run
    #: ``metrics.json``: {"split", "tta", "calibration", <split>: {...}, "val": {...}, ...}
    evaluation: dict[str, Any]
    #: predictions of ``split`` joined with the manifest (see the module docstring)
    table: pd.DataFrame
    split: str
    mlflow_run_id: Optional[str] = None
    _model: Optional[keras.Model] = field(default=None, repr=False)

    @property
    def metrics(self) -> dict[str, Any]:
        """The headline split's metrics as evaluation computed them (CIs included)."""
        return self.evaluation[self.split]

    @property
    def image_size(self) -> int:
        return int(self.run.cfg.model.image_size)

    def model(self) -> keras.Model:
        """The best checkpoint, loaded once."""
        if self._model is None:
            self._model = self.run.model()
        return self._model

    def images(self, image_ids: Sequence[str]) -> np.ndarray:
        """The model's input pixels (uint8 [N, S, S, 3]) of ``image_ids``, in that order."""
        ids = list(image_ids)
        manifest = self.run.manifest.set_index("image_id", drop=False)
        missing = [i for i in ids if i not in manifest.index]
        if missing:
            raise DataError(f"not in the run's manifest: {', '.join(missing[:5])}")
        return load_images(manifest.loc[ids].reset_index(drop=True), self.image_size, self.run.cache)


def run_dir_from_mlflow(mlflow_run_id: str, tracking_uri: Optional[str] = None) -> Path:
    """The run dir that ``python -m dermascan.train`` recorded in the MLflow run's ``run_dir`` tag.

    ``tracking_uri`` defaults to MLflow's current one (``MLFLOW_TRACKING_URI``).
    """
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        mlflow_run = client.get_run(mlflow_run_id)
    except MlflowException as err:
        raise DataError(
            f"MLflow run {mlflow_run_id} not found at {tracking_uri or mlflow.get_tracking_uri()}: {err}. "
            "Pass tracking_uri (the run's config.yaml tracking.uri, e.g. sqlite:///runs/mlflow.db)."
        ) from None
    tag = mlflow_run.data.tags.get(RUN_DIR_TAG)
    if not tag:
        raise DataError(f"MLflow run {mlflow_run_id} has no {RUN_DIR_TAG!r} tag; pass run_dir instead")
    return Path(tag)


def latest_run_dir(start: str | Path = ".") -> Path:
    """The newest finished training run under ``runs/train`` in ``start`` or one of its parents."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        runs = folder / "runs" / "train"
        if not runs.is_dir():
            continue
        finished = [p for p in runs.iterdir() if (p / CONFIG).is_file() and (p / BEST).is_file()]
        if finished:
            return max(finished, key=lambda p: (p / BEST).stat().st_mtime)
    raise DataError(f"no finished run under runs/train in {start} or its parents: set run_dir or mlflow_run_id")


def join_predictions(
    predictions: pd.DataFrame, manifest: pd.DataFrame, truth: Optional[pd.Series] = None
) -> pd.DataFrame:
    """``predictions.csv`` joined with the manifest's label and metadata, plus the prediction's columns.

    ``truth``: the labels of ``ground_truth.csv`` (``scoring.labels``),
    indexed by image; each must equal the manifest's. A run dir written
    before predictions.csv became exactly the ISIC submission layout has a
    trailing ``label`` column instead, checked the same way.

    Adds ``predicted`` (argmax code), ``probability`` (its probability),
    ``true_probability`` (the true class's), ``correct`` (bool; NaN when
    unlabelled) and ``age_band``. DataError if a predicted image is not in
    the manifest or the labels disagree.
    """
    missing_columns = [c for c in ("image", *CODES) if c not in predictions.columns]
    if missing_columns:
        raise DataError(f"{PREDICTIONS} lacks the columns {', '.join(missing_columns)}")
    if truth is None and "label" in predictions.columns:  # the layout before issue 14
        truth = predictions.set_index("image")["label"].dropna()
    predictions = predictions[["image", *CODES]]
    meta = manifest.rename(columns={"image_id": "image"})
    table = predictions.merge(meta, on="image", how="left", validate="one_to_one", indicator=True)
    orphans = table.loc[table["_merge"] == "left_only", "image"].tolist()
    if orphans:
        raise DataError(f"{len(orphans)} predicted images are not in the manifest, e.g. {orphans[:3]}")
    table = table.drop(columns="_merge").rename(columns={"image": "image_id"})
    if truth is not None:
        labels = table.set_index("image_id")["label"]
        checked = labels.reindex(truth.index)
        if (checked.to_numpy() != truth.to_numpy()).any():
            raise DataError(f"the labels of {GROUND_TRUTH} disagree with the manifest's")
        unlisted = labels.notna() & ~labels.index.isin(truth.index)
        if unlisted.any():
            raise DataError(f"{int(unlisted.sum())} labelled predicted images are missing from {GROUND_TRUTH}")
    known = table["label"].notna().to_numpy()

    probabilities = table[list(CODES)].to_numpy(dtype=float)
    top = probabilities.argmax(axis=1)
    table["predicted"] = np.asarray(CODES)[top]
    table["probability"] = probabilities[np.arange(len(table)), top]
    true_index = table["label"].map(INDEX)
    table["true_probability"] = [
        probabilities[i, int(t)] if not pd.isna(t) else np.nan for i, t in enumerate(true_index.to_numpy())
    ]
    table["correct"] = pd.Series(
        np.where(known, table["predicted"].to_numpy() == table["label"].to_numpy(), None), dtype="object"
    )
    table["age_band"] = age_bands(table["age"] if "age" in table else pd.Series(np.nan, index=table.index))
    return table


def load(
    run_dir: Optional[str | Path] = None,
    mlflow_run_id: Optional[str] = None,
    tracking_uri: Optional[str] = None,
) -> Analysis:
    """Load a finished run by its run dir or its MLflow run id (neither: the newest under ./runs/train).

    ``tracking_uri`` is only used with ``mlflow_run_id``; it defaults to
    MLflow's current one (``MLFLOW_TRACKING_URI``).
    """
    if run_dir is not None and mlflow_run_id is not None:
        raise ValueError("give run_dir or mlflow_run_id, not both")
    if mlflow_run_id is not None:
        run_dir = run_dir_from_mlflow(mlflow_run_id, tracking_uri)
    elif run_dir is None:
        run_dir = latest_run_dir()
        log.info("no run_dir or mlflow_run_id given: using the newest run, %s", run_dir)
    run = load_run(run_dir)
    for name in (METRICS, PREDICTIONS):
        if not (run.run_dir / name).is_file():
            raise DataError(
                f"{run.run_dir / name} is missing: evaluate the run first (python -m dermascan.evaluate run_dir=...)"
            )
    evaluation = json.loads((run.run_dir / METRICS).read_text())
    split = evaluation.get("split", "test")
    truth_file = run.run_dir / GROUND_TRUTH
    truth = scoring.labels(pd.read_csv(truth_file), CODES) if truth_file.is_file() else None
    table = join_predictions(pd.read_csv(run.run_dir / PREDICTIONS), run.manifest, truth)
    if mlflow_run_id is None:
        id_file = run.run_dir / MLFLOW_RUN_ID
        mlflow_run_id = id_file.read_text().strip() if id_file.is_file() else None

    unlabelled = int(table["label"].isna().sum())
    if unlabelled:
        log.info("%d of %d %s images have no 8-class label: kept, counted as unlabelled", unlabelled, len(table), split)
    recomputed = overall(table)["balanced_accuracy"]
    reported = evaluation.get(split, {}).get("balanced_accuracy")
    if recomputed is not None and reported is not None and abs(recomputed - reported) > 1e-6:
        log.warning(
            "balanced accuracy from %s (%.4f) differs from %s (%.4f): probabilities are rounded in the CSV",
            PREDICTIONS, recomputed, METRICS, reported,
        )
    log.info("loaded %s: %d %s predictions", run.run_dir, len(table), split)
    return Analysis(run=run, evaluation=evaluation, table=table, split=split, mlflow_run_id=mlflow_run_id)


# Tables ----------------------------------------------------------------------------


def headline_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """The headline metrics of one split, balanced accuracy first, each with its 95% CI where computed."""
    ci = metrics.get("ci") or {}
    rows = []
    for name, meaning in HEADLINE:
        interval = ci.get(name) or {}
        rows.append({
            "metric": name,
            "value": metrics.get(name),
            "ci_low": interval.get("low"),
            "ci_high": interval.get("high"),
            "meaning": meaning,
        })
    return _nones(pd.DataFrame(rows), ("value", "ci_low", "ci_high")).set_index("metric")


def _nones(frame: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``columns`` as objects with None, not NaN, where a value is undefined."""
    for column in columns:
        frame[column] = frame[column].astype("object").where(frame[column].notna(), None)
    return frame


def confusion_matrix(table: pd.DataFrame) -> np.ndarray:
    """Counts [K, K] of the labelled rows; rows true, columns predicted, order ``CODES``."""
    return np.asarray(overall(table)["confusion_matrix"])


def overall(table: pd.DataFrame) -> dict[str, Any]:
    """``classification_metrics`` of the labelled rows of ``table``."""
    labelled = table[table["label"].notna()]
    return classification_metrics(labelled["label"].map(INDEX).to_numpy(), labelled[list(CODES)].to_numpy(float))


def worst_errors(table: pd.DataFrame, n: int = 12) -> pd.DataFrame:
    """The ``n`` most confident mistakes: misclassified labelled rows by predicted-class probability, highest first.

    Columns: image_id, label (true), predicted, probability (of the
    predicted class), true_probability, then the metadata.
    """
    wrong = table[table["label"].notna() & (table["predicted"] != table["label"])]
    wrong = wrong.sort_values(["probability", "image_id"], ascending=[False, True], kind="stable")
    first = ["image_id", "label", "predicted", "probability", "true_probability"]
    rest = [c for c in ("source", "site", "age", "age_band", "sex") if c in wrong.columns]
    return wrong[first + rest].head(max(int(n), 0)).reset_index(drop=True)


age_band = subgroups.age_band


def age_bands(ages: pd.Series) -> pd.Series:
    return pd.Series([age_band(a) for a in ages], index=ages.index, dtype="object")


def referral_table(evaluation: dict[str, Any]) -> pd.DataFrame:
    """The referral decision as evaluation scored it (metrics.json ``referral``): one row per rate of the split,
    with its 95% CI and its value on val, where the threshold was chosen. Empty when the referral was skipped."""
    referral = evaluation.get("referral") or {}
    split = evaluation.get("split", "test")
    if "threshold" not in referral:
        return pd.DataFrame(columns=["value", "ci_low", "ci_high", "val"])
    m, rows = referral[split], []
    for name in RATES:
        interval = m[name]
        rows.append({"rate": name, "value": interval["estimate"], "ci_low": interval["low"],
                     "ci_high": interval["high"], "val": referral["val"].get(name)})
    rows.append({"rate": "referrals_per_100", "value": m["referrals_per_100"], "ci_low": None, "ci_high": None,
                 "val": None})
    return _nones(pd.DataFrame(rows), ("value", "ci_low", "ci_high", "val")).set_index("rate")


def subgroup_table(evaluation: dict[str, Any], dimension: Optional[str] = None) -> pd.DataFrame:
    """metrics.json's ``subgroups`` as a table (``subgroups.table``), of one dimension when given, indexed by group."""
    table = subgroups.table(evaluation.get("subgroups") or {})
    if table.empty:
        return table
    if dimension is not None:
        table = table[table["dimension"] == dimension].drop(columns="dimension").set_index("group")
    return table


def out_of_scope_table(evaluation: dict[str, Any]) -> pd.DataFrame:
    """The out-of-scope gate's figures per set (metrics.json ``out_of_scope``), indexed by set: ``kind`` says
    whether the set must be refused (``out of scope``) or is a bad photo of a real lesion (``corrupted lesion``).
    Empty when the gate was skipped."""
    gate = evaluation.get("out_of_scope") or {}
    columns = ["kind", "n", "auroc", "fpr_at_95_tpr", "rejected"]
    if "threshold" not in gate:
        return pd.DataFrame(columns=columns)
    rows = [{"set": name, "kind": kind, **{k: figures.get(k) for k in columns[1:]}}
            for group, kind in (("sets", "out of scope"), ("corrupted", "corrupted lesion"))
            for name, figures in gate[group].items()]
    return _nones(pd.DataFrame(rows), ("auroc", "fpr_at_95_tpr", "rejected")).set_index("set")


def out_of_scope_scores(analysis: Analysis) -> Optional[pd.DataFrame]:
    """The run's ``out_of_scope_scores.csv`` (set, image, score, rejected); None when it has none."""
    path = analysis.run.run_dir / OUT_OF_SCOPE_SCORES
    return pd.read_csv(path, dtype={"set": str, "image": str}) if path.is_file() else None


def score_sets(scores: pd.DataFrame, exclude: Sequence[str] = ("val",)) -> dict[str, np.ndarray]:
    """The scores table as {set: scores}, in the table's order (val left out: the threshold's own split)."""
    return {name: group["score"].to_numpy(float) for name, group in scores.groupby("set", sort=False)
            if name not in exclude}


def nearest_threshold(scores: pd.DataFrame, threshold: float, n: int, split: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(in-distribution, out-of-scope): the ``n`` images of ``split``, and the ``n`` of the other sets (val
    aside), whose scores lie nearest the threshold, nearest first: where the gate is least sure."""
    distance = (scores["score"] - threshold).abs()
    ranked = scores.assign(distance=distance).sort_values(["distance", "set", "image"], kind="stable")
    inside = ranked[ranked["set"] == split]
    outside = ranked[~ranked["set"].isin([split, "val"])]
    return (inside.head(max(int(n), 0)).reset_index(drop=True), outside.head(max(int(n), 0)).reset_index(drop=True))


def out_of_scope_images(analysis: Analysis, rows: pd.DataFrame) -> list[np.ndarray]:
    """The pixels the gate scored for rows of the scores table, rebuilt: the run's own images (and their
    corruptions, ``ood.corrupt``), or the offline sets (``ood.skimage_images``, ``ood.synthetic_images``),
    through the same resize as evaluation."""
    cache = analysis.run.cache
    sources = {"skimage": ood.skimage_images, "synthetic": lambda: ood.synthetic_images(ood.SYNTHETIC_SEED)}
    found: dict[tuple[str, str], np.ndarray] = {}
    for name, group in rows.groupby("set", sort=False):
        ids = list(dict.fromkeys(group["image"]))
        if name in sources:
            images = sources[name]()
            built = ood.as_evaluated({i: images[i] for i in ids}, analysis.image_size, cache).images
        else:
            built = analysis.images(ids)
            if name in ood.CORRUPTIONS:
                built = ood.corrupt(built, cache["method"])[name]
        found.update({(name, i): image for i, image in zip(ids, built)})
    return [found[(row["set"], row["image"])] for _, row in rows.iterrows()]


def out_of_scope_caption(row: pd.Series) -> str:
    return f"{row['set']}: {row['image']}\nscore {row['score']:.3f}, {'rejected' if row['rejected'] else 'kept'}"


def _groups(table: pd.DataFrame, by: str) -> pd.Series:
    if by not in BREAKDOWNS:
        raise ValueError(f"breakdown by one of {', '.join(BREAKDOWNS)}, got {by!r}")
    if by == "age_band":
        return age_bands(table["age"]) if "age" in table else pd.Series(UNKNOWN, index=table.index, dtype="object")
    if by not in table:
        return pd.Series(UNKNOWN, index=table.index, dtype="object")
    values = table[by].astype("object")
    text = values.map(lambda v: UNKNOWN if pd.isna(v) else str(v).strip())
    return text.mask(text == "", UNKNOWN)


def breakdown(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """Performance per group of ``by`` (source, site, age_band, sex); missing metadata is the group "unknown".

    One row per group, indexed by the group: ``n`` (labelled images),
    ``n_errors``, ``n_classes`` (classes present among them; the balanced
    accuracy of a group with one class is that class's recall),
    ``balanced_accuracy`` and ``top1_accuracy`` (None when ``n`` is 0), and
    ``n_unlabelled`` (images without an 8-class label). The ``n`` and
    ``n_unlabelled`` columns add up to the table's rows. Age bands keep
    their order; other groups are by ``n``, largest first; "unknown" is last.
    """
    groups = _groups(table, by)
    rows = []
    for group, rows_of in table.groupby(groups, sort=False):
        labelled = rows_of[rows_of["label"].notna()]
        scored = overall(rows_of) if len(labelled) else None
        rows.append({
            by: group,
            "n": len(labelled),
            "n_errors": int((labelled["predicted"] != labelled["label"]).sum()),
            "n_classes": int(labelled["label"].nunique()),
            "balanced_accuracy": scored["balanced_accuracy"] if scored else None,
            "top1_accuracy": scored["top1_accuracy"] if scored else None,
            "n_unlabelled": len(rows_of) - len(labelled),
        })
    columns = [by, "n", "n_errors", "n_classes", "balanced_accuracy", "top1_accuracy", "n_unlabelled"]
    result = _nones(pd.DataFrame(rows, columns=columns), ("balanced_accuracy", "top1_accuracy"))
    if by == "age_band":
        order = {band: i for i, band in enumerate((*AGE_BANDS, UNKNOWN))}
        key = result[by].map(order)
    else:
        key = -result["n"] - result["n_unlabelled"]
    key = key + np.where(result[by] == UNKNOWN, 1e9, 0)
    result = result.assign(_key=key).sort_values(["_key", by], kind="stable").drop(columns="_key")
    return result.set_index(by)


# Grad-CAM --------------------------------------------------------------------------


def _rank(layer: keras.layers.Layer) -> Optional[int]:
    try:
        return len(layer.output.shape)
    except (AttributeError, ValueError):  # a layer never called, or one with several outputs
        return None


def find_backbone(model: keras.Model) -> Optional[keras.Model]:
    """The last nested model inside ``model`` whose output is a 4-D feature map, or None (a flat model)."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model) and _rank(layer) == 4]
    return nested[-1] if nested else None


def last_feature_layer(model: keras.Model) -> keras.layers.Layer:
    """The last layer of ``model`` whose output is 4-D: the feature map Grad-CAM is taken on."""
    layers = [layer for layer in model.layers if _rank(layer) == 4 and not isinstance(layer, keras.layers.InputLayer)]
    if not layers:
        raise ValueError(f"{model.name} has no layer with a 4-D output to take Grad-CAM on")
    return layers[-1]


def _is_softmax(layer: keras.layers.Layer) -> bool:
    return isinstance(layer, keras.layers.Activation) and getattr(layer.activation, "__name__", "") == "softmax"


def gradient_model(model: keras.Model, layer_name: Optional[str] = None) -> tuple[keras.Model, bool]:
    """A model: images -> [feature map, class scores]; and whether the scores are logits (softmax cut off).

    Nested backbone: its last 4-D layer (or ``layer_name`` inside it) is
    exposed by a sub-model of the backbone, and the outer model's layers are
    re-applied around it, in order (the outer model must be a chain, as
    ``dermascan.modeling.model.build_model`` builds it; :func:`grad_cam` checks the
    rebuilt output against the original's). Flat model: the layer's output
    is taken from the model's own graph.
    """
    backbone = find_backbone(model)
    cut = _is_softmax(model.layers[-1])
    if backbone is None:
        conv = model.get_layer(layer_name) if layer_name else last_feature_layer(model)
        scores = model.layers[-1].input if cut else model.output
        return keras.Model(model.inputs, [conv.output, scores], name="gradcam"), cut

    conv = backbone.get_layer(layer_name) if layer_name else last_feature_layer(backbone)
    features = keras.Model(backbone.inputs, [conv.output, backbone.output], name="gradcam_backbone")
    inputs = keras.Input(shape=tuple(model.inputs[0].shape[1:]), name="image")
    x, feature_map = inputs, None
    head = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if cut:
        head = head[:-1]
    for layer in head:
        if layer is backbone:
            feature_map, x = features(x)
        else:
            x = layer(x)
    return keras.Model(inputs, [feature_map, x], name="gradcam"), cut


def grad_cam(
    model: keras.Model,
    images: np.ndarray,
    class_index: Optional[int | Sequence[int]] = None,
    layer_name: Optional[str] = None,
    batch_size: int = 32,
) -> np.ndarray:
    """Grad-CAM heatmaps [N, h, w] in [0, 1], at the feature map's spatial size.

    ``images``: the model's raw input (uint8 or float [N, S, S, 3]).
    ``class_index``: None for each image's predicted class, one index for
    all, or one per image. Each map is ReLU(sum_c mean(d score / d A_c) A_c)
    divided by its maximum; a map with no positive evidence is all zeros.
    The score is the class's logit when the model ends in a softmax layer.
    """
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        raise RuntimeError(f"grad_cam needs the TensorFlow backend, not {keras.backend.backend()}")
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}")
    n = len(images)
    if class_index is None:
        indices = None
    else:
        indices = np.asarray(class_index, dtype=int)
        if indices.ndim > 1 or indices.size not in (1, n):
            raise ValueError(f"class_index must be one class index or {n} of them, got shape {indices.shape}")
        indices = np.broadcast_to(indices.ravel(), (n,))
        classes = model.output.shape[-1]
        if n and (indices.min() < 0 or indices.max() >= classes):
            raise ValueError(f"class_index outside [0, {classes - 1}]")

    grad_model, cut = gradient_model(model, layer_name)
    maps = []
    for start in range(0, n, batch_size):
        x = tf.convert_to_tensor(images[start : start + batch_size], dtype=tf.float32)
        with tf.GradientTape() as tape:
            feature_map, scores = grad_model(x, training=False)
            scores = tf.cast(scores, tf.float32)
            chosen = tf.argmax(scores, axis=-1) if indices is None else indices[start : start + batch_size]
            target = tf.gather(scores, chosen, axis=1, batch_dims=1)
        grads = tf.cast(tape.gradient(target, feature_map), tf.float32)
        feature_map = tf.cast(feature_map, tf.float32)
        expected = model(x, training=False)
        rebuilt = tf.nn.softmax(scores) if cut else scores
        atol = 1e-2 if model.dtype_policy.compute_dtype != "float32" else 1e-4
        if not np.allclose(rebuilt.numpy(), tf.cast(expected, tf.float32).numpy(), atol=atol):
            raise ValueError(f"{model.name}: the rebuilt forward pass does not reproduce the model's output")
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.einsum("bhwc,bc->bhw", feature_map, weights)).numpy()
        peak = cam.max(axis=(1, 2), keepdims=True)
        maps.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
    if not maps:
        h, w = grad_model.outputs[0].shape[1:3]
        return np.zeros((0, h, w), np.float32)
    return np.concatenate(maps).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45, cmap: str = "jet") -> np.ndarray:
    """``heatmap`` [h, w] in [0, 1], resized (bilinear) to ``image`` [H, W, 3] and blended over it: uint8 [H, W, 3]."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    resized = np.asarray(Image.fromarray(heat, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    colour = matplotlib.colormaps[cmap](np.clip(resized, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image[..., :3].astype(np.float32) + alpha * colour
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


@dataclass
class Explanation:
    """Grad-CAM of some of a run's images, for the predicted and the true class."""

    rows: pd.DataFrame  # the images' rows of ``Analysis.table``, in order
    pixels: np.ndarray  # the model's input, uint8 [N, S, S, 3]
    predicted: np.ndarray  # heatmaps [N, h, w] of the class the run predicted
    true: np.ndarray  # heatmaps of the true class (of the predicted class when unlabelled)


def gradcam_ids(table: pd.DataFrame, n: int, image_ids: Optional[Sequence[str]] = None) -> list[str]:
    """``image_ids`` when given; else the ``n`` worst errors; else (no errors) the first ``n`` images."""
    if image_ids:
        return list(image_ids)
    ids = list(worst_errors(table, n)["image_id"])
    return ids or list(table["image_id"][: max(int(n), 0)])


def explain(analysis: Analysis, image_ids: Sequence[str]) -> Explanation:
    """Grad-CAM of ``image_ids`` with the run's best checkpoint, for their predicted and true classes.

    The predicted class is the one in ``predictions.csv`` (after TTA, if
    evaluation used it), so the heatmap explains the prediction shown.
    """
    table = analysis.table.set_index("image_id", drop=False)
    missing = [i for i in image_ids if i not in table.index]
    if missing:
        raise DataError(f"not among the run's {analysis.split} predictions: {', '.join(missing[:5])}")
    rows = table.loc[list(image_ids)].reset_index(drop=True)
    pixels = analysis.images(rows["image_id"])
    predicted = rows["predicted"].map(INDEX).to_numpy(int)
    true = rows["label"].map(INDEX).fillna(pd.Series(predicted)).to_numpy(int)
    model = analysis.model()
    return Explanation(rows, pixels, grad_cam(model, pixels, predicted), grad_cam(model, pixels, true))


def _label(value: Any) -> str:
    return "unlabelled" if pd.isna(value) else str(value)


def gradcam_figure(explanation: Explanation, alpha: float = 0.45) -> Figure:
    """One row per image: the input, the predicted class's Grad-CAM and the true class's, overlaid."""
    panels, captions = [], []
    for i, row in explanation.rows.iterrows():
        image = explanation.pixels[i]
        panels += [image, overlay(image, explanation.predicted[i], alpha), overlay(image, explanation.true[i], alpha)]
        captions += [
            f"{row['image_id']}\ntrue {_label(row['label'])}",
            f"Grad-CAM: predicted {row['predicted']}\np = {row['probability']:.2f}",
            f"Grad-CAM: true {_label(row['label'])}",
        ]
    h, w = explanation.predicted.shape[1:3]
    return gallery_figure(panels, captions, ncols=3, title=f"Grad-CAM ({h}x{w} feature map, upsampled)")


# Figures ---------------------------------------------------------------------------


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def gallery_figure(
    images: Sequence[np.ndarray],
    captions: Sequence[str],
    ncols: int = 4,
    panel_size: float = 2.6,
    title: Optional[str] = None,
) -> Figure:
    """A grid of images, each with its caption; a note instead when there are none."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    if not len(images):
        fig = _figure((6, 1.2))
        fig.text(0.5, 0.5, "nothing to show", ha="center", va="center", fontsize=12, style="italic")
        if title:
            fig.suptitle(title)
        return fig
    ncols = max(1, min(ncols, len(images)))
    nrows = math.ceil(len(images) / ncols)
    fig = _figure((panel_size * ncols, (panel_size + 0.5) * nrows))
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    for ax, image, caption in zip(axes, images, captions):
        ax.imshow(np.asarray(image), interpolation="nearest")
        ax.set_title(caption, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def error_caption(row: pd.Series) -> str:
    return f"{row['image_id']}\ntrue {row['label']}, predicted {row['predicted']}\np = {row['probability']:.2f}"


def breakdown_figure(table: pd.DataFrame, title: Optional[str] = None) -> Figure:
    """Bars of balanced and top-1 accuracy per group of a :func:`breakdown` table, with each group's n."""
    groups = [str(g) for g in table.index]
    y = np.arange(len(groups))
    height = 0.38
    fig = _figure((6.5, 0.9 + 0.45 * max(len(groups), 1)))
    ax = fig.subplots()
    for offset, column, colour in ((-height / 2, "balanced_accuracy", "tab:blue"), (height / 2, "top1_accuracy", "tab:gray")):
        values = pd.to_numeric(table[column], errors="coerce").to_numpy(dtype=float)
        ax.barh(y + offset, np.nan_to_num(values), height, color=colour, label=column)
        for position, value in zip(y + offset, values):
            label = "n/a" if np.isnan(value) else f"{value:.2f}"
            ax.text(min(np.nan_to_num(value), 0.88) + 0.01, position, label, va="center", fontsize=7)
    ax.set_yticks(y, [f"{g} (n={n})" for g, n in zip(groups, table["n"])])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_title(title or f"by {table.index.name}")
    return fig


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The figure as PNG bytes (for ``IPython.display.Image``)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def describe(analysis: Analysis) -> str:
    """One line naming the run: its dir, MLflow run id, split, TTA and temperature."""
    calibration = analysis.evaluation.get("calibration") or {}
    return (
        f"run {os.fspath(analysis.run.run_dir)} (MLflow run {analysis.mlflow_run_id or 'none'}): "
        f"{len(analysis.table)} {analysis.split} images, TTA {analysis.evaluation.get('tta', 'none')}, "
        f"temperature {calibration.get('temperature') or 'none'}"
    )
