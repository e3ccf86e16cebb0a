"""Input pipelines over the manifest: decode, resize, augment, batch, prefetch.

Both engines read the resize cache (``dermascan.data.cache``), never the
originals, and yield ``(images, labels)`` batches: float32 images of shape
[B, S, S, 3] with raw 0-255 pixels (preprocessing lives inside the model),
and one-hot float32 labels in ``classes.CODES`` order.

- ``fast``: ``tf.data`` with parallel decode, a bounded shuffle buffer (the
  training set never has to fit in memory), IDG-equivalent augmentation per
  batch (``augment.py``) and prefetch. Augmentation runs in the pipeline
  (``device=cpu``) or is left to the model's ``IDGAugmentation`` layer
  (``device=accelerator``), so that on a GPU the CPU only decodes.
- ``legacy``: Keras' ``ImageDataGenerator.flow_from_dataframe``, as the
  reference recipe used it.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf

from dermascan.classes import CODES, INDEX
from dermascan.data.cache import build_cache
from dermascan.data.images import check_image
from dermascan.errors import ConfigError, DataError
from dermascan.modeling.augment import AugmentParams, augment_batch_cpu

log = logging.getLogger("dermascan.modeling.inputs")


@dataclass(frozen=True)
class PipelineSpec:
    image_size: int = 224
    batch_size: int = 32
    engine: str = "fast"  # fast | legacy
    augment_in_pipeline: bool = True  # False: the model's IDGAugmentation layer augments
    shuffle_buffer: int = 4096
    sampler: str = "shuffle"  # shuffle | balanced (training only: class c drawn with probability ∝ n_c ** sampler_power)
    sampler_power: float = 0.0  # balanced only: 0 draws each class equally, 0.5 by the square root of its count
    mixup_alpha: float = 0.0  # training only: mixup's Beta(alpha, alpha); 0: off
    seed: int = 42
    deterministic: bool = True


def label_indices(labels: Sequence[str]) -> np.ndarray:
    unknown = sorted({label for label in labels if label not in INDEX})
    if unknown:
        raise DataError(f"labels outside the 8 classes cannot be trained on: {unknown}")
    return np.array([INDEX[label] for label in labels], dtype=np.int32)


def decode(path: tf.Tensor, image_size: int) -> tf.Tensor:
    """Read one cached JPEG as uint8 [S, S, 3]; resize if the cache holds another size."""
    image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3, dct_method="INTEGER_ACCURATE")
    shape = tf.shape(image)
    if_resize = tf.logical_or(shape[0] != image_size, shape[1] != image_size)
    image = tf.cond(
        if_resize,
        lambda: tf.cast(tf.round(tf.image.resize(image, [image_size, image_size], method="bilinear")), tf.uint8),
        lambda: image,
    )
    return tf.ensure_shape(image, [image_size, image_size, 3])


def mixup(images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Mixup (Zhang et al., ICLR 2018): each image blended with its mirror in the batch, labels alike.

    The weight is drawn per image from Beta(alpha, alpha) (a ratio of two
    Gamma draws) and folded to >= 0.5, so each image keeps most of itself and
    its own label stays the larger one.
    """
    n = tf.shape(images)[0]
    gamma_seeds = tf.random.experimental.stateless_split(seed, 2)
    first = tf.random.stateless_gamma([n], gamma_seeds[0], alpha)
    second = tf.random.stateless_gamma([n], gamma_seeds[1], alpha)
    weight = tf.math.divide_no_nan(first, first + second)
    weight = tf.maximum(weight, 1.0 - weight)
    mixed = weight[:, None, None, None] * images + (1.0 - weight[:, None, None, None]) * tf.reverse(images, [0])
    return mixed, weight[:, None] * labels + (1.0 - weight[:, None]) * tf.reverse(labels, [0])


def sampling_prior(indices: np.ndarray, power: float) -> np.ndarray:
    """The class distribution the balanced sampler draws: ∝ n_c ** power over the 8 classes (0 where absent)."""
    counts = np.bincount(indices, minlength=len(CODES)).astype(np.float64)
    weights = np.where(counts > 0, counts**power, 0.0)
    return weights / weights.sum()


def training_prior(labels: Sequence[str], spec: PipelineSpec) -> np.ndarray:
    """The class distribution the train pipeline draws: the data's own (shuffle) or the balanced sampler's."""
    return sampling_prior(label_indices(labels), spec.sampler_power if spec.sampler == "balanced" else 1.0)


def balanced_sampler(paths: list[str], indices: np.ndarray, spec: PipelineSpec) -> tf.data.Dataset:
    """An endless stream of (path, label) drawing each present class ∝ its count ** ``sampler_power`` (0: equally).

    The alternative to class weights: the rare classes are seen more often
    (with fresh augmentation each time) instead of weighing more. Each class
    is its own reshuffled, repeated stream; ``sample_from_datasets`` picks
    the stream per element.
    """
    streams = []
    for k, label in enumerate(np.unique(indices)):
        members = [p for p, i in zip(paths, indices) if i == label]
        stream = tf.data.Dataset.from_tensor_slices((members, np.full(len(members), label, np.int32)))
        streams.append(stream.shuffle(len(members), seed=spec.seed + k, reshuffle_each_iteration=True).repeat())
    return tf.data.Dataset.sample_from_datasets(
        streams, weights=sampling_prior(indices, spec.sampler_power)[np.unique(indices)].tolist(), seed=spec.seed
    )


def fast_dataset(
    paths: Sequence[str],
    labels: Sequence[str],
    spec: PipelineSpec,
    params: AugmentParams,
    training: bool,
) -> tf.data.Dataset:
    """The ``fast`` engine: a tf.data pipeline over cached images.

    For training the dataset is infinite (reshuffled on every pass, and with
    no partial batches, which MirroredStrategy cannot split evenly): give
    ``fit`` a ``steps_per_epoch``. For evaluation it is one ordered pass.
    """
    indices = label_indices(labels)
    if training and spec.sampler == "balanced":
        ds = balanced_sampler(list(paths), indices, spec)
    else:
        ds = tf.data.Dataset.from_tensor_slices((list(paths), indices))
        if training:
            ds = ds.shuffle(min(len(paths), spec.shuffle_buffer), seed=spec.seed, reshuffle_each_iteration=True)
            ds = ds.repeat()
    size = spec.image_size
    ds = ds.map(
        lambda path, label: (decode(path, size), tf.one_hot(label, len(CODES), dtype=tf.float32)),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=spec.deterministic,
    )
    ds = ds.batch(spec.batch_size, num_parallel_calls=tf.data.AUTOTUNE, deterministic=spec.deterministic)
    if training and spec.augment_in_pipeline and params.active:
        seeds = tf.data.Dataset.random(seed=spec.seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, seed: (augment_batch_cpu(batch[0], params, seed), batch[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=spec.deterministic,
        )
    else:
        ds = ds.map(lambda images, labels: (tf.cast(images, tf.float32), labels))
    if training and spec.mixup_alpha > 0:
        seeds = tf.data.Dataset.random(seed=spec.seed + 1, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds).map(
            lambda batch, seed: mixup(batch[0], batch[1], spec.mixup_alpha, seed),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=spec.deterministic,
        )
    return ds.prefetch(tf.data.AUTOTUNE)


def legacy_iterator(
    paths: Sequence[str],
    labels: Sequence[str],
    spec: PipelineSpec,
    params: AugmentParams,
    training: bool,
) -> Any:
    """The ``legacy`` engine: ImageDataGenerator.flow_from_dataframe."""
    from tensorflow.keras.preprocessing.image import (
        ImageDataGenerator,  # deprecated; only here
    )

    label_indices(labels)
    generator = ImageDataGenerator(**params.idg_kwargs()) if training else ImageDataGenerator()
    frame = pd.DataFrame({"path": list(paths), "label": list(labels)})
    return generator.flow_from_dataframe(
        frame,
        x_col="path",
        y_col="label",
        classes=list(CODES),
        class_mode="categorical",
        target_size=(spec.image_size, spec.image_size),
        batch_size=spec.batch_size,
        shuffle=training,
        seed=spec.seed,
        interpolation="bilinear",
        validate_filenames=False,
    )


def make_inputs(
    frame: pd.DataFrame,
    spec: PipelineSpec,
    params: AugmentParams,
    training: bool,
    cache: dict[str, Any],
) -> Any:
    """Cache the images of ``frame`` (manifest rows) and return the chosen engine's batches.

    ``cache`` holds ``dir``, ``size``, ``method``, ``quality`` and ``workers``.
    """
    if frame.empty:
        raise DataError("no images to build an input pipeline from")
    if spec.engine == "legacy" and spec.mixup_alpha > 0:
        raise ConfigError("train.mixup_alpha needs augment.engine=fast (ImageDataGenerator cannot mix batches)")
    if spec.engine == "legacy" and spec.sampler != "shuffle":  # before the cache is built, not after
        raise ConfigError("train.sampler=balanced needs augment.engine=fast (ImageDataGenerator only shuffles)")
    paths = build_cache(
        frame["image_id"],
        frame["path"],
        cache["dir"],
        int(cache["size"]),
        method=cache["method"],
        quality=int(cache["quality"]),
        workers=int(cache["workers"]),
    )
    labels = list(frame["label"])
    if spec.engine == "legacy":
        return legacy_iterator(paths, labels, spec, params, training)
    if spec.engine != "fast":
        raise DataError(f"unknown augment.engine {spec.engine!r}; expected fast or legacy")
    return fast_dataset(paths, labels, spec, params, training)


def evaluation_images(frame: pd.DataFrame, image_size: int, batch_size: int, cache: dict[str, Any]) -> tf.data.Dataset:
    """Batches of the rows' images (raw pixels, float32), in order, no augmentation; rows need no label."""
    spec = PipelineSpec(image_size=image_size, batch_size=batch_size)
    # The pipeline carries a label per row; an unlabelled row (ISIC 2018 Test AKIEC) gets a placeholder.
    data = make_inputs(frame.fillna({"label": CODES[0]}), spec, AugmentParams(), training=False, cache=cache)
    return data.map(lambda images, labels: images)


def diagnose(paths: Sequence[str]) -> Optional[DataError]:
    """After a decode error inside tf.data: find the broken file(s) and name them.

    tf.data's own error does not say which file failed to decode. This
    checks every file by a full decode and returns a DataError naming the
    broken ones, or None if all decode.
    """
    broken = [f"{path}: {reason}" for path in paths if (reason := check_image(path, "decode"))]
    if not broken:
        return None
    shown = "\n  ".join(broken[:5])
    return DataError(
        f"{len(broken)} cached image(s) cannot be decoded:\n  {shown}\n"
        "Delete them from the cache; they are rebuilt from the originals on the next run."
    )


DECODE_ERRORS = (tf.errors.InvalidArgumentError, tf.errors.DataLossError, tf.errors.NotFoundError)


@contextmanager
def naming_broken_files(paths: Sequence[str]) -> Iterator[None]:
    """Turn a decode failure inside tf.data (or ``fit``) into a DataError naming the file.

    An error that no broken file explains is re-raised as it was.
    """
    try:
        yield
    except DECODE_ERRORS as err:
        found = diagnose(paths)
        if found is None:
            raise
        raise found from err


def iterate(dataset: tf.data.Dataset, paths: Sequence[str]) -> Iterator[Any]:
    """Iterate a fast dataset; a decode failure becomes a DataError naming the file."""
    with naming_broken_files(paths):
        yield from dataset
