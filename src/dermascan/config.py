"""Config schemas, validation and the location of the Hydra config tree.

The YAML files in ``configs/`` hold the values; the dataclasses here hold the
keys and types. ``validate`` merges a composed config onto its schema, so an
unknown key or a wrong type fails at start-up with a message that names it,
not an hour into training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dermascan.errors import ConfigError


def config_dir() -> str:
    """Where Hydra finds the config tree.

    A source checkout (or an editable install) reads the top-level
    ``configs/`` directly; an installed wheel ships the same files as the
    ``dermascan.configs`` package.
    """
    checkout = Path(__file__).resolve().parents[2] / "configs"
    if (checkout / "ingest.yaml").is_file():
        return str(checkout)
    return "pkg://dermascan.configs"


class Release(str, Enum):
    isic2018_train = "isic2018_train"
    isic2018_val = "isic2018_val"
    isic2018_test = "isic2018_test"
    isic2019_train = "isic2019_train"


class AkiecPolicy(str, Enum):
    drop = "drop"
    ak = "ak"


class MissingPolicy(str, Enum):
    error = "error"
    skip = "skip"


class VerifyMode(str, Enum):
    header = "header"
    decode = "decode"


class SplitPolicy(str, Enum):
    grouped = "grouped"
    official = "official"


class Engine(str, Enum):
    fast = "fast"
    legacy = "legacy"


class AugmentDevice(str, Enum):
    auto = "auto"
    cpu = "cpu"
    accelerator = "accelerator"


@dataclass
class AugmentConfig:
    engine: Engine = Engine.fast
    device: AugmentDevice = AugmentDevice.auto
    rotation_range: float = 0.0
    width_shift_range: float = 0.0
    height_shift_range: float = 0.0
    zoom_range: Any = 0.0  # a float z ([1 - z, 1 + z]) or a [lo, hi] pair
    shear_range: float = 0.0
    horizontal_flip: bool = False
    vertical_flip: bool = False
    brightness_range: Optional[list[float]] = None
    fill_mode: str = "nearest"
    cval: float = 0.0


@dataclass
class PathsConfig:
    data_dir: str = "data"
    runs_dir: str = "runs"


@dataclass
class DemoConfig:
    images_per_class: int = 60
    seed: int = 0
    min_side: int = 160
    max_side: int = 480
    isic2018_share: float = 0.5


@dataclass
class CacheConfig:
    dir: str = "data/cache"
    size: int = 224
    method: str = "bilinear"
    quality: int = 95
    workers: int = 4


@dataclass
class DataConfig:
    name: str = "isic"
    root: str = "data/raw/isic"
    processed_dir: str = "data/processed/isic"
    releases: list[Release] = field(default_factory=lambda: list(Release))
    akiec: AkiecPolicy = AkiecPolicy.drop
    missing: MissingPolicy = MissingPolicy.error
    verify: VerifyMode = VerifyMode.header
    split: SplitPolicy = SplitPolicy.grouped
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    seed: int = 42
    workers: int = 8
    cache: CacheConfig = field(default_factory=CacheConfig)
    demo: Optional[DemoConfig] = None


@dataclass
class IngestConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)


def _check_data(data: Any) -> None:
    for key in ("val_fraction", "test_fraction"):
        value = data[key]
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"data.{key} must be in [0, 1), got {value}")
    if data.val_fraction + data.test_fraction >= 1.0:
        raise ConfigError(
            "data.val_fraction + data.test_fraction must leave images for training, "
            f"got {data.val_fraction} + {data.test_fraction}"
        )
    if not data.releases:
        raise ConfigError("data.releases is empty: name at least one release")
    if data.split == SplitPolicy.official and Release.isic2018_test not in data.releases:
        raise ConfigError("data.split=official needs the isic2018_test release in data.releases")
    if data.workers < 1:
        raise ConfigError(f"data.workers must be >= 1, got {data.workers}")
    demo = data.demo
    if demo is not None:
        if demo.images_per_class < 3:
            raise ConfigError(f"data.demo.images_per_class must be >= 3 (one per split), got {demo.images_per_class}")
        if not 32 <= demo.min_side <= demo.max_side:
            raise ConfigError(
                f"data.demo needs 32 <= min_side <= max_side, got min_side={demo.min_side}, max_side={demo.max_side}"
            )
        if not 0.0 <= demo.isic2018_share <= 1.0:
            raise ConfigError(f"data.demo.isic2018_share must be in [0, 1], got {demo.isic2018_share}")
    _check_cache(data.cache)


FILL_MODES = ("constant", "nearest", "reflect", "wrap")


def _check_augment(augment: Any) -> None:
    for key in ("rotation_range", "width_shift_range", "height_shift_range", "shear_range"):
        if augment[key] < 0:
            raise ConfigError(f"augment.{key} must be >= 0, got {augment[key]}")
    zoom = augment.zoom_range
    if isinstance(zoom, (int, float)):
        if not 0 <= zoom < 1:
            raise ConfigError(f"augment.zoom_range as a float must be in [0, 1), got {zoom}")
    elif len(zoom) != 2 or not 0 < zoom[0] <= zoom[1]:
        raise ConfigError(f"augment.zoom_range must be a float or a [lo, hi] pair with 0 < lo <= hi, got {list(zoom)}")
    brightness = augment.brightness_range
    if brightness is not None and (len(brightness) != 2 or not 0 <= brightness[0] <= brightness[1]):
        raise ConfigError(f"augment.brightness_range must be null or [lo, hi] with 0 <= lo <= hi, got {list(brightness)}")
    if augment.fill_mode not in FILL_MODES:
        raise ConfigError(f"augment.fill_mode must be one of {', '.join(FILL_MODES)}, got {augment.fill_mode!r}")


def _check_cache(cache: Any) -> None:
    from dermascan.data.cache import METHODS

    if cache.method not in METHODS:
        raise ConfigError(f"data.cache.method must be one of {', '.join(METHODS)}, got {cache.method!r}")
    if not 32 <= cache.size <= 4096:
        raise ConfigError(f"data.cache.size must be in [32, 4096], got {cache.size}")
    if not 1 <= cache.quality <= 100:
        raise ConfigError(f"data.cache.quality must be in [1, 100], got {cache.quality}")


CHECKS = {"data": _check_data, "augment": _check_augment}


def validate(cfg: DictConfig, schema: type) -> DictConfig:
    """Return ``cfg`` merged onto ``schema``; raise ConfigError naming the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"invalid config at '{key}': {msg}") from None
    OmegaConf.set_struct(merged, True)
    for name, check in CHECKS.items():
        if name in merged:
            check(merged[name])
    return merged
