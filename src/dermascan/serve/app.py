"""The FastAPI app: ``create_app(export_dir, runtime) -> FastAPI``.

    POST /v1/predict   an image (multipart field ``file``, or a raw image/* body) -> in scope?, referral decision, ranked classes
    GET  /health       200 when the model is loaded and its manifest verified, else 503
    GET  /v1/classes   the 8 classes: code, name, lay description, category
    GET  /v1/model     what is served: versions, input, runtime, model card, parity report
    GET  /docs         OpenAPI (Swagger UI); /openapi.json

Every rejected upload is a 4xx JSON body ``{"error": <code>, "detail": <message>}``:

- a body over ``max_upload_bytes``: 413, from the Content-Length header
  before anything is read, or, for chunked bodies, as soon as the running
  count passes the limit (``BodyLimit``, a pure ASGI middleware that counts
  the bytes of every ``http.request`` message, so nothing past the limit is
  ever read);
- a body that stalls: 408 (and the connection closed) when no part of it
  arrives for ``body_timeout`` seconds (``BodyLimit`` again), so a client
  that sends half a body cannot hold a connection; a request head that
  stalls is closed by the server (``dermascan.serve.__main__``);
- no or wrong content type: 415; a multipart body without a ``file`` field,
  an empty upload, a truncated or corrupt image: 422; an image over
  ``max_pixels``: 413 from its header, a JPEG with more than
  ``max_jpeg_scans`` scans: 422 before decoding (see ``dermascan.serve.images``).

A client that closes the connection while its upload is being read is no
server error: it is logged as one info line, with no traceback.

A bad export folder (a missing file, a checksum that does not match
``MANIFEST.sha256``, a model that fails its warm-up) never serves a
prediction. With ``fail_fast=True`` (the default, and the command line's)
``create_app`` raises, so the server refuses to start and says why. With
``fail_fast=False`` (the Lambda handler's) the app starts without a model:
``/health`` and ``/v1/predict`` answer 503 with the reason, which API
Gateway clients can read, where a crashing Lambda init would only give
them an opaque 502 and retry the failing init on every request.

Decoding and inference run in worker threads, so the event loop keeps
accepting requests. At most ``max_decoders`` uploads (default: one per
CPU) are decoded at once, which bounds the memory that large images can
take together; the predictor serialises inference itself.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import anyio
import anyio.to_thread
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dermascan import __version__
from dermascan.errors import DermascanError
from dermascan.serve.images import (
    DRAFT_FACTOR,
    MAX_JPEG_SCANS,
    MAX_PIXELS,
    ImageError,
    prepare_image,
)
from dermascan.serve.model import ServedModel, load_model

log = logging.getLogger("dermascan.serve.app")

# The default for callers of create_app; the service and the Lambda take configs/serve.yaml's
# value (tests/test_config.py pins the two equal).
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
BODY_TIMEOUT = 15.0

FIELD = "file"
# Room for the multipart framing (boundaries, part headers) around a file of max_upload_bytes.
MULTIPART_SLACK = 64 * 1024
RAW_TYPES = ("application/octet-stream",)
REASONS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    503: "model_unavailable",
}


# ---------------------------------------------------------------- response models (OpenAPI)


class ClassProbability(BaseModel):
    code: str = Field(examples=["NV"])
    name: str = Field(examples=["Melanocytic nevus"])
    probability: float = Field(ge=0.0, le=1.0)


class TopClass(ClassProbability):
    category: str = Field(description="malignant, pre-malignant or benign", examples=["benign"])
    description: str = Field(description="a lay description of the class")


class ImageInfo(BaseModel):
    format: str = Field(examples=["JPEG"])
    width: int
    height: int
    orientation: int = Field(description="EXIF orientation applied (1: none)")
    draft_scale: int = Field(description="JPEG reduced-scale decoding factor (1: full decode)")


class Referral(BaseModel):
    recommended: bool = Field(description="true: the image should be seen by a doctor (score >= threshold)")
    score: float = Field(ge=0.0, le=1.0, description="summed probability of the classes that need a doctor")
    threshold: float = Field(ge=0.0, le=1.0, description="the operating point chosen on val for a target sensitivity")
    classes: list[str] = Field(examples=[["AK", "BCC", "MEL", "SCC"]])
    val_sensitivity: Optional[float] = Field(description="val sensitivity of the decision at this threshold")
    val_specificity: Optional[float] = Field(description="val specificity of the decision at this threshold")


class GateAnswer(BaseModel):
    in_scope: bool
    score: float = Field(description="the out-of-scope gate's score: distance from the training images")
    threshold: float = Field(description="score > threshold: out of scope")


class Prediction(BaseModel):
    in_scope: bool = Field(description="false: not a dermoscopic image of one lesion like the training images; "
                                       "show the message, not the predictions (always true without a gate)")
    message: Optional[str] = Field(description="a lay message for an out-of-scope image; null in scope")
    out_of_scope: Optional[GateAnswer] = Field(description="the gate's score and threshold; null when the model has none")
    referral: Optional[Referral] = Field(
        description="should this lesion be looked at by a doctor; null out of scope or without an operating point"
    )
    predictions_usable: bool = Field(description="false: the ranked probabilities are not to be used (out of scope)")
    predictions: list[ClassProbability] = Field(description="every class, most probable first")
    top: Optional[TopClass] = Field(description="the most probable class; null out of scope")
    disclaimer: str
    model_version: str
    version: str = Field(description="dermascan package version of the server")
    runtime: str
    latency_ms: float = Field(description="server-side time in the handler: reading the upload, decoding, inference")
    image: ImageInfo


class LesionClassOut(BaseModel):
    index: int
    code: str
    name: str
    description: str
    category: str


class Health(BaseModel):
    status: str
    model_version: str | None = None
    runtime: str | None = None
    files_verified: int | None = None
    error: str | None = None
    detail: str | None = None


class ErrorBody(BaseModel):
    error: str = Field(description="a short machine-readable code", examples=["corrupt_image"])
    detail: str = Field(description="what was wrong, for a person")


ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        413: "upload over max_upload_bytes, or image over max_pixels",
        415: "not an image, or an unsupported content type or image format",
        422: "empty upload, missing 'file' field, truncated or corrupt image",
        503: "no model is loaded (bad export folder)",
    }.items()
}
UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "A photo, as multipart/form-data field 'file', or as the raw body with an image/* content type.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": [FIELD],
                    "properties": {FIELD: {"type": "string", "format": "binary"}},
                }
            },
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


# ---------------------------------------------------------------- errors and the body limit


class ServiceError(HTTPException):
    """An HTTP error with a machine-readable code; rendered as ErrorBody."""

    def __init__(self, status: int, detail: str, code: str | None = None) -> None:
        super().__init__(status_code=status, detail=detail)
        self.code = code or REASONS.get(status, "error")


class BodyTooLarge(ServiceError):
    def __init__(self, limit: int, what: str = "request body") -> None:
        super().__init__(413, f"the {what} is larger than the limit of {limit} bytes", "payload_too_large")


class BodyTimeout(ServiceError):
    def __init__(self, seconds: float, received: int) -> None:
        super().__init__(408, f"no part of the request body arrived for {seconds:g} s (after {received} bytes)",
                         "request_timeout")


def error_response(status: int, code: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": code, "detail": detail}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, without reading past the limit; 408 when a body stalls.

    The Content-Length header is checked before the app runs; every
    ``http.request`` message is counted, so a chunked body (or a lying
    Content-Length) is cut off as soon as the count passes the limit. Until
    the body is complete, each wait for the next part of it is bounded by
    ``timeout`` seconds (None: unbounded).
    """

    def __init__(self, app: ASGIApp, limit: int, timeout: float | None = None) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = None
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    await error_response(400, "bad_request", "invalid Content-Length header")(scope, receive, send)
                    return
        if length is not None and length > self.limit:
            log.info("refused %s %s: Content-Length %d > %d", scope.get("method"), scope.get("path"), length, self.limit)
            response = error_response(413, "payload_too_large", f"the request body ({length} bytes) is larger than the "
                                      f"limit of {self.limit} bytes", headers={"Connection": "close"})
            await response(scope, receive, send)
            return
        received = 0
        started = complete = False

        async def counted() -> Message:
            nonlocal received, complete
            if complete or self.timeout is None:
                message = await receive()
            else:
                with anyio.move_on_after(self.timeout) as waited:
                    message = await receive()
                if waited.cancelled_caught:
                    raise BodyTimeout(self.timeout, received)
            if message["type"] == "http.request":
                complete = complete or not message.get("more_body", False)
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked)
        except BodyTooLarge as err:
            if started:
                raise
            await error_response(413, err.code, err.detail, headers={"Connection": "close"})(scope, receive, send)


# ---------------------------------------------------------------- reading the upload


async def read_raw(request: Request, limit: int) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(limit, "upload")
    return bytes(body)


async def read_multipart(request: Request, limit: int) -> bytes:
    try:
        form = await request.form(max_files=1, max_fields=8)
    except ServiceError:  # over the limit, or stalled (BodyLimit)
        raise
    except HTTPException as err:  # Starlette's MultiPartException, as a 400
        raise ServiceError(422, f"malformed multipart/form-data body: {err.detail}", "malformed_multipart") from None
    try:
        upload = form.get(FIELD)
        if upload is None:
            fields = ", ".join(repr(k) for k in form) or "none"
            raise ServiceError(422, f"the multipart body has no '{FIELD}' field (fields sent: {fields}); "
                               f"send the photo as field '{FIELD}'", "missing_field")
        if not isinstance(upload, UploadFile):
            raise ServiceError(422, f"field '{FIELD}' must be a file upload, not a text value", "missing_field")
        data = await upload.read(limit + 1)
        if len(data) > limit:
            raise BodyTooLarge(limit, "upload")
        return data
    finally:
        await form.close()


async def read_upload(request: Request, limit: int) -> bytes:
    content_type = request.headers.get("content-type", "")
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "multipart/form-data":
        return await read_multipart(request, limit)
    if media.startswith("image/") or media in RAW_TYPES:
        return await read_raw(request, limit)
    what = f"content type {media!r}" if media else "a request without a Content-Type"
    raise ServiceError(415, f"unsupported {what}: send multipart/form-data with the photo in field '{FIELD}', "
                       "or the raw photo with an image/* content type", "unsupported_media_type")


# ---------------------------------------------------------------- the app


@dataclass(frozen=True)
class Limits:
    """What one upload may cost: its bytes, its decoded pixels, and how many decode at once."""

    max_upload_bytes: int
    max_pixels: int
    draft_factor: int | None
    max_jpeg_scans: int
    decoders: anyio.CapacityLimiter


def create_app(
    export_dir: str | Path,
    runtime: str = "tflite",
    *,
    tflite: str = "fp32",
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    draft_factor: int | None = DRAFT_FACTOR,
    num_threads: int | None = None,
    fail_fast: bool = True,
    max_decoders: int | None = None,
    max_jpeg_scans: int = MAX_JPEG_SCANS,
    body_timeout: float | None = BODY_TIMEOUT,
) -> FastAPI:
    """The service for one export folder, loaded and verified now (see the module docstring for ``fail_fast``)."""
    model: ServedModel | None = None
    problem: str | None = None
    try:
        model = load_model(export_dir, runtime, tflite=tflite, num_threads=num_threads)
    except DermascanError as err:
        if fail_fast:
            raise
        problem = f"{type(err).__name__}: {err}"
        log.error("serving no model, every prediction will answer 503: %s", problem)

    app = FastAPI(
        title="dermascan",
        version=__version__,
        description="Ranks the 8 ISIC 2019 dermoscopic lesion classes for a photo. This is not a diagnosis.",
    )
    app.state.model = model
    app.state.problem = problem
    # Decoding a big image holds up to max_pixels x 4 bytes: bound how many run at once (default: one per CPU).
    app.state.limits = Limits(max_upload_bytes, max_pixels, draft_factor, max_jpeg_scans,
                              anyio.CapacityLimiter(max_decoders or os.cpu_count() or 2))
    app.add_middleware(BodyLimit, limit=max_upload_bytes + MULTIPART_SLACK, timeout=body_timeout)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(ImageError, image_error)
    app.add_exception_handler(ClientDisconnect, client_gone)
    app.add_exception_handler(Exception, unexpected)
    app.include_router(router)
    return app


async def http_error(request: Request, err: HTTPException) -> JSONResponse:
    code = getattr(err, "code", None) or REASONS.get(err.status_code, "error")
    if err.status_code < 500:
        log.info("%s %s -> %d %s: %s", request.method, request.url.path, err.status_code, code, err.detail)
    headers = dict(err.headers or {})
    if err.status_code in (408, 413):  # the rest of the body is never read: the connection cannot be reused
        headers["Connection"] = "close"
    return error_response(err.status_code, code, str(err.detail), headers or None)


async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return error_response(422, "unprocessable", str(err.errors()))


async def image_error(request: Request, err: ImageError) -> JSONResponse:
    log.info("%s %s -> %d %s: %s", request.method, request.url.path, err.status, err.code, err)
    return error_response(err.status, err.code, str(err))


async def client_gone(request: Request, err: ClientDisconnect) -> Response:
    """The client closed the connection mid-upload: its business, not a server error (no traceback, nothing is sent)."""
    log.info("%s %s: the client disconnected while sending its upload", request.method, request.url.path)
    return Response(status_code=400)


async def unexpected(request: Request, err: Exception) -> JSONResponse:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(500, "internal_error", "the server failed to answer this request; it has been logged")


router = APIRouter()


def served(request: Request) -> ServedModel:
    """The app's model, or 503 when none could be loaded."""
    state = request.app.state
    if state.model is None:
        raise ServiceError(503, f"no model is loaded: {state.problem}", "model_unavailable")
    return state.model


@router.get("/health", response_model=Health, responses={503: {"model": Health}}, tags=["service"])
async def health(request: Request) -> JSONResponse:
    """200 when the model is loaded and its MANIFEST.sha256 verified at start-up, else 503."""
    current = request.app.state.model
    if current is None:
        return JSONResponse({"status": "unavailable", "error": "model_unavailable", "detail": request.app.state.problem},
                            status_code=503)
    return JSONResponse({"status": "ok", "model_version": current.model_version, "runtime": current.runtime,
                         "files_verified": current.files_verified})


@router.get("/v1/classes", response_model=list[LesionClassOut], responses={503: ERRORS[503]}, tags=["model"])
async def classes(request: Request) -> list[dict]:
    """The classes the model ranks, in its output order."""
    return [{k: c[k] for k in ("index", "code", "name", "description", "category")} for c in served(request).classes]


@router.get("/v1/model", responses={503: ERRORS[503]}, tags=["model"])
async def model_summary(request: Request) -> dict:
    """What is served: versions, runtime, input size, classes, the model card and the parity report."""
    return await run_in_threadpool(served(request).summary)


@router.post("/v1/predict", response_model=Prediction, responses=ERRORS, openapi_extra=UPLOAD_BODY, tags=["predict"])
async def predict(request: Request) -> dict:
    """Rank every class for one photo (multipart field 'file', or a raw image/* body)."""
    started = time.perf_counter()
    current, limits = served(request), request.app.state.limits
    data = await read_upload(request, limits.max_upload_bytes)
    decode = functools.partial(prepare_image, data, current.image_size, current.resize_method,
                               max_pixels=limits.max_pixels, draft_factor=limits.draft_factor,
                               max_jpeg_scans=limits.max_jpeg_scans)
    prepared = await anyio.to_thread.run_sync(decode, limiter=limits.decoders)
    outputs = await run_in_threadpool(current.outputs, prepared.pixels)
    return prediction(current, prepared, outputs, started)


OUT_OF_SCOPE_MESSAGE = (
    "This photo does not look like a dermoscopic close-up of a single skin lesion, so no result is given. "
    "Take a close-up of one lesion with the dermoscope attachment, in focus and evenly lit, and try again."
)


def prediction(current: ServedModel, prepared: Any, outputs: dict, started: float) -> dict:
    """The /v1/predict response: first whether the image is in scope, then the referral, every class ranked,
    the top one described, and how the image was read. Out of scope: no top class and no referral, and the
    ranked probabilities marked as not to be used."""
    probabilities = outputs["probabilities"]
    scope = current.scope_of(outputs.get("out_of_scope"))
    in_scope = scope is None or scope["in_scope"]
    order = sorted(range(len(current.classes)), key=lambda i: (-float(probabilities[i]), i))
    ranked = [
        {"code": current.classes[i]["code"], "name": current.classes[i]["name"], "probability": float(probabilities[i])}
        for i in order
    ]
    best = current.classes[order[0]]
    latency_ms = round(1000 * (time.perf_counter() - started), 3)
    log.debug("predict: %s %.3f%s in %.1f ms", best["code"], ranked[0]["probability"],
              "" if in_scope else " (out of scope)", latency_ms)
    return {
        "in_scope": in_scope,
        "message": None if in_scope else OUT_OF_SCOPE_MESSAGE,
        "out_of_scope": scope,
        "referral": current.referral_of(probabilities) if in_scope else None,
        "predictions_usable": in_scope,
        "predictions": ranked,
        "top": {**ranked[0], "category": best["category"], "description": best["description"]} if in_scope else None,
        "disclaimer": current.disclaimer,
        "model_version": current.model_version,
        "version": __version__,
        "runtime": current.runtime,
        "latency_ms": latency_ms,
        "image": {
            "format": prepared.format,
            "width": prepared.width,
            "height": prepared.height,
            "orientation": prepared.orientation,
            "draft_scale": prepared.draft_scale,
        },
    }
