"""Plots: valid, legible PNGs; degenerate inputs drawn without warnings; the phase boundary in place."""

from __future__ import annotations

import io
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib._pylab_helpers import Gcf
from PIL import Image

from dermascan.classes import CODES, INDEX
from dermascan.evaluation import plots

K = len(CODES)


@contextmanager
def no_warnings():
    """Any warning (RuntimeWarning from a 0/0 above all) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def assert_png(path: Path, min_size: tuple[int, int]) -> tuple[int, int]:
    """A real, non-blank PNG at about 120 dpi, at least ``min_size`` pixels; returns its size."""
    assert path.is_file()
    assert 10_000 < path.stat().st_size < 3_000_000
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:
        assert round(image.info["dpi"][0]) == plots.DPI
        assert image.width >= min_size[0] and image.height >= min_size[1]
        grey = np.asarray(image.convert("L"))
    assert (grey < 200).mean() > 0.01, "the image is (nearly) blank"
    return image.size


def probabilities_for(y: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(y), K))
    logits[np.arange(len(y)), y] += 2.0
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True)


def pairwise_auc(truth: np.ndarray, scores: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties counting half: the AUC by definition."""
    pos, neg = scores[truth][:, None], scores[~truth][None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def legend_texts(ax) -> list[str]:
    return [t.get_text() for t in ax.get_legend().get_texts()]


# ROC ---------------------------------------------------------------------------


def test_roc_png_with_an_absent_class(tmp_path: Path) -> None:
    y = np.arange(200) % K
    y[y == INDEX["DF"]] = INDEX["NV"]
    p = probabilities_for(y)
    out = tmp_path / "nested" / "dir" / "roc.png"
    with no_warnings():
        written = plots.roc_curves(y, p, out)
    assert written == out
    assert_png(out, (800, 700))

    fig = plots._roc_figure(y, p)
    ax = fig.axes[0]
    texts = legend_texts(ax)
    assert "DF (Dermatofibroma): AUC undefined (no positives)" in texts
    for code in CODES:
        if code != "DF":
            auc = pairwise_auc(y == INDEX[code], p[:, INDEX[code]])
            assert f"{plots._name(code)}: AUC {auc:.3f}" in texts
    drawn = [line for line in ax.lines if len(line.get_xdata()) > 0]
    assert len(drawn) == K - 1 + 1  # seven classes and the chance diagonal
    diagonal = drawn[0]
    assert list(diagonal.get_xdata()) == [0, 1] and list(diagonal.get_ydata()) == [0, 1]


@pytest.mark.parametrize("ties", [False, True])
def test_roc_area_and_end_points(ties: bool) -> None:
    rng = np.random.default_rng(3)
    truth = rng.random(300) < 0.3
    scores = rng.random(300) + 0.3 * truth
    if ties:
        scores = np.round(scores, 1)
    fpr, tpr, auc = plots._roc(truth, scores)
    assert auc == pytest.approx(pairwise_auc(truth, scores), abs=1e-12)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    assert len(fpr) == len(np.unique(scores)) + 1  # one point per distinct threshold


def test_roc_accepts_one_hot_truth() -> None:
    y = np.arange(80) % K
    p = probabilities_for(y)
    by_index = legend_texts(plots._roc_figure(y, p).axes[0])
    by_one_hot = legend_texts(plots._roc_figure(np.eye(K)[y], p).axes[0])
    assert by_index == by_one_hot


def test_roc_all_one_class_truth_draws_no_curve_and_no_warning() -> None:
    y = np.full(30, INDEX["NV"])
    with no_warnings():
        fig = plots._roc_figure(y, probabilities_for(y))
        fig.canvas.draw()
    ax = fig.axes[0]
    texts = legend_texts(ax)
    assert "NV (Melanocytic nevus): AUC undefined (no negatives)" in texts
    assert sum("AUC undefined (no positives)" in t for t in texts) == K - 1
    assert [line for line in ax.lines if len(line.get_xdata()) > 0 and line.get_label().startswith(tuple(CODES))] == []
    assert "no AUC defined" in ax.get_title()


def test_roc_rejects_mismatched_shapes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="probabilities"):
        plots.roc_curves([0, 1], np.full((2, K - 1), 0.1), tmp_path / "roc.png")
    assert not (tmp_path / "roc.png").exists()


# Confusion matrix ----------------------------------------------------------------


def test_confusion_png_all_one_class_predictions_and_an_empty_row(tmp_path: Path) -> None:
    matrix = np.zeros((K, K), dtype=int)
    matrix[:, INDEX["NV"]] = [5, 3, 4, 0, 7, 20, 2, 1]  # every image predicted NV; no true DF
    out = tmp_path / "plots" / "confusion.png"
    with no_warnings():
        written = plots.confusion_matrix_plot(matrix, out)
    assert written == out
    width, height = assert_png(out, (1200, 600))
    assert width > height  # two panels side by side


def test_confusion_annotations_counts_recall_and_no_support() -> None:
    matrix = np.zeros((K, K), dtype=int)
    matrix[INDEX["AK"], INDEX["AK"]] = 3
    matrix[INDEX["AK"], INDEX["SCC"]] = 1
    matrix[INDEX["NV"], INDEX["NV"]] = 10
    with no_warnings():
        fig = plots._confusion_figure(matrix)
    counts_ax, recall_ax = fig.axes[0], fig.axes[1]

    def cell(ax, row: int, col: int) -> str:
        return next(t.get_text() for t in ax.texts if t.get_position() == (col, row))

    assert cell(counts_ax, INDEX["AK"], INDEX["SCC"]) == "1"
    assert cell(recall_ax, INDEX["AK"], INDEX["AK"]) == "0.75"
    assert cell(recall_ax, INDEX["AK"], INDEX["SCC"]) == "0.25"
    assert cell(recall_ax, INDEX["NV"], INDEX["NV"]) == "1.00"
    no_support = [t for t in recall_ax.texts if "no support" in t.get_text()]
    assert sorted(t.get_position()[1] for t in no_support) == sorted(
        INDEX[c] for c in CODES if c not in ("AK", "NV")
    )
    assert [t.get_text() for t in counts_ax.get_xticklabels()] == list(CODES)
    assert counts_ax.get_xlabel() == "predicted class" and counts_ax.get_ylabel() == "true class"
    assert "AK (n=4)" in [t.get_text() for t in recall_ax.get_yticklabels()]


def test_confusion_rejects_a_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="8x8"):
        plots.confusion_matrix_plot(np.zeros((K, K - 1)), tmp_path / "c.png")


# Reliability diagram -------------------------------------------------------------


def bins_with_empties() -> dict[str, list]:
    edges = np.linspace(0.0, 1.0, 11)
    confidence = [None, None, 0.27, 0.35, float("nan"), 0.55, 0.66, 0.74, 0.86, 0.95]
    accuracy = [None, None, 0.20, 0.30, float("nan"), 0.50, 0.70, 0.72, 0.90, 0.97]
    count = [0, 0, 4, 10, 0, 30, 40, 60, 90, 120]
    return {"lower": list(edges[:-1]), "upper": list(edges[1:]), "confidence": confidence,
            "accuracy": accuracy, "count": count}


def test_reliability_bars_skip_empty_bins() -> None:
    with no_warnings():
        fig = plots._reliability_figure(bins_with_empties(), ece=0.0412)
    top, bottom = fig.axes[0], fig.axes[1]
    assert "ECE 0.041" in top.get_title()
    accuracy_bars = top.containers[0]
    assert len(accuracy_bars) == 7  # the three empty bins draw no bar
    assert [round(b.get_height(), 2) for b in accuracy_bars] == [0.2, 0.3, 0.5, 0.7, 0.72, 0.9, 0.97]
    assert len(bottom.containers[0]) == 10  # the count histogram shows every bin, zeros included
    assert [line for line in top.lines if list(line.get_xdata()) == [0, 1] == list(line.get_ydata())]


def test_reliability_before_and_after_calibration_all_empty_bins(tmp_path: Path) -> None:
    empty = {"lower": [0.0, 0.5], "upper": [0.5, 1.0], "confidence": [None, None],
             "accuracy": [None, None], "count": [0, 0]}
    out = tmp_path / "a" / "rel2.png"
    with no_warnings():
        written = plots.reliability_diagram(
            bins_with_empties(), out, ece=0.08, calibrated_bins=empty, calibrated_ece=None
        )
    assert written == out
    width, height = assert_png(out, (1400, 800))
    assert width > height

    fig = plots._reliability_figure(bins_with_empties(), 0.08, empty, 0.021)
    titles = [ax.get_title() for ax in fig.axes]
    assert "before temperature scaling: ECE 0.080" in titles
    assert "after temperature scaling: ECE 0.021" in titles


def test_reliability_accepts_mean_confidence_key() -> None:
    bins = bins_with_empties()
    bins["mean_confidence"] = bins.pop("confidence")  # as dermascan.evaluation.metrics.reliability_bins names it
    fig = plots._reliability_figure(bins)
    assert len(fig.axes[0].containers[0]) == 7


def test_reliability_rejects_ragged_bins(tmp_path: Path) -> None:
    bins = bins_with_empties()
    bins["count"] = bins["count"][:-1]
    with pytest.raises(ValueError, match="unequal lengths"):
        plots.reliability_diagram(bins, tmp_path / "r.png")


# Training curves ----------------------------------------------------------------

# The header and rows as Keras' CSVLogger writes them (keys sorted), with PhaseLogger's columns.
HISTORY_CSV = """epoch,balanced_accuracy,learning_rate,loss,phase,top1_accuracy,val_balanced_accuracy,val_loss,val_top1_accuracy
0,0.30,0.001,2.00,1.0,0.40,0.28,2.10,0.38
1,0.40,0.001,1.70,1.0,0.50,0.36,1.80,0.47
2,0.45,0.001,1.55,1.0,0.55,0.40,1.70,0.52
3,0.50,0.00002,1.40,2.0,0.60,0.44,1.60,0.56
4,0.58,0.0001,1.20,2.0,0.66,0.50,1.45,0.60
5,0.64,0.00008,1.05,2.0,0.71,0.55,1.35,0.64
6,0.69,0.00004,0.95,2.0,0.75,0.57,1.30,0.66
"""


def history() -> pd.DataFrame:
    return pd.read_csv(io.StringIO(HISTORY_CSV))


def boundary_lines(fig) -> list:
    return [line for ax in fig.axes for line in ax.lines if line.get_gid() == plots.BOUNDARY_GID]


def test_training_curves_png_from_history_csv(tmp_path: Path) -> None:
    out = tmp_path / "run" / "plots" / "training_curves.png"
    with no_warnings():
        written = plots.training_curves(history(), out, phase1_epochs=3)
    assert written == out
    assert_png(out, (1000, 700))


def test_training_phase_boundary_on_one_continuous_axis() -> None:
    fig = plots._training_figure(history(), phase1_epochs=3)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "loss (categorical cross-entropy)",
        "balanced accuracy (mean per-class recall)",
        "top-1 accuracy",
        "learning rate",
    ]
    lines = boundary_lines(fig)
    assert len(lines) == len(panels)  # one per panel
    for line in lines:
        assert list(line.get_xdata()) == [3.5, 3.5]  # between epoch 3 (last of phase 1) and epoch 4
    for ax in panels:
        curves = [line for line in ax.lines if line.get_label() in ("train", "validation", "learning rate (end of epoch)")]
        assert curves, ax.get_title()
        for curve in curves:
            assert list(curve.get_xdata()) == list(range(1, 8))
        texts = [t.get_text().strip() for t in ax.texts]
        assert "phase 1" in texts and "phase 2" in texts
        assert ax.get_xlabel() == "epoch"
    val_ba = next(line for line in panels[1].lines if line.get_label() == "validation")
    assert list(val_ba.get_ydata()) == [0.28, 0.36, 0.40, 0.44, 0.50, 0.55, 0.57]


def test_training_resumed_history_keeps_the_last_line_of_a_repeated_epoch() -> None:
    frame = history()
    repeat = frame.iloc[[4]].assign(loss=9.0)  # epoch 4 logged again after a resume
    frame = pd.concat([frame.iloc[:5], repeat, frame.iloc[5:]], ignore_index=True)
    fig = plots._training_figure(frame, phase1_epochs=3)
    train_loss = next(line for line in fig.axes[0].lines if line.get_label() == "train")
    assert list(train_loss.get_xdata()) == list(range(1, 8))
    assert train_loss.get_ydata()[4] == 9.0
    assert all(list(line.get_xdata()) == [3.5, 3.5] for line in boundary_lines(fig))


@pytest.mark.parametrize("phase1_epochs", [0, 7])
def test_training_no_boundary_when_a_phase_has_no_epochs(phase1_epochs: int) -> None:
    with no_warnings():
        fig = plots._training_figure(history(), phase1_epochs=phase1_epochs)
    assert boundary_lines(fig) == []


def test_training_empty_history_draws_without_warnings() -> None:
    with no_warnings():
        fig = plots._training_figure(pd.DataFrame(columns=["epoch", "loss", "val_loss"]), phase1_epochs=0)
        fig.canvas.draw()
    assert any("no epochs logged" in t.get_text() for t in fig.axes[0].texts)


# Referral ROC and subgroups ----------------------------------------------------------


def test_referral_roc_marks_the_operating_point(tmp_path: Path) -> None:
    needs = np.array([True, True, True, True, False, False, False, False])
    scores = np.array([0.9, 0.7, 0.6, 0.2, 0.65, 0.3, 0.1, 0.05])
    with no_warnings():
        fig = plots._referral_figure(needs, scores, threshold=0.6, target=0.75, val_point=(0.8, 0.7))
        fig.canvas.draw()
    (ax,) = fig.axes
    lines = {line.get_label(): line for line in ax.get_lines()}
    point = next(line for label, line in lines.items() if label.startswith("operating point"))
    # score >= 0.6 refers 3 of 4 needing it and 1 of 4 others: (1 - specificity, sensitivity) = (0.25, 0.75)
    assert (point.get_xdata()[0], point.get_ydata()[0]) == (0.25, 0.75)
    assert "sensitivity 0.750, specificity 0.750" in point.get_label() and "score ≥ 0.6" in point.get_label()
    val = next(line for label, line in lines.items() if label.startswith("on val"))
    assert (val.get_xdata()[0], val.get_ydata()[0]) == pytest.approx((0.3, 0.8))
    curve = next(line for label, line in lines.items() if label.startswith("referral score"))
    assert f"AUC {pairwise_auc(needs, scores):.3f}" in curve.get_label()
    assert any("target sensitivity 0.75" in t for t in legend_texts(ax))
    assert_png(plots.referral_roc(needs, scores, 0.6, tmp_path / "referral_roc.png", target=0.75), (800, 800))


def test_referral_roc_without_negatives_draws_no_curve() -> None:
    with no_warnings():
        fig = plots._referral_figure(np.ones(4, bool), np.linspace(0, 1, 4), threshold=0.5)
        fig.canvas.draw()
    assert any("ROC undefined" in t.get_text() for t in fig.axes[0].texts)
    with pytest.raises(ValueError, match="same 1-D shape"):
        plots._referral_figure(np.ones(4, bool), np.ones(3), threshold=0.5)


def subgroups_result() -> dict:
    def group(n, ba, sens, flags):
        interval = None if sens is None else {"estimate": sens, "low": sens - 0.1, "high": min(sens + 0.1, 1.0)}
        return {"n": n, "balanced_accuracy": {"estimate": ba, "low": ba - 0.1, "high": ba + 0.1},
                "referral_sensitivity": interval, "flags": flags}

    return {"split": "test", "min_images": 30, "overall_referral_sensitivity": 0.9, "overall_balanced_accuracy": 0.6,
            "dimensions": {"sex": {"male": group(100, 0.6, 0.92, []), "female": group(90, 0.55, 0.6, ["below overall"])},
                           "site": {"palms/soles": group(12, 0.4, None, ["small"])}}}


def test_subgroups_forest_plot(tmp_path: Path) -> None:
    with no_warnings():
        fig = plots._subgroup_figure(subgroups_result())
        fig.canvas.draw()
    left, right = fig.axes
    assert [t.get_text() for t in left.get_yticklabels()] == ["sex: male (n=100)", "sex: female (n=90)",
                                                                 "site: palms/soles (n=12)"]
    colours = {line.get_ydata()[0]: line.get_color() for line in right.get_lines() if line.get_marker() == "o"}
    assert colours == {0: "tab:blue", 1: "tab:red"}  # no sensitivity for palms/soles; female below overall
    grey = [line for line in left.get_lines() if line.get_marker() == "o" and line.get_ydata()[0] == 2]
    assert grey and grey[0].get_color() == "0.6"  # small
    assert any("overall 0.900" in t for t in legend_texts(right)) and any("overall 0.600" in t for t in legend_texts(left))
    assert_png(plots.subgroups_plot(subgroups_result(), tmp_path / "subgroups.png"), (1200, 200))


def test_no_pyplot_figures_left_open() -> None:
    before = Gcf.get_num_fig_managers()
    y = np.arange(16) % K
    plots._roc_figure(y, probabilities_for(y))
    plots._confusion_figure(np.eye(K, dtype=int))
    plots._reliability_figure(bins_with_empties())
    plots._training_figure(history(), phase1_epochs=3)
    plots._referral_figure(np.array([True, False]), np.array([0.9, 0.1]), 0.5)
    plots._subgroup_figure(subgroups_result())
    assert Gcf.get_num_fig_managers() == before
    assert not hasattr(plots, "plt")
