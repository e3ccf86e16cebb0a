"""The fast engine means what ImageDataGenerator means, and covers its ranges.

Transforms are measured, not trusted: a marker image with three coloured
dots is warped, the dots are found again, and rotation, shift, shear and
zoom are recovered from where they went.
"""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.keras.preprocessing.image import ImageDataGenerator

from dermascan.modeling.augment import (
    CV2_BORDERS,
    AugmentParams,
    IDGAugmentation,
    _warp_cv2,
    affine_matrices,
    apply,
    augment_batch_cpu,
    sample,
)

SIZE = 224
DOTS = np.array([[112 - 40, 112 - 30], [112 + 45, 112 - 10], [112 - 5, 112 + 42]], float)  # (x, y)
RANGES = dict(
    rotation_range=180.0,
    width_shift_range=0.1,
    height_shift_range=0.1,
    zoom_range=[0.8, 1.2],
    shear_range=20.0,
    horizontal_flip=False,
    vertical_flip=False,
    brightness_range=None,
    fill_mode="constant",
    cval=0.0,
)


def marker() -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    image = np.zeros((SIZE, SIZE, 3), np.float32)
    for channel, (x, y) in enumerate(DOTS):
        image[..., channel] = 255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2))
    return image


def recover(image: np.ndarray) -> dict[str, float]:
    """IDG parameters of the warp that made ``image`` from ``marker()``."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    out = []
    for channel in range(3):
        weight = image[..., channel].astype(float)
        weight = np.where(weight > 0.2 * weight.max(), weight, 0)
        out.append([(weight * xx).sum() / weight.sum(), (weight * yy).sum() / weight.sum()])
    out = np.array(out)
    # input = A @ output + b, exactly determined by three points.
    design = np.hstack([out, np.ones((3, 1))])
    solution = np.linalg.solve(design, DOTS)
    a, b = solution[:2].T, solution[2]
    q, u = np.linalg.qr(a)
    signs = np.diag(np.sign(np.diag(u)))
    q, u = q @ signs, signs @ u
    theta = np.degrees(np.arctan2(q[1, 0], q[0, 0]))
    centre = np.array([SIZE / 2 - 0.5, SIZE / 2 - 0.5])
    t = q.T @ (b - centre + a @ centre)
    return {
        "theta": theta,
        "zx": u[0, 0],
        "zy": np.hypot(u[0, 1], u[1, 1]),
        "shear": np.degrees(np.arctan2(-u[0, 1], u[1, 1])),
        "tx": t[0],
        "ty": t[1],
    }


def check_ranges(found: dict[str, np.ndarray]) -> None:
    limits = {
        "theta": (-180.0, 180.0),
        "shear": (-20.0, 20.0),
        "tx": (-0.1 * SIZE, 0.1 * SIZE),
        "ty": (-0.1 * SIZE, 0.1 * SIZE),
        "zx": (0.8, 1.2),
        "zy": (0.8, 1.2),
    }
    for name, (lo, hi) in limits.items():
        values, span = found[name], hi - lo
        assert values.min() >= lo - 0.01 * span and values.max() <= hi + 0.01 * span, name
        assert values.min() <= lo + 0.1 * span and values.max() >= hi - 0.1 * span, f"{name} covers < 90%"


def test_recover_reads_a_known_transform_back():
    truth = {"theta": 33.0, "tx": 9.0, "ty": -14.0, "shear": 12.0, "zx": 1.1, "zy": 0.9}
    warped = ImageDataGenerator(fill_mode="constant").apply_transform(marker(), truth)
    found = recover(warped)
    for key, value in truth.items():
        assert found[key] == pytest.approx(value, abs=0.02 * max(1.0, abs(value))), key


@pytest.mark.integration
def test_idg_itself_draws_within_its_ranges_and_shear_is_degrees():
    """Pins the legacy engine's meaning: IDG's shear_range is in degrees."""
    generator = ImageDataGenerator(**AugmentParams.from_config(RANGES).idg_kwargs())
    draws = [recover(generator.random_transform(marker(), seed=i)) for i in range(500)]
    check_ranges({key: np.array([d[key] for d in draws]) for key in draws[0]})


def test_fast_engine_draws_within_the_ranges_and_covers_them():
    params = AugmentParams.from_config(RANGES)
    batch = tf.constant(np.repeat(np.round(marker())[None].astype(np.uint8), 600, axis=0))
    images = augment_batch_cpu(batch, params, tf.constant([3, 4], tf.int64)).numpy()
    draws = [recover(image) for image in images]
    check_ranges({key: np.array([d[key] for d in draws]) for key in draws[0]})


@pytest.mark.parametrize("fill_mode", ["nearest", "reflect", "constant"])
@pytest.mark.parametrize("flips", [(False, False), (True, False), (True, True)])
def test_fast_engine_matches_idg_on_the_same_transform(sample_jpegs, fill_mode, flips):
    from PIL import Image

    image = np.asarray(Image.open(sample_jpegs[7]).convert("RGB"), np.float32)
    truth = {"theta": -41.0, "tx": 15.0, "ty": -8.0, "shear": 9.0, "zx": 1.15, "zy": 0.88,
             "flip_horizontal": flips[0], "flip_vertical": flips[1]}
    reference = ImageDataGenerator(fill_mode=fill_mode, cval=30.0).apply_transform(image, truth)
    params = AugmentParams(rotation_range=1, horizontal_flip=True, vertical_flip=True, fill_mode=fill_mode, cval=30.0)
    transform = {k: tf.constant([v]) for k, v in truth.items()}
    on_device = apply(image[None], transform, params)[0].numpy()  # TensorFlow kernel
    matrices = affine_matrices(transform, SIZE, SIZE).numpy()
    on_cpu = _warp_cv2(image[None], matrices, CV2_BORDERS[fill_mode], 30.0)[0]  # OpenCV
    for out in (on_device, on_cpu):
        diff = np.abs(out - reference).max(axis=-1)
        if fill_mode == "constant":  # scipy blends cval into the last pixel row; the rest agrees
            assert (diff > 1).mean() < 0.01
        else:
            assert diff.max() < 0.01


def test_brightness_multiplies_within_its_range():
    params = AugmentParams(brightness_range=(0.7, 1.3))
    gray = tf.fill([500, 8, 8, 3], tf.constant(100, tf.uint8))
    ratios = augment_batch_cpu(gray, params, tf.constant([0, 1], tf.int64)).numpy().mean(axis=(1, 2, 3)) / 100
    assert ratios.min() >= 0.7 - 1e-6 and ratios.max() <= 1.3 + 1e-6
    assert ratios.min() < 0.73 and ratios.max() > 1.27
    # Not additive: a dark and a bright image get the same factor.
    pair = tf.constant(np.stack([np.full((8, 8, 3), 20), np.full((8, 8, 3), 200)]).astype(np.uint8))
    seed = tf.constant([5, 5], tf.int64)
    factor = sample(params, 2, 8, 8, seed)["brightness"].numpy()
    out = augment_batch_cpu(pair, params, seed).numpy()[:, 0, 0, 0]
    np.testing.assert_allclose(out, np.minimum([20 * factor[0], 200 * factor[1]], 255), rtol=1e-5)


def test_flips_happen_half_the_time_each():
    params = AugmentParams(horizontal_flip=True, vertical_flip=True)
    drawn = sample(params, 4000, SIZE, SIZE, tf.constant([1, 2], tf.int64))
    for key in ("flip_horizontal", "flip_vertical"):
        assert 0.46 < drawn[key].numpy().mean() < 0.54
    off = sample(AugmentParams(), 100, SIZE, SIZE, tf.constant([1, 2], tf.int64))
    assert not off["flip_horizontal"].numpy().any()


def test_seeded_draws_repeat_and_differ_between_seeds():
    params = AugmentParams.from_config(RANGES)
    batch = tf.constant(np.round(marker())[None].repeat(4, 0).astype(np.uint8))
    a = augment_batch_cpu(batch, params, tf.constant([1, 1], tf.int64)).numpy()
    b = augment_batch_cpu(batch, params, tf.constant([1, 1], tf.int64)).numpy()
    c = augment_batch_cpu(batch, params, tf.constant([1, 2], tf.int64)).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 10


def test_layer_augments_only_in_training():
    layer = IDGAugmentation(RANGES, seed=0)
    images = tf.constant(marker()[None].repeat(2, 0))
    np.testing.assert_array_equal(layer(images, training=False).numpy(), images.numpy())
    first, second = layer(images, training=True).numpy(), layer(images, training=True).numpy()
    assert np.abs(first - images.numpy()).max() > 10 and np.abs(first - second).max() > 10
    assert IDGAugmentation.from_config(layer.get_config()).params == layer.params


def test_auto_device_is_cpu_without_a_gpu():
    from dermascan.modeling.augment import resolve_device

    assert tf.config.list_physical_devices("GPU") == []
    assert resolve_device("auto") == "cpu" and resolve_device("accelerator") == "accelerator"
