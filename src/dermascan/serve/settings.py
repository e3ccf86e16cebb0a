"""The service's settings: the Hydra schema of ``configs/serve.yaml`` and the Lambda environment.

    python -m dermascan.serve export_dir=runs/train/<ts>/export port=8000 runtime=tflite

On Lambda there is no command line; ``from_env`` reads the same settings
from environment variables:

    DERMASCAN_EXPORT_DIR         the export folder (default: export, relative to the working directory)
    DERMASCAN_RUNTIME            tflite (default), savedmodel or keras
    DERMASCAN_TFLITE             fp32 (default), fp16, int8_dynamic or int8_full
    DERMASCAN_MAX_UPLOAD_BYTES   largest accepted upload (default 10 MiB)
    DERMASCAN_MAX_PIXELS         largest accepted image, in pixels (default 50 000 000)
    DERMASCAN_DRAFT_FACTOR       reduced-scale JPEG decoding margin; 0 turns it off (default 2)
    DERMASCAN_NUM_THREADS        TFLite interpreter threads (default: the runtime's choice)
    DERMASCAN_MAX_DECODERS       uploads decoded at once (default: one per CPU)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dermascan.config import PathsConfig
from dermascan.errors import ConfigError
from dermascan.runtime import RUNTIMES, TFLITE_KINDS
from dermascan.serve.images import DRAFT_FACTOR, MAX_PIXELS

MAX_UPLOAD_BYTES = 10 * 1024 * 1024
ENV_PREFIX = "DERMASCAN_"


@dataclass
class ServeConfig:
    """``configs/serve.yaml``: keys and types."""

    paths: PathsConfig = field(default_factory=PathsConfig)
    export_dir: str = "???"
    runtime: str = "tflite"
    tflite: str = "fp32"
    host: str = "127.0.0.1"
    port: int = 8000
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_pixels: int = MAX_PIXELS
    draft_factor: int = DRAFT_FACTOR
    num_threads: int | None = None
    max_decoders: int | None = None  # uploads decoded at once; null: one per CPU
    fail_fast: bool = True  # refuse to start on a bad export; false: start and answer 503
    log_level: str = "info"
    access_log: bool = True


def check(cfg: Any) -> Any:
    """Value checks the schema's types cannot express; raise ConfigError naming the key."""
    if cfg.runtime not in RUNTIMES:
        raise ConfigError(f"runtime must be one of {', '.join(RUNTIMES)}, got {cfg.runtime!r}")
    if cfg.tflite not in TFLITE_KINDS:
        raise ConfigError(f"tflite must be one of {', '.join(TFLITE_KINDS)}, got {cfg.tflite!r}")
    if not 0 <= cfg.port <= 65535:
        raise ConfigError(f"port must be in [0, 65535], got {cfg.port}")
    if cfg.max_upload_bytes < 1:
        raise ConfigError(f"max_upload_bytes must be >= 1, got {cfg.max_upload_bytes}")
    if cfg.max_pixels < 1:
        raise ConfigError(f"max_pixels must be >= 1, got {cfg.max_pixels}")
    if cfg.draft_factor < 0:
        raise ConfigError(f"draft_factor must be >= 0 (0 turns reduced-scale JPEG decoding off), got {cfg.draft_factor}")
    if cfg.max_decoders is not None and cfg.max_decoders < 1:
        raise ConfigError(f"max_decoders must be null or >= 1, got {cfg.max_decoders}")
    if cfg.num_threads is not None and cfg.num_threads < 1:
        raise ConfigError(f"num_threads must be null or >= 1, got {cfg.num_threads}")
    if cfg.log_level.lower() not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ConfigError(f"log_level must be critical, error, warning, info, debug or trace, got {cfg.log_level!r}")
    return cfg


def _int(env: Mapping[str, str], name: str, default: int | None) -> int | None:
    raw = env.get(ENV_PREFIX + name, "").strip()
    if not raw:
        return default
    try:
        return int(raw.replace("_", ""))
    except ValueError:
        raise ConfigError(f"{ENV_PREFIX}{name} must be an integer, got {raw!r}") from None


def from_env(env: Mapping[str, str] | None = None) -> dict:
    """``create_app`` keyword arguments from ``DERMASCAN_*`` environment variables, checked."""
    env = os.environ if env is None else env
    settings = ServeConfig(
        export_dir=env.get(ENV_PREFIX + "EXPORT_DIR", "").strip() or "export",
        runtime=env.get(ENV_PREFIX + "RUNTIME", "").strip() or "tflite",
        tflite=env.get(ENV_PREFIX + "TFLITE", "").strip() or "fp32",
        max_upload_bytes=_int(env, "MAX_UPLOAD_BYTES", MAX_UPLOAD_BYTES),
        max_pixels=_int(env, "MAX_PIXELS", MAX_PIXELS),
        draft_factor=_int(env, "DRAFT_FACTOR", DRAFT_FACTOR),
        num_threads=_int(env, "NUM_THREADS", None),
        max_decoders=_int(env, "MAX_DECODERS", None),
    )
    try:
        check(settings)
    except ConfigError as err:  # name the variable: "runtime must be ..." -> "DERMASCAN_RUNTIME must be ..."
        key, _, rest = str(err).partition(" ")
        raise ConfigError(f"{ENV_PREFIX}{key.upper()} {rest}") from None
    return app_kwargs(settings)


def app_kwargs(cfg: Any) -> dict:
    """The ``create_app`` arguments of a ServeConfig (or its validated DictConfig)."""
    return {
        "export_dir": cfg.export_dir,
        "runtime": cfg.runtime,
        "tflite": cfg.tflite,
        "max_upload_bytes": cfg.max_upload_bytes,
        "max_pixels": cfg.max_pixels,
        "draft_factor": cfg.draft_factor,
        "num_threads": cfg.num_threads,
        "max_decoders": cfg.max_decoders,
    }
