"""Run an exported model: the ``export/`` folder, in any of its formats.

    predict = load_predictor(export_dir, "tflite")          # or "savedmodel", "keras"
    outputs = predict(images)                                # uint8 or float [N, S, S, 3] ->
    outputs["probabilities"]                                 # [N, 8]
    outputs.get("out_of_scope")                              # [N], when the export has the gate

Every format takes raw RGB pixels (0-255) at the model's input size and
returns softmax probabilities in the order of ``labels.json`` and, for a
model exported with its out-of-scope gate (``dermascan.modeling.ood``), the
gate's score: the model's two named outputs. Resizing is
the caller's job (``dermascan.serve`` and the input pipeline do it the same
way). TFLite models run on ``ai_edge_litert``, the maintained successor of
``tf.lite.Interpreter``. A predictor is safe to call from several threads.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from dermascan.artifacts import KERAS_MODEL, SAVED_MODEL, tflite_name
from dermascan.config import Runtime, TfliteKind
from dermascan.errors import DermascanError

Outputs = dict[str, np.ndarray]  # "probabilities" [N, 8], and "out_of_scope" [N] when the model has the gate
Predictor = Callable[[np.ndarray], Outputs]
PROBABILITIES = "probabilities"
OUT_OF_SCOPE = "out_of_scope"


def named_outputs(outputs: Any) -> Outputs:
    """A model's outputs as float32 arrays by name: a dict of outputs as it is, a lone tensor as the probabilities.

    A model exported before the gate existed has one unnamed output.
    """
    if isinstance(outputs, dict):
        named = {str(name): np.asarray(value, np.float32) for name, value in outputs.items()}
        if PROBABILITIES not in named:
            raise RuntimeLoadError(f"the model's outputs {sorted(named)} hold no {PROBABILITIES!r}")
        return named
    return {PROBABILITIES: np.asarray(outputs, np.float32)}

TFLITE_KINDS = tuple(TfliteKind)
RUNTIMES = tuple(Runtime)


class RuntimeLoadError(DermascanError):
    """The exported model is missing or cannot be loaded."""


def tflite_predictor(model: Path | bytes, num_threads: Optional[int] = None, batch_size: int = 32) -> Predictor:
    """A predictor over a ``.tflite`` file (or its bytes); quantised inputs and outputs are handled.

    Outputs are found by their signature names (TFLite keeps no order between
    a model's outputs); a model without a signature has one output, the probabilities.
    """
    from ai_edge_litert.interpreter import Interpreter

    if isinstance(model, bytes):
        interpreter = Interpreter(model_content=model, num_threads=num_threads)
    else:
        interpreter = Interpreter(model_path=str(model), num_threads=num_threads)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]
    signatures = interpreter.get_signature_list()
    if signatures:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        targets = {name: detail for name, detail in runner.get_output_details().items()}
        if len(targets) == 1:
            targets = {PROBABILITIES: next(iter(targets.values()))}
    else:
        targets = {PROBABILITIES: interpreter.get_output_details()[0]}
    lock = threading.Lock()
    shape = {"batch": int(source["shape"][0])}

    def to_input(images: np.ndarray) -> np.ndarray:
        dtype = source["dtype"]
        scale, zero = source["quantization"]
        if np.issubdtype(dtype, np.integer) and scale:
            info = np.iinfo(dtype)
            quantised = np.round(images.astype(np.float32) / scale + zero)
            return np.clip(quantised, info.min, info.max).astype(dtype)
        return images.astype(dtype)

    def from_output(values: np.ndarray, target: dict) -> np.ndarray:
        scale, zero = target["quantization"]
        if np.issubdtype(values.dtype, np.integer) and scale:
            return (values.astype(np.float32) - zero) * scale
        return values.astype(np.float32)

    def run(chunk: np.ndarray) -> Outputs:
        if chunk.shape[0] != shape["batch"]:
            interpreter.resize_tensor_input(source["index"], list(chunk.shape))
            interpreter.allocate_tensors()
            shape["batch"] = chunk.shape[0]
        interpreter.set_tensor(source["index"], to_input(chunk))
        interpreter.invoke()
        return {name: from_output(interpreter.get_tensor(target["index"]), target) for name, target in targets.items()}

    def predict(images: np.ndarray) -> Outputs:
        images = np.asarray(images)
        with lock:
            chunks = [run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in targets}

    return predict


def savedmodel_predictor(path: Path) -> Predictor:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))

    def predict(images: np.ndarray) -> Outputs:
        images = np.asarray(images)
        if images.dtype == np.uint8:
            return named_outputs(loaded.serve_uint8(tf.constant(images)))
        return named_outputs(loaded.serve(tf.constant(images, tf.float32)))

    return predict


def keras_predictor(path: Path) -> Predictor:
    import keras

    import dermascan.modeling.color  # noqa: F401  registers ShadesOfGray, which a colour-normalising model.keras holds
    import dermascan.modeling.ood  # noqa: F401  registers OutOfScopeScore, the gate's layer

    model = keras.models.load_model(path, compile=False)

    def predict(images: np.ndarray) -> Outputs:
        return named_outputs(model.predict_on_batch(np.asarray(images, np.float32)))

    return predict


def load_predictor(export_dir: Path, runtime: str = "savedmodel", tflite: str = "fp32", num_threads: Optional[int] = None) -> Predictor:
    """The predictor for ``runtime`` (savedmodel, tflite or keras) from an export folder."""
    export_dir = Path(export_dir)
    if runtime not in RUNTIMES:
        raise RuntimeLoadError(f"unknown runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
    if runtime == "tflite":
        if tflite not in TFLITE_KINDS:
            raise RuntimeLoadError(f"unknown TFLite variant {tflite!r}; choose one of {', '.join(TFLITE_KINDS)}")
        path = export_dir / tflite_name(tflite)
    else:
        path = export_dir / (SAVED_MODEL if runtime == "savedmodel" else KERAS_MODEL)
    if not path.exists():
        raise RuntimeLoadError(f"{path} not found: export it with python -m dermascan.export (export.tflite=[{tflite}])")
    load = {"tflite": functools.partial(tflite_predictor, num_threads=num_threads),
            "savedmodel": savedmodel_predictor, "keras": keras_predictor}[runtime]
    try:
        return load(path)
    except ImportError as err:
        raise RuntimeLoadError(f"cannot load {path}: the {runtime} runtime is not installed ({err})") from err
    except Exception as err:
        # A truncated or garbage file can still match MANIFEST.sha256 (written after it): each loader has
        # its own exception types (ValueError from the TFLite interpreter, OSError, TensorFlow's errors),
        # so name the file once here, for the server to refuse it with one line.
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise RuntimeLoadError(f"cannot load the {runtime} model {path}: {first}") from err
