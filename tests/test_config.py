"""Config composition and validation: mistakes fail at start-up, naming the key."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException

from dermascan.config import AkiecPolicy, IngestConfig
from dermascan.errors import ConfigError

from .conftest import compose_config


def test_defaults_compose_to_the_demo_data():
    cfg = compose_config("ingest", [], IngestConfig)
    assert cfg.data.name == "demo" and cfg.data.root == "data/raw/demo"
    assert cfg.data.processed_dir == "data/processed/demo"
    assert cfg.data.akiec is AkiecPolicy.drop and cfg.data.val_fraction == 0.15
    assert cfg.data.demo.images_per_class == 60


def test_isic_data_uses_every_release_by_default():
    cfg = compose_config("ingest", ["data=isic"], IngestConfig)
    assert [r.value for r in cfg.data.releases] == [
        "isic2018_train", "isic2018_val", "isic2018_test", "isic2019_train",
    ]
    assert cfg.data.demo is None


def test_unknown_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException, match="splt"):
        compose_config("ingest", ["data.splt=grouped"], IngestConfig)
    with pytest.raises(ConfigError, match="data.splt"):
        compose_config("ingest", ["+data.splt=grouped"], IngestConfig)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.val_fraction=abc", "data.val_fraction"),
        ("data.akiec=maybe", "data.akiec"),
        ("data.releases=[isic2020]", "data.releases"),
        ("data.workers=many", "data.workers"),
        ("data.test_fraction=1.5", "data.test_fraction must be in"),
        ("data.val_fraction=0.5", "must leave images for training"),
    ],
)
def test_bad_values_fail_with_the_key(override, message):
    overrides = [override, "data.test_fraction=0.5"] if "0.5" in override and "val" in override else [override]
    with pytest.raises(ConfigError, match=message):
        compose_config("ingest", overrides, IngestConfig)


def test_official_split_needs_the_2018_test_release():
    with pytest.raises(ConfigError, match="isic2018_test"):
        compose_config("ingest", ["data=isic", "data.split=official", "data.releases=[isic2019_train]"], IngestConfig)


def test_demo_sizes_are_checked():
    with pytest.raises(ConfigError, match="min_side <= max_side"):
        compose_config("ingest", ["data.demo.max_side=96"], IngestConfig)



@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.sampler=balanced"], "Set train.class_weight=none"),
        (["train.sampler=oversample"], "train.sampler must be shuffle or balanced"),
        (["train.clipnorm=0"], "train.clipnorm must be null or > 0"),
        (["train.collapse_share=0"], "train.collapse_share"),
        (["model.color_constancy=grey_world"], "model.color_constancy must be one of none, shades_of_gray"),
        (["model.sog_power=0.5"], "model.sog_power must be >= 1"),
    ],
)
def test_training_options_are_checked_at_start_up(overrides, message, tmp_path):
    from dermascan.config import RunConfig

    with pytest.raises(ConfigError, match=message):
        compose_config("train", [*overrides, f"run_dir={tmp_path}"], RunConfig)
