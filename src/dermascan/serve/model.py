"""The served model: an export folder, checked against its manifest, loaded once.

``load_model`` verifies ``MANIFEST.sha256`` *before* any model file is
opened, reads ``labels.json``, loads the predictor for the chosen runtime and
runs one warm-up prediction, so the first request is not the slow one and a
model whose output does not match ``labels.json`` is refused at start-up.

The manifest check (``dermascan.checksums``) imports no TensorFlow, which
would dominate a TFLite server's start-up (about 10 s and 700 MB here), the
number that matters on Lambda.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermascan.artifacts import CARD, LABELS, PARITY, read_labels
from dermascan.checksums import verify_manifest
from dermascan.classes import DISCLAIMER
from dermascan.errors import DermascanError
from dermascan.runtime import RuntimeLoadError, load_predictor

log = logging.getLogger("dermascan.serve.model")



class ServeError(DermascanError):
    """The service cannot serve this export folder."""


def _input_size(labels: dict) -> int:
    spec = labels.get("input") or {}
    size = spec.get("size") or (spec.get("shape") or [None, None])[1:3]
    if not size or len(size) != 2 or size[0] != size[1] or not isinstance(size[0], int):
        raise ServeError(f"labels.json input.size must be a square [S, S], got {size!r}")
    return int(size[0])


def _resize_method(labels: dict) -> str:
    from dermascan.data.cache import METHODS

    resize = (labels.get("input") or {}).get("resize")
    method = resize.get("method", "bilinear") if isinstance(resize, dict) else "bilinear"
    if method not in METHODS:
        raise ServeError(f"labels.json input.resize.method {method!r} is not one of {', '.join(METHODS)}")
    if isinstance(resize, dict) and resize.get("mode", "squash") != "squash":
        raise ServeError(f"labels.json input.resize.mode {resize.get('mode')!r}: only 'squash' is served")
    return method


@dataclass
class ServedModel:
    export_dir: Path
    runtime: str
    tflite: str
    labels: dict
    predict: Any  # dermascan.runtime.Predictor
    image_size: int
    resize_method: str
    files_verified: int
    load_seconds: float
    classes: list[dict] = field(default_factory=list)

    @property
    def model_version(self) -> str:
        return str(self.labels.get("model_version") or self.labels.get("version") or "unknown")

    @property
    def disclaimer(self) -> str:
        return str(self.labels.get("disclaimer") or DISCLAIMER)

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """One image's probabilities, in ``classes`` order."""
        return np.asarray(self.predict(pixels[None]), np.float32)[0]

    def summary(self) -> dict:
        """``GET /v1/model``: what is served, and the model card's text and parity report if present."""
        card = self.export_dir / CARD
        parity = self.export_dir / PARITY
        return {
            "version": self.labels.get("version"),
            "model_version": self.model_version,
            "runtime": self.runtime,
            "tflite": self.tflite if self.runtime == "tflite" else None,
            "input": {"size": [self.image_size, self.image_size], "channels": "RGB", "resize": self.resize_method},
            "classes": [c["code"] for c in self.classes],
            "temperature": self.labels.get("temperature"),
            "files_verified": self.files_verified,
            "card": card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None,
            "parity": json.loads(parity.read_text()) if parity.is_file() else None,
        }


def load_model(
    export_dir: str | Path, runtime: str = "tflite", tflite: str = "fp32", num_threads: int | None = None
) -> ServedModel:
    """Verify, load and warm up an export folder; raise ServeError, RuntimeLoadError or ArtifactError naming the problem."""
    started = time.perf_counter()
    export_dir = Path(export_dir)
    files = verify_manifest(export_dir)
    labels = read_labels(export_dir)
    classes = sorted(labels.get("classes") or [], key=lambda c: c.get("index", 0))
    keys = ("code", "name", "description", "category")
    if not classes or any(any(k not in c for k in keys) for c in classes):
        raise ServeError(f"{export_dir}/{LABELS}: 'classes' must list {', '.join(keys)} for every class")
    size, method = _input_size(labels), _resize_method(labels)
    predict = load_predictor(export_dir, runtime, tflite=tflite, num_threads=num_threads)
    try:
        probe = np.asarray(predict(np.zeros((1, size, size, 3), np.uint8)))
    except Exception as err:
        raise RuntimeLoadError(f"the {runtime} model in {export_dir} failed its warm-up prediction: {err}") from err
    if probe.shape != (1, len(classes)) or not np.all(np.isfinite(probe)):
        raise ServeError(
            f"the {runtime} model returns shape {probe.shape} (finite: {bool(np.all(np.isfinite(probe)))}), "
            f"but labels.json lists {len(classes)} classes"
        )
    seconds = time.perf_counter() - started
    log.info(
        "loaded %s (%s%s, %d px, %s resize, %d files verified) in %.2f s",
        export_dir, runtime, f" {tflite}" if runtime == "tflite" else "", size, method, files, seconds,
    )
    return ServedModel(export_dir, runtime, tflite, labels, predict, size, method, files, seconds, classes)
