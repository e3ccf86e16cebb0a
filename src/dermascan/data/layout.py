"""Stand-in image folders for the real ISIC CSVs.

The ground-truth and metadata CSVs are small, the images are 30+ GB. To test
or benchmark ingestion on the real CSVs without the images, this lays the
CSVs out under a root as the official downloads unzip, and fills each input
folder with hard links (or copies, across file systems) to a few real JPEGs,
one per image id the CSV names.
"""

from __future__ import annotations

import os
import shutil
from itertools import cycle
from pathlib import Path
from typing import Iterable

import pandas as pd

from dermascan.data.isic import HAM10000_METADATA, METADATA_2019, RELEASES


def link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def stand_in_layout(root: Path, csv_dir: Path, jpegs: Iterable[Path], releases: Iterable[str] = tuple(RELEASES)) -> Path:
    """Copy the official CSVs from ``csv_dir`` into ``root`` and link one JPEG per id."""
    root.mkdir(parents=True, exist_ok=True)
    pool = cycle(sorted(jpegs))
    for name in (METADATA_2019, HAM10000_METADATA):
        if (csv_dir / name).is_file():
            shutil.copyfile(csv_dir / name, root / name)
    for name in releases:
        release = RELEASES[name]
        shutil.copyfile(csv_dir / release.ground_truth, root / release.ground_truth)
        folder = root / release.input_dir
        folder.mkdir(exist_ok=True)
        for image_id in pd.read_csv(csv_dir / release.ground_truth, usecols=["image"])["image"]:
            link_or_copy(next(pool), folder / f"{image_id}.jpg")
    return root
