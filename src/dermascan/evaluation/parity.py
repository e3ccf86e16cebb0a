"""How far a converted model (TFLite, SavedModel) is from the Keras model it came from (numpy only).

export runs every format on the same sample of test images as the Keras
model and keeps a format only if it passes three checks:

1. **Top-1 agreement** at least ``export.min_agreement[kind]``. It is kept,
   but it is not enough on its own: in a low-confidence model many images
   are near-ties between two classes, and any rounding flips some of them.
   On an isic-dev model, the median Keras top-2 margin of the images that
   int8 flips was 0.045, against 0.75 over all images.
2. **Balanced accuracy** (format minus Keras), with a paired percentile
   bootstrap CI over the parity images. The format is refused when the whole
   CI lies below ``-export.max_balanced_accuracy_drop``: a loss that the
   sample shows to be real. A point-estimate rule would decide on noise: on
   500 test images holding about ten of the rarest class, one flipped image
   of that class moves balanced accuracy by about 0.0125.
3. **The decisions the app acts on** must agree on at least
   ``export.min_decision_agreement`` of the images: the referral decision
   (score at or above ``metrics.json``'s referral threshold) on the parity
   images, and the out-of-scope gate's decision (score above its threshold)
   on the parity images and on out-of-scope images, so that both answers
   are exercised.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dermascan.evaluation.metrics import bootstrap_interval, classification_metrics
from dermascan.evaluation.referral import class_indices, referral_score

LEVEL = 0.95


def top1_agreement(reference: np.ndarray, probabilities: np.ndarray) -> float:
    return float(np.mean(reference.argmax(1) == probabilities.argmax(1)))


def balanced_accuracy_difference(
    labels: np.ndarray, reference: np.ndarray, probabilities: np.ndarray, n_resamples: int, seed: int
) -> dict[str, Any]:
    """Balanced accuracy of ``probabilities`` minus that of ``reference``, with a paired bootstrap CI.

    Both are scored on the same resampled images, so the interval is about
    the difference, not about either accuracy (whose own CIs are far wider).
    A resample counts only if it draws every class present in ``labels``,
    so each interval is about one fixed macro mean (as ``bootstrap_ci``).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    one_hot = labels[:, None] == classes[None, :]  # [n, k]
    right = {"format": probabilities.argmax(1) == labels, "reference": reference.argmax(1) == labels}

    def balanced(weights: np.ndarray, correct: np.ndarray) -> np.ndarray:
        totals = weights @ one_hot
        with np.errstate(invalid="ignore", divide="ignore"):
            return ((weights @ (one_hot & correct[:, None])) / totals).mean(axis=1)

    ones = np.ones((1, len(labels)))
    estimate = float(balanced(ones, right["format"])[0] - balanced(ones, right["reference"])[0])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(labels), np.full(len(labels), 1 / len(labels)), size=n_resamples).astype(float)
    used = (weights @ one_hot > 0).all(axis=1)
    weights = weights[used]
    differences = balanced(weights, right["format"]) - balanced(weights, right["reference"])
    return bootstrap_interval(differences, estimate, LEVEL, n_resamples)


def decision_agreement(reference: np.ndarray, probabilities: np.ndarray, referral: dict[str, Any]) -> dict[str, Any]:
    """Share of images whose referral decision (score >= threshold) is the same in both."""
    indices = class_indices(referral["classes"])
    threshold = float(referral["threshold"])
    before = referral_score(reference, indices) >= threshold
    after = referral_score(probabilities, indices) >= threshold
    return {"agreement": float(np.mean(before == after)), "threshold": threshold,
            "referred_keras": int(before.sum()), "referred_format": int(after.sum())}


def gate_agreement(reference: np.ndarray, scores: Optional[np.ndarray], threshold: float) -> dict[str, Any]:
    """Share of images whose out-of-scope decision (score > threshold) is the same in both.

    A format that lost the gate's output agrees on nothing.
    """
    before = np.asarray(reference) > threshold
    if scores is None:
        return {"agreement": 0.0, "threshold": threshold, "missing": "the format has no out_of_scope output"}
    after = np.asarray(scores) > threshold
    return {"agreement": float(np.mean(before == after)), "threshold": threshold, "n": int(len(before)),
            "rejected_keras": int(before.sum()), "rejected_format": int(after.sum())}


def compare(
    reference: np.ndarray,
    probabilities: np.ndarray,
    labels: Optional[np.ndarray],
    referral: Optional[dict[str, Any]] = None,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Everything parity.json records about one format against the reference."""
    result: dict[str, Any] = {
        "top1_agreement": top1_agreement(reference, probabilities),
        "max_abs_diff": float(np.max(np.abs(reference - probabilities))),
    }
    if labels is not None and len(labels):
        result["balanced_accuracy"] = classification_metrics(labels, probabilities)["balanced_accuracy"]
        result["balanced_accuracy_difference"] = balanced_accuracy_difference(
            labels, reference, probabilities, n_resamples, seed
        )
    if referral is not None:
        result["referral_decision"] = decision_agreement(reference, probabilities, referral)
    return result


def refusals(result: dict[str, Any], min_agreement: float, max_drop: float, min_decision_agreement: float) -> list[str]:
    """Why a format fails the checks above (empty: it passes)."""
    if "error" in result:
        return [result["error"]]
    reasons = []
    if result["top1_agreement"] < min_agreement:
        reasons.append(f"top-1 agreement {result['top1_agreement']:.4f} < {min_agreement}")
    difference = result.get("balanced_accuracy_difference")
    if difference and difference["high"] is not None and difference["high"] < -max_drop:
        reasons.append(
            f"balanced accuracy {difference['estimate']:+.4f} vs Keras (95% CI {difference['low']:+.4f} to "
            f"{difference['high']:+.4f}) lies wholly below -{max_drop}"
        )
    for key, what in (("referral_decision", "referral"), ("out_of_scope_decision", "out-of-scope")):
        decision = result.get(key)
        if decision and decision["agreement"] < min_decision_agreement:
            reasons.append(f"{what} decision agreement {decision['agreement']:.4f} < {min_decision_agreement}")
    return reasons


def _row(name: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"| {name} | refused: {result['error']} | | | | | |"
    difference = result.get("balanced_accuracy_difference")
    decision = result.get("referral_decision")
    gate = result.get("out_of_scope_decision")
    cells = [
        name,
        "kept" if result.get("kept", True) else "refused: " + "; ".join(result.get("refused", [])),
        f"{result['top1_agreement']:.4f}",
        f"{difference['estimate']:+.4f} ({difference['low']:+.4f} to {difference['high']:+.4f})"
        if difference and difference["low"] is not None else "n/a",
        f"{decision['agreement']:.4f}" if decision else "n/a",
        f"{gate['agreement']:.4f}" if gate else "n/a",
        f"{result['size_vs_fp32']:.2f}" if "size_vs_fp32" in result else "",
    ]
    return "| " + " | ".join(cells) + " |"


def markdown(report: dict[str, Any]) -> str:
    """The parity section of report.md and the model card."""
    head = [
        "## On-device formats (parity with Keras)",
        "",
        f"Every format ran on {report['n_images']} {report['source']} images. A format is kept when its top-1 "
        "agreement reaches its minimum, its balanced-accuracy CI does not lie wholly below "
        f"-{report['max_balanced_accuracy_drop']}, and its referral and out-of-scope decisions agree on at least "
        f"{report['min_decision_agreement']} of the images.",
        "",
        "| format | status | top-1 agreement | balanced accuracy vs Keras (95% CI) | referral decision agreement "
        "| out-of-scope decision agreement | size vs TFLite fp32 |",
        "|---|---|---|---|---|---|---|",
    ]
    dropped = report.get("dropped") or []
    tail = ([""] + [f"**Dropped:** {name}: {why}" for name, why in dropped]) if dropped else []
    rows = [_row(name, result) for name, result in report["formats"].items()]
    return "\n".join(head + rows + tail) + "\n"
