"""``model_card.md``: what the model was trained on, how well it does, and what it must not be used for."""

from __future__ import annotations

from typing import Any, Optional

from dermascan import __version__
from dermascan.classes import CLASSES
from dermascan.evaluation.report import RATE_NAMES, ci, fmt, interval_text

INTENDED_USE = """\
## Intended use

- A **screening aid and a research tool**: it ranks eight dermoscopic lesion classes
  to help a user decide whether a lesion deserves a clinician's attention.
- **It is not a diagnosis** and must never replace examination by a dermatologist,
  nor delay it. A benign ranking does not mean a lesion is safe.
- **Dermoscopic images only**: the training images were taken through a dermatoscope.
  Ordinary phone photos without one are outside the training distribution, and
  the model's outputs on them are not validated.
"""

LIMITS = """\
## Limits

- **Skin types.** The ISIC archive is dominated by fair skin (Fitzpatrick I-III),
  mostly from Europe, Australia and the USA. Performance on darker skin types is
  unknown and likely worse.
- **Sites.** Acral (palms, soles), nail, mucosal and genital lesions are rare in the
  data; so are lesions of the scalp and face in some releases. Results there are not
  representative.
- **Classes.** Only the 8 ISIC 2019 classes exist for the model: any other lesion
  (or non-lesion) is forced into one of them. DF, VASC, SCC and AK have a few hundred
  training images each; their per-class figures have wide uncertainty.
- **Data.** Several images per lesion and duplicates across releases exist; the split
  keeps each lesion in one split, but the test set comes from the same archive and
  overstates performance on new clinics, devices and populations.
- **Probabilities** are calibrated on the validation split when temperature scaling
  is on; they are not calibrated for other populations.
"""


def data_section(summary: dict[str, Any], cfg: dict[str, Any]) -> list[str]:
    data = cfg.get("data", {})
    counts = summary.get("counts", {})
    lines = [
        "## Data",
        "",
        f"- Dataset: `{data.get('name', '?')}`; releases: {', '.join(data.get('releases', [])) or '?'}.",
        f"- {summary.get('images', '?')} images of {summary.get('lesions', '?')} lesions after merging duplicates "
        f"and excluding {summary.get('excluded', {}).get('total', '?')} images (reasons in manifest_summary.json).",
        split_line(data),
        "",
        "| class | train | val | test | total |",
        "|---|---|---|---|---|",
    ]
    for code, row in counts.items():
        lines.append(f"| {code} | {row.get('train', 0)} | {row.get('val', 0)} | {row.get('test', 0)} | {row.get('total', 0)} |")
    return lines + [""]


def split_line(data: dict[str, Any]) -> str:
    if data.get("split") == "official":
        return "- Split: `official`: test is the ISIC 2018 Test release, val holds ISIC 2018 Validation."
    return (f"- Split: `{data.get('split', '?')}` (val {data.get('val_fraction', '?')}, test "
            f"{data.get('test_fraction', '?')}), stratified by class and grouped by lesion: no lesion is in two splits.")


def metrics_section(metrics: Optional[dict[str, Any]]) -> list[str]:
    if not metrics:
        return ["## Metrics", "", "Not evaluated.", ""]
    split = metrics["split"]
    # The exported model predicts one view: quote the metrics without TTA.
    m = metrics.get(f"{split}_no_tta", metrics[split])
    lines = [
        "## Metrics",
        "",
        f"On the {split} split ({m['n']} images; one view, as the exported model predicts; 95% bootstrap CIs):",
        "",
        "| metric | value | 95% CI |",
        "|---|---|---|",
        f"| balanced accuracy (official ISIC metric) | {fmt(m['balanced_accuracy'])} | {ci(m, 'balanced_accuracy')} |",
        f"| mean AUC | {fmt(m['mean_auc'])} | {ci(m, 'mean_auc')} |",
        f"| top-1 accuracy | {fmt(m['top1_accuracy'])} | |",
        f"| MEL sensitivity at 90% specificity | {fmt(m['per_class'].get('MEL', {}).get('sensitivity_at_specificity', {}).get('0.90'))} | |",
        f"| expected calibration error | {fmt(m.get('expected_calibration_error'))} | |",
        "",
        "Per-class figures are in the run's report.md.",
        "",
    ]
    return lines


def referral_card_section(metrics: Optional[dict[str, Any]]) -> list[str]:
    """The operating point an app applies ("see a doctor" when the score reaches it) and its measured rates."""
    referral = (metrics or {}).get("referral")
    if not referral:
        return []
    lines = ["## Referral operating point", ""]
    if "skipped" in referral:
        return lines + [f"None: {referral['skipped']}. Apps must not derive a referral from the ranked classes.", ""]
    split = metrics["split"]
    m, v = referral[split], referral["val"]
    return lines + [
        f"- Score: the summed probability of {', '.join(referral['classes'])} (the classes a doctor should see).",
        f"- Threshold: refer when the score is >= {referral['threshold']:.4f} (in labels.json). Chosen on "
        f"{referral['chosen_on']}, as the highest threshold reaching sensitivity {referral['target_sensitivity']:g} there "
        f"(val sensitivity {fmt(v['sensitivity'])}, specificity {fmt(v['specificity'])}).",
        "",
        f"Measured on the {split} split ({m['n']} images, {m['n_positive']} needing referral; 95% bootstrap CIs):",
        "",
        "| | value (95% CI) |",
        "|---|---|",
        *[f"| {name} | {interval_text(m[key])} |" for key, name in RATE_NAMES],
        f"| referrals per 100 images | {fmt(m['referrals_per_100'], 1)} |",
        "",
        f"{referral['verdict'][0].upper()}{referral['verdict'][1:]}. These rates hold for images like the test "
        "split's; the prevalence of lesions needing a doctor among an app's users is different, and PPV and NPV "
        "move with it.",
        "",
    ]


def out_of_scope_card_section(metrics: Optional[dict[str, Any]]) -> list[str]:
    """The out-of-scope gate an app applies before showing any class, and its measured rates."""
    gate = (metrics or {}).get("out_of_scope")
    lines = ["## Out-of-scope gate", ""]
    if not gate:
        return []
    if "skipped" in gate:
        return lines + [f"None: {gate['skipped']}. The model answers every image, dermoscopic or not.", ""]
    split = gate["in_distribution"]
    rows = [f"| {name} | {r['n']} | {r['auroc']:.3f} | {r['fpr_at_95_tpr']:.3f} | {r['rejected']:.1%} |"
            for name, r in {**gate["sets"], **gate["corrupted"]}.items() if r.get("auroc") is not None]
    return lines + [
        f"- Out of scope when the score is > {gate['threshold']:.4f} (in labels.json, the model's second output): "
        f"then the app shows no class and asks for a dermoscopic close-up of one lesion. {gate['method']}.",
        f"- Rejected in-distribution images: {gate['val_rejected']:.1%} of val (by construction), "
        f"{gate[f'{split}_rejected']:.1%} of {split}.",
        "",
        "| set | n | AUROC | FPR at 95% TPR | rejected |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]


def ensemble_lines(metrics: Optional[dict[str, Any]]) -> list[str]:
    """One line for a model that is an ensemble (metrics.json's ``ensemble``, from ``dermascan.ensemble``)."""
    ensemble = (metrics or {}).get("ensemble")
    if not ensemble:
        return []
    return [f"- Ensemble: {ensemble['method']} Held-out data: {ensemble['val_rule']['text']}"]


def model_card(
    cfg: dict[str, Any],
    summary: dict[str, Any],
    metrics: Optional[dict[str, Any]],
    model_version: str,
    temperature: Optional[float],
) -> str:
    model = cfg.get("model", {})
    classes = ", ".join(f"{c.code} ({c.name}, {c.category.value})" for c in CLASSES)
    lines = [
        f"# dermascan model card: {model_version}",
        "",
        f"- dermascan version: {__version__}",
        f"- Architecture: {model.get('backbone', '?')} (alpha {model.get('alpha', '?')}, "
        f"weights {model.get('weights')!s}) with a dense head, {model.get('image_size', '?')} px input.",
        *ensemble_lines(metrics),
        "- Input: raw RGB pixels 0-255, squashed (not cropped) to the input size; preprocessing is inside the model.",
        f"- Output: softmax probabilities over {classes}.",
        f"- Temperature scaling: {'T = ' + fmt(temperature) if temperature is not None else 'none'}.",
        "",
        *data_section(summary, cfg),
        *metrics_section(metrics),
        *referral_card_section(metrics),
        *out_of_scope_card_section(metrics),
        INTENDED_USE,
        LIMITS,
    ]
    return "\n".join(lines)
