"""Metrics per patient subgroup of the evaluated split: for whom does the model work?

Four ways to split the images, from the manifest's columns as ingestion
wrote them (``age``, ``sex``, ``site``, and ``image_id``/``lesion_id``/``source``):

* ``age_band``: ``<30``, ``30–49``, ``50–69``, ``≥70`` from ``age`` (ISIC's
  ``age_approx``, multiples of 5), or ``unknown``;
* ``sex``: as written (``male``, ``female``), or ``unknown``;
* ``site``: the ISIC 2019 ``anatom_site_general`` (HAM10000's
  ``localization`` is mapped onto it at ingestion), or ``unknown``;
* ``collection``: the source collection, from the ids (see :func:`collection`).

Missing or empty metadata is the group ``unknown``; no image is dropped.
For each group: ``n`` (labelled images), ``n_positive`` (needing referral),
balanced accuracy and mean AUC (macro over the classes with both positives
and negatives *in that group*, ``n_auc_classes`` of them; None when there is
none), and the referral decision's sensitivity and specificity at the
threshold chosen on val; each with a percentile bootstrap 95% CI over the
group's images (not stratified; ``metrics.bootstrap_ci`` and
``referral.rates_ci``). Two flags:

* ``small``: fewer than ``evaluate.subgroups.min_images`` images; its
  figures are shown but carry little weight;
* ``below overall``: the group's referral-sensitivity CI lies wholly below
  the overall test sensitivity, i.e. the decision misses more of this
  group's lesions than the test set as a whole suggests.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pandas as pd

from dermascan.classes import INDEX
from dermascan.evaluation.metrics import (
    bootstrap_ci,
    bootstrap_interval,
    classification_metrics,
)
from dermascan.evaluation.referral import needs_referral, rates_ci

log = logging.getLogger("dermascan.evaluation.subgroups")

UNKNOWN = "unknown"
#: Age bands, in order, with their lower edges; ages are ISIC's ``age_approx``.
AGE_BANDS: tuple[str, ...] = ("<30", "30–49", "50–69", "≥70")
_AGE_EDGES: tuple[float, ...] = (0, 30, 50, 70, math.inf)
#: Source collections: the three ISIC 2019 names them, and everything else.
COLLECTIONS: tuple[str, ...] = ("HAM10000", "BCN_20000", "MSK", "other")
OTHER = "other"
#: The ways to split, in the order reports show them.
DIMENSIONS: tuple[str, ...] = ("age_band", "sex", "site", "collection")
SMALL, BELOW_OVERALL = "small", "below overall"
#: The per-group metrics that carry a CI, in report order.
METRICS: tuple[str, ...] = ("balanced_accuracy", "mean_auc", "referral_sensitivity", "referral_specificity")


def age_band(age: Any) -> str:
    """``"<30"``, ``"30–49"``, ``"50–69"``, ``"≥70"``, or ``"unknown"`` (missing, not a number, negative)."""
    try:
        value = float(age)
    except (TypeError, ValueError):
        return UNKNOWN
    if not math.isfinite(value) or value < 0:
        return UNKNOWN
    for band, low, high in zip(AGE_BANDS, _AGE_EDGES, _AGE_EDGES[1:]):
        if low <= value < high:
            return band
    return UNKNOWN


def collection(image_id: Any, lesion_id: Any, source: Any) -> str:
    """The source collection of one image, from what ingestion kept of the official files.

    The ISIC 2019 training set joins three collections, and its metadata
    tells them apart by the ``lesion_id`` prefix, with the image ids as a
    second mark (counts on the official ISIC 2019 CSVs):

    * ``HAM_…`` lesion ids: **HAM10000** (10,015 images). Images whose
      ``source`` includes ``isic2018_train`` are HAM10000 too: the ISIC 2018
      Task 3 training set *is* HAM10000 (an image ingested from it alone
      has its lesion id from HAM10000_metadata.csv, or none).
    * ``BCN_…`` lesion ids: **BCN_20000** (12,413 images).
    * ``MSK…`` lesion ids (e.g. ``MSK4_0011169``; 819 images) or an image id
      ending in ``_downsampled`` (2,074 images, 1,258 of them without a
      lesion id): **MSK** (2,077 images in all).
    * Everything else is ``other``: the 826 ISIC 2019 images with no lesion
      id and no ``_downsampled`` suffix (older ISIC archive images; ISIC 2019
      credits its non-HAM, non-BCN images to MSK as a whole, but nothing per
      image says so), the ISIC 2018 Validation and Test images (no lesion ids
      in those releases), and the demo's synthetic images.
    """
    lesion = "" if pd.isna(lesion_id) else str(lesion_id)
    if lesion.startswith("HAM_") or "isic2018_train" in ("" if pd.isna(source) else str(source)):
        return "HAM10000"
    if lesion.startswith("BCN_"):
        return "BCN_20000"
    if lesion.startswith("MSK") or str(image_id).endswith("_downsampled"):
        return "MSK"
    return OTHER


def _text(values: pd.Series) -> pd.Series:
    """Strings, with missing or blank values as ``unknown``."""
    text = values.astype("object").map(lambda v: UNKNOWN if pd.isna(v) else str(v).strip())
    return text.mask(text == "", UNKNOWN)


def assign(frame: pd.DataFrame) -> pd.DataFrame:
    """The group of every row of a manifest-like ``frame`` in each dimension: columns ``DIMENSIONS``, same index.

    A column the frame lacks makes that dimension ``unknown`` for every row.
    """
    def column(name: str) -> pd.Series:
        return frame[name] if name in frame else pd.Series(np.nan, index=frame.index, dtype="object")

    return pd.DataFrame({
        "age_band": pd.Series([age_band(a) for a in column("age")], index=frame.index, dtype="object"),
        "sex": _text(column("sex")),
        "site": _text(column("site")),
        "collection": pd.Series(
            [collection(i, lesion, s) for i, lesion, s in zip(column("image_id"), column("lesion_id"), column("source"))],
            index=frame.index, dtype="object",
        ),
    }, index=frame.index)


def ordered(dimension: str, counts: pd.Series) -> list[str]:
    """The groups of one dimension in report order: age bands in band order, others largest first; unknown/other last."""
    if dimension == "age_band":
        return [band for band in (*AGE_BANDS, UNKNOWN) if band in counts.index]
    last = {UNKNOWN, OTHER}
    known = sorted((g for g in counts.index if g not in last), key=lambda g: (-counts[g], g))
    return known + [g for g in (OTHER, UNKNOWN) if g in counts.index]


def _interval_or_empty(value: Optional[float]) -> dict[str, Any]:
    return bootstrap_interval(np.array([]), value, 0.95, 0)


def group_metrics(
    truth: np.ndarray, probabilities: np.ndarray, needs: np.ndarray, scores: Optional[np.ndarray],
    threshold: Optional[float], n_resamples: int, seed: int,
) -> dict[str, Any]:
    """One group's n, balanced accuracy, mean AUC and referral sensitivity/specificity, each with its CI."""
    metrics = classification_metrics(truth, probabilities)
    if n_resamples:
        ci = bootstrap_ci(truth, probabilities, n_resamples=n_resamples, seed=seed)
    else:
        ci = {name: _interval_or_empty(metrics[name]) for name in ("balanced_accuracy", "mean_auc")}
    result: dict[str, Any] = {
        "n": len(truth),
        "n_positive": int(needs.sum()),
        "n_classes": int(len(np.unique(truth))),
        "n_auc_classes": sum(c["auc"] is not None for c in metrics["per_class"].values()),
        "balanced_accuracy": ci["balanced_accuracy"],
        "mean_auc": ci["mean_auc"],
    }
    if threshold is None or scores is None:
        result["referral_sensitivity"] = result["referral_specificity"] = None
    else:
        decision = rates_ci(scores, needs, threshold, n_resamples, seed)
        result["referral_sensitivity"] = decision["sensitivity"]
        result["referral_specificity"] = decision["specificity"]
    return result


def flags(group: dict[str, Any], min_images: int, overall_sensitivity: Optional[float]) -> list[str]:
    """``small`` under ``min_images`` images; ``below overall`` when the referral-sensitivity CI lies wholly below the overall estimate."""
    out = [SMALL] if group["n"] < min_images else []
    high = (group.get("referral_sensitivity") or {}).get("high")
    if high is not None and overall_sensitivity is not None and high < overall_sensitivity:
        out.append(BELOW_OVERALL)
    return out


def evaluate_subgroups(
    frame: pd.DataFrame,
    probabilities: np.ndarray,
    referral_codes: Sequence[str],
    scores: Optional[np.ndarray] = None,
    threshold: Optional[float] = None,
    overall_sensitivity: Optional[float] = None,
    *,
    min_images: int,
    n_resamples: int,
    seed: int,
    split: str = "test",
) -> dict[str, Any]:
    """metrics.json's ``subgroups``: every group of every dimension of ``frame``'s labelled rows.

    ``frame``: manifest rows (``label`` and the metadata columns) in the
    order of ``probabilities`` [N, 8] (the reported ones) and ``scores`` [N]
    (the referral scores the decision was evaluated on). Without a
    ``threshold`` (referral skipped) the referral figures are None.
    """
    labelled = frame["label"].notna().to_numpy()
    rows = frame[labelled].reset_index(drop=True)
    p = np.asarray(probabilities, dtype=float)[labelled]
    s = None if scores is None else np.asarray(scores, dtype=float)[labelled]
    truth = rows["label"].map(INDEX).to_numpy(int)
    needs = needs_referral(rows["label"], referral_codes)
    groups = assign(rows)
    dimensions: dict[str, dict[str, Any]] = {}
    for dimension in DIMENSIONS:
        counts = groups[dimension].value_counts()
        dimensions[dimension] = {}
        for group in ordered(dimension, counts):
            where = (groups[dimension] == group).to_numpy()
            result = group_metrics(truth[where], p[where], needs[where], None if s is None else s[where],
                                   threshold, n_resamples, seed)
            result["flags"] = flags(result, min_images, overall_sensitivity)
            dimensions[dimension][group] = result
    flagged = [f"{d} {g}" for d, groups_of in dimensions.items() for g, r in groups_of.items() if BELOW_OVERALL in r["flags"]]
    if flagged:
        log.warning("referral sensitivity CI wholly below the overall %.3f in: %s", overall_sensitivity, ", ".join(flagged))
    return {
        "split": split,
        "n": len(rows),
        "min_images": int(min_images),
        "referral_threshold": threshold,
        "overall_balanced_accuracy": classification_metrics(truth, p)["balanced_accuracy"] if len(rows) else None,
        "overall_referral_sensitivity": overall_sensitivity,
        "mean_auc_over": "classes with both positives and negatives in the group",
        "dimensions": dimensions,
    }


def table(subgroups: dict[str, Any]) -> pd.DataFrame:
    """metrics.json's ``subgroups`` as one flat table: a row per group, each metric with ``_low``/``_high``."""
    rows = []
    for dimension, groups in (subgroups.get("dimensions") or {}).items():
        for group, result in groups.items():
            row = {"dimension": dimension, "group": group, "n": result["n"], "n_positive": result["n_positive"]}
            for name in METRICS:
                interval = result.get(name) or {}
                row[name], row[f"{name}_low"], row[f"{name}_high"] = (
                    interval.get("estimate"), interval.get("low"), interval.get("high"))
            row["flags"] = ", ".join(result["flags"])
            rows.append(row)
    return pd.DataFrame(rows)


def metric_name(text: str) -> str:
    """A group or dimension as part of an MLflow metric name: ASCII lower case, digits and ``_``.

    ``<30`` -> ``lt30``, ``≥70`` -> ``ge70``, ``30–49`` -> ``30_49``,
    ``head/neck`` -> ``head_neck``, ``BCN_20000`` -> ``bcn_20000``: stable
    across runs, so the MLflow UI can compare runs on them.
    """
    text = str(text).lower().replace("≥", "ge").replace(">=", "ge").replace("<", "lt").replace(">", "gt")
    return re.sub(r"[^a-z0-9]+", "_", text).strip("_") or "blank"
