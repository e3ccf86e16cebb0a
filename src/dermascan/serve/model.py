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

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dermascan.artifacts import CARD, LABELS, PARITY, read_json_object, read_labels
from dermascan.checksums import verify_manifest
from dermascan.classes import DISCLAIMER
from dermascan.errors import DermascanError
from dermascan.runtime import RuntimeLoadError, load_predictor

log = logging.getLogger("dermascan.serve.model")

CLASS_KEYS = ("code", "name", "description", "category")


class ServeError(DermascanError):
    """The service cannot serve this export folder."""


def read_classes(labels: dict, path: Path) -> list[dict]:
    """``labels.json`` classes in index order; ServeError naming the file unless every class is a complete object."""
    classes = labels.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, dict) and all(isinstance(c.get(k), str) for k in CLASS_KEYS) for c in classes)
        or not all(type(c.get("index", 0)) is int for c in classes)
    ):
        raise ServeError(f"{path}: 'classes' must be a list of objects with an integer index and "
                         f"string {', '.join(CLASS_KEYS)}, got {repr(classes)[:120]}")
    return sorted(classes, key=lambda c: c.get("index", 0))


def _referral(labels: dict, classes: list[dict], path: Path) -> dict | None:
    """labels.json's referral operating point, checked; None when the export has none (an older export)."""
    referral = labels.get("referral")
    if referral is None:
        return None
    indices = referral.get("indices") if isinstance(referral, dict) else None
    threshold = referral.get("threshold") if isinstance(referral, dict) else None
    if (
        not isinstance(indices, list) or not indices
        or not all(type(i) is int and 0 <= i < len(classes) for i in indices)
        or isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0
    ):
        raise ServeError(f"{path}: 'referral' needs class 'indices' (0-{len(classes) - 1}) and a 'threshold' "
                         f"in [0, 1], got {repr(referral)[:160]}")
    return referral


def _gate(labels: dict, path: Path) -> dict | None:
    """labels.json's out-of-scope gate, checked; None when the export has none."""
    gate = labels.get("out_of_scope")
    if gate is None:
        return None
    threshold = gate.get("threshold") if isinstance(gate, dict) else None
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not np.isfinite(threshold):
        raise ServeError(f"{path}: 'out_of_scope' needs a numeric 'threshold', got {repr(gate)[:160]}")
    return gate


def input_size(labels: dict) -> int:
    spec = labels.get("input") or {}
    if not isinstance(spec, dict):
        raise ServeError(f"labels.json input must be an object, got {spec!r}")
    shape = spec.get("shape")
    size = spec.get("size") or (shape[1:3] if isinstance(shape, list) else None)
    if not isinstance(size, list) or len(size) != 2 or size[0] != size[1] or type(size[0]) is not int or size[0] < 1:
        raise ServeError(f"labels.json input.size must be a square [S, S], got {size!r}")
    return int(size[0])


def resize_method(labels: dict) -> str:
    from dermascan.data.cache import METHODS

    resize = (labels.get("input") or {}).get("resize")
    method = resize.get("method", "bilinear") if isinstance(resize, dict) else "bilinear"
    if not isinstance(method, str) or method not in METHODS:
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
    parity: dict | None = None
    referral: dict | None = None  # labels.json's operating point
    gate: dict | None = None  # labels.json's out-of-scope gate

    def referral_of(self, probabilities: np.ndarray) -> dict | None:
        """The referral decision for one image's probabilities, as labels.json defines it (the phone's rule too)."""
        if self.referral is None:
            return None
        score = float(sum(float(probabilities[i]) for i in self.referral["indices"]))
        threshold = float(self.referral["threshold"])
        return {
            "recommended": score >= threshold,
            "score": score,
            "threshold": threshold,
            "classes": [self.classes[i]["code"] for i in self.referral["indices"]],
            "val_sensitivity": self.referral.get("val_sensitivity"),
            "val_specificity": self.referral.get("val_specificity"),
        }

    @property
    def model_version(self) -> str:
        return str(self.labels.get("model_version") or self.labels.get("version") or "unknown")

    @property
    def disclaimer(self) -> str:
        return str(self.labels.get("disclaimer") or DISCLAIMER)

    def outputs(self, pixels: np.ndarray) -> dict[str, Any]:
        """One image's probabilities (in ``classes`` order) and, with the gate, its out-of-scope score."""
        outputs = self.predict(pixels[None])
        result = {"probabilities": np.asarray(outputs["probabilities"], np.float32)[0]}
        if "out_of_scope" in outputs:
            result["out_of_scope"] = float(outputs["out_of_scope"][0])
        return result

    def scope_of(self, score: float | None) -> dict | None:
        """The out-of-scope gate's answer for one score, as labels.json defines it; None when there is no gate."""
        if self.gate is None or score is None:
            return None
        threshold = float(self.gate["threshold"])
        return {"in_scope": score <= threshold, "score": score, "threshold": threshold}

    def summary(self) -> dict:
        """``GET /v1/model``: what is served, and the model card's text and parity report if present."""
        card = self.export_dir / CARD
        return {
            "version": self.labels.get("version"),
            "model_version": self.model_version,
            "runtime": self.runtime,
            "tflite": self.tflite if self.runtime == "tflite" else None,
            "input": {"size": [self.image_size, self.image_size], "channels": "RGB", "resize": self.resize_method},
            "classes": [c["code"] for c in self.classes],
            "temperature": self.labels.get("temperature"),
            "referral": self.referral,
            "out_of_scope": self.gate,
            "files_verified": self.files_verified,
            "card": card.read_text(encoding="utf-8", errors="replace") if card.is_file() else None,
            "parity": self.parity,
        }


def load_model(
    export_dir: str | Path, runtime: str = "tflite", tflite: str = "fp32", num_threads: int | None = None
) -> ServedModel:
    """Verify, load and warm up an export folder; raise ServeError, RuntimeLoadError or ArtifactError naming the problem."""
    started = time.perf_counter()
    export_dir = Path(export_dir)
    files = verify_manifest(export_dir)
    labels = read_labels(export_dir)
    classes = read_classes(labels, export_dir / LABELS)
    size, method = input_size(labels), resize_method(labels)
    referral = _referral(labels, classes, export_dir / LABELS)
    gate = _gate(labels, export_dir / LABELS)
    # read once, now: a malformed parity.json is refused at start-up, not on every GET /v1/model
    parity = read_json_object(export_dir / PARITY) if (export_dir / PARITY).is_file() else None
    predict = load_predictor(export_dir, runtime, tflite=tflite, num_threads=num_threads)
    try:
        outputs = predict(np.zeros((1, size, size, 3), np.uint8))
        probe = np.asarray(outputs["probabilities"])
    except Exception as err:
        raise RuntimeLoadError(f"the {runtime} model in {export_dir} failed its warm-up prediction: {err}") from err
    if probe.shape != (1, len(classes)) or not np.all(np.isfinite(probe)):
        raise ServeError(
            f"the {runtime} model returns shape {probe.shape} (finite: {bool(np.all(np.isfinite(probe)))}), "
            f"but labels.json lists {len(classes)} classes"
        )
    if (gate is not None) != ("out_of_scope" in outputs):
        raise ServeError(
            f"labels.json {'has' if gate is not None else 'has no'} out-of-scope gate but the {runtime} model "
            f"{'lacks' if gate is not None else 'has'} its out_of_scope output: re-export the run"
        )
    seconds = time.perf_counter() - started
    log.info(
        "loaded %s (%s%s, %d px, %s resize, %d files verified) in %.2f s",
        export_dir, runtime, f" {tflite}" if runtime == "tflite" else "", size, method, files, seconds,
    )
    return ServedModel(
        export_dir, runtime, tflite, labels, predict, size, method, files, seconds, classes, parity, referral, gate
    )

