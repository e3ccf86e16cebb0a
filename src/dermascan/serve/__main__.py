"""``python -m dermascan.serve export_dir=... port=... runtime=...``: the app under uvicorn."""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from dermascan import cli
from dermascan.config import ServeConfig, config_dir
from dermascan.serve.settings import app_kwargs, check

log = logging.getLogger("dermascan.serve")


def serve(cfg: DictConfig) -> None:
    """Load and verify the export (refusing a bad one when fail_fast), then run uvicorn until interrupted."""
    import uvicorn

    from dermascan.serve.app import create_app

    check(cfg)
    app = create_app(**app_kwargs(cfg), fail_fast=cfg.fail_fast)
    log.info("serving %s on http://%s:%d (docs at /docs)", cfg.export_dir, cfg.host, cfg.port)
    # log_config=None: keep Hydra's logging set-up; uvicorn's loggers propagate to it.
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_config=None, log_level=cfg.log_level.lower(),
                access_log=cfg.access_log, timeout_graceful_shutdown=5)


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="serve")
def main(cfg: DictConfig) -> None:
    cli.run(serve, cfg, ServeConfig)


if __name__ == "__main__":
    main()
