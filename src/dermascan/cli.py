"""What every ``python -m dermascan.<stage>`` entry point shares."""

from __future__ import annotations

import logging
from typing import Any, Callable

from omegaconf import DictConfig

from dermascan.config import validate
from dermascan.errors import DermascanError

log = logging.getLogger("dermascan")


def run(task: Callable[[DictConfig], Any], cfg: DictConfig, schema: type) -> Any:
    """Validate ``cfg`` against ``schema`` and run ``task``.

    A DermascanError (bad config, bad data, failed download) ends the process
    with its message and exit status 2, not a traceback.
    """
    try:
        return task(validate(cfg, schema))
    except DermascanError as err:
        log.error("%s: %s", type(err).__name__, err)
        raise SystemExit(2) from None
