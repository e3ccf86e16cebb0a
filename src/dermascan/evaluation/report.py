"""``report.md``: every metric named exactly, with its CI, beside the reference's published figures."""

from __future__ import annotations

from typing import Any, Optional

from dermascan.artifacts import OUT_OF_SCOPE_PLOT, REFERRAL_ROC, SUBGROUPS_PLOT
from dermascan.classes import BY_CODE

# The figures the reference project published, under the names it used.
REFERENCE = {"accuracy": 0.914, "mean_auc": 0.946, "mean_sensitivity": 0.678, "mean_specificity": 0.948}

ACCURACY_NOTE = (
    "The reference's \"accuracy\" (0.914) cannot be top-1 accuracy: with 8 classes and NV about half the "
    "data, a macro mean specificity of 0.948 caps top-1 accuracy near 0.80. It is almost certainly Keras' "
    "one-vs-rest `binary_accuracy` (what Keras reports as \"accuracy\" under a binary cross-entropy loss), "
    "which counts the 7 easy \"not this class\" cells of every image. Our row shows both figures, each under "
    "its own name; compare balanced accuracy, the official ISIC metric."
)


def fmt(value: Optional[float], digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def ci(metrics: dict[str, Any], name: str) -> str:
    interval = (metrics.get("ci") or {}).get(name) or {}
    if interval.get("low") is None:
        return "n/a"
    return f"{fmt(interval['low'])} - {fmt(interval['high'])}"


def headline_table(m: dict[str, Any]) -> list[str]:
    rows = [
        "| metric | value | 95% CI (bootstrap) |",
        "|---|---|---|",
        f"| **balanced accuracy** (mean per-class recall; the official ISIC metric) | **{fmt(m['balanced_accuracy'])}** | {ci(m, 'balanced_accuracy')} |",
        f"| mean AUC (macro, one-vs-rest, over classes with an AUC) | {fmt(m['mean_auc'])} | {ci(m, 'mean_auc')} |",
        f"| top-1 accuracy (argmax right) | {fmt(m['top1_accuracy'])} | |",
        f"| mean sensitivity (macro, argmax) | {fmt(m['mean_sensitivity'])} | |",
        f"| mean specificity (macro, argmax) | {fmt(m['mean_specificity'])} | |",
        f"| expected calibration error (top label, {'after' if 'expected_calibration_error_before_temperature' in m else 'no'} temperature scaling) | {fmt(m['expected_calibration_error'])} | |",
    ]
    if "expected_calibration_error_before_temperature" in m:
        rows.append(f"| expected calibration error before temperature scaling | {fmt(m['expected_calibration_error_before_temperature'])} | |")
    rows.append(f"| Keras `binary_accuracy` (one-vs-rest cells at 0.5; **not** accuracy) | {fmt(m['keras_binary_accuracy'])} | |")
    return rows


def per_class_table(m: dict[str, Any]) -> list[str]:
    keys = [f"{float(s):.2f}" for s in m.get("specificities", [])]
    head = "| class | support | AUC | sensitivity | specificity | PPV | NPV | F1 |" + "".join(
        f" sens. @ spec. {float(k):.0%} |" for k in keys
    )
    rows = [head, "|" + "---|" * (8 + len(keys))]
    for code, c in m["per_class"].items():
        at = c.get("sensitivity_at_specificity", {})
        name = BY_CODE[code].name if code in BY_CODE else code
        rows.append(
            f"| {code} ({name}) | {c['support']} | {fmt(c['auc'])} | {fmt(c['sensitivity'])} | {fmt(c['specificity'])} "
            f"| {fmt(c.get('ppv'))} | {fmt(c.get('npv'))} | {fmt(c.get('f1'))} |"
            + "".join(f" {fmt(at.get(k))} |" for k in keys)
        )
    return rows


def reference_table(m: dict[str, Any]) -> list[str]:
    return [
        "| | \"accuracy\" as published | Keras binary accuracy | top-1 accuracy | balanced accuracy | mean AUC | mean sensitivity | mean specificity |",
        "|---|---|---|---|---|---|---|---|",
        f"| reference (published) | {REFERENCE['accuracy']} | (probably the 0.914) | not published | not published "
        f"| {REFERENCE['mean_auc']} | {REFERENCE['mean_sensitivity']} | {REFERENCE['mean_specificity']} |",
        f"| this run | | {fmt(m['keras_binary_accuracy'])} | {fmt(m['top1_accuracy'])} | {fmt(m['balanced_accuracy'])} "
        f"| {fmt(m['mean_auc'])} | {fmt(m['mean_sensitivity'])} | {fmt(m['mean_specificity'])} |",
    ]


def confusion_table(m: dict[str, Any]) -> list[str]:
    classes = m["classes"]
    rows = ["| true \\ predicted | " + " | ".join(classes) + " |", "|" + "---|" * (len(classes) + 1)]
    rows += [f"| {code} | " + " | ".join(str(v) for v in row) + " |" for code, row in zip(classes, m["confusion_matrix"])]
    return rows


def interval_text(interval: Optional[dict[str, Any]]) -> str:
    """``0.931 (0.893 - 0.962)`` from a CI dict; ``n/a`` when there is no estimate."""
    if not interval or interval.get("estimate") is None:
        return "n/a"
    if interval.get("low") is None:
        return fmt(interval["estimate"])
    return f"{fmt(interval['estimate'])} ({fmt(interval['low'])} - {fmt(interval['high'])})"


RATE_NAMES = (
    ("sensitivity", "sensitivity (lesions needing a doctor that are referred)"),
    ("specificity", "specificity (other lesions not referred)"),
    ("ppv", "PPV (referred lesions that need a doctor)"),
    ("npv", "NPV (lesions not referred that do not need one)"),
)


def referral_section(referral: Optional[dict[str, Any]], split: str) -> list[str]:
    """The headline a clinician reads: when the model says "see a doctor", and how often that is right."""
    if not referral:
        return []
    lines = ["## Referral: should a doctor see this lesion?", ""]
    if "skipped" in referral:
        return lines + [f"No referral operating point: {referral['skipped']}.", ""]
    m, v = referral[split], referral["val"]
    lines += [
        f"**Refer when P({' + '.join(referral['classes'])}) >= {referral['threshold']:.4f}.** "
        f"The threshold is the highest whose sensitivity on val reaches the target {referral['target_sensitivity']:g} "
        f"(chosen on {referral['chosen_on']}; there: sensitivity {fmt(v['sensitivity'])}, "
        f"specificity {fmt(v['specificity'])}).",
        "",
        f"**{referral['verdict'][0].upper()}{referral['verdict'][1:]}.**",
        "",
        f"On the {split} split ({m['n']} images, {m['n_positive']} needing referral), 95% bootstrap CIs:",
        "",
        "| | value (95% CI) |",
        "|---|---|",
        *[f"| {name} | {interval_text(m[key])} |" for key, name in RATE_NAMES],
        f"| referrals per 100 images | {fmt(m['referrals_per_100'], 1)} |",
        "",
        f"Plot: `plots/{REFERRAL_ROC}`.",
        "",
    ]
    return lines


def pct(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


#: What each out-of-scope set is, for the report's tables.
OUT_OF_SCOPE_SETS = {
    "skimage": "scikit-image's sample images: natural photos, retina fundus, histology, text, patterns",
    "synthetic": "flat colours, noise, gradients, rendered text, app screenshots",
    "blur": "test images, heavy Gaussian blur",
    "rotated": "test images rotated 90° in a larger black canvas",
    "overexposed": "test images, extreme over-exposure",
    "underexposed": "test images, extreme under-exposure",
}


def _out_of_scope_rows(sets: dict[str, Any]) -> list[str]:
    return [
        f"| {name} | {OUT_OF_SCOPE_SETS.get(name, '')} | {r['n']} | {fmt(r['auroc'])} | {fmt(r['fpr_at_95_tpr'])} "
        f"| {pct(r['rejected'])} |"
        for name, r in sets.items()
    ]


def out_of_scope_section(gate: Optional[dict[str, Any]]) -> list[str]:
    """The gate that refuses images that are not dermoscopic lesions: its rates, per out-of-scope set."""
    if not gate:
        return []
    lines = ["## Out of scope: is this a dermoscopic image of a lesion at all?", ""]
    if "skipped" in gate:
        return lines + [f"No out-of-scope gate: {gate['skipped']}.", ""]
    split = gate["in_distribution"]
    inside = gate.get(f"{split}_rejected")
    header = ["| set | what | images | AUROC | FPR at 95% TPR | rejected at the threshold |", "|---|---|---|---|---|---|"]
    target = 1 - gate["keep"]
    verdict = "n/a" if inside is None else "meets" if inside <= target else "above"
    lines += [
        f"**Out of scope when the score is above {gate['threshold']:.4f}**, the threshold that keeps "
        f"{gate['keep']:.0%} of the val images in scope ({gate['n_val']} images; {pct(gate['val_rejected'])} "
        f"rejected there). Method: {gate['method']}.",
        "",
        f"**{pct(inside)} of the {split} split's images are rejected** at that threshold ({verdict} the target of "
        f"at most {target:.0%}: val's share, which the {split} split reproduces only up to sampling noise).",
        "",
        f"Against the {split} split as in scope: AUROC with out-of-scope as the positive class; FPR at 95% TPR, the "
        f"share of a set scored in scope at the score that keeps 95% of the {split} images (lower is better); "
        "rejected, the share above the gate's own threshold.",
        "",
        *header,
        *_out_of_scope_rows(gate["sets"]),
        "",
        f"**Corrupted photos of real lesions.** {gate['corrupted_note']}",
        "",
        *header,
        *_out_of_scope_rows(gate["corrupted"]),
        "",
        f"Histograms: `plots/{OUT_OF_SCOPE_PLOT}`.",
        "",
    ]
    return lines


def subgroup_section(subgroups: Optional[dict[str, Any]]) -> list[str]:
    """One table per dimension (age band, sex, site, collection), each metric with its 95% CI, and the flags."""
    if not subgroups or not subgroups.get("dimensions"):
        return []
    lines = [
        f"## Subgroups of the {subgroups['split']} split",
        "",
        f"Each figure with its 95% bootstrap CI. Mean AUC is over the classes with both positives and negatives "
        f"in the group. Referral figures use the val threshold ({fmt(subgroups.get('referral_threshold'), 4)}). "
        f"Flags: *small*, under {subgroups['min_images']} images; *below overall*, the referral-sensitivity CI "
        f"lies wholly below the overall {fmt(subgroups.get('overall_referral_sensitivity'))}. "
        f"Plot: `plots/{SUBGROUPS_PLOT}`.",
        "",
    ]
    for dimension, groups in subgroups["dimensions"].items():
        lines += [
            f"### By {dimension.replace('_', ' ')}",
            "",
            "| group | n | needing referral | balanced accuracy | mean AUC | referral sensitivity | referral specificity | flags |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for group, r in groups.items():
            lines.append(
                f"| {group} | {r['n']} | {r['n_positive']} | {interval_text(r['balanced_accuracy'])} "
                f"| {interval_text(r['mean_auc'])} | {interval_text(r['referral_sensitivity'])} "
                f"| {interval_text(r['referral_specificity'])} | {', '.join(r['flags'])} |"
            )
        lines.append("")
    return lines


def training_section(training: Optional[dict[str, Any]]) -> list[str]:
    """The training's warnings (collapse, a phase 2 that never beat phase 1) and its best epoch."""
    if not training or training.get("best_epoch") is None:
        return []
    lines = ["## Training", ""]
    lines += [f"**Warning: {w}.**" + "\n" for w in training.get("warnings", [])]
    monitor = training["monitor"]
    lines += [
        f"The evaluated model is the best checkpoint: epoch {training['best_epoch']} (phase "
        f"{training['best_phase']}), {monitor} {fmt(training.get(f'best_{monitor}'))}.",
        "",
    ]
    return lines


def render_report(result: dict[str, Any]) -> str:
    """The markdown report of an ``evaluate`` result (metrics.json's content)."""
    split = result["split"]
    m = result[split]
    temperature = (result.get("calibration") or {}).get("temperature")
    lines = [
        f"# Evaluation report: {split} split",
        "",
        f"{m['n']} images with an 8-class label. Test-time augmentation: `{result['tta']}`. "
        f"Temperature scaling: {'T = ' + fmt(temperature) + ' (fitted on val)' if temperature is not None else 'none'}. "
        f"CIs: {((m.get('ci') or {}).get('balanced_accuracy') or {}).get('n_resamples', 'no')} bootstrap resamples of the images.",
        "",
    ]
    lines += referral_section(result.get("referral"), split)
    lines += out_of_scope_section(result.get("out_of_scope"))
    lines += training_section(result.get("training"))
    lines += [
        "## Overall",
        "",
        *headline_table(m),
        "",
    ]
    if f"{split}_no_tta" in result:
        plain = result[f"{split}_no_tta"]
        lines += [
            f"## Test-time augmentation `{result['tta']}` against none",
            "",
            "| | balanced accuracy | 95% CI | mean AUC | top-1 accuracy |",
            "|---|---|---|---|---|",
            f"| with TTA `{result['tta']}` | {fmt(m['balanced_accuracy'])} | {ci(m, 'balanced_accuracy')} | {fmt(m['mean_auc'])} | {fmt(m['top1_accuracy'])} |",
            f"| without TTA | {fmt(plain['balanced_accuracy'])} | {ci(plain, 'balanced_accuracy')} | {fmt(plain['mean_auc'])} | {fmt(plain['top1_accuracy'])} |",
            "",
        ]
    lines += ["## Per class (one-vs-rest)", "", *per_class_table(m), "",
              "Sensitivity, specificity, PPV, NPV and F1 are of the argmax prediction; "
              "\"sens. @ spec.\" thresholds the class's own probability at that specificity.", "",
              "## Beside the reference", "", *reference_table(m), "", ACCURACY_NOTE, ""]
    if "isic2018" in result:
        o = result["isic2018"]
        lines += [
            "## ISIC 2018 Task 3 scheme (comparable to the 2018 leaderboard)",
            "",
            f"{o['n']} ISIC 2018 Test images, scored with their original 2018 labels in the 7-class scheme "
            "(AKIEC = AK + SCC probability). Predictions: `predictions_isic2018.csv`.",
            "",
            "| metric | value | 95% CI |",
            "|---|---|---|",
            f"| balanced accuracy (ISIC 2018 7-class) | {fmt(o['balanced_accuracy'])} | {ci(o, 'balanced_accuracy')} |",
            f"| mean AUC (ISIC 2018 7-class) | {fmt(o['mean_auc'])} | {ci(o, 'mean_auc')} |",
            "",
        ]
    lines += subgroup_section(result.get("subgroups"))
    if "val" in result and split != "val":
        v = result["val"]
        lines += ["## Validation split", "",
                  f"balanced accuracy {fmt(v['balanced_accuracy'])}, mean AUC {fmt(v['mean_auc'])}, "
                  f"top-1 accuracy {fmt(v['top1_accuracy'])} ({v['n']} images).", ""]
    lines += ["## Confusion matrix (counts)", "", *confusion_table(m), "",
              "Plots: `plots/roc_curves.png`, `plots/confusion_matrix.png`, `plots/reliability.png`, "
              f"`plots/training_curves.png`, `plots/{REFERRAL_ROC}`, `plots/{SUBGROUPS_PLOT}`"
              + (f", `plots/{OUT_OF_SCOPE_PLOT}`." if "threshold" in (result.get("out_of_scope") or {}) else "."), ""]
    return "\n".join(lines)
