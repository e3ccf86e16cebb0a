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


@dataclass
class HeadConfig:
    units: list[int] = field(default_factory=lambda: [512, 256])
    dropout: list[float] = field(default_factory=lambda: [0.4, 0.3])


@dataclass
class ModelConfig:
    backbone: str = "mobilenet_v2"
    alpha: float = 1.0
    image_size: int = 224
    weights: Optional[str] = "imagenet"  # imagenet, null, or a local weights file
    freeze_bn: Optional[bool] = None  # null: true with pretrained weights, false from scratch
    bn_momentum: Optional[float] = None
    color_constancy: str = "none"  # none or shades_of_gray (dermascan.color)
    sog_power: float = 6.0  # the Minkowski norm's p for shades_of_gray
    head: HeadConfig = field(default_factory=HeadConfig)


class Precision(str, Enum):
    auto = "auto"
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


class Strategy(str, Enum):
    auto = "auto"
    none = "none"
    mirrored = "mirrored"
    multi_worker = "multi_worker"


@dataclass
class Phase1Config:
    epochs: int = 5
    lr: float = 1e-3


@dataclass
class Phase2Config:
    epochs: int = 25
    lr: float = 1e-4
    warmup_epochs: int = 1
    min_lr_fraction: float = 0.0  # CosineDecay alpha
    unfreeze_from: Any = None  # null (all), a layer index, or a layer name
    freeze_head_bn: Optional[bool] = None  # the head's BatchNorm in inference mode; null: as model.freeze_bn


@dataclass
class TrainConfig:
    batch_size: int = 32  # per replica; the global batch is this times the replicas
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    label_smoothing: float = 0.0
    class_weight: str = "balanced"
    sampler: str = "shuffle"  # shuffle, or balanced (each batch draws the classes equally)
    clipnorm: Optional[float] = None  # Adam's per-variable gradient norm clipping; null: none
    collapse_share: float = 0.95  # a phase whose val predictions put this share on one class has collapsed
    monitor: str = "val_balanced_accuracy"
    monitor_mode: str = "max"
    patience: int = 5
    precision: Precision = Precision.auto
    jit_compile: Any = "auto"
    strategy: Strategy = Strategy.auto
    devices: Optional[list[str]] = None  # for mirrored: e.g. [/cpu:0, /cpu:1]
    deterministic: bool = False
    shuffle_buffer: int = 4096
    steps_per_epoch: Optional[int] = None  # null: the whole train split each epoch
    verbose: int = 2


class Tta(str, Enum):
    none = "none"
    flips = "flips"
    flips_rot90 = "flips_rot90"


@dataclass
class EvaluateConfig:
    split: str = "test"
    batch_size: int = 64
    tta: Tta = Tta.none
    temperature_scaling: bool = True
    min_calibration_images: int = 50
    bootstrap_resamples: int = 1000
    calibration_bins: int = 15


@dataclass
class ExportConfig:
    enabled: bool = True
    tflite: list[str] = field(default_factory=lambda: ["fp32", "fp16", "int8_dynamic", "int8_full"])
    min_agreement: float = 0.99
    parity_samples: Optional[int] = 500  # null: the whole split
    parity_split: str = "test"
    representative_samples: int = 200
    latency_runs: int = 50
    coreml: bool = False


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///runs/mlflow.db"
    experiment: str = "dermascan"
    artifact_location: Optional[str] = None
    run_name: Optional[str] = None
    log_model: bool = True
    register: bool = False
    model_name: str = "dermascan"
    timeout_s: int = 10


@dataclass
class RunConfig:
    """``python -m dermascan.train``: every stage's group, plus the run's own keys."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig())
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = 42
    run_dir: str = "???"


@dataclass
class ExportRunConfig:
    """``python -m dermascan.export run_dir=...``."""

    run_dir: str = "???"
    out_dir: Optional[str] = None  # null: <run_dir>/export
    log_to_mlflow: bool = True
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class EvaluateRunConfig:
    """``python -m dermascan.evaluate run_dir=...`` (or export_dir=... manifest=...)."""

    run_dir: Optional[str] = None
    export_dir: Optional[str] = None
    manifest: Optional[str] = None
    out_dir: Optional[str] = None  # null: <run_dir>/eval/<split>_tta-<tta>
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(size=0))  # size 0: the model's input size
    isic2018: bool = False  # export_dir mode: also score ISIC 2018 Test images in the 2018 scheme
    log_to_mlflow: bool = True
    new_mlflow_run: bool = False
    seed: Optional[int] = None  # null: the run's seed (bootstrap CIs)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


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


def _check_train(train: Any) -> None:
    if train.phase1.epochs < 0 or train.phase2.epochs < 0 or train.phase1.epochs + train.phase2.epochs < 1:
        raise ConfigError(
            f"train.phase1.epochs and train.phase2.epochs must be >= 0 and train at least one epoch, "
            f"got {train.phase1.epochs} and {train.phase2.epochs}"
        )
    if train.phase2.warmup_epochs > train.phase2.epochs:
        raise ConfigError(
            f"train.phase2.warmup_epochs ({train.phase2.warmup_epochs}) exceeds train.phase2.epochs ({train.phase2.epochs})"
        )
    if train.class_weight not in ("balanced", "none"):
        raise ConfigError(f"train.class_weight must be balanced or none, got {train.class_weight!r}")
    if train.sampler not in ("shuffle", "balanced"):
        raise ConfigError(f"train.sampler must be shuffle or balanced, got {train.sampler!r}")
    if train.sampler == "balanced" and train.class_weight != "none":
        raise ConfigError(
            "train.sampler=balanced already draws the classes equally; with train.class_weight=balanced the rare "
            "classes would be weighted twice. Set train.class_weight=none."
        )
    if train.clipnorm is not None and train.clipnorm <= 0:
        raise ConfigError(f"train.clipnorm must be null or > 0, got {train.clipnorm}")
    if not 0.0 < train.collapse_share <= 1.0:
        raise ConfigError(f"train.collapse_share must be in (0, 1], got {train.collapse_share}")
    if train.monitor_mode not in ("min", "max"):
        raise ConfigError(f"train.monitor_mode must be min or max, got {train.monitor_mode!r}")
    if train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {train.batch_size}")
    if train.jit_compile not in ("auto", True, False):
        raise ConfigError(f"train.jit_compile must be auto, true or false, got {train.jit_compile!r}")
    unfreeze_from = train.phase2.unfreeze_from
    if unfreeze_from is not None and not isinstance(unfreeze_from, (int, str)):
        raise ConfigError(f"train.phase2.unfreeze_from must be null, a layer index or a layer name, got {unfreeze_from!r}")


def _check_model(model: Any) -> None:
    from dermascan.model import BACKBONES

    if model.backbone not in BACKBONES:
        raise ConfigError(f"model.backbone must be one of {', '.join(BACKBONES)}, got {model.backbone!r}")
    if len(model.head.units) != len(model.head.dropout):
        raise ConfigError(
            f"model.head.units and model.head.dropout must have the same length, got "
            f"{list(model.head.units)} and {list(model.head.dropout)}"
        )
    if any(not 0 <= rate < 1 for rate in model.head.dropout):
        raise ConfigError(f"model.head.dropout rates must be in [0, 1), got {list(model.head.dropout)}")
    from dermascan.color import COLOR_CONSTANCY

    if model.color_constancy not in COLOR_CONSTANCY:
        raise ConfigError(f"model.color_constancy must be one of {', '.join(COLOR_CONSTANCY)}, got {model.color_constancy!r}")
    if model.sog_power < 1:
        raise ConfigError(f"model.sog_power must be >= 1, got {model.sog_power}")
    if model.image_size < 32:
        raise ConfigError(f"model.image_size must be >= 32, got {model.image_size}")


def _check_evaluate(evaluate: Any) -> None:
    if evaluate.split not in ("train", "val", "test"):
        raise ConfigError(f"evaluate.split must be train, val or test, got {evaluate.split!r}")
    if evaluate.bootstrap_resamples < 0 or evaluate.calibration_bins < 1 or evaluate.batch_size < 1:
        raise ConfigError("evaluate.bootstrap_resamples must be >= 0, calibration_bins and batch_size >= 1")


def _check_export(export: Any) -> None:
    from dermascan.runtime import TFLITE_KINDS

    unknown = [kind for kind in export.tflite if kind not in TFLITE_KINDS]
    if unknown:
        raise ConfigError(f"export.tflite: unknown kind(s) {unknown}; choose from {', '.join(TFLITE_KINDS)}")
    if not 0.0 <= export.min_agreement <= 1.0:
        raise ConfigError(f"export.min_agreement must be in [0, 1], got {export.min_agreement}")
    if export.parity_samples is not None and export.parity_samples < 1:
        raise ConfigError(f"export.parity_samples must be null or >= 1, got {export.parity_samples}")


CHECKS = {"evaluate": _check_evaluate, "export": _check_export, "data": _check_data, "augment": _check_augment, "train": _check_train, "model": _check_model}


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
