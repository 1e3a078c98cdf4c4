"""HTTP routes (FastAPI) over a :class:`~nestrec.serve.service.Service`.

Routes: ``POST /v1/recommend``, ``GET /v1/model`` (what is served and its limits), ``GET
/healthz`` (the process is up), ``GET /readyz`` (warm-up done: route traffic here), ``GET
/metrics`` (Prometheus text), and the framework's ``/openapi.json`` and ``/docs``.

Status codes are part of the contract: 422 for any request the service will not answer as asked
(with a one-line ``message`` or ``detail`` naming the field), 413 for a body over ``max_body_bytes``,
503 while warming up or when the queue is full, 504 when the request's deadline passes. A bad
request never takes the process down.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint's annotations at
# runtime, and the request model is a local built per artifact.

import json
from contextlib import asynccontextmanager, suppress

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse

from nestrec.serve.batching import DeadlineExceeded, Overloaded
from nestrec.serve.metrics import CONTENT_TYPE, MetricsMiddleware
from nestrec.serve.resolve import RequestError
from nestrec.serve.schema import (
    MAX_DEADLINE_MS,
    ErrorResponse,
    RecommendResponse,
    ValidationErrorResponse,
    request_model,
)
from nestrec.serve.service import Service

__all__ = ["create_app"]


def _first_problem(errors: list[dict]) -> str:
    if not errors:
        return "invalid request"
    err = errors[0]
    if err.get("type") == "json_invalid":
        reason = (err.get("ctx") or {}).get("error", "not JSON")
        return f"malformed JSON body: {reason}"
    if err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",):
        return "the request body is empty: send a JSON object"
    if err.get("type") == "model_attributes_type" and tuple(err.get("loc", ())) == ("body",):
        return "the body must be a JSON object (send Content-Type: application/json)"
    where = ".".join(str(part) for part in err.get("loc", ()) if part != "body") or "body"
    return f"{where}: {err.get('msg', 'invalid')}"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


class _BodyTooLarge(Exception):
    pass


class BodySizeLimitMiddleware:
    """Pure ASGI middleware: a request body over ``max_bytes`` gets 413 with a one-line JSON ``detail``.

    A declared ``Content-Length`` over the limit is refused before any of the body is read; a body
    without one (chunked) is counted while it streams in and refused once it passes the limit, so a
    client cannot make the service buffer an unbounded body either way.
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    def _message(self, size: str) -> bytes:
        text = f"request body {size} exceeds the {self.max_bytes}-byte limit (the service's max_body_bytes)"
        return json.dumps({"detail": text}).encode()

    async def _refuse(self, send, size: str) -> None:
        body = self._message(size)
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await self._refuse(send, f"of {int(value)} bytes")
                return
        received, too_large, started = 0, False, False

        async def limited_receive():
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    too_large = True
                    raise _BodyTooLarge
            return message

        async def guarded_send(message):
            nonlocal started
            if too_large:  # whatever the app made of the aborted read, the answer is 413
                return
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        with suppress(_BodyTooLarge):  # raised by limited_receive; the app may also have caught it
            await self.app(scope, limited_receive, guarded_send)
        if too_large and not started:
            await self._refuse(send, f"of more than {self.max_bytes} bytes")


def create_app(service: Service) -> FastAPI:
    art = service.artifact
    RecommendRequest = request_model(
        art.scenarios, art.genres, art.num_items, int(art.serving["max_k"]), int(art.serving["max_beam"])
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="nestrec OxygenREC recommendation service",
        version=art.model_version,
        description="Trie-constrained beam search over semantic IDs; one model for every scenario. "
        "See docs/serving.md.",
        lifespan=lifespan,
    )
    # Added first, so it runs inside the metrics middleware and 413s are counted too.
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=service.settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in exc.errors()]
        return JSONResponse({"message": _first_problem(exc.errors()), "detail": errors}, status_code=422)

    errors = {
        413: {
            "model": ErrorResponse,
            "description": f"request body over {service.settings.max_body_bytes} bytes (max_body_bytes)",
        },
        422: {"model": ValidationErrorResponse, "description": "invalid or meaningless request"},
        503: {"model": ErrorResponse, "description": "warming up, or too many requests queued"},
        504: {
            "model": ErrorResponse,
            "description": f"deadline passed (deadline_ms, at most {MAX_DEADLINE_MS})",
        },
    }

    @app.post("/v1/recommend", response_model=RecommendResponse, responses=errors)
    async def recommend(body: RecommendRequest):  # type: ignore[valid-type]
        """K items for a user in a scenario, by trie-constrained beam search."""
        if not service.ready:
            service.metrics.observe_recommendation(body.scenario, "not_ready")
            return _error(503, service.warm_up_error or "the model is warming up; retry shortly")
        try:
            response = await service.recommend(body)
        except RequestError as err:
            service.metrics.observe_recommendation(body.scenario, "invalid")
            return _error(422, str(err))
        except Overloaded as err:
            service.metrics.observe_recommendation(body.scenario, "overloaded")
            return _error(503, f"overloaded: {err}; retry later")
        except DeadlineExceeded as err:
            service.metrics.observe_recommendation(body.scenario, "deadline")
            return _error(504, f"deadline exceeded: {err}")
        service.metrics.observe_recommendation(body.scenario, "ok")
        return response

    @app.get("/v1/model")
    async def model_info() -> dict:
        """What is served: versions, scenarios, genres, per-scenario K and beam, limits."""
        manifest = art.manifest
        return {
            "model_version": art.model_version,
            "registry_version": art.registry.version,
            "format_version": manifest["format_version"],
            "source": manifest.get("source", {}),
            "scenarios": art.scenarios,
            "genres": art.genres,
            "serving": art.serving,
            "items": art.num_items,
            "known_users": art.num_users,
            "text_encoder": art.text_encoder,
            "instruction_cache": {
                "path": str(service.instructions.cri_path) if service.instructions.cri_path else None,
                "users": service.instructions.users_with_instruction,
            },
            "device": str(service.recommender.device),
            "batching": {
                "max_batch": service.settings.max_batch,
                "max_wait_ms": service.settings.max_wait_ms,
                "max_queue": service.settings.max_queue,
            },
            "deadline_ms": service.settings.deadline_ms,
            "max_body_bytes": service.settings.max_body_bytes,
        }

    @app.get("/healthz")
    async def healthz() -> dict:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorResponse}})
    async def readyz():
        """Readiness: the model is loaded and warmed up and the batching worker runs."""
        if service.ready and service.batcher.running:
            return {"status": "ready", "model_version": art.model_version}
        return _error(503, service.warm_up_error or "warming up")

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> PlainTextResponse:
        """Prometheus text exposition (version 0.0.4)."""
        return PlainTextResponse(service.metrics.render(), media_type=CONTENT_TYPE)

    return app
