"""The FastAPI application: OpenAI-compatible chat completions, /health, /v1/models and the playground.

    app = create_app(model, tokenizer, model_name="rr-smollm2", probe=load_probe("runs/probe"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request goes through one `Batcher`: batches of up to `batch_size` requests that arrive within
`batch_wait_ms`, generated a step at a time in a thread so that the event loop stays responsive, the
batch with the least work left first. Every failure is an OpenAI-style error object
(`protocol.error_body`), and every failure is one request's: a bad request is a 400 before it reaches a
batch, a request that fails in generation fails alone. Bounded: at most `max_queue` requests wait (429
with Retry-After), a request has `request_timeout` seconds from arrival to its last token (504), prompt +
max_tokens at most `max_total_tokens`, and a request whose client has gone stops generating. Guarded
(`guards.py`): the Host header must name this server and the body must be JSON (415). Tools and tool
calls: `tool_calls.py`. See docs/serving.md.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
import math
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Sequence

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import chat_prompt
from .batcher import Batcher, Job, QueueFull
from .engine import BatchGeneration, GenRequest, GenResult, sigmoid
from .guards import HostPolicy, require_json
from .monitoring import make_monitor
from .protocol import (DEFAULT_MAX_INPUT_TOKENS, DEFAULT_MAX_QUEUE, DEFAULT_MAX_TOKENS, DEFAULT_MAX_TOKENS_LIMIT,
                       DEFAULT_MAX_TOTAL_TOKENS, DEFAULT_REQUEST_TIMEOUT, ApiError, ChatRequest, decode_json_body,
                       error_body, parse_chat_request)
from .tool_calls import CallStream, ToolPlan, answer, openai_calls, plan_for

log = logging.getLogger("circuit_breakers.serving")

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
MAX_BODY_BYTES = 4 * 1024 * 1024
BASELINE_SUFFIX = "-baseline"
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away; nobody reads it, logs show it


@dataclass
class Target:
    """A model the server answers as: the circuit-broken one (with the probe, if any) or the baseline."""

    name: str
    model: Any
    tokenizer: Any
    probe: Any = None
    context: int | None = None  # the model's maximum sequence length, when its config says
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass
class Work:
    """What the worker needs for one request."""

    target: Target
    chat: ChatRequest
    conversation: list[dict]
    prompt_ids: list[int]
    max_tokens: int
    tools: ToolPlan = field(default_factory=ToolPlan)
    on_delta: Any = None  # (text, score|None) -> None, from the worker thread
    job: Job | None = None

    def cancelled(self) -> bool:
        return self.job is not None and (self.job.cancelled or (self.job.future is not None
                                                                 and self.job.future.cancelled()))


def _context_length(model) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _finite(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _error(status: int, message: str, **kwargs) -> JSONResponse:
    return JSONResponse(error_body(message, **kwargs), status_code=status)


def length_class(prompt_tokens: int) -> int:
    """Prompts batched together: up to 256 tokens, then each power of two (padding at most doubles a prompt)."""
    return max(0, (prompt_tokens - 1).bit_length() - 8)


def playground_html() -> str:
    return resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")


def create_app(model, tokenizer, *, model_name: str, probe=None, baseline=None, api_key: str | None = None,
               max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT, max_input_tokens: int = DEFAULT_MAX_INPUT_TOKENS,
               max_total_tokens: int = DEFAULT_MAX_TOTAL_TOKENS, batch_size: int = 8, batch_wait_ms: float = 10,
               max_queue: int = DEFAULT_MAX_QUEUE, request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT,
               default_max_tokens: int = DEFAULT_MAX_TOKENS, refusal: str = DEFAULT_REFUSAL,
               baseline_name: str | None = None, host: str = "127.0.0.1",
               allowed_hosts: Sequence[str] = ()) -> FastAPI:
    """An OpenAI-compatible server for `model` (answering as `model_name`).

    probe: a harmfulness probe (`circuit_breakers.probes.probe.load_probe`) that monitors the
        circuit-broken model; a tripped generation returns `refusal` with finish_reason "content_filter".
    baseline: the original model, served as "<model_name>-baseline": a (model, tokenizer) pair, or a model
        that shares `tokenizer`.
    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>` (401 otherwise), and /health shows
        more than its status only to that key; when None, any key or none is accepted. / never needs one.
    max_tokens_limit: the largest max_tokens a request may ask for (more: 400).
    max_input_tokens: the longest prompt, in tokens after the chat template (more: 400).
    max_total_tokens: prompt + max_tokens of one request (more: 400; without max_tokens, what is left).
    max_queue: requests waiting for generation (more: 429 with Retry-After).
    request_timeout: seconds from a request's arrival to its last token (later: 504, or an error event in a
        stream; its generation stops); None: no limit.
    default_max_tokens: max_tokens when a request gives none (capped by the limit and the context).
    host: the address the server is bound to; with `allowed_hosts` (names, "*.domain", "*" for any), what
        the Host header must name (`guards.HostPolicy`; the loopback names are always accepted).
    """
    for name, value in (("max_tokens_limit", max_tokens_limit), ("max_input_tokens", max_input_tokens),
                        ("max_total_tokens", max_total_tokens), ("max_queue", max_queue)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1")
    if request_timeout is not None and not request_timeout > 0:
        raise ValueError("request_timeout must be more than 0 seconds (None: no limit)")
    tokenizers = [(tokenizer, "model")]
    if baseline is not None:
        tokenizers.append((baseline[1] if isinstance(baseline, tuple) else tokenizer, "baseline"))
    for tok, what in tokenizers:
        if getattr(tok, "chat_template", None) is None:
            raise ValueError(f"the {what}'s tokenizer has no chat template; a chat server needs one")

    targets: dict[str, Target] = {model_name: Target(model_name, model, tokenizer, probe, _context_length(model))}
    if baseline is not None:
        base_model, base_tokenizer = baseline if isinstance(baseline, tuple) else (baseline, tokenizer)
        name = baseline_name or model_name + BASELINE_SUFFIX
        targets[name] = Target(name, base_model, base_tokenizer, None, _context_length(base_model))
    names = list(targets)

    # The handlers tokenize with their own copies, one thread, so that they never share a (Rust)
    # tokenizer with the generation thread.
    request_tokenizers = {name: copy.deepcopy(t.tokenizer) for name, t in targets.items()}
    tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cb-tokenize")

    # The monitor fixes the probe's threshold when it is built: the one reported is the one compared.
    monitors = {name: make_monitor(t.model, t.probe) for name, t in targets.items() if t.probe is not None}
    thresholds = {name: _finite(sigmoid(m.threshold)) for name, m in monitors.items()}

    def start_batch(jobs: list[Job]) -> BatchGeneration:
        works: list[Work] = [job.payload for job in jobs]
        target = works[0].target
        return BatchGeneration(target.model, target.tokenizer, [
            GenRequest(w.prompt_ids, w.max_tokens, w.chat.stop, w.chat.temperature, w.chat.top_p, w.chat.seed,
                       on_delta=w.on_delta, cancelled=w.cancelled) for w in works],
            monitor=monitors.get(target.name), refusal=refusal)

    batcher = Batcher(start_batch, batch_size=batch_size, batch_wait_ms=batch_wait_ms, max_queue=max_queue)
    hosts = HostPolicy(host, allowed_hosts)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()  # a later start (another test client, a restarted server) gets a new worker

    app = FastAPI(title="circuit-breakers", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, dependencies=[Depends(hosts.check)])
    app.state.batcher = batcher
    app.state.targets = targets
    app.state.request_timeout = request_timeout

    # ------------------------------------------------------------------ errors: always OpenAI-shaped

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):
        errors = exc.errors()
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return _error(400, f"invalid request: {first.get('msg', 'bad request')}", param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(exc.status_code, str(exc.detail), code=code)

    @app.exception_handler(ApiError)
    async def _api(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    def has_key(request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return (api_key is not None and scheme.lower() == "bearer"
                and hmac.compare_digest(given.strip().encode(), api_key.encode()))

    async def require_key(request: Request) -> None:
        if api_key is None or has_key(request):
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError("missing API key: send `Authorization: Bearer <key>`", status=401,
                           code="invalid_api_key")
        raise ApiError("incorrect API key", status=401, code="invalid_api_key")

    # ------------------------------------------------------------------ endpoints

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(playground_html())

    @app.get("/health")
    async def health(request: Request):
        if not has_key(request):  # counters and limits are for the key's holder; a keyless server shows none
            return {"status": "ok"}
        return {"status": "ok", "model": model_name, "models": names,
                "baseline": names[1] if len(names) > 1 else None,
                "probe": None if probe is None else {"layer": monitors[model_name].layer,
                                                     "threshold": thresholds[model_name]},
                "auth_required": True, "max_tokens_limit": max_tokens_limit,
                "max_input_tokens": max_input_tokens, "max_total_tokens": max_total_tokens,
                "max_queue": max_queue, "request_timeout": request_timeout, "batch_size": batch_size,
                "batches": batcher.stats.batches, "requests": batcher.stats.jobs, "waiting": batcher.waiting,
                "generating": batcher.running, "rejected": batcher.stats.rejected}

    def model_entry(t: Target) -> dict:
        entry = {"id": t.name, "object": "model", "created": t.created, "owned_by": "circuit-breakers",
                 "max_tokens_limit": max_tokens_limit}
        if t.context:
            entry["max_model_len"] = t.context
        if t.name in monitors:
            entry["circuit_breaker"] = {"layer": monitors[t.name].layer, "threshold": thresholds[t.name]}
        return entry

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def list_models():
        return {"object": "list", "data": [model_entry(t) for t in targets.values()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def get_model(model_id: str):
        if model_id not in targets:
            raise ApiError(f"model {model_id!r} does not exist", status=404, param="model", code="model_not_found")
        return model_entry(targets[model_id])

    @app.post("/v1/chat/completions", dependencies=[Depends(require_key), Depends(require_json)])
    async def chat_completions(request: Request):
        arrived = time.monotonic()
        chat = parse_chat_request(decode_json_body(await _read_body(request)), models=names,
                                  max_tokens_limit=max_tokens_limit, default_max_tokens=default_max_tokens)
        target = targets[chat.model]
        prompt_ids, plan = await asyncio.get_running_loop().run_in_executor(
            tokenize_pool, _tokenize, request_tokenizers[target.name], chat)
        max_tokens = _fit_to_context(chat, target, len(prompt_ids), max_input_tokens, max_total_tokens)
        work = Work(target, chat, chat.messages, prompt_ids, max_tokens, plan)
        if chat.stream:
            return _stream(work, arrived)
        job = _enqueue(work)
        answer = asyncio.ensure_future(batcher.wait(job, _time_left(arrived)))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not answer.done():  # the client went away (or the server stops): stop generating for it
                answer.cancel()
        if answer.cancelled():
            return Response(status_code=CLIENT_CLOSED)
        try:
            result: GenResult = answer.result()
        except asyncio.TimeoutError:
            raise timeout_error() from None
        except Exception as err:  # noqa: BLE001 - a failed generation is a 500, never a crash
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")
        return _completion(work, result, threshold=thresholds.get(target.name))

    def _time_left(arrived: float) -> float | None:
        return None if request_timeout is None else max(0.0, arrived + request_timeout - time.monotonic())

    def timeout_error() -> ApiError:
        return ApiError(f"the request did not finish within this server's time limit of {request_timeout:g} s "
                        "(--request-timeout); ask for fewer max_tokens or send a shorter prompt, or try again "
                        "when the server is less busy", status=504, type="server_error", code="timeout")

    def _enqueue(work: Work) -> Job:
        # One batch per model and prompt-length class; every request setting is per row.
        job = Job((work.target.name, length_class(len(work.prompt_ids))), work,
                  cost=len(work.prompt_ids) + work.max_tokens)
        work.job = job
        try:
            batcher.enqueue(job)
        except QueueFull as full:
            raise ApiError(f"the server is busy: {full}, the most it queues (--max-queue {max_queue}); "
                           f"retry after {full.retry_after} s", status=429, type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(full.retry_after)}) from None
        return job

    def _stream(work: Work, arrived: float) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def on_delta(text, score):
            job.sent = True  # from here on a retry would repeat text the client has
            loop.call_soon_threadsafe(queue.put_nowait, (text, score))

        work.on_delta = on_delta
        job = _enqueue(work)  # before the response starts: a full queue is still a 429
        task = asyncio.ensure_future(batcher.wait(job, _time_left(arrived)))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        cid, created = _completion_id(), int(time.time())
        threshold = thresholds.get(work.target.name)
        calls_stream = CallStream(work.tools) if work.tools.mode != "none" else None

        def chunk(delta: dict, finish_reason=None, **extra) -> str:
            payload = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": work.target.name,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}
            payload.update(extra)
            return f"data: {json.dumps(payload)}\n\n"

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (item := await queue.get()) is not None:
                    text, score = item
                    extra = {"circuit_breaker": {"token_score": _finite(score)}} if score is not None else {}
                    if calls_stream is None:
                        yield chunk({"content": text}, **extra)
                        continue
                    text = calls_stream.feed(text)  # a call is held back until it is complete
                    if text or extra:
                        yield chunk({"content": text} if text else {}, **extra)
                try:
                    result: GenResult = task.result()
                except Exception as err:  # noqa: BLE001
                    if isinstance(err, asyncio.TimeoutError):
                        body = timeout_error().body()
                    else:
                        log.exception("generation failed")
                        body = error_body(f"generation failed: {err}", type="server_error")
                    yield f"data: {json.dumps(body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                extra = {}
                if result.circuit_breaker is not None:
                    extra["circuit_breaker"] = {**result.circuit_breaker, "threshold": threshold}
                delta, finish_reason = {}, result.finish_reason
                if result.finish_reason == "content_filter":
                    delta = {"content": refusal}  # the text before the trip has been sent already
                elif calls_stream is not None:
                    content, calls, finish_reason = answer(work.tools, result.text, result.finish_reason)
                    rest = calls_stream.rest(content, calls)
                    if rest:
                        yield chunk({"content": rest})
                    for index, call in enumerate(openai_calls(calls)):
                        yield chunk({"tool_calls": [{"index": index, **call}]})
                yield chunk(delta, finish_reason, **extra)
                if work.chat.include_usage:
                    yield f"data: {json.dumps(_usage_chunk(cid, created, work, result))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not task.done():  # the client went away: stop generating for it
                    job.cancelled = True
                    task.cancel()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


# ---------------------------------------------------------------------- helpers


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


async def _read_body(request: Request) -> bytes:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
    return bytes(raw)


async def _client_gone(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: the next ASGI message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _tokenize(tokenizer, chat: ChatRequest) -> tuple[list[int], ToolPlan]:
    """The prompt's token ids (the chat template with the request's tools, and a forced call's opening)."""
    plan = plan_for(tokenizer, chat)
    try:
        text = chat_prompt(tokenizer, chat.messages, prefill=plan.prefill, tools=chat.tools or None)
    except Exception as err:  # noqa: BLE001 - a template that rejects the conversation (jinja raise_exception)
        raise ApiError(f"messages: the model's chat template rejects this conversation: {err}",
                       param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids, plan


def _fit_to_context(chat: ChatRequest, target: Target, prompt_tokens: int, max_input_tokens: int,
                    max_total_tokens: int) -> int:
    """max_tokens for this request: what it asked, if prompt + max_tokens fits; else what is left, if it did not ask."""
    if prompt_tokens > max_input_tokens:
        raise ApiError(f"the prompt is {prompt_tokens} tokens after the chat template, more than this server's "
                       f"limit of {max_input_tokens} (--max-input-tokens)", param="messages",
                       code="context_length_exceeded")
    limit, what = max_total_tokens, f"this server's limit of {max_total_tokens} tokens (--max-total-tokens)"
    if target.context is not None and target.context < limit:
        limit, what = target.context, f"this model's context of {target.context} tokens"
    room = limit - prompt_tokens
    if room < 1:
        raise ApiError(f"the prompt is {prompt_tokens} tokens after the chat template; with a token to generate it "
                       f"does not fit {what}", param="messages", code="context_length_exceeded")
    if chat.max_tokens_param is not None and chat.max_tokens > room:
        raise ApiError(f"{chat.max_tokens_param}: the prompt ({prompt_tokens} tokens) plus {chat.max_tokens_param} "
                       f"({chat.max_tokens}) is {prompt_tokens + chat.max_tokens} tokens, more than {what}; "
                       f"ask for at most {room}", param=chat.max_tokens_param, code="context_length_exceeded")
    return min(chat.max_tokens, room)


def _usage(work: Work, result: GenResult) -> dict:
    return {"prompt_tokens": len(work.prompt_ids), "completion_tokens": result.completion_tokens,
            "total_tokens": len(work.prompt_ids) + result.completion_tokens}


def _usage_chunk(cid: str, created: int, work: Work, result: GenResult) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": work.target.name,
            "choices": [], "usage": _usage(work, result)}


def _completion(work: Work, result: GenResult, *, threshold: float | None) -> dict:
    content, calls, finish_reason = answer(work.tools, result.text, result.finish_reason)
    message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = openai_calls(calls)
    response = {
        "id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
        "model": work.target.name,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
        "usage": _usage(work, result),
    }
    if result.circuit_breaker is not None:
        response["circuit_breaker"] = {**result.circuit_breaker, "threshold": threshold}
    return response
