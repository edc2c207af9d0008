"""The FastAPI application: OpenAI-compatible chat completions, /health, /v1/models and the playground.

    app = create_app(model, tokenizer, model_name="rr-smollm2", probe=load_probe("runs/probe"))
    uvicorn.run(app, host="127.0.0.1", port=8000)

Every request goes through one `Batcher` (one worker, batches of up to `batch_size` requests that arrive
within `batch_wait_ms`), and generation runs in a thread so that the event loop stays responsive. Every
failure is an OpenAI-style error object (`protocol.error_body`); bad requests are 400s, a wrong or
missing key (when the server has one) a 401. See docs/serving.md.
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
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation import chat_prompt
from .batcher import Batcher, Job
from .engine import GenRequest, GenResult, generate_rows, sigmoid
from .monitoring import make_monitor
from .protocol import ApiError, ChatRequest, error_body, parse_chat_request

log = logging.getLogger("circuit_breakers.serving")

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."
MAX_BODY_BYTES = 4 * 1024 * 1024
BASELINE_SUFFIX = "-baseline"


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


def playground_html() -> str:
    return resources.files(__package__).joinpath("playground.html").read_text(encoding="utf-8")


def create_app(model, tokenizer, *, model_name: str, probe=None, baseline=None, api_key: str | None = None,
               max_tokens_limit: int = 1024, max_input_tokens: int = 4096, batch_size: int = 8,
               batch_wait_ms: float = 10, default_max_tokens: int = 256, refusal: str = DEFAULT_REFUSAL,
               baseline_name: str | None = None) -> FastAPI:
    """An OpenAI-compatible server for `model` (answering as `model_name`).

    probe: a harmfulness probe (`circuit_breakers.probes.probe.load_probe`) that monitors the
        circuit-broken model; a tripped generation returns `refusal` with finish_reason "content_filter".
    baseline: the original model, served as "<model_name>-baseline": a (model, tokenizer) pair, or a model
        that shares `tokenizer`.
    api_key: when set, /v1/* requires `Authorization: Bearer <api_key>` (401 otherwise); when None, any
        key or none is accepted. /, /health and the playground never need one.
    max_tokens_limit: the largest max_tokens a request may ask for (more: 400).
    max_input_tokens: the longest prompt, in tokens after the chat template (more: 400).
    default_max_tokens: max_tokens when a request gives none (capped by the limit and the context).
    """
    if max_tokens_limit < 1 or max_input_tokens < 1:
        raise ValueError("max_tokens_limit and max_input_tokens must be at least 1")
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

    def run_batch(jobs: list[Job]) -> list[GenResult]:
        works: list[Work] = [job.payload for job in jobs]
        target = works[0].target
        return generate_rows(target.model, target.tokenizer, [
            GenRequest(w.prompt_ids, w.max_tokens, w.chat.stop, w.chat.temperature, w.chat.top_p, w.chat.seed,
                       on_delta=w.on_delta, cancelled=w.cancelled) for w in works],
            monitor=monitors.get(target.name), refusal=refusal)

    batcher = Batcher(run_batch, batch_size=batch_size, batch_wait_ms=batch_wait_ms)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await batcher.close()  # a later start (another test client, a restarted server) gets a new worker

    app = FastAPI(title="circuit-breakers", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.batcher = batcher
    app.state.targets = targets

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
        return JSONResponse(exc.body(), status_code=exc.status)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError("missing API key: send `Authorization: Bearer <key>`", status=401,
                           code="invalid_api_key")
        if not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError("incorrect API key", status=401, code="invalid_api_key")

    # ------------------------------------------------------------------ endpoints

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground():
        return HTMLResponse(playground_html())

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "models": names,
                "baseline": names[1] if len(names) > 1 else None,
                "probe": None if probe is None else {"layer": monitors[model_name].layer,
                                                     "threshold": thresholds[model_name]},
                "auth_required": api_key is not None,
                "max_tokens_limit": max_tokens_limit, "max_input_tokens": max_input_tokens,
                "batch_size": batch_size, "batches": batcher.stats.batches, "requests": batcher.stats.jobs}

    @app.get("/v1/models")
    async def list_models(request: Request):
        check_key(request)
        return {"object": "list", "data": [
            {"id": t.name, "object": "model", "created": t.created, "owned_by": "circuit-breakers",
             **({"max_model_len": t.context} if t.context else {})} for t in targets.values()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        check_key(request)
        if model_id not in targets:
            raise ApiError(f"model {model_id!r} does not exist", status=404, param="model", code="model_not_found")
        t = targets[model_id]
        return {"id": t.name, "object": "model", "created": t.created, "owned_by": "circuit-breakers"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        body = await _read_json(request)
        chat = parse_chat_request(body, models=names, max_tokens_limit=max_tokens_limit,
                                  default_max_tokens=default_max_tokens)
        target = targets[chat.model]
        prompt_ids = await asyncio.get_running_loop().run_in_executor(
            tokenize_pool, _tokenize, request_tokenizers[target.name], chat.messages)
        max_tokens = _fit_to_context(chat, target, len(prompt_ids), max_input_tokens, body)
        work = Work(target, chat, chat.messages, prompt_ids, max_tokens)
        if chat.stream:
            return _stream(work)
        try:
            result: GenResult = await batcher.submit(_job(work))
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 - a failed generation is a 500, never a crash
            log.exception("generation failed")
            return _error(500, f"generation failed: {type(err).__name__}: {err}", type="server_error")
        return _completion(work, result, threshold=thresholds.get(target.name))

    def _job(work: Work) -> Job:
        job = Job(work.target.name, work)  # one batch per model; every request setting is per row
        work.job = job
        return job

    def _stream(work: Work) -> StreamingResponse:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        work.on_delta = lambda text, score: loop.call_soon_threadsafe(queue.put_nowait, (text, score))
        job = _job(work)
        task = asyncio.ensure_future(batcher.submit(job))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        cid, created = _completion_id(), int(time.time())
        threshold = thresholds.get(work.target.name)

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
                    yield chunk({"content": text}, **extra)
                try:
                    result: GenResult = task.result()
                except Exception as err:  # noqa: BLE001
                    log.exception("generation failed")
                    yield f"data: {json.dumps(error_body(f'generation failed: {err}', type='server_error'))}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                extra = {}
                if result.circuit_breaker is not None:
                    extra["circuit_breaker"] = {**result.circuit_breaker, "threshold": threshold}
                delta = {}
                if result.finish_reason == "content_filter":
                    delta = {"content": refusal}  # the text before the trip has been sent already
                yield chunk(delta, result.finish_reason, **extra)
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


async def _read_json(request: Request) -> Any:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
        raise ApiError(f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
    raw = bytearray()
    async for piece in request.stream():
        raw += piece
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(f"request body over {MAX_BODY_BYTES} bytes", code="request_too_large")
    if not raw.strip():
        raise ApiError("the request body is empty; expected a JSON object")
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(f"the request body is not valid JSON: {err}") from None
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None


def _tokenize(tokenizer, messages: list[dict]) -> list[int]:
    try:
        text = chat_prompt(tokenizer, messages)
    except Exception as err:  # noqa: BLE001 - a template that rejects the conversation (jinja raise_exception)
        raise ApiError(f"messages: the model's chat template rejects this conversation: {err}",
                       param="messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def _fit_to_context(chat: ChatRequest, target: Target, prompt_tokens: int, max_input_tokens: int, body) -> int:
    if prompt_tokens > max_input_tokens:
        raise ApiError(f"the prompt is {prompt_tokens} tokens after the chat template, more than this server's "
                       f"limit of {max_input_tokens}", param="messages", code="context_length_exceeded")
    if target.context is None:
        return chat.max_tokens
    room = target.context - prompt_tokens
    asked = isinstance(body, dict) and (body.get("max_tokens") is not None
                                        or body.get("max_completion_tokens") is not None)
    if room < 1 or (asked and chat.max_tokens > room):
        raise ApiError(f"this model's context is {target.context} tokens; the prompt ({prompt_tokens}) plus "
                       f"max_tokens ({chat.max_tokens}) do not fit", param="messages",
                       code="context_length_exceeded")
    return min(chat.max_tokens, room)


def _usage(work: Work, result: GenResult) -> dict:
    return {"prompt_tokens": len(work.prompt_ids), "completion_tokens": result.completion_tokens,
            "total_tokens": len(work.prompt_ids) + result.completion_tokens}


def _usage_chunk(cid: str, created: int, work: Work, result: GenResult) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": work.target.name,
            "choices": [], "usage": _usage(work, result)}


def _completion(work: Work, result: GenResult, *, threshold: float | None) -> dict:
    response = {
        "id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
        "model": work.target.name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
                     "finish_reason": result.finish_reason}],
        "usage": _usage(work, result),
    }
    if result.circuit_breaker is not None:
        response["circuit_breaker"] = {**result.circuit_breaker, "threshold": threshold}
    return response
