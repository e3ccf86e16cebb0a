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
  calibrated on train-split images, with ``export.int8_float_ops`` and
  ``export.int8_float_layers`` kept in float; integer pixel input, float32
  output).
- ``parity.json``: every format run on a sample of the test split against
  the Keras model: top-1 agreement, max |probability difference|, balanced
  accuracy and its paired-bootstrap difference from Keras, referral-decision
  agreement, file size and batch-1 latency. A format that fails the gate
  (``dermascan.evaluation.parity``) is not written; the export fails naming
  it, unless the caller (train) marks it optional: then it is dropped and
  ``parity.json``'s ``dropped`` says why.
- ``labels.json``: class order, codes, names, lay descriptions, categories,
  the input size, the preprocessing contract and the referral operating point.
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
from typing import Any, Mapping, Optional, Sequence

import hydra
import keras
import numpy as np
import pandas as pd
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
    OUT_OF_SCOPE_SCORES,
    PARITY,
    SAVED_MODEL,
    read_json,
    read_temperature,
    tflite_name,
)
from dermascan.artifacts import OUT_OF_SCOPE as GATE_FILE
from dermascan.checksums import write_manifest
from dermascan.classes import CLASSES, DISCLAIMER, INDEX
from dermascan.config import ExportRunConfig, config_dir
from dermascan.data.manifest import evaluation_rows
from dermascan.errors import DermascanError
from dermascan.evaluation.metrics import classification_metrics
from dermascan.evaluation.parity import compare, gate_agreement
from dermascan.evaluation.parity import markdown as parity_markdown
from dermascan.evaluation.parity import refusals as parity_refusals
from dermascan.evaluation.referral import class_indices
from dermascan.modeling.model import inference_model
from dermascan.modeling.ood import Gate as OodGate
from dermascan.modeling.ood import load_gate
from dermascan.rundir import Run, load_images, load_run, sample_rows
from dermascan.runtime import (
    OUT_OF_SCOPE,
    PROBABILITIES,
    TFLITE_KINDS,
    Outputs,
    keras_predictor,
    named_outputs,
    savedmodel_predictor,
    tflite_predictor,
)

log = logging.getLogger("dermascan.export")

class ExportError(DermascanError):
    """An export could not be written, or failed its parity check."""


def labels_json(image_size: int, resize_method: str, temperature: Optional[float] = None,
                model_version: Optional[str] = None, referral: Optional[dict[str, Any]] = None,
                out_of_scope: Optional[dict[str, Any]] = None) -> dict:
    """labels.json: everything an app needs in order to act, so that the phone needs no Python."""
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
            "dtype": "float32 or uint8 (SavedModel endpoints serve / serve_uint8); the int8_full TFLite model takes "
                     "integer pixels: quantise with its input tensor's scale and zero point",
            "pixels": "raw RGB, 0-255, no normalisation: preprocessing is inside the model",
            "resize": {"method": resize_method, "mode": "squash", "library": "PIL",
                       "note": f"squash the whole image to {image_size}x{image_size} (no crop), as training does"},
        },
        "output": "softmax probabilities, in the order of 'classes'" if out_of_scope is None else {
            "probabilities": "softmax probabilities [N, 8], in the order of 'classes'",
            "out_of_scope": "the out-of-scope gate's score [N]: see 'out_of_scope'",
        },
        "temperature": temperature,
        "referral": referral_contract(referral),
        "out_of_scope": out_of_scope,
        "disclaimer": DISCLAIMER,
    }


def out_of_scope_contract(gate: Optional[OodGate], measured: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The out-of-scope gate as the phone applies it, with the rates evaluation measured (None: no gate)."""
    if gate is None:
        return None
    measured = measured or {}
    sets = measured.get("sets") or {}
    return {
        "output": OUT_OF_SCOPE,
        "threshold": gate.threshold,
        "rule": "the image is out of scope (not a dermoscopic image of a lesion like the training images) when "
                "the score is > threshold: then show no class, ask for a dermoscopic close-up of one lesion",
        "method": "Mahalanobis distance of the pooled backbone features to the nearest class, "
                  f"over the {gate.projection.shape[1]} lowest-variance directions of the train split",
        "keep": gate.keep,
        "val_rejected": measured.get("val_rejected"),
        "test_rejected": measured.get("test_rejected"),
        "auroc": {name: result.get("auroc") for name, result in sets.items()},
        "fpr_at_95_tpr": {name: result.get("fpr_at_95_tpr") for name, result in sets.items()},
    }


def referral_contract(referral: Optional[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The referral operating point as the phone applies it, from metrics.json's ``referral`` (None: none chosen)."""
    if not referral or "threshold" not in referral:
        return None
    return {
        "classes": list(referral["classes"]),
        "indices": class_indices(referral["classes"]),
        "threshold": float(referral["threshold"]),
        "rule": "recommend seeing a doctor when the summed probability of these classes is >= threshold",
        "target_sensitivity": referral["target_sensitivity"],
        "val_sensitivity": referral["val"]["sensitivity"],
        "val_specificity": referral["val"]["specificity"],
        "chosen_on": referral["chosen_on"],
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


def convert_tflite(
    saved_model: Path,
    kind: str,
    representative: Optional[np.ndarray] = None,
    float_ops: Sequence[str] = (),
    float_layers: Sequence[str] = (),
) -> bytes:
    """Convert the SavedModel's ``serve`` endpoint to TFLite ``kind``.

    int8_full keeps ``float_ops`` (TFLite op types, e.g. DEPTHWISE_CONV_2D)
    and the ops of ``float_layers`` (Keras layer names, e.g. shades_of_gray)
    in float; everything else is int8 (see ``configs/export/default.yaml``
    for what each costs and buys).
    """
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
        converter.inference_output_type = tf.float32
        keep_float = _float_nodes(saved_model, float_layers)
        if keep_float or float_ops:
            return _selective_int8(converter, samples, float_ops, keep_float)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        # Raw pixels are 0-255 integers: a uint8 input (scale ~1, set by the calibration images' range)
        # takes decoded images as they are; ai_edge_litert callers quantise with the input's scale.
        converter.inference_input_type = tf.uint8
    return converter.convert()


def _float_nodes(saved_model: Path, layers: Sequence[str]) -> list[str]:
    """The TFLite tensor names of the ops that ``layers`` (Keras layer names) became.

    A model output is named after the signature (``StatefulPartitionedCall:0``),
    not the layer, so a layer's last op, when it is an output, stays int8:
    TensorFlow's debugger refuses to leave a model output in float.
    """
    if not layers:
        return []
    from ai_edge_litert.interpreter import Interpreter

    content = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=["serve"]).convert()
    names = [detail["name"] for detail in Interpreter(model_content=content).get_tensor_details()]
    return [name for name in names if any(f"/{layer}" in name for layer in layers)]


def _selective_int8(converter: Any, samples: Any, float_ops: Sequence[str], float_nodes: Sequence[str]) -> bytes:
    """int8 except the denylisted ops, through TensorFlow's QuantizationDebugger (its selective quantization).

    The input stays integer: int8 with the calibration's scale and zero
    point (1 and -128 for 0-255 pixels), which ``runtime.tflite_predictor``
    reads from the model.
    """
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
    options = tf.lite.experimental.QuantizationDebugOptions(
        denylisted_ops=list(float_ops), denylisted_nodes=list(float_nodes), fully_quantize=True
    )

    def few():  # the debugger runs its debug model on these; the calibration uses all of them
        for index, sample in enumerate(samples()):
            if index == 4:
                return
            yield sample

    debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=few, debug_options=options)
    return debugger.get_nondebug_quantized_model()


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


def agreement_bar(min_agreement: float | Mapping[str, float], name: str) -> float:
    """The top-1 agreement a format must reach: per TFLite kind, or one bar for all.

    keras and savedmodel must agree as fp32 does: they run the same float graph.
    """
    if isinstance(min_agreement, (int, float)):
        return float(min_agreement)
    kind = name.removeprefix("tflite_")
    return float(min_agreement[kind if kind in min_agreement else "fp32"])


def export_model(
    model: keras.Model,
    out_dir: Path,
    *,
    image_size: int,
    tflite: Sequence[str],
    resize_method: str,
    min_agreement: float | Mapping[str, float],
    max_balanced_accuracy_drop: Optional[float] = None,
    min_decision_agreement: Optional[float] = None,
    referral: Optional[dict[str, Any]] = None,
    gate: Optional[OodGate] = None,
    out_of_scope: Optional[dict[str, Any]] = None,
    outside_images: Optional[np.ndarray] = None,
    required: Optional[Sequence[str]] = None,
    temperature: Optional[float] = None,
    parity_images: Optional[np.ndarray] = None,
    parity_labels: Optional[np.ndarray] = None,
    representative: Optional[np.ndarray] = None,
    int8_float_ops: Sequence[str] = (),
    int8_float_layers: Sequence[str] = (),
    latency_runs: int = 0,
    bootstrap_resamples: int = 1000,
    seed: int = 0,
    model_version: Optional[str] = None,
    card: Optional[str] = None,
) -> dict[str, Any]:
    """Write ``out_dir`` from a trained Keras model; return the parity report.

    ``parity_images`` (uint8 [N, S, S, 3], default: random pixels) are run
    through every format and compared with the Keras model
    (``dermascan.evaluation.parity``: top-1 agreement against
    ``min_agreement``, per kind or one bar; the balanced-accuracy difference
    against ``max_balanced_accuracy_drop``; the ``referral`` decision, from
    metrics.json, and the out-of-scope ``gate``'s in/out decision on the parity
    images and ``outside_images``, against ``min_decision_agreement``; None
    skips a check). With a ``gate`` the model gets its second output, and
    labels.json the gate's threshold and ``out_of_scope``'s measured rates. A
    TFLite format that fails is not written. If it is one of ``required``
    (default: every format asked for), the export raises ExportError naming
    it, after everything else is written; otherwise it is dropped with a
    warning, and parity.json, the card and ``report["dropped"]`` say why.
    """
    out_dir = Path(out_dir)
    _check_request(out_dir, tflite, representative)
    out_dir.mkdir(parents=True)
    serving = inference_model(model, temperature, gate)
    if parity_images is None or not len(parity_images):
        parity_images = np.random.default_rng(0).integers(0, 256, (16, image_size, image_size, 3), dtype=np.uint8)
        parity_labels = None
    parity = Parity(
        np.asarray(parity_images, np.uint8), parity_labels, latency_runs,
        Bars(min_agreement, max_balanced_accuracy_drop, min_decision_agreement, bootstrap_resamples, seed),
        referral if referral and "threshold" in referral else None,
        gate.threshold if gate is not None else None,
        None if outside_images is None else np.asarray(outside_images, np.uint8),
    )
    reference = parity.reference(serving)
    report = parity.report(reference)

    started = time.perf_counter()
    serving.save(out_dir / KERAS_MODEL)
    write_saved_model(serving, out_dir / SAVED_MODEL, image_size)
    log.info("wrote %s and %s/ in %.1f s", KERAS_MODEL, SAVED_MODEL, time.perf_counter() - started)
    for name, predict in (("keras", keras_predictor(out_dir / KERAS_MODEL)),
                          ("savedmodel", savedmodel_predictor(out_dir / SAVED_MODEL))):
        report["formats"][name] = parity.check(name, reference, predict)
    for kind in tflite:
        report["formats"][f"tflite_{kind}"] = _export_tflite(
            out_dir, kind, representative, parity, reference, int8_float_ops, int8_float_layers
        )
    _relative_to_fp32(report["formats"])
    failed = {name: result["refused"] for name, result in report["formats"].items() if result["refused"]}
    strict = {f"tflite_{kind}" for kind in (tflite if required is None else required)} | {"keras", "savedmodel"}
    report["dropped"] = [[name, "; ".join(why)] for name, why in failed.items() if name not in strict]
    for name, why in report["dropped"]:
        log.warning("export: %s dropped, it failed the parity check (%s); the other formats are written", name, why)

    (out_dir / PARITY).write_text(json.dumps(report, indent=2))
    (out_dir / LABELS).write_text(json.dumps(
        labels_json(image_size, resize_method, temperature, model_version, referral,
                    out_of_scope_contract(gate, out_of_scope)), indent=2
    ))
    if card is not None:
        (out_dir / CARD).write_text(card.rstrip("\n") + "\n\n" + parity_markdown(report))
    write_manifest(out_dir)
    fatal = [f"{name}: {'; '.join(why)}" for name, why in failed.items() if name in strict]
    if fatal:
        raise ExportError(
            "export parity check failed, so these formats were not written:\n  " + "\n  ".join(fatal)
            + f"\nSee {out_dir / PARITY}. Loosen the export gate (export.min_agreement and its neighbours) only if "
            "that loss is acceptable, or leave the format out of export.tflite."
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
class Bars:
    """The bars a format must clear (``dermascan.evaluation.parity``); None skips a check."""

    min_agreement: float | Mapping[str, float]
    max_balanced_accuracy_drop: Optional[float]
    min_decision_agreement: Optional[float]
    bootstrap_resamples: int
    seed: int

    def refusals(self, name: str, result: dict[str, Any]) -> list[str]:
        return parity_refusals(
            result, agreement_bar(self.min_agreement, name),
            1.0 if self.max_balanced_accuracy_drop is None else self.max_balanced_accuracy_drop,
            0.0 if self.min_decision_agreement is None else self.min_decision_agreement,
        )


@dataclass(frozen=True)
class Parity:
    """The images every format is compared on, against the Keras model, and the gate a format must clear."""

    images: np.ndarray  # uint8 [N, S, S, 3]
    labels: Optional[np.ndarray]  # class indices, or None (random pixels)
    latency_runs: int
    bars: Bars
    referral: Optional[dict[str, Any]]  # metrics.json's referral operating point
    out_of_scope: Optional[float] = None  # the out-of-scope gate's threshold, when the model has the gate
    outside: Optional[np.ndarray] = None  # out-of-scope images the gate's decision is also compared on

    def run(self, predict: Any) -> Outputs:
        """A format's outputs on the parity images, and its gate scores on the outside images after them."""
        outputs = predict(self.images)
        if self.out_of_scope is not None and self.outside is not None and len(self.outside):
            outputs[OUT_OF_SCOPE] = np.concatenate([outputs[OUT_OF_SCOPE], predict(self.outside)[OUT_OF_SCOPE]])
        return outputs

    def reference(self, serving: keras.Model) -> Outputs:
        return self.run(lambda images: named_outputs(serving.predict(images.astype(np.float32), batch_size=32,
                                                                     verbose=0)))

    def report(self, reference: Outputs) -> dict[str, Any]:
        """parity.json, before any format is checked."""
        bars = self.bars
        report: dict[str, Any] = {
            "n_images": int(len(self.images)),
            "source": "test split" if self.labels is not None else "random pixels (no test images given)",
            "min_agreement": bars.min_agreement if isinstance(bars.min_agreement, (int, float))
            else dict(bars.min_agreement),
            "max_balanced_accuracy_drop": bars.max_balanced_accuracy_drop,
            "min_decision_agreement": bars.min_decision_agreement,
            "decisions": (["referral"] if self.referral else []) + (["out_of_scope"] if self.gated else []),
            "formats": {},
        }
        if self.gated:
            report["n_outside_images"] = 0 if self.outside is None else int(len(self.outside))
        if self.labels is not None:
            report["keras_balanced_accuracy"] = classification_metrics(
                self.labels, reference[PROBABILITIES]
            )["balanced_accuracy"]
        return report

    @property
    def gated(self) -> bool:
        return self.out_of_scope is not None

    def check(self, name: str, reference: Outputs, predict: Any) -> dict[str, Any]:
        """The comparison with the reference, batch-1 latency, and why the gate refuses it (empty: kept)."""
        outputs = self.run(predict)
        result = compare(reference[PROBABILITIES], outputs[PROBABILITIES], self.labels, self.referral,
                         self.bars.bootstrap_resamples, self.bars.seed)
        if self.gated:
            result["out_of_scope_decision"] = gate_agreement(
                reference[OUT_OF_SCOPE], outputs.get(OUT_OF_SCOPE), self.out_of_scope
            )
        result["latency_ms"] = batch1_latency_ms(predict, self.images[0], self.latency_runs)
        result["refused"] = self.bars.refusals(name, result)
        return result


def _export_tflite(
    out_dir: Path, kind: str, representative: Optional[np.ndarray], parity: Parity, reference: np.ndarray,
    float_ops: Sequence[str] = (), float_layers: Sequence[str] = (),
) -> dict[str, Any]:
    """Convert one TFLite format, check it, and write it only if it holds up; return its parity entry."""
    started = time.perf_counter()
    content = convert_tflite(out_dir / SAVED_MODEL, kind, representative,
                             float_ops if kind == "int8_full" else (), float_layers if kind == "int8_full" else ())
    predict = tflite_predictor(content)
    name = f"tflite_{kind}"
    try:
        result = parity.check(name, reference, predict)
    except RuntimeError as err:  # a kernel that refuses its inputs, e.g. an int8 division by a zero
        error = f"fails to run on the parity images: {str(err).splitlines()[0]}"
        result = {"error": error, "refused": [error]}
    result["bytes"] = len(content)
    result["file"] = tflite_name(kind)
    result["kept"] = not result["refused"]
    if "error" in result:
        log.warning("tflite %s %s -- not kept", kind, result["error"])
        return result
    if result["kept"]:
        (out_dir / tflite_name(kind)).write_bytes(content)
    difference = result.get("balanced_accuracy_difference")
    log.info(
        "tflite %s: %.2f MB, top-1 agreement %.4f, max |diff| %.2g%s%s%s (%.1f s)",
        kind, len(content) / 1e6, result["top1_agreement"], result["max_abs_diff"],
        f", balanced accuracy {difference['estimate']:+.4f} vs Keras" if difference else "",
        f", referral decision agreement {result['referral_decision']['agreement']:.4f}"
        if "referral_decision" in result else "",
        "" if result["kept"] else " -- refused: " + "; ".join(result["refused"]), time.perf_counter() - started,
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
               metrics: Optional[dict[str, Any]] = None, required: Optional[Sequence[str]] = None) -> dict[str, Any]:
    """Export a run's model with everything ``export_model`` needs, drawn from the run dir.

    Parity images are a seeded sample of ``cfg.parity_split``; int8_full is
    calibrated on a sample of the train split; the temperature comes from
    the run's calibration.json; the referral operating point, the model card's
    figures and the parity gate's referral decision from its metrics.
    ``required``: the formats whose failure fails the export (default: all).
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
    gate = load_gate(run_dir / GATE_FILE)
    outside = None
    if gate is not None:
        from dermascan.evaluation.ood import outside_images

        outside = outside_images(image_size, run.cache)
        if representative is not None:
            representative = np.concatenate([representative, rejected_val_images(run, image_size)])
    version = f"{__version__}+{run_dir.name}"
    plain_cfg = OmegaConf.to_container(run.cfg, resolve=True, enum_to_str=True)
    log.info(
        "exporting to %s: SavedModel, .keras, TFLite %s%s; parity on %d %s images",
        out_dir, [str(kind) for kind in cfg.tflite], "" if gate is None else ", with the out-of-scope gate",
        len(parity_images), cfg.parity_split,
    )
    report = export_model(
        model, out_dir, image_size=image_size, tflite=[str(kind) for kind in cfg.tflite],
        resize_method=str(run.cfg.data.cache.method), temperature=temperature,
        parity_images=parity_images, parity_labels=parity_rows["label"].map(INDEX).to_numpy(),
        representative=representative, int8_float_ops=list(cfg.int8_float_ops),
        int8_float_layers=list(cfg.int8_float_layers), min_agreement=dict(cfg.min_agreement),
        max_balanced_accuracy_drop=cfg.max_balanced_accuracy_drop, min_decision_agreement=cfg.min_decision_agreement,
        referral=metrics.get("referral"), gate=gate, out_of_scope=metrics.get("out_of_scope"), outside_images=outside,
        required=required, latency_runs=cfg.latency_runs,
        bootstrap_resamples=cfg.bootstrap_resamples, seed=seed,
        model_version=version, card=model_card(plain_cfg, run.summary, metrics, version, temperature),
    )
    if cfg.coreml:
        write_coreml(out_dir, image_size)
    return report


def export_keeping_parity(run: Run, model: keras.Model, cfg: DictConfig, metrics: dict[str, Any],
                          required: Sequence[str]) -> tuple[Optional[dict[str, Any]], Optional[ExportError]]:
    """``export_run`` into ``<run_dir>/export`` for a stage that logs before it fails (train, ensemble):
    (parity.json's content or None, the ExportError or None). A failed export is returned, not raised,
    with the parity.json it wrote, so that the caller can still report and log it."""
    try:
        return export_run(run, model, cfg, metrics=metrics, required=required), None
    except ExportError as err:
        return read_json(run.run_dir / EXPORT / PARITY, None), err


def rejected_val_images(run: Run, image_size: int) -> np.ndarray:
    """The val lesions the out-of-scope gate rejects (evaluation's out_of_scope_scores.csv), as uint8 images.

    int8_full quantizes its outputs with the range its calibration images
    produce. Calibrated on train lesions alone, the gate's score was clipped
    below its threshold, so int8_full rejected nothing (decision agreement
    0.881 on an isic-dev model). These images score above the threshold, so
    the quantized score reaches past it, and anything further out clips at a
    value that is still rejected; and being lesions, they leave the other
    activation ranges as they were (adding synthetic images instead cost the
    demo's int8_full 3 of 72 top-1 answers).
    """
    path = run.run_dir / OUT_OF_SCOPE_SCORES
    if not path.is_file():
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    scores = pd.read_csv(path)
    ids = set(scores.loc[(scores["set"] == "val") & scores["rejected"].astype(bool), "image"])
    rows = run.manifest[run.manifest["image_id"].isin(ids)].reset_index(drop=True)
    log.info("int8_full calibration: %d val image(s) the out-of-scope gate rejects, so its score is not clipped",
             len(rows))
    return load_images(rows, image_size, run.cache)


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
        if "error" in result:
            continue
        log.info("%-20s top-1 agreement %.4f  max |diff| %.2g  %s", name, result["top1_agreement"],
                 result["max_abs_diff"], f"{result['latency_ms']} ms" if result.get("latency_ms") else "")
    log.info("wrote %s (checked by %s)", out_dir, CHECKSUMS)
    return report


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="export_run")
def main(cfg: DictConfig) -> None:
    cli.run(export_main_task, cfg, ExportRunConfig)


if __name__ == "__main__":
    main()
