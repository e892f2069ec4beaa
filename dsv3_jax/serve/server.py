"""The HTTP side: an OpenAI-compatible FastAPI app in front of the scheduler thread.

Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (JSON, or server-sent events with
`"stream": true`), `GET /v1/models`, `GET /health` (200 once the model is loaded and every
program compiled, 503 before and while shutting down), `GET /metrics` (Prometheus text).

Each generation request is validated and tokenised here (a chat template renders in a worker
process, so that runs in the thread pool, off the event loop), then handed to the scheduler with
a sink that moves the scheduler thread's events onto this loop (`call_soon_threadsafe` into an
`asyncio.Queue`): handlers never block on the device and the scheduler never waits for a client.
When a client goes away (Starlette cancels a streaming response's task when the connection
closes; a waiting non-streaming handler polls for the disconnect) the request is cancelled and
its slot is free at the next scheduler iteration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from dsv3_jax.errors import UserError
from dsv3_jax.serve import protocol
from dsv3_jax.serve.metrics import Metrics
from dsv3_jax.serve.protocol import APIError, Parsed, Reply
from dsv3_jax.serve.scheduler import Delta, Finished, NotReady, QueueFull, Scheduler

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
DISCONNECT_POLL_S = 0.5  # how often a waiting non-streaming handler checks that its client is still there


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Service:
    """What the handlers share: the scheduler, the metrics, the served model's name."""

    def __init__(self, scheduler: Scheduler, metrics: Metrics, model_name: str):
        self.scheduler, self.metrics, self.model_name = scheduler, metrics, model_name
        self.started = int(time.time())

    def require_ready(self) -> None:
        if not self.scheduler.ready.is_set():
            raise APIError("the model is still loading", type="service_unavailable", status=503)

    async def prompt_ids(self, parsed: Parsed) -> list[int]:
        tok = self.scheduler.tokenizer
        if not parsed.chat:
            return protocol.completion_ids(parsed.prompt, tok)
        messages = protocol.chat_messages(parsed.prompt)
        if tok.chat_template is None:
            raise APIError("the model's tokenizer has no chat template; use /v1/completions", param="messages")
        try:  # the template renders in a worker process: keep it off the event loop
            return await run_in_threadpool(tok.apply_chat_template, messages, add_generation_prompt=True,
                                           tokenize=True, **parsed.template_kwargs)
        except UserError as e:
            raise APIError(f"the chat template failed: {e}", param="messages") from None

    def submit(self, params, loop: asyncio.AbstractEventLoop):
        events: asyncio.Queue = asyncio.Queue()

        def sink(event):  # runs on the scheduler thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            return self.scheduler.submit(params, sink), events
        except QueueFull as e:
            raise APIError(f"the server is at capacity: {e}; retry later", type="rate_limit_exceeded",
                           status=429, code="rate_limit_exceeded") from None
        except NotReady as e:
            raise APIError(str(e), type="service_unavailable", status=503) from None


async def _stream(service: Service, req, events: asyncio.Queue, reply: Reply, parsed: Parsed):
    """The SSE body: a role chunk (chat), text chunks, the finish chunk, usage if asked, [DONE]."""
    usage_too, over = parsed.include_usage, False
    try:
        if reply.chat:
            yield _sse(reply.chunk(None, role=True, include_usage=usage_too))
        while not over:
            event = await events.get()
            if isinstance(event, Delta):
                if event.text:
                    yield _sse(reply.chunk(event.text, include_usage=usage_too))
                continue
            over = True
            if isinstance(event, Finished):
                yield _sse(reply.chunk(None, event.reason, include_usage=usage_too))
                if usage_too:
                    yield _sse(reply.usage_chunk(Reply.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)))
            else:  # Failed: the API's error object as an event, which clients raise
                yield _sse(APIError(event.message, type="server_error", status=500).body())
            yield "data: [DONE]\n\n"
    finally:  # also on cancellation, when the client has gone
        if not over:
            service.scheduler.cancel(req)


async def _complete(service: Service, request: Request, req, events: asyncio.Queue, reply: Reply):
    """Wait for the whole text; cancel the request if the client disconnects meanwhile."""
    parts, over = [], False
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return Response(status_code=499)  # nobody reads it; the request is cancelled below
                continue
            if isinstance(event, Delta):
                parts.append(event.text)
                continue
            over = True
            if isinstance(event, Finished):
                usage = Reply.usage(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
                return JSONResponse(reply.complete("".join(parts), event.reason, usage))
            raise APIError(event.message, type="server_error", status=500)
    finally:
        if not over:
            service.scheduler.cancel(req)


async def _generate(service: Service, request: Request, *, chat: bool):
    service.require_ready()
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(f"the request body is not valid JSON: {e}") from None
    parsed = protocol.parse(body, chat=chat, model_name=service.model_name)
    batch = service.scheduler.batch
    params = protocol.finish_params(parsed, await service.prompt_ids(parsed), vocab_size=batch.cfg.vocab_size,
                                    context=batch.context)
    req, events = service.submit(params, asyncio.get_running_loop())
    reply = Reply(parsed, service.model_name)
    if parsed.stream:
        return StreamingResponse(_stream(service, req, events, reply, parsed), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _complete(service, request, req, events, reply)


def create_app(scheduler: Scheduler, metrics: Metrics, model_name: str, *, stop_timeout: float = 30.0) -> FastAPI:
    """The app; its lifespan starts the scheduler thread and, at shutdown, lets it finish."""
    service = Service(scheduler, metrics, model_name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await run_in_threadpool(scheduler.stop, stop_timeout)

    app = FastAPI(title="dsv3-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _routes(app, service)
    _error_handlers(app)
    app.add_middleware(CountResponses, metrics=metrics)
    return app


def _routes(app: FastAPI, service: Service) -> None:
    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(service, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(service, request, chat=True)

    @app.get("/v1/models")
    async def models():
        batch = service.scheduler.batch if service.scheduler.ready.is_set() else None
        card = {"id": service.model_name, "object": "model", "created": service.started, "owned_by": "dsv3-jax",
                "max_model_len": batch.context if batch is not None else None}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        s = service.scheduler
        if s.error is not None:
            return JSONResponse({"status": "failed", "message": s.error}, status_code=503)
        if not s.ready.is_set():
            return JSONResponse({"status": "loading"}, status_code=503)
        if s.stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):  # 404, 405 in the API's shape
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(APIError(str(e.detail), type=kind, status=e.status_code).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception):  # a bug in one request, not the server's end
        return JSONResponse(APIError(f"internal error: {type(e).__name__}: {e}", type="server_error").body(),
                            status_code=500)


class CountResponses:
    """ASGI middleware counting responses by endpoint and status (a pure ASGI wrapper rather than
    `@app.middleware`, whose response wrapping would sit between a stream and its disconnect)."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)

