"""Everything that talks to MLflow.

One MLflow run per training run, in one store shared by all runs (default
``sqlite:///runs/mlflow.db``; ``mlflow ui --backend-store-uri
sqlite:///runs/mlflow.db`` opens it). The run is named after the Hydra
output directory. Metrics are logged explicitly, per epoch and at the end;
``mlflow.tensorflow.autolog`` is not used (it crashes ``fit`` without
tensorboard), nor ``mlflow.keras.MlflowCallback`` (it logs the optimizer's
settings as params at every ``fit``, and MLflow refuses to change a param,
which phase 2's new learning rate would).

With ``tracking.enabled=false`` every function here does nothing.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import keras
import mlflow
import numpy as np
import requests
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from dermascan import __version__
from dermascan.artifacts import (
    CALIBRATION,
    CLASS_WEIGHTS,
    CONFIG,
    EXPORT,
    GROUND_TRUTH,
    GROUND_TRUTH_2018,
    HISTORY,
    MANIFEST_SUMMARY,
    METRICS,
    MLFLOW_RUN_ID,
    OUT_OF_SCOPE,
    OUT_OF_SCOPE_SCORES,
    PLOTS,
    REPORT,
    SUMMARY,
    read_json,
)
from dermascan.errors import DermascanError
from dermascan.evaluation.subgroups import metric_name

log = logging.getLogger("dermascan.tracking")
MAX_PARAM_LENGTH = 6000


class TrackingError(DermascanError):
    """The MLflow tracking store cannot be reached or used."""


def _is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def check_store(tracking: DictConfig) -> None:
    """Fail fast, before any training, if the tracking store is unusable."""
    if not tracking.enabled:
        return
    uri = tracking.uri
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        return
    if _is_remote(uri):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=tracking.timeout_s)
            response.raise_for_status()
        except requests.RequestException as err:
            raise TrackingError(
                f"the MLflow tracking server at {uri} is not reachable ({err}). Start it, fix "
                "tracking.uri, or run with tracking.enabled=false."
            ) from None


def flatten(cfg: DictConfig) -> dict[str, str]:
    """Every resolved config value as one MLflow param, keyed by its dotted path."""
    out: dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            out[prefix[:-1]] = str(node)[:MAX_PARAM_LENGTH]

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return out


@contextmanager
def run(
    cfg: DictConfig, run_dir: Path, run_name: str, stage: str = "train", new: bool = False,
    tags: Optional[dict[str, str]] = None,
) -> Iterator[Optional[str]]:
    """Start (or, for a run dir that has one, reopen) the MLflow run; yield its id.

    Re-evaluation and re-export reopen the training's run; ``new=True``
    starts a separate run instead, tagged with ``stage`` and the run dir.
    ``tags`` are set on the run, new or reopened (a sweep job's ``sweep`` folder and ``sweep_job``).
    """
    tracking = cfg.tracking
    if not tracking.enabled:
        yield None
        return
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(tracking.timeout_s))
    mlflow.set_tracking_uri(tracking.uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        location = None
        if tracking.artifact_location and not _is_remote(tracking.uri):
            location = Path(tracking.artifact_location).resolve().as_uri()
        experiment_id = mlflow.create_experiment(tracking.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    id_file = run_dir / MLFLOW_RUN_ID
    resume_id = id_file.read_text().strip() if id_file.is_file() and not new else None
    with mlflow.start_run(run_id=resume_id, experiment_id=None if resume_id else experiment_id, run_name=run_name) as active:
        if not new:
            id_file.write_text(active.info.run_id)
        if resume_id is None:
            params = flatten(cfg)
            items = list(params.items())
            for i in range(0, len(items), 100):
                mlflow.log_params(dict(items[i : i + 100]))
            mlflow.set_tags({"run_dir": str(run_dir.resolve()), "stage": stage})
        if tags:
            mlflow.set_tags(tags)
        log.info("MLflow run %s (%s) in experiment %r at %s", run_name, active.info.run_id, tracking.experiment, tracking.uri)
        yield active.info.run_id


class EpochMetrics(keras.callbacks.Callback):
    """Logs each epoch's metrics to the active MLflow run, step = epoch (continuous across phases)."""

    def on_epoch_end(self, epoch: int, logs: Optional[dict[str, Any]] = None) -> None:
        if logs:
            mlflow.log_metrics({k: float(v) for k, v in logs.items() if np.isfinite(float(v))}, step=epoch)


def log_metrics(metrics: dict[str, Optional[float]], prefix: str) -> None:
    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({f"{prefix}{k}": float(v) for k, v in metrics.items() if v is not None})


def log_review(review: dict[str, Any]) -> None:
    """The training's best epoch as metrics, and its warnings as the ``training_warnings`` tag (searchable in the UI)."""
    if mlflow.active_run() is None:
        return
    mlflow.log_metrics({k: float(review[k]) for k in ("best_epoch", "best_phase") if review.get(k) is not None})
    mlflow.set_tag("training_warnings", " | ".join(review["warnings"]) if review["warnings"] else "none")


def log_export(parity: dict[str, Any]) -> None:
    """The export's parity report: the ``export_dropped`` tag (formats that failed it, and why) and, per
    TFLite format, top-1 agreement and the balanced-accuracy difference as metrics (``parity_<format>_...``)."""
    if mlflow.active_run() is None:
        return
    dropped = parity.get("dropped") or []
    mlflow.set_tag("export_dropped", " | ".join(f"{name}: {why}" for name, why in dropped) if dropped else "none")
    metrics = {}
    for name, result in parity.get("formats", {}).items():
        if name.startswith("tflite_") and "top1_agreement" in result:
            metrics[f"parity_{name}_top1_agreement"] = result["top1_agreement"]
            difference = result.get("balanced_accuracy_difference")
            if difference and difference.get("estimate") is not None:
                metrics[f"parity_{name}_balanced_accuracy_difference"] = difference["estimate"]
    mlflow.log_metrics(metrics)


def log_artifacts(paths: list[Path], artifact_path: Optional[str] = None) -> None:
    if mlflow.active_run() is None:
        return
    for path in paths:
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name if artifact_path is None else artifact_path)
        elif path.is_file():
            mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_model(model: keras.Model, example: np.ndarray, tracking: DictConfig) -> Optional[str]:
    """Log the model with a signature; register it if asked. Returns the registered version."""
    if mlflow.active_run() is None or not tracking.log_model:
        return None
    signature = mlflow.models.infer_signature(example, model.predict(example, verbose=0))
    info = mlflow.keras.log_model(
        model,
        name="model",
        signature=signature,
        registered_model_name=tracking.model_name if tracking.register else None,
        # Explicit requirements: MLflow's inference of them imports and times out slowly.
        pip_requirements=[f"tensorflow=={tf.__version__}", f"keras=={keras.__version__}", f"dermascan=={__version__}"],
    )
    version = getattr(info, "registered_model_version", None)
    if version is not None:
        log.info("registered model %s version %s", tracking.model_name, version)
    return None if version is None else str(version)


def flat_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics, CI bounds and per-class figures of one split, as MLflow metric names."""
    flat = {k: v for k, v in metrics.items() if isinstance(v, float)}
    for name, interval in (metrics.get("ci") or {}).items():
        for side in ("low", "high"):
            if interval.get(side) is not None:
                flat[f"{name}_ci_{side}"] = interval[side]
    for code, per_class in metrics.get("per_class", {}).items():
        for key in ("auc", "sensitivity", "specificity"):
            if per_class.get(key) is not None:
                flat[f"{code}_{key}"] = per_class[key]
    return flat


def referral_metrics(referral: Optional[dict[str, Any]]) -> dict[str, float]:
    """metrics.json's ``referral`` as flat MLflow metrics: ``referral_threshold``, ``referral_val_sensitivity``,
    ``referral_test_sensitivity`` (and ``_ci_low``/``_ci_high``), ``referral_test_referrals_per_100``, ...

    Nothing when the referral was skipped.
    """
    if not referral or "threshold" not in referral:
        return {}
    flat = {"referral_threshold": referral["threshold"], "referral_target_sensitivity": referral["target_sensitivity"]}
    for split, figures in referral.items():
        if not isinstance(figures, dict) or "n_positive" not in figures:
            continue  # not a split's figures
        for key, value in figures.items():
            if isinstance(value, dict) and "estimate" in value:
                flat[f"referral_{split}_{key}"] = value["estimate"]
                for side in ("low", "high"):
                    flat[f"referral_{split}_{key}_ci_{side}"] = value.get(side)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                flat[f"referral_{split}_{key}"] = value
    return {k: float(v) for k, v in flat.items() if v is not None}


def subgroup_metrics(subgroups: Optional[dict[str, Any]]) -> dict[str, float]:
    """metrics.json's ``subgroups`` as one MLflow metric per group and figure, named so that runs compare:
    ``subgroup_<dimension>_<group>_<metric>``, e.g. ``subgroup_site_lower_extremity_balanced_accuracy``,
    ``subgroup_age_band_ge70_referral_sensitivity``, ``subgroup_sex_female_n`` (point estimates; the CIs
    are in metrics.json)."""
    flat: dict[str, float] = {}
    for dimension, groups in ((subgroups or {}).get("dimensions") or {}).items():
        for group, result in groups.items():
            stem = f"subgroup_{metric_name(dimension)}_{metric_name(group)}_"
            flat[f"{stem}n"] = float(result["n"])
            for key in ("balanced_accuracy", "mean_auc", "referral_sensitivity", "referral_specificity"):
                value = (result.get(key) or {}).get("estimate")
                if value is not None:
                    flat[f"{stem}{key}"] = float(value)
    return flat


def out_of_scope_metrics(out_of_scope: Optional[dict[str, Any]]) -> dict[str, float]:
    """metrics.json's ``out_of_scope`` as flat MLflow metrics: ``out_of_scope_threshold``,
    ``out_of_scope_test_rejected``, ``out_of_scope_skimage_auroc``, ``out_of_scope_synthetic_fpr_at_95_tpr``,
    ``out_of_scope_corrupted_blur_rejected``, ... Nothing when the gate was skipped."""
    if not out_of_scope or "threshold" not in out_of_scope:
        return {}
    scalars = ("threshold", "keep", "dims", "n_train", "n_val", "val_rejected",
               f"{out_of_scope.get('in_distribution', 'test')}_rejected")
    flat = {f"out_of_scope_{key}": float(out_of_scope[key]) for key in scalars if out_of_scope.get(key) is not None}
    for group, prefix in (("sets", "out_of_scope_"), ("corrupted", "out_of_scope_corrupted_")):
        for name, figures in (out_of_scope.get(group) or {}).items():
            for key in ("n", "auroc", "fpr_at_95_tpr", "rejected"):
                if figures.get(key) is not None:
                    flat[f"{prefix}{metric_name(name)}_{key}"] = float(figures[key])
    return flat


def decision_metrics(evaluation: dict[str, Any]) -> dict[str, float]:
    """The referral, subgroup and out-of-scope metrics of an evaluation (metrics.json's content), flat, for MLflow."""
    return {**referral_metrics(evaluation.get("referral")), **subgroup_metrics(evaluation.get("subgroups")),
            **out_of_scope_metrics(evaluation.get("out_of_scope"))}


def log_finished_run(
    cfg: DictConfig, run_dir: Path, summary: dict[str, Any], served: Callable[[], keras.Model]
) -> Optional[str]:
    """Log a finished training run dir to the active MLflow run; return the registered model version, if any.

    The final val and test metrics (``summary`` as train wrote it to
    summary.json), the referral, subgroup and out-of-scope metrics (from metrics.json), the config (and Hydra's), every result file, the plots,
    the export folder (when export is enabled), and ``served()``: the model
    as served, with the temperature folded in (built only when
    ``tracking.log_model``).
    """
    if mlflow.active_run() is None:
        return None
    for split in ("val", cfg.evaluate.split):
        if summary.get(split) is not None:
            log_metrics(flat_metrics(summary[split]), prefix=f"final_{split}_")
    log_metrics(decision_metrics(read_json(run_dir / METRICS, {})), prefix="")
    log_artifacts([run_dir / CONFIG], artifact_path="config")
    log_artifacts([run_dir / ".hydra"], artifact_path="config/hydra")
    files = (MANIFEST_SUMMARY, CLASS_WEIGHTS, HISTORY, METRICS, REPORT, CALIBRATION, SUMMARY, GROUND_TRUTH,
             GROUND_TRUTH_2018, OUT_OF_SCOPE, OUT_OF_SCOPE_SCORES)
    log_artifacts([run_dir / name for name in files] + sorted(run_dir.glob("predictions*.csv")))
    log_artifacts([run_dir / PLOTS], artifact_path=PLOTS)
    if cfg.export.enabled:
        log_artifacts([run_dir / EXPORT], artifact_path=EXPORT)
    if not cfg.tracking.log_model:
        return None
    size = int(cfg.model.image_size)
    return log_model(served(), np.zeros((1, size, size, 3), np.float32), cfg.tracking)
