"""The Ray Serve application: a FastAPI ingress over the any-to-any sampler.

    POST /v1/generate          inputs + wanted outputs + sampler options -> outputs + usage
    POST /v1/generate/stream   the same as server-sent events: progress per step, previews,
                               then the result
    GET  /v1/models            the model and the input/output combinations it serves
    GET  /v1/stats             this replica's request and sampler-call counters
    GET  /healthz              200 while the replica can generate (its model loaded, its
                               step scheduler running), else 503
    GET  /docs, /openapi.json  the schema

Concurrent requests share the model step by step (`batching.mode: step`, the default: a
scheduler thread runs one denoising step at a time over every active request, whatever
its layout; `serve/scheduler.py`), or are collected by `@serve.batch` (`batching.mode:
batch`: one sampler call per group of equal layout and options, on one model thread).
The event loop keeps accepting meanwhile. Overload: beyond
`max_ongoing_requests` per replica and `max_queued_requests` Serve's proxy answers 503
with `Retry-After` (`serve.yaml`, `deployment`); the replica itself admits at most
`limits.max_pending` requests to its model queue (503 beyond); a request holds its place
until its generation has ended, however it ends. A request whose client disconnects
(Serve cancels it) or that passes `limits.request_timeout_s` stops its generation at the
next denoising step, or leaves the queue before it starts.

Bodies are parsed and validated on the replica's parse threads (`Engine.parse_body`), so
a large body does not hold up the event loop. A request that fails on the server gets a
fixed message saying what failed (`serve/errors.py`); the exception itself goes to the
replica's log. Serve's health check reads the step scheduler (`check_health`): a replica
whose scheduler stopped is replaced.

Build it with `build(cfg)` (jobs/deploy.py) or from a Serve config file / `serve run`
through `build_app({"config": "configs/tiny/serve.yaml", ...overrides})`.
"""

# No `from __future__ import annotations` here: FastAPI reads the routes' types at run time.
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException
from ray import serve
from ray.serve.deployment import Application

from serve.config import ServeConfig, load_serve_config
from serve.errors import ClientError, SchedulerStopped, ServerError, Stopped
from serve.schemas import ErrorBody, GenerateRequest, GenerateResponse, ModelList, describe_errors

logger = logging.getLogger(__name__)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text} for code, text in (
        (400, "malformed JSON or base64"), (413, "over a size limit"), (415, "unsupported media format"),
        (422, "invalid options, inputs or output combination"),
        (500, "the request failed on the server (the message says what failed)"),
        (503, "overloaded, or this replica cannot generate: retry after the Retry-After header's seconds"),
        (504, "the request passed the server's request timeout"))}

#: the body of both generate routes, read by the route itself and validated off the event loop
_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/GenerateRequest"}}}}}

app = FastAPI(title="Omni-Diffusion", version="1",
              description="Any-to-any masked discrete diffusion over text, image and speech.")


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before any parsing,
    from its Content-Length or, for a chunked body, as soon as the bytes read pass it."""

    max_bytes = 8_000_000  # set per replica from the config

    def __init__(self, asgi_app) -> None:
        self.app = asgi_app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"error": _too_large(limit)}, status_code=413)
            return await response(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b"")) if message["type"] == "http.request" else 0
            if seen > limit:  # FastAPI passes an HTTPException raised while reading through
                raise HTTPException(413, _too_large(limit))
            return message

        await self.app(scope, counted, send)


def _too_large(limit: int) -> str:
    return f"request body over the limit of {limit} bytes"


app.add_middleware(BodyLimit)


def _openapi() -> dict:
    """FastAPI's schema plus `GenerateRequest`, which the generate routes read themselves."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        body = GenerateRequest.model_json_schema(ref_template="#/components/schemas/{model}")
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.update(body.pop("$defs", {}))
        components["GenerateRequest"] = body
        app.openapi_schema = schema
    return app.openapi_schema


app.openapi = _openapi


def failure(exc: BaseException) -> tuple[int, str, int | None]:
    """(HTTP status, message, Retry-After) of a request that ended with `exc`. Messages
    are the server's own: what failed, never an exception's text (logged instead)."""
    if isinstance(exc, ClientError):
        return exc.status, exc.message, exc.retry_after_s
    if isinstance(exc, Stopped):  # nobody reads this: the client is gone (499, as nginx logs it)
        return 499, "stopped: the client went away", None
    if isinstance(exc, SchedulerStopped):
        return exc.status, exc.message, 1
    if isinstance(exc, ServerError):
        logger.error("a request failed: %s", exc.message, exc_info=exc.__cause__ or exc)
        return exc.status, exc.message, None
    logger.error("a request failed", exc_info=exc)
    return 500, ServerError.message, None


@app.exception_handler(ClientError)
async def _client_error(request: Request, exc: ClientError) -> JSONResponse:
    headers = {"Retry-After": str(exc.retry_after_s)} if exc.retry_after_s is not None else None
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=headers)


@app.exception_handler(Stopped)
@app.exception_handler(ServerError)
@app.exception_handler(Exception)
async def _failed(request: Request, exc: Exception) -> JSONResponse:
    status, message, retry_after = failure(exc)
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


@app.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


@app.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return JSONResponse({"error": "the body is not valid JSON"}, status_code=400)
    return JSONResponse({"error": describe_errors(errors)}, status_code=422)


@serve.deployment
@serve.ingress(app)
class OmniDiffusion:
    """One replica: the model, its tokenizers, a batching queue, one sampler thread."""

    def __init__(self, cfg: ServeConfig) -> None:
        import torch

        from omni_model.release.model import is_release_folder
        from serve.engine import Engine
        from serve.threads import model_pool, single_threaded_pool

        logging.basicConfig(level=logging.INFO)
        torch.set_num_threads(1)  # this thread only loads: the model's thread gets the threads (serve/threads.py)
        device = cfg.model.device
        if device == "auto":
            device = "cuda" if cfg.deployment.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.cfg = cfg
        engine = Engine
        if is_release_folder(cfg.model.model):  # the authors' checkpoint: its own prompts and sampler
            from serve.release_engine import ReleaseEngine as engine
        self.engine = engine(cfg, device)
        BodyLimit.max_bytes = cfg.limits.max_request_bytes
        self._model_thread = model_pool(1, "sampler", cfg.deployment.threads)
        self._parse_threads = single_threaded_pool(2, "parse")
        self._pending = 0  # requests admitted to the model queue and not yet answered
        self._generate_batched.set_max_batch_size(cfg.batching.max_batch_size)
        self._generate_batched.set_batch_wait_timeout_s(cfg.batching.wait_timeout_s)
        logger.info("replica ready: %s on %s", cfg.model.model, device)

    def check_health(self) -> None:
        """Serve's periodic health check: raising marks the replica unhealthy, and Serve
        replaces it (a replica whose scheduler stopped would refuse every request)."""
        if not self.engine.healthy:
            raise RuntimeError("the step scheduler's loop is not running")

    # ------------------------------------------------------------------ routes
    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        if not self.engine.healthy:
            return JSONResponse({"status": "unavailable", "model": self.cfg.model.name,
                                 "error": "the step scheduler is not running"}, status_code=503)
        return JSONResponse({"status": "ok", "model": self.cfg.model.name})

    @app.get("/v1/models", response_model=ModelList)
    async def models(self) -> ModelList:
        return ModelList(data=[self.engine.card()])

    @app.get("/v1/stats")
    async def stats(self) -> dict:
        return {**self.engine.stats(), "pending": self._pending, "max_batch_size": self.cfg.batching.max_batch_size}

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS, openapi_extra=_BODY)
    async def generate(self, request: Request) -> GenerateResponse:
        job = await self._parse(request)
        self._admit()
        if self.engine.scheduler is not None:
            loop = asyncio.get_running_loop()
            try:
                ticket = self.engine.ticket(job)
            except BaseException:
                self._release()
                raise
            future = self.engine.scheduler.submit(ticket)
            # the place in the model queue is given back when the ticket leaves the
            # scheduler, not when the client leaves: a cancelled ticket may still wait
            future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._release))
            try:
                # shielded: a cancelled await would cancel the ticket's future, which would
                # give the place back while the ticket is still queued
                output = await asyncio.shield(asyncio.wrap_future(future))
            except asyncio.CancelledError:  # the client went away: Serve cancels the request
                job.cancelled.set()
                raise
            return self.engine.response(job, output, ticket.shared)
        try:
            result = await self._generate_batched(job)
        except asyncio.CancelledError:
            job.cancelled.set()
            raise
        finally:
            self._release()
        if isinstance(result, Exception):
            raise result
        return result

    @app.post("/v1/generate/stream", responses={**ERRORS, 200: {
        "content": {"text/event-stream": {}},
        "description": "`event: progress` per step (step, max_steps, masked, and at some steps "
                       "a `preview` with the text so far and a base64 PNG); a release folder with a "
                       "speech decoder then sends the spoken answer as `event: audio` chunks (index, "
                       "sample_rate, samples, base64 WAV `speech`, final) as they are decoded; then "
                       "`event: result` with a GenerateResponse, or `event: error` (`error`: what "
                       "failed, `status`)"}},
              openapi_extra=_BODY)
    async def generate_stream(self, request: Request) -> StreamingResponse:
        job = await self._parse(request)  # refused requests get their 4xx before the stream starts
        self._admit()  # released when the generation ends (below), however it ends
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def emit(kind: str, data: dict) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, (kind, data))

        if self.engine.scheduler is not None:
            try:
                ticket = self.engine.ticket(job, lambda event: emit("progress", event))
            except BaseException:
                self._release()
                raise

            def finish(future) -> None:  # on the events thread, after the stream's progress events
                self._end_stream(emit, loop, lambda: self.engine.response(job, future.result(), ticket.shared))

            self.engine.scheduler.submit(ticket).add_done_callback(lambda f: self.engine.after_events(lambda: finish(f)))
            return StreamingResponse(self._events(queue, job), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        def work() -> None:
            self._end_stream(emit, loop, lambda: self.engine.stream(job, lambda event: emit("progress", event),
                                                                    lambda event: emit("audio", event)))

        loop.run_in_executor(self._model_thread, work)
        return StreamingResponse(self._events(queue, job), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    def _end_stream(self, emit, loop: asyncio.AbstractEventLoop, result) -> None:
        """A stream's last event: `result` with `result()`'s response, or `error` with
        what failed and its status when it raises (in the stream: the 200 is already
        sent); then the request's place in the model queue is given back."""
        try:
            emit("result", result().model_dump())
        except Exception as exc:
            status, message, _ = failure(exc)
            emit("error", {"error": message, "status": status})
        finally:  # on the event loop's thread, like the admission itself
            loop.call_soon_threadsafe(self._release)

    @staticmethod
    async def _events(queue: asyncio.Queue, job):
        """Server-sent events from the queue until the result or an error."""
        try:
            while True:
                kind, data = await queue.get()
                yield f"event: {kind}\ndata: {json.dumps(data)}\n\n"
                if kind not in ("progress", "audio"):
                    return
        finally:  # finished, or cancelled by a disconnect: either way nothing more is wanted
            job.cancelled.set()

    # ------------------------------------------------------------------ internals
    def _admit(self) -> None:
        """Count a request into the model queue, or refuse it with 503 when it is full.
        (Called on the event loop's thread only, as `_release` is.)"""
        if self._pending >= self.cfg.limits.max_pending:
            raise ClientError(f"this replica has {self._pending} requests waiting for the model, its "
                              f"limit (limits.max_pending); retry later", 503,
                              retry_after_s=self.cfg.deployment.retry_after_s)
        self._pending += 1

    def _release(self) -> None:
        self._pending -= 1

    async def _parse(self, request: Request):
        """The body (its size capped by `BodyLimit`) parsed and checked on a parse thread."""
        raw = await request.body()
        return await asyncio.get_running_loop().run_in_executor(self._parse_threads, self.engine.parse_body, raw)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _generate_batched(self, jobs: list) -> list:
        return await asyncio.get_running_loop().run_in_executor(self._model_thread, self.engine.run, jobs)


def build(cfg: ServeConfig, root: str | Path = ".") -> Application:
    """The application for `serve.run`: model paths resolved against `root`, deployment
    options (replicas or autoscaling, resources, backpressure) from the config."""
    cfg = cfg.with_paths_resolved(root)
    return OmniDiffusion.options(**cfg.deployment_options()).bind(cfg)


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for Serve config files and `serve run`:
    `serve run serve.app:build_app config=configs/tiny/serve.yaml model.model=runs/stage3/final`
    (every key but `config` is a dotted override)."""
    args = dict(args)
    path = args.pop("config", "configs/tiny/serve.yaml")
    cfg = load_serve_config(path, [f"{k}={v}" for k, v in args.items()])
    return build(cfg)
