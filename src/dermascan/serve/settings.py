"""The service's settings: checks on ``configs/serve.yaml`` (schema: ``config.ServeConfig``) and the Lambda environment.

    python -m dermascan.serve export_dir=runs/train/<ts>/export port=8000 runtime=tflite

On Lambda there is no command line; ``from_env`` reads the same settings
(defaults: ``configs/serve.yaml``) from environment variables:

    DERMASCAN_EXPORT_DIR         the export folder (default: export, relative to the working directory)
    DERMASCAN_RUNTIME            tflite, savedmodel or keras
    DERMASCAN_TFLITE             fp32, fp16, int8_dynamic or int8_full
    DERMASCAN_MAX_UPLOAD_BYTES   largest accepted upload, in bytes
    DERMASCAN_MAX_PIXELS         largest accepted image, in pixels
    DERMASCAN_DRAFT_FACTOR       reduced-scale JPEG decoding margin; 0 turns it off
    DERMASCAN_NUM_THREADS        TFLite interpreter threads
    DERMASCAN_MAX_DECODERS       uploads decoded at once
    DERMASCAN_MAX_JPEG_SCANS     JPEGs with more scans are refused before decoding
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from dermascan.config import ServeConfig, compose
from dermascan.errors import ConfigError

ENV_PREFIX = "DERMASCAN_"
# The Lambda's default export folder (there is no command line to give one).
LAMBDA_EXPORT_DIR = "export"


def check(cfg: Any) -> Any:
    """Value checks the schema's types cannot express; raise ConfigError naming the key."""
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
    if cfg.max_jpeg_scans < 1:
        raise ConfigError(f"max_jpeg_scans must be >= 1, got {cfg.max_jpeg_scans}")
    for key in ("header_timeout", "body_timeout", "timeout_keep_alive"):
        if not cfg[key] > 0:
            raise ConfigError(f"{key} must be > 0 seconds, got {cfg[key]}")
    if cfg.limit_concurrency is not None and cfg.limit_concurrency < 1:
        raise ConfigError(f"limit_concurrency must be null or >= 1, got {cfg.limit_concurrency}")
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
    """``create_app`` keyword arguments: ``configs/serve.yaml`` under ``DERMASCAN_*`` environment variables, checked."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {"export_dir": env.get(ENV_PREFIX + "EXPORT_DIR", "").strip() or LAMBDA_EXPORT_DIR}
    for key in ("runtime", "tflite"):
        raw = env.get(ENV_PREFIX + key.upper(), "").strip()
        if raw:
            values[key] = raw
    for key in ("max_upload_bytes", "max_pixels", "draft_factor", "num_threads", "max_decoders", "max_jpeg_scans"):
        number = _int(env, key.upper(), None)
        if number is not None:
            values[key] = number
    try:
        settings = check(compose("serve", ServeConfig, values=values))
    except ConfigError as err:  # name the variable: "runtime must be ..." -> "DERMASCAN_RUNTIME must be ..."
        raise ConfigError(_env_message(str(err))) from None
    return app_kwargs(settings)


def _env_message(message: str) -> str:
    """A config error reworded to name the environment variable a Lambda user sets."""
    bad = re.match(r"invalid config at '(\w+)': (.*)", message)
    if bad:
        return f"{ENV_PREFIX}{bad.group(1).upper()} is not valid: {bad.group(2)}"
    key, _, rest = message.partition(" ")
    return f"{ENV_PREFIX}{key.upper()} {rest}"


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
        "max_jpeg_scans": cfg.max_jpeg_scans,
        "body_timeout": cfg.body_timeout,
    }
