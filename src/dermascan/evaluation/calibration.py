"""Temperature scaling of softmax probabilities (numpy and scipy only, no TensorFlow).

Temperature scaling (Guo et al., 2017, "On Calibration of Modern Neural
Networks") divides a model's logits by one scalar T > 0 fitted on held-out
data. The model stores probabilities, not logits, so the log-probabilities
stand in for the logits: ``log p`` differs from the logits by a per-row
constant, which softmax ignores, so ``softmax(log p / T)`` is exactly
``softmax(logits / T)``. T > 1 softens over-confident predictions, T < 1
sharpens under-confident ones; the argmax, and so the accuracy and every
ranking metric per row, never changes.

Typical use: fit on the validation split, apply to the test split::

    t = fit_temperature(val_probabilities, val_labels)
    calibrated = apply_temperature(test_probabilities, t)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax

log = logging.getLogger("dermascan.evaluation.calibration")

#: Search range of the fitted temperature.
TEMPERATURE_BOUNDS: tuple[float, float] = (0.05, 20.0)

# Probabilities are clipped to at least this before the log, so that a zero
# probability (float32 softmax underflow) stays finite.
_EPS = 1e-12


def _log_probabilities(probabilities: np.ndarray) -> np.ndarray:
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D [N, K] array, got shape {probabilities.shape}")
    return np.log(np.clip(probabilities, _EPS, 1.0))


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    return temperature


def apply_temperature(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p) / T)`` row by row, as float64 [N, K].

    ``temperature == 1`` returns an unchanged float64 copy of
    ``probabilities`` (the identity, bit for bit). Otherwise probabilities
    are clipped to at least 1e-12 before the log, and the softmax is computed
    in log space, so no row overflows or turns into NaN at any T in range.
    """
    temperature = _check_temperature(temperature)
    if temperature == 1.0:
        return np.array(probabilities, dtype=float, copy=True)
    return np.exp(log_softmax(_log_probabilities(probabilities) / temperature, axis=1))


def _nll(log_p: np.ndarray, y_true: np.ndarray, temperature: float) -> float:
    return float(-log_softmax(log_p / temperature, axis=1)[np.arange(len(y_true)), y_true].mean())


def fit_temperature(
    probabilities: np.ndarray,
    y_true: Sequence[int],
    bounds: tuple[float, float] = TEMPERATURE_BOUNDS,
) -> float:
    """The temperature T in ``bounds`` that minimises the mean negative log-likelihood of ``y_true``.

    ``probabilities`` are softmax outputs [N, K] and ``y_true`` class
    indices [N]. The search is a bounded scalar minimisation
    (``scipy.optimize.minimize_scalar(method="bounded")``) over log T, where
    the NLL is smooth and the range is symmetric around T = 1. A result at
    the edge of ``bounds`` is logged as a warning: the model is then so
    mis-calibrated (or the data so small) that the true optimum may lie
    outside.
    """
    log_p = _log_probabilities(probabilities)
    y_true = np.asarray(y_true, dtype=int)
    if y_true.ndim != 1 or len(y_true) != len(log_p) or not len(y_true):
        raise ValueError(f"y_true must hold one class index per row ({len(log_p)}), got shape {y_true.shape}")
    if y_true.min() < 0 or y_true.max() >= log_p.shape[1]:
        raise ValueError(f"y_true holds class indices outside [0, {log_p.shape[1] - 1}]")
    low, high = (_check_temperature(b) for b in bounds)
    if not low < high:
        raise ValueError(f"bounds must be increasing, got {bounds}")

    result = minimize_scalar(
        lambda log_t: _nll(log_p, y_true, float(np.exp(log_t))),
        bounds=(np.log(low), np.log(high)),
        method="bounded",
        options={"xatol": 1e-6},
    )
    temperature = float(np.exp(result.x))
    if np.isclose(temperature, low, rtol=1e-3) or np.isclose(temperature, high, rtol=1e-3):
        log.warning("fitted temperature %.4g is at the edge of the search range %s", temperature, bounds)
    log.info(
        "temperature %.4f: NLL %.4f -> %.4f on %d rows",
        temperature, _nll(log_p, y_true, 1.0), float(result.fun), len(y_true),
    )
    return temperature
