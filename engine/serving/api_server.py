"""The HTTP server: FastAPI routes over one `AsyncLLMEngine`, run by uvicorn.

`build_app` wires the routes; `start_server` runs one on a background thread (tests, the
profiler's HTTP path) and `serve` runs one in the foreground (`pilot serve`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import signal
import threading
import time
from array import array
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from engine.config import EngineConfig
from engine.observer import StepStats
from engine.sequence import RequestOutput
from engine.serving.async_engine import AsyncLLMEngine
from engine.serving.chat_template import ChatTemplate
from engine.serving.metrics import CONTENT_TYPE, ServerMetrics
from engine.serving.openai_serving import ClientDisconnected, OpenAIServing
from engine.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
    refuse_lone_surrogates,
)

logger = logging.getLogger(__name__)


@dataclass
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    # Names clients may put in `model`; the first is reported. Default: the config's model path.
    served_model_names: list[str] = field(default_factory=list)
    # Requests admitted beyond what the running batch holds; past that, 429 with Retry-After.
    max_waiting_requests: int = 256
    max_body_bytes: int = 4 * 1024 * 1024
    max_prompt_tokens: int | None = None  # default: the model's context length
    chat_template: str | None = None  # a Jinja file; default: the model's own, else plain turns
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("port", "max_waiting_requests", "max_body_bytes", "max_prompt_tokens"):
            value = getattr(self, name)
            low = 0 if name in ("port", "max_waiting_requests") else 1
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")


def build_app(engine: AsyncLLMEngine, settings: ServerSettings) -> FastAPI:
    config = engine.config
    names = settings.served_model_names or [config.model]
    max_prompt = min(settings.max_prompt_tokens or engine.max_model_len, engine.max_model_len)
    serving = OpenAIServing(engine, names, ChatTemplate.for_model(config.tokenizer or config.model,
                                                                  settings.chat_template), max_prompt)
    metrics = ServerMetrics(engine, names[0])

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="pilot engine", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        metrics.reject(err.status)
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, err: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {err.detail}"
        return JSONResponse(APIError(err.status_code, message).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception) -> JSONResponse:
        # A fault of ours, not the client's: still an OpenAI error body, and the server carries on.
        logger.exception("request %s %s failed", request.method, request.url.path)
        metrics.reject(500)
        error = APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    if settings.api_key is not None:
        app.add_middleware(BearerAuth, api_key=settings.api_key, on_reject=metrics.reject)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({"status": "ok", "in_flight": engine.num_in_flight})
        return JSONResponse({"status": "unavailable", "reason": engine.dead_reason()}, status_code=503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    steps = StepLog(engine)
    finished = RequestLog(engine)

    @app.get("/pilot/steps")
    async def step_log(since: int = 0) -> dict[str, Any]:
        """The engine's recent steps (`engine.observer.StepStats`), for a profiler measuring over
        HTTP: those numbered `since` and later, and the number to ask for next."""
        return steps.since(since)

    @app.get("/pilot/requests")
    async def request_log(since: int = 0) -> dict[str, Any]:
        """The engine's timings of recently finished requests (its clock is `time.perf_counter`,
        the machine's monotonic clock), so that a client on this machine can tell what serving
        added to each token: those numbered `since` and later, and the number to ask for next."""
        return finished.since(since)

    @app.post("/pilot/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, Any]:
        """Forget cached prefixes, so that a profiler's next load level starts cold."""
        return {"blocks_dropped": await engine.reset_prefix_cache()}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        created = int(time.time())
        extra = {"engine": config.model_dump(mode="json"),
                 "vocab_size": engine.engine.model_config.vocab_size}
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "pilot",
             "root": config.model, "max_model_len": engine.max_model_len, "pilot": extra}
            for name in names]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = parse_request(CompletionRequest, await read_json(request, settings.max_body_bytes))
        return await _respond(request, lambda gone: serving.completions(body, gone))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = parse_request(ChatCompletionRequest, await read_json(request, settings.max_body_bytes))
        return await _respond(request, lambda gone: serving.chat(body, gone))

    return app


class StepLog:
    """The last `capacity` engine steps, numbered from the server's start."""

    def __init__(self, engine: AsyncLLMEngine, capacity: int = 200_000) -> None:
        self.entries: deque[StepStats] = deque(maxlen=capacity)
        self.count = 0
        self._lock = threading.Lock()
        engine.observers.append(self._append)

    def _append(self, stats: StepStats) -> None:
        with self._lock:
            self.entries.append(stats)
            self.count += 1

    def since(self, first: int) -> dict[str, Any]:
        with self._lock:
            entries, count = list(self.entries), self.count
        start = count - len(entries)
        return {"next": count, "dropped": max(0, start - first),
                "steps": [s.to_dict() for s in entries[max(0, first - start):]]}


class RequestLog:
    """The engine-side timings of the last `capacity` finished requests, by engine request id
    (the response's `id`, a dash, and the choice's index). Token times are kept as packed
    doubles: 8 bytes a token, a few MB for a profiler's run."""

    def __init__(self, engine: AsyncLLMEngine, capacity: int = 4096) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=capacity)
        self.count = 0
        engine.output_listeners.append(self._append)

    def _append(self, output: RequestOutput) -> None:
        if output.finished:
            m = output.metrics
            self.entries.append({"id": output.request_id, "arrival_time": m.arrival_time,
                                 "first_scheduled_time": m.first_scheduled_time,
                                 "token_times": array("d", m.token_times),
                                 "finish_reason": output.finish_reason})
            self.count += 1

    def since(self, first: int) -> dict[str, Any]:
        start = self.count - len(self.entries)
        return {"next": self.count, "dropped": max(0, start - first),
                "requests": [{**e, "token_times": e["token_times"].tolist()}
                             for e in list(self.entries)[max(0, first - start):]]}


class BearerAuth:
    """Pure ASGI middleware (Starlette's `BaseHTTPMiddleware` would wrap `receive`, and with it
    the disconnect watch): `/v1/*` and `/pilot/*` need `Authorization: Bearer KEY`."""

    def __init__(self, app: Any, api_key: str, on_reject) -> None:
        self.app, self.api_key, self.on_reject = app, api_key.encode(), on_reject

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith(("/v1", "/pilot")):
            headers = dict(scope["headers"])
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                err = APIError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'",
                               code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                self.on_reject(401)
                response = JSONResponse(err.body(), status_code=401, headers=err.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _respond(request: Request, handle) -> Response:
    """Run a handler while watching for the client to go away; stream or answer whole."""
    gone = asyncio.Event()

    async def watch() -> None:
        while True:
            message = await request.receive()

            if message["type"] == "http.disconnect":
                gone.set()
                return

    watcher = asyncio.create_task(watch())
    try:
        result = await handle(gone)
    except ClientDisconnected:
        return Response(status_code=499)
    finally:
        watcher.cancel()
    if isinstance(result, dict):
        return JSONResponse(result)
    # Starlette watches for the disconnect while streaming and cancels the generator.
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON, refusing one over `limit` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is {declared} bytes, more than the limit of {limit}",
                       code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is more than the limit of {limit} bytes",
                           code="request_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except RecursionError:
        raise APIError(400, "the request body nests JSON arrays or objects too deeply to parse") from None
    except ValueError as err:  # also an integer past Python's digit limit, and bad UTF-8
        raise APIError(400, f"the request body is not valid JSON: {err}") from None
    refuse_lone_surrogates(body)
    return body


class RunningServer:
    """A server on a background thread: `.url`, `.engine`, `.close()` (also on leaving a `with`)."""

    def __init__(self, engine: AsyncLLMEngine, server: uvicorn.Server, thread: threading.Thread,
                 host: str, port: int) -> None:
        self.engine, self._server, self._thread = engine, server, thread
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(60)
        if self.engine.is_running:  # the lifespan shutdown did not run (the server never started)
            self.engine.shutdown()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _uvicorn(app: FastAPI, settings: ServerSettings) -> uvicorn.Server:
    return uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                         log_level=settings.log_level, timeout_graceful_shutdown=5,
                                         access_log=settings.log_level in ("debug", "info")))


def start_server(config: EngineConfig, host: str = "127.0.0.1", port: int = 0,
                 api_key: str | None = None, **settings: Any) -> RunningServer:
    """Load the engine, and serve it on a background thread; `port=0` picks a free port."""
    settings.setdefault("log_level", "warning")
    return launch(config, ServerSettings(host=host, port=port, api_key=api_key, **settings))


def launch(config: EngineConfig, settings: ServerSettings) -> RunningServer:
    engine = AsyncLLMEngine.from_config(config, settings.max_waiting_requests)
    try:
        server = _uvicorn(build_app(engine, settings), settings)
        thread = threading.Thread(target=server.run, name="http-server", daemon=True)
        thread.start()
        deadline = time.monotonic() + 60
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server could not listen on {settings.host}:{settings.port} "
                                   "(the port is in use, or the address is not one of this machine's)")
            time.sleep(0.01)
    except BaseException:
        engine.shutdown()
        raise
    bound = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(engine, server, thread, settings.host, bound)


def serve(config: EngineConfig, settings: ServerSettings,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve in the foreground until SIGINT or SIGTERM (`pilot serve`): in-flight requests get
    a few seconds to finish. Raises RuntimeError if the engine dies, so that a supervisor
    restarts the process rather than leave it answering 503."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with launch(config, settings) as running:
            if on_ready is not None:
                on_ready(running.url)
            while not stop.wait(0.2):
                if not running.engine.is_running:
                    raise RuntimeError(running.engine.dead_reason())
                if not running._thread.is_alive():
                    raise RuntimeError("the HTTP server stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
