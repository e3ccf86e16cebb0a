"""The out-of-scope gate's evaluation (issue 15): the offline sets, the figures, the gate against its layer,
and the gate in metrics.json, report.md, plots/, MLflow and the run dir."""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from dermascan.config import EvaluateRunConfig, RunConfig
from dermascan.errors import ConfigError
from dermascan.evaluation import ood
from dermascan.evaluation.report import render_report
from dermascan.modeling.ood import OutOfScopeScore, fit_gate, load_gate
from dermascan.tracking import decision_metrics, out_of_scope_metrics

from .conftest import compose_config

CACHE = {"size": 32, "method": "bilinear", "quality": 95, "workers": 2}


@pytest.fixture
def offline(monkeypatch):
    """No network: any connection attempt fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the out-of-scope sets must load without a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# --- the sets ---------------------------------------------------------------------------


def test_to_rgb_uint8_takes_grey_bool_rgba_and_float_images():
    grey = np.array([[0, 128], [255, 7]], np.uint8)
    assert (ood.to_rgb_uint8(grey) == np.repeat(grey[..., None], 3, -1)).all()
    blobs = np.array([[True, False]])
    assert ood.to_rgb_uint8(blobs).tolist() == [[[255, 255, 255], [0, 0, 0]]]
    unit = np.array([[0.0, 1.0]])
    assert ood.to_rgb_uint8(unit).tolist() == [[[0, 0, 0], [255, 255, 255]]]
    # RGBA over white: transparent is white, opaque keeps its colour
    rgba = np.array([[[200, 10, 10, 0], [200, 10, 10, 255]]], np.uint8)
    assert ood.to_rgb_uint8(rgba).tolist() == [[[255, 255, 255], [200, 10, 10]]]
    for image in (grey, blobs, unit, rgba):
        out = ood.to_rgb_uint8(image)
        assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 3


def test_skimage_set_loads_offline_as_rgb_uint8_and_is_the_same_every_time(offline):
    images = ood.skimage_images()
    assert list(images) == list(ood.SKIMAGE_NAMES) and len(images) == 25
    for name, image in images.items():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, name
        assert min(image.shape[:2]) >= 100, name
    again = ood.skimage_images()
    assert all(np.array_equal(images[name], again[name]) for name in images)
    assert images["logo"].shape == (500, 500, 3)  # RGBA converted
    assert images["binary_blobs"].max() == 255 and images["shepp_logan_phantom"].max() == 255  # bool and float scaled


def test_synthetic_set_is_seeded_and_covers_each_kind():
    images = ood.synthetic_images(0)
    assert np.array_equal(images["noise_colour"], ood.synthetic_images(0)["noise_colour"])
    assert all(np.array_equal(images[n], ood.synthetic_images(0)[n]) for n in images)
    assert not np.array_equal(images["noise_colour"], ood.synthetic_images(1)["noise_colour"])
    for name, image in images.items():
        assert image.shape == (*ood.SYNTHETIC_SHAPE, 3) and image.dtype == np.uint8, name
    for kind in ("flat_black", "flat_white", "flat_skin_light", "flat_skin_medium", "flat_skin_dark", "noise_",
                 "gradient_", "text_", "ui_"):
        assert any(name.startswith(kind) for name in images), kind
    assert (images["flat_black"] == 0).all() and (images["flat_white"] == 255).all()
    # text and the screenshots hold drawn strokes: both ink and paper
    for name in ("text_black_on_white", "ui_light", "ui_dark"):
        assert len(np.unique(images[name].reshape(-1, 3), axis=0)) > 20, name


def test_sets_go_through_evaluations_resize_and_cache(tmp_path):
    """as_evaluated: PIL's resize with the cache's method, the JPEG cache, the pipeline's decode; the run's cache is untouched."""
    from dermascan.data.cache import resize_image

    images = {name: ood.synthetic_images(0)[name] for name in ("gradient_colour_diagonal", "ui_light")}
    cache = {**CACHE, "dir": str(tmp_path / "runs_cache")}
    got = ood.as_evaluated(images, 32, cache)
    assert got.names == list(images) and got.images.shape == (2, 32, 32, 3) and got.images.dtype == np.uint8
    assert not (tmp_path / "runs_cache").exists()
    for name, image in zip(got.names, got.images):
        path = tmp_path / f"{name}.png"
        Image.fromarray(images[name]).save(path)
        expected = np.asarray(resize_image(path, 32, "bilinear"), np.float64)
        assert np.abs(image.astype(np.float64) - expected).mean() < 3, name  # the JPEG's loss only


def test_corruptions_keep_shape_and_do_what_they_say():
    rng = np.random.default_rng(0)
    images = rng.integers(40, 200, (3, 48, 48, 3), dtype=np.uint8)
    corrupted = ood.corrupt(images, "bilinear")
    assert list(corrupted) == list(ood.CORRUPTIONS)
    for name, batch in corrupted.items():
        assert batch.shape == images.shape and batch.dtype == np.uint8, name
    assert corrupted["blur"].std() < images.std() / 3  # noise averaged away
    rotated = corrupted["rotated"]
    assert (rotated[:, :6] == 0).all() and (rotated[:, :, -6:] == 0).all()  # a black frame of 1/6 of the side
    assert rotated[:, 16:32, 16:32].mean() > 60
    assert (corrupted["overexposed"] >= images).all() and (corrupted["overexposed"] == 255).mean() > 0.5
    assert (corrupted["underexposed"] <= images).all() and corrupted["underexposed"].max() <= 200 / 8 + 1
    assert all(len(v) == 0 for v in ood.corrupt(images[:0], "bilinear").values())


# --- the figures ----------------------------------------------------------------------------


def test_auroc_fpr_and_rejected_by_hand():
    inside = np.arange(1, 21, dtype=float)  # 1 .. 20
    outside = np.array([0.5, 19.0, 19.5, 25.0])
    # AUROC: the share of (out, in) pairs with out scored higher; ties count half.
    # 0.5 beats none; 19 beats 18 and ties 19 (18.5); 19.5 beats 19; 25 beats 20: (0 + 18.5 + 19 + 20) / 80
    assert ood.auroc(inside, outside) == pytest.approx(57.5 / 80)
    # keeping 95% of the 20 in-distribution images (19 of them) means a threshold of 19:
    # 0.5 and 19 are let through, 19.5 and 25 are not
    assert ood.fpr_at_tpr(inside, outside, 0.95) == pytest.approx(0.5)
    assert ood.fpr_at_tpr(inside, outside, 1.0) == pytest.approx(0.75)  # threshold 20: 19.5 gets through too
    assert ood.rejected_share(outside, 19.0) == pytest.approx(0.5)  # score > threshold is rejected
    assert ood.set_figures(inside, outside, 19.0) == {
        "n": 4, "auroc": pytest.approx(57.5 / 80), "fpr_at_95_tpr": pytest.approx(0.5), "rejected": 0.5}
    # perfect separation, and nothing to compare
    assert ood.auroc([1, 2], [3, 4]) == 1.0 and ood.fpr_at_tpr([1, 2], [3, 4]) == 0.0
    assert ood.auroc([], [1.0]) is None and ood.fpr_at_tpr([1.0], []) is None and ood.rejected_share([], 1) is None


def test_score_table_marks_rejections_above_the_threshold():
    table = ood.score_table({"test": (["a", "b"], np.array([0.5, 2.0])), "skimage": (["cat"], np.array([3.0]))}, 1.0)
    assert list(table.columns) == ["set", "image", "score", "rejected"]
    assert table["rejected"].tolist() == [False, True, True] and table["set"].tolist() == ["test", "test", "skimage"]


def test_fitted_gate_scores_equal_its_keras_layer():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 3, (4, 64))
    labels = rng.integers(0, 4, 600)
    train = means[labels] + rng.normal(0, 1, (600, 64)) * rng.uniform(0.2, 2, 64)
    val = means[rng.integers(0, 4, 200)] + rng.normal(0, 1, (200, 64))
    gate = fit_gate(train, labels, val, dims=16, keep=0.9)
    features = np.concatenate([val, rng.normal(0, 6, (50, 64))]).astype(np.float32)
    layer = OutOfScopeScore.of(gate)
    np.testing.assert_allclose(np.asarray(layer(features)), gate.score(features), rtol=1e-3, atol=1e-4)
    assert (gate.score(val) > gate.threshold).mean() == pytest.approx(0.1, abs=0.01)


def test_the_gate_settings_are_checked_at_start_up():
    cfg = compose_config("evaluate_run", [], EvaluateRunConfig).evaluate.out_of_scope
    assert (cfg.enabled, cfg.dims, cfg.keep, cfg.max_train_images) == (True, 256, 0.97, 4000)
    for override, message in (("evaluate.out_of_scope.keep=1.0", "keep must be in"),
                              ("evaluate.out_of_scope.keep=0", "keep must be in"),
                              ("evaluate.out_of_scope.dims=0", "dims must be >= 1"),
                              ("evaluate.out_of_scope.max_train_images=1", "max_train_images >= 2")):
        with pytest.raises(ConfigError, match=message):
            compose_config("train", ["run_dir=/r", override], RunConfig)


# --- in evaluation --------------------------------------------------------------------------


def made_up_out_of_scope() -> dict:
    figures = {"n": 25, "auroc": 0.99, "fpr_at_95_tpr": 0.04, "rejected": 0.96}
    return {
        "method": "Mahalanobis ...", "dims": 256, "keep": 0.95, "threshold": 2.1234, "n_train": 4000, "n_val": 900,
        "val_rejected": 0.05, "test_rejected": 0.043, "in_distribution": "test",
        "sets": {"skimage": figures, "synthetic": {**figures, "n": 20, "auroc": 0.97}},
        "corrupted": {name: {**figures, "n": 900, "rejected": 0.8} for name in ood.CORRUPTIONS},
        "corrupted_note": ood.CORRUPTED_NOTE,
    }


def test_report_and_mlflow_carry_the_gate(tmp_path):
    from .test_evaluate import evaluate_synthetic, synthetic_predicted

    gate = made_up_out_of_scope()
    flat = out_of_scope_metrics(gate)
    assert flat["out_of_scope_skimage_auroc"] == 0.99 and flat["out_of_scope_synthetic_auroc"] == 0.97
    assert flat["out_of_scope_skimage_fpr_at_95_tpr"] == 0.04 and flat["out_of_scope_test_rejected"] == 0.043
    assert flat["out_of_scope_corrupted_blur_rejected"] == 0.8 and flat["out_of_scope_threshold"] == 2.1234
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in flat) and all(isinstance(v, float) for v in flat.values())
    assert out_of_scope_metrics({"skipped": "why"}) == {} and out_of_scope_metrics(None) == {}
    assert "out_of_scope_skimage_auroc" in decision_metrics({"out_of_scope": gate})

    result, _ = evaluate_synthetic(synthetic_predicted(), tmp_path)
    result["out_of_scope"] = gate
    report = render_report(result)
    section = report[report.index("## Out of scope"):report.index("## Overall")]
    assert "above 2.1234" in section and "**4.3% of the test split's images are rejected**" in section
    assert "meets the target of at most 5%" in section
    assert "| skimage | scikit-image's sample images" in section and "| 0.990 | 0.040 | 96.0% |" in section
    assert "| blur | test images, heavy Gaussian blur | 900 |" in section and "high rejection share is good" in section
    assert report.index("## Referral") < report.index("## Out of scope") < report.index("## Overall")
    result["out_of_scope"] = {"skipped": "evaluate.out_of_scope.enabled is false"}
    assert "No out-of-scope gate: evaluate.out_of_scope.enabled is false." in render_report(result)


def test_the_gate_is_skipped_with_its_reason(tmp_path, caplog):
    from dermascan.evaluation.out_of_scope import evaluate_out_of_scope

    from .test_evaluate import synthetic_predicted

    predicted = synthetic_predicted(n_test=20, n_val=20)
    manifest = pd.concat([predicted.rows, predicted.val_rows], ignore_index=True)
    no_gap = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(8)])
    cfg = compose_config("evaluate_run", [], EvaluateRunConfig).evaluate
    result = evaluate_out_of_scope(no_gap, manifest, predicted.rows, cfg, 8, {}, 0, tmp_path)
    assert result == {"skipped": "the model has no 'gap' layer (pooled features) to fit the gate on"}
    assert "out-of-scope gate skipped" in caplog.text

    gap = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D(name="gap"), keras.layers.Dense(8)])
    result = evaluate_out_of_scope(gap, manifest, predicted.rows, cfg, 8, {}, 0, tmp_path)
    assert "the train split holds 0 image(s)" in result["skipped"]
    off = compose_config("evaluate_run", ["evaluate.out_of_scope.enabled=false"], EvaluateRunConfig).evaluate
    assert evaluate_out_of_scope(gap, manifest, predicted.rows, off, 8, {}, 0, tmp_path) == {
        "skipped": "evaluate.out_of_scope.enabled is false"}
    train = predicted.val_rows.assign(split="train")
    result = evaluate_out_of_scope(gap, pd.concat([predicted.rows, train]), predicted.rows, cfg, 8, {}, 0, tmp_path)
    assert result == {"skipped": "no val split with labelled images to choose the gate's threshold on"}
    assert not (tmp_path / "out_of_scope.npz").exists()


def test_histograms_plot(tmp_path):
    from dermascan.evaluation.plots import _out_of_scope_figure, out_of_scope_histograms

    rng = np.random.default_rng(0)
    scores = {"test": rng.gamma(4, 0.25, 300), "skimage": rng.normal(5, 1, 25), "blur": rng.normal(3, 0.5, 300)}
    path = out_of_scope_histograms(scores, "test", 2.0, tmp_path / "plots" / "out_of_scope.png")
    assert path.stat().st_size > 20_000
    fig = _out_of_scope_figure(scores, "test", 2.0)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles == [f"skimage: {(scores['skimage'] > 2).mean():.0%} rejected",
                      f"blur: {(scores['blur'] > 2).mean():.0%} rejected"]


@pytest.mark.integration
def test_debug_run_fits_saves_and_reports_the_gate(debug_run):
    """The demo path end to end: out_of_scope.npz in the run dir, metrics.json, report.md, the scores, the plot, MLflow."""
    from mlflow import MlflowClient

    from dermascan.evaluation.out_of_scope import features_model
    from dermascan.rundir import load_images, load_run

    cfg, metrics, artifacts = debug_run
    run_dir = Path(cfg.run_dir)
    result = json.loads((run_dir / "metrics.json").read_text())["out_of_scope"]
    assert "skipped" not in result, result
    assert {"method", "dims", "keep", "threshold", "n_train", "n_val", "val_rejected", "test_rejected", "sets",
            "corrupted"} <= set(result)
    assert list(result["sets"]) == ["skimage", "synthetic"] and list(result["corrupted"]) == list(ood.CORRUPTIONS)
    assert result["sets"]["skimage"]["n"] == 25 and result["sets"]["synthetic"]["n"] == 20
    for figures in (*result["sets"].values(), *result["corrupted"].values()):
        assert set(figures) == {"n", "auroc", "fpr_at_95_tpr", "rejected"}
        assert 0 <= figures["auroc"] <= 1 and 0 <= figures["rejected"] <= 1

    gate = load_gate(run_dir / "out_of_scope.npz")
    assert gate.threshold == pytest.approx(result["threshold"]) and gate.keep == 0.97
    run = load_run(run_dir)
    train = run.manifest[(run.manifest["split"] == "train") & run.manifest["label"].notna()]
    assert gate.n_train == result["n_train"] == min(len(train), 4000)
    # the saved scores are the gate's scores of the images as evaluation loads them
    scores = pd.read_csv(run_dir / "out_of_scope_scores.csv")
    test = scores[scores["set"] == "test"]
    rows = run.manifest.set_index("image_id").loc[test["image"]].reset_index()
    features = features_model(run.model()).predict(load_images(rows, 32, run.cache).astype(np.float32), verbose=0)
    np.testing.assert_allclose(gate.score(features), test["score"], rtol=1e-4, atol=1e-5)
    assert result["test_rejected"] == pytest.approx((test["score"] > gate.threshold).mean())
    assert set(scores["set"]) == {"test", "val", "skimage", "synthetic", *ood.CORRUPTIONS}

    report = (run_dir / "report.md").read_text()
    assert "## Out of scope" in report and f"above {result['threshold']:.4f}" in report
    assert (run_dir / "plots" / "out_of_scope.png").stat().st_size > 20_000
    client = MlflowClient(cfg.tracking.uri)
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("dermascan").experiment_id])
    assert mlflow_run.data.metrics["out_of_scope_skimage_auroc"] == pytest.approx(result["sets"]["skimage"]["auroc"])
    assert mlflow_run.data.metrics["out_of_scope_test_rejected"] == pytest.approx(result["test_rejected"])


def test_the_model_card_states_the_gate_and_its_measured_rates():
    from dermascan.evaluation.card import out_of_scope_card_section

    figures = {"n": 25, "auroc": 0.997, "fpr_at_95_tpr": 0.0, "rejected": 1.0}
    metrics = {"out_of_scope": {"threshold": 2.4198, "method": "Mahalanobis", "val_rejected": 0.03,
                                "test_rejected": 0.047, "in_distribution": "test", "sets": {"skimage": figures},
                                "corrupted": {"blur": {"n": 900, "auroc": None, "fpr_at_95_tpr": None, "rejected": None}}}}
    text = "\n".join(out_of_scope_card_section(metrics))
    assert "Out of scope when the score is > 2.4198" in text and "3.0% of val" in text and "4.7% of test" in text
    assert "| skimage | 25 | 0.997 | 0.000 | 100.0% |" in text and "| blur |" not in text  # undefined AUROC: no row
    assert "answers every image" in "\n".join(out_of_scope_card_section({"out_of_scope": {"skipped": "disabled"}}))
    assert out_of_scope_card_section({}) == []
