"""Input pipelines over a manifest of the real sample images."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf

from dermascan.classes import CODES
from dermascan.config import IngestConfig
from dermascan.data.cache import build_cache, cache_folder
from dermascan.errors import DataError
from dermascan.ingest import ingest
from dermascan.modeling.augment import AugmentParams
from dermascan.modeling.inputs import (
    PipelineSpec,
    iterate,
    make_inputs,
    mixup,
    sampling_prior,
    training_prior,
)

from .conftest import compose_config

PARAMS = AugmentParams.from_config(
    dict(rotation_range=180, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.2,
         shear_range=10, horizontal_flip=True, vertical_flip=True, brightness_range=[0.8, 1.2], fill_mode="reflect")
)


@pytest.fixture
def manifest(small_root, tmp_path) -> pd.DataFrame:
    cfg = compose_config(
        "ingest",
        ["data=isic", f"data.root={small_root}", f"data.processed_dir={tmp_path / 'out'}",
         "data.releases=[isic2019_train]"],
        IngestConfig,
    )
    return ingest(cfg).manifest


def cache_settings(tmp_path, size=224) -> dict:
    return {"dir": str(tmp_path / "cache"), "size": size, "method": "bilinear", "quality": 95, "workers": 2}


@pytest.mark.parametrize("engine", ["fast", "legacy"])
def test_both_engines_yield_raw_pixel_batches_with_labels_in_class_order(manifest, tmp_path, engine):
    train = manifest[manifest["split"] == "train"].reset_index(drop=True)
    spec = PipelineSpec(image_size=224, batch_size=16, engine=engine, seed=1)

    evaluation = make_inputs(train, spec, PARAMS, training=False, cache=cache_settings(tmp_path))
    images, labels = next(iter(evaluation)) if engine == "fast" else evaluation[0]
    images, labels = np.asarray(images), np.asarray(labels)
    assert images.shape == (16, 224, 224, 3) and images.dtype == np.float32
    assert labels.shape == (16, 8) and labels.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255 and images.max() > 200  # raw pixels, not rescaled
    assert (labels.sum(axis=1) == 1).all()
    # Unshuffled: row i is manifest row i, and column j is CODES[j].
    assert [CODES[j] for j in labels.argmax(axis=1)] == list(train["label"][:16])

    training = make_inputs(train, spec, PARAMS, training=True, cache=cache_settings(tmp_path))
    images, labels = next(iter(training)) if engine == "fast" else training[0]
    images = np.asarray(images)
    assert images.shape == (16, 224, 224, 3) and images.dtype == np.float32
    assert 0 <= images.min() and images.max() <= 255


def test_fast_pipeline_is_reproducible_with_a_seed(manifest, tmp_path):
    train = manifest[manifest["split"] == "train"]

    def first_batch(seed):
        spec = PipelineSpec(batch_size=8, seed=seed)
        images, labels = next(iter(make_inputs(train, spec, PARAMS, True, cache_settings(tmp_path))))
        return images.numpy(), labels.numpy()

    a, b, c = first_batch(5), first_batch(5), first_batch(6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert np.abs(a[0] - c[0]).max() > 10


def test_epochs_reshuffle_and_reaugment(manifest, tmp_path):
    train = manifest[manifest["split"] == "train"]
    ds = make_inputs(train, PipelineSpec(batch_size=8, seed=0), PARAMS, True, cache_settings(tmp_path))
    epoch1, epoch2 = next(iter(ds))[0].numpy(), next(iter(ds))[0].numpy()
    assert np.abs(epoch1 - epoch2).max() > 10


def test_second_pass_reads_the_cache_not_the_originals(manifest, tmp_path):
    settings = cache_settings(tmp_path, size=96)
    spec = PipelineSpec(image_size=96, batch_size=32)
    first = [x.numpy() for x, _ in make_inputs(manifest, spec, PARAMS, False, settings)]
    folder = cache_folder(settings["dir"], 96, "bilinear")
    assert len(list(folder.glob("*.jpg"))) == len(manifest)

    originals = manifest["path"].map(lambda p: str(p)).iloc[0].rsplit("/", 1)[0]
    shutil.move(originals, originals + ".gone")  # no original can be read any more
    second = [x.numpy() for x, _ in make_inputs(manifest, spec, PARAMS, False, settings)]
    np.testing.assert_array_equal(np.concatenate(first), np.concatenate(second))


def test_cache_is_keyed_by_size_and_method(manifest, tmp_path):
    rows = manifest.head(3)
    a = build_cache(rows["image_id"], rows["path"], tmp_path / "c", 64, "bilinear")
    b = build_cache(rows["image_id"], rows["path"], tmp_path / "c", 64, "lanczos")
    c = build_cache(rows["image_id"], rows["path"], tmp_path / "c", 80, "bilinear")
    assert len({p.rsplit("/", 2)[1] for p in a + b + c}) == 3
    from PIL import Image

    assert Image.open(c[0]).size == (80, 80)


def test_original_broken_after_ingestion_is_named(manifest, tmp_path):
    victim = manifest["path"].iloc[4]
    with open(victim, "r+b") as handle:
        handle.truncate(300)
    with pytest.raises(DataError, match=victim.replace(".", r"\.")):
        make_inputs(manifest, PipelineSpec(), PARAMS, False, cache_settings(tmp_path))


def test_cached_file_broken_later_is_named_not_a_tf_data_traceback(manifest, tmp_path):
    settings = cache_settings(tmp_path, size=64)
    spec = PipelineSpec(image_size=64, batch_size=16)
    ds = make_inputs(manifest, spec, PARAMS, False, settings)
    cached = sorted(cache_folder(settings["dir"], 64, "bilinear").glob("*.jpg"))
    cached[10].write_bytes(b"not a jpeg")
    with pytest.raises(DataError, match=cached[10].name):
        for _ in iterate(ds, [str(p) for p in cached]):
            pass


def test_balanced_sampler_draws_every_class_equally_from_an_imbalanced_split(manifest, tmp_path):
    train = manifest[manifest["split"] == "train"]
    # ISIC-like imbalance: every NV image, two of each other class.
    imbalanced = pd.concat([train[train["label"] == "NV"], train[train["label"] != "NV"].groupby("label").head(2)])
    assert (imbalanced["label"] == "NV").mean() > 0.5

    def class_shares(sampler: str, power: float = 0.0) -> np.ndarray:
        spec = PipelineSpec(image_size=64, batch_size=32, sampler=sampler, sampler_power=power, seed=3)
        data = make_inputs(imbalanced, spec, AugmentParams(), training=True, cache=cache_settings(tmp_path, 64))
        labels = np.concatenate([np.asarray(y) for _, y in data.take(25)])  # 800 draws
        return labels.sum(axis=0) / len(labels)

    balanced = class_shares("balanced")
    assert np.all(np.abs(balanced - 1 / 8) < 0.05), balanced
    assert class_shares("shuffle")[CODES.index("NV")] > 0.5
    # Square-root sampling: NV (its count n) against 2 of each other class.
    n = int((imbalanced["label"] == "NV").sum())
    expected = np.sqrt(n) / (np.sqrt(n) + 7 * np.sqrt(2))
    assert abs(class_shares("balanced", power=0.5)[CODES.index("NV")] - expected) < 0.06


def test_sampling_prior_is_proportional_to_a_power_of_the_counts():
    indices = np.array([0] * 9 + [1] * 4 + [5] * 1)  # classes 2-4, 6, 7 absent
    np.testing.assert_allclose(sampling_prior(indices, 0.0), [1 / 3, 1 / 3, 0, 0, 0, 1 / 3, 0, 0])
    np.testing.assert_allclose(sampling_prior(indices, 0.5), np.array([3, 2, 0, 0, 0, 1, 0, 0]) / 6)
    np.testing.assert_allclose(sampling_prior(indices, 1.0), np.array([9, 4, 0, 0, 0, 1, 0, 0]) / 14)
    labels = [CODES[i] for i in indices]
    np.testing.assert_allclose(training_prior(labels, PipelineSpec()), sampling_prior(indices, 1.0))  # shuffle
    balanced = PipelineSpec(sampler="balanced", sampler_power=0.5)
    np.testing.assert_allclose(training_prior(labels, balanced), sampling_prior(indices, 0.5))


def test_balanced_sampler_needs_the_fast_engine(manifest, tmp_path):
    from dermascan.errors import ConfigError

    spec = PipelineSpec(image_size=64, batch_size=8, engine="legacy", sampler="balanced")
    with pytest.raises(ConfigError, match="train.sampler=balanced needs augment.engine=fast"):
        make_inputs(manifest[manifest["split"] == "train"], spec, AugmentParams(), training=True,
                    cache=cache_settings(tmp_path, 64))


def test_mixup_blends_each_image_with_its_mirror_and_the_labels_by_the_same_weight():
    images = tf.constant(np.arange(6, dtype="float32")[:, None, None, None] * np.ones((6, 4, 4, 3), "float32"))
    labels = tf.one_hot([0, 1, 2, 3, 4, 5], 8)
    mixed, soft = mixup(images, labels, 0.4, tf.constant([3, 4], tf.int64))
    mixed, soft = mixed.numpy(), soft.numpy()
    weight = soft[np.arange(6), np.arange(6)]  # the share of each image's own label
    assert np.all(weight >= 0.5) and np.all(weight <= 1.0) and weight.std() > 0.01
    np.testing.assert_allclose(soft.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(soft[np.arange(6), 5 - np.arange(6)], 1 - weight, rtol=1e-5, atol=1e-6)
    expected = weight * np.arange(6) + (1 - weight) * np.arange(6)[::-1]
    np.testing.assert_allclose(mixed[:, 0, 0, 0], expected, rtol=1e-5)
    np.testing.assert_allclose(mixed.std(axis=(1, 2, 3)), 0.0, atol=1e-5)  # a blend of two constant images


def test_mixup_runs_on_train_batches_only(manifest, tmp_path):
    spec = PipelineSpec(image_size=64, batch_size=16, mixup_alpha=0.4, seed=3)
    rows = manifest[manifest["split"] == "train"]
    settings = cache_settings(tmp_path, 64)
    _, train_labels = next(iter(make_inputs(rows, spec, AugmentParams(), training=True, cache=settings)))
    _, val_labels = next(iter(make_inputs(rows, spec, AugmentParams(), training=False, cache=settings)))
    assert np.asarray(train_labels).max(axis=1).min() < 1.0  # soft labels
    np.testing.assert_array_equal(np.asarray(val_labels).max(axis=1), 1.0)
