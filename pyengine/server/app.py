"""The HTTP side: FastAPI routes in OpenAI's shapes on top of a `Scheduler`.

Errors are OpenAI's JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for bad JSON,
bad fields and prompts longer than the context, 401 for a wrong API key, 404 for unknown routes and
models, 413 for bodies over the cap, 503 when every slot is busy and the queue is full.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat_template import ChatTemplate, TemplateError
from ..generation import GenerationStats, TokenLogprob
from .._C import ContextLengthError
from ..constraint import json_constraint
from ..sampling import SamplingParams, json_schema_of
from ..tokenizer import Tokenizer
from .scheduler import Job, QueueFullError, Scheduler
from .schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, check_supported

__all__ = ["ServerConfig", "create_app"]

MAX_EMBED_INPUTS = 64  # inputs per /v1/embeddings request: one batch, one sequence each
COUNTERS = {"requests_finished", "requests_cancelled", "requests_failed", "tokens_generated", "prompt_tokens",
            "prompt_tokens_reused", "engine_steps", "engine_step_rows", "engine_step_seconds"}

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 503: "server_overloaded"}


@dataclass
class ServerConfig:
    model_id: str  # the name /v1/models lists and requests must use
    api_key: str | None = None  # bearer token required on every route but /health
    max_body_bytes: int = 1 << 20
    max_tokens_cap: int = 4096  # the largest max_tokens a request may ask for
    disconnect_poll_s: float = 0.25  # how often a non-streaming request checks that its client is still there


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _ERROR_TYPES.get(status, "server_error"), "param": param,
                      "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class _Guard:
    """ASGI middleware, before any routing: the API key, then the body size cap.

    The body is read here (up to the cap) and replayed to the app, so a client that streams an endless
    chunked body is cut off at the cap, as one that announces a large Content-Length is."""

    def __init__(self, app: Any, config: ServerConfig):
        self.app, self.config = app, config

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = self.config.api_key
        if key and scope["path"] != "/health":
            auth = headers.get("authorization", "")
            if auth[:7].lower() != "bearer " or not _same(auth[7:].strip(), key):
                response = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)",
                                          code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        cap = self.config.max_body_bytes
        too_large = error_response(413, f"request body larger than {cap} bytes", code="request_too_large")
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > cap:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away before sending its body
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _same(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


def create_app(scheduler: Scheduler, tokenizer: Tokenizer, config: ServerConfig,
               template: ChatTemplate | None = None) -> FastAPI:
    """The FastAPI app serving `scheduler`'s model under `config.model_id`."""
    template = template or ChatTemplate.for_tokenizer(tokenizer)
    created = int(time.time())
    app = FastAPI(title="pyengine", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, config=config)
    app.state.scheduler = scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return error_response(e.status_code, message, headers=getattr(e, "headers", None))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", **scheduler.status()}

    @app.get("/metrics")
    async def metrics() -> Response:
        """Prometheus text format: the scheduler's counters and gauges."""
        lines = []
        for name, value in scheduler.status().items():
            metric = f"pyengine_{name}" + ("_total" if name in COUNTERS else "")
            lines += [f"# TYPE {metric} {'counter' if name in COUNTERS else 'gauge'}", f"{metric} {value}"]
        return Response("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(config.model_id, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        _check_model(model_id, config)
        return _model_card(config.model_id, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        _check_generates(scheduler)
        req = _parse(await request.body(), ChatCompletionRequest)
        _check_model(req.model, config)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m.content, i)}
                    for i, m in enumerate(req.messages)]
        try:
            prompt = template.render(messages, add_generation_prompt=True)
        except TemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        # As transformers' apply_chat_template: the template writes BOS itself where the model wants one.
        ids = _encode(tokenizer, prompt, False, "messages")
        return await _serve(request, req, ids, "chat.completion", scheduler, config, tokenizer)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        req = _parse(await request.body(), EmbeddingRequest)
        _check_model(req.model, config)
        inputs = _embedding_inputs(req.input, tokenizer)
        try:
            vectors = await asyncio.to_thread(scheduler.engine.embed, inputs)
        except ContextLengthError as e:
            raise ApiError(400, str(e), "input", "context_length_exceeded") from None
        n_tokens = sum(len(x) for x in inputs)
        return JSONResponse({"object": "list", "model": config.model_id,
                             "data": [{"object": "embedding", "index": i, "embedding": v.tolist()}
                                      for i, v in enumerate(vectors)],
                             "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens}})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        _check_generates(scheduler)
        req = _parse(await request.body(), CompletionRequest)
        _check_model(req.model, config)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            if any(not 0 <= t < tokenizer.n_vocab for t in prompt):
                raise ApiError(400, f"token ids must be in [0, {tokenizer.n_vocab})", "prompt")
            ids = list(prompt)
        else:
            text = (prompt[0] if prompt else "") if isinstance(prompt, list) else prompt
            ids = _encode(tokenizer, text or "", True, "prompt")
        return await _serve(request, req, ids, "text_completion", scheduler, config, tokenizer)

    return app


def _check_generates(scheduler: Scheduler) -> None:
    if scheduler.engine.config.get("family") == "encoder":
        raise ApiError(400, f"this model is an encoder ({scheduler.engine.config['arch']}): it makes embeddings "
                       "(/v1/embeddings), not text", "model")


def _embedding_inputs(given: Any, tokenizer: Tokenizer) -> list[list[int]]:
    """OpenAI's input: a string, a list of strings, a list of token ids, or a list of such lists."""
    items = given if isinstance(given, list) and given and not isinstance(given[0], int) else [given]
    if not items or len(items) > MAX_EMBED_INPUTS:
        raise ApiError(400, f"input must hold 1 to {MAX_EMBED_INPUTS} items", "input")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = _encode(tokenizer, item, True, "input")
        elif isinstance(item, list) and all(isinstance(t, int) and 0 <= t < tokenizer.n_vocab for t in item):
            ids = list(item)
        else:
            raise ApiError(400, f"input {i}: a string or a list of token ids in [0, {tokenizer.n_vocab})", "input")
        if not ids:
            raise ApiError(400, f"input {i} is empty", "input")
        out.append(ids)
    return out


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool, param: str) -> list[int]:
    try:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    except ValueError as e:  # text that is not valid Unicode (lone surrogates from JSON escapes)
        raise ApiError(400, str(e), param) from None


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "pyengine"}


def _check_model(name: str, config: ServerConfig) -> None:
    if name not in (config.model_id, config.model_id + ".gguf"):
        raise ApiError(404, f"the model {name!r} does not exist; this server has {config.model_id!r}", "model",
                       "model_not_found")


def _parse(body: bytes, schema: type) -> Any:
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the request body nests JSON too deeply", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param) from None
    unsupported = check_supported(req)
    if unsupported:
        raise ApiError(400, *unsupported)
    return req


def _text(content: Any, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise ApiError(400, f"only text content parts are supported, got type {part.get('type')!r}",
                           f"messages.{index}.content")
        texts.append(part["text"])
    return "".join(texts)


def _sampling_params(req: Any, n_prompt: int, scheduler: Scheduler, config: ServerConfig,
                     tokenizer: Tokenizer) -> SamplingParams:
    if n_prompt == 0:
        raise ApiError(400, "the prompt is empty", "prompt")
    if n_prompt > scheduler.n_ctx:
        raise ApiError(400, f"the prompt has {n_prompt} tokens, more than the context of {scheduler.n_ctx}",
                       "messages" if isinstance(req, ChatCompletionRequest) else "prompt", "context_length_exceeded")
    max_tokens = req.requested_max_tokens()
    param = "max_completion_tokens" if getattr(req, "max_completion_tokens", None) is not None else "max_tokens"
    if max_tokens is not None and max_tokens > config.max_tokens_cap:
        raise ApiError(400, f"{param} is {max_tokens}, more than this server allows ({config.max_tokens_cap})", param)
    room = scheduler.n_ctx - n_prompt + 1  # generation stops at a full context anyway
    limit = min(config.max_tokens_cap, room) if max_tokens is None else min(max_tokens, room)
    try:
        constrained, schema = json_schema_of(req.response_format)
        if constrained:
            json_constraint(tokenizer, schema)  # a schema it cannot enforce is the client's error
    except (ValueError, ImportError) as e:
        raise ApiError(400, str(e), "response_format") from None
    try:
        return _params(req, limit)
    except ValueError as e:
        raise ApiError(400, str(e).removeprefix("SamplingParams: ").split(", got ")[0]) from None


def _params(req: Any, limit: int) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=limit, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, min_p=req.min_p,
        repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty, seed=req.seed, stop=tuple(s for s in req.stop_list() if s),
        response_format=req.response_format,
    )


def _usage(n_prompt: int, stats: list[GenerationStats | None]) -> dict:
    generated = sum(st.generated_tokens for st in stats if st is not None)
    return {"prompt_tokens": n_prompt, "completion_tokens": generated, "total_tokens": n_prompt + generated}


def _logprobs_json(entries: list[TokenLogprob], chat: bool, tokenizer: Tokenizer, offset: int = 0) -> dict:
    """OpenAI's logprobs object: chat's {"content": [...]}, or completions' parallel lists."""
    def text(t: int) -> tuple[str, list[int]]:
        b = tokenizer.token_to_piece(t)
        return b.decode("utf-8", errors="replace"), list(b)

    if chat:
        content = []
        for e in entries:
            tok, raw = text(e.token)
            top = [{"token": (tt := text(t))[0], "logprob": lp, "bytes": tt[1]} for t, lp in e.top]
            content.append({"token": tok, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content}
    tokens = [text(e.token)[0] for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{text(t)[0]: lp for t, lp in e.top} for e in entries], "text_offset": offsets}


def _submit(scheduler: Scheduler, ids: list[int], params: SamplingParams, n: int) -> list[Job]:
    """n jobs for n choices; with a seed, choice i samples with seed + i."""
    jobs: list[Job] = []
    try:
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            jobs.append(scheduler.submit(ids, dataclasses.replace(params, seed=seed)))
    except QueueFullError:
        for job in jobs:
            job.cancel()
        raise
    return jobs


def _merge(jobs: list[Job]) -> tuple[asyncio.Queue, list[asyncio.Task]]:
    """One queue of (choice index, event, value) fed by every job's events."""
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, job: Job) -> None:
        while True:
            event, value = await job.events.get()
            merged.put_nowait((i, event, value))
            if event not in ("text", "logprobs"):
                return

    return merged, [asyncio.create_task(pump(i, job)) for i, job in enumerate(jobs)]


async def _serve(request: Request, req: Any, ids: list[int], kind: str, scheduler: Scheduler,
                 config: ServerConfig, tokenizer: Tokenizer) -> Response:
    params = dataclasses.replace(_sampling_params(req, len(ids), scheduler, config, tokenizer),
                                 logprobs=req.n_top_logprobs())
    try:
        jobs = _submit(scheduler, ids, params, req.n)
    except QueueFullError as e:
        return error_response(503, str(e), code="server_busy", headers={"Retry-After": "1"})
    chat = kind == "chat.completion"
    meta = {"id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
            "model": config.model_id}
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(_stream(jobs, meta, chat, len(ids), include_usage, tokenizer),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    n = len(jobs)
    pieces: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    stats: list[GenerationStats | None] = [None] * n
    merged, pumps = _merge(jobs)
    loop = asyncio.get_running_loop()
    next_check = loop.time() + config.disconnect_poll_s
    try:
        while any(st is None for st in stats):
            try:
                i, event, value = await asyncio.wait_for(merged.get(), config.disconnect_poll_s)
            except asyncio.TimeoutError:
                i, event, value = None, None, None
            # Checked on a clock, not only when no text arrives: a fast model never leaves the queue idle.
            if loop.time() >= next_check:
                next_check = loop.time() + config.disconnect_poll_s
                if await request.is_disconnected():
                    return Response(status_code=499)
            if event == "text":
                pieces[i].append(value)
            elif event == "logprobs":
                logprobs[i] += value
            elif event == "done":
                stats[i] = value
            elif event == "error":
                return error_response(500, f"generation failed: {value}", code="generation_failed")
    finally:
        for job in jobs:
            job.cancel()  # no-op when done; frees the slot when the client left or the handler was cancelled
        for pump in pumps:
            pump.cancel()
    choices = []
    for i in range(n):
        text = "".join(pieces[i])
        lp = None if params.logprobs is None else _logprobs_json(logprobs[i], chat, tokenizer)
        choice: dict[str, Any] = {"index": i, "finish_reason": stats[i].finish_reason, "logprobs": lp}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choices.append(choice)
    return JSONResponse({**meta, "object": kind, "choices": choices, "usage": _usage(len(ids), stats)})


async def _stream(jobs: list[Job], meta: dict, chat: bool, n_prompt: int, include_usage: bool,
                  tokenizer: Tokenizer) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`; with n > 1 the
    choices' chunks interleave, each carrying its index."""
    kind = "chat.completion.chunk" if chat else "text_completion"
    n = len(jobs)
    pending_logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    offsets = [0] * n
    stats: list[GenerationStats | None] = [None] * n
    want_logprobs = jobs[0].params.logprobs is not None

    def chunk(i: int, delta: dict | str, finish_reason: str | None = None) -> str:
        lp = None
        if want_logprobs and pending_logprobs[i]:
            lp = _logprobs_json(pending_logprobs[i], chat, tokenizer, offsets[i])
            pending_logprobs[i] = []
        choice: dict[str, Any] = {"index": i, "finish_reason": finish_reason, "logprobs": lp}
        if chat:
            choice["delta"] = delta
        else:
            choice["text"] = delta
            offsets[i] += len(delta)
        body: dict[str, Any] = {**meta, "object": kind, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    if n == 1:  # the job's own queue: no pump task between it and the response
        merged, pumps = jobs[0].events, []
        tag = lambda e: (0, *e)  # noqa: E731
    else:
        merged, pumps = _merge(jobs)
        tag = lambda e: e  # noqa: E731
    try:
        if chat:
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": ""})
        failed = False
        while not failed and any(st is None for st in stats):
            # Whatever else has arrived goes out in the same write, a choice's consecutive text pieces in
            # one chunk: when the engine outruns this loop (many streams), a step costs one send per
            # stream, not one per token. Alone, a stream gets its tokens one by one as before.
            events = [tag(await merged.get())]
            while not merged.empty():
                events.append(tag(merged.get_nowait()))
            parts: list[str] = []
            texts: dict[int, str] = {}  # choice -> text not yet in a chunk (insertion order = arrival)

            def flush(i: int) -> None:
                if i in texts:
                    value = texts.pop(i)
                    parts.append(chunk(i, {"content": value} if chat else value))

            for i, event, value in events:
                if event == "logprobs":
                    pending_logprobs[i] += value
                elif event == "text":
                    texts[i] = texts.get(i, "") + value
                elif event == "done":
                    flush(i)
                    stats[i] = value
                    parts.append(chunk(i, {} if chat else "", value.finish_reason))
                else:
                    for j in list(texts):
                        flush(j)
                    error = {"message": f"generation failed: {value}", "type": "server_error", "param": None,
                             "code": "generation_failed"}
                    parts.append(f"data: {json.dumps({'error': error})}\n\n")
                    failed = True
                    break
            for j in list(texts):
                flush(j)
            yield "".join(parts)
        if not failed and include_usage:
            usage = _usage(n_prompt, stats)
            yield f"data: {json.dumps({**meta, 'object': kind, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for job in jobs:
            job.cancel()  # the client disconnected (the response was cancelled), or we are done
        for pump in pumps:
            pump.cancel()
