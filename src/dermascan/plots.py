"""Plots, as PNG files legible at a glance."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def training_curves(history: pd.DataFrame, path: Path, phase1_epochs: int) -> Path:
    """Loss and balanced accuracy per epoch, both phases on one axis, the boundary marked."""
    epochs = history["epoch"] + 1
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric, title in (
        (axes[0], "loss", "loss (categorical cross-entropy)"),
        (axes[1], "balanced_accuracy", "balanced accuracy (mean per-class recall)"),
    ):
        if metric in history:
            ax.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", label="val")
        if 0 < phase1_epochs < len(history):
            ax.axvline(phase1_epochs + 0.5, color="grey", linestyle="--", label="phase 1 | phase 2")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
