"""A finished run's folder, as re-evaluation, export and the notebook read it.

    run = load_run("runs/train/2026-11-26_12-00-00")
    run.cfg, run.manifest, run.model()
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import keras
import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from dermascan.artifacts import BEST, CONFIG, MANIFEST, MANIFEST_SUMMARY, read_json
from dermascan.config import load_saved_run_config
from dermascan.data import manifest as manifest_io
from dermascan.errors import DataError
from dermascan.modeling.fit import load_keras
from dermascan.modeling.inputs import evaluation_images

log = logging.getLogger("dermascan.rundir")


@dataclass
class Run:
    run_dir: Path
    cfg: DictConfig
    manifest: pd.DataFrame

    @property
    def cache(self) -> dict[str, Any]:
        return OmegaConf.to_container(self.cfg.data.cache, resolve=True)

    @property
    def summary(self) -> dict[str, Any]:
        return read_json(self.run_dir / MANIFEST_SUMMARY, {})

    def model(self) -> keras.Model:
        """The best checkpoint (what train evaluated and exported)."""
        return load_keras(self.run_dir / BEST)


def load_run(run_dir: str | Path) -> Run:
    """Read a finished ``python -m dermascan.train`` run dir; DataError naming what is missing."""
    run_dir = Path(run_dir)
    missing = [name for name in (CONFIG, MANIFEST, BEST) if not (run_dir / name).is_file()]
    if missing:
        raise DataError(
            f"{run_dir} is not a finished training run: {', '.join(missing)} missing. "
            "Give the run dir of a python -m dermascan.train run (runs/train/<timestamp>)."
        )
    cfg, filled = load_saved_run_config(run_dir / CONFIG)
    if filled:
        log.info("%s predates config key(s) %s: they take the base configs' values", run_dir, ", ".join(filled))
    return Run(run_dir, cfg, manifest_io.read(run_dir / MANIFEST))


def load_images(frame: pd.DataFrame, image_size: int, cache: dict[str, Any], batch_size: int = 64) -> np.ndarray:
    """The manifest rows of ``frame`` as uint8 [N, S, S, 3], decoded and resized exactly as evaluation does."""
    batches = [images.numpy() for images in evaluation_images(frame, image_size, batch_size, cache)]
    if not batches:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    return np.concatenate(batches).astype(np.uint8)


def sample_rows(frame: pd.DataFrame, n: Optional[int], seed: int) -> pd.DataFrame:
    """``n`` rows drawn without replacement (all of them when n is None or larger)."""
    if n is None or n >= len(frame):
        return frame.reset_index(drop=True)
    return frame.sample(n=n, random_state=seed).reset_index(drop=True)
