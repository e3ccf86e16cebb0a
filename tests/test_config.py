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
        (["train.sampler=oversample"], r"train.sampler.*oversample.*expected one of \[shuffle, balanced\]"),
        (["train.clipnorm=0"], "train.clipnorm must be null or > 0"),
        (["train.sampler_power=0.5"], "set train.sampler=balanced too"),
        (["train.mixup_alpha=-0.1"], "train.mixup_alpha must be >= 0"),
        (["train.logit_adjustment=1"], "favoured twice. Set train.class_weight=none"),
        (["train.logit_adjustment=-1", "train.class_weight=none"], "must be >= 0"),
        (["train.collapse_share=0"], "train.collapse_share"),
        (["model.color_constancy=grey_world"], r"model.color_constancy.*grey_world.*expected one of \[none, shades_of_gray\]"),
        (["model.sog_power=0.5"], "model.sog_power must be >= 1"),
    ],
)
def test_training_options_are_checked_at_start_up(overrides, message, tmp_path):
    from dermascan.config import RunConfig

    with pytest.raises(ConfigError, match=message):
        compose_config("train", [*overrides, f"run_dir={tmp_path}"], RunConfig)


# --- One source of defaults: the YAML (dermascan.config's docstring says why) ---

def _schemas() -> list[type]:
    import dataclasses

    from dermascan import config

    return [obj for obj in vars(config).values() if dataclasses.is_dataclass(obj) and obj.__module__ == config.__name__]


def _leaves(node, prefix=""):
    from omegaconf import DictConfig

    for key in node.keys():
        value = node._get_node(key)
        if isinstance(value, DictConfig) and not value._is_missing() and not value._is_none():
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_schemas_hold_types_only_every_value_comes_from_the_yaml():
    from omegaconf import OmegaConf

    schemas = _schemas()
    assert len(schemas) >= 20, [s.__name__ for s in schemas]
    with_defaults = [
        f"{schema.__name__}.{key}"
        for schema in schemas
        for key, node in _leaves(OmegaConf.structured(schema))
        if not node._is_missing()
    ]
    assert with_defaults == [], "a schema default would drift from the YAML: put the value in configs/ instead"


PRIMARY = [
    ("train", ["run_dir=/r"], "RunConfig"),
    ("train", ["run_dir=/r", "experiment=isic"], "RunConfig"),
    ("train", ["run_dir=/r", "experiment=isic_cpu"], "RunConfig"),
    ("train", ["run_dir=/r", "model=efficientnet_b0", "augment=none", "debug=default"], "RunConfig"),
    ("train", ["run_dir=/r", "~experiment"], "RunConfig"),
    ("ingest", [], "IngestConfig"),
    ("ingest", ["data=isic"], "IngestConfig"),
    ("download", [], "DownloadConfig"),
    ("evaluate_run", [], "EvaluateRunConfig"),
    ("export_run", ["run_dir=/r"], "ExportRunConfig"),
    ("serve", ["export_dir=/e"], "ServeConfig"),
    ("predict", ["export_dir=/e", "images=/i", "out=/o.csv"], "PredictConfig"),
    ("ensemble", ["run_dirs=[/a,/b]", "out_dir=/o"], "EnsembleConfig"),
    ("sweep", ["sweep_dir=/s"], "SweepRunConfig"),
]


@pytest.mark.parametrize(("name", "overrides", "schema"), PRIMARY)
def test_every_primary_config_gets_every_value_from_the_yaml(name, overrides, schema):
    from dermascan import config

    cfg = compose_config(name, overrides, getattr(config, schema))  # validate() refuses a missing value
    assert cfg


def test_a_missing_value_is_named():
    from dermascan.config import ServeConfig

    with pytest.raises(ConfigError, match="missing config value.*export_dir"):
        compose_config("serve", [], ServeConfig)


def test_library_defaults_equal_the_yaml():
    """create_app and prepare_image keep keyword defaults for callers without a config; they are the YAML's."""
    import inspect

    from dermascan.config import ServeConfig
    from dermascan.serve.app import create_app

    served = compose_config("serve", ["export_dir=/e"], ServeConfig)
    params = inspect.signature(create_app).parameters
    for key in ("max_upload_bytes", "max_pixels", "draft_factor", "num_threads", "max_decoders"):
        assert params[key].default == served[key], key


def test_a_saved_run_config_is_validated_and_filled(tmp_path):
    from omegaconf import OmegaConf

    from dermascan.config import Tta, load_saved_run_config

    fresh = compose_config("train", ["run_dir=/r", "evaluate.tta=flips"], __import__("dermascan.config").config.RunConfig)
    saved = OmegaConf.to_container(fresh)
    del saved["train"]["ema_momentum"]  # a run saved before the key existed
    OmegaConf.save(OmegaConf.create(saved), tmp_path / "config.yaml")
    cfg, filled = load_saved_run_config(tmp_path / "config.yaml")
    assert cfg.evaluate.tta is Tta.flips and f"{cfg.evaluate.tta}" == "flips"  # an enum, as in a fresh config
    assert filled == ["train.ema_momentum"] and cfg.train.ema_momentum is None
    bad = {**saved, "train": {**saved["train"], "patience": "soon"}}
    OmegaConf.save(OmegaConf.create(bad), tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="train.patience"):
        load_saved_run_config(tmp_path / "config.yaml")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.seed=-1"], r"data.seed must be in \[0, 2\*\*32\)"),
        (["seed=-1"], r"^seed must be in \[0, 2\*\*32\)"),
        (["model.image_size=100000"], r"model.image_size must be in \[32, 1024\], got 100000"),
        (["model.alpha=-1"], "model.alpha .* must be > 0"),
        (["model.alpha=0"], "model.alpha .* must be > 0"),
        (["experiment=isic", "model.alpha=0.6"], r"ImageNet weights for mobilenet_v2 only at alpha 0.35, 0.5, 0.75, 1.0, 1.3, 1.4"),
        (["train.phase2.lr=-1"], "train.phase2.lr must be > 0"),
        (["train.phase1.lr=0"], "train.phase1.lr must be > 0"),
        (["data.val_fraction=0"], "data.val_fraction=0 with data.split=grouped leaves no val split"),
    ],
)
def test_values_that_would_fail_later_are_refused_naming_the_key(overrides, message):
    from dermascan.config import RunConfig

    with pytest.raises(ConfigError, match=message):
        compose_config("train", ["run_dir=/r", *overrides], RunConfig)


def test_alpha_off_the_imagenet_grid_is_fine_from_scratch():
    from dermascan.config import RunConfig

    cfg = compose_config("train", ["run_dir=/r", "experiment=isic", "model.alpha=0.6", "model.weights=null"], RunConfig)
    assert cfg.model.alpha == 0.6


@pytest.mark.integration
def test_bad_seed_on_the_command_line_exits_2_with_one_line(tmp_path):
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "dermascan.train", "data.seed=-1", f"paths.runs_dir={tmp_path}", "hydra.run.dir=" + str(tmp_path / "r")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "ConfigError" in line]
    assert run.returncode == 2 and len(errors) == 1 and "data.seed must be in" in errors[0]
    assert "Traceback" not in run.stdout + run.stderr
