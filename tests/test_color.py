"""Shades of Gray colour constancy (dermascan.modeling.color) against a numpy reference, in and out of the model."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

from dermascan.modeling.color import ShadesOfGray
from dermascan.modeling.model import build_model

from .conftest import model_config

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "isic-sample" / "images"


def shades_of_gray_reference(image: np.ndarray, power: float = 6.0) -> np.ndarray:
    """Finlayson and Trezzi's Shades of Gray, written out in float64 numpy for one H x W x 3 image."""
    x = image.astype(np.float64)
    illuminant = np.mean(x**power, axis=(0, 1)) ** (1.0 / power)
    illuminant = illuminant / np.linalg.norm(illuminant)
    return np.clip(x / (illuminant * np.sqrt(3.0)), 0.0, 255.0)


def real_or_realistic_images() -> np.ndarray:
    """Real dermoscopic images when ../shared is there; otherwise skin-toned images with a colour cast."""
    files = sorted(SAMPLE.glob("*.jpg"))[:6] if SAMPLE.is_dir() else []
    if files:
        return np.stack([np.asarray(Image.open(f).convert("RGB").resize((96, 96))) for f in files]).astype(np.float32)
    rng = np.random.default_rng(0)
    base = rng.normal([190, 140, 120], 25, size=(6, 96, 96, 3))
    cast = rng.uniform(0.7, 1.3, size=(6, 1, 1, 3))
    return np.clip(base * cast, 0, 255).astype(np.float32)


@pytest.mark.parametrize("power", [1.0, 6.0])
def test_matches_the_numpy_reference(power: float) -> None:
    images = real_or_realistic_images()
    got = keras.ops.convert_to_numpy(ShadesOfGray(power)(images))
    want = np.stack([shades_of_gray_reference(image, power) for image in images])
    np.testing.assert_allclose(got, want, atol=0.05)  # float32 against float64, on a 0-255 scale


def test_removes_a_colour_cast_and_keeps_brightness() -> None:
    images = real_or_realistic_images() * 0.7  # dim enough that the cast below never clips at 255
    layer = ShadesOfGray(6.0)
    cast = np.array([1.2, 0.95, 0.8], np.float32)
    plain = keras.ops.convert_to_numpy(layer(images))
    tinted = keras.ops.convert_to_numpy(layer(images * cast))
    # The cast is gone. What is left is one brightness factor per image (the illuminant's length changed),
    # so the two agree once each is divided by its own mean, far closer than the inputs did.
    def chroma(x: np.ndarray) -> np.ndarray:
        return x / x.mean(axis=(1, 2, 3), keepdims=True)

    assert np.abs(chroma(plain) - chroma(tinted)).mean() < 0.02 * np.abs(chroma(images) - chroma(images * cast)).mean()
    # A uniform change of brightness is not a colour cast: it survives.
    darker = keras.ops.convert_to_numpy(layer(images * 0.5))
    np.testing.assert_allclose(darker, plain * 0.5, atol=0.5)
    # Grey stays grey, and a black image stays black (no division by zero).
    grey = np.full((1, 8, 8, 3), 100.0, np.float32)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(grey)), grey, atol=1e-3)
    black = np.zeros((1, 8, 8, 3), np.float32)
    assert np.all(np.isfinite(keras.ops.convert_to_numpy(layer(black))))
    assert keras.ops.convert_to_numpy(layer(black)).max() == 0.0


@pytest.mark.integration
def test_is_part_of_the_model_and_survives_saving(tmp_path: Path) -> None:
    model, _ = build_model(model_config(image_size=32, weights=None, alpha=0.35, units=[8], dropout=[0.1],
                           color_constancy="shades_of_gray", sog_power=6.0))
    assert model.get_layer("shades_of_gray").power == 6.0
    images = real_or_realistic_images()[:2, :32, :32]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    # Inside the model, the layer sees the raw pixels: its output is the reference's.
    corrected = keras.Model(loaded.inputs, loaded.get_layer("shades_of_gray").output).predict(images, verbose=0)
    want = np.stack([shades_of_gray_reference(image) for image in images])
    np.testing.assert_allclose(corrected, want, atol=0.05)


@pytest.mark.integration
def test_exported_formats_apply_the_same_normalisation(sample_pixels, tmp_path):
    """SavedModel and TFLite run the layer as Keras does, so the service and the phone see what training saw."""
    from dermascan.export import export_model
    from dermascan.runtime import load_predictor

    from .conftest import EXPORT_SIZE, with_real_statistics

    images, labels = sample_pixels
    keras.utils.set_random_seed(0)
    model, base = build_model(model_config(image_size=EXPORT_SIZE, weights=None, alpha=0.35, units=[16], dropout=[0.0],
                              bn_momentum=0.0, color_constancy="shades_of_gray"))
    with_real_statistics(model, base, images)
    out_dir = tmp_path / "export"
    report = export_model(model, out_dir, image_size=EXPORT_SIZE, tflite=["fp32"], resize_method="bilinear", parity_images=images[:64],
                          parity_labels=labels[:64], min_agreement=0.99)
    reference = model.predict(images[:64].astype("float32"), verbose=0)
    np.testing.assert_allclose(load_predictor(out_dir, "savedmodel")(images[:64])["probabilities"], reference, atol=1e-5)
    # TFLite sums the spatial mean of x ** 6 in another order than TensorFlow: measured up to 6e-5 apart.
    np.testing.assert_allclose(load_predictor(out_dir, "tflite", "fp32")(images[:64])["probabilities"], reference, atol=2e-4)
    assert report["formats"]["tflite_fp32"]["top1_agreement"] == 1.0
    assert "shades_of_gray" in [layer.name for layer in keras.models.load_model(out_dir / "model.keras").layers]
