"""Evaluation: TTA views, ISIC 2018 scoring, the report's names, re-evaluation of an exported model."""

from __future__ import annotations

import json
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from dermascan.classes import CODES
from dermascan.config import EvaluateRunConfig
from dermascan.evaluate import (
    TTA,
    choose_temperature,
    evaluate_main_task,
    predict,
    score,
    score_isic2018,
)
from dermascan.evaluation.calibration import apply_temperature
from dermascan.evaluation.metrics import (
    CODES_2018,
    classification_metrics,
    expected_calibration_error,
    to_isic2018,
)
from dermascan.evaluation.report import render_report
from dermascan.rundir import load_images

from .conftest import compose_config


@pytest.fixture(scope="module")
def tiny_model():
    """A small model that is not symmetric under flips and rotations, so every TTA view counts."""
    init = keras.initializers.RandomNormal(stddev=0.05, seed=0)
    return keras.Sequential([
        keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
        keras.layers.Conv2D(4, 3, kernel_initializer=init), keras.layers.Flatten(),
        keras.layers.Dense(8, activation="softmax", kernel_initializer=init),
    ])


def sample_frame(jpegs: list[Path], n: int) -> pd.DataFrame:
    return pd.DataFrame({"image_id": [p.stem for p in jpegs[:n]], "path": [str(p) for p in jpegs[:n]],
                         "label": ["NV"] * n})


@pytest.mark.integration
def test_tta_averages_the_flipped_and_rotated_views(tiny_model, sample_jpegs, tmp_path):
    frame = sample_frame(sample_jpegs, 6)
    cache = {"dir": str(tmp_path / "cache"), "size": 32, "method": "bilinear", "quality": 95, "workers": 2}
    images = load_images(frame, 32, cache).astype(np.float32)
    views = {
        "none": [images],
        "flips": [images, images[:, :, ::-1], images[:, ::-1], images[:, ::-1, ::-1]],
        "flips_rot90": [np.rot90(v, k, axes=(1, 2)) for k in range(4) for v in (images, images[:, :, ::-1])],
    }
    for name, arrays in views.items():
        expected = np.mean([tiny_model.predict(np.ascontiguousarray(a), verbose=0) for a in arrays], axis=0)
        got = predict(tiny_model, frame, 32, 4, cache, tta=name)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=name)
        assert len(TTA[name]) == len(arrays)
    # the views differ, so TTA changes the probabilities of a model that is not symmetric
    assert np.abs(predict(tiny_model, frame, 32, 4, cache, "flips") - predict(tiny_model, frame, 32, 4, cache)).max() > 1e-6
    with pytest.raises(ValueError, match="unknown evaluate.tta"):
        predict(tiny_model, frame, 32, 4, cache, tta="mirror")


def test_isic2018_test_images_are_scored_in_the_7_class_scheme_with_their_2018_labels():
    rng = np.random.default_rng(0)
    n = 60
    probabilities = rng.dirichlet(np.ones(8), n)
    labels_2018 = np.array(CODES_2018)[rng.integers(0, 7, n)]
    frame = pd.DataFrame({
        "image_id": [f"ISIC_{i:07d}" for i in range(n)],
        # AKIEC images have no 8-class label; the other 2018 labels map one to one
        "label": [None if c == "AKIEC" else c for c in labels_2018],
        "label_2018": labels_2018,
        "source": ["isic2018_test"] * 50 + ["isic2019_train"] * 10,
    })
    result = score_isic2018(frame, probabilities, n_resamples=50, seed=0)
    truth = pd.Series(labels_2018[:50]).map({c: i for i, c in enumerate(CODES_2018)}).to_numpy()
    expected = classification_metrics(truth, to_isic2018(probabilities[:50]), classes=CODES_2018)
    assert result["n"] == 50 and result["classes"] == list(CODES_2018)
    assert result["balanced_accuracy"] == pytest.approx(expected["balanced_accuracy"])
    assert result["per_class"]["AKIEC"]["auc"] == pytest.approx(expected["per_class"]["AKIEC"]["auc"])
    np.testing.assert_allclose(to_isic2018(probabilities)[:, 3], probabilities[:, 0] + probabilities[:, 6])
    assert score_isic2018(frame.assign(source="isic2019_train"), probabilities, 0, 0) is None


def test_report_names_top1_accuracy_and_keras_binary_accuracy_apart():
    """The reference's trap: on imbalanced 8-class data binary accuracy looks high; the report says which is which."""
    rng = np.random.default_rng(1)
    truth = rng.choice(8, 1000, p=[0.04, 0.1, 0.1, 0.01, 0.18, 0.5, 0.03, 0.04])
    probabilities = rng.dirichlet(np.ones(8) * 0.7, 1000)
    probabilities[np.arange(1000), truth] += rng.uniform(0, 0.6, 1000)
    probabilities /= probabilities.sum(1, keepdims=True)
    labels = pd.Series(np.array(CODES)[truth])
    metrics = score(labels, probabilities, n_resamples=100, seed=0, n_bins=15)
    assert metrics["keras_binary_accuracy"] > metrics["top1_accuracy"] + 0.2
    report = render_report({"split": "test", "tta": "none", "calibration": {"temperature": None}, "test": metrics})
    rows = {line.split("|")[1].strip(): line for line in report.splitlines() if line.startswith("| ")}
    assert f"| {metrics['top1_accuracy']:.3f} |" in rows["top-1 accuracy (argmax right)"]
    binary_row = rows["Keras `binary_accuracy` (one-vs-rest cells at 0.5; **not** accuracy)"]
    assert f"| {metrics['keras_binary_accuracy']:.3f} |" in binary_row
    balanced = rows["**balanced accuracy** (mean per-class recall; the official ISIC metric)"]
    assert f"**{metrics['balanced_accuracy']:.3f}**" in balanced
    low, high = metrics["ci"]["balanced_accuracy"]["low"], metrics["ci"]["balanced_accuracy"]["high"]
    assert f"{low:.3f} - {high:.3f}" in balanced and low <= metrics["balanced_accuracy"] <= high
    reference = rows["reference (published)"]
    assert "0.914" in reference and "0.946" in reference
    assert "cannot be top-1 accuracy" in report
    assert report.index("balanced accuracy") < report.index("top-1 accuracy")  # the official metric leads


@pytest.mark.integration
def test_exported_model_plus_manifest_reevaluates_with_and_without_tta(debug_run, tmp_path):
    cfg, _, _ = debug_run
    run_dir = Path(cfg.run_dir)
    eval_cfg = compose_config("evaluate_run", [
        f"export_dir={run_dir / 'export'}", f"manifest={run_dir / 'manifest.csv'}", f"out_dir={tmp_path / 'eval'}",
        f"cache.dir={cfg.data.cache.dir}", f"cache.size={cfg.data.cache.size}", "evaluate.tta=flips",
        "evaluate.bootstrap_resamples=200",
    ], EvaluateRunConfig)
    result = evaluate_main_task(eval_cfg)
    original = json.loads((run_dir / "metrics.json").read_text())["test"]
    # the debug run's val split is too small for a temperature, so the export equals the checkpoint
    assert result["test_no_tta"]["balanced_accuracy"] == pytest.approx(original["balanced_accuracy"])
    assert result["test_no_tta"]["confusion_matrix"] == original["confusion_matrix"]
    assert result["tta"] == "flips" and result["test"]["n"] == original["n"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "with TTA `flips`" in report and "without TTA" in report
    predictions = pd.read_csv(tmp_path / "eval" / "predictions.csv")
    assert list(predictions.columns) == ["image", *CODES, "label"] and len(predictions) == original["n"]


def test_evaluate_cli_needs_a_run_or_an_export_and_manifest():
    from dermascan.errors import ConfigError

    with pytest.raises(ConfigError, match="give run_dir"):
        evaluate_main_task(compose_config("evaluate_run", [], EvaluateRunConfig))


def test_a_temperature_is_only_used_when_val_can_identify_it():
    rng = np.random.default_rng(3)
    n = 400
    truth = rng.integers(0, 8, n)
    logits = rng.normal(0, 1, (n, 8))
    logits[np.arange(n), truth] += 1.5
    overconfident = np.exp(4 * logits) / np.exp(4 * logits).sum(1, keepdims=True)
    labels = pd.Series(np.array(CODES)[truth])
    fitted, why = choose_temperature(overconfident, labels, min_images=50)
    assert fitted > 2 and "fitted on val" in why  # over-confident: T > 1 softens
    truth_idx = labels.map({c: i for i, c in enumerate(CODES)}).to_numpy()
    after = apply_temperature(overconfident, fitted)
    assert expected_calibration_error(truth_idx, after) < expected_calibration_error(truth_idx, overconfident) / 2
    # every val image right: NLL falls all the way to the bound, which must not be applied
    perfect = np.full((n, 8), 0.02)
    perfect[np.arange(n), truth] = 0.86
    assert choose_temperature(perfect, labels, 50) == (None, "the model gets every val image right, so no temperature can be fitted")
    assert choose_temperature(overconfident[:20], labels[:20], 50)[0] is None
