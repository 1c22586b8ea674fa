"""create_app(backend): the OpenAI-compatible HTTP server over any Backend.

    POST /v1/chat/completions, POST /v1/completions   (SSE when "stream": true)
    GET  /v1/models, /health (503 until the backend is ready), /metrics (Prometheus)
    GET, POST /v1/admin/models[/{name}/load|unload]   (a cluster's; kvmesh.frontend.admin)

Every error is OpenAI-shaped, {"error": {"message", "type", "param", "code"}}:
400 for a bad request (FastAPI's 422 included), naming the parameter; 404 for an
unknown model or route; 429 with Retry-After when the backend is full; 503 when it
cannot serve; 500 for a bug. The server keeps serving after any of them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from kvmesh import __version__
from kvmesh.frontend.admin import ModelAdmin, add_admin_routes
from kvmesh.frontend.backend import Backend, BackendUnavailable, OverloadedError
from kvmesh.frontend.limits import Gate, HTTPLimits
from kvmesh.frontend.metrics import CONTENT_TYPE, Metrics
from kvmesh.frontend.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorBody,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from kvmesh.frontend.serving import (
    ChatServing,
    ClientDisconnected,
    CompletionServing,
    RequestError,
    Serving,
    describe_error,
    model_not_found,
)

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
STATUS_TYPES = {400: "invalid_request_error", 404: "not_found_error", 405: "invalid_request_error"}


def create_app(
    backend: Backend,
    limits: HTTPLimits | None = None,
    models: Mapping[str, Backend] | None = None,
    admin: ModelAdmin | None = None,
) -> FastAPI:
    """The app starts the backend when the server starts and closes it on shutdown.
    `limits` (kvmesh.frontend.limits) bound what a request may ask for and cost.
    `models`: the Backend of each served model, by name (None: backend's one model);
    a request goes to the one its `model` names, and `backend` answers /health and
    /metrics for them all. `admin`: the admin API's models (kvmesh.frontend.admin), if
    this server has one."""
    limits = limits or HTTPLimits()
    models = dict(models or {backend.model_name: backend})

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await backend.start()
        try:
            yield
        finally:
            await backend.close()

    app = FastAPI(title="kvmesh", version=__version__, lifespan=lifespan)
    metrics = Metrics(backend, endpoints=(CHAT_PATH, COMPLETIONS_PATH))
    chat = {name: ChatServing(model, metrics, limits) for name, model in models.items()}
    completions = {
        name: CompletionServing(model, metrics, limits) for name, model in models.items()
    }
    app.state.backend = backend
    app.state.metrics = metrics

    @app.post(CHAT_PATH)
    async def create_chat_completion(request: Request, body: ChatCompletionRequest) -> Response:
        response = await serving_of(chat, body.model)(request, body)
        metrics.count_request(CHAT_PATH, response.status_code)
        return response

    @app.post(COMPLETIONS_PATH)
    async def create_completion(request: Request, body: CompletionRequest) -> Response:
        response = await serving_of(completions, body.model)(request, body)
        metrics.count_request(COMPLETIONS_PATH, response.status_code)
        return response

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        cards = [
            ModelCard(id=name, max_model_len=model.max_model_len) for name, model in models.items()
        ]
        return ModelList(data=cards)

    @app.get("/health")
    async def health() -> Response:
        ready = backend.ready()
        return Response(
            '{"status":"ok"}' if ready else '{"status":"unavailable"}',
            status_code=200 if ready else 503,
            media_type="application/json",
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    if admin is not None:
        add_admin_routes(app, admin)
    add_error_handlers(app, metrics)
    app.add_middleware(Gate, limits=limits)
    return app


def serving_of(servings: Mapping[str, Serving], model: str) -> Serving:
    """The Serving of the model a request names; 404 naming the served ones."""
    serving = servings.get(model)
    if serving is None:
        raise model_not_found(model, servings, "model")
    return serving


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    def reply(request: Request, status: int, error: ErrorBody, headers=None) -> Response:
        if request.url.path in (CHAT_PATH, COMPLETIONS_PATH):
            metrics.count_request(request.url.path, status)
        body = ErrorResponse(error=error).model_dump_json()
        return Response(body, status_code=status, headers=headers, media_type="application/json")

    async def on_backend_error(request: Request, error: Exception) -> Response:
        status, body, headers = describe_error(error)
        return reply(request, status, body, headers)

    async def on_invalid_request(request: Request, error: RequestValidationError) -> Response:
        message, param = describe_validation_error(error.errors()[0], error.body)
        return reply(
            request,
            400,
            ErrorBody(
                message=message, type="invalid_request_error", param=param, code="invalid_value"
            ),
        )

    async def on_http_error(request: Request, error: HTTPException) -> Response:
        message = f"{request.method} {request.url.path}: {error.detail}"
        body = ErrorBody(message=message, type=STATUS_TYPES.get(error.status_code, "error"))
        return reply(request, error.status_code, body, error.headers)

    async def on_client_gone(request: Request, error: ClientDisconnected) -> Response:
        return reply(request, 499, ErrorBody(message="client disconnected", type="cancelled"))

    for error_type in (RequestError, OverloadedError, BackendUnavailable, Exception):
        app.add_exception_handler(error_type, on_backend_error)
    app.add_exception_handler(RequestValidationError, on_invalid_request)
    app.add_exception_handler(HTTPException, on_http_error)
    app.add_exception_handler(ClientDisconnected, on_client_gone)


def describe_validation_error(error: dict, body=None) -> tuple[str, str | None]:
    """(message, param) for pydantic's first complaint about the body; param is the
    field's path, e.g. "messages[0].role". body: the request's text, which places a
    JSON syntax error at its line and column."""
    loc = [part for part in error.get("loc", ()) if part != "body"]
    kind = error.get("type")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        if isinstance(body, str) and loc and isinstance(loc[0], int):  # loc: the offset
            reason = str(json.JSONDecodeError(reason, body, loc[0]))  # adds line and column
        return f"the request body is not valid JSON: {reason}", None
    if not loc or isinstance(loc[0], int):
        if kind == "missing":
            return "the request body is missing: send a JSON object", None
        return "the request body must be a JSON object (Content-Type: application/json)", None
    param = str(loc[0]) + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    message = error.get("msg", "invalid value").removeprefix("Value error, ")
    if kind == "missing":
        return f"{param} is required", param
    if not message.startswith(param.split("[")[0].split(".")[0]):
        got = error.get("input")
        message = f"{param}: {message}" + (f", got {got!r}" if is_scalar(got) else "")
    return message, param


def is_scalar(value) -> bool:
    return value is None or isinstance(value, bool | int | float | str) and len(repr(value)) < 80
