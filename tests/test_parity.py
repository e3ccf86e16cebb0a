"""The export's parity gate (dermascan.evaluation.parity) on hand-made predictions whose answers are computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from dermascan.classes import INDEX
from dermascan.evaluation.parity import (
    balanced_accuracy_difference,
    compare,
    decision_agreement,
    markdown,
    refusals,
)
from dermascan.export import agreement_bar


def one_hot(classes: list[int], confidence: float = 0.9) -> np.ndarray:
    out = np.full((len(classes), 8), (1 - confidence) / 7)
    out[np.arange(len(classes)), classes] = confidence
    return out


def test_balanced_accuracy_difference_is_paired_and_exact_on_a_hand_example():
    labels = np.array([0, 0, 1, 1])
    reference = one_hot([0, 0, 1, 1])  # balanced accuracy 1.0
    converted = one_hot([0, 0, 1, 0])  # class 1 recall 0.5: balanced accuracy 0.75
    difference = balanced_accuracy_difference(labels, reference, converted, n_resamples=2000, seed=0)
    assert difference["estimate"] == pytest.approx(-0.25)
    # A resample loses where it draws the flipped image and ties where it does not: the CI is <= 0.
    assert difference["high"] == pytest.approx(0.0) and difference["low"] <= -0.25
    assert 0 < difference["n_used"] <= 2000
    same = balanced_accuracy_difference(labels, reference, reference, n_resamples=200, seed=0)
    assert (same["estimate"], same["low"], same["high"]) == (0.0, 0.0, 0.0)


def test_balanced_accuracy_difference_ci_covers_a_true_difference_of_zero():
    """Two formats that err independently at the same rate: the 95% CI should cover 0 in most samples."""
    rng = np.random.default_rng(1)
    covered = 0
    for trial in range(60):
        labels = rng.integers(0, 4, 300)
        reference = one_hot(list(np.where(rng.random(300) < 0.8, labels, (labels + 1) % 4)))
        converted = one_hot(list(np.where(rng.random(300) < 0.8, labels, (labels + 1) % 4)))
        difference = balanced_accuracy_difference(labels, reference, converted, n_resamples=300, seed=trial)
        covered += difference["low"] <= 0 <= difference["high"]
    assert 0.85 <= covered / 60 <= 1.0


def test_referral_decision_agreement_counts_flips_across_the_threshold():
    referral = {"classes": ["MEL", "BCC"], "threshold": 0.5}
    reference = np.zeros((4, 8))
    reference[:, INDEX["NV"]] = [0.9, 0.55, 0.45, 0.1]
    reference[:, INDEX["MEL"]] = 1 - reference[:, INDEX["NV"]]  # scores 0.1, 0.45, 0.55, 0.9
    converted = reference.copy()
    converted[1, [INDEX["NV"], INDEX["MEL"]]] = [0.4, 0.6]  # 0.45 -> 0.6: crosses the threshold
    result = decision_agreement(reference, converted, referral)
    assert result == {"agreement": 0.75, "threshold": 0.5, "referred_keras": 2, "referred_format": 3}


def test_refusals_name_each_failed_check_and_pass_a_noisy_but_unproven_loss():
    labels = np.array([0, 0, 1, 1] * 25)
    reference = one_hot(list(labels))
    good = compare(reference, reference, labels, n_resamples=200)
    assert refusals(good, 0.97, 0.01, 0.98) == []
    # 10 of the 50 class-1 images flipped: balanced accuracy -0.10, and the whole CI below -0.01.
    flipped = labels.copy()
    flipped[np.where(labels == 1)[0][:10]] = 0
    bad = compare(reference, one_hot(list(flipped)), labels, n_resamples=500)
    reasons = refusals(bad, 0.97, 0.01, 0.98)
    assert reasons[0] == "top-1 agreement 0.9000 < 0.97"
    assert "balanced accuracy -0.1000 vs Keras" in reasons[1] and "lies wholly below -0.01" in reasons[1]
    # One flipped image: agreement 0.99 passes 0.97, and the CI reaches 0 (no proven loss).
    one = labels.copy()
    one[1] = 1
    assert refusals(compare(reference, one_hot(list(one)), labels, n_resamples=500), 0.97, 0.01, 0.98) == []
    assert refusals({"error": "fails to run"}, 0.0, 1.0, 0.0) == ["fails to run"]
    referral = {"classes": ["AK"], "threshold": 0.5}
    decided = compare(reference, one_hot([0] * 100), labels, referral=referral, n_resamples=50)
    assert any(r.startswith("referral decision agreement 0.5000 < 0.98") for r in refusals(decided, 0.0, 1.0, 0.98))


def test_agreement_bars_per_kind_and_the_markdown_table():
    bars = {"fp32": 0.999, "fp16": 0.995, "int8_full": 0.97}
    assert agreement_bar(bars, "tflite_int8_full") == 0.97
    assert agreement_bar(bars, "keras") == agreement_bar(bars, "savedmodel") == 0.999  # the float graph: fp32's bar
    assert agreement_bar(0.9, "tflite_fp16") == 0.9
    report = {
        "n_images": 100, "source": "test split", "max_balanced_accuracy_drop": 0.01, "min_decision_agreement": 0.98,
        "formats": {
            "tflite_fp32": {"top1_agreement": 1.0, "kept": True, "refused": [], "size_vs_fp32": 1.0},
            "tflite_int8_full": {"top1_agreement": 0.95, "kept": False, "refused": ["top-1 agreement 0.9500 < 0.97"],
                                 "balanced_accuracy_difference": {"estimate": -0.02, "low": -0.05, "high": 0.01},
                                 "referral_decision": {"agreement": 0.99}, "size_vs_fp32": 0.297},
        },
        "dropped": [["tflite_int8_full", "top-1 agreement 0.9500 < 0.97"]],
    }
    text = markdown(report)
    assert ("| tflite_int8_full | refused: top-1 agreement 0.9500 < 0.97 | 0.9500 | -0.0200 (-0.0500 to +0.0100) "
            "| 0.9900 | n/a | 0.30 |") in text
    assert "| tflite_fp32 | kept | 1.0000 | n/a | n/a | n/a | 1.00 |" in text
    assert "**Dropped:** tflite_int8_full: top-1 agreement 0.9500 < 0.97" in text
