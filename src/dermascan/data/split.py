"""Train/val/test splits that never put one lesion in two splits.

scikit-learn's ``StratifiedGroupKFold`` only offers fractions of the form
1/k (0.15 is not one), so the grouped split is done here: per class, the
lesion groups are shuffled with the seed, ordered largest first, and each is
given to the split that is furthest below its target share of that class's
images. Whole groups move, so no lesion crosses splits, and every class with
at least three lesions lands in every split.

``kfold_split`` cuts the grouped split's train + val into k folds the same
way, and keeps its test split: the fold runs share one held-out test set,
and it is the one a single ``grouped`` run with the same seed is scored on.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def grouped_split(
    labels: pd.Series,
    groups: pd.Series,
    fractions: dict[str, float],
    seed: int,
) -> pd.Series:
    """Assign each row a split name; ``fractions`` maps split -> share (sums to 1).

    ``labels`` and ``groups`` are aligned Series. A group whose images carry
    several labels is stratified by its most frequent label.
    """
    names = [name for name, share in fractions.items() if share > 0]
    shares = np.array([fractions[name] for name in names], dtype=float)
    shares = shares / shares.sum()
    frame = pd.DataFrame({"label": labels.to_numpy(), "group": groups.to_numpy()})
    counts = frame.groupby(["group", "label"], sort=True).size()
    per_group = pd.DataFrame(
        {
            "label": counts.groupby(level="group").idxmax().map(lambda key: key[1]),
            "size": counts.groupby(level="group").sum(),
        }
    )
    rng = np.random.default_rng(seed)
    assignment: dict[object, str] = {}
    for _, members in per_group.groupby("label", sort=True):
        members = members.iloc[rng.permutation(len(members))]
        members = members.sort_values("size", ascending=False, kind="stable")
        target = shares * members["size"].sum()
        filled = np.zeros(len(names))
        for group, size in members["size"].items():
            i = int(np.argmax((target - filled) / target))
            assignment[group] = names[i]
            filled[i] += size
    return pd.Series(frame["group"].map(assignment).to_numpy(), index=labels.index, name="split")


def kfold_split(
    labels: pd.Series,
    groups: pd.Series,
    val_fraction: float,
    test_fraction: float,
    folds: int,
    fold: int,
    seed: int,
) -> pd.Series:
    """Train/val/test for fold ``fold`` of ``folds``: test as ``grouped_split`` assigns it, val one fold of the rest.

    The folds are lesion-grouped and class-stratified, and depend only on the
    data and the seed, so every fold job of a sweep computes the same partition.
    """
    fractions = {"train": 1.0 - val_fraction - test_fraction, "val": val_fraction, "test": test_fraction}
    split = grouped_split(labels, groups, fractions, seed).to_numpy(dtype=object)
    rest = split != "test"
    if rest.any():
        names = [f"fold{i}" for i in range(folds)]
        parts = grouped_split(labels[rest], groups[rest], dict.fromkeys(names, 1.0 / folds), seed).to_numpy()
        split[rest] = np.where(parts == names[fold], "val", "train")
    return pd.Series(split, index=labels.index, name="split")
