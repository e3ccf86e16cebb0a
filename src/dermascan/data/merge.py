"""Merge the releases' labels into one row per image, in the 8 ISIC 2019 classes.

Rules:
- An image in several releases appears once; ``source`` lists them all.
- Its ISIC 2019 label wins, because it is finer (2018 AKIEC is 2019 AK or
  SCC). A 2018 label that contradicts the 2019 one excludes the image.
- A 2018 AKIEC image that ISIC 2019 does not relabel follows ``akiec``:
  ``drop`` excludes it, ``ak`` labels it AK. With ``keep_unlabelled_akiec``
  (the official split's ISIC 2018 Test images) it is kept with no 8-class
  label, so that it can still be scored in the 2018 scheme.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from dermascan.classes import AMBIGUOUS_2018, LABEL_MAP_2018_TO_2019
from dermascan.data.isic import RELEASE_ORDER, RELEASES, Excluded


@dataclass
class Merged:
    labels: pd.DataFrame  # image_id, label, label_2018, source
    excluded: list[Excluded] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)


def merge_labels(
    per_release: dict[str, pd.DataFrame],
    akiec: str = "drop",
    keep_unlabelled_akiec: frozenset[str] = frozenset(),
) -> Merged:
    """``per_release`` maps release name -> ``image_id, label`` rows."""
    table, n_2018 = _by_image(per_release)
    excluded: list[Excluded] = []
    drop = pd.Series(False, index=table.index)

    conflict_2018 = n_2018.index[n_2018 > 1]
    for image_id in conflict_2018:
        excluded.append(
            Excluded(image_id, "conflicting labels between ISIC 2018 releases", table.at[image_id, "source"])
        )
    drop[conflict_2018] = True

    conflict = _conflicting(table, drop)
    for image_id, row in table[conflict].iterrows():
        reason = f"conflicting labels: ISIC 2018 {row['label_2018']} vs ISIC 2019 {row['label_2019']}"
        excluded.append(Excluded(image_id, reason, row["source"]))
    drop |= conflict

    table["label"] = _merged_label(table, drop, akiec, keep_unlabelled_akiec, excluded)

    multi = table["source"].str.contains("+", regex=False)
    duplicates = {"images_in_several_releases": int(multi.sum())}
    duplicates.update({k: int(v) for k, v in table.loc[multi, "source"].value_counts().items()})

    out = table[~drop].reset_index(names="image_id")
    return Merged(out[["image_id", "label", "label_2018", "source"]], excluded, duplicates)


def _by_image(per_release: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.Series]:
    """One row per image: its releases (``source``, e.g. isic2018_train+isic2019_train) and labels in each scheme;
    and how many distinct 2018 labels each image has."""
    long = pd.concat([rows.assign(release=name) for name, rows in per_release.items()], ignore_index=True)
    scheme = long["release"].map(lambda r: RELEASES[r].scheme)
    present = pd.crosstab(long["image_id"], long["release"]) > 0
    present = present[[r for r in RELEASE_ORDER if r in present.columns]]
    joined = pd.Series("", index=present.index, dtype=object)
    for name in present.columns:
        joined = joined + np.where(present[name], name + "+", "")
    table = pd.DataFrame({"source": joined.str.rstrip("+")})
    table["label_2019"] = long[scheme == 2019].set_index("image_id")["label"]
    old = long[scheme == 2018]
    table["label_2018"] = old.drop_duplicates("image_id").set_index("image_id")["label"]
    return table, old.groupby("image_id")["label"].nunique()


def _conflicting(table: pd.DataFrame, drop: pd.Series) -> pd.Series:
    """Images labelled in both schemes whose labels cannot both be right."""
    both = table["label_2019"].notna() & table["label_2018"].notna() & ~drop
    compatible = table["label_2018"].map(LABEL_MAP_2018_TO_2019) == table["label_2019"]
    for coarse, fine in AMBIGUOUS_2018.items():
        compatible |= (table["label_2018"] == coarse) & table["label_2019"].isin(fine)
    return both & ~compatible


def _merged_label(
    table: pd.DataFrame, drop: pd.Series, akiec: str, keep_unlabelled_akiec: frozenset[str],
    excluded: list[Excluded],
) -> pd.Series:
    """The 2019 label, else the 2018 label mapped to 2019; AKIEC (AK or SCC) per ``akiec``.

    Marks in ``drop`` (and records in ``excluded``) the AKIEC images that
    ``akiec=drop`` leaves out.
    """
    label = table["label_2019"].copy()
    only_2018 = label.isna() & table["label_2018"].notna() & ~drop
    label[only_2018] = table.loc[only_2018, "label_2018"].map(LABEL_MAP_2018_TO_2019)
    ambiguous = only_2018 & (table["label_2018"] == "AKIEC")
    if akiec == "ak":
        label[ambiguous] = "AK"
        return label
    kept = ambiguous & table["source"].isin(keep_unlabelled_akiec)
    label[kept] = np.nan
    for image_id in table.index[ambiguous & ~kept]:
        reason = "ambiguous AKIEC (AK or SCC) not relabelled by ISIC 2019 (data.akiec=drop)"
        excluded.append(Excluded(image_id, reason, table.at[image_id, "source"]))
        drop[image_id] = True
    return label
