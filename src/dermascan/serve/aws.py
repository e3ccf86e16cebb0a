"""``lambda_handler``: the same app, wrapped with Mangum for API Gateway (HTTP API v2) events.

The app is created on the first invocation, from ``DERMASCAN_*`` environment
variables (``dermascan.serve.settings.from_env``), and kept for the life of
the Lambda execution environment. A bad export folder does not crash the
init: the app starts without a model and answers 503 with the reason (see
``dermascan.serve.app``). An event that is not an HTTP request, or whose
body cannot be decoded, gets a 400 JSON response rather than an unhandled
exception.

Mangum reads the event with ``.get``, ``.items`` and ``.encode`` and trusts
its types, so ``_checked`` looks at every field it reads first: a field that
AWS may send as null (``headers``, ``multiValueHeaders``,
``rawQueryString``, ``requestContext.identity``) is read as empty, and any
other wrong type is refused with a 400 that names the field.
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


class BadEvent(ValueError):
    """An HTTP event with a field of the wrong type; the message names the field."""


def _strings(value: Any, what: str, *, lists: bool = False) -> None:
    """Refuse unless ``value`` is null or an object of strings (or of lists of strings, when ``lists``)."""
    if value is None:
        return
    if not isinstance(value, dict):
        raise BadEvent(f"'{what}' must be a JSON object, got a JSON {_kind(value)}")
    for key, item in value.items():
        items = item if lists and isinstance(item, list) else [item]
        if (lists and not isinstance(item, list)) or not all(isinstance(i, str) for i in items):
            wanted = "a list of strings" if lists else "a string"
            raise BadEvent(f"'{what}' value {key!r} must be {wanted}, got {_kind(item)}")


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__)


def _checked(event: dict) -> dict:
    """``event`` with its null-able fields made empty, or BadEvent naming the first field Mangum cannot read."""
    event = dict(event)
    for key in ("headers", "multiValueHeaders"):
        if key in event and event[key] is None:
            # AWS sends null for "no headers" (REST API test invocations, ALB without multi-value headers);
            # Mangum's ALB handler tests for the key's presence, so drop it rather than make it {}.
            del event[key]
    _strings(event.get("headers"), "headers")
    _strings(event.get("multiValueHeaders"), "multiValueHeaders", lists=True)
    if "headers" not in event and "multiValueHeaders" not in event:
        event["headers"] = {}
    if event.get("rawQueryString") is None and "rawQueryString" in event:
        event["rawQueryString"] = ""
    for key in ("rawQueryString", "rawPath", "path", "httpMethod"):
        if key in event and not isinstance(event[key], str):
            raise BadEvent(f"'{key}' must be a string, got {_kind(event[key])}")
    for key in ("queryStringParameters", "multiValueQueryStringParameters"):
        _strings(event.get(key), key, lists=key.startswith("multi"))
    if event.get("body") is not None and not isinstance(event["body"], str):
        raise BadEvent(f"'body' must be a string or null, got {_kind(event['body'])}")
    cookies = event.get("cookies")
    if cookies is not None and not (isinstance(cookies, list) and all(isinstance(c, str) for c in cookies)):
        raise BadEvent(f"'cookies' must be a list of strings, got {_kind(cookies)}")
    context = event.get("requestContext")
    if "requestContext" in event and not isinstance(context, dict):
        raise BadEvent(f"'requestContext' must be a JSON object, got {_kind(context)}")
    if isinstance(context, dict):
        context = event["requestContext"] = dict(context)
        if "identity" in context and context["identity"] is None:
            context["identity"] = {}
        for key in ("identity", "http", "elb"):
            if key in context and not isinstance(context[key], dict):
                raise BadEvent(f"'requestContext.{key}' must be a JSON object, got {_kind(context[key])}")
        for key in ("method", "path", "sourceIp"):
            value = context.get("http", {}).get(key)
            if value is not None and not isinstance(value, str):
                raise BadEvent(f"'requestContext.http.{key}' must be a string, got {_kind(value)}")
    return event


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
                except Exception as err:  # a bug, not the export (create_app turns those into a 503 app): say so, retry
                    log.exception("cannot start the service")
                    return _response(503, "start_failed", f"the service failed to start: {type(err).__name__}: {err}")
    if not isinstance(event, dict):
        return _response(400, "bad_event", f"expected an API Gateway event (a JSON object), got {type(event).__name__}")
    try:
        return _handler(_checked(event), context)
    except BadEvent as err:
        log.info("refused a malformed event: %s", err)
        return _response(400, "bad_event", f"malformed HTTP event: {err}")
    except RuntimeError as err:
        if "unable to infer a handler" not in str(err):
            raise
        return _response(400, "bad_event", "not an API Gateway, ALB or Function URL HTTP event")
    # Mangum runs the app inside its HTTP cycle, which turns the app's own exceptions into a 500 response,
    # so what escapes it comes from reading the event: a malformed event, whatever the exception's type.
    except (AttributeError, KeyError, TypeError, ValueError, binascii.Error) as err:
        log.info("refused a malformed event: %s: %s", type(err).__name__, err)
        return _response(400, "bad_event", f"malformed HTTP event: {type(err).__name__}: {err}")
