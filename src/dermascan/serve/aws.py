"""``lambda_handler``: the same app, wrapped with Mangum for API Gateway (HTTP API v2) events.

The app is created on the first invocation, from ``DERMASCAN_*`` environment
variables (``dermascan.serve.settings.from_env``), and kept for the life of
the Lambda execution environment. A bad export folder does not crash the
init: the app starts without a model and answers 503 with the reason (see
``dermascan.serve.app``). An event that is not an HTTP request, or whose
body cannot be decoded, gets a 400 JSON response rather than an unhandled
exception.
"""

from __future__ import annotations

import binascii
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from dermascan.errors import DermascanError

log = logging.getLogger("dermascan.serve.aws")

_handler: Callable[[dict, Any], dict] | None = None
_lock = threading.Lock()


def _response(status: int, code: str, detail: str) -> dict:
    return {
        "statusCode": status,
        "headers": {"content-type": "application/json"},
        "body": json.dumps({"error": code, "detail": detail}),
        "isBase64Encoded": False,
    }


def build_handler(env: dict | None = None) -> Callable[[dict, Any], dict]:
    """A Mangum handler over ``create_app(**from_env(env))``."""
    from mangum import Mangum

    from dermascan.serve.app import create_app
    from dermascan.serve.settings import from_env

    app = create_app(**from_env(env), fail_fast=False)
    return Mangum(app, lifespan="off")


def reset() -> None:
    """Forget the app, so the next invocation builds it again (tests, or after changing the environment)."""
    global _handler
    with _lock:
        _handler = None


def lambda_handler(event: Any, context: Any) -> dict:
    """The AWS Lambda entry point: ``dermascan.serve.lambda_handler``."""
    global _handler
    if _handler is None:
        with _lock:
            if _handler is None:
                try:
                    _handler = build_handler()
                except DermascanError as err:  # a bad DERMASCAN_* setting; retried on the next invocation
                    log.error("cannot start the service: %s", err)
                    return _response(503, "misconfigured", f"the service is misconfigured: {err}")
    if not isinstance(event, dict):
        return _response(400, "bad_event", f"expected an API Gateway event (a JSON object), got {type(event).__name__}")
    try:
        return _handler(event, context)
    except RuntimeError as err:
        if "unable to infer a handler" not in str(err):
            raise
        return _response(400, "bad_event", "not an API Gateway, ALB or Function URL HTTP event")
    except (KeyError, TypeError, ValueError, binascii.Error) as err:
        log.info("refused a malformed event: %s: %s", type(err).__name__, err)
        return _response(400, "bad_event", f"malformed HTTP event: {type(err).__name__}: {err}")
