"""The referral decision: should a doctor see this lesion? (numpy only, no TensorFlow)

A user wants one answer, not eight ranked probabilities. The **referral
score** of an image is the summed probability of the classes that need a
doctor: by default every malignant and pre-malignant class of
``dermascan.classes`` (``REFERRAL_CODES``: AK, BCC, MEL, SCC), or the codes in
``evaluate.referral.classes``. The decision rule is

    refer  <=>  referral_score >= threshold

and the threshold is chosen on the **val** split, on the same probabilities
the exported model returns (one view, val's temperature applied), as the
highest threshold whose val sensitivity reaches
``evaluate.referral.target_sensitivity``. The highest such threshold refers
the fewest images (best specificity) while keeping that sensitivity on val;
whether it keeps it on new images is what the test split measures.

How the export and the service use it::

    codes = referral_codes(cfg.evaluate.referral.classes)      # or metrics.json["referral"]["classes"]
    score = referral_score(probabilities, class_indices(codes))
    refer = score >= metrics_json["referral"]["threshold"]

Test-split rates (sensitivity, specificity, PPV, NPV) get percentile
bootstrap CIs over images, not stratified (the number of images needing
referral varies between resamples, as it would in a new sample). The
threshold is held fixed: the CI is about the test images, not about the
choice of threshold on val.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np

from dermascan.classes import CODES, INDEX, REFERRAL_CODES
from dermascan.errors import ConfigError, DataError
from dermascan.evaluation.metrics import bootstrap_interval

log = logging.getLogger("dermascan.evaluation.referral")

#: The four rates of the decision, in the order reports show them.
RATES: tuple[str, ...] = ("sensitivity", "specificity", "ppv", "npv")
# Floating-point slack when comparing a sensitivity with its target (0.95 * 20 is 18.999999999999996).
_TOL = 1e-9


def referral_codes(configured: Optional[Sequence[str]] = None) -> tuple[str, ...]:
    """The class codes the referral score sums: ``configured`` checked, or ``REFERRAL_CODES`` when it is None.

    ConfigError for an empty list, an unknown code or a repeated one, so
    that a typo fails at start-up instead of silently dropping a cancer class.
    """
    if configured is None:
        return REFERRAL_CODES
    codes = tuple(str(code) for code in configured)
    if not codes:
        raise ConfigError("evaluate.referral.classes is empty: name at least one class code, or null for the default")
    unknown = [code for code in codes if code not in INDEX]
    if unknown:
        raise ConfigError(
            f"evaluate.referral.classes holds unknown code(s) {', '.join(unknown)}; choose from {', '.join(CODES)}"
        )
    if len(set(codes)) != len(codes):
        raise ConfigError(f"evaluate.referral.classes repeats a code: {list(codes)}")
    return codes


def check_target(target: float) -> float:
    """``target`` as a float; ConfigError unless 0 < target <= 1."""
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"evaluate.referral.target_sensitivity must be in (0, 1], got {target}")
    return float(target)


def class_indices(codes: Sequence[str]) -> list[int]:
    """Column indices of ``codes`` in the model's output (``CODES`` order)."""
    return [INDEX[code] for code in referral_codes(codes)]


def referral_score(probabilities: np.ndarray, class_indices: Sequence[int]) -> np.ndarray:
    """The summed probability of the referral classes, one score per row of ``probabilities`` [N, K].

    A sum, not a maximum: a lesion the model splits between melanoma and
    basal cell carcinoma needs a doctor as much as one it calls melanoma.
    """
    probabilities = np.asarray(probabilities, dtype=float)
    if probabilities.ndim != 2:
        raise ValueError(f"probabilities must be a 2-D [N, K] array, got shape {probabilities.shape}")
    indices = list(class_indices)
    if not indices:
        raise ValueError("class_indices is empty: the referral score needs at least one class")
    return probabilities[:, indices].sum(axis=1)


def needs_referral(labels: Sequence[Any], codes: Sequence[str]) -> np.ndarray:
    """Boolean [N]: whether each true label (a class code) is one of the referral ``codes``."""
    wanted = set(codes)
    return np.array([label in wanted for label in labels], dtype=bool)


def choose_threshold(scores: np.ndarray, needs_referral: np.ndarray, target_sensitivity: float) -> float:
    """The highest threshold whose sensitivity on these images is >= ``target_sensitivity``.

    Decision rule: refer when ``score >= threshold``. With P images needing
    referral, reaching the target takes k = ceil(target x P) of them, and
    the highest threshold that refers k of them is the k-th highest score
    among them; any higher threshold refers fewer, any lower one refers more
    images without needing to. Images without a referral class do not move
    the threshold; they only decide the specificity it gets.

    Ties: every image scoring exactly the threshold is referred, so when
    several images needing referral share the k-th score, all of them are
    referred and the sensitivity on these images exceeds the target.

    DataError when no image needs referral: no threshold has a sensitivity then.
    """
    scores = np.asarray(scores, dtype=float)
    positives = np.asarray(needs_referral, dtype=bool)
    if scores.ndim != 1 or scores.shape != positives.shape:
        raise ValueError(f"scores and needs_referral must be 1-D of the same length, got {scores.shape}, {positives.shape}")
    target = check_target(target_sensitivity)
    n_positive = int(positives.sum())
    if n_positive == 0:
        raise DataError(
            f"none of the {len(scores)} images needs referral (no true referral class), so no threshold can be "
            "chosen for a sensitivity"
        )
    k = max(1, math.ceil(target * n_positive - _TOL))
    return float(np.sort(scores[positives])[::-1][k - 1])


def decision_counts(scores: np.ndarray, needs_referral: np.ndarray, threshold: float) -> dict[str, int]:
    """True/false positives and negatives of ``score >= threshold`` against ``needs_referral``."""
    refer = np.asarray(scores, dtype=float) >= threshold
    positives = np.asarray(needs_referral, dtype=bool)
    return {
        "tp": int((refer & positives).sum()),
        "fn": int((~refer & positives).sum()),
        "fp": int((refer & ~positives).sum()),
        "tn": int((~refer & ~positives).sum()),
    }


def _rates(tp: np.ndarray, fn: np.ndarray, fp: np.ndarray, tn: np.ndarray) -> dict[str, np.ndarray]:
    """The four rates from (arrays of) counts; NaN where a denominator is zero."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "sensitivity": np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), np.nan),
            "specificity": np.where(tn + fp > 0, tn / np.maximum(tn + fp, 1), np.nan),
            "ppv": np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), np.nan),
            "npv": np.where(tn + fn > 0, tn / np.maximum(tn + fn, 1), np.nan),
        }


def rates(counts: dict[str, int]) -> dict[str, Optional[float]]:
    """Sensitivity, specificity, PPV and NPV of a decision's counts; None where undefined (zero denominator)."""
    values = _rates(*(np.array([counts[k]], dtype=float) for k in ("tp", "fn", "fp", "tn")))
    return {name: (None if np.isnan(v[0]) else float(v[0])) for name, v in values.items()}


def rates_ci(
    scores: np.ndarray, needs_referral: np.ndarray, threshold: float, n_resamples: int, seed: int,
    level: float = 0.95,
) -> dict[str, dict[str, Any]]:
    """Each rate with a percentile bootstrap CI over images (``bootstrap_interval``'s shape), threshold fixed.

    Resampling N images with replacement only moves the four cell counts
    (TP, FN, FP, TN), and their joint distribution is multinomial with the
    observed cell shares, so the counts are drawn directly: the same
    bootstrap as resampling rows, in O(resamples) instead of O(resamples x N).
    Not stratified. A resample where a rate is undefined (e.g. no image
    needing referral drawn) is left out of that rate's interval (``n_used``).
    """
    counts = decision_counts(scores, needs_referral, threshold)
    estimate = rates(counts)
    cells = np.array([counts[k] for k in ("tp", "fn", "fp", "tn")], dtype=float)
    n = int(cells.sum())
    if n_resamples and n:
        drawn = np.random.default_rng(seed).multinomial(n, cells / n, size=n_resamples).astype(float)
        resampled = _rates(*drawn.T)
    else:
        resampled = {name: np.array([]) for name in RATES}
    return {
        name: bootstrap_interval(values[~np.isnan(values)], estimate[name], level, n_resamples)
        for name, values in resampled.items()
    }


def verdict(sensitivity: dict[str, Any], target: float) -> str:
    """One line: how the test sensitivity (an interval of ``rates_ci``) compares with the target."""
    value, low, high = sensitivity["estimate"], sensitivity.get("low"), sensitivity.get("high")
    if value is None:
        return "test sensitivity is undefined: no test image needs referral"
    head = f"test sensitivity {value:.3f}"
    if low is None:
        side = "reaches" if value >= target - _TOL else "is below"
        return f"{head} {side} the {target:g} target (no CI: evaluate.bootstrap_resamples=0)"
    head += f" (95% CI {low:.3f}–{high:.3f})"
    if low >= target - _TOL:
        return f"{head} reaches the {target:g} target, and so does the whole CI"
    if value >= target - _TOL:
        return f"{head} reaches the {target:g} target; the CI reaches below it"
    if high >= target - _TOL:
        return f"{head} is below the {target:g} target; the CI contains it"
    return f"{head} is below the {target:g} target, and so is the whole CI: the val threshold does not carry over to test"


def referrals_per_100(counts: dict[str, int]) -> Optional[float]:
    n = sum(counts.values())
    return 100.0 * (counts["tp"] + counts["fp"]) / n if n else None


def operating_point(
    val_scores: np.ndarray,
    val_needs: np.ndarray,
    test_scores: np.ndarray,
    test_needs: np.ndarray,
    codes: Sequence[str],
    target_sensitivity: float,
    probabilities: str,
    n_resamples: int,
    seed: int,
    split: str = "test",
) -> dict[str, Any]:
    """metrics.json's ``referral``: the threshold chosen on val, and the decision's rates on ``split`` (its key).

    ``probabilities`` says which probabilities the scores come from (e.g.
    "calibrated probabilities (T = 1.31, fitted on val)"), for ``chosen_on``.
    Raises DataError (via :func:`choose_threshold`) when no val image needs referral.
    """
    threshold = choose_threshold(val_scores, val_needs, target_sensitivity)
    val_counts = decision_counts(val_scores, val_needs, threshold)
    val_rates = rates(val_counts)
    test_counts = decision_counts(test_scores, test_needs, threshold)
    test = rates_ci(test_scores, test_needs, threshold, n_resamples, seed)
    n_val, p_val = len(val_scores), int(np.sum(val_needs))
    return {
        "classes": list(codes),
        "target_sensitivity": float(target_sensitivity),
        "threshold": threshold,
        "rule": "refer when the summed probability of the classes is >= threshold",
        "chosen_on": f"val, {n_val} images, {p_val} needing referral, {probabilities}",
        "val": {
            "sensitivity": val_rates["sensitivity"],
            "specificity": val_rates["specificity"],
            "n": n_val,
            "n_positive": p_val,
        },
        split: {
            **test,
            "referrals_per_100": referrals_per_100(test_counts),
            "n": len(test_scores),
            "n_positive": int(np.sum(test_needs)),
            "counts": test_counts,
        },
        "verdict": verdict(test["sensitivity"], target_sensitivity),
    }
