"""dermascan.evaluation.metrics against scikit-learn, Keras and the official ISIC scorer's goldens."""

from __future__ import annotations

import itertools
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
    roc_curve,
)

from dermascan import classes
from dermascan.classes import CODES
from dermascan.evaluation.metrics import (
    CODES_2018,
    LABEL_2018_INDEX,
    _resample_metrics,
    binary_accuracy,
    bootstrap_ci,
    classification_metrics,
    expected_calibration_error,
    reliability_bins,
    sensitivity_at_specificity,
    to_isic2018,
    to_isic2018_labels,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "isic_scoring"
K = len(CODES)
# ISIC 2019-like class frequencies in CODES order (AK, BCC, BKL, DF, MEL, NV, SCC, VASC): NV about half.
PRIOR = np.array([0.034, 0.131, 0.104, 0.009, 0.179, 0.508, 0.025, 0.010])
PRIOR = PRIOR / PRIOR.sum()


def simulate(n: int, seed: int, signal: float = 1.5, decimals: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Imbalanced labels and softmax probabilities of a model that is right more often than not."""
    rng = np.random.default_rng(seed)
    y = rng.choice(K, size=n, p=PRIOR)
    logits = rng.normal(size=(n, K)) + 0.5 * np.log(PRIOR)
    logits[np.arange(n), y] += signal
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    if decimals is not None:  # coarse scores: many ties within a column
        p = np.round(p, decimals)
    return y, p


def none_to_nan(values: list[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=float)


def brute_force_sens_at_spec(truth: np.ndarray, scores: np.ndarray, target: float) -> float:
    """Try every threshold (each distinct score, and 'nothing positive') directly."""
    called = scores[None, :] >= np.unique(scores)[:, None]  # [thresholds, N]
    sensitivity = called[:, truth].mean(axis=1)
    specificity = (~called[:, ~truth]).mean(axis=1)
    return float(max(0.0, sensitivity[specificity >= target - 1e-12].max(initial=0.0)))


def assert_matches_sklearn(y: np.ndarray, p: np.ndarray) -> dict:
    """Every figure of classification_metrics against its scikit-learn counterpart (None <-> nan)."""
    m = classification_metrics(y, p)
    pred = p.argmax(axis=1)
    labels = list(range(K))
    per = [m["per_class"][c] for c in CODES]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true" and friends
        ba = balanced_accuracy_score(y, pred)
        recall = recall_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        precision = precision_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        f1 = f1_score(y, pred, labels=labels, average=None, zero_division=np.nan)
        specificity = [recall_score(y != k, pred != k, zero_division=np.nan) for k in labels]
        npv = [precision_score(y != k, pred != k, zero_division=np.nan) for k in labels]

    assert m["n"] == len(y)
    assert m["balanced_accuracy"] == pytest.approx(ba, abs=1e-12)
    assert m["top1_accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    assert [v["support"] for v in per] == np.bincount(y, minlength=K).tolist()
    np.testing.assert_allclose(none_to_nan([v["sensitivity"] for v in per]), recall, atol=1e-12)
    np.testing.assert_allclose(none_to_nan([v["ppv"] for v in per]), precision, atol=1e-12)
    np.testing.assert_allclose(none_to_nan([v["f1"] for v in per]), f1, atol=1e-12)
    np.testing.assert_allclose(none_to_nan([v["specificity"] for v in per]), specificity, atol=1e-12)
    np.testing.assert_allclose(none_to_nan([v["npv"] for v in per]), npv, atol=1e-12)

    aucs = []
    for k, v in enumerate(per):
        truth = y == k
        if truth.all() or not truth.any():
            assert v["auc"] is None
            assert v["sensitivity_at_specificity"] == {"0.80": None, "0.90": None, "0.95": None}
            continue
        aucs.append(roc_auc_score(truth, p[:, k]))
        assert v["auc"] == pytest.approx(aucs[-1], abs=1e-12)
        for key, target in (("0.80", 0.80), ("0.90", 0.90), ("0.95", 0.95)):
            assert v["sensitivity_at_specificity"][key] == pytest.approx(
                brute_force_sens_at_spec(truth, p[:, k], target), abs=1e-12
            )
    assert m["mean_auc"] == (pytest.approx(np.mean(aucs), abs=1e-12) if aucs else None)
    assert m["mean_sensitivity"] == pytest.approx(np.nanmean(recall), abs=1e-12)
    assert m["mean_specificity"] == pytest.approx(np.nanmean(specificity), abs=1e-12)
    json.dumps(m, allow_nan=False)  # metrics.json must be plain JSON
    return m


# --------------------------------------------------------------------------- sklearn agreement


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_on_random_inputs(seed):
    y, p = simulate(600, seed)
    m = assert_matches_sklearn(y, p)
    assert 0.3 < m["balanced_accuracy"] < 0.95 and 0.7 < m["mean_auc"] < 1.0  # a non-trivial case
    assert m["per_class"]["MEL"]["sensitivity_at_specificity"]["0.80"] >= (
        m["per_class"]["MEL"]["sensitivity_at_specificity"]["0.95"]
    )


def test_matches_sklearn_with_tied_scores():
    y, p = simulate(500, 7, decimals=2)
    assert any(len(np.unique(p[:, k])) < len(p) / 2 for k in range(K))
    assert_matches_sklearn(y, p)


def test_class_absent_from_truth_has_no_auc_and_is_left_out_of_means():
    y, p = simulate(400, 3)
    df = CODES.index("DF")
    y[y == df] = CODES.index("NV")
    p[:5, df] = 5.0  # DF is still predicted for a few rows
    p /= p.sum(axis=1, keepdims=True)
    m = assert_matches_sklearn(y, p)
    dfm = m["per_class"]["DF"]
    assert dfm["support"] == 0 and dfm["auc"] is None and dfm["sensitivity"] is None
    assert dfm["ppv"] == 0.0 and dfm["f1"] == 0.0  # predicted 5 times, never right
    others = [roc_auc_score(y == k, p[:, k]) for k in range(K) if k != df]
    assert m["mean_auc"] == pytest.approx(np.mean(others), abs=1e-12)
    assert m["mean_auc"] != pytest.approx(np.mean(others + [0.5]), abs=1e-6)


def test_all_predictions_one_class():
    y, p = simulate(300, 4)
    nv = CODES.index("NV")
    p[:, nv] += 1.0
    p /= p.sum(axis=1, keepdims=True)
    m = assert_matches_sklearn(y, p)
    assert m["balanced_accuracy"] == pytest.approx(1 / len(np.unique(y)))
    assert m["top1_accuracy"] == pytest.approx(np.mean(y == nv))
    for code in CODES:
        c = m["per_class"][code]
        if code == "NV":
            assert c["sensitivity"] == 1.0 and c["specificity"] == 0.0 and c["npv"] is None
        else:
            assert c["sensitivity"] == 0.0 and c["specificity"] == 1.0 and c["ppv"] is None and c["f1"] == 0.0


def test_all_truth_one_class_has_no_auc_at_all():
    y, p = simulate(50, 5)
    y[:] = CODES.index("MEL")
    m = assert_matches_sklearn(y, p)
    assert m["mean_auc"] is None
    assert m["per_class"]["MEL"]["specificity"] is None


def test_rejects_mismatched_inputs():
    y, p = simulate(20, 0)
    with pytest.raises(ValueError, match="columns"):
        classification_metrics(y, p[:, :7])
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(y[:10], p)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.full(20, 8), p)


# --------------------------------------------------------------------------- sklearn behaviours we rely on


def test_sklearn_balanced_accuracy_ignores_classes_absent_from_truth():
    y = np.array([0, 0, 1, 1])
    pred = np.array([0, 2, 1, 1])  # class 2 predicted but absent from the truth
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):
        ba = balanced_accuracy_score(y, pred)
    assert ba == pytest.approx((0.5 + 1.0) / 2)  # not (0.5 + 1.0 + 0) / 3
    p = np.eye(3)[pred] * 0.9 + 0.05
    assert classification_metrics(y, p, classes=("A", "B", "C"))["balanced_accuracy"] == pytest.approx(ba)


def test_sklearn_roc_auc_of_a_single_class_is_not_a_number():
    """sklearn warns and returns nan (or raises, in older releases); we return None instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            value = roc_auc_score(np.zeros(4, dtype=bool), np.arange(4.0))
        except ValueError:
            value = np.nan
    assert np.isnan(value)


def test_roc_curve_drop_intermediate_can_hide_the_best_operating_point():
    """sklearn's default drops collinear ROC points, which may be the answer; we use them all.

    Scores: one positive at 0.9; a positive and a negative tied at 0.8, 0.7 and 0.6; the other
    seven negatives and one positive at 0.1. With 10 negatives, specificity >= 0.80 allows two
    false positives: threshold 0.7 gives sensitivity 3/5. The points at 0.8 and 0.7 are collinear
    and dropped by ``drop_intermediate=True``, which would leave only 1/5.
    """
    truth = np.array([1, 1, 0, 1, 0, 1, 0, 1] + [0] * 7, dtype=bool)
    scores = np.array([0.9, 0.8, 0.8, 0.7, 0.7, 0.6, 0.6, 0.1] + [0.1] * 7)
    fpr, tpr, _ = roc_curve(truth, scores)  # drop_intermediate=True by default
    assert tpr[fpr <= 0.2].max() == pytest.approx(0.2)
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    assert tpr[fpr <= 0.2].max() == pytest.approx(0.6)
    assert sensitivity_at_specificity(truth, scores)["0.80"] == pytest.approx(0.6)
    assert brute_force_sens_at_spec(truth, scores, 0.80) == pytest.approx(0.6)


def test_roc_curve_drop_intermediate_agrees_without_collinear_ties():
    """On continuous scores both curves give the same sensitivity at each specificity."""
    y, p = simulate(800, 11)
    mel = CODES.index("MEL")
    for drop in (True, False):
        fpr, tpr, _ = roc_curve(y == mel, p[:, mel], drop_intermediate=drop)
        got = [tpr[1 - fpr >= s - 1e-12].max() for s in (0.8, 0.9, 0.95)]
        assert got == pytest.approx(list(sensitivity_at_specificity(y == mel, p[:, mel]).values()), abs=1e-12)


def test_sensitivity_at_specificity_keys_and_custom_targets():
    y, p = simulate(300, 6)
    m = classification_metrics(y, p, specificities=(0.5, 0.975))
    assert list(m["per_class"]["MEL"]["sensitivity_at_specificity"]) == ["0.50", "0.975"]
    assert m["specificities"] == [0.5, 0.975]


# --------------------------------------------------------------------------- Keras' binary accuracy trap


def test_binary_accuracy_is_keras_and_is_not_top1_accuracy():
    keras = pytest.importorskip("keras")
    y, p = simulate(2000, 8, signal=1.0)
    assert 0.45 < np.mean(y == CODES.index("NV")) < 0.55
    p = p.astype(np.float32).astype(float)  # Keras computes in float32: use values it sees exactly
    metric = keras.metrics.BinaryAccuracy()
    metric.update_state(np.eye(K, dtype=np.float32)[y], p.astype(np.float32))
    keras_value = float(metric.result())

    ours = binary_accuracy(y, p)
    top1 = classification_metrics(y, p)["top1_accuracy"]
    assert ours == pytest.approx(keras_value, abs=1e-6)
    assert ours > 0.875  # 7 of 8 cells are "no" in every row: saying "no" everywhere scores 0.875
    assert top1 < ours - 0.2  # the same predictions are far less accurate than "accuracy" suggests
    assert binary_accuracy(y, np.zeros_like(p)) == pytest.approx(7 / 8)


# --------------------------------------------------------------------------- bootstrap


def test_resampled_metrics_equal_sklearn_on_the_resampled_rows():
    y, p = simulate(300, 9, decimals=2)  # ties too
    rng = np.random.default_rng(0)
    draws = rng.integers(0, len(y), size=(5, len(y)))
    counts = np.stack([np.bincount(d, minlength=len(y)) for d in draws])
    recall, recall_ok, auc, auc_ok = _resample_metrics(y, p, counts)
    for b, d in enumerate(draws):
        yb, pb = y[d], p[d]
        m = classification_metrics(yb, pb)
        for k, code in enumerate(CODES):
            c = m["per_class"][code]
            assert recall_ok[b, k] == (c["sensitivity"] is not None)
            assert auc_ok[b, k] == (c["auc"] is not None)
            if c["sensitivity"] is not None:
                assert recall[b, k] == pytest.approx(c["sensitivity"], abs=1e-12)
            if c["auc"] is not None:
                assert auc[b, k] == pytest.approx(c["auc"], abs=1e-12)


def test_bootstrap_ci_contains_the_estimate_is_seeded_and_shrinks_with_n():
    y, p = simulate(4000, 10)
    small = bootstrap_ci(y[:300], p[:300], n_resamples=300, seed=1)
    large = bootstrap_ci(y, p, n_resamples=300, seed=1)
    for ci, (yy, pp) in ((small, (y[:300], p[:300])), (large, (y, p))):
        m = classification_metrics(yy, pp)
        for key in ("balanced_accuracy", "mean_auc"):
            assert ci[key]["estimate"] == pytest.approx(m[key], abs=1e-12)
            assert ci[key]["low"] < ci[key]["estimate"] < ci[key]["high"]
            assert ci[key]["level"] == 0.95 and ci[key]["n_resamples"] == 300
    for key in ("balanced_accuracy", "mean_auc"):
        assert large[key]["high"] - large[key]["low"] < 0.6 * (small[key]["high"] - small[key]["low"])
    assert bootstrap_ci(y[:300], p[:300], n_resamples=300, seed=1) == small
    assert bootstrap_ci(y[:300], p[:300], n_resamples=300, seed=2) != small
    narrow = bootstrap_ci(y[:300], p[:300], n_resamples=300, seed=1, level=0.5)["mean_auc"]
    assert small["mean_auc"]["low"] < narrow["low"] < narrow["high"] < small["mean_auc"]["high"]


def test_bootstrap_skips_resamples_that_lose_a_class():
    _, p = simulate(200, 12)
    df = CODES.index("DF")
    y = np.arange(200) % K  # 25 of each class...
    y[y == df] = CODES.index("NV")
    y[0] = df  # ...but a single DF: (1 - 1/200)^200, about 37%, of the resamples miss it
    ci = bootstrap_ci(y, p, n_resamples=400, seed=0)
    for key in ("balanced_accuracy", "mean_auc"):
        assert 0.55 * 400 < ci[key]["n_used"] < 0.72 * 400
        assert ci[key]["low"] is not None
    absent = bootstrap_ci(np.full(50, 5), p[:50], n_resamples=50)
    assert absent["mean_auc"]["estimate"] is None and absent["mean_auc"]["low"] is None
    assert absent["balanced_accuracy"]["n_used"] == 50


# --------------------------------------------------------------------------- calibration error


def test_reliability_bins_and_ece_by_hand():
    # Confidences 0.9, 0.9 (one right), 0.6 (right), 0.35 (wrong); 10 bins.
    p = np.array([[0.9, 0.1, 0.0], [0.05, 0.9, 0.05], [0.6, 0.3, 0.1], [0.35, 0.3, 0.35]])
    y = np.array([0, 0, 0, 1])
    bins = reliability_bins(y, p, n_bins=10)
    assert bins["count"] == [0, 0, 0, 1, 0, 1, 0, 0, 2, 0]
    assert bins["accuracy"][8] == 0.5 and bins["mean_confidence"][8] == pytest.approx(0.9)
    assert bins["accuracy"][0] is None and bins["lower"][3] == pytest.approx(0.3)
    expected = (2 * abs(0.5 - 0.9) + abs(1 - 0.6) + abs(0 - 0.35)) / 4
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(expected)


def test_ece_matches_a_loop_and_is_small_when_calibrated():
    rng = np.random.default_rng(13)
    logits = rng.normal(size=(3000, K)) * 2
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = (rng.random((3000, 1)) > p.cumsum(axis=1)).sum(axis=1)  # one draw from each row of p
    conf, correct = p.max(axis=1), p.argmax(axis=1) == y
    edges = np.linspace(0, 1, 16)
    loop = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            loop += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    ece = expected_calibration_error(y, p)
    assert ece == pytest.approx(loop, abs=1e-12)
    assert ece < 0.04  # labels drawn from p: calibrated up to sampling noise
    assert expected_calibration_error(y, np.eye(K)[p.argmax(axis=1)]) > 0.2  # over-confident


# --------------------------------------------------------------------------- ISIC 2018 columns


def test_isic2018_constants_come_from_classes():
    assert CODES_2018 is classes.ISIC2018_COLUMNS
    assert CODES_2018 == ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
    assert LABEL_2018_INDEX == {"MEL": 0, "NV": 1, "BCC": 2, "AK": 3, "SCC": 3, "BKL": 4, "DF": 5, "VASC": 6}


def test_to_isic2018_sums_ak_and_scc():
    y, p = simulate(100, 14)
    folded = to_isic2018(p)
    assert folded.shape == (100, 7)
    idx = {c: CODES.index(c) for c in CODES}
    np.testing.assert_array_equal(folded[:, 3], p[:, idx["AK"]] + p[:, idx["SCC"]])
    for code in ("MEL", "NV", "BCC", "BKL", "DF", "VASC"):
        np.testing.assert_array_equal(folded[:, CODES_2018.index(code)], p[:, idx[code]])
    np.testing.assert_allclose(folded.sum(axis=1), 1.0)
    labels = to_isic2018_labels(y)
    assert [CODES_2018[i] for i in labels[:20]] == [
        "AKIEC" if CODES[i] in ("AK", "SCC") else CODES[i] for i in y[:20]
    ]
    with pytest.raises(ValueError):
        to_isic2018(p[:, :7])


# --------------------------------------------------------------------------- official scorer goldens


@pytest.fixture(scope="module")
def goldens() -> dict:
    return json.loads((FIXTURES / "goldens.json").read_text())


def read_case(name: str, columns: tuple[str, ...]) -> pd.DataFrame:
    """A fixture CSV read as the scorer reads it (pandas defaults), columns reordered to ``columns``."""
    frame = pd.read_csv(FIXTURES / name)
    assert frame["image"].is_monotonic_increasing
    return frame[list(columns)]


def assert_matches_goldens(m: dict, case: dict, binary: float) -> None:
    assert m["n"] == case["n"]
    assert m["balanced_accuracy"] == pytest.approx(case["balanced_accuracy"], abs=1e-6)
    for code, official in case["per_category"].items():
        assert m["per_class"][code]["auc"] == pytest.approx(official["auc"], abs=1e-6), code
    assert m["mean_auc"] == pytest.approx(case["macro_average"]["auc"], abs=1e-6)
    # The scorer's per-category "accuracy" thresholds each column at 0.5: Keras' binary accuracy.
    assert binary == pytest.approx(case["macro_average"]["accuracy"], abs=1e-6)


def test_goldens_were_made_by_the_official_scorer(goldens):
    assert goldens["scorer"]["package"] == "isic-challenge-scoring"
    assert goldens["scorer"]["version"].startswith("5.")
    assert goldens["cases"]["isic2019"]["columns"] == [c for c in classes.ISIC2019_COLUMNS if c != "UNK"]
    assert goldens["cases"]["isic2018"]["columns"] == list(CODES_2018)


def test_isic2019_case_matches_official_scorer(goldens):
    case = goldens["cases"]["isic2019"]
    truth = read_case(case["truth"], CODES).to_numpy()
    p = read_case(case["predictions"], CODES).to_numpy()
    y = truth.argmax(axis=1)
    m = classification_metrics(y, p)
    assert_matches_goldens(m, case, binary_accuracy(y, p))
    assert m["top1_accuracy"] < case["macro_average"]["accuracy"] - 0.2


def test_isic2018_case_from_8_class_probabilities_matches_official_scorer(goldens):
    case = goldens["cases"]["isic2018"]
    p8 = read_case(case["predictions_8class"], CODES).to_numpy()
    folded = to_isic2018(p8)
    # The scorer scored exactly these 7-class probabilities.
    np.testing.assert_array_equal(folded, read_case(case["predictions"], CODES_2018).to_numpy())
    y = read_case(case["truth"], CODES_2018).to_numpy().argmax(axis=1)
    m = classification_metrics(y, folded, classes=CODES_2018)
    assert_matches_goldens(m, case, binary_accuracy(y, folded))
    assert m["per_class"]["AKIEC"]["support"] == 11


def test_percentile_interval_and_the_ci_shape():
    from dermascan.evaluation.metrics import bootstrap_interval, percentile_interval

    values = np.arange(1001) / 1000  # 0.000 ... 1.000
    assert percentile_interval(values) == pytest.approx((0.025, 0.975))
    assert percentile_interval(values, 0.5) == pytest.approx((0.25, 0.75))
    assert percentile_interval(np.array([])) == (None, None)
    interval = bootstrap_interval(values, 0.5, 0.95, 1200)
    assert interval == {"estimate": 0.5, "low": pytest.approx(0.025), "high": pytest.approx(0.975), "level": 0.95,
                        "n_resamples": 1200, "n_used": 1001}
    assert bootstrap_interval(np.array([]), 0.4, 0.95, 0)["low"] is None
