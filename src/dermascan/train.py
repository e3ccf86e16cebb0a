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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import keras
import pandas as pd
import tensorflow as tf
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from dermascan import cli, tracking
from dermascan.artifacts import (
    BEST,
    CLASS_WEIGHTS,
    CONFIG,
    EXPORT,
    HISTORY,
    METRICS,
    PLOTS,
    PREDICTIONS,
    REPORT,
    SUMMARY,
    TRAINING_CURVES,
    read_history,
    read_json,
)
from dermascan.config import Engine, RunConfig, SplitPolicy, config_dir
from dermascan.data import manifest as manifest_io
from dermascan.data.cache import cached_paths
from dermascan.evaluate import evaluate
from dermascan.evaluation.parity import markdown as parity_markdown
from dermascan.evaluation.plots import training_curves
from dermascan.export import ExportError, export_keeping_parity
from dermascan.ingest import ingest
from dermascan.modeling.augment import AugmentParams, IDGAugmentation, resolve_device
from dermascan.modeling.class_weights import (
    class_weights,
    format_table,
    keras_class_weight,
    save,
)
from dermascan.modeling.fit import (
    FitInputs,
    Fitting,
    load_keras,
    review_phases,
    run_phases,
    steps_for,
)
from dermascan.modeling.inputs import (
    PipelineSpec,
    make_inputs,
    naming_broken_files,
    training_prior,
)
from dermascan.modeling.model import build_model, freeze_bn_of, inference_model
from dermascan.rundir import Run

log = logging.getLogger("dermascan.train")


def select_strategy(train_cfg: DictConfig) -> tf.distribute.Strategy:
    """``train.strategy``: auto (mirrored on several GPUs), none, mirrored.

    There is no multi-worker option: Keras 3's ``Model.fit`` fails under
    ``MultiWorkerMirroredStrategy`` across workers (keras-team/keras#20585,
    pinned by a strict-xfail test), and this model is small enough that the
    compute is in the number of runs, which the Hydra launchers spread over a
    cluster (README, "Scaling out").
    """
    name = train_cfg.strategy
    if name == "auto":
        name = "mirrored" if len(tf.config.list_physical_devices("GPU")) > 1 else "none"
    if name == "none":
        return tf.distribute.get_strategy()
    return tf.distribute.MirroredStrategy(devices=list(train_cfg.devices) if train_cfg.devices else None)


def select_precision(train_cfg: DictConfig) -> str:
    policy = str(train_cfg.precision)
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


def named_formats(overrides: Sequence[str], cfg: DictConfig) -> list[str]:
    """The TFLite formats the command line named (``export.tflite=[...]``), or none.

    A format the user asked for by name is required: if it fails the export's
    parity gate, the run fails (exit 2, after everything else is written).
    The formats of the configs (defaults, experiments) are optional: one that
    fails is dropped with a warning, so that hours of training still end 0
    with the formats that hold up.
    """
    named = any(override.lstrip("+~").split("=")[0] == "export.tflite" for override in overrides)
    return [str(kind) for kind in cfg.export.tflite] if named else []


def already_finished(cfg: DictConfig, run_dir: Path) -> Optional[dict[str, Any]]:
    """summary.json of a run dir that finished with this very config, else None.

    Re-launching a sweep with ``hydra.sweep.dir`` resumes its interrupted
    jobs; the finished ones are not redone.
    """
    if not ((run_dir / SUMMARY).is_file() and (run_dir / CONFIG).is_file()):
        return None
    if OmegaConf.load(run_dir / CONFIG) != OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)):
        return None
    return read_json(run_dir / SUMMARY, None)


def train(
    cfg: DictConfig, callbacks: Sequence[keras.callbacks.Callback] = (), required_formats: Sequence[str] = (),
    tags: Optional[dict[str, str]] = None,
) -> tuple[dict[str, Any], dict[str, Path]]:
    """Run the whole job on a validated config; return (summary, artifacts).

    ``required_formats``: the TFLite formats whose parity failure fails the run (see ``named_formats``).
    ``tags``: MLflow tags for the run (a sweep job's). A run dir that already
    finished with the same config is not trained again: its summary is returned.
    """
    started = time.perf_counter()
    run_dir = Path(cfg.run_dir)
    done = already_finished(cfg, run_dir)
    if done is not None:
        log.info("%s already finished with this config (summary.json): nothing to do. Delete its summary.json "
                 "to evaluate and export it again, or use python -m dermascan.evaluate / export.", run_dir)
        return done, {name: run_dir / path for name, path in RESULT_FILES.items() if (run_dir / path).exists()}
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / CONFIG, resolve=True)
    tracking.check_store(cfg.tracking)

    keras.utils.set_random_seed(cfg.seed)
    if cfg.train.deterministic:
        tf.config.experimental.enable_op_determinism()
    strategy = select_strategy(cfg.train)
    policy = select_precision(cfg.train)
    keras.mixed_precision.set_global_policy(policy)
    try:
        data = prepare_data(cfg, run_dir)
        pipelines = prepare_pipelines(cfg, data, strategy.num_replicas_in_sync, policy)
        model, base = prepare_model(cfg, strategy, pipelines.augment_in_model)
        with tracking.run(cfg, run_dir, run_name(cfg, run_dir), tags=tags) as run_id:
            epoch_metrics = [tracking.EpochMetrics()] if run_id is not None else []
            fitting = Fitting(model, base, pipelines.inputs, cfg.train, run_dir, jit_compile=jit_compile(cfg.train),
                              freeze_bn=freeze_bn_of(cfg.model), callbacks=[*epoch_metrics, *callbacks])
            with strategy.scope(), naming_broken_files(data.cached_paths(cfg)):
                state = run_phases(fitting)
            summary, failure = _evaluate_and_export(
                cfg, run_dir, data, model, state, started, run_id, required_formats
            )
        if failure is not None:
            raise failure
    finally:
        keras.mixed_precision.set_global_policy("float32")
    test = summary[cfg.evaluate.split]
    log.info(
        "done in %.0f s: %s balanced accuracy %.3f (top-1 accuracy %.3f) after %d + %d epochs; run dir %s",
        summary["seconds"], cfg.evaluate.split, test["balanced_accuracy"], test["top1_accuracy"],
        state["phase1_epochs"], state["phase2_epochs"], run_dir,
    )
    files = {name: run_dir / path for name, path in RESULT_FILES.items() if (run_dir / path).exists()}
    if not cfg.export.enabled:
        files.pop("export", None)  # an old export/ of a resumed run is not this run's
    return summary, files


# What train returns as its artifacts: name -> path in the run dir.
RESULT_FILES = {
    "history": HISTORY, "training_curves": f"{PLOTS}/{TRAINING_CURVES}", "checkpoint": BEST, "metrics": METRICS,
    "report": REPORT, "predictions": PREDICTIONS, "export": EXPORT, "summary": SUMMARY,
}


@dataclass(frozen=True)
class RunData:
    """The ingested manifest, its labelled train and val rows, and the class weights."""

    manifest: pd.DataFrame
    train_rows: pd.DataFrame
    val_rows: pd.DataFrame
    weights: dict[str, float]

    def cached_paths(self, cfg: DictConfig) -> list[str]:
        cache = cfg.data.cache
        frame = pd.concat([self.train_rows, self.val_rows])
        return [str(p) for p in cached_paths(frame["image_id"], cache.dir, cache.size, cache.method)]


def prepare_data(cfg: DictConfig, run_dir: Path) -> RunData:
    """Ingest, copy the manifest into the run dir (re-evaluation, export and the notebook read it), weigh the classes."""
    ingested = ingest(cfg)
    manifest = ingested.manifest
    # Written from memory, not copied from data.processed_dir: concurrent jobs (the folds of a
    # k-fold sweep) share that folder, and each run dir must hold its own split.
    manifest_io.write(manifest, ingested.summary, run_dir)
    labelled = manifest["label"].notna()
    train_rows = manifest[(manifest["split"] == "train") & labelled]
    val_rows = manifest[(manifest["split"] == "val") & labelled]
    weights = class_weights(train_rows["label"], cfg.train.class_weight)
    save(weights, train_rows["label"], run_dir / CLASS_WEIGHTS, cfg.train.class_weight)
    log.info("class weights (%s):\n%s", cfg.train.class_weight, format_table(weights, train_rows["label"]))
    return RunData(manifest, train_rows, val_rows, weights)


@dataclass(frozen=True)
class Pipelines:
    inputs: FitInputs
    augment_in_model: bool  # the fast engine's transforms run in the model (on the accelerator)


def prepare_pipelines(cfg: DictConfig, data: RunData, replicas: int, policy: str) -> Pipelines:
    """The train and val tf.data pipelines, and whether augmentation runs in them or in the model."""
    params = AugmentParams.from_config(cfg.augment)
    on_accelerator = cfg.augment.engine == Engine.fast and resolve_device(cfg.augment.device) == "accelerator"
    global_batch = cfg.train.batch_size * replicas
    cache = OmegaConf.to_container(cfg.data.cache, resolve=True)
    spec = PipelineSpec(
        image_size=cfg.model.image_size,
        batch_size=global_batch,
        engine=cfg.augment.engine,
        augment_in_pipeline=not on_accelerator,
        shuffle_buffer=cfg.train.shuffle_buffer,
        sampler=cfg.train.sampler,
        sampler_power=cfg.train.sampler_power,
        mixup_alpha=cfg.train.mixup_alpha,
        seed=cfg.seed,
        deterministic=True,
    )
    train_rows, val_rows = data.train_rows, data.val_rows
    val_spec = replace(spec, batch_size=first_batch_splits_evenly(len(val_rows), global_batch, replicas))
    steps = steps_for(len(train_rows), global_batch, cfg.train.steps_per_epoch)
    log.info(
        "training on %d images (%d val), %d replica(s) x batch %d = %d, %d steps/epoch, precision %s, "
        "augmentation %s engine on %s",
        len(train_rows), len(val_rows), replicas, cfg.train.batch_size, global_batch, steps, policy,
        cfg.augment.engine, "the model (accelerator)" if on_accelerator else "the CPU pipeline",
    )
    inputs = FitInputs(
        train=make_inputs(train_rows, spec, params, training=True, cache=cache),
        val=make_inputs(val_rows, val_spec, params, training=False, cache=cache),
        steps_per_epoch=steps,
        class_weight=keras_class_weight(data.weights),
        prior=tuple(training_prior(train_rows["label"], spec)),
    )
    return Pipelines(inputs, augment_in_model=on_accelerator)


def prepare_model(cfg: DictConfig, strategy: tf.distribute.Strategy, augment_in_model: bool) -> tuple[keras.Model, keras.Model]:
    """(model, backbone), built in the strategy's scope, with the augmentation layer when it runs in the model."""
    with strategy.scope():
        augmentation = IDGAugmentation(OmegaConf.to_container(cfg.augment), seed=cfg.seed) if augment_in_model else None
        return build_model(cfg.model, augmentation=augmentation)


def jit_compile(train_cfg: DictConfig) -> bool:
    """``train.jit_compile``; auto: XLA on a GPU only (on a CPU its compile time dominates short runs)."""
    if train_cfg.jit_compile == "auto":
        return bool(tf.config.list_physical_devices("GPU"))
    return bool(train_cfg.jit_compile)


def _evaluate_and_export(
    cfg: DictConfig, run_dir: Path, data: RunData, model: keras.Model, state: dict[str, Any], started: float,
    run_id: Optional[str], required_formats: Sequence[str] = (),
) -> tuple[dict[str, Any], Optional[ExportError]]:
    """Review the phases, evaluate the best checkpoint, export it, write summary.json and log it all to MLflow.

    A failed export is returned, not raised, so that the training, the
    metrics and parity.json are logged first.
    """
    history = read_history(run_dir)
    review = review_phases(history, cfg.train.monitor, cfg.train.monitor_mode, cfg.train.collapse_share)
    for warning in review["warnings"]:
        log.warning("%s", warning)
    if run_id is not None:
        tracking.log_review(review)
    training_curves(history, run_dir / PLOTS / TRAINING_CURVES, state["phase1_epochs"])
    best = load_keras(run_dir / BEST) if (run_dir / BEST).is_file() else model
    cache = OmegaConf.to_container(cfg.data.cache, resolve=True)
    evaluation = evaluate(
        best, data.manifest, cfg.evaluate, cfg.model.image_size, cache, run_dir, seed=cfg.seed,
        isic2018=cfg.data.split == SplitPolicy.official, training=review,
    )
    failure, parity = None, None
    if cfg.export.enabled:
        parity, failure = export_keeping_parity(Run(run_dir, cfg, data.manifest), best, cfg.export, evaluation,
                                                required_formats)
        if parity is not None:
            with (run_dir / REPORT).open("a") as report:
                report.write("\n" + parity_markdown(parity))
            if run_id is not None:
                tracking.log_export(parity)
    summary = {
        "val": evaluation.get("val"),
        cfg.evaluate.split: evaluation[cfg.evaluate.split],
        "epochs": {"phase1": state["phase1_epochs"], "phase2": state["phase2_epochs"]},
        "training": review,
        "export_dropped": dict(parity.get("dropped", [])) if parity else {},
        "seconds": round(time.perf_counter() - started, 1),
    }
    (run_dir / SUMMARY).write_text(json.dumps(summary, indent=2))
    if run_id is not None:
        # The model as served: the temperature folded in, training-only layers removed.
        temperature = evaluation["calibration"].get("temperature")
        version = tracking.log_finished_run(cfg, run_dir, summary, lambda: inference_model(best, temperature))
        if version is not None:
            summary["registered_version"] = version
    return summary, failure


def sweep_tags(hydra_cfg: DictConfig) -> dict[str, str]:
    """A ``-m`` job's MLflow tags: its sweep folder and job number (the sweep summary nests the runs by them)."""
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return {}
    return {"sweep": str(Path(hydra_cfg.sweep.dir).resolve()), "sweep_job": str(hydra_cfg.job.num)}


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="train")
def main(cfg: DictConfig) -> Optional[float]:
    """Returns the val balanced accuracy: what a Hydra sweeper (Optuna) maximises. Never the test split's."""
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    metrics, _ = cli.run(
        lambda c: train(c, required_formats=named_formats(overrides, c), tags=sweep_tags(hydra_cfg)), cfg, RunConfig
    )
    return (metrics.get("val") or {}).get("balanced_accuracy")


if __name__ == "__main__":
    main()
