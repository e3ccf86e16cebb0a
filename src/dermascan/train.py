"""``python -m dermascan.train``: ingest -> train (two phases) -> evaluate -> export.

    python -m dermascan.train                                  # the offline demo
    python -m dermascan.train experiment=isic data.root=DIR    # the recipe on ISIC data
    python -m dermascan.train -m train.phase2.lr=1e-4,3e-5     # a sweep, one MLflow run each

``train(cfg)`` does the work and returns ``(metrics, artifacts)``; tests call
it with a composed config. Everything lands in ``cfg.run_dir`` and in one
MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import keras
import numpy as np
import pandas as pd
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from dermascan import cli, tracking
from dermascan.augment import AugmentParams, IDGAugmentation, resolve_device
from dermascan.class_weights import (
    class_weights,
    format_table,
    keras_class_weight,
    save,
)
from dermascan.config import RunConfig, config_dir
from dermascan.data.cache import cached_paths
from dermascan.data.manifest import MANIFEST
from dermascan.data.manifest import SUMMARY as MANIFEST_SUMMARY
from dermascan.errors import ConfigError
from dermascan.evaluate import (
    CALIBRATION,
    METRICS,
    PREDICTIONS,
    REPORT,
    evaluate,
    flat_metrics,
)
from dermascan.export import ExportError, export_run, inference_model
from dermascan.fit import BEST, HISTORY, read_history, review_phases, run_phases, steps_for
from dermascan.ingest import ingest
from dermascan.inputs import PipelineSpec, make_inputs, naming_broken_files
from dermascan.model import build_model
from dermascan.plots import training_curves
from dermascan.rundir import Run

log = logging.getLogger("dermascan.train")


def select_strategy(train_cfg: DictConfig) -> tf.distribute.Strategy:
    """``train.strategy``: auto (mirrored on several GPUs), none, mirrored, multi_worker."""
    name = train_cfg.strategy.value
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if name == "none":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(devices=list(train_cfg.devices) if train_cfg.devices else None)
    if "TF_CONFIG" not in os.environ:
        raise ConfigError("train.strategy=multi_worker needs the TF_CONFIG environment variable (see README)")
    cluster = json.loads(os.environ["TF_CONFIG"]).get("cluster", {})
    if sum(len(tasks) for tasks in cluster.values()) > 1:
        # Model.fit reduces its first batch across replicas eagerly, which a
        # collective (multi-worker) strategy cannot do outside strategy.run.
        raise ConfigError(
            "train.strategy=multi_worker: Keras 3's Model.fit does not work with MultiWorkerMirroredStrategy "
            "across several workers (keras-team/keras#20585, tensorflow/tensorflow#72388). Train on one "
            "machine (mirrored) until that is fixed."
        )
    return tf.distribute.MultiWorkerMirroredStrategy()


def select_precision(train_cfg: DictConfig) -> str:
    policy = train_cfg.precision.value
    if policy == "auto":
        policy = "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
    return policy


def first_batch_splits_evenly(n_images: int, global_batch: int, replicas: int) -> int:
    """An evaluation batch size whose first batch divides evenly over the replicas.

    Keras 3.15 builds a distributed model from the first evaluation batch by
    averaging it across replicas, which fails when that batch splits
    unevenly (a validation split smaller than the global batch). Later
    partial batches are fine, so only the first one needs care.
    """
    if replicas == 1 or n_images >= global_batch:
        return global_batch
    return max(replicas, n_images - n_images % replicas)


def run_name(cfg: DictConfig, run_dir: Path) -> str:
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    runs = Path(cfg.paths.runs_dir).resolve()
    try:
        return str(run_dir.resolve().relative_to(runs))
    except ValueError:
        return run_dir.name


def train(cfg: DictConfig, callbacks: Sequence[keras.callbacks.Callback] = ()) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the whole job on a validated config; return (metrics, artifacts)."""
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    tracking.check_store(cfg.tracking)

    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = select_strategy(cfg.train)
    replicas = strategy.num_replicas_in_sync
    policy = select_precision(cfg.train)
    keras.mixed_precision.set_global_policy(policy)
    try:
        return _train(cfg, run_dir, strategy, replicas, policy, started, callbacks)
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _train(cfg, run_dir, strategy, replicas, policy, started, extra_callbacks):
    ingested = ingest(cfg)
    manifest = ingested.manifest
    # The run dir keeps its own copy: re-evaluation, export and the notebook read it, not data/processed.
    shutil.copyfile(ingested.manifest_path, run_dir / MANIFEST)
    shutil.copyfile(ingested.summary_path, run_dir / MANIFEST_SUMMARY)
    train_rows = manifest[(manifest["split"] == "train") & manifest["label"].notna()]
    val_rows = manifest[(manifest["split"] == "val") & manifest["label"].notna()]

    weights = class_weights(train_rows["label"], cfg.train.class_weight)
    save(weights, train_rows["label"], run_dir / "class_weights.json", cfg.train.class_weight)
    log.info("class weights (%s):\n%s", cfg.train.class_weight, format_table(weights, train_rows["label"]))

    params = AugmentParams.from_config(cfg.augment)
    device = resolve_device(cfg.augment.device.value)
    on_accelerator = cfg.augment.engine.value == "fast" and device == "accelerator"
    global_batch = cfg.train.batch_size * replicas
    cache = OmegaConf.to_container(cfg.data.cache, resolve=True)
    spec = PipelineSpec(
        image_size=cfg.model.image_size,
        batch_size=global_batch,
        engine=cfg.augment.engine.value,
        augment_in_pipeline=not on_accelerator,
        shuffle_buffer=cfg.train.shuffle_buffer,
        sampler=cfg.train.sampler,
        seed=cfg.seed,
        deterministic=True,
    )
    train_data = make_inputs(train_rows, spec, params, training=True, cache=cache)
    val_spec = replace(spec, batch_size=first_batch_splits_evenly(len(val_rows), global_batch, replicas))
    val_data = make_inputs(val_rows, val_spec, params, training=False, cache=cache)
    steps = steps_for(len(train_rows), global_batch, cfg.train.steps_per_epoch)
    log.info(
        "training on %d images (%d val), %d replica(s) x batch %d = %d, %d steps/epoch, precision %s, "
        "augmentation %s engine on %s",
        len(train_rows), len(val_rows), replicas, cfg.train.batch_size, global_batch, steps, policy,
        cfg.augment.engine.value, "the model (accelerator)" if on_accelerator else "the CPU pipeline",
    )

    freeze_bn = cfg.model.freeze_bn if cfg.model.freeze_bn is not None else cfg.model.weights is not None
    with strategy.scope():
        model, base = build_model(
            backbone=cfg.model.backbone,
            image_size=cfg.model.image_size,
            weights=cfg.model.weights,
            alpha=cfg.model.alpha,
            units=list(cfg.model.head.units),
            dropout=list(cfg.model.head.dropout),
            augmentation=IDGAugmentation(OmegaConf.to_container(cfg.augment), seed=cfg.seed) if on_accelerator else None,
            freeze_bn=freeze_bn,
            bn_momentum=cfg.model.bn_momentum,
            color_constancy=cfg.model.color_constancy,
            sog_power=cfg.model.sog_power,
        )
    jit = cfg.train.jit_compile
    if jit == "auto":  # XLA pays off on a GPU; on a CPU its compile time dominates short runs
        jit = bool(tf.config.list_physical_devices("GPU"))

    name = run_name(cfg, run_dir)
    artifacts: dict[str, Path] = {}
    with tracking.run(cfg, run_dir, name) as run_id:
        callbacks = [tracking.EpochMetrics()] if run_id is not None else []
        callbacks += list(extra_callbacks)
        cached = cached_paths(
            pd.concat([train_rows, val_rows])["image_id"], cache["dir"], cache["size"], cache["method"]
        )
        with strategy.scope(), naming_broken_files([str(p) for p in cached]):
            state = run_phases(
                model, base, train_data, val_data, cfg.train, run_dir, steps,
                keras_class_weight(weights), jit, freeze_bn, callbacks,
            )
        history = read_history(run_dir)
        artifacts["history"] = run_dir / HISTORY
        review = review_phases(history, cfg.train.monitor, cfg.train.monitor_mode, cfg.train.collapse_share)
        for warning in review["warnings"]:
            log.warning("%s", warning)
        if run_id is not None:
            tracking.log_review(review)
        artifacts["training_curves"] = training_curves(history, run_dir / "plots" / "training_curves.png", state["phase1_epochs"])

        best_path = run_dir / BEST
        best = keras.models.load_model(best_path) if best_path.is_file() else model
        artifacts["checkpoint"] = best_path
        evaluation = evaluate(
            best, manifest, cfg.evaluate, cfg.model.image_size, cache, run_dir, seed=cfg.seed,
            isic2018=cfg.data.split.value == "official", training=review,
        )
        metrics = {"val": evaluation.get("val"), cfg.evaluate.split: evaluation[cfg.evaluate.split]}
        artifacts["metrics"] = run_dir / METRICS
        artifacts["report"] = run_dir / REPORT
        artifacts["predictions"] = run_dir / PREDICTIONS
        failure = None
        if cfg.export.enabled:
            try:
                export_run(Run(run_dir, cfg, manifest), best, cfg.export, metrics=evaluation)
            except ExportError as err:  # log the training, metrics and parity.json first, then fail
                failure = err
            artifacts["export"] = run_dir / "export"
        metrics["epochs"] = {"phase1": state["phase1_epochs"], "phase2": state["phase2_epochs"]}
        metrics["training"] = review
        metrics["seconds"] = round(time.perf_counter() - started, 1)
        summary = run_dir / "summary.json"
        summary.write_text(json.dumps(metrics, indent=2))
        artifacts["summary"] = summary

        if run_id is not None:
            for split_name in ("val", cfg.evaluate.split):
                if metrics[split_name] is not None:
                    tracking.log_metrics(flat_metrics(metrics[split_name]), prefix=f"final_{split_name}_")
            tracking.log_artifacts([run_dir / "config.yaml"], artifact_path="config")
            hydra_dir = run_dir / ".hydra"
            if hydra_dir.is_dir():
                tracking.log_artifacts([hydra_dir], artifact_path="config/hydra")
            tracking.log_artifacts(
                [run_dir / MANIFEST_SUMMARY, run_dir / "class_weights.json", run_dir / HISTORY, run_dir / METRICS,
                 run_dir / REPORT, run_dir / CALIBRATION, run_dir / "summary.json"]
                + sorted(run_dir.glob("predictions*.csv"))
            )
            tracking.log_artifacts([run_dir / "plots"], artifact_path="plots")
            if "export" in artifacts:
                tracking.log_artifacts([artifacts["export"]], artifact_path="export")
            example = np.zeros((1, cfg.model.image_size, cfg.model.image_size, 3), np.float32)
            # The model as served: the temperature folded in, training-only layers removed.
            served = inference_model(best, evaluation["calibration"].get("temperature"))
            version = tracking.log_model(served, example, cfg.tracking)
            if version is not None:
                metrics["registered_version"] = version
    if failure is not None:
        raise failure
    test = metrics[cfg.evaluate.split]
    log.info(
        "done in %.0f s: %s balanced accuracy %.3f (top-1 accuracy %.3f) after %d + %d epochs; run dir %s",
        metrics["seconds"], cfg.evaluate.split, test["balanced_accuracy"], test["top1_accuracy"],
        state["phase1_epochs"], state["phase2_epochs"], run_dir,
    )
    return metrics, artifacts


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    metrics, _ = cli.run(train, cfg, RunConfig)
    return metrics[cfg.evaluate.split]["balanced_accuracy"]


if __name__ == "__main__":
    main()
