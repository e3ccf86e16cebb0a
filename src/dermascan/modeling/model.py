"""The classifier: a keras.applications backbone and the recipe's head.

    raw RGB 0-255 -> [augmentation, training only] -> [Shades of Gray colour
    constancy, optional] -> backbone preprocessing
    -> backbone (called with training=False) -> GAP -> Dense 512 -> BN -> ReLU
    -> Dropout -> Dense 256 -> BN -> ReLU -> Dropout -> Dense 8 -> softmax (float32)

Preprocessing lives inside the model, so the server, the phone and the
evaluation all feed the same raw pixels. The backbone is called with
``training=False`` and, when it is unfrozen for fine-tuning, its BatchNorm
layers stay frozen (``trainable=False``), so their pretrained statistics
are kept. Both are needed in Keras 3: a Functional model passes ``fit``'s
``training=True`` down to every layer, overriding the ``training=False``
recorded at the call (keras-team/keras#20285), and only a non-trainable
BatchNormalization layer runs in inference mode whatever it is told.

A new backbone is one entry in ``BACKBONES`` and its name in ``config.BackboneName``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

import keras

from dermascan.classes import CODES
from dermascan.config import BackboneName
from dermascan.errors import ConfigError, DermascanError
from dermascan.modeling.augment import IDGAugmentation
from dermascan.modeling.color import COLOR_CONSTANCY, ShadesOfGray

if TYPE_CHECKING:
    from dermascan.modeling.ood import Gate

log = logging.getLogger("dermascan.modeling.model")


@dataclass(frozen=True)
class Backbone:
    build: Callable[..., keras.Model]
    # Raw 0-255 pixels -> what the backbone expects, as a serialisable layer.
    preprocessing: Callable[[], Optional[keras.layers.Layer]]
    takes_alpha: bool = False


def _scale_to_minus_one_one() -> keras.layers.Layer:
    return keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="preprocess")


# One entry per config.BackboneName (a new backbone: a name there, an entry here).
BACKBONES: dict[str, Backbone] = {
    # mobilenet_v2.preprocess_input: x / 127.5 - 1.
    BackboneName.mobilenet_v2: Backbone(keras.applications.MobileNetV2, _scale_to_minus_one_one, takes_alpha=True),
    # EfficientNet and MobileNetV3 rescale raw 0-255 pixels themselves.
    BackboneName.efficientnet_b0: Backbone(keras.applications.EfficientNetB0, lambda: None),
    BackboneName.mobilenet_v3_small: Backbone(
        lambda **kw: keras.applications.MobileNetV3Small(include_preprocessing=True, **kw),
        lambda: None,
        takes_alpha=True,
    ),
}


# The head's last Dense layer, before the float32 softmax; export folds the temperature into it.
LOGITS_LAYER = "logits"


class WeightsError(DermascanError):
    """The backbone's weights could not be downloaded or loaded."""


def _weights_argument(weights: Optional[str]) -> Optional[str]:
    if weights in (None, "imagenet"):
        return weights
    if not os.path.isfile(weights):
        raise ConfigError(f"model.weights: no weights file at {weights}")
    return weights


def build_backbone(name: str, image_size: int, weights: Optional[str], alpha: float = 1.0) -> keras.Model:
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {', '.join(BACKBONES)}, got {name!r}")
    spec = BACKBONES[name]
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (image_size, image_size, 3)}
    if spec.takes_alpha:
        kwargs["alpha"] = alpha
    source = _weights_argument(weights)
    try:
        return spec.build(weights=source, **kwargs)
    except (OSError, ValueError) as err:  # urllib errors are OSErrors; bad files raise ValueError
        if weights == "imagenet":
            raise WeightsError(
                f"could not download the ImageNet weights for {name} ({err}). Offline? Use "
                "model.weights=null to train from scratch, or model.weights=/path/to/weights.h5 "
                "for a local copy of the weights file."
            ) from None
        raise WeightsError(f"could not load model.weights={weights} into {name}: {err}") from None


def freeze_bn_of(model_cfg: Mapping[str, Any]) -> bool:
    """``model.freeze_bn`` resolved: null means true with pretrained weights, false from scratch."""
    freeze_bn = model_cfg["freeze_bn"]
    return model_cfg["weights"] is not None if freeze_bn is None else bool(freeze_bn)


def build_model(
    model_cfg: Mapping[str, Any],
    *,
    augmentation: Optional[keras.layers.Layer] = None,
    num_classes: int = len(CODES),
) -> tuple[keras.Model, keras.Model]:
    """Return (model, backbone) from the validated ``model`` group. The backbone starts frozen (phase 1).

    ``model.freeze_bn`` (null: true unless ``weights`` is null) calls the
    backbone with ``training=False`` (see ``unfreeze`` for the part that
    Keras 3 needs on top). Frozen statistics suit pretrained weights; a
    backbone trained from scratch has no statistics worth keeping, and its
    BatchNorm layers must learn them. ``bn_momentum``
    overrides the backbone's BatchNorm momentum (MobileNetV2 uses 0.999,
    too slow for moving statistics to settle in a short run from scratch).
    ``color_constancy="shades_of_gray"`` normalises each image's colour
    (``dermascan.modeling.color``) after augmentation, before the backbone.
    ``augmentation``: a layer (IDGAugmentation) run first, in training only.
    """
    backbone, image_size, weights = model_cfg["backbone"], int(model_cfg["image_size"]), model_cfg["weights"]
    units, dropout = list(model_cfg["head"]["units"]), list(model_cfg["head"]["dropout"])
    color_constancy, bn_momentum = str(model_cfg["color_constancy"]), model_cfg["bn_momentum"]
    if color_constancy not in COLOR_CONSTANCY:
        raise ConfigError(f"model.color_constancy must be one of {', '.join(COLOR_CONSTANCY)}, got {color_constancy!r}")
    if len(units) != len(dropout):
        raise ConfigError(f"model.head.units and model.head.dropout differ in length: {units} vs {dropout}")
    base = build_backbone(backbone, image_size, weights, model_cfg["alpha"])
    base.trainable = False
    if bn_momentum is not None:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = inputs
    if augmentation is not None:
        x = augmentation(x)
    if color_constancy == "shades_of_gray":
        x = ShadesOfGray(float(model_cfg["sog_power"]), name="shades_of_gray")(x)
    preprocessing = BACKBONES[backbone].preprocessing()
    if preprocessing is not None:
        x = preprocessing(x)
    x = base(x, training=False) if freeze_bn_of(model_cfg) else base(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    for i, (width, rate) in enumerate(zip(units, dropout), start=1):
        x = keras.layers.Dense(width, use_bias=False, name=f"dense_{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn_{i}")(x)
        x = keras.layers.Activation("relu", name=f"relu_{i}")(x)
        x = keras.layers.Dropout(rate, name=f"dropout_{i}")(x)
    x = keras.layers.Dense(num_classes, name=LOGITS_LAYER)(x)
    outputs = keras.layers.Activation("softmax", dtype="float32", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"dermascan_{backbone}")
    return model, base


def unfreeze(base: keras.Model, from_layer: Optional[int | str] = None, freeze_bn: bool = True) -> int:
    """Phase 2: make the backbone trainable from ``from_layer`` (index or name) on.

    Returns the number of trainable backbone layers. With ``freeze_bn`` the
    BatchNorm layers stay frozen, which in Keras 3 also keeps them in
    inference mode, so their moving statistics do not change.
    """
    base.trainable = True
    if freeze_bn:
        for layer in base.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False
    if from_layer is None:
        return len(base.layers)
    names = [layer.name for layer in base.layers]
    if isinstance(from_layer, str):
        if from_layer not in names:
            raise ConfigError(f"train.phase2.unfreeze_from: no layer {from_layer!r} in the backbone")
        start = names.index(from_layer)
    else:
        start = from_layer if from_layer >= 0 else len(names) + from_layer
        if not 0 <= start < len(names):
            raise ConfigError(f"train.phase2.unfreeze_from={from_layer} is outside the backbone's {len(names)} layers")
    for layer in base.layers[:start]:
        layer.trainable = False
    return len(names) - start


def freeze_head_bn(model: keras.Model) -> int:
    """Put the head's BatchNorm layers in inference mode (``trainable=False``); return how many.

    Why: in phase 2 the backbone's features move while the head's BN layers
    normalise each batch with its own statistics in training but with lagging
    moving averages in inference. On real ISIC images at lr 1e-4 that gap
    sent every val prediction to one class while training metrics rose.
    Frozen, the head normalises with phase 1's statistics in training and
    inference alike, so what is trained is what is evaluated. The backbone
    (``model.layers`` holds it as one nested layer) is left to ``unfreeze``.
    """
    frozen = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
            frozen += 1
    return frozen


def inference_model(model: keras.Model, temperature: Optional[float] = None, gate: Optional["Gate"] = None) -> keras.Model:
    """A copy of the model for serving: uncompiled, without training-only layers, with the temperature built in.

    softmax(z / T) is folded into the output layer by dividing its kernel and
    bias by T, so no temperature layer is needed: the exported model holds
    standard Keras layers only, except ``ShadesOfGray`` when the model
    normalises colour (loading that ``model.keras`` needs ``import
    dermascan.modeling.color``; the SavedModel and TFLite files need nothing). The
    argmax, and so the top-1 prediction, cannot change.

    With a fitted ``gate`` (``dermascan.modeling.ood``) the model has two
    named outputs, ``{"probabilities": [N, 8], "out_of_scope": [N]}``, the
    second computed from the pooled features; without one, the probabilities alone.
    """
    inputs = model.inputs[0]
    if any(isinstance(layer, IDGAugmentation) for layer in model.layers):
        x = inputs
        for layer in model.layers[1:]:
            if not isinstance(layer, IDGAugmentation):
                x = layer(x)
    else:
        x = model.outputs[0]
    serving = keras.Model(inputs, x, name=model.name)
    copy = keras.models.clone_model(serving)
    copy.set_weights(serving.get_weights())
    if temperature is not None and temperature != 1.0:
        logits = copy.get_layer(LOGITS_LAYER)
        logits.set_weights([w / temperature for w in logits.get_weights()])
    if gate is None:
        return copy
    from dermascan.modeling.ood import FEATURES_LAYER, OutOfScopeScore

    score = OutOfScopeScore.of(gate)(copy.get_layer(FEATURES_LAYER).output)
    return keras.Model(copy.inputs, {"probabilities": copy.outputs[0], "out_of_scope": score}, name=model.name)
