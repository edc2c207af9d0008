"""The OpenAI chat-completions request, checked by hand, and the error shape every failure uses.

Checked by hand rather than by a pydantic model so that every bad request gets a 400 that names the
offending parameter, in the error shape OpenAI and vLLM use:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Parameters this server does not know are ignored (garak and other clients send many: `frequency_penalty`,
`presence_penalty`, `logit_bias`, `user`, `tools` with no tool calling, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant")
MAX_STOP_STRINGS = 16


class ApiError(Exception):
    """A request that cannot be served; becomes an OpenAI-style error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code, type=self.type)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass
class ChatRequest:
    model: str
    messages: list[dict]  # [{"role", "content": str}], developer mapped to system
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _content_text(content: Any, index: int) -> str:
    param = f"messages[{index}].content"
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                raise ApiError(f"{param}[{j}]: only text parts are supported "
                               '({"type": "text", "text": "..."})', param=f"{param}[{j}]")
        return "\n".join(parts)
    raise ApiError(f"{param}: expected a string or a list of text parts, got {type(content).__name__}",
                   param=param)


def parse_messages(value: Any) -> list[dict]:
    if value is None:
        raise ApiError("messages: required", param="messages")
    if not isinstance(value, list):
        raise ApiError(f"messages: expected a list of messages, got {type(value).__name__}", param="messages")
    if not value:
        raise ApiError("messages: must contain at least one message", param="messages")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(f"messages[{i}]: expected an object with role and content, got "
                           f"{type(message).__name__}", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}",
                           param=f"messages[{i}].role")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _content_text(message.get("content"), i)})
    return messages


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP_STRINGS:
            raise ApiError(f"stop: at most {MAX_STOP_STRINGS} stop strings", param="stop")
        return tuple(dict.fromkeys(s for s in value if s))
    raise ApiError("stop: expected a string or a list of strings", param="stop")


def parse_chat_request(body: Any, *, models: list[str], max_tokens_limit: int,
                       default_max_tokens: int) -> ChatRequest:
    """Check a decoded JSON body. Token counts (the input length) are checked later, by the app."""
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}")

    model = body.get("model")
    if model is None:
        model = models[0]  # like vLLM: a missing model means the one served
    elif not isinstance(model, str):
        raise ApiError("model: expected a string", param="model")
    elif model not in models:
        raise ApiError(f"model {model!r} does not exist; this server has: {', '.join(models)}",
                       param="model", code="model_not_found")

    messages = parse_messages(body.get("messages"))

    max_tokens, param = body.get("max_completion_tokens"), "max_completion_tokens"
    if max_tokens is None:
        max_tokens, param = body.get("max_tokens"), "max_tokens"
    if max_tokens is None:
        max_tokens = min(default_max_tokens, max_tokens_limit)
    elif not _is_int(max_tokens):
        raise ApiError(f"{param}: expected an integer, got {type(max_tokens).__name__}", param=param)
    elif max_tokens < 1:
        raise ApiError(f"{param}: must be at least 1, got {max_tokens}", param=param)
    elif max_tokens > max_tokens_limit:
        raise ApiError(f"{param}: {max_tokens} is more than this server's limit of {max_tokens_limit}",
                       param=param)

    temperature = body.get("temperature")
    if temperature is None:
        temperature = 0.0
    elif not _is_number(temperature) or not 0 <= temperature <= 2:
        raise ApiError("temperature: expected a number from 0 to 2", param="temperature")

    top_p = body.get("top_p")
    if top_p is None:
        top_p = 1.0
    elif not _is_number(top_p) or not 0 < top_p <= 1:
        raise ApiError("top_p: expected a number greater than 0 and at most 1", param="top_p")

    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError("seed: expected an integer", param="seed")

    n = body.get("n")
    if n is not None:
        if not _is_int(n):
            raise ApiError("n: expected an integer", param="n")
        if n != 1:
            raise ApiError(f"n: only n=1 is supported, got {n}", param="n")

    stream = body.get("stream")
    if stream is None:
        stream = False
    elif not isinstance(stream, bool):
        raise ApiError("stream: expected true or false", param="stream")

    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError("stream_options: expected an object", param="stream_options")
        include_usage = options.get("include_usage") is True

    known = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
             "stream", "stream_options", "stop"}
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens, stop=parse_stop(body.get("stop")),
                       temperature=float(temperature), top_p=float(top_p), seed=seed, stream=stream,
                       include_usage=include_usage, extra={k: v for k, v in body.items() if k not in known})
