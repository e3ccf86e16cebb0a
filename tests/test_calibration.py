"""dermascan.evaluation.calibration: temperature scaling recovers a known temperature and lowers ECE."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from dermascan.evaluation.calibration import (
    TEMPERATURE_BOUNDS,
    apply_temperature,
    fit_temperature,
)
from dermascan.evaluation.metrics import (
    classification_metrics,
    expected_calibration_error,
)

K = 8


def calibrated_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Well-ranked logits [N, K] and labels drawn from softmax(logits): softmax(logits) is calibrated."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, K)) * 1.5
    logits[:, 5] += 1.0  # an NV-like majority class
    p = softmax(logits, axis=1)
    y = (rng.random((n, 1)) > p.cumsum(axis=1)).sum(axis=1)
    return logits, np.minimum(y, K - 1)


def nll(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(p[np.arange(len(y)), y]).mean())


def test_temperature_one_is_the_identity():
    logits, _ = calibrated_case(500, 0)
    p = softmax(logits, axis=1)
    assert np.array_equal(apply_temperature(p, 1.0), p)
    assert apply_temperature(p, 1.0) is not p
    np.testing.assert_allclose(apply_temperature(p, 1.0 + 1e-9), p, atol=1e-8)


def test_apply_temperature_is_safe_and_keeps_the_argmax():
    logits, _ = calibrated_case(500, 1)
    p = softmax(logits, axis=1)
    p[0] = np.eye(K)[2]  # exact zeros, as float32 softmax underflow gives
    for t in (TEMPERATURE_BOUNDS[0], 0.5, 3.0, TEMPERATURE_BOUNDS[1]):
        q = apply_temperature(p, t)
        assert np.isfinite(q).all()
        np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(q.argmax(axis=1), p.argmax(axis=1))
    assert apply_temperature(p, 4.0)[1].max() < p[1].max()  # T > 1 softens
    assert apply_temperature(p, 0.25)[1].max() > p[1].max()  # T < 1 sharpens
    np.testing.assert_allclose(apply_temperature(p, 2.0)[1:], softmax(logits[1:] / 2.0, axis=1), atol=1e-12)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            apply_temperature(p, bad)


@pytest.mark.parametrize("factor", [4.0, 0.5])
def test_fit_recovers_the_true_temperature_and_lowers_ece(factor):
    logits, y = calibrated_case(20000, 2)
    miscalibrated = softmax(logits * factor, axis=1)  # factor 4: over-confident; 0.5: under-confident
    t = fit_temperature(miscalibrated, y)
    assert t == pytest.approx(factor, rel=0.06)
    calibrated = apply_temperature(miscalibrated, t)
    before, after = expected_calibration_error(y, miscalibrated), expected_calibration_error(y, calibrated)
    assert before > 0.1 and after < 0.02 and after < before / 5
    assert nll(calibrated, y) < nll(miscalibrated, y)
    # Temperature changes confidence, never the ranking within a row: accuracy is unchanged.
    assert classification_metrics(y, calibrated)["balanced_accuracy"] == pytest.approx(
        classification_metrics(y, miscalibrated)["balanced_accuracy"]
    )


def test_fit_is_the_nll_minimum_and_about_one_when_calibrated():
    logits, y = calibrated_case(5000, 3)
    p = softmax(logits, axis=1)
    t = fit_temperature(p, y)
    assert t == pytest.approx(1.0, abs=0.08)
    best = nll(apply_temperature(p, t), y)
    for other in (t * 0.97, t * 1.03):
        assert best < nll(apply_temperature(p, other), y)


def test_fit_rejects_bad_input():
    p = softmax(np.zeros((4, K)), axis=1)
    with pytest.raises(ValueError, match="one class index per row"):
        fit_temperature(p, [0, 1])
    with pytest.raises(ValueError, match="outside"):
        fit_temperature(p, [0, 1, 2, K])
    with pytest.raises(ValueError, match="bounds"):
        fit_temperature(p, [0, 1, 2, 3], bounds=(2.0, 1.0))
