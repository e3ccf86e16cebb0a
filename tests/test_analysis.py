"""dermascan.evaluation.analysis: the error-analysis notebook's logic, on hand-made tables, tiny models and the debug run."""

from __future__ import annotations

import math
import os
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest

from dermascan.classes import CODES, INDEX
from dermascan.errors import DataError
from dermascan.evaluation import analysis, scoring
from dermascan.evaluation.metrics import classification_metrics

# id, label, predicted, probability of the predicted class, source, site, age, sex
ROWS = [
    ("a", "MEL", "MEL", 0.90, "S1", "back", 20, "male"),
    ("b", "MEL", "NV", 0.80, "S1", "back", 35, "female"),
    ("c", "NV", "NV", 0.70, "S1", "back", 50, "male"),
    ("d", "NV", "NV", 0.60, "S2", None, None, None),
    ("e", "NV", "MEL", 0.95, "S2", None, 80, "male"),
    ("f", "BCC", "BCC", 0.50, "S2", "face", 75, "male"),
    ("g", "BCC", "NV", 0.55, "S2", "", 44, "male"),
    ("h", None, "AK", 0.40, "isic2018_test", "face", 29, "female"),  # ISIC 2018 AKIEC: no 8-class label
]


def frames(rows=ROWS) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(predictions.csv, manifest) for ``rows``: the predicted class gets p, the others share 1 - p.

    predictions.csv is exactly the ISIC submission layout: the labels are in the manifest (and ground_truth.csv).
    """
    probabilities = []
    for _, _, predicted, p, *_ in rows:
        row = np.full(len(CODES), (1 - p) / (len(CODES) - 1))
        row[INDEX[predicted]] = p
        probabilities.append(row)
    predictions = pd.DataFrame(probabilities, columns=list(CODES))
    predictions.insert(0, "image", [r[0] for r in rows])
    manifest = pd.DataFrame({
        "image_id": [r[0] for r in rows],
        "path": [f"/x/{r[0]}.jpg" for r in rows],
        "label": [r[1] for r in rows],
        "source": [r[4] for r in rows],
        "lesion_id": [f"L{r[0]}" for r in rows],
        "age": [np.nan if r[6] is None else float(r[6]) for r in rows],
        "sex": [r[7] for r in rows],
        "site": [r[5] for r in rows],
        "split": "test",
        "label_2018": [None] * (len(rows) - 1) + ["AKIEC"],
    })
    return predictions, manifest


def truth_file(predictions: pd.DataFrame, manifest: pd.DataFrame, path: Path) -> pd.Series:
    """ground_truth.csv of ``manifest``'s labels, written as evaluation writes it and read back as load() reads it."""
    scoring.write(scoring.ground_truth(manifest["image_id"], manifest["label"], CODES), path, float_format=None)
    return scoring.labels(pd.read_csv(path), CODES)


@pytest.fixture
def table(tmp_path) -> pd.DataFrame:
    """The joined table, through a CSV round trip as load() reads it (missing values NaN, pandas' str dtype)."""
    predictions, manifest = frames()
    predictions.to_csv(tmp_path / "p.csv", index=False)
    manifest.to_csv(tmp_path / "m.csv", index=False)
    truth = truth_file(predictions, manifest, tmp_path / "t.csv")
    return analysis.join_predictions(pd.read_csv(tmp_path / "p.csv"), pd.read_csv(tmp_path / "m.csv"), truth)


# Tables ------------------------------------------------------------------------------


def test_join_adds_the_prediction_columns(table):
    assert list(table["image_id"]) == [r[0] for r in ROWS]
    assert list(table["predicted"]) == [r[2] for r in ROWS]
    np.testing.assert_allclose(table["probability"], [r[3] for r in ROWS])
    assert table.loc[1, "true_probability"] == pytest.approx(0.2 / 7)  # b: MEL predicted NV at 0.8
    assert table.loc[0, "true_probability"] == pytest.approx(0.9)
    assert math.isnan(table.loc[7, "true_probability"])
    assert list(table["correct"]) == [True, False, True, True, False, True, False, None]
    assert list(table["age_band"]) == ["<30", "30–49", "50–69", "unknown", "≥70", "≥70", "30–49", "<30"]
    assert list(table["label"].fillna("none")) == [r[1] or "none" for r in ROWS]  # from the manifest


def test_join_refuses_orphans_and_disagreeing_labels(tmp_path):
    predictions, manifest = frames()
    truth = truth_file(predictions, manifest, tmp_path / "t.csv")
    assert len(truth) == 7  # h has no 8-class label: not in the truth file
    with pytest.raises(DataError, match="not in the manifest"):
        analysis.join_predictions(predictions, manifest[manifest["image_id"] != "c"])
    with pytest.raises(DataError, match="missing from ground_truth.csv"):
        analysis.join_predictions(predictions, manifest, truth.drop("c"))
    changed = manifest.copy()
    changed.loc[0, "label"] = "NV"
    with pytest.raises(DataError, match="disagree"):
        analysis.join_predictions(predictions, changed, truth)
    # a run dir from before issue 14: its predictions.csv carries the truth in a trailing label column
    legacy = predictions.assign(label=manifest["label"])
    assert list(analysis.join_predictions(legacy, manifest).columns) == list(analysis.join_predictions(predictions, manifest).columns)
    with pytest.raises(DataError, match="disagree"):
        analysis.join_predictions(legacy, changed)
    with pytest.raises(DataError, match="lacks the columns"):
        analysis.join_predictions(predictions.drop(columns="MEL"), manifest)


@pytest.mark.parametrize(
    "age, band",
    [(0, "<30"), (29, "<30"), (29.9, "<30"), (30, "30–49"), (44, "30–49"), (49, "30–49"), (50, "50–69"),
     (69, "50–69"), (70, "≥70"), (85, "≥70"), (None, "unknown"), (float("nan"), "unknown"),
     ("", "unknown"), ("unknown", "unknown"), (-5, "unknown"), ("40", "30–49")],
)
def test_age_band(age, band):
    assert analysis.age_band(age) == band


def expected(rows: dict) -> pd.DataFrame:
    return pd.DataFrame(rows).set_index("group")


@pytest.mark.parametrize(
    "by, groups",
    [
        # back: MEL ok, MEL->NV, NV ok: top-1 2/3, recalls MEL 1/2 NV 1 -> 0.75.
        # unknown (None, None, ""): NV ok, NV->MEL, BCC->NV: top-1 1/3, recalls NV 1/2 BCC 0 -> 0.25.
        # face: BCC ok, plus the unlabelled h.
        ("site", [("back", 3, 1, 2, 0.75, 2 / 3, 0), ("face", 1, 0, 1, 1.0, 1.0, 1), ("unknown", 3, 2, 2, 0.25, 1 / 3, 0)]),
        # S2: NV ok, NV->MEL, BCC ok, BCC->NV: recalls 1/2, 1/2. isic2018_test: only h, nothing to score.
        ("source", [("S2", 4, 2, 2, 0.5, 0.5, 0), ("S1", 3, 1, 2, 0.75, 2 / 3, 0), ("isic2018_test", 0, 0, 0, None, None, 1)]),
        # <30: a ok (+ h); 30-49: b, g wrong; 50-69: c ok; >=70: e wrong, f ok; unknown: d ok.
        ("age_band", [("<30", 1, 0, 1, 1.0, 1.0, 1), ("30–49", 2, 2, 2, 0.0, 0.0, 0), ("50–69", 1, 0, 1, 1.0, 1.0, 0),
                      ("≥70", 2, 1, 2, 0.5, 0.5, 0), ("unknown", 1, 0, 1, 1.0, 1.0, 0)]),
        # male: a ok, c ok, e wrong, f ok, g wrong: top-1 3/5; recalls MEL 1, NV 1/2, BCC 1/2 -> 2/3.
        ("sex", [("male", 5, 2, 3, 2 / 3, 0.6, 0), ("female", 1, 1, 1, 0.0, 0.0, 1), ("unknown", 1, 0, 1, 1.0, 1.0, 0)]),
    ],
)
def test_breakdown_hand_computed(table, by, groups):
    result = analysis.breakdown(table, by)
    assert result.index.name == by
    assert list(result.columns) == ["n", "n_errors", "n_classes", "balanced_accuracy", "top1_accuracy", "n_unlabelled"]
    assert list(result.index) == [g[0] for g in groups]
    for group, n, errors, classes, balanced, top1, unlabelled in groups:
        row = result.loc[group]
        assert (row["n"], row["n_errors"], row["n_classes"], row["n_unlabelled"]) == (n, errors, classes, unlabelled)
        for got, want in ((row["balanced_accuracy"], balanced), (row["top1_accuracy"], top1)):
            assert got is None if want is None else got == pytest.approx(want)
    # Nothing dropped: every row of the table is in exactly one group.
    assert result["n"].sum() + result["n_unlabelled"].sum() == len(table)


def test_breakdown_matches_the_overall_metrics_for_one_group(table):
    table = table.assign(source="one release")
    row = analysis.breakdown(table, "source").loc["one release"]
    overall = analysis.overall(table)
    assert row["balanced_accuracy"] == pytest.approx(overall["balanced_accuracy"])
    assert row["top1_accuracy"] == pytest.approx(overall["top1_accuracy"])
    assert row["n"] == overall["n"] == 7


def test_breakdown_without_the_column_is_all_unknown(table):
    result = analysis.breakdown(table.drop(columns=["sex", "age"]), "sex")
    assert list(result.index) == ["unknown"] and result.loc["unknown", "n"] == 7
    assert list(analysis.breakdown(table.drop(columns="age"), "age_band").index) == ["unknown"]
    with pytest.raises(ValueError, match="breakdown by one of"):
        analysis.breakdown(table, "lesion_id")


def test_worst_errors(table):
    worst = analysis.worst_errors(table, 2)
    assert list(worst["image_id"]) == ["e", "b"]  # 0.95 then 0.80; g (0.55) is third
    assert list(worst.columns[:5]) == ["image_id", "label", "predicted", "probability", "true_probability"]
    assert worst.loc[0, ["label", "predicted"]].tolist() == ["NV", "MEL"]
    assert worst.loc[0, "probability"] == pytest.approx(0.95)
    assert list(analysis.worst_errors(table, 100)["image_id"]) == ["e", "b", "g"]  # h, unlabelled, is no error
    assert analysis.worst_errors(table, 0).empty


def test_worst_errors_ties_break_by_image_id():
    rows = [("z", "NV", "MEL", 0.7, "S", "back", 40, "male"), ("y", "MEL", "NV", 0.7, "S", "back", 40, "male")]
    table = analysis.join_predictions(*frames(rows))
    assert list(analysis.worst_errors(table, 5)["image_id"]) == ["y", "z"]


def test_confusion_matrix_and_headline(table):
    matrix = analysis.confusion_matrix(table)
    assert matrix.shape == (8, 8) and matrix.sum() == 7
    assert matrix[INDEX["MEL"], INDEX["NV"]] == 1 and matrix[INDEX["NV"], INDEX["NV"]] == 2
    metrics = classification_metrics(table["label"].dropna().map(INDEX), table.dropna(subset="label")[list(CODES)].to_numpy())
    metrics["ci"] = {"balanced_accuracy": {"low": 0.1, "high": 0.9}}
    headline = analysis.headline_table(metrics)
    assert headline.index[0] == "balanced_accuracy"
    assert list(headline.index) == [name for name, _ in analysis.HEADLINE]
    assert headline.loc["balanced_accuracy", "value"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert headline.loc["balanced_accuracy", ["ci_low", "ci_high"]].tolist() == [0.1, 0.9]
    assert headline.loc["mean_auc", "ci_low"] is None


def test_referral_and_subgroup_tables_read_metrics_json(table):
    from dermascan.evaluation.referral import (
        needs_referral,
        operating_point,
        referral_score,
    )
    from dermascan.evaluation.subgroups import evaluate_subgroups

    labelled = table[table["label"].notna()]
    scores = referral_score(labelled[list(CODES)].to_numpy(), [INDEX["MEL"]])
    needs = needs_referral(labelled["label"], ["MEL"])
    referral = operating_point(scores, needs, scores, needs, ["MEL"], 0.5, "p", n_resamples=50, seed=0)
    groups = evaluate_subgroups(table, table[list(CODES)].to_numpy(), ["MEL"],
                                referral_score(table[list(CODES)].to_numpy(), [INDEX["MEL"]]), referral["threshold"],
                                referral["test"]["sensitivity"]["estimate"], min_images=30, n_resamples=50, seed=0)
    evaluation = {"split": "test", "referral": referral, "subgroups": groups}
    rates = analysis.referral_table(evaluation)
    assert list(rates.index) == ["sensitivity", "specificity", "ppv", "npv", "referrals_per_100"]
    # MEL images a (0.9) and b (0.8/7): 1 of 2 needed, so the threshold is a's MEL probability
    assert rates.loc["sensitivity", "value"] == 0.5 and rates.loc["sensitivity", "val"] == 0.5
    # referred: a, and e (NV, called MEL at 0.95): 2 of the 7 labelled images; 4 of the 5 others not referred
    assert rates.loc["referrals_per_100", "value"] == pytest.approx(200 / 7)
    assert rates.loc["specificity", "value"] == pytest.approx(4 / 5)
    assert analysis.referral_table({"referral": {"skipped": "why"}}).empty
    by_site = analysis.subgroup_table(evaluation, "site")
    assert list(by_site.index) == ["back", "face", "unknown"]  # largest first, unknown last; h is unlabelled
    assert by_site.loc["back", "n"] == 3 and by_site.loc["back", "flags"] == "small"
    assert by_site.loc["back", "balanced_accuracy"] == pytest.approx(0.75)  # as breakdown computes it
    assert analysis.subgroup_table({}).empty


def test_out_of_scope_tables_and_the_images_nearest_the_threshold():
    figures = {"n": 25, "auroc": 0.99, "fpr_at_95_tpr": None, "rejected": 0.96}
    evaluation = {"out_of_scope": {"threshold": 2.0, "sets": {"skimage": figures, "synthetic": figures},
                                   "corrupted": {"blur": {**figures, "n": 3}}}}
    table = analysis.out_of_scope_table(evaluation)
    assert list(table.index) == ["skimage", "synthetic", "blur"]
    assert list(table["kind"]) == ["out of scope", "out of scope", "corrupted lesion"]
    assert table.loc["blur", "n"] == 3 and table.loc["skimage", "fpr_at_95_tpr"] is None
    assert analysis.out_of_scope_table({"out_of_scope": {"skipped": "why"}}).empty
    assert analysis.out_of_scope_table({}).empty

    scores = pd.DataFrame({
        "set": ["test", "test", "test", "val", "skimage", "skimage", "blur"],
        "image": ["a", "b", "c", "v", "cat", "moon", "a"],
        "score": [1.9, 0.5, 2.3, 2.0, 2.05, 6.0, 2.6],
    })
    scores["rejected"] = scores["score"] > 2.0
    inside, outside = analysis.nearest_threshold(scores, 2.0, 2, "test")
    assert list(inside["image"]) == ["a", "c"]  # |1.9 - 2| < |2.3 - 2| < |0.5 - 2|
    assert list(outside["image"]) == ["cat", "a"] and list(outside["set"]) == ["skimage", "blur"]  # val aside
    sets = analysis.score_sets(scores)
    assert list(sets) == ["test", "skimage", "blur"] and sets["test"].tolist() == [1.9, 0.5, 2.3]
    assert analysis.out_of_scope_caption(outside.iloc[0]) == "skimage: cat\nscore 2.050, rejected"


# Figures -----------------------------------------------------------------------------


def test_overlay():
    image = np.full((8, 8, 3), 100, np.uint8)
    heat = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)
    assert np.array_equal(analysis.overlay(image, heat, alpha=0.0), image)
    out = analysis.overlay(image, heat, alpha=1.0)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] > out[0, 0, 2] and out[0, -1, 2] > out[0, -1, 0]  # jet: hot red left, cold blue right
    np.testing.assert_array_equal(analysis.overlay(image, np.ones((1, 1)), alpha=1.0)[3, 3], [128, 0, 0])


def test_gallery_and_breakdown_figures(table):
    images = [np.full((8, 8, 3), i * 40, np.uint8) for i in range(5)]
    fig = analysis.gallery_figure(images, [f"cap {i}" for i in range(5)], ncols=4, title="t")
    assert len(fig.axes) == 8
    assert [ax.get_title() for ax in fig.axes if ax.images] == [f"cap {i}" for i in range(5)]
    assert analysis.figure_png(fig).startswith(b"\x89PNG")
    empty = analysis.gallery_figure([], [])
    assert not empty.axes and analysis.figure_png(empty).startswith(b"\x89PNG")
    with pytest.raises(ValueError):
        analysis.gallery_figure(images, ["one caption"])

    result = analysis.breakdown(table, "source")
    fig = analysis.breakdown_figure(result)
    (ax,) = fig.axes
    assert len(ax.patches) == 2 * len(result)  # balanced and top-1 per group; None drawn as 0
    assert [t.get_text() for t in ax.get_yticklabels()] == ["S2 (n=4)", "S1 (n=3)", "isic2018_test (n=0)"]
    assert analysis.figure_png(fig).startswith(b"\x89PNG")


# Grad-CAM ----------------------------------------------------------------------------


def cam_model(nested: bool) -> tuple[keras.Model, keras.layers.Layer, keras.layers.Dense]:
    """Conv features -> GAP -> Dense -> softmax, for which Grad-CAM of a logit equals CAM (Zhou et al. 2016)."""
    conv = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")
    dense = keras.layers.Dense(len(CODES), name="logits")
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Rescaling(1 / 255.0, name="preprocess")(inputs)
    if nested:
        inner_in = keras.Input((12, 12, 3))
        backbone = keras.Model(inner_in, conv(inner_in), name="backbone")
        x = backbone(x)
    else:
        x = conv(x)
    x = dense(keras.layers.GlobalAveragePooling2D()(x))
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs), conv, dense


@pytest.mark.parametrize("nested", [True, False])
def test_grad_cam_equals_cam_for_a_gap_linear_head(nested):
    keras.utils.set_random_seed(1)
    model, conv, dense = cam_model(nested)
    images = np.random.default_rng(0).integers(0, 256, (5, 12, 12, 3)).astype(np.uint8)
    features = conv(keras.ops.convert_to_tensor(images.astype("float32") / 255.0)).numpy()
    kernel = dense.kernel.numpy()
    for k in (0, 4, 7):
        cam = np.maximum(np.einsum("bhwc,c->bhw", features, kernel[:, k]), 0)
        peak = cam.max(axis=(1, 2), keepdims=True)
        want = np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0)
        np.testing.assert_allclose(analysis.grad_cam(model, images, class_index=k), want, atol=1e-5)
    predicted = model.predict(images, verbose=0).argmax(axis=1)
    per_image = analysis.grad_cam(model, images, class_index=predicted)
    np.testing.assert_allclose(analysis.grad_cam(model, images), per_image, atol=1e-6)


@pytest.fixture(scope="module")
def tiny():
    """The project's model at 64 px: a nested MobileNetV2 (0.35) whose last feature map is 2x2."""
    from dermascan.modeling.model import build_model

    from .conftest import model_config

    keras.utils.set_random_seed(0)
    model, base = build_model(model_config(image_size=64, weights=None, alpha=0.35, units=[16, 8], dropout=[0.3, 0.3]))
    images = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3)).astype(np.uint8)
    return model, base, images


def test_grad_cam_finds_the_nested_backbone(tiny):
    model, base, images = tiny
    assert analysis.find_backbone(model) is base
    assert analysis.last_feature_layer(base).name == "out_relu"
    grad_model, cut = analysis.gradient_model(model)
    assert cut  # the softmax is cut off: scores are logits
    feature_map, logits = grad_model(images.astype("float32"), training=False)
    assert tuple(feature_map.shape) == (3, *base.output.shape[1:])
    np.testing.assert_allclose(
        keras.ops.softmax(logits).numpy(), model(images.astype("float32"), training=False).numpy(), atol=1e-5
    )


def test_grad_cam_properties_on_the_project_model(tiny):
    model, base, images = tiny
    heat = analysis.grad_cam(model, images)
    assert heat.shape == (3, *base.output.shape[1:3]) == (3, 2, 2)
    assert heat.dtype == np.float32 and heat.min() >= 0.0 and heat.max() <= 1.0
    np.testing.assert_allclose(heat.max(axis=(1, 2)), 1.0)  # the predicted class has positive evidence somewhere
    # Every class at once: image i with class k is row k * 3 + i (class_index may differ per image).
    every = analysis.grad_cam(model, np.tile(images, (len(CODES), 1, 1, 1)), class_index=np.repeat(np.arange(8), 3))
    others = every.reshape(len(CODES), 3, 2, 2)
    assert any(not np.allclose(h, heat) for h in others)  # the map depends on the class
    predicted = model.predict(images, verbose=0).argmax(axis=1)
    np.testing.assert_allclose(others[predicted, np.arange(3)], heat, atol=1e-6)
    np.testing.assert_allclose(analysis.grad_cam(model, images, class_index=4), others[4], atol=1e-6)
    assert analysis.grad_cam(model, images[:0]).shape == (0, 2, 2)
    with pytest.raises(ValueError, match="class_index"):
        analysis.grad_cam(model, images, class_index=8)
    with pytest.raises(ValueError, match="class_index"):
        analysis.grad_cam(model, images, class_index=[0, 1])


def test_grad_cam_refuses_a_model_it_cannot_rebuild():
    keras.utils.set_random_seed(2)
    inner_in = keras.Input((8, 8, 3))
    backbone = keras.Model(inner_in, keras.layers.Conv2D(4, 3, padding="same")(inner_in), name="backbone")
    inputs = keras.Input((8, 8, 3))
    features = backbone(inputs)
    pooled = keras.layers.GlobalAveragePooling2D()(features)
    skip = keras.layers.GlobalAveragePooling2D()(inputs)  # a branch around the backbone: not a chain
    outputs = keras.layers.Dense(8, activation="softmax")(keras.layers.Concatenate()([pooled, skip]))
    with pytest.raises((ValueError, TypeError)):
        analysis.grad_cam(keras.Model(inputs, outputs), np.zeros((1, 8, 8, 3), np.uint8))


# A finished run ------------------------------------------------------------------------


def test_load_by_run_dir_and_by_mlflow_run_id(debug_run):
    cfg, metrics, _ = debug_run
    run_dir = Path(cfg.run_dir)
    by_dir = analysis.load(run_dir=run_dir)
    assert by_dir.split == cfg.evaluate.split
    assert by_dir.metrics["balanced_accuracy"] == metrics[cfg.evaluate.split]["balanced_accuracy"]
    assert analysis.overall(by_dir.table)["balanced_accuracy"] == pytest.approx(
        metrics[cfg.evaluate.split]["balanced_accuracy"], abs=1e-9
    )
    test_rows = by_dir.run.manifest[by_dir.run.manifest["split"] == by_dir.split]
    assert sorted(by_dir.table["image_id"]) == sorted(test_rows["image_id"])
    run_id = (run_dir / "mlflow_run_id.txt").read_text().strip()
    assert by_dir.mlflow_run_id == run_id

    by_id = analysis.load(mlflow_run_id=run_id, tracking_uri=cfg.tracking.uri)
    assert by_id.run.run_dir.resolve() == run_dir.resolve()
    assert by_id.mlflow_run_id == run_id
    pd.testing.assert_frame_equal(by_id.table, by_dir.table)

    with pytest.raises(DataError, match="not found"):
        analysis.load(mlflow_run_id="0" * 32, tracking_uri=cfg.tracking.uri)
    with pytest.raises(ValueError, match="not both"):
        analysis.load(run_dir=run_dir, mlflow_run_id=run_id)


def test_every_breakdown_covers_the_debug_run(debug_run):
    a = analysis.load(run_dir=debug_run[0].run_dir)
    for by in analysis.BREAKDOWNS:
        result = analysis.breakdown(a.table, by)
        assert result["n"].sum() + result["n_unlabelled"].sum() == len(a.table), by


def test_explain_a_debug_run_image(debug_run):
    a = analysis.load(run_dir=debug_run[0].run_dir)
    ids = analysis.gradcam_ids(a.table, 2)
    explained = analysis.explain(a, ids)
    size = a.image_size
    assert explained.pixels.shape == (len(ids), size, size, 3) and explained.pixels.dtype == np.uint8
    backbone = analysis.find_backbone(a.model())
    assert explained.predicted.shape == explained.true.shape == (len(ids), *backbone.output.shape[1:3])
    assert len(analysis.gradcam_figure(explained).axes) == 3 * len(ids)
    assert analysis.gradcam_ids(a.table, 2, ["x"]) == ["x"]
    with pytest.raises(DataError):
        analysis.explain(a, ["not-an-image"])


def test_out_of_scope_images_of_a_debug_run_are_the_scored_pixels(debug_run):
    """The images the notebook shows nearest the threshold are rebuilt exactly as evaluation scored them."""
    from dermascan.evaluation.out_of_scope import features_model
    from dermascan.modeling.ood import load_gate

    a = analysis.load(run_dir=debug_run[0].run_dir)
    scores = analysis.out_of_scope_scores(a)
    gate = load_gate(a.run.run_dir / "out_of_scope.npz")
    inside, outside = analysis.nearest_threshold(scores, gate.threshold, 3, a.split)
    picked = pd.concat([inside, outside, scores[scores["set"].isin(["synthetic", "rotated"])].head(2)],
                       ignore_index=True)
    images = np.stack(analysis.out_of_scope_images(a, picked))
    assert images.shape == (len(picked), a.image_size, a.image_size, 3) and images.dtype == np.uint8
    rebuilt = gate.score(features_model(a.model()).predict(images.astype(np.float32), verbose=0))
    np.testing.assert_allclose(rebuilt, picked["score"], rtol=1e-4, atol=1e-5)


def test_latest_run_dir(tmp_path):
    runs = tmp_path / "repo" / "runs" / "train"
    for i, name in enumerate(["2026-01-01_00-00-00", "2026-01-02_00-00-00", "unfinished"]):
        (runs / name / "checkpoints").mkdir(parents=True)
        if name != "unfinished":
            (runs / name / "config.yaml").write_text("{}")
            (runs / name / "checkpoints" / "best.keras").write_text("")
            os.utime(runs / name / "checkpoints" / "best.keras", (1000 + i, 1000 + i))
    (tmp_path / "repo" / "notebooks").mkdir()
    assert analysis.latest_run_dir(tmp_path / "repo" / "notebooks") == runs / "2026-01-02_00-00-00"
    assert analysis.latest_run_dir(tmp_path / "repo") == runs / "2026-01-02_00-00-00"
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no finished run"):
        analysis.latest_run_dir(tmp_path / "empty")
