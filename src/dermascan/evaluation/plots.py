"""Plots, as PNG files legible at a glance.

Each public function draws one figure with the Agg canvas (never pyplot, so
no global figure state is touched), writes it as a PNG, creating the parent
folders, and returns the path. The ``_*_figure`` helpers build the
``Figure`` without saving it, for tests and notebooks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dermascan.classes import BY_CODE, CODES

DPI = 120
BOUNDARY_GID = "phase-boundary"
STYLE = {
    "font.size": 11,
    "axes.titlesize": 13,
    "axes.labelsize": 12,
    "legend.fontsize": 10,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "figure.titlesize": 15,
}
PathLike = str | Path


def _name(code: str) -> str:
    """``"MEL (Melanoma)"`` for a known code, the code itself otherwise."""
    return f"{code} ({BY_CODE[code].name})" if code in BY_CODE else code


def _figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context(STYLE):
        fig.savefig(path, dpi=DPI)
    return path


# ROC -------------------------------------------------------------------------


def _roc(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """False and true positive rates at every distinct threshold, and the area under them.

    Needs both positives and negatives; ties in ``scores`` count half, as in scikit-learn.
    """
    order = np.argsort(-scores, kind="mergesort")
    scores, truth = scores[order], truth[order].astype(float)
    last_of_each_threshold = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(truth)[last_of_each_threshold]
    fps = (last_of_each_threshold + 1) - tps
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def _roc_figure(y_true: Any, probabilities: Any, classes: Sequence[str] = CODES) -> Figure:
    """One-vs-rest ROC curves of every class with both positives and negatives."""
    probabilities = np.asarray(probabilities, dtype=float)
    y_true = np.asarray(y_true)
    if y_true.ndim == 2:
        y_true = y_true.argmax(axis=1)
    y_true = y_true.astype(int)
    k = len(classes)
    if probabilities.ndim != 2 or probabilities.shape[1] != k or len(y_true) != len(probabilities):
        raise ValueError(
            f"expected probabilities [N, {k}] and N labels; got {probabilities.shape} and {len(y_true)} labels"
        )
    colours = matplotlib.colormaps["tab10"]
    with matplotlib.rc_context(STYLE):
        fig = _figure((8.5, 7.5))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1.2, label="chance (AUC 0.5)")
        aucs = []
        for i, code in enumerate(classes):
            truth = y_true == i
            if not truth.any():
                ax.plot([], [], " ", label=f"{_name(code)}: AUC undefined (no positives)")
                continue
            if truth.all():
                ax.plot([], [], " ", label=f"{_name(code)}: AUC undefined (no negatives)")
                continue
            fpr, tpr, auc = _roc(truth, probabilities[:, i])
            aucs.append(auc)
            ax.plot(fpr, tpr, color=colours(i % 10), linewidth=2, label=f"{_name(code)}: AUC {auc:.3f}")
        macro = f"macro AUC {np.mean(aucs):.3f} over {len(aucs)} of {k} classes" if aucs else "no AUC defined"
        ax.set_title(f"ROC curves, one class vs rest (n={len(y_true)})\n{macro}")
        _roc_axes(ax, "false positive rate (1 - specificity)", "true positive rate (sensitivity)")
        ax.legend(loc="lower right", framealpha=0.9)
    return fig


def _roc_axes(ax, xlabel: str, ylabel: str) -> None:
    """A square unit ROC plane with a light grid."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def roc_curves(y_true: Any, probabilities: Any, path: PathLike, classes: Sequence[str] = CODES) -> Path:
    """One-vs-rest ROC per class with its AUC; classes without positives listed as undefined."""
    return _save(_roc_figure(y_true, probabilities, classes), path)


# Referral ROC -------------------------------------------------------------------


def _referral_figure(
    needs_referral: Any, scores: Any, threshold: float, target: float | None = None,
    val_point: tuple[float, float] | None = None,
) -> Figure:
    """ROC of the referral score, the operating point (``score >= threshold``) marked, and val's point beside it.

    ``val_point`` is (sensitivity, specificity) on val, where the threshold was chosen.
    """
    truth = np.asarray(needs_referral, dtype=bool)
    scores = np.asarray(scores, dtype=float)
    if truth.ndim != 1 or truth.shape != scores.shape:
        raise ValueError(f"expected needs_referral and scores of the same 1-D shape, got {truth.shape} and {scores.shape}")
    with matplotlib.rc_context(STYLE):
        fig = _figure((7.5, 7.5))
        ax = fig.add_subplot()
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1.2, label="chance (AUC 0.5)")
        title = f"Referral score ROC (n={len(truth)}, {int(truth.sum())} needing referral)"
        if truth.any() and not truth.all():
            fpr, tpr, auc = _roc(truth, scores)
            ax.plot(fpr, tpr, color="tab:blue", linewidth=2, label=f"referral score: AUC {auc:.3f}")
            refer = scores >= threshold
            sensitivity = float(refer[truth].mean())
            specificity = float((~refer[~truth]).mean())
            ax.plot(1 - specificity, sensitivity, "o", color="tab:red", markersize=10, zorder=5,
                    label=f"operating point, score ≥ {threshold:.3g}: sensitivity {sensitivity:.3f}, "
                          f"specificity {specificity:.3f}")
        else:
            ax.text(0.5, 0.5, "ROC undefined: needs images with and without a referral class",
                    ha="center", va="center", transform=ax.transAxes)
        if val_point is not None and None not in val_point:
            ax.plot(1 - val_point[1], val_point[0], "s", markerfacecolor="none", markeredgecolor="tab:red",
                    markersize=10, markeredgewidth=2, label=f"on val (where it was chosen): sensitivity {val_point[0]:.3f}")
        if target is not None:
            ax.axhline(target, color="tab:red", linestyle="--", linewidth=1, label=f"target sensitivity {target:g}")
        ax.set_title(title)
        _roc_axes(ax, "false positive rate (1 - specificity): benign lesions referred",
                  "sensitivity: lesions needing a doctor that are referred")
        ax.legend(loc="lower right", framealpha=0.9, fontsize=9)
    return fig


def referral_roc(
    needs_referral: Any, scores: Any, threshold: float, path: PathLike, target: float | None = None,
    val_point: tuple[float, float] | None = None,
) -> Path:
    """ROC of the referral score with the operating point marked (and the target and val's point)."""
    return _save(_referral_figure(needs_referral, scores, threshold, target, val_point), path)


# Subgroups ----------------------------------------------------------------------

_SUBGROUP_PANELS = (("balanced_accuracy", "balanced accuracy"), ("referral_sensitivity", "referral sensitivity"))


def _subgroup_figure(subgroups: Mapping[str, Any]) -> Figure:
    """A forest plot: per group, balanced accuracy and referral sensitivity with their 95% CIs.

    Groups are listed under their dimension; the overall figure is a dashed
    line. Small groups are grey, groups whose sensitivity CI lies wholly
    below the overall estimate red.
    """
    rows: list[tuple[str, str, Mapping[str, Any]]] = [
        (dimension, group, result)
        for dimension, groups in (subgroups.get("dimensions") or {}).items()
        for group, result in groups.items()
    ]
    overall = {"referral_sensitivity": subgroups.get("overall_referral_sensitivity"),
               "balanced_accuracy": subgroups.get("overall_balanced_accuracy")}
    y = np.arange(len(rows))
    with matplotlib.rc_context(STYLE):
        fig = _figure((13, 1.2 + 0.32 * max(len(rows), 1)))
        axes = fig.subplots(1, len(_SUBGROUP_PANELS), sharey=True, squeeze=False)[0]
        for ax, (metric, title) in zip(axes, _SUBGROUP_PANELS):
            for i, (_, _, result) in enumerate(rows):
                interval = result.get(metric) or {}
                value = interval.get("estimate")
                if value is None:
                    continue
                colour = ("tab:red" if "below overall" in result.get("flags", [])
                          else "0.6" if "small" in result.get("flags", []) else "tab:blue")
                if interval.get("low") is not None:
                    ax.plot([interval["low"], interval["high"]], [i, i], color=colour, linewidth=2)
                ax.plot(value, i, "o", color=colour, markersize=5)
            if overall.get(metric) is not None:
                ax.axvline(overall[metric], color="0.3", linestyle="--", linewidth=1,
                           label=f"overall {overall[metric]:.3f}")
                ax.legend(loc="lower left", fontsize=9)
            boundaries = [i - 0.5 for i in range(1, len(rows)) if rows[i][0] != rows[i - 1][0]]
            for b in boundaries:
                ax.axhline(b, color="0.8", linewidth=0.8)
            ax.set_xlim(0, 1.02)
            ax.set_title(f"{title} (95% CI)")
            ax.grid(axis="x", alpha=0.3)
        axes[0].set_yticks(y, [f"{d}: {g} (n={r['n']})" for d, g, r in rows])
        axes[0].invert_yaxis()
        fig.suptitle(f"Subgroups of the {subgroups.get('split', 'test')} split "
                     f"(grey: under {subgroups.get('min_images', '?')} images; red: sensitivity CI below overall)")
    return fig


def subgroups_plot(subgroups: Mapping[str, Any], path: PathLike) -> Path:
    """Forest plot of metrics.json's ``subgroups``: balanced accuracy and referral sensitivity per group."""
    return _save(_subgroup_figure(subgroups), path)


# Out-of-scope gate ---------------------------------------------------------------


def _out_of_scope_figure(scores: Mapping[str, Any], in_name: str, threshold: float, ncols: int = 3) -> Figure:
    """One panel per out-of-scope set: its scores against ``scores[in_name]``'s, the gate's threshold marked.

    Shared bins, and densities, so that 25 images and 900 compare.
    """
    inside = np.asarray(scores[in_name], dtype=float)
    outside = {name: np.asarray(values, dtype=float) for name, values in scores.items() if name != in_name}
    every = np.concatenate([inside, *outside.values(), [threshold]])
    bins = np.linspace(0.0, float(every.max()) * 1.02 or 1.0, 41)
    panels = max(len(outside), 1)
    ncols = min(ncols, panels)
    nrows = -(-panels // ncols)
    with matplotlib.rc_context(STYLE):
        fig = _figure((4.8 * ncols, 3.4 * nrows))
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (name, values) in zip(axes, outside.items()):
            ax.hist(inside, bins, density=True, color="tab:blue", alpha=0.45, label=f"{in_name} (in scope, n={len(inside)})")
            ax.hist(values, bins, density=True, histtype="step", linewidth=2, color="tab:red",
                    label=f"{name} (n={len(values)})")
            ax.axvline(threshold, color="black", linestyle="--", linewidth=1.2, label=f"threshold {threshold:.3g}")
            rejected = float((values > threshold).mean()) if len(values) else float("nan")
            ax.set_title(f"{name}: {rejected:.0%} rejected")
            ax.set_xlabel("out-of-scope score")
            ax.set_ylabel("density")
            ax.legend(fontsize=8, loc="upper right")
        for ax in axes[len(outside):]:
            ax.set_axis_off()
        share = float((inside > threshold).mean()) if len(inside) else float("nan")
        fig.suptitle(f"Out-of-scope score: {in_name} images ({share:.1%} rejected) against each out-of-scope set")
    return fig


def out_of_scope_histograms(scores: Mapping[str, Any], in_name: str, threshold: float, path: PathLike) -> Path:
    """Histograms of the gate's score, the in-distribution split against each out-of-scope set, threshold marked."""
    return _save(_out_of_scope_figure(scores, in_name, threshold), path)


# Confusion matrix --------------------------------------------------------------


def _confusion_figure(matrix: Any, classes: Sequence[str] = CODES) -> Figure:
    """Counts and row-normalised recall side by side; rows true, columns predicted."""
    counts = np.asarray(matrix, dtype=float)
    k = len(classes)
    if counts.shape != (k, k):
        raise ValueError(f"expected a {k}x{k} confusion matrix, got shape {counts.shape}")
    support = counts.sum(axis=1)
    empty = support == 0
    recall = np.divide(counts, support[:, None], out=np.zeros_like(counts), where=~empty[:, None])
    recall = np.ma.masked_array(recall, mask=np.repeat(empty[:, None], k, axis=1))
    total = int(counts.sum())
    ticks = np.arange(k)

    with matplotlib.rc_context(STYLE):
        fig = _figure((17, 7.8))
        left, right = fig.subplots(1, 2)
        panels = (
            (left, counts, matplotlib.colormaps["Blues"], 0.0, max(1.0, float(counts.max(initial=0))), "counts"),
            (right, recall, matplotlib.colormaps["Greens"].with_extremes(bad="0.88"), 0.0, 1.0, "recall"),
        )
        for ax, values, cmap, vmin, vmax, kind in panels:
            image = ax.imshow(values, cmap=cmap, vmin=vmin, vmax=vmax)
            fig.colorbar(image, ax=ax, shrink=0.8, label="images" if kind == "counts" else "fraction of the row")
            for row in range(k):
                if kind == "recall" and empty[row]:
                    ax.text((k - 1) / 2, row, "no true examples (no support)", ha="center", va="center",
                            fontsize=10, color="0.3", style="italic")
                    continue
                for col in range(k):
                    value = float(values[row, col])
                    text = f"{int(value)}" if kind == "counts" else f"{value:.2f}"
                    dark = value > vmin + 0.55 * (vmax - vmin)
                    ax.text(col, row, text, ha="center", va="center", fontsize=9,
                            color="white" if dark else "black", fontweight="bold" if row == col else "normal")
            ax.set_xticks(ticks, list(classes))
            ax.set_xlabel("predicted class")
            ax.set_ylabel("true class")
        left.set_yticks(ticks, [_name(c) for c in classes])
        right.set_yticks(ticks, [f"{c} (n={int(n)})" for c, n in zip(classes, support)])
        left.set_title(f"Confusion matrix, counts (n={total})")
        right.set_title("Row-normalised: recall per true class (diagonal)")
    return fig


def confusion_matrix_plot(matrix: Any, path: PathLike, classes: Sequence[str] = CODES) -> Path:
    """Confusion matrix as counts and as row-normalised recall, rows true, columns predicted."""
    return _save(_confusion_figure(matrix, classes), path)


# Reliability diagram -------------------------------------------------------------


def _bins_arrays(bins: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The bins as float arrays (None -> NaN), checked for equal lengths.

    The per-bin mean confidence may be keyed ``confidence`` or ``mean_confidence``
    (as :func:`dermascan.evaluation.metrics.reliability_bins` names it).
    """
    if "confidence" not in bins and "mean_confidence" in bins:
        bins = {**bins, "confidence": bins["mean_confidence"]}
    keys = ("lower", "upper", "confidence", "accuracy", "count")
    missing = [key for key in keys if key not in bins]
    if missing:
        raise ValueError(f"reliability bins lack {', '.join(missing)}")
    arrays = {key: np.array(list(bins[key]), dtype=float) for key in keys}
    lengths = {len(a) for a in arrays.values()}
    if len(lengths) != 1:
        raise ValueError(f"reliability bins have unequal lengths: { {k: len(a) for k, a in arrays.items()} }")
    arrays["count"] = np.nan_to_num(arrays["count"], nan=0.0)
    return arrays


def _reliability_panel(top: Any, bottom: Any, bins: dict[str, np.ndarray], title: str) -> None:
    lower, upper = bins["lower"], bins["upper"]
    width = upper - lower
    filled = (bins["count"] > 0) & np.isfinite(bins["accuracy"]) & np.isfinite(bins["confidence"])
    top.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1.5, label="perfect calibration")
    top.bar(lower[filled], bins["accuracy"][filled], width=width[filled], align="edge",
            color="tab:blue", edgecolor="navy", alpha=0.85, label="accuracy")
    gap = bins["confidence"][filled] - bins["accuracy"][filled]
    top.bar(lower[filled], gap, bottom=bins["accuracy"][filled], width=width[filled], align="edge",
            facecolor="none", edgecolor="tab:red", hatch="//", linewidth=0, label="gap to confidence")
    top.hlines(bins["confidence"][filled], lower[filled], upper[filled], color="tab:red", linewidth=2.5,
               label="mean confidence")
    if not filled.any():
        top.text(0.5, 0.5, "no predictions in any bin", ha="center", va="center", transform=top.transAxes)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(loc="upper left")
    top.tick_params(labelbottom=False)
    bottom.bar(lower, bins["count"], width=width, align="edge", color="0.55", edgecolor="0.3")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images per bin")
    bottom.grid(alpha=0.3)


def _reliability_figure(
    bins: Mapping[str, Any],
    ece: float | None = None,
    calibrated_bins: Mapping[str, Any] | None = None,
    calibrated_ece: float | None = None,
) -> Figure:
    """Accuracy vs confidence per bin over a count histogram; a second column if calibrated bins are given."""
    columns = [(bins, ece, "before temperature scaling" if calibrated_bins is not None else "Reliability diagram")]
    if calibrated_bins is not None:
        columns.append((calibrated_bins, calibrated_ece, "after temperature scaling"))
    with matplotlib.rc_context(STYLE):
        fig = _figure((7 * len(columns), 8))
        axes = fig.subplots(2, len(columns), sharex="col", height_ratios=[3, 1], squeeze=False)
        for col, (column_bins, column_ece, label) in enumerate(columns):
            title = label if column_ece is None else f"{label}: ECE {column_ece:.3f}"
            _reliability_panel(axes[0, col], axes[1, col], _bins_arrays(column_bins), title)
        if calibrated_bins is not None:
            fig.suptitle("Reliability diagrams (top-1 confidence vs accuracy)")
    return fig


def reliability_diagram(
    bins: Mapping[str, Any],
    path: PathLike,
    ece: float | None = None,
    calibrated_bins: Mapping[str, Any] | None = None,
    calibrated_ece: float | None = None,
) -> Path:
    """Reliability diagram of per-bin accuracy vs confidence, optionally before/after calibration."""
    return _save(_reliability_figure(bins, ece, calibrated_bins, calibrated_ece), path)


# Training curves ---------------------------------------------------------------

_PANELS = (
    ("loss", "loss (categorical cross-entropy)"),
    ("balanced_accuracy", "balanced accuracy (mean per-class recall)"),
    ("top1_accuracy", "top-1 accuracy"),
)


def _training_figure(history: pd.DataFrame, phase1_epochs: int) -> Figure:
    """Loss, metrics and learning rate on one 1-based epoch axis, the phase boundary marked."""
    if "epoch" in history and len(history):
        # A resumed run may log an epoch twice: keep the latest line of each.
        history = history.drop_duplicates("epoch", keep="last").sort_values("epoch")
        epochs = history["epoch"].to_numpy(dtype=int) + 1
    else:
        epochs = np.arange(1, len(history) + 1)
    panels = [(m, t) for m, t in _PANELS if m in history or f"val_{m}" in history]
    if "learning_rate" in history:
        panels.append(("learning_rate", "learning rate"))
    if not panels:
        panels = [("loss", "loss (categorical cross-entropy)")]
    boundary = phase1_epochs + 0.5 if (epochs <= phase1_epochs).any() and (epochs > phase1_epochs).any() else None

    with matplotlib.rc_context(STYLE):
        ncols = 2 if len(panels) > 1 else 1
        nrows = -(-len(panels) // ncols)
        fig = _figure((6.5 * ncols, 4.4 * nrows))
        axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
        for ax in axes[len(panels):]:
            ax.set_visible(False)
        for ax, (metric, title) in zip(axes, panels):
            if metric == "learning_rate":
                series = [(metric, "learning rate (end of epoch)")]
            else:
                series = [(metric, "train"), (f"val_{metric}", "validation")]
            for column, label in series:
                if column in history:
                    ax.plot(epochs, history[column].to_numpy(dtype=float), marker="o", markersize=4, label=label)
            if not len(history):
                ax.text(0.5, 0.5, "no epochs logged", ha="center", va="center", transform=ax.transAxes)
            if boundary is not None:
                ax.axvline(boundary, color="0.35", linestyle="--", linewidth=1.3, gid=BOUNDARY_GID,
                           label=f"phase 1 | phase 2 (after epoch {phase1_epochs})")
                for text, align in (("phase 1 ", "right"), (" phase 2", "left")):
                    ax.text(boundary, 0.97, text, transform=ax.get_xaxis_transform(), ha=align, va="top",
                            fontsize=9, color="0.25", bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})
            if metric == "learning_rate":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
            ax.set_title(title)
            ax.set_xlabel("epoch")
            if len(epochs):
                ax.set_xlim(epochs.min() - 0.7, epochs.max() + 0.7)
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(loc="best")
        fig.suptitle("Training history (phase 1: head only, phase 2: fine-tuning)")
    return fig


def training_curves(history: pd.DataFrame, path: Path, phase1_epochs: int) -> Path:
    """Loss and metrics per epoch, both phases on one axis, the boundary marked."""
    return _save(_training_figure(history, phase1_epochs), path)


__all__ = [
    "confusion_matrix_plot",
    "referral_roc",
    "reliability_diagram",
    "roc_curves",
    "subgroups_plot",
    "training_curves",
]
