"""Evaluation: TTA views, ISIC 2018 scoring, the report's names, re-evaluation of an exported model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from dermascan.classes import CODES, INDEX
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
    assert list(predictions.columns) == ["image", *CODES] and len(predictions) == original["n"]
    truth = pd.read_csv(tmp_path / "eval" / "ground_truth.csv")
    assert list(truth["image"]) == list(predictions["image"])
    # the exported model's gap layer gets its own gate, written with the re-evaluation, not into the export
    assert (tmp_path / "eval" / "out_of_scope.npz").is_file() and "threshold" in result["out_of_scope"]
    assert not (run_dir / "export" / "out_of_scope.npz").exists()


@pytest.mark.integration
def test_reevaluating_a_run_writes_its_gate_beside_the_results_and_leaves_the_runs_alone(debug_run, tmp_path):
    cfg, _, _ = debug_run
    run_dir = Path(cfg.run_dir)
    before = (run_dir / "out_of_scope.npz").read_bytes()
    eval_cfg = compose_config("evaluate_run", [f"run_dir={run_dir}", f"out_dir={tmp_path / 'eval'}",
                                               "log_to_mlflow=false", "evaluate.bootstrap_resamples=0"],
                              EvaluateRunConfig)
    result = evaluate_main_task(eval_cfg)
    assert (run_dir / "out_of_scope.npz").read_bytes() == before
    saved = json.loads((run_dir / "metrics.json").read_text())["out_of_scope"]
    # the same images, model and seeded train sample: the same gate
    assert result["out_of_scope"]["threshold"] == pytest.approx(saved["threshold"], rel=1e-5)
    assert (tmp_path / "eval" / "out_of_scope.npz").is_file() and (tmp_path / "eval" / "out_of_scope_scores.csv").is_file()
    assert (tmp_path / "eval" / "plots" / "out_of_scope.png").is_file()


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


# --- issue 14: the ISIC layout, the referral operating point, the subgroups ---------------------


def synthetic_predicted(n_test: int = 300, n_val: int = 300, seed: int = 0, official: bool = False):
    """A ``Predicted`` of a made-up model on made-up manifests: no model, no images."""
    from dermascan.evaluate import Predicted

    rng = np.random.default_rng(seed)

    def rows(n, split):
        labels = rng.choice(CODES, n, p=[0.05, 0.1, 0.15, 0.03, 0.15, 0.45, 0.04, 0.03]).astype(object)
        frame = pd.DataFrame({
            "image_id": [f"ISIC_{split[0]}{i:06d}" for i in range(n)], "path": "", "label": labels,
            "source": "isic2019_train", "lesion_id": rng.choice(["HAM_0000001", "BCN_0000001", None], n),
            "age": rng.choice([np.nan, 20.0, 40.0, 60.0, 80.0], n), "sex": rng.choice(["male", "female"], n),
            "site": rng.choice(["head/neck", "lower extremity", "anterior torso"], n), "split": split,
            "label_2018": None,
        })
        if official:  # ten ISIC 2018 Test images, two of them AKIEC without an 8-class label
            frame.loc[:9, "source"] = "isic2018_test"
            frame.loc[:9, "label_2018"] = ["AKIEC", "AKIEC", "MEL", "NV", "NV", "BCC", "BKL", "DF", "VASC", "NV"]
            frame.loc[:1, "label"] = None
            frame.loc[2:9, "label"] = ["MEL", "NV", "NV", "BCC", "BKL", "DF", "VASC", "NV"]
        return frame

    def probabilities(frame):
        truth = frame["label"].map(INDEX).fillna(0).to_numpy(int)
        logits = rng.normal(0, 1, (len(frame), 8))
        logits[np.arange(len(frame)), truth] += 2.0
        p = np.exp(logits)
        return p / p.sum(1, keepdims=True)

    test, val = rows(n_test, "test"), rows(n_val, "val")
    pt, pv = probabilities(test), probabilities(val)
    calibration = {"temperature": 1.3, "fitted_on": f"fitted on val ({n_val} images)"}
    return Predicted(test, val, pt, pt, pv, 1.3, 1.3, calibration, True)


def evaluate_synthetic(predicted, tmp_path, *overrides, official=False):
    from dermascan.evaluate import (
        score_all,
        score_referral,
        score_subgroups,
        write_plots,
    )

    cfg = compose_config("evaluate_run", ["evaluate.bootstrap_resamples=200", *overrides], EvaluateRunConfig).evaluate
    result = score_all(predicted, cfg, 0, official, tmp_path)
    result["referral"], scores = score_referral(predicted, cfg, 0)
    result["subgroups"] = score_subgroups(predicted, result["referral"], scores, cfg, 0)
    write_plots(predicted, result, cfg, tmp_path / "plots", scores)
    return result, scores


def test_predictions_csv_is_exactly_the_isic_submission_and_the_truth_a_separate_official_file(tmp_path):
    """The official scorer refuses any column besides image and the classes; it also needs a truth file with
    the same images. isic-challenge-scoring is not installed here (it needs pandas < 2.2, see
    scripts/isic_scoring_goldens.py), so the layout is checked against the official files' headers."""
    from dermascan.evaluation.scoring import labels

    predicted = synthetic_predicted(official=True)
    evaluate_synthetic(predicted, tmp_path, official=True)
    official_2019 = pd.read_csv(Path(__file__).parent / "fixtures" / "isic_scoring" / "isic2019_truth.csv", nrows=1)

    for predictions_name, truth_name, columns in (("predictions.csv", "ground_truth.csv", list(CODES)),
                                                  ("predictions_isic2018.csv", "ground_truth_isic2018.csv", list(CODES_2018))):
        header = (tmp_path / predictions_name).read_text().splitlines()[0].split(",")
        assert header == ["image", *columns], predictions_name  # fails on any extra column, e.g. a label
        truth = pd.read_csv(tmp_path / truth_name)
        assert list(truth.columns) == header, truth_name
        values = truth[columns].to_numpy()
        assert set(np.unique(values)) <= {0.0, 1.0} and (values.sum(1) == 1).all()
        assert (tmp_path / truth_name).read_text().splitlines()[1].count(",1.0") == 1  # as the official files write it
        predictions = pd.read_csv(tmp_path / predictions_name)
        np.testing.assert_allclose(predictions[columns].sum(axis=1), 1.0, atol=1e-5)
    # the 8-class columns are the scorer's 2019 categories (it matches them by name), UNK aside
    assert set(pd.read_csv(tmp_path / "predictions.csv").columns) == set(official_2019.columns)
    # the 2018 files have exactly the header of the official ISIC 2018 Task 3 ground truth
    official_2018 = Path(__file__).parent / "fixtures" / "isic_scoring" / "isic2018_truth.csv"
    assert (tmp_path / "ground_truth_isic2018.csv").read_text().splitlines()[0] == official_2018.read_text().splitlines()[0]

    # every labelled image, and only those, is in the truth, with the manifest's label (the scorer needs
    # the same images in both files: the 2 AKIEC images without an 8-class label are scored in the 2018 pair)
    truth = labels(pd.read_csv(tmp_path / "ground_truth.csv"), CODES)
    labelled = predicted.rows[predicted.rows["label"].notna()]
    assert dict(truth) == dict(zip(labelled["image_id"], labelled["label"]))
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == len(predicted.rows) == len(truth) + 2
    truth_2018 = labels(pd.read_csv(tmp_path / "ground_truth_isic2018.csv"), CODES_2018)
    assert list(truth_2018) == list(predicted.rows["label_2018"][:10])
    assert list(pd.read_csv(tmp_path / "predictions_isic2018.csv")["image"]) == list(truth_2018.index)


REFERRAL_KEYS = {"classes", "target_sensitivity", "threshold", "rule", "chosen_on", "val", "test", "verdict"}
INTERVAL_KEYS = {"estimate", "low", "high", "level", "n_resamples", "n_used"}


def test_referral_and_subgroups_in_metrics_and_report(tmp_path):
    from dermascan.evaluation.referral import choose_threshold, referral_score

    predicted = synthetic_predicted()
    result, scores = evaluate_synthetic(predicted, tmp_path)
    referral = result["referral"]
    assert set(referral) == REFERRAL_KEYS
    assert referral["classes"] == ["AK", "BCC", "MEL", "SCC"] and referral["target_sensitivity"] == 0.95
    # chosen on val's calibrated probabilities (val's temperature, one view), not on test's
    val = apply_temperature(predicted.val_plain, 1.3)
    val_scores = referral_score(val, [0, 1, 4, 6])
    needs = predicted.val_rows["label"].isin(["AK", "BCC", "MEL", "SCC"]).to_numpy()
    assert referral["threshold"] == choose_threshold(val_scores, needs, 0.95)
    assert referral["threshold"] != choose_threshold(referral_score(predicted.plain, [0, 1, 4, 6]), needs, 0.95)
    assert referral["chosen_on"].startswith(f"val, 300 images, {needs.sum()} needing referral, calibrated probabilities")
    assert set(referral["val"]) == {"sensitivity", "specificity", "n", "n_positive"}
    assert referral["val"]["sensitivity"] >= 0.95
    test = referral["test"]
    assert {"sensitivity", "specificity", "ppv", "npv", "referrals_per_100", "n", "n_positive"} <= set(test)
    for rate in ("sensitivity", "specificity", "ppv", "npv"):
        assert set(test[rate]) == INTERVAL_KEYS and test[rate]["low"] <= test[rate]["estimate"] <= test[rate]["high"]
    truth = predicted.rows["label"].isin(["AK", "BCC", "MEL", "SCC"]).to_numpy()
    refer = scores >= referral["threshold"]
    assert test["sensitivity"]["estimate"] == pytest.approx(refer[truth].mean())
    assert test["referrals_per_100"] == pytest.approx(100 * refer.mean())
    assert referral["verdict"].startswith(f"test sensitivity {test['sensitivity']['estimate']:.3f} (95% CI ")

    groups = result["subgroups"]
    assert list(groups["dimensions"]) == ["age_band", "sex", "site", "collection"]
    assert groups["overall_referral_sensitivity"] == test["sensitivity"]["estimate"]
    collections = list(groups["dimensions"]["collection"])
    assert set(collections) == {"HAM10000", "BCN_20000", "other"} and collections[-1] == "other"  # other last
    for dimension in groups["dimensions"].values():
        assert sum(g["n"] for g in dimension.values()) == 300
        for g in dimension.values():
            assert {"n", "n_positive", "balanced_accuracy", "mean_auc", "referral_sensitivity",
                    "referral_specificity", "flags"} <= set(g)
    assert (tmp_path / "plots" / "referral_roc.png").stat().st_size > 10_000
    assert (tmp_path / "plots" / "subgroups.png").stat().st_size > 10_000

    report = render_report(result)
    referral_at = report.index("## Referral: should a doctor see this lesion?")
    assert referral_at < report.index("## Overall")  # the clinician's headline comes first
    assert f">= {referral['threshold']:.4f}" in report and referral["verdict"][1:] in report
    assert "## Subgroups of the test split" in report and "### By collection" in report
    row = next(line for line in report.splitlines() if line.startswith("| sensitivity (lesions needing"))
    assert f"{test['sensitivity']['low']:.3f} - {test['sensitivity']['high']:.3f}" in row


def test_referral_is_skipped_with_its_reason_not_a_crash(tmp_path, caplog):
    predicted = synthetic_predicted()
    no_positives = predicted.val_rows.assign(label="NV")
    predicted.val_rows = no_positives
    result, scores = evaluate_synthetic(predicted, tmp_path)
    assert scores is None and list(result["referral"]) == ["skipped"]
    assert "none of the 300 val images has a referral class" in result["referral"]["skipped"]
    assert "referral operating point skipped" in caplog.text
    male = result["subgroups"]["dimensions"]["sex"]["male"]
    assert male["referral_sensitivity"] is None and male["balanced_accuracy"]["estimate"] is not None
    assert "No referral operating point: none of the 300 val images" in render_report(result)
    assert not (tmp_path / "plots" / "referral_roc.png").exists()

    predicted.val_rows = predicted.val_rows.iloc[:0]
    result, _ = evaluate_synthetic(predicted, tmp_path / "no_val")
    assert result["referral"] == {"skipped": "no val split with labelled images to choose the threshold on"}


def test_referral_and_subgroup_metrics_for_mlflow(tmp_path):
    from dermascan.tracking import decision_metrics

    result, _ = evaluate_synthetic(synthetic_predicted(), tmp_path)
    flat = decision_metrics(result)
    test = result["referral"]["test"]
    assert flat["referral_threshold"] == result["referral"]["threshold"]
    assert flat["referral_test_sensitivity"] == test["sensitivity"]["estimate"]
    assert flat["referral_test_sensitivity_ci_low"] == test["sensitivity"]["low"]
    assert flat["referral_test_npv_ci_high"] == test["npv"]["high"]
    assert flat["referral_test_referrals_per_100"] == test["referrals_per_100"]
    assert flat["referral_val_specificity"] == result["referral"]["val"]["specificity"]
    site = result["subgroups"]["dimensions"]["site"]["lower extremity"]
    assert flat["subgroup_site_lower_extremity_balanced_accuracy"] == site["balanced_accuracy"]["estimate"]
    assert flat["subgroup_site_lower_extremity_n"] == site["n"]
    assert "subgroup_age_band_lt30_referral_sensitivity" in flat and "subgroup_collection_ham10000_mean_auc" in flat
    assert all(re.fullmatch(r"[a-z0-9_]+", name) for name in flat), [n for n in flat if not re.fullmatch(r"[a-z0-9_]+", n)]
    assert all(isinstance(v, float) for v in flat.values())
    assert decision_metrics({"referral": {"skipped": "why"}}) == {}


@pytest.mark.integration
def test_debug_run_holds_the_referral_and_subgroups_everywhere(debug_run):
    """The demo path end to end: metrics.json, report.md, plots/, the model card and the MLflow run."""
    from mlflow import MlflowClient

    cfg, _, artifacts = debug_run
    run_dir = Path(cfg.run_dir)
    result = json.loads((run_dir / "metrics.json").read_text())
    assert "referral" in result and "subgroups" in result
    referral = result["referral"]
    if "skipped" in referral:  # the debug run's val split is tiny; it holds AK, BCC, MEL and SCC images though
        pytest.fail(f"the debug run skipped the referral: {referral['skipped']}")
    assert set(referral) == REFERRAL_KEYS and set(referral["test"]["sensitivity"]) == INTERVAL_KEYS
    assert list(result["subgroups"]["dimensions"]) == ["age_band", "sex", "site", "collection"]
    assert (run_dir / "plots" / "referral_roc.png").is_file() and (run_dir / "plots" / "subgroups.png").is_file()
    header = (run_dir / "predictions.csv").read_text().splitlines()[0]
    assert header == ",".join(["image", *CODES])
    report = (run_dir / "report.md").read_text()
    assert report.index("## Referral") < report.index("## Overall") and "## Subgroups" in report
    card = (artifacts["export"] / "model_card.md").read_text()
    assert "## Referral operating point" in card and f"{referral['threshold']:.4f}" in card
    client = MlflowClient(cfg.tracking.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dermascan").experiment_id])
    metrics = run.data.metrics
    assert metrics["referral_test_sensitivity"] == pytest.approx(referral["test"]["sensitivity"]["estimate"])
    assert metrics["referral_threshold"] == pytest.approx(referral["threshold"])
    assert any(name.startswith("subgroup_sex_") and name.endswith("_balanced_accuracy") for name in metrics)
