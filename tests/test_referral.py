"""dermascan.evaluation.referral: the threshold by hand, the CIs' coverage, the verdict, the config."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dermascan.classes import CLASSES, CODES, Category
from dermascan.config import EvaluateRunConfig
from dermascan.errors import ConfigError, DataError
from dermascan.evaluation import referral
from dermascan.evaluation.referral import (
    choose_threshold,
    class_indices,
    decision_counts,
    needs_referral,
    operating_point,
    rates,
    rates_ci,
    referral_codes,
    referral_score,
    verdict,
)

from .conftest import compose_config

# Five images needing referral and four that do not, with their referral scores.
POSITIVES = [0.9, 0.8, 0.7, 0.6, 0.3]
NEGATIVES = [0.75, 0.5, 0.2, 0.1]
SCORES = np.array(POSITIVES + NEGATIVES)
NEEDS = np.array([True] * 5 + [False] * 4)


@pytest.mark.parametrize(
    "target, threshold",
    [
        # 0.8 of 5 = 4 images: the 4th highest positive score, 0.6 (0.61 would refer only 3 of 5).
        (0.8, 0.6),
        # 0.95 of 5 = 4.75, so all 5: the lowest positive score.
        (0.95, 0.3),
        (1.0, 0.3),
        # 0.6 of 5 = 3: 0.7. 0.2 of 5 = 1: the highest, 0.9.
        (0.6, 0.7),
        (0.2, 0.9),
        # 0.01 of 5 still needs one image referred.
        (0.01, 0.9),
    ],
)
def test_threshold_by_hand(target, threshold):
    assert choose_threshold(SCORES, NEEDS, target) == threshold
    counts = decision_counts(SCORES, NEEDS, threshold)
    assert counts["tp"] / 5 >= target


def test_threshold_hand_example_rates():
    # refer when score >= 0.6: positives 0.9, 0.8, 0.7, 0.6 referred, 0.3 missed; negative 0.75 referred.
    counts = decision_counts(SCORES, NEEDS, 0.6)
    assert counts == {"tp": 4, "fn": 1, "fp": 1, "tn": 3}
    assert rates(counts) == {"sensitivity": 0.8, "specificity": 0.75, "ppv": 0.8, "npv": 0.75}
    # the next higher threshold misses a second positive
    assert decision_counts(SCORES, NEEDS, 0.61)["tp"] == 3


def test_a_target_times_p_that_floats_just_above_an_integer_is_not_rounded_up():
    # 0.55 * 100 is 55.00000000000001 in floating point: 55 of 100 is enough, not 56.
    scores = np.arange(100, 0, -1) / 100.0
    assert 0.55 * 100 > 55
    assert choose_threshold(scores, np.ones(100, bool), 0.55) == 0.46  # the 55th highest


def test_ties_at_the_threshold_are_all_referred():
    scores = np.array([0.5, 0.5, 0.5, 0.2, 0.5])
    needs = np.array([True, True, True, True, False])
    threshold = choose_threshold(scores, needs, 0.5)  # 2 of 4 needed; the 2nd highest is a tied 0.5
    assert threshold == 0.5
    counts = decision_counts(scores, needs, threshold)
    assert counts == {"tp": 3, "fn": 1, "fp": 1, "tn": 0}  # every 0.5 is referred: sensitivity 0.75 > 0.5


@pytest.mark.parametrize("seed", range(5))
def test_threshold_is_the_highest_reaching_the_target_against_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = 60
    needs = rng.random(n) < 0.3
    scores = np.round(rng.random(n), 2)  # rounded: ties happen
    target = float(rng.choice([0.5, 0.8, 0.9, 0.95, 1.0]))
    threshold = choose_threshold(scores, needs, target)

    def sensitivity(t):
        return (scores[needs] >= t).mean()

    reaching = [t for t in np.unique(scores) if sensitivity(t) >= target - 1e-12]
    assert threshold == max(reaching)
    higher = scores[scores > threshold]
    assert not len(higher) or sensitivity(higher.min()) < target


def test_no_image_needing_referral_is_refused():
    with pytest.raises(DataError, match="none of the 4 images needs referral"):
        choose_threshold(np.array([0.1, 0.2, 0.3, 0.4]), np.zeros(4, bool), 0.95)


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01])
def test_target_outside_0_1_is_refused(target):
    with pytest.raises(ConfigError, match="target_sensitivity must be in"):
        choose_threshold(SCORES, NEEDS, target)


def test_default_classes_are_the_malignant_and_premalignant_ones():
    wanted = {c.code for c in CLASSES if c.category in (Category.MALIGNANT, Category.PRE_MALIGNANT)}
    assert set(referral_codes(None)) == wanted == {"MEL", "BCC", "SCC", "AK"}
    assert class_indices(referral_codes(None)) == [CODES.index(c) for c in ("AK", "BCC", "MEL", "SCC")]
    assert referral_codes(["MEL"]) == ("MEL",)


@pytest.mark.parametrize(
    "codes, message",
    [([], "is empty"), (["MEL", "XYZ"], "unknown code"), (["MEL", "MEL"], "repeats"), (["mel"], "unknown code")],
)
def test_bad_referral_classes_are_refused(codes, message):
    with pytest.raises(ConfigError, match=message):
        referral_codes(codes)


def test_referral_score_sums_the_chosen_columns():
    probabilities = np.array([[0.1, 0.2, 0.05, 0.05, 0.3, 0.2, 0.05, 0.05], np.full(8, 1 / 8)])
    score = referral_score(probabilities, class_indices(["MEL", "BCC", "SCC", "AK"]))
    np.testing.assert_allclose(score, [0.1 + 0.2 + 0.3 + 0.05, 0.5])
    assert list(needs_referral(["MEL", "NV", "AK", None], ["MEL", "AK"])) == [True, False, True, False]


def test_config_defaults_and_checks():
    cfg = compose_config("evaluate_run", [], EvaluateRunConfig)
    assert cfg.evaluate.referral.classes is None and cfg.evaluate.referral.target_sensitivity == 0.95
    assert cfg.evaluate.subgroups.min_images == 30
    chosen = compose_config("evaluate_run", ["evaluate.referral.classes=[MEL,BCC]"], EvaluateRunConfig)
    assert list(chosen.evaluate.referral.classes) == ["MEL", "BCC"]
    for override, message in (
        ("evaluate.referral.classes=[MEL,NEVUS]", "unknown code"),
        ("evaluate.referral.target_sensitivity=0", "target_sensitivity"),
        ("evaluate.referral.target_sensitivity=1.5", "target_sensitivity"),
        ("evaluate.subgroups.min_images=0", "min_images"),
    ):
        with pytest.raises(ConfigError, match=message):
            compose_config("evaluate_run", [override], EvaluateRunConfig)


# --- bootstrap CIs -----------------------------------------------------------------------


def test_rates_ci_covers_the_true_sensitivity_about_95_percent_of_the_time():
    """200 samples of 150 images needing referral, each referred with probability 0.85 (the true sensitivity)."""
    rng = np.random.default_rng(2024)
    truth, covered = 0.85, 0
    for draw in range(200):
        referred = rng.random(150) < truth
        scores = np.r_[np.where(referred, 0.9, 0.1), rng.random(100) * 0.5]  # plus 100 images not needing it
        needs = np.r_[np.ones(150, bool), np.zeros(100, bool)]
        interval = rates_ci(scores, needs, 0.5, n_resamples=1000, seed=draw)["sensitivity"]
        covered += interval["low"] <= truth <= interval["high"]
    assert 0.90 <= covered / 200 <= 0.99, covered


def test_rates_ci_is_the_bootstrap_over_images():
    """The multinomial draw of the four counts gives the interval that resampling the images does."""
    rng = np.random.default_rng(5)
    n = 400
    needs = rng.random(n) < 0.3
    scores = np.clip(rng.normal(np.where(needs, 0.7, 0.3), 0.2), 0, 1)
    got = rates_ci(scores, needs, 0.5, n_resamples=4000, seed=1)
    draws = rng.integers(0, n, (4000, n))
    refer, pos = scores[draws] >= 0.5, needs[draws]
    by_rows = {
        "sensitivity": (refer & pos).sum(1) / pos.sum(1),
        "specificity": (~refer & ~pos).sum(1) / (~pos).sum(1),
        "ppv": (refer & pos).sum(1) / refer.sum(1),
        "npv": (~refer & ~pos).sum(1) / (~refer).sum(1),
    }
    for name, values in by_rows.items():
        low, high = np.percentile(values, [2.5, 97.5])
        assert got[name]["low"] == pytest.approx(low, abs=0.012), name
        assert got[name]["high"] == pytest.approx(high, abs=0.012), name
        assert got[name]["low"] <= got[name]["estimate"] <= got[name]["high"]
    assert got["sensitivity"]["n_used"] == 4000 and got["sensitivity"]["level"] == 0.95


def test_rates_ci_without_resamples_or_positives():
    no_ci = rates_ci(SCORES, NEEDS, 0.6, n_resamples=0, seed=0)
    assert no_ci["sensitivity"]["estimate"] == 0.8 and no_ci["sensitivity"]["low"] is None
    none_needing = rates_ci(SCORES, np.zeros(9, bool), 0.6, n_resamples=100, seed=0)
    assert none_needing["sensitivity"] == {**none_needing["sensitivity"], "estimate": None, "low": None, "n_used": 0}
    assert none_needing["specificity"]["estimate"] == pytest.approx(4 / 9)  # 0.9, 0.8, 0.75, 0.7, 0.6 referred


@pytest.mark.parametrize(
    "interval, expected",
    [
        ({"estimate": 0.97, "low": 0.955, "high": 0.99}, "reaches the 0.95 target, and so does the whole CI"),
        ({"estimate": 0.96, "low": 0.93, "high": 0.99}, "reaches the 0.95 target; the CI reaches below it"),
        ({"estimate": 0.93, "low": 0.89, "high": 0.96}, "is below the 0.95 target; the CI contains it"),
        ({"estimate": 0.85, "low": 0.80, "high": 0.90}, "is below the 0.95 target, and so is the whole CI"),
        ({"estimate": 0.93, "low": None, "high": None}, "is below the 0.95 target (no CI"),
    ],
)
def test_verdict(interval, expected):
    line = verdict(interval, 0.95)
    assert expected in line and "\n" not in line
    assert line.startswith(f"test sensitivity {interval['estimate']:.3f}")
    if interval["low"] is not None:
        assert f"(95% CI {interval['low']:.3f}–{interval['high']:.3f})" in line


def test_operating_point_shape_by_hand():
    test_scores = np.array([0.95, 0.65, 0.55, 0.2, 0.7, 0.1])
    test_needs = np.array([True, True, True, True, False, False])
    result = operating_point(SCORES, NEEDS, test_scores, test_needs, ("MEL", "BCC", "SCC", "AK"), 0.8,
                             "calibrated probabilities", n_resamples=200, seed=0)
    assert result["threshold"] == 0.6 and result["classes"] == ["MEL", "BCC", "SCC", "AK"]
    assert result["target_sensitivity"] == 0.8
    assert result["chosen_on"] == "val, 9 images, 5 needing referral, calibrated probabilities"
    assert result["val"] == {"sensitivity": 0.8, "specificity": 0.75, "n": 9, "n_positive": 5}
    test = result["test"]
    # at 0.6: 0.95 and 0.65 referred (2 of 4 needing it), 0.7 referred (1 of 2 not needing it)
    assert test["sensitivity"]["estimate"] == 0.5 and test["specificity"]["estimate"] == 0.5
    assert test["ppv"]["estimate"] == pytest.approx(2 / 3) and test["npv"]["estimate"] == pytest.approx(1 / 3)
    assert test["referrals_per_100"] == pytest.approx(50.0) and (test["n"], test["n_positive"]) == (6, 4)
    assert set(test["sensitivity"]) == {"estimate", "low", "high", "level", "n_resamples", "n_used"}
    assert result["verdict"].startswith("test sensitivity 0.500") and "below the 0.8 target" in result["verdict"]
    assert math.isfinite(result["threshold"])
    assert referral.RATES == ("sensitivity", "specificity", "ppv", "npv")
