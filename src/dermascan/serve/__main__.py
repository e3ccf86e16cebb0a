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
                access_log=cfg.access_log, timeout_graceful_shutdown=5,
                **server_options(cfg.header_timeout, cfg.timeout_keep_alive, cfg.limit_concurrency))


def server_options(header_timeout: float, timeout_keep_alive: float, limit_concurrency: int | None) -> dict:
    """uvicorn.Config arguments that bound what idle and slow connections hold.

    - ``header_timeout``: a connection whose request head (request line and
      headers) is not complete this many seconds after it opened, or after
      its previous response, is closed. uvicorn has no such bound: a client
      that sends nothing, or half a header, keeps its connection for good.
      (A stalled *body* is the app's: ``body_timeout``, answered 408.)
    - ``timeout_keep_alive``: an idle keep-alive connection is closed after this.
    - ``limit_concurrency``: connections plus requests in progress past which
      uvicorn answers 503 at once (null: no limit).
    """
    return {"http": header_timeout_protocol(header_timeout), "timeout_keep_alive": timeout_keep_alive,
            "limit_concurrency": limit_concurrency}


def header_timeout_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, closing a connection that has not sent a complete request head within ``seconds``."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        header_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()  # the next request's head has the same bound (the keep-alive timer stops at its first byte)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(seconds, self._expired)

        def _expired(self) -> None:
            self.header_timer = None
            waiting = self.cycle is None or self.cycle.response_complete  # no request head parsed since the timer started
            if waiting and not self.transport.is_closing():
                log.info("closing %s: no complete request head within %g s", self.client, seconds)
                self.transport.close()

    return HeaderTimeoutProtocol


@hydra.main(version_base="1.3", config_path=config_dir(), config_name="serve")
def main(cfg: DictConfig) -> None:
    cli.run(serve, cfg, ServeConfig)


if __name__ == "__main__":
    main()
