"""What the serving backend and the phone load: ``export/`` in the run directory.

    python -m dermascan.export run_dir=runs/train/<timestamp>              # also the last stage of train
    python -m dermascan.export run_dir=... export.tflite=[fp32,int8_full]

- ``saved_model/``: the serving SavedModel. Endpoint ``serve`` takes float32
  [N, S, S, 3] raw RGB 0-255, ``serve_uint8`` takes uint8 pixels; both
  return softmax probabilities. Normalisation and the fitted temperature
  (if any) are inside it.
- ``model.keras``: the same inference model as a Keras file.
- ``model_<kind>.tflite`` for each of ``export.tflite``: fp32, fp16,
  int8_dynamic (int8 weights) and int8_full (int8 weights and activations,
  calibrated on train-split images; uint8 pixel input, float32 output).
- ``parity.json``: every format run on a sample of the test split against
  the Keras model: top-1 agreement, max |probability difference|, balanced
  accuracy, file size and batch-1 latency. A format below
  ``export.min_agreement`` is not kept, and the export fails naming it.
- ``labels.json``: class order, codes, names, lay descriptions, categories,
  the input size and the preprocessing contract.
- ``model_card.md``: data, metrics with CIs, intended use and limits.
- ``MANIFEST.sha256``: a checksum of every other file (``sha256sum -c``
  format), checked by ``verify_manifest`` when the server starts.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import hydra
import keras
import numpy as np
import tensorflow as tf
from omegaconf import DictConfig, OmegaConf

from dermascan import __version__, cli
from dermascan.artifacts import (
    CARD,
    CHECKSUMS,
    COREML,
    EXPORT,
    KERAS_MODEL,
    LABELS,
    METRICS,
    PARITY,
    SAVED_MODEL,
    read_json,
    read_temperature,
    tflite_name,
)
from dermascan.checksums import write_manifest
from dermascan.classes import CLASSES, DISCLAIMER, INDEX
from dermascan.config import ExportRunConfig, config_dir
from dermascan.data.manifest import evaluation_rows
from dermascan.errors import DermascanError
from dermascan.evaluation.metrics import classification_metrics
from dermascan.modeling.model import inference_model
from dermascan.rundir import Run, load_images, load_run, sample_rows
from dermascan.runtime import (
    TFLITE_KINDS,
    keras_predictor,
    savedmodel_predictor,
    tflite_predictor,
)

log = logging.getLogger("dermascan.export")

class ExportError(DermascanError):
    """An export could not be written, or failed its parity check."""


def labels_json(image_size: int, resize_method: str, temperature: Optional[float] = None,
                model_version: Optional[str] = None) -> dict:
    return {
        "version": __version__,
        "model_version": model_version or __version__,
        "classes": [
            {"index": i, "code": c.code, "name": c.name, "description": c.description, "category": c.category.value}
            for i, c in enumerate(CLASSES)
        ],
        "input": {
            "size": [image_size, image_size],
            "shape": [None, image_size, image_size, 3],
            "channels": "RGB",
            "dtype": "float32 or uint8 (SavedModel endpoints serve / serve_uint8; int8_full TFLite takes uint8)",
            "pixels": "raw RGB, 0-255, no normalisation: preprocessing is inside the model",
            "resize": {"method": resize_method, "mode": "squash", "library": "PIL",
                       "note": f"squash the whole image to {image_size}x{image_size} (no crop), as training does"},
        },
        "output": "softmax probabilities, in the order of 'classes'",
        "temperature": temperature,
        "disclaimer": DISCLAIMER,
    }


def write_saved_model(model: keras.Model, path: Path, image_size: int) -> None:
    """A SavedModel with float32 (``serve``, also ``serving_default``) and uint8 (``serve_uint8``) endpoints."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    shape = [None, image_size, image_size, 3]
    archive.add_endpoint(
        "serve", lambda images: model(images, training=False),
        input_signature=[tf.TensorSpec(shape, tf.float32, name="images")],
    )
    archive.add_endpoint(
        "serve_uint8", lambda images: model(tf.cast(images, tf.float32), training=False),
        input_signature=[tf.TensorSpec(shape, tf.uint8, name="images")],
    )
    archive.write_out(str(path), verbose=False)


def convert_tflite(saved_model: Path, kind: str, representative: Optional[np.ndarray] = None) -> bytes:
    """Convert the SavedModel's ``serve`` endpoint to TFLite ``kind``."""
    if kind not in TFLITE_KINDS:
        raise ExportError(f"unknown export.tflite kind {kind!r}; choose from {', '.join(TFLITE_KINDS)}")
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serve"])
    if kind != "fp32":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if kind == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    if kind == "int8_full":
        if representative is None or not len(representative):
            raise ExportError("int8_full needs representative images from the train split")

        def samples():
            for image in representative:
                yield [image[None].astype(np.float32)]

        converter.representative_dataset = samples
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Raw pixels are 0-255 integers: a uint8 input (scale ~1, set by the calibration images' range)
        # takes decoded images as they are; ai_edge_litert callers quantise with the input's scale.
        converter.inference_input_type = tf.uint8
        converter.inference_output_type = tf.float32
    return converter.convert()


def batch1_latency_ms(predict, image: np.ndarray, runs: int) -> Optional[float]:
    """Median wall time of ``runs`` single-image predictions, after one warm-up."""
    if runs <= 0:
        return None
    predict(image[None])
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        predict(image[None])
        times.append(time.perf_counter() - start)
    return round(1000 * float(np.median(times)), 3)


def compare(reference: np.ndarray, probabilities: np.ndarray, labels: Optional[np.ndarray]) -> dict[str, Any]:
    """Top-1 agreement and max |difference| with the reference, and balanced accuracy on ``labels``."""
    result = {
        "top1_agreement": float(np.mean(reference.argmax(1) == probabilities.argmax(1))),
        "max_abs_diff": float(np.max(np.abs(reference - probabilities))),
    }
    if labels is not None and len(labels):
        result["balanced_accuracy"] = classification_metrics(labels, probabilities)["balanced_accuracy"]
    return result


def below_agreement(formats: dict[str, dict[str, Any]], min_agreement: float) -> list[str]:
    """The formats that fail to run, or whose top-1 agreement with Keras is below ``min_agreement``, with why."""
    return [
        f"{name}: {result['error']}" if "error" in result
        else f"{name}: top-1 agreement {result['top1_agreement']:.4f} < {min_agreement}"
        for name, result in formats.items()
        if "error" in result or result["top1_agreement"] < min_agreement
    ]


def export_model(
    model: keras.Model,
    out_dir: Path,
    *,
    image_size: int,
    tflite: Sequence[str],
    resize_method: str,
    min_agreement: float,
    temperature: Optional[float] = None,
    parity_images: Optional[np.ndarray] = None,
    parity_labels: Optional[np.ndarray] = None,
    representative: Optional[np.ndarray] = None,
    latency_runs: int = 0,
    model_version: Optional[str] = None,
    card: Optional[str] = None,
) -> dict[str, Any]:
    """Write ``out_dir`` from a trained Keras model; return the parity report.

    ``parity_images`` (uint8 [N, S, S, 3], default: random pixels) are run
    through every format and compared with the Keras model. A TFLite format
    whose top-1 agreement is below ``min_agreement`` is removed and, after
    everything else is written, the export raises ExportError naming it.
    """
    out_dir = Path(out_dir)
    _check_request(out_dir, tflite, representative)
    out_dir.mkdir(parents=True)
    serving = inference_model(model, temperature)
    if parity_images is None or not len(parity_images):
        parity_images = np.random.default_rng(0).integers(0, 256, (16, image_size, image_size, 3), dtype=np.uint8)
        parity_labels = None
    parity = Parity(np.asarray(parity_images, np.uint8), parity_labels, min_agreement, latency_runs)
    reference = parity.reference(serving)
    report = parity.report(reference)

    started = time.perf_counter()
    serving.save(out_dir / KERAS_MODEL)
    write_saved_model(serving, out_dir / SAVED_MODEL, image_size)
    log.info("wrote %s and %s/ in %.1f s", KERAS_MODEL, SAVED_MODEL, time.perf_counter() - started)
    for name, predict in (("keras", keras_predictor(out_dir / KERAS_MODEL)),
                          ("savedmodel", savedmodel_predictor(out_dir / SAVED_MODEL))):
        report["formats"][name] = parity.check(reference, predict)
    for kind in tflite:
        report["formats"][f"tflite_{kind}"] = _export_tflite(out_dir, kind, representative, parity, reference)
    _relative_to_fp32(report["formats"])

    (out_dir / PARITY).write_text(json.dumps(report, indent=2))
    (out_dir / LABELS).write_text(json.dumps(labels_json(image_size, resize_method, temperature, model_version), indent=2))
    if card is not None:
        (out_dir / CARD).write_text(card)
    write_manifest(out_dir)
    failed = below_agreement(report["formats"], min_agreement)
    if failed:
        raise ExportError(
            "export parity check failed, so these formats were not written:\n  " + "\n  ".join(failed)
            + f"\nSee {out_dir / PARITY}. Lower export.min_agreement only if that loss is acceptable, "
            "or leave the format out of export.tflite."
        )
    return report


def _check_request(out_dir: Path, tflite: Sequence[str], representative: Optional[np.ndarray]) -> None:
    """Refuse an unknown format, int8_full without calibration images, or an ``out_dir`` that is not an export."""
    unknown = [kind for kind in tflite if kind not in TFLITE_KINDS]
    if unknown:
        raise ExportError(f"unknown export.tflite kind(s) {unknown}; choose from {', '.join(TFLITE_KINDS)}")
    if "int8_full" in tflite and (representative is None or not len(representative)):
        raise ExportError("export.tflite int8_full needs representative images (from the train split)")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not (out_dir / CHECKSUMS).is_file():
            raise ExportError(f"{out_dir} exists and is not an export folder (no {CHECKSUMS}); refusing to replace it")
        shutil.rmtree(out_dir)


@dataclass(frozen=True)
class Parity:
    """The images every format is compared on, against the Keras model, and the bar a format must clear."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: Optional[np.ndarray]  # class indices, or None (random pixels)
    min_agreement: float
    latency_runs: int

    def reference(self, serving: keras.Model) -> np.ndarray:
        return np.asarray(serving.predict(self.images.astype(np.float32), batch_size=32, verbose=0))

    def report(self, reference: np.ndarray) -> dict[str, Any]:
        """parity.json, before any format is checked."""
        report: dict[str, Any] = {
            "n_images": int(len(self.images)),
            "source": "test split" if self.labels is not None else "random pixels (no test images given)",
            "min_agreement": self.min_agreement,
            "formats": {},
        }
        if self.labels is not None:
            report["keras_balanced_accuracy"] = classification_metrics(self.labels, reference)["balanced_accuracy"]
        return report

    def check(self, reference: np.ndarray, predict: Any) -> dict[str, Any]:
        """Agreement with the reference, then batch-1 latency."""
        result = compare(reference, predict(self.images), self.labels)
        result["latency_ms"] = batch1_latency_ms(predict, self.images[0], self.latency_runs)
        return result


def _export_tflite(
    out_dir: Path, kind: str, representative: Optional[np.ndarray], parity: Parity, reference: np.ndarray
) -> dict[str, Any]:
    """Convert one TFLite format, check it, and write it only if it holds up; return its parity entry."""
    started = time.perf_counter()
    content = convert_tflite(out_dir / SAVED_MODEL, kind, representative)
    predict = tflite_predictor(content)
    try:
        result = parity.check(reference, predict)
    except RuntimeError as err:  # a kernel that refuses its inputs, e.g. an int8 division by a zero
        result = {"error": f"fails to run on the parity images: {str(err).splitlines()[0]}"}
    result["bytes"] = len(content)
    result["file"] = tflite_name(kind)
    result["kept"] = not below_agreement({kind: result}, parity.min_agreement)
    if "error" in result:
        log.warning("tflite %s %s -- not kept", kind, result["error"])
        return result
    if result["kept"]:
        (out_dir / tflite_name(kind)).write_bytes(content)
    log.info(
        "tflite %s: %.2f MB, top-1 agreement %.4f, max |diff| %.2g%s (%.1f s)",
        kind, len(content) / 1e6, result["top1_agreement"], result["max_abs_diff"],
        "" if result["kept"] else " -- below export.min_agreement, not kept", time.perf_counter() - started,
    )
    return result


def _relative_to_fp32(formats: dict[str, dict[str, Any]]) -> None:
    """Each format's size and latency as ratios to TFLite fp32 (ratios are what survive noisy timings)."""
    fp32 = formats.get("tflite_fp32")
    for result in formats.values():
        if fp32 and "bytes" in result:
            result["size_vs_fp32"] = round(result["bytes"] / fp32["bytes"], 4)
        if fp32 and fp32.get("latency_ms") and result.get("latency_ms"):
            result["latency_vs_tflite_fp32"] = round(result["latency_ms"] / fp32["latency_ms"], 3)


def export_run(run: Run, model: keras.Model, cfg: DictConfig, out_dir: Optional[Path] = None,
               metrics: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Export a run's model with everything ``export_model`` needs, drawn from the run dir.

    Parity images are a seeded sample of ``cfg.parity_split``; int8_full is
    calibrated on a sample of the train split; the temperature comes from
    the run's calibration.json; the model card from its summary and metrics.
    """
    from dermascan.evaluation.card import model_card

    run_dir = run.run_dir
    out_dir = Path(out_dir) if out_dir is not None else run_dir / EXPORT
    image_size = int(run.cfg.model.image_size)
    seed = int(run.cfg.seed)
    parity_rows = evaluation_rows(run.manifest, cfg.parity_split)
    parity_rows = sample_rows(parity_rows[parity_rows["label"].notna()], cfg.parity_samples, seed)
    parity_images = load_images(parity_rows, image_size, run.cache)
    representative = None
    if "int8_full" in cfg.tflite:
        train_rows = run.manifest[(run.manifest["split"] == "train") & run.manifest["label"].notna()]
        representative = load_images(sample_rows(train_rows, cfg.representative_samples, seed), image_size, run.cache)
    temperature = read_temperature(run_dir)
    if metrics is None:
        metrics = read_json(run_dir / METRICS)
    version = f"{__version__}+{run_dir.name}"
    plain_cfg = OmegaConf.to_container(run.cfg, resolve=True, enum_to_str=True)
    log.info(
        "exporting to %s: SavedModel, .keras, TFLite %s; parity on %d %s images",
        out_dir, [str(kind) for kind in cfg.tflite], len(parity_images), cfg.parity_split,
    )
    report = export_model(
        model, out_dir, image_size=image_size, tflite=[str(kind) for kind in cfg.tflite],
        resize_method=str(run.cfg.data.cache.method), temperature=temperature,
        parity_images=parity_images, parity_labels=parity_rows["label"].map(INDEX).to_numpy(),
        representative=representative, min_agreement=cfg.min_agreement, latency_runs=cfg.latency_runs,
        model_version=version, card=model_card(plain_cfg, run.summary, metrics, version, temperature),
    )
    if cfg.coreml:
        write_coreml(out_dir, image_size)
    return report


def write_coreml(out_dir: Path, image_size: int) -> Path:
    """Convert the exported model to a Core ML ``.mlpackage`` (ML program, iOS 15+, batch 1, float32 0-255 RGB).

    Only conversion can be checked here: Core ML runs on Apple platforms only.
    """
    try:
        import coremltools as ct
    except ImportError:
        raise ExportError("export.coreml=true needs coremltools: pip install 'dermascan[coreml]'") from None
    model = keras.models.load_model(out_dir / KERAS_MODEL, compile=False)
    spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32)
    function = tf.function(lambda images: model(images, training=False)).get_concrete_function(spec)
    converted = ct.convert([function], source="tensorflow", inputs=[ct.TensorType(shape=(1, image_size, image_size, 3))])
    target = out_dir / COREML
    converted.save(str(target))
    write_manifest(out_dir)
    log.info("wrote %s (converted only: Core ML cannot run on Linux)", target)
    return target


def export_main_task(cfg: DictConfig) -> dict[str, Any]:
    run = load_run(cfg.run_dir)
    report = export_run(run, run.model(), cfg.export, Path(cfg.out_dir) if cfg.out_dir else None)
    out_dir = Path(cfg.out_dir) if cfg.out_dir else run.run_dir / EXPORT
    if cfg.log_to_mlflow:
        from dermascan import tracking

        with tracking.run(run.cfg, run.run_dir, run.run_dir.name, stage="export") as run_id:
            if run_id is not None:
                tracking.log_artifacts([out_dir], artifact_path=EXPORT)
                served = keras.models.load_model(out_dir / KERAS_MODEL, compile=False)
                example = np.zeros((1, *served.input_shape[1:]), np.float32)
                tracking.log_model(served, example, run.cfg.tracking)  # registers it with tracking.register=true
    for name, result in report["formats"].items():
        log.info("%-20s top-1 agreement %.4f  max |diff| %.2g  %s", name, result["top1_agreement"],
                 result["max_abs_diff"], f"{result['latency_ms']} ms" if result.get("latency_ms") else "")
    log.info("wrote %s (checked by %s)", out_dir, CHECKSUMS)
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export_run")
def main(cfg: DictConfig) -> None:
    cli.run(export_main_task, cfg, ExportRunConfig)


if __name__ == "__main__":
    main()
