"""What the serving backend loads: ``export/`` in the run directory.

- ``model.keras``: the inference model (no training-only layers, no
  optimizer), raw RGB 0-255 in, softmax probabilities out.
- ``labels.json``: class order, codes, names, lay descriptions, categories,
  the input size and the preprocessing contract.
"""

from __future__ import annotations

import json
from pathlib import Path

import keras

from dermascan import __version__
from dermascan.augment import IDGAugmentation
from dermascan.classes import CLASSES


def inference_model(model: keras.Model) -> keras.Model:
    """The same weights, uncompiled, without training-only layers (on-accelerator augmentation)."""
    if not any(isinstance(layer, IDGAugmentation) for layer in model.layers):
        return keras.Model(model.inputs, model.outputs, name=model.name)
    inputs = model.inputs[0]
    x = inputs
    for layer in model.layers[1:]:
        if not isinstance(layer, IDGAugmentation):
            x = layer(x)
    return keras.Model(inputs, x, name=model.name)


def labels_json(image_size: int) -> dict:
    return {
        "version": __version__,
        "classes": [
            {"index": i, "code": c.code, "name": c.name, "description": c.description, "category": c.category.value}
            for i, c in enumerate(CLASSES)
        ],
        "input": {
            "shape": [None, image_size, image_size, 3],
            "dtype": "float32 (uint8 values are accepted)",
            "pixels": "raw RGB, 0-255, no normalisation: preprocessing is inside the model",
            "resize": f"squash the whole image to {image_size}x{image_size} (no crop), bilinear",
        },
        "output": "softmax probabilities, in the order of 'classes'",
    }


def export(model: keras.Model, out_dir: Path, image_size: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    keras_path = out_dir / "model.keras"
    inference_model(model).save(keras_path)
    labels_path = out_dir / "labels.json"
    labels_path.write_text(json.dumps(labels_json(image_size), indent=2))
    return [keras_path, labels_path]
