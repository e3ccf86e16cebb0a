"""The main job: train(cfg) on the debug config, read back through MLflow."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from dermascan.config import RunConfig
from dermascan.tracking import TrackingError
from dermascan.train import train

from .conftest import REPO, compose_config, debug_config, debug_overrides, model_config


def test_debug_run_produces_checkpoint_metrics_and_export(debug_run):
    cfg, metrics, artifacts = debug_run
    run_dir = Path(cfg.run_dir)
    assert (run_dir / "checkpoints" / "best.keras").is_file()
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3] and list(history["phase"]) == [1, 1, 2, 2]
    assert {"loss", "top1_accuracy", "balanced_accuracy", "val_balanced_accuracy", "learning_rate"} <= set(history)
    assert metrics["epochs"] == {"phase1": 2, "phase2": 2}
    result = json.loads((run_dir / "metrics.json").read_text())
    test = result["test"]
    assert result["split"] == "test" and 0 <= test["balanced_accuracy"] <= 1 and test["n"] > 0
    assert test["ci"]["balanced_accuracy"]["n_resamples"] == 200 and "MEL" in test["per_class"]
    assert metrics["test"]["balanced_accuracy"] == test["balanced_accuracy"]
    predictions = pd.read_csv(run_dir / "predictions.csv")
    assert list(predictions.columns) == ["image", "AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC"]
    np.testing.assert_allclose(predictions.iloc[:, 1:9].sum(axis=1), 1.0, atol=1e-4)
    assert json.loads((run_dir / "class_weights.json").read_text())["mode"] == "balanced"
    exported = keras.models.load_model(artifacts["export"] / "model.keras")
    labels = json.loads((artifacts["export"] / "labels.json").read_text())
    assert [c["code"] for c in labels["classes"]] == ["AK", "BCC", "BKL", "DF", "MEL", "NV", "SCC", "VASC"]
    # With its out-of-scope gate: two named outputs, the probabilities and the gate's score.
    assert exported.output_shape == {"probabilities": (None, 8), "out_of_scope": (None,)} or sorted(
        map(tuple, exported.output_shape)) == [(None,), (None, 8)]
    assert labels["out_of_scope"]["threshold"] == pytest.approx(result["out_of_scope"]["threshold"])
    for plot in ("training_curves", "roc_curves", "confusion_matrix", "reliability"):
        assert (run_dir / "plots" / f"{plot}.png").stat().st_size > 10_000, plot
    report = (run_dir / "report.md").read_text()
    assert "balanced accuracy" in report and "Keras `binary_accuracy`" in report
    # The training's review: the best epoch, and any warning, in metrics.json and near the top of the report.
    review = result["training"]
    assert review == metrics["training"] and 1 <= review["best_epoch"] <= 4 and review["best_phase"] in (1, 2)
    best = history["val_balanced_accuracy"].max()
    assert review["best_val_balanced_accuracy"] == pytest.approx(best)
    assert "val_largest_class_share" in history  # what the collapse check reads
    training = report.index("## Training")
    assert training < report.index("## Overall")
    assert f"epoch {review['best_epoch']} (phase {review['best_phase']})" in report
    assert all(f"**Warning: {w}.**" in report for w in review["warnings"])
    # The export's parity gate in the report: every format kept or refused, and nothing dropped silently.
    parity = json.loads((artifacts["export"] / "parity.json").read_text())
    assert "## On-device formats (parity with Keras)" in report
    assert all(f"| {name} | " in report for name in parity["formats"])
    assert metrics["export_dropped"] == dict(parity["dropped"])


def test_debug_run_is_one_mlflow_run_with_both_phases(debug_run):
    cfg, _, _ = debug_run
    client = MlflowClient(cfg.tracking.uri)
    experiment = client.get_experiment_by_name("dermascan")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_name == "train/run1" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.backbone"] == "mobilenet_v2" and params["train.phase1.epochs"] == "2"
    assert params["augment.rotation_range"] == "30.0" and params["data.name"] == "demo"
    phases = client.get_metric_history(run.info.run_id, "phase")
    assert [(m.step, m.value) for m in sorted(phases, key=lambda m: m.step)] == [(0, 1), (1, 1), (2, 2), (3, 2)]
    assert len(client.get_metric_history(run.info.run_id, "val_balanced_accuracy")) == 4
    assert "final_test_balanced_accuracy" in run.data.metrics and "final_val_top1_accuracy" in run.data.metrics
    review = json.loads((Path(cfg.run_dir) / "metrics.json").read_text())["training"]
    assert run.data.metrics["best_epoch"] == review["best_epoch"]
    assert run.data.tags["training_warnings"] == (" | ".join(review["warnings"]) or "none")
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config", "history.csv", "plots", "metrics.json", "predictions.csv", "class_weights.json",
            "manifest_summary.json", "export", "report.md"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc_curves.png", "plots/confusion_matrix.png", "plots/reliability.png"} <= plots
    assert "config/config.yaml" in {a.path for a in client.list_artifacts(run.info.run_id, "config")}
    models = client.search_logged_models([experiment.experiment_id])
    assert len(models) == 1 and models[0].source_run_id == run.info.run_id


@pytest.mark.integration
def test_only_formats_named_on_the_command_line_are_required():
    from omegaconf import OmegaConf

    from dermascan.train import named_formats

    cfg = OmegaConf.create({"export": {"tflite": ["fp32", "int8_full"]}})
    assert named_formats(["experiment=isic", "export.enabled=true"], cfg) == []
    assert named_formats(["export.tflite=[fp32,int8_full]"], cfg) == ["fp32", "int8_full"]
    assert named_formats(["+export.tflite=[fp32,int8_full]"], cfg) == ["fp32", "int8_full"]
    assert named_formats(["export.tflite_extra=1"], cfg) == []


def test_image_broken_in_the_cache_stops_training_naming_the_file(tmp_path):
    from dermascan.errors import DataError
    from dermascan.ingest import ingest

    cfg = debug_config(tmp_path, "tracking.enabled=false")
    manifest = ingest(cfg).manifest
    victim = manifest[manifest["split"] == "val"]["image_id"].iloc[0]  # val is read whole every epoch
    cache = tmp_path / "data" / "cache" / "32px-bilinear"
    cache.mkdir(parents=True)
    (cache / f"{victim}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match=f"{victim}.jpg"):
        train(cfg)


def test_unreachable_tracking_server_fails_fast(tmp_path):
    cfg = debug_config(tmp_path, "tracking.uri=http://127.0.0.1:9", "tracking.timeout_s=2")
    started = time.perf_counter()
    with pytest.raises(TrackingError, match="not reachable"):
        train(cfg)
    assert time.perf_counter() - started < 15
    assert not (Path(cfg.run_dir) / "history.csv").exists()


class Interrupt(Exception):
    pass


class StopAfter(keras.callbacks.Callback):
    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise Interrupt(f"stopped after epoch {epoch}")


class Epochs(keras.callbacks.Callback):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append(epoch)


# inside phase 2 and at the end of phase 1 (slow: the default run resumes inside both phases in the k-fold test below)
@pytest.mark.integration
@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow), pytest.param(1, marks=pytest.mark.slow)])
def test_interrupted_run_resumes_at_the_next_epoch(tmp_path, k):
    cfg = debug_config(tmp_path, "train.phase1.epochs=2", "train.phase2.epochs=2")
    with pytest.raises(Interrupt):
        train(cfg, callbacks=[StopAfter(k)])
    recorder = Epochs()
    metrics, _ = train(cfg, callbacks=[recorder])
    assert recorder.seen[0] == k + 1 and recorder.seen == list(range(k + 1, 4))
    history = pd.read_csv(Path(cfg.run_dir) / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3]
    assert metrics["epochs"] == {"phase1": 2, "phase2": 2}
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dermascan").experiment_id])
    assert run.info.status == "FINISHED"
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [0, 1, 2, 3]


@pytest.mark.integration
def test_a_kfold_job_resumes_inside_each_phase_in_its_mlflow_run_and_is_not_redone(tmp_path, caplog):
    """Interrupted in phase 1, then in phase 2: each start continues at the next epoch, with phase 2 numbered
    after phase 1 (Keras keeps BackupAndRestore's resumed epoch on the model, see Fitting.fit)."""
    from dermascan.ingest import assign_splits
    from dermascan.train import already_finished

    settings = ["data.split=kfold", "data.folds=3", "data.fold=1", "train.phase1.epochs=2", "train.phase2.epochs=2"]
    cfg = debug_config(tmp_path, *settings)
    tags = {"sweep": str(tmp_path / "sweep"), "sweep_job": "1"}
    with pytest.raises(Interrupt):
        train(cfg, callbacks=[StopAfter(0)], tags=tags)
    resumed = Epochs()
    with pytest.raises(Interrupt):
        train(cfg, callbacks=[resumed, StopAfter(2)], tags=tags)
    assert resumed.seen == [1, 2]
    recorder = Epochs()
    metrics, _ = train(cfg, callbacks=[recorder], tags=tags)
    assert recorder.seen == [3] and metrics["epochs"] == {"phase1": 2, "phase2": 2}
    run_dir = Path(cfg.run_dir)
    history = pd.read_csv(run_dir / "history.csv")
    assert list(history["epoch"]) == [0, 1, 2, 3] and list(history["phase"]) == [1, 1, 2, 2]
    manifest = pd.read_csv(run_dir / "manifest.csv")
    assert (manifest["split"] == assign_splits(manifest, cfg.data)).all()  # the run dir holds this fold's split
    grouped = assign_splits(manifest, debug_config(tmp_path, "data.split=grouped").data)
    assert ((manifest["split"] == "test") == (grouped == "test")).all()
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dermascan").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["sweep_job"] == "1"
    assert run.data.params["data.split"] == "kfold" and run.data.params["data.fold"] == "1"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == [0, 1, 2, 3]
    # Launched again (a resumed sweep), a finished job is not trained or evaluated again.
    again = Epochs()
    with caplog.at_level("INFO", logger="dermascan.train"):
        summary, files = train(cfg, callbacks=[again], tags=tags)
    assert again.seen == [] and "already finished" in caplog.text
    assert summary["test"]["balanced_accuracy"] == metrics["test"]["balanced_accuracy"] and files["summary"].is_file()
    # With another config, the same run dir is not "already finished".
    assert already_finished(debug_config(tmp_path, *settings, "train.patience=3"), run_dir) is None


class BackboneWatcher(keras.callbacks.Callback):
    """Snapshots of the backbone's weights at the start and end of each fit (phase)."""

    def __init__(self) -> None:
        super().__init__()
        self.snapshots: list[tuple[dict, dict]] = []
        self._begin: dict = {}

    def _backbone(self):
        return next(layer for layer in self.model.layers if isinstance(layer, keras.Model))

    def _weights(self) -> dict:
        return {w.path: np.array(w.numpy()) for w in self._backbone().weights}

    def on_train_begin(self, logs=None):
        self._begin = self._weights()

    def on_train_end(self, logs=None):
        self.snapshots.append((self._begin, self._weights()))


@pytest.mark.integration
def test_freezing_phase1_keeps_backbone_phase2_tunes_it_but_not_bn_statistics(tmp_path):
    cfg = debug_config(tmp_path, "model.freeze_bn=true", "tracking.enabled=false", "train.phase2.unfreeze_from=-20")
    watcher = BackboneWatcher()
    train(cfg, callbacks=[watcher])
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # tracking.enabled=false
    (begin1, end1), (begin2, end2) = watcher.snapshots
    assert all(np.array_equal(begin1[k], end1[k]) for k in begin1)

    kernels = [k for k in begin2 if k.endswith("kernel")]
    statistics = [k for k in begin2 if k.endswith(("moving_mean", "moving_variance"))]
    changed = [k for k in kernels if not np.array_equal(begin2[k], end2[k])]
    # Only the last 20 backbone layers fine-tune; the earlier ones stay frozen.
    from dermascan.modeling.model import build_backbone

    last20 = {layer.name for layer in build_backbone("mobilenet_v2", 32, None, alpha=0.35).layers[-20:]}
    assert len(changed) >= 5 and all(k.split("/")[0] in last20 for k in changed)
    assert statistics and all(np.array_equal(begin2[k], end2[k]) for k in statistics)


@pytest.mark.integration
def test_local_weights_file_is_loaded(tmp_path):
    from dermascan.modeling.model import build_backbone, build_model

    source = build_backbone("mobilenet_v2", 32, None, alpha=0.35)
    path = tmp_path / "backbone.weights.h5"
    source.save_weights(path)
    model, base = build_model(model_config(image_size=32, weights=str(path), alpha=0.35))
    for expected, loaded in zip(source.weights, base.weights):
        np.testing.assert_array_equal(expected.numpy(), loaded.numpy())
    fresh = build_backbone("mobilenet_v2", 32, None, alpha=0.35)
    assert not all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(source.weights, fresh.weights))


def test_imagenet_download_failure_names_the_alternatives(monkeypatch):
    import urllib.error

    import keras.src.utils.file_utils as file_utils

    from dermascan.modeling.model import WeightsError, build_backbone

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(file_utils, "get_file", offline)
    with pytest.raises(WeightsError, match=r"model\.weights=null.*model\.weights=/path/to/weights\.h5"):
        build_backbone("mobilenet_v2", 96, "imagenet", alpha=0.35)


@pytest.mark.integration
def test_other_backbone_builds_with_preprocessing_inside():
    from dermascan.modeling.model import build_model

    model, base = build_model(model_config(backbone="efficientnet_b0", image_size=32, weights=None, units=[8], dropout=[0.3]))
    probabilities = model.predict(np.full((2, 32, 32, 3), 128.0, np.float32), verbose=0)
    assert probabilities.shape == (2, 8) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
    assert base.name.startswith("efficientnetb0")


@pytest.mark.integration
def test_mixed_precision_keeps_softmax_float32():
    from dermascan.modeling.model import build_model

    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model, _ = build_model(model_config(image_size=32, weights=None, alpha=0.35, units=[8], dropout=[0.3]))
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("logits").compute_dtype == "float16"
    assert model.output.dtype == "float32"


def test_balanced_accuracy_metric_matches_scikit_learn():
    from sklearn.metrics import balanced_accuracy_score

    from dermascan.modeling.fit import BalancedAccuracy

    rng = np.random.default_rng(0)
    truth = rng.integers(0, 7, 300)  # class 7 never occurs in the truth
    scores = rng.random((300, 8))
    metric = BalancedAccuracy()
    for chunk in np.array_split(np.arange(300), 4):
        metric.update_state(np.eye(8)[truth[chunk]], scores[chunk])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = balanced_accuracy_score(truth, scores.argmax(axis=1))
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_composes_and_validates(experiment, tmp_path):
    cfg = compose_config("train", [f"experiment={experiment}", f"run_dir={tmp_path}"], RunConfig)
    assert cfg.train.phase1.epochs + cfg.train.phase2.epochs >= 1


def test_recipe_defaults_and_isic_experiment(tmp_path):
    cfg = compose_config("train", ["experiment=isic", f"run_dir={tmp_path}"], RunConfig)
    assert cfg.data.name == "isic" and cfg.model.weights == "imagenet" and cfg.model.image_size == 224
    assert cfg.train.phase1.epochs + cfg.train.phase2.epochs == 30
    assert cfg.train.monitor == "val_balanced_accuracy"
    # What the isic-dev ablations chose (configs/experiment/isic.yaml says why).
    assert cfg.train.sampler == "balanced" and cfg.train.class_weight == "none"
    assert cfg.model.color_constancy == "shades_of_gray" and cfg.train.phase2.freeze_head_bn is None
    cpu = compose_config("train", ["experiment=isic_cpu", f"run_dir={tmp_path}"], RunConfig)
    assert cpu.train.phase1.epochs + cpu.train.phase2.epochs == 15 and cpu.model.image_size == cpu.data.cache.size == 160
    assert cpu.train.ema_momentum == 0.998 and cfg.train.ema_momentum is None
    assert cpu.train.sampler == "balanced" and cpu.model.color_constancy == "shades_of_gray"
    # Issue 17: int8_full is a default again (a failing optional format is dropped, not fatal); int8_dynamic is not.
    assert list(cfg.export.tflite) == list(cpu.export.tflite) == ["fp32", "fp16", "int8_full"]
    assert cfg.export.int8_float_ops == ["DEPTHWISE_CONV_2D"] and cfg.export.int8_float_layers == ["shades_of_gray", "out_of_scope"]
    demo = compose_config("train", [f"run_dir={tmp_path}"], RunConfig)
    assert demo.data.name == "demo" and demo.model.weights is None
    assert demo.train.sampler == "shuffle" and demo.model.color_constancy == "none"


def test_config_typos_and_types_fail_at_start_up(tmp_path):
    from hydra.errors import ConfigCompositionException

    from dermascan.errors import ConfigError

    with pytest.raises(ConfigCompositionException, match="epcohs"):
        compose_config("train", ["train.epcohs=3", f"run_dir={tmp_path}"], RunConfig)
    with pytest.raises(ConfigError, match="train.batch_size"):
        compose_config("train", ["train.batch_size=big", f"run_dir={tmp_path}"], RunConfig)
    with pytest.raises(ConfigError, match="model.head"):
        compose_config("train", ["model.head.units=[8]", f"run_dir={tmp_path}"], RunConfig)
    with pytest.raises(ConfigError, match="train.precision"):
        compose_config("train", ["train.precision=half", f"run_dir={tmp_path}"], RunConfig)


def test_multi_worker_was_removed_and_its_error_says_what_to_use_instead(tmp_path):
    from dermascan.errors import ConfigError

    with pytest.raises(ConfigError, match=r"train.strategy.*multi_worker was removed.*keras#20585.*Scaling out"):
        debug_config(tmp_path, "train.strategy=multi_worker")


def test_debug_run_logs_to_a_real_mlflow_server_and_registers_the_model(tmp_path, mlflow_server):
    cfg = debug_config(
        tmp_path, f"tracking.uri={mlflow_server}", "train.phase2.epochs=1",
        "tracking.register=true", "tracking.model_name=dermascan-debug",
    )
    metrics, _ = train(cfg)
    client = MlflowClient(mlflow_server)
    (run,) = client.search_runs([client.get_experiment_by_name("dermascan").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["model.backbone"] == "mobilenet_v2"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2
    assert "history.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "runs" / "mlflow.db").exists()
    (version,) = client.search_model_versions("name='dermascan-debug'")
    assert version.run_id == run.info.run_id and metrics["registered_version"] == version.version == "1"


@pytest.mark.slow  # a subprocess with 2 logical CPU devices (~40 s)
def test_mirrored_strategy_trains_on_two_cpu_devices(tmp_path):
    script = f"""
import logging
logging.basicConfig(level=logging.INFO)
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from tests.conftest import compose_config
from dermascan.config import RunConfig
from dermascan.train import train
overrides = {debug_overrides(tmp_path, "train.strategy=mirrored", "train.devices=[/cpu:0,/cpu:1]", "tracking.enabled=false", "train.phase2.epochs=0")!r}
metrics, _ = train(compose_config("train", overrides, RunConfig))
print("EPOCHS", metrics["epochs"])
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 replica(s) x batch 8 = 16" in result.stderr + result.stdout
    assert "EPOCHS {'phase1': 1, 'phase2': 0}" in result.stdout


@pytest.mark.integration
def test_keras_overrides_training_false_in_functional_models():
    """Pins the Keras 3 behaviour that model.unfreeze works around (keras-team/keras#20285)."""
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.BatchNormalization(name="bn")(inner_in))
    outer_in = keras.Input((4,))
    outer = keras.Model(outer_in, keras.layers.Dense(1)(inner(outer_in, training=False)))
    outer.compile("sgd", "mse")
    before = inner.get_layer("bn").moving_mean.numpy().copy()
    outer.fit(np.full((8, 4), 5.0), np.zeros((8, 1)), epochs=1, verbose=0)
    assert not np.allclose(inner.get_layer("bn").moving_mean.numpy(), before)  # training=False was ignored
    inner.get_layer("bn").trainable = False
    outer.compile("sgd", "mse")
    frozen = inner.get_layer("bn").moving_mean.numpy().copy()
    outer.fit(np.full((8, 4), 5.0), np.zeros((8, 1)), epochs=1, verbose=0)
    np.testing.assert_array_equal(inner.get_layer("bn").moving_mean.numpy(), frozen)


def test_evaluate_cli_reproduces_the_run_metrics_and_logs_to_the_same_mlflow_run(debug_run):
    cfg, metrics, _ = debug_run
    run_dir = Path(cfg.run_dir)
    result = subprocess.run(
        [sys.executable, "-m", "dermascan.evaluate", f"run_dir={run_dir}"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads((run_dir / "eval" / "test_tta-none" / "metrics.json").read_text())["test"]
    original = json.loads((run_dir / "metrics.json").read_text())["test"]
    for key in ("balanced_accuracy", "top1_accuracy", "mean_auc", "confusion_matrix", "per_class", "ci"):
        assert again[key] == original[key], key
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dermascan").experiment_id])
    assert run.data.metrics["eval_test_tta-none_balanced_accuracy"] == pytest.approx(original["balanced_accuracy"])
    assert "eval" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_evaluate_cli_rejects_a_folder_that_is_not_a_run(tmp_path, caplog):
    from dermascan import cli
    from dermascan.config import EvaluateRunConfig
    from dermascan.evaluate import evaluate_main_task

    cfg = compose_config("evaluate_run", [f"run_dir={tmp_path}"], EvaluateRunConfig)
    with pytest.raises(SystemExit) as exited:
        cli.run(evaluate_main_task, cfg, EvaluateRunConfig)
    assert exited.value.code == 2
    assert "is not a finished training run" in caplog.text and "config.yaml" in caplog.text
