"""The OpenAI-compatible HTTP app: completions, chat, models, health and Prometheus metrics.

Handlers validate everything up front (so that a bad request gets a 4xx, never a broken stream), queue a
job for the engine worker, then either collect its text or stream it as server-sent events.

Errors the client caused say what was wrong (400, naming the parameter). Anything else is the server's
fault and may carry paths or device errors: the client gets a generic message with the request id (also sent
as X-Request-ID), and the log gets the detail under the same id. What one request may ask (body size,
prompt length, stop strings, the default length) is capped by ServerLimits.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from draftsmith.acceptance import SamplingConfig
from draftsmith.builder import build_engine
from draftsmith.backends.protocol import BackendConfig
from draftsmith.engine import GenerationConfig
from draftsmith.errors import DraftsmithError
from draftsmith.models import LoadedModel, logit_rows
from draftsmith.serve.limits import ServerLimits
from draftsmith.serve.metrics import Metrics
from draftsmith.serve.schemas import (ChatRequest, ChatShape, CompletionRequest, CompletionShape,
                                      GenerationRequest, Shape)
from draftsmith.serve.worker import (Cancelled, EngineWorker, GenerationFailed, Job, QueueFull, Unavailable,
                                     new_request_id)

log = logging.getLogger(__name__)
T = TypeVar("T")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@asynccontextmanager
async def cancel_on_disconnect(request: Request, job: Job) -> AsyncIterator[None]:
    """Cancel the job as soon as the client disconnects, and in any case when the handler is done with it."""

    async def watch() -> None:
        # the body is already read, so receive() now waits for the disconnect
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        yield
    finally:
        watcher.cancel()
        job.cancel()  # a no-op for a finished job; frees the slot of one nobody waits for any more


class RequestGuard:
    """The outermost layer of our own (pure ASGI, so that it sees the raw body): gives every request an id,
    sent back as X-Request-ID; with an API key, refuses a request without it (401; /health stays open for
    liveness probes); refuses a body over the cap with 413 before anything parses it, and one that has not
    fully arrived `body_timeout_s` after the request began with 408 (a client sending half a body would
    otherwise hold its connection forever); and turns an exception that nothing else handled into a generic
    500 naming the request id, with the detail (paths, device errors) in the log only."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, max_body_bytes: int, metrics: Metrics, body_timeout_s: float = 30.0,
                 api_key: str | None = None):
        self.app, self.max_body_bytes, self.metrics = app, max_body_bytes, metrics
        self.body_timeout_s = body_timeout_s
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        started = False

        async def send_with_id(message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        async def refuse(status: int, message: str, kind: str, code: str | None = None,
                         headers: dict | None = None) -> None:
            self.metrics.count("invalid" if status < 500 else "failed")
            await JSONResponse(error_body(message, kind, code=code), status_code=status,
                               headers=headers)(scope, receive, send_with_id)

        headers = dict(scope["headers"])
        if self.expected is not None and scope["path"] not in self.OPEN_PATHS \
                and not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            await refuse(401, "a valid API key is needed: send it as 'Authorization: Bearer KEY'",
                         "invalid_request_error", "invalid_api_key")
            return
        too_large = f"the request body is over this server's limit of {self.max_body_bytes} bytes"
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:  # refused unread
            await refuse(413, too_large, "invalid_request_error", "request_too_large")
            return
        # read the body here, counting, so that a chunked body without a length is capped too; the app
        # then reads it from this buffer, and later receives (the disconnect) come from the server
        parts, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                await refuse(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                             "invalid_request_error", "request_timeout", {"Connection": "close"})
                return
            if message["type"] != "http.request":  # the client left before sending its body
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.max_body_bytes:
                await refuse(413, too_large, "invalid_request_error", "request_too_large")
                return
            if not message.get("more_body", False):
                break
        buffered: dict | None = {"type": "http.request", "body": b"".join(parts), "more_body": False}

        async def replay():
            nonlocal buffered
            if buffered is not None:
                message, buffered = buffered, None
                return message
            return await receive()

        try:
            await self.app(scope, replay, send_with_id)
        except Exception:
            log.exception("request %s failed", request_id)
            if started:  # mid-response: closing the connection is all that is left to do
                return
            await refuse(500, f"internal server error (request id {request_id})", "server_error")


class Server:
    """The engine behind the routes: turns requests into validated jobs and jobs into responses."""

    def __init__(self, loaded: LoadedModel, drafter_spec: str, k: int, model_name: str, queue_size: int,
                 adaptive: bool = False, backend: BackendConfig = BackendConfig(), limits: ServerLimits | None = None,
                 prune: str = "none", **drafter_options):
        GenerationConfig(k=k)  # refuse a bad k at start-up rather than at the first request
        self.loaded, self.k, self.adaptive, self.model_name = loaded, k, adaptive, model_name
        self.limits = limits or ServerLimits()
        self.engine = build_engine(loaded, drafter_spec, backend, prune=prune, **drafter_options)
        self.metrics = Metrics()
        self.worker = EngineWorker(self.engine, queue_size, self.metrics)
        self.created = int(time.time())
        # tokenizing a long prompt takes a while: off the event loop, on one thread (a fast tokenizer's
        # settings are not safe to change from two threads at once)
        self.tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="draftsmith-tokenize")

    async def off_loop(self, fn: Callable[..., T], *args) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, fn, *args)

    # -- requests -> jobs

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise ApiError(404, f"The model '{name}' does not exist: this server serves "
                                f"'{self.model_name}'", param="model", code="model_not_found")

    def check_prompt_chars(self, chars: int, param: str) -> None:
        if chars > self.limits.max_prompt_chars:
            raise ApiError(400, f"the prompt has {chars} characters; this server takes at most "
                                f"{self.limits.max_prompt_chars}", param=param, code="prompt_too_long")

    def check_prompt_tokens(self, ids: list[int], param: str) -> list[int]:
        if len(ids) > self.limits.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(ids)} tokens; this server takes at most "
                                f"{self.limits.max_prompt_tokens}", param=param, code="prompt_too_long")
        return ids

    async def completion_ids(self, body: CompletionRequest) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ApiError(400, "give one prompt per request (batches of prompts are not supported)",
                               param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if isinstance(prompt, str):
            self.check_prompt_chars(len(prompt), "prompt")
            return self.check_prompt_tokens(await self.off_loop(self.loaded.encode, prompt), "prompt")
        vocab = logit_rows(self.loaded.engine_model)
        if any(not 0 <= t < vocab for t in prompt):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return self.check_prompt_tokens(prompt, "prompt")

    async def chat_ids(self, body: ChatRequest) -> list[int]:
        tokenizer = self.loaded.tokenizer
        if not tokenizer.chat_template:
            raise ApiError(400, f"the model '{self.model_name}' has no chat template: use /v1/completions",
                           param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        self.check_prompt_chars(sum(len(m["content"]) for m in messages), "messages")
        try:
            text = await self.off_loop(lambda: tokenizer.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True))
        except TemplateError as e:  # templates raise on messages they refuse (roles out of order, ...)
            raise ApiError(400, f"the chat template refused the messages: {e}", param="messages") from None
        return self.check_prompt_tokens(await self.off_loop(self.loaded.encode, text, True), "messages")

    def check_stops(self, stops: list[str]) -> None:
        """Many or long stop strings cost the stream time every step and make it hold back more text."""
        limits = self.limits
        if len(stops) > limits.max_stop_strings:
            raise ApiError(400, f"{len(stops)} stop strings; this server takes at most {limits.max_stop_strings}",
                           param="stop")
        if any(len(s) > limits.max_stop_chars for s in stops):
            raise ApiError(400, f"a stop string is longer than this server's limit of {limits.max_stop_chars} "
                                f"characters", param="stop")

    def config(self, body: GenerationRequest, prompt_ids: list[int], max_tokens: int | None,
               default_max_tokens: int) -> GenerationConfig:
        """`default_max_tokens` applies when the client gave none; it shrinks to the room the context leaves
        (a client's own max_tokens is refused when it does not fit)."""
        self.check_stops(body.stop_strings)
        context = self.engine.max_context
        room = context - len(prompt_ids) if context else None
        if room is not None and room < 1:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens and fills the model's context of "
                                f"{context} tokens", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = default_max_tokens if room is None else min(default_max_tokens, room)
        if room is not None and max_tokens > room:
            raise ApiError(400, f"max_tokens is {max_tokens} but the model's context of {context} tokens leaves "
                                f"{room} after the prompt's {len(prompt_ids)}", param="max_tokens",
                           code="context_length_exceeded")
        sampling = SamplingConfig(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_k=body.top_k or 0,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
        )
        return GenerationConfig(max_new_tokens=max_tokens, k=self.k, adaptive=self.adaptive, sampling=sampling,
                                stop=body.stop_strings)

    # -- jobs -> responses

    async def respond(self, request: Request, body: GenerationRequest, job: Job, shape: Shape) -> Response:
        try:
            self.worker.submit(job)
        except QueueFull as e:
            self.metrics.count("rejected")
            raise ApiError(429, f"the server is busy ({e}); retry shortly", kind="rate_limit_error",
                           code="queue_full") from None
        except Unavailable as e:
            raise ApiError(503, str(e), kind="server_error") from None
        if body.stream:
            return StreamingResponse(self.events(request, job, shape, body.include_usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        async with cancel_on_disconnect(request, job):
            async for _ in job.texts():
                pass
        return JSONResponse(shape.response(job.result))

    async def events(self, request: Request, job: Job, shape: Shape, include_usage: bool) -> AsyncIterator[str]:
        async with cancel_on_disconnect(request, job):
            for chunk in shape.first_chunks():
                yield sse(chunk)
            # the status line is sent already: errors are reported in the stream, as OpenAI does
            try:
                async for text in job.texts():
                    yield sse(shape.chunk(text))
            except Cancelled:
                return  # the client is gone, or the server stops: nobody to tell
            except DraftsmithError as e:  # the request's settings: the message is the client's to read
                self.metrics.count("invalid")
                yield sse(error_body(str(e), "invalid_request_error"))
            except GenerationFailed as e:  # logged by the worker
                yield sse(error_body(str(e), "server_error"))
            except Exception:
                log.exception("request %s failed while streaming", job.request_id)
                yield sse(error_body(f"internal server error (request id {job.request_id})", "server_error"))
            else:
                for chunk in shape.last_chunks(job.result, include_usage):
                    yield sse(chunk)
            yield sse("[DONE]")

    def metrics_text(self) -> str:
        return self.metrics.render({
            "queue_waiting": (self.worker.waiting, "Requests waiting for the engine."),
            "engine_busy": (int(self.worker.busy), "1 while the engine serves a request."),
        })


def add_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error leaves as an OpenAI-style body; FastAPI's 422 for a bad body becomes OpenAI's 400."""

    def reply(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
              code: str | None = None) -> JSONResponse:
        if 400 <= status < 500 and status != 429:
            metrics.count("invalid")
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError) -> JSONResponse:
        return reply(e.status, e.message, e.kind, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        # our validators' messages (a lone surrogate, ...) say more than a union member's type mismatch
        error = next((err for err in errors if err["type"] == "value_error"), errors[0])
        # a value that fits no member of a union fails once per member (prompt.str, prompt.list[str], ...):
        # name the path the failures share; [1:] drops the leading "body"
        same_field = [err["loc"] for err in errors if err["loc"][:2] == error["loc"][:2]]
        shared = [parts[0] for parts in zip(*same_field) if len(set(parts)) == 1]
        loc = [str(part) for part in shared[1:]]
        if error["type"] == "json_invalid":
            return reply(400, f"the body is not valid JSON: {error.get('ctx', {}).get('error', error['msg'])}")
        if error["type"] == "model_attributes_type" and not loc:  # a list, a number, or a non-JSON content type
            return reply(400, "the body must be a JSON object (sent with Content-Type: application/json)",
                         code="invalid_body")
        if error["type"] == "missing":
            message = f"missing required parameter '{'.'.join(loc)}'" if loc else "the request needs a JSON body"
        else:
            detail = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for our validators' messages
            message = f"invalid '{'.'.join(loc)}': {detail}" if loc else f"invalid body: {detail}"
        return reply(400, message, param=loc[0] if loc else None, code=error["type"])

    @app.exception_handler(DraftsmithError)
    async def bad_settings(_: Request, e: DraftsmithError) -> JSONResponse:
        return reply(400, str(e))

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, e: HTTPException) -> JSONResponse:
        if e.status_code == 400 and e.detail == "There was an error parsing the body":  # FastAPI's, on bad bytes
            return reply(400, "the body could not be parsed: send a JSON object encoded in UTF-8",
                         code="invalid_body")
        return reply(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)

    @app.exception_handler(Cancelled)
    async def cancelled(_: Request, e: Cancelled) -> JSONResponse:
        return reply(503, str(e), kind="server_error")

    @app.exception_handler(GenerationFailed)
    async def generation_failed(_: Request, e: GenerationFailed) -> JSONResponse:
        return reply(500, str(e), kind="server_error")  # the detail is in the log, under the request id

    # any other exception reaches RequestGuard: a generic 500, the detail logged


def create_app(
    loaded: LoadedModel,
    drafter_spec: str = "ngram",
    k: int = 8,
    model_name: str | None = None,
    queue_size: int = 64,
    adaptive: bool = False,
    backend: BackendConfig = BackendConfig(),
    limits: ServerLimits | None = None,
    prune: str = "none",
    api_key: str | None = None,
    **drafter_options,
) -> FastAPI:
    """An app serving `loaded` with speculative decoding; the engine worker runs while the app is up. `prune`:
    none or predictor[:DIR], the acceptance predictor cutting tree drafts (lossless); `backend`: how the target's
    forward runs (weights, CUDA graphs, compiled, fused kernels), as for generate and bench; `api_key`: when
    given, every request but /health needs `Authorization: Bearer API_KEY`."""
    server = Server(loaded, drafter_spec, k, model_name or loaded.name, queue_size, adaptive, backend, limits,
                    prune, **drafter_options)
    limits = server.limits

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        server.worker.start()
        yield
        await asyncio.to_thread(server.worker.stop)
        server.tokenizing.shutdown(wait=False)

    app = FastAPI(title="draftsmith", lifespan=lifespan)
    app.state.server = server
    add_error_handlers(app, server.metrics)
    app.add_middleware(RequestGuard, max_body_bytes=limits.max_body_bytes, metrics=server.metrics,
                       body_timeout_s=limits.body_timeout_s, api_key=api_key)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server.check_model(body.model)
        ids = await server.completion_ids(body)
        config = server.config(body, ids, body.max_tokens, limits.completion_default_max_tokens)
        job = Job(ids, config, request_id=request.state.request_id)
        return await server.respond(request, body, job, CompletionShape(server.model_name))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        server.check_model(body.model)
        ids = await server.chat_ids(body)
        config = server.config(body, ids, body.max_completion_tokens or body.max_tokens, limits.default_max_tokens)
        job = Job(ids, config, request_id=request.state.request_id)
        return await server.respond(request, body, job, ChatShape(server.model_name))

    def model_card() -> dict:
        return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "draftsmith"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict:
        server.check_model(name)
        return model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = server.worker.alive
        return JSONResponse({"status": "ok" if alive else "engine stopped", "model": server.model_name,
                             "waiting": server.worker.waiting, "busy": server.worker.busy},
                            status_code=200 if alive else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(server.metrics_text(), media_type="text/plain; version=0.0.4")

    return app
