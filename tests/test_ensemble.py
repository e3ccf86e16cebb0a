"""Ensembles (python -m dermascan.ensemble): the mean of calibrated members, the held-out rule, report, export, serve."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pandas as pd
import pytest

from dermascan.artifacts import (
    BEST,
    CALIBRATION,
    CONFIG,
    METRICS,
    MLFLOW_RUN_ID,
    SUMMARY,
)
from dermascan.config import EnsembleConfig, compose
from dermascan.data.manifest import COLUMNS
from dermascan.ensemble import (
    OUT_OF_FOLD,
    SHARED,
    build_ensemble,
    ensemble,
    ensemble_splits,
    member_dirs,
    member_gate,
)
from dermascan.errors import ConfigError, DataError
from dermascan.evaluation.calibration import apply_temperature
from dermascan.evaluation.referral import (
    choose_threshold,
    class_indices,
    needs_referral,
)
from dermascan.modeling.fit import load_keras
from dermascan.modeling.model import LOGITS_LAYER, inference_model
from dermascan.modeling.ood import FEATURES_LAYER, fit_gate, load_gate
from dermascan.rundir import load_images, load_run

from .conftest import REPO, debug_config

TEMPERATURES = (1.6, 0.7)  # the members' calibration.json: one softens, one sharpens


# --- without training ------------------------------------------------------------------------------------------


def _member_files(run_dir: Path, summary: bool = True) -> Path:
    for name in (CONFIG, BEST) + ((SUMMARY,) if summary else ()):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("{}")
    return run_dir


def test_fewer_than_two_members_unfinished_runs_and_both_sources_are_refused(tmp_path):
    a, b = _member_files(tmp_path / "a"), _member_files(tmp_path / "b", summary=False)
    with pytest.raises(ConfigError, match="at least 2 finished runs, got 1"):
        member_dirs([str(a)], None)
    with pytest.raises(ConfigError, match="at least 2 finished runs, got 0"):
        member_dirs([], None)
    with pytest.raises(DataError, match=rf"not finished training run\(s\): {b}.*{SUMMARY}"):
        member_dirs([str(a), str(b)], None)
    with pytest.raises(ConfigError, match="not both"):
        member_dirs([str(a)], str(tmp_path))
    assert member_dirs([str(a), str(a)], None) == [a, a]  # one run twice: allowed, it counts twice


def test_a_sweep_gives_its_finished_jobs_and_names_the_unfinished(tmp_path, caplog):
    sweep = tmp_path / "multirun"
    for job in ("0", "1", "2"):
        _member_files(sweep / job, summary=job != "1")
    assert member_dirs([], str(sweep)) == [sweep / "0", sweep / "2"]
    assert f"{sweep / '1'} has not finished" in caplog.text
    shutil.rmtree(sweep / "2")
    with pytest.raises(ConfigError, match=f"got 1 in {sweep}"):
        member_dirs([], str(sweep))


def _manifest(splits: dict[str, str]) -> pd.DataFrame:
    rows = [{"image_id": i, "path": f"{i}.jpg", "label": "NV", "split": s} for i, s in splits.items()]
    return pd.DataFrame(rows).reindex(columns=COLUMNS)


def _members(*manifests: pd.DataFrame) -> list:
    return [SimpleNamespace(run=SimpleNamespace(manifest=m)) for m in manifests]


def test_val_is_only_what_no_member_trained_on():
    base = {"t1": "test", "t2": "test", "a": "train", "b": "train", "c": "val", "d": "val"}
    seeds = ensemble_splits(_members(_manifest(base), _manifest(base)))
    assert seeds.mode == SHARED and seeds.mixed == 0
    assert dict(zip(seeds.manifest["image_id"], seeds.manifest["split"])) == base

    # k folds: each fold's val is the other's train, so no image is unseen by both; each is unseen by one
    fold0 = {**base, "a": "val", "b": "val", "c": "train", "d": "train"}
    fold1 = {**base, "a": "train", "b": "train", "c": "val", "d": "val"}
    folds = ensemble_splits(_members(_manifest(fold0), _manifest(fold1)))
    assert folds.mode == OUT_OF_FOLD and folds.mixed == 4
    assert set(folds.manifest.loc[folds.manifest["split"] != "test", "split"]) == {"train"}
    unseen = folds.unseen.loc[["a", "b", "c", "d", "t1"]].to_numpy()
    assert unseen.tolist() == [[True, False], [True, False], [False, True], [False, True], [False, False]]

    # partial overlap: only the image val in both is val; the one val in one member and train in the other is not
    other = {**base, "c": "train"}
    partial = ensemble_splits(_members(_manifest(base), _manifest(other)))
    assert partial.mode == SHARED and partial.mixed == 1
    assert partial.manifest.set_index("image_id")["split"].to_dict() == {**base, "c": "train"}


def test_the_config_composes_and_its_schema_holds_no_values():
    from omegaconf import OmegaConf

    cfg = compose("ensemble", EnsembleConfig, ["run_dirs=[a,b]", "out_dir=/o", "evaluate.tta=flips"])
    assert list(cfg.run_dirs) == ["a", "b"] and cfg.sweep_dir is None and cfg.log_to_mlflow
    structured = OmegaConf.structured(EnsembleConfig)
    assert all(OmegaConf.is_missing(structured, key) for key in ("run_dirs", "sweep_dir", "out_dir", "seed"))


def _tiny_member(seed: int) -> keras.Model:
    """A small model with a member's layout: image -> ... -> gap -> logits -> softmax probabilities."""
    init = keras.initializers.RandomNormal(stddev=0.3, seed=seed)
    image = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(image)
    x = keras.layers.Conv2D(12, 3, activation="relu", kernel_initializer=init)(x)
    x = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    x = keras.layers.Dense(8, kernel_initializer=init, name=LOGITS_LAYER)(x)
    return keras.Model(image, keras.layers.Activation("softmax", name="probabilities")(x))


def test_the_ensemble_model_is_the_mean_of_calibrated_members_and_folds_its_own_temperature(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (24, 16, 16, 3)).astype(np.float32)
    members = [_tiny_member(seed) for seed in range(3)]
    temperatures = [0.3, None, 4.0]  # a very sharp member: the mean must stay exact however far apart they are
    model = build_ensemble(members, temperatures)
    own = [m.predict(images, verbose=0) for m in members]
    expected = np.mean([p if t is None else apply_temperature(p, t) for p, t in zip(own, temperatures)], axis=0)
    model.save(tmp_path / "ensemble.keras")
    loaded = load_keras(tmp_path / "ensemble.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-6)
    # the ensemble's own temperature, folded by export as for one model: softmax(log(mean p) / T)
    np.testing.assert_allclose(inference_model(loaded, 1.8).predict(images, verbose=0),
                               apply_temperature(expected, 1.8), atol=1e-6)
    assert loaded.get_layer(FEATURES_LAYER).output.shape[-1] == 3 * 12


def test_the_first_members_gate_scores_inside_the_ensemble_as_in_the_member(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (40, 16, 16, 3)).astype(np.float32)
    members = [_tiny_member(seed) for seed in range(2)]
    features = keras.Model(members[0].inputs, members[0].get_layer(FEATURES_LAYER).output).predict(images, verbose=0)
    gate = fit_gate(features[:30], np.arange(30) % 4, features[30:], dims=6, keep=0.9)
    run_dir = tmp_path / "member0"
    run_dir.mkdir()
    gate.save(run_dir / "out_of_scope.npz")
    manifest = _manifest({"a": "val", "b": "train"}).assign(label="NV")
    fake = SimpleNamespace(run_dir=run_dir, run=SimpleNamespace(manifest=manifest))
    model = build_ensemble(members, [None, 2.0])
    given = member_gate([fake, fake], model)
    pooled = keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output).predict(images, verbose=0)
    np.testing.assert_allclose(given.gate.score(pooled), gate.score(features), rtol=1e-4)
    assert given.gate.threshold == gate.threshold and list(given.val_rows["image_id"]) == ["a"]


# --- with two trained debug members ----------------------------------------------------------------------------


def with_data_statistics(run_dir: Path) -> None:
    """Set the checkpoint's BatchNorm statistics from its train images (momentum 0) and save it back.

    Two debug steps per epoch leave a from-scratch backbone's moving
    statistics far from the data: the checkpoint answers 1/8 for every class
    on every image, and any equality between models would hold vacuously.
    With statistics from real images its answers differ from image to image.
    """
    run = load_run(run_dir)
    model = load_keras(run_dir / BEST, compile=False)
    for layer in model.layers:
        for inner in layer.layers if isinstance(layer, keras.Model) else [layer]:
            if isinstance(inner, keras.layers.BatchNormalization):
                inner.momentum = 0.0
        layer.trainable = True
    train = run.manifest[run.manifest["split"] == "train"]
    model(load_images(train, int(run.cfg.model.image_size), run.cache).astype(np.float32), training=True)
    model.save(run_dir / BEST)


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two finished debug runs (seeds 1 and 2, one split), with input-dependent checkpoints and the temperatures
    ``TEMPERATURES`` in their calibration.json; the first has an out-of-scope gate, both an MLflow run."""
    from dermascan.train import train

    root = tmp_path_factory.mktemp("ensemble_members")
    dirs = []
    for seed, temperature in zip((1, 2), TEMPERATURES):
        run_dir = root / "runs" / "train" / f"seed{seed}"
        cfg = debug_config(root, f"seed={seed}", f"run_dir={run_dir}", "tracking.log_model=false",
                           "evaluate.bootstrap_resamples=20", f"evaluate.out_of_scope.enabled={seed == 1}")
        train(cfg)
        with_data_statistics(run_dir)
        (run_dir / CALIBRATION).write_text(json.dumps({"temperature": temperature, "fitted_on": "test fixture"}))
        dirs.append(run_dir)
    return dirs


def ensemble_cfg(root: Path, *overrides: str):
    values = [f"paths.runs_dir={root / 'runs'}", "export.latency_runs=0", "export.parity_samples=16",
              "export.bootstrap_resamples=50", *overrides]
    return compose("ensemble", EnsembleConfig, values), values


def calibrated_members(dirs: list[Path], rows: pd.DataFrame) -> list[np.ndarray]:
    """Each member's own probabilities of ``rows``, with its calibration.json temperature."""
    out = []
    for run_dir in dirs:
        run = load_run(run_dir)
        images = load_images(rows, int(run.cfg.model.image_size), run.cache).astype(np.float32)
        temperature = json.loads((run_dir / CALIBRATION).read_text())["temperature"]
        out.append(apply_temperature(run.model().predict(images, verbose=0), temperature))
    return out


@pytest.fixture(scope="module")
def seeds(members):
    """The ensemble of the two seeds (shared val), tracked in the members' MLflow store; no export (as the
    members: the k-fold ensemble exports)."""
    root = members[0].parents[2]
    cfg, overrides = ensemble_cfg(root, f"run_dirs=[{members[0]},{members[1]}]", f"out_dir={root / 'seeds'}",
                                     "evaluate.out_of_scope.enabled=false", "evaluate.min_calibration_images=5")
    return ensemble(cfg, overrides), root / "seeds"


@pytest.mark.integration
def test_seed_ensemble_predicts_the_mean_of_its_calibrated_members(members, seeds):
    result, out_dir = seeds
    run = load_run(out_dir)  # a run dir as python -m dermascan.evaluate / export and the notebook open it
    test = run.manifest[run.manifest["split"] == "test"].reset_index(drop=True)
    own = calibrated_members(members, test)
    expected = np.mean(own, axis=0)
    assert np.abs(own[0] - own[1]).max() > 1e-3 and expected.std(axis=0).max() > 1e-3  # not a vacuous equality
    images = load_images(test, int(run.cfg.model.image_size), run.cache).astype(np.float32)
    np.testing.assert_allclose(run.model().predict(images, verbose=0), expected, atol=1e-5)
    # predictions.csv: that mean, with the ensemble's own temperature when val gave one
    temperature = result["calibration"]["temperature"]
    headline = expected if temperature is None else apply_temperature(expected, temperature)
    written = pd.read_csv(out_dir / "predictions.csv").set_index("image").loc[test["image_id"]]
    np.testing.assert_allclose(written.to_numpy(), headline, atol=2e-6)


@pytest.mark.integration
def test_seed_ensemble_fits_on_the_shared_val_and_reports_members_side_by_side(members, seeds):
    result, out_dir = seeds
    info = result["ensemble"]
    member_val = (load_run(members[0]).manifest["split"] == "val").sum()
    assert info["val_rule"]["mode"] == SHARED and info["val_rule"]["val_images"] == member_val
    assert result["val"]["n"] == member_val
    assert "fitted on val" in result["calibration"].get("fitted_on", "") or "skipped" in result["calibration"]
    assert result["referral"]["chosen_on"].startswith(f"val, {member_val} images")
    report = (out_dir / "report.md").read_text()
    assert report.startswith("# Ensemble of 2 runs") and "# Evaluation report: test split" in report
    for i, run_dir in enumerate(members):
        theirs = json.loads((run_dir / METRICS).read_text())["test"]["balanced_accuracy"]
        row = next(line for line in report.splitlines() if line.startswith(f"| member {i}: `{run_dir.name}`"))
        assert f"| {TEMPERATURES[i]:.3f} |" in row and f"| {theirs:.3f}" in row
        assert info["members"][i]["test"]["balanced_accuracy"] == theirs
    ensemble_row = next(line for line in report.splitlines() if line.startswith("| **ensemble** |"))
    assert f"| {result['test']['balanced_accuracy']:.3f}" in ensemble_row
    summary = json.loads((out_dir / SUMMARY).read_text())
    assert summary["test"]["balanced_accuracy"] == result["test"]["balanced_accuracy"]
    assert json.loads((out_dir / METRICS).read_text())["ensemble"]["members"][1]["run_dir"] == str(members[1])


@pytest.mark.integration
def test_seed_ensemble_is_one_mlflow_run_tagged_with_its_members(members, seeds):
    import mlflow

    _, out_dir = seeds
    cfg = load_run(out_dir).cfg
    run = mlflow.MlflowClient(cfg.tracking.uri).get_run((out_dir / MLFLOW_RUN_ID).read_text().strip())
    ids = [(d / MLFLOW_RUN_ID).read_text().strip() for d in members]
    assert run.data.tags["stage"] == "ensemble" and run.data.tags["ensemble_val_rule"] == SHARED
    assert run.data.tags["ensemble_members"] == ",".join(ids)
    assert run.data.tags["ensemble_member_run_dirs"] == ",".join(str(d.resolve()) for d in members)
    assert "final_test_balanced_accuracy" in run.data.metrics


@pytest.mark.integration
def test_a_member_listed_twice_gives_its_own_calibrated_predictions(members):
    run = load_run(members[0])
    rows = run.manifest.head(12)
    model = build_ensemble([run.model(), load_run(members[0]).model()], [TEMPERATURES[0]] * 2)
    images = load_images(rows, int(run.cfg.model.image_size), run.cache).astype(np.float32)
    np.testing.assert_allclose(model.predict(images, verbose=0), calibrated_members([members[0]], rows)[0], atol=1e-6)


def fake_folds(members: list[Path], root: Path) -> list[Path]:
    """The two members as 2 folds: the same test split, and outside it each one's val is the other's train."""
    folds = []
    for i, run_dir in enumerate(members):
        fold = root / f"fold{i}"
        shutil.copytree(run_dir, fold)
        manifest = pd.read_csv(fold / "manifest.csv")
        rest = np.flatnonzero(manifest["split"] != "test")
        manifest.loc[rest, "split"] = np.where(np.arange(len(rest)) % 2 == i, "val", "train")
        manifest.to_csv(fold / "manifest.csv", index=False)
        folds.append(fold)
    return folds


@pytest.fixture(scope="module")
def kfold(members):
    root = members[0].parents[2]
    folds = fake_folds(members, root / "folds")
    cfg, overrides = ensemble_cfg(root, f"run_dirs=[{folds[0]},{folds[1]}]", f"out_dir={root / 'kfold'}",
                                     "log_to_mlflow=false", "export.enabled=true")  # the members did not export
    return ensemble(cfg, overrides), root / "kfold", folds


@pytest.mark.slow  # the k-fold ensemble with its export (~70 s): out of the default run's budget
@pytest.mark.integration
def test_kfold_ensemble_fits_nothing_on_images_a_member_trained_on(kfold):
    result, out_dir, folds = kfold
    manifest = load_run(out_dir).manifest
    assert not (manifest["split"] == "val").any()  # every image outside test trained one of the folds
    assert result["ensemble"]["val_rule"]["mode"] == OUT_OF_FOLD and "val" not in result
    assert result["calibration"]["temperature"] is None and "unseen by every member" in result["calibration"]["skipped"]
    assert json.loads((out_dir / CALIBRATION).read_text())["temperature"] is None

    # the referral threshold: chosen on the out-of-fold probabilities, each image scored by the fold that held it out
    rows, scores = [], []
    for fold in folds:
        own = load_run(fold).manifest
        val = own[own["split"] == "val"].reset_index(drop=True)
        rows.append(val)
        scores.append(calibrated_members([fold], val)[0])
    rows, probabilities = pd.concat(rows), np.concatenate(scores)
    codes = result["referral"]["classes"]
    needs = needs_referral(rows["label"], codes)
    threshold = choose_threshold(probabilities[:, class_indices(codes)].sum(axis=1), needs,
                                 result["referral"]["target_sensitivity"])
    assert result["referral"]["threshold"] == pytest.approx(threshold, abs=1e-6)
    assert result["referral"]["val"]["n"] == len(rows) and "out-of-fold" in result["referral"]["chosen_on"]
    oof = result["ensemble"]["out_of_fold"]
    assert oof["n"] == len(rows)

    # the gate: fold 0's own, scoring the test images exactly as it does in fold 0
    gate = load_gate(folds[0] / "out_of_scope.npz")
    assert result["out_of_scope"]["threshold"] == gate.threshold and "member 0's own gate" in result["out_of_scope"]["fitted_on"]
    run = load_run(folds[0])
    model = run.model()
    test = run.manifest[run.manifest["split"] == "test"].reset_index(drop=True)
    pooled = keras.Model(model.inputs, model.get_layer(FEATURES_LAYER).output).predict(
        load_images(test, int(run.cfg.model.image_size), run.cache).astype(np.float32), verbose=0)
    table = pd.read_csv(out_dir / "out_of_scope_scores.csv")
    written = table[table["set"] == "test"].set_index("image").loc[test["image_id"], "score"].to_numpy()
    np.testing.assert_allclose(written, gate.score(pooled), rtol=1e-4)
    assert "Out-of-fold (" in (out_dir / "report.md").read_text()


@pytest.mark.slow  # the k-fold ensemble with its export (~70 s): out of the default run's budget
@pytest.mark.integration
def test_kfold_ensemble_exports_passes_fp32_parity_and_is_served(kfold):
    from dermascan.checksums import verify_manifest
    from dermascan.serve.model import load_model

    result, out_dir, _ = kfold
    export = out_dir / "export"
    assert verify_manifest(export) > 5
    parity = json.loads((export / "parity.json").read_text())
    fp32 = parity["formats"]["tflite_fp32"]
    assert fp32["kept"] and not fp32["refused"] and fp32["top1_agreement"] == 1.0
    labels = json.loads((export / "labels.json").read_text())
    assert labels["referral"]["threshold"] == result["referral"]["threshold"]
    assert labels["out_of_scope"]["threshold"] == result["out_of_scope"]["threshold"]
    assert "Ensemble:" in (export / "model_card.md").read_text()

    run = load_run(out_dir)
    test = run.manifest[run.manifest["split"] == "test"].reset_index(drop=True)
    pixels = load_images(test, int(run.cfg.model.image_size), run.cache)
    reference = keras.models.load_model(export / "model.keras", compile=False).predict(pixels.astype(np.float32),
                                                                                       verbose=0)
    for runtime in ("tflite", "savedmodel"):
        served = load_model(export, runtime)
        assert served.gate is not None and served.referral is not None
        outputs = served.predict(pixels)
        np.testing.assert_allclose(outputs["probabilities"], reference["probabilities"], atol=1e-4)
        np.testing.assert_allclose(outputs["out_of_scope"], reference["out_of_scope"], rtol=1e-4)


@pytest.mark.integration
def test_members_that_do_not_match_are_refused_naming_the_difference(members, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(members[1], other)
    config = (other / CONFIG).read_text()
    (other / CONFIG).write_text(config.replace("image_size: 32", "image_size: 64"))
    cfg, overrides = ensemble_cfg(tmp_path, f"run_dirs=[{members[0]},{other}]", f"out_dir={tmp_path / 'out'}")
    with pytest.raises(ConfigError, match="members differ in model.image_size: 32 in .*, 64 in .*other"):
        ensemble(cfg, overrides)

    (other / CONFIG).write_text(config)
    manifest = pd.read_csv(other / "manifest.csv")
    manifest.loc[manifest.index[manifest["split"] == "test"][:2], "split"] = "train"
    manifest.to_csv(other / "manifest.csv", index=False)
    with pytest.raises(DataError, match="test splits differ: .* 2 in only one of them"):
        ensemble(cfg, overrides)
    assert not (tmp_path / "out" / BEST).exists()


@pytest.mark.integration
def test_the_command_line_refuses_a_single_member_with_exit_2(members, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dermascan.ensemble", f"run_dirs=[{members[0]}]", f"out_dir={tmp_path / 'out'}",
         f"paths.runs_dir={tmp_path}"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )
    assert result.returncode == 2, (result.stdout + result.stderr)[-2000:]
    assert "an ensemble needs at least 2 finished runs, got 1" in result.stdout + result.stderr
