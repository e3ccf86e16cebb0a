"""Every config schema, its validation, and where the Hydra config tree is.

One source of values: the YAML files in ``configs/`` hold every default (with
the comments a user reads), and the dataclasses here hold only the keys and
types, every field MISSING. The YAML is the source because it is what users
read, override and find in a run's ``.hydra/config.yaml``; a default written
here as well would drift from it (it did: ``rotation_range`` was 0 here and
180 there). ``tests/test_config.py`` fails if a schema field gets a default
of its own, or if a YAML key has no schema field.

``validate`` merges a composed config onto its schema, so an unknown key, a
wrong type or a value outside a choice (the StrEnums below, each defined only
here) fails at start-up with a message that names it, not an hour into
training. ``rundir`` loads a finished run's saved config through the same
``validate``, so old and new configs hold the same types.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
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


def _composed(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The YAML of a primary config, composed by Hydra but neither resolved nor validated."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():  # inside a @hydra.main app: its config tree is this one
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    else:
        where = config_dir()
        init = (
            initialize_config_module(where.removeprefix("pkg://"), version_base="1.3")
            if where.startswith("pkg://")
            else initialize_config_dir(where, version_base="1.3")
        )
        with init:
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    cfg.pop("hydra", None)
    return cfg


def compose(
    config_name: str, schema: type, overrides: Sequence[str] = (), values: Optional[Mapping[str, Any]] = None
) -> DictConfig:
    """A primary config (``train``, ``serve``, ...) composed from the YAML and validated, without ``@hydra.main``.

    For code that runs outside a Hydra app, such as the Lambda handler, and
    for tests: the values are the YAML's, the one source of defaults.
    ``overrides`` are Hydra's command-line overrides; ``values`` are merged
    over the result as they are (no override grammar to escape).
    """
    cfg = _composed(config_name, overrides)
    if values:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(dict(values)))
    return validate(cfg, schema)


def load_saved_run_config(path: Path) -> tuple[DictConfig, list[str]]:
    """A training run's saved ``config.yaml``, validated as a fresh one is; and the keys it lacked.

    A run saved before a key existed gets that key's value from the base
    groups' YAML (``configs/train.yaml`` without an experiment, so "off" for
    a new feature); the second return value names those keys, so the caller
    can say so.
    """
    saved = OmegaConf.load(path)
    base = _composed("train", ["~experiment"])
    absent = object()
    migrated = []
    bar = OmegaConf.select(saved, "export.min_agreement")
    if isinstance(bar, (int, float)):  # saved before the bar was per TFLite kind: it was one bar for all
        saved.export.min_agreement = {kind: bar for kind in base.export.min_agreement}
        migrated.append(f"export.min_agreement (its one bar, {bar}, is now each TFLite kind's)")
    filled = sorted(k for k in _leaf_keys(base) if OmegaConf.select(saved, k, default=absent) is absent) + migrated
    return validate(OmegaConf.merge(base, saved), RunConfig), filled


def _leaf_keys(cfg: Any, prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in (cfg.items_ex(resolve=False) if isinstance(cfg, DictConfig) else []):
        name = f"{prefix}{key}"
        keys |= _leaf_keys(value, name + ".") if isinstance(value, DictConfig) else {name}
    return keys


class Release(StrEnum):
    isic2018_train = "isic2018_train"
    isic2018_val = "isic2018_val"
    isic2018_test = "isic2018_test"
    isic2019_train = "isic2019_train"


class AkiecPolicy(StrEnum):
    drop = "drop"
    ak = "ak"


class MissingPolicy(StrEnum):
    error = "error"
    skip = "skip"


class VerifyMode(StrEnum):
    header = "header"
    decode = "decode"


class SplitPolicy(StrEnum):
    grouped = "grouped"
    official = "official"
    kfold = "kfold"


class ResizeMethod(StrEnum):
    """How images are brought to the model's size (PIL's filters; ``area`` is PIL's BOX)."""

    nearest = "nearest"
    bilinear = "bilinear"
    bicubic = "bicubic"
    lanczos = "lanczos"
    area = "area"


class BackboneName(StrEnum):
    """The backbones ``dermascan.modeling.model.BACKBONES`` builds (one entry there per name here)."""

    mobilenet_v2 = "mobilenet_v2"
    efficientnet_b0 = "efficientnet_b0"
    mobilenet_v3_small = "mobilenet_v3_small"


class Engine(StrEnum):
    fast = "fast"
    legacy = "legacy"


class AugmentDevice(StrEnum):
    auto = "auto"
    cpu = "cpu"
    accelerator = "accelerator"


class FillMode(StrEnum):
    constant = "constant"
    nearest = "nearest"
    reflect = "reflect"
    wrap = "wrap"


class ColorConstancy(StrEnum):
    none = "none"
    shades_of_gray = "shades_of_gray"


class ClassWeight(StrEnum):
    balanced = "balanced"  # scikit-learn's compute_class_weight("balanced")
    none = "none"


class Sampler(StrEnum):
    shuffle = "shuffle"
    balanced = "balanced"  # each class drawn with equal probability


class MonitorMode(StrEnum):
    min = "min"
    max = "max"


class Precision(StrEnum):
    auto = "auto"
    float32 = "float32"
    mixed_float16 = "mixed_float16"
    mixed_bfloat16 = "mixed_bfloat16"


class Strategy(StrEnum):
    auto = "auto"
    none = "none"
    mirrored = "mirrored"


class Split(StrEnum):
    train = "train"
    val = "val"
    test = "test"


class Tta(StrEnum):
    none = "none"
    flips = "flips"
    flips_rot90 = "flips_rot90"


class TfliteKind(StrEnum):
    fp32 = "fp32"
    fp16 = "fp16"
    int8_dynamic = "int8_dynamic"
    int8_full = "int8_full"


class Runtime(StrEnum):
    savedmodel = "savedmodel"
    tflite = "tflite"
    keras = "keras"


# Every value comes from the YAML (see the module docstring): a field here is
# MISSING unless the YAML sets it, and tests/test_config.py fails if a schema
# ever carries a default of its own.


@dataclass
class AugmentConfig:
    engine: Engine = MISSING
    device: AugmentDevice = MISSING
    rotation_range: float = MISSING
    width_shift_range: float = MISSING
    height_shift_range: float = MISSING
    zoom_range: Any = MISSING  # a float z ([1 - z, 1 + z]) or a [lo, hi] pair
    shear_range: float = MISSING
    horizontal_flip: bool = MISSING
    vertical_flip: bool = MISSING
    brightness_range: Optional[list[float]] = MISSING
    fill_mode: FillMode = MISSING
    cval: float = MISSING


@dataclass
class PathsConfig:
    data_dir: str = MISSING
    runs_dir: str = MISSING


@dataclass
class DemoConfig:
    images_per_class: int = MISSING
    seed: int = MISSING
    min_side: int = MISSING
    max_side: int = MISSING
    isic2018_share: float = MISSING


@dataclass
class CacheConfig:
    dir: str = MISSING
    size: int = MISSING  # evaluate_run: 0 means the model's input size
    method: ResizeMethod = MISSING
    quality: int = MISSING
    workers: int = MISSING


@dataclass
class DataConfig:
    name: str = MISSING
    root: str = MISSING
    processed_dir: str = MISSING
    releases: list[Release] = MISSING
    akiec: AkiecPolicy = MISSING
    missing: MissingPolicy = MISSING
    verify: VerifyMode = MISSING
    split: SplitPolicy = MISSING
    val_fraction: float = MISSING
    test_fraction: float = MISSING
    folds: int = MISSING  # kfold: how many folds train+val is cut into
    fold: int = MISSING  # kfold: which fold is val (0 .. folds-1)
    seed: int = MISSING
    workers: int = MISSING
    cache: CacheConfig = field(default_factory=CacheConfig)
    demo: Optional[DemoConfig] = MISSING  # null for real data


@dataclass
class IngestConfig:
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)


@dataclass
class HeadConfig:
    units: list[int] = MISSING
    dropout: list[float] = MISSING


@dataclass
class ModelConfig:
    backbone: BackboneName = MISSING
    alpha: float = MISSING
    image_size: int = MISSING
    weights: Optional[str] = MISSING  # imagenet, null, or a local weights file
    freeze_bn: Optional[bool] = MISSING  # null: true with pretrained weights, false from scratch
    bn_momentum: Optional[float] = MISSING
    color_constancy: ColorConstancy = MISSING
    sog_power: float = MISSING  # the Minkowski norm's p for shades_of_gray
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class Phase1Config:
    epochs: int = MISSING
    lr: float = MISSING


@dataclass
class Phase2Config:
    epochs: int = MISSING
    lr: float = MISSING
    warmup_epochs: int = MISSING
    min_lr_fraction: float = MISSING  # CosineDecay alpha
    unfreeze_from: Any = MISSING  # null (all), a layer index, or a layer name
    freeze_head_bn: Optional[bool] = MISSING  # the head's BatchNorm in inference mode; null: as model.freeze_bn


@dataclass
class TrainConfig:
    batch_size: int = MISSING  # per replica; the global batch is this times the replicas
    phase1: Phase1Config = field(default_factory=Phase1Config)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    label_smoothing: float = MISSING
    logit_adjustment: float = MISSING  # tau: the loss adds tau * log(training class prior) to the logits; 0: off
    class_weight: ClassWeight = MISSING
    sampler: Sampler = MISSING
    sampler_power: float = MISSING  # balanced: class c drawn ∝ n_c ** power (0: equally)
    mixup_alpha: float = MISSING  # mixup's Beta(alpha, alpha) on the train batches; 0: off
    clipnorm: Optional[float] = MISSING  # Adam's per-variable gradient norm clipping; null: none
    weight_decay: float = MISSING  # Adam's decoupled weight decay (AdamW); 0: none
    ema_momentum: Optional[float] = MISSING  # phase 2 validates and checkpoints an EMA of the weights; null: off
    collapse_share: float = MISSING  # a phase whose val predictions put this share on one class has collapsed
    monitor: str = MISSING
    monitor_mode: MonitorMode = MISSING
    patience: int = MISSING
    precision: Precision = MISSING
    jit_compile: Any = MISSING  # auto, true or false
    strategy: Strategy = MISSING
    devices: Optional[list[str]] = MISSING  # for mirrored: e.g. [/cpu:0, /cpu:1]
    deterministic: bool = MISSING
    shuffle_buffer: int = MISSING
    steps_per_epoch: Optional[int] = MISSING  # null: the whole train split each epoch
    verbose: int = MISSING


@dataclass
class ReferralConfig:
    classes: Optional[list[str]] = MISSING  # codes summed by the referral score; null: classes.REFERRAL_CODES
    target_sensitivity: float = MISSING  # the threshold is chosen on val to reach it


@dataclass
class SubgroupsConfig:
    min_images: int = MISSING  # a subgroup with fewer images is reported but flagged "small"


@dataclass
class OutOfScopeConfig:
    enabled: bool = MISSING  # fit the gate (dermascan.modeling.ood) after training, and evaluate it
    dims: int = MISSING  # k: the lowest-variance directions of the pooled features kept
    keep: float = MISSING  # share of val images the threshold keeps in scope
    max_train_images: int = MISSING  # train images the gate is fitted on, a seeded sample


@dataclass
class EvaluateConfig:
    split: Split = MISSING
    batch_size: int = MISSING
    tta: Tta = MISSING
    temperature_scaling: bool = MISSING
    min_calibration_images: int = MISSING
    bootstrap_resamples: int = MISSING
    calibration_bins: int = MISSING
    referral: ReferralConfig = field(default_factory=ReferralConfig)
    subgroups: SubgroupsConfig = field(default_factory=SubgroupsConfig)
    out_of_scope: OutOfScopeConfig = field(default_factory=OutOfScopeConfig)


@dataclass
class ExportConfig:
    enabled: bool = MISSING
    tflite: list[TfliteKind] = MISSING
    min_agreement: dict[str, float] = MISSING  # per TFLite kind; keras and savedmodel use fp32's
    max_balanced_accuracy_drop: float = MISSING
    min_decision_agreement: float = MISSING
    bootstrap_resamples: int = MISSING
    int8_float_ops: list[str] = MISSING  # TFLite op types int8_full keeps in float
    int8_float_layers: list[str] = MISSING  # Keras layer names int8_full keeps in float
    parity_samples: Optional[int] = MISSING  # null: the whole split
    parity_split: Split = MISSING
    representative_samples: int = MISSING
    latency_runs: int = MISSING
    coreml: bool = MISSING


@dataclass
class TrackingConfig:
    enabled: bool = MISSING
    uri: str = MISSING
    experiment: str = MISSING
    artifact_location: Optional[str] = MISSING
    run_name: Optional[str] = MISSING
    log_model: bool = MISSING
    register: bool = MISSING
    model_name: str = MISSING
    timeout_s: int = MISSING


@dataclass
class RunConfig:
    """``python -m dermascan.train``: every stage's group, plus the run's own keys (``configs/train.yaml``)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    seed: int = MISSING
    run_dir: str = MISSING


@dataclass
class ExportRunConfig:
    """``python -m dermascan.export run_dir=...`` (``configs/export_run.yaml``)."""

    run_dir: str = MISSING
    out_dir: Optional[str] = MISSING  # null: <run_dir>/export
    log_to_mlflow: bool = MISSING
    export: ExportConfig = field(default_factory=ExportConfig)


@dataclass
class SweepRunConfig:
    """``python -m dermascan.sweep sweep_dir=...`` (``configs/sweep.yaml``)."""

    sweep_dir: str = MISSING
    log_to_mlflow: bool = MISSING


@dataclass
class EnsembleConfig:
    """``python -m dermascan.ensemble`` (``configs/ensemble.yaml``).

    ``evaluate``, ``export`` and ``tracking`` are here so that their
    overrides are checked; their values are the first member's, with the
    command line's overrides over them (``ensemble_config``).
    """

    paths: PathsConfig = field(default_factory=PathsConfig)
    run_dirs: list[str] = MISSING
    sweep_dir: Optional[str] = MISSING
    out_dir: str = MISSING
    log_to_mlflow: bool = MISSING
    seed: Optional[int] = MISSING  # null: the first member's
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)


@dataclass
class EvaluateRunConfig:
    """``python -m dermascan.evaluate run_dir=...`` (or export_dir=... manifest=...) (``configs/evaluate_run.yaml``)."""

    run_dir: Optional[str] = MISSING
    export_dir: Optional[str] = MISSING
    manifest: Optional[str] = MISSING
    out_dir: Optional[str] = MISSING  # null: <run_dir>/eval/<split>_tta-<tta>
    cache: CacheConfig = field(default_factory=CacheConfig)  # size 0: the model's input size
    isic2018: bool = MISSING  # export_dir mode: also score ISIC 2018 Test images in the 2018 scheme
    log_to_mlflow: bool = MISSING
    new_mlflow_run: bool = MISSING
    seed: Optional[int] = MISSING  # null: the run's seed (bootstrap CIs)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


@dataclass
class DownloadSettings:
    base_url: str = MISSING
    dest: str = MISSING
    releases: list[Release] = MISSING
    files: dict[str, list[str]] = MISSING  # release -> paths relative to base_url
    sha256: dict[str, Optional[str]] = MISSING
    sizes: dict[str, Optional[int]] = MISSING
    timeout_s: float = MISSING
    retries: int = MISSING
    backoff_s: float = MISSING
    chunk_bytes: int = MISSING
    keep_archives: bool = MISSING
    progress: bool = MISSING


@dataclass
class DownloadConfig:
    """``python -m dermascan.download`` (``configs/download.yaml``)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    download: DownloadSettings = field(default_factory=DownloadSettings)


@dataclass
class ServeConfig:
    """``python -m dermascan.serve`` (``configs/serve.yaml``; on Lambda, DERMASCAN_* variables over it)."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    export_dir: str = MISSING
    runtime: Runtime = MISSING
    tflite: TfliteKind = MISSING
    host: str = MISSING
    port: int = MISSING
    max_upload_bytes: int = MISSING
    max_pixels: int = MISSING
    draft_factor: int = MISSING
    num_threads: Optional[int] = MISSING
    max_decoders: Optional[int] = MISSING  # uploads decoded at once; null: one per CPU
    max_jpeg_scans: int = MISSING  # JPEGs with more scans are refused before decoding
    header_timeout: float = MISSING  # seconds to send a complete request head
    body_timeout: float = MISSING  # seconds without any part of the body -> 408
    timeout_keep_alive: float = MISSING  # seconds an idle keep-alive connection stays open
    limit_concurrency: Optional[int] = MISSING  # connections + requests past which uvicorn answers 503; null: no limit
    fail_fast: bool = MISSING  # refuse to start on a bad export; false: start and answer 503
    log_level: str = MISSING
    access_log: bool = MISSING


@dataclass
class PredictConfig:
    """``python -m dermascan.predict export_dir=... images=... out=...`` (``configs/predict.yaml``).

    Value checks: ``dermascan.predict.check`` (top-level keys, as serve's).
    """

    export_dir: str = MISSING
    images: str = MISSING  # a folder (recursive), a CSV with an 'image' column, or one image
    image_dir: Optional[str] = MISSING  # where a CSV's ids are looked up; null: the CSV's folder
    out: str = MISSING
    failures: Optional[str] = MISSING  # the unreadable-images report; null: <out stem>_failures.csv next to out
    runtime: Runtime = MISSING
    tflite: TfliteKind = MISSING
    batch_size: int = MISSING
    workers: int = MISSING  # decoding threads
    num_threads: Optional[int] = MISSING  # TFLite threads; null: the runtime's default
    unk: bool = MISSING  # the UNK column from the gate's score; false: the 8-class layout
    unk_scale: float = MISSING  # UNK = sigmoid((score - threshold) / (unk_scale * threshold))
    max_file_bytes: int = MISSING
    max_pixels: int = MISSING
    draft_factor: int = MISSING
    max_jpeg_scans: int = MISSING
    progress: bool = MISSING  # a progress bar; false: a log line every log_every images
    log_every: int = MISSING


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
    if data.split == SplitPolicy.grouped and data.val_fraction == 0:
        raise ConfigError(
            "data.val_fraction=0 with data.split=grouped leaves no val split, and early stopping, the best "
            "checkpoint and the temperature all need one: set data.val_fraction > 0 (the default is 0.15)"
        )
    if data.split == SplitPolicy.kfold:
        if data.folds < 2:
            raise ConfigError(f"data.folds must be >= 2 with data.split=kfold, got {data.folds}")
        if not 0 <= data.fold < data.folds:
            raise ConfigError(
                f"data.fold must be in 0 .. {data.folds - 1} (data.folds={data.folds}), got {data.fold}"
            )
    _check_seed("data.seed", data.seed)
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


def _check_cache(cache: Any) -> None:
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
    for phase in ("phase1", "phase2"):
        if not train[phase].lr > 0:
            raise ConfigError(f"train.{phase}.lr must be > 0, got {train[phase].lr}")
    if train.phase2.warmup_epochs > train.phase2.epochs:
        raise ConfigError(
            f"train.phase2.warmup_epochs ({train.phase2.warmup_epochs}) exceeds train.phase2.epochs ({train.phase2.epochs})"
        )
    if train.sampler == "balanced" and train.class_weight != "none":
        raise ConfigError(
            "train.sampler=balanced already draws the classes equally; with train.class_weight=balanced the rare "
            "classes would be weighted twice. Set train.class_weight=none."
        )
    if train.sampler_power < 0 or train.logit_adjustment < 0:
        raise ConfigError(
            f"train.sampler_power and train.logit_adjustment must be >= 0, got {train.sampler_power} and "
            f"{train.logit_adjustment}"
        )
    if train.mixup_alpha < 0:
        raise ConfigError(f"train.mixup_alpha must be >= 0 (0: off), got {train.mixup_alpha}")
    if train.sampler_power > 0 and train.sampler != "balanced":
        raise ConfigError("train.sampler_power shapes the balanced sampler: set train.sampler=balanced too")
    if train.logit_adjustment > 0 and train.class_weight != "none":
        raise ConfigError(
            "train.logit_adjustment already corrects the loss for the training class prior; with "
            "train.class_weight=balanced the rare classes would be favoured twice. Set train.class_weight=none."
        )
    if train.clipnorm is not None and train.clipnorm <= 0:
        raise ConfigError(f"train.clipnorm must be null or > 0, got {train.clipnorm}")
    if train.weight_decay < 0:
        raise ConfigError(f"train.weight_decay must be >= 0, got {train.weight_decay}")
    if train.ema_momentum is not None and not 0.0 < train.ema_momentum < 1.0:
        raise ConfigError(f"train.ema_momentum must be null or in (0, 1), got {train.ema_momentum}")
    if not 0.0 < train.collapse_share <= 1.0:
        raise ConfigError(f"train.collapse_share must be in (0, 1], got {train.collapse_share}")
    if train.batch_size < 1:
        raise ConfigError(f"train.batch_size must be >= 1, got {train.batch_size}")
    if train.jit_compile not in ("auto", True, False):
        raise ConfigError(f"train.jit_compile must be auto, true or false, got {train.jit_compile!r}")
    unfreeze_from = train.phase2.unfreeze_from
    if unfreeze_from is not None and not isinstance(unfreeze_from, (int, str)):
        raise ConfigError(f"train.phase2.unfreeze_from must be null, a layer index or a layer name, got {unfreeze_from!r}")


def _check_model(model: Any) -> None:
    if len(model.head.units) != len(model.head.dropout):
        raise ConfigError(
            f"model.head.units and model.head.dropout must have the same length, got "
            f"{list(model.head.units)} and {list(model.head.dropout)}"
        )
    if any(not 0 <= rate < 1 for rate in model.head.dropout):
        raise ConfigError(f"model.head.dropout rates must be in [0, 1), got {list(model.head.dropout)}")
    if model.sog_power < 1:
        raise ConfigError(f"model.sog_power must be >= 1, got {model.sog_power}")
    if not 32 <= model.image_size <= MAX_IMAGE_SIZE:
        raise ConfigError(f"model.image_size must be in [32, {MAX_IMAGE_SIZE}], got {model.image_size}")
    if model.alpha <= 0:
        raise ConfigError(f"model.alpha (the width multiplier) must be > 0, got {model.alpha}")
    alphas = IMAGENET_ALPHAS.get(model.backbone)
    if model.weights == "imagenet" and alphas is not None and model.alpha not in alphas:
        raise ConfigError(
            f"model.alpha={model.alpha}: Keras has ImageNet weights for {model.backbone} only at alpha "
            f"{', '.join(map(str, alphas))}; pick one, or train from scratch with model.weights=null"
        )


# The width multipliers keras.applications has ImageNet weights for (a backbone not listed takes no alpha).
IMAGENET_ALPHAS: dict[str, tuple[float, ...]] = {
    BackboneName.mobilenet_v2: (0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
    BackboneName.mobilenet_v3_small: (0.75, 1.0),
}
# Above this the activations of one batch no longer fit a GPU, and no ISIC image needs it.
MAX_IMAGE_SIZE = 1024


def _check_seed(key: str, seed: Any) -> None:
    if seed is not None and not 0 <= seed < 2**32:
        raise ConfigError(f"{key} must be in [0, 2**32) (numpy's seed range), got {seed}")


def _check_evaluate(evaluate: Any) -> None:
    if evaluate.bootstrap_resamples < 0 or evaluate.calibration_bins < 1 or evaluate.batch_size < 1:
        raise ConfigError("evaluate.bootstrap_resamples must be >= 0, calibration_bins and batch_size >= 1")
    # Imported here, not at the top: this module stays free of numpy for the serving path's configs.
    from dermascan.evaluation.referral import check_target, referral_codes

    referral_codes(evaluate.referral.classes)
    check_target(evaluate.referral.target_sensitivity)
    if evaluate.subgroups.min_images < 1:
        raise ConfigError(f"evaluate.subgroups.min_images must be >= 1, got {evaluate.subgroups.min_images}")
    gate = evaluate.out_of_scope
    if not 0.0 < gate.keep < 1.0:
        raise ConfigError(f"evaluate.out_of_scope.keep must be in (0, 1), got {gate.keep}")
    if gate.dims < 1 or gate.max_train_images < 2:
        raise ConfigError(
            f"evaluate.out_of_scope.dims must be >= 1 and max_train_images >= 2, got {gate.dims} and {gate.max_train_images}")


def _check_export(export: Any) -> None:
    unknown = sorted(set(export.min_agreement) - set(TfliteKind))
    if unknown or "fp32" not in export.min_agreement:
        raise ConfigError(
            f"export.min_agreement needs an fp32 entry and takes only TFLite kinds ({', '.join(TfliteKind)}); "
            f"got {dict(export.min_agreement)}"
        )
    for key in ("max_balanced_accuracy_drop", "min_decision_agreement"):
        if not 0.0 <= export[key] <= 1.0:
            raise ConfigError(f"export.{key} must be in [0, 1], got {export[key]}")
    bad = {kind: value for kind, value in export.min_agreement.items() if not 0.0 <= value <= 1.0}
    if bad:
        raise ConfigError(f"export.min_agreement must be in [0, 1], got {bad}")
    if export.bootstrap_resamples < 1:
        raise ConfigError(f"export.bootstrap_resamples must be >= 1, got {export.bootstrap_resamples}")
    if export.parity_samples is not None and export.parity_samples < 1:
        raise ConfigError(f"export.parity_samples must be null or >= 1, got {export.parity_samples}")


CHECKS = {"evaluate": _check_evaluate, "export": _check_export, "data": _check_data, "augment": _check_augment, "train": _check_train, "model": _check_model}


# Why a setting that existed is gone, added to the error of a config that still uses it.
REMOVED = {
    "train.strategy": (
        ". (train.strategy=multi_worker was removed: Keras 3's Model.fit cannot train under "
        "MultiWorkerMirroredStrategy across workers (keras-team/keras#20585). Use mirrored on one multi-GPU "
        "node, and the Hydra launchers for many runs at once: README, 'Scaling out'.)"
    ),
}


def validate(cfg: DictConfig, schema: type) -> DictConfig:
    """Return ``cfg`` merged onto ``schema``; raise ConfigError naming the bad key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), cfg)
        OmegaConf.resolve(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        msg = str(err).splitlines()[0]
        raise ConfigError(f"invalid config at '{key}': {msg}{REMOVED.get(key, '')}") from None
    missing = sorted(OmegaConf.missing_keys(merged))
    if missing:
        raise ConfigError(
            f"missing config value(s): {', '.join(missing)}; set them on the command line, e.g. {missing[0]}=..."
        )
    OmegaConf.set_struct(merged, True)
    for name, check in CHECKS.items():
        if name in merged:
            check(merged[name])
    if "seed" in merged:
        _check_seed("seed", merged.seed)
    return merged
