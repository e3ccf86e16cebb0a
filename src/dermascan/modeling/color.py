"""Colour constancy inside the model: Shades of Gray (Finlayson and Trezzi, 2004).

Dermoscopes differ in their light and white balance; the ISIC 2019 winners
(DAISYLab, ngessert/isic2019) normalised every image with Shades of Gray
at p = 6, and Barata et al. (2015) report large gains from it for colour
features. For each image and channel c the illuminant is the Minkowski
p-norm mean of the channel,

    e_c = mean(I_c ** p) ** (1 / p),

and the image is divided by it, with e scaled so that a grey illuminant
leaves the image unchanged (e / ||e|| * sqrt(3)); the result is clipped to
0-255. Brightness is kept: the output of an image multiplied by a constant
is the output multiplied by that constant, so only the colour cast is removed.

It is a layer, not a preprocessing step, so that training, evaluation, the
exported SavedModel/TFLite/Core ML models and the service all apply the
same normalisation to the same raw pixels.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops

from dermascan.config import ColorConstancy

COLOR_CONSTANCY = tuple(ColorConstancy)
# Below (H * W) ** (-1 / p) for p = 6 and any image under 64 megapixels; with a smaller p it can only
# touch a channel that is almost entirely dark.
NORM_FLOOR = 0.05
ILLUMINANT_FLOOR = 2.0  # in pixel units (0-255)


@keras.saving.register_keras_serializable(package="dermascan")
class ShadesOfGray(keras.layers.Layer):
    """Raw RGB 0-255 [N, H, W, 3] in, colour-corrected RGB 0-255 out (float32)."""

    def __init__(self, power: float = 6.0, **kwargs: Any) -> None:
        kwargs.setdefault("dtype", "float32")  # x ** 6 needs float32's range, also under mixed precision
        super().__init__(**kwargs)
        if power < 1:
            raise ValueError(f"Shades of Gray needs power >= 1, got {power}")
        self.power = float(power)

    def call(self, images: Any) -> Any:
        x = ops.cast(images, "float32")
        # Each channel is scaled by its own maximum first, so that x ** p spreads over [0, 1] and the p-norm
        # survives int8 quantization (TFLite int8_full) instead of rounding to 0. In float this is exact:
        # mean(x ** p) ** (1/p) = max * mean((x / max) ** p) ** (1/p).
        peak = ops.maximum(ops.max(x, axis=(1, 2), keepdims=True), 1.0)
        norm = ops.power(ops.mean(ops.power(x / peak, self.power), axis=(1, 2), keepdims=True), 1.0 / self.power)
        # The floors are no-ops on any real image (the scaled norm is at least (H * W) ** (-1 / p), 0.16 at
        # 224 px) and keep quantized divisors off zero: a channel darker than 2 / 255 has no colour to correct.
        illuminant = ops.maximum(peak * ops.maximum(norm, NORM_FLOOR), ILLUMINANT_FLOOR)
        length = ops.sqrt(ops.sum(ops.square(illuminant), axis=-1, keepdims=True))
        return ops.clip(x * (length / (illuminant * 3.0**0.5)), 0.0, 255.0)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict[str, Any]:
        return {**super().get_config(), "power": self.power}
