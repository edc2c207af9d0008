"""The OpenAI chat-completions request, checked by hand, and the error shape every failure uses.

Checked by hand rather than by a pydantic model so that every bad request gets a 400 that names the
offending parameter, in the error shape OpenAI and vLLM use:

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Parameters this server does not know are ignored (garak and other clients send many: `frequency_penalty`,
`presence_penalty`, `logit_bias`, `user`, ...). `tools` and `tool_choice` are OpenAI's function calling:
tool definitions checked by the data schema's normalisation (`data.schema.normalize_tools`), assistant turns
with `tool_calls` and `tool` turns with their `tool_call_id` in `messages`. Every value that reaches
generation is one generation accepts: a seed torch can take, a finite temperature and top_p in range,
strings that are valid Unicode (no lone surrogates), so that no request can fail the batch it joins.

The server's default limits live here too, so that `circuit-breakers serve --help` states them without
importing the server.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..data.schema import DataError, normalize_tool_calls, normalize_tools

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_CHOICES = ("none", "auto", "required")
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")  # OpenAI's rule for function names (plus dots)
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 512  # characters; the stop-string check runs on every generated token
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1  # int64, as OpenAI and vLLM take it (torch.Generator takes this range)

# The server's defaults (create_app and `circuit-breakers serve`).
DEFAULT_MAX_TOKENS_LIMIT = 1024  # the largest max_tokens a request may ask for
DEFAULT_MAX_INPUT_TOKENS = 4096  # the longest prompt, after the chat template
DEFAULT_MAX_TOTAL_TOKENS = 4096  # prompt + max_tokens of one request
DEFAULT_MAX_QUEUE = 128  # requests waiting to be generated; more: 429
DEFAULT_REQUEST_TIMEOUT = 120.0  # seconds from arrival to the last token; later: 504
DEFAULT_MAX_TOKENS = 256  # max_tokens when a request gives none


class ApiError(Exception):
    """A request that cannot be served; becomes an OpenAI-style error response."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, param=self.param, code=self.code, type=self.type)


def error_body(message: str, *, param: str | None = None, code: str | None = None,
               type: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def decode_json_body(raw: bytes) -> Any:
    """The request body as JSON: UTF-8, standard JSON (no NaN or Infinity), every string valid Unicode."""
    if not raw.strip():
        raise ApiError("the request body is empty; expected a JSON object")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(f"the request body is not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start}); "
                       "JSON must be sent as UTF-8") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError("the request body is nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, NaN/Infinity, an integer of more than 4300 digits
        reason = str(err).split("; use sys.")[0]  # Python's advice on the digit limit is not the client's
        raise ApiError(f"the request body is not valid JSON: {reason}") from None
    bad = _invalid_unicode(body)
    if bad is not None:
        where, param, index, char = bad
        raise ApiError(f"{where}: not valid Unicode: a lone surrogate (U+{ord(char):04X}) at character {index}; "
                       "send text as valid UTF-8", param=param)
    return body


def _invalid_unicode(value: Any) -> tuple[str, str | None, int, str] | None:
    """(where, param, index, character) of the first lone surrogate in a decoded JSON value, if any.

    JSON escapes can spell one ("\\ud800"); no tokenizer or response encoder accepts it. Iterative, since
    the value may be nested as deeply as the JSON decoder allows."""
    stack = [("", value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as err:
                return where or "the request body", where or None, err.start, item[err.start]
        elif isinstance(item, dict):
            children = []
            for key, child in item.items():
                try:
                    key.encode("utf-8")
                except UnicodeEncodeError as err:
                    return f"a key in {where or 'the request body'}", None, err.start, key[err.start]
                children.append((f"{where}.{key}" if where else key, child))
            stack.extend(reversed(children))  # depth first, in document order
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", child) for i, child in reversed(list(enumerate(item))))
    return None


@dataclass
class ChatRequest:
    model: str
    # [{"role", "content": str}], developer mapped to system; an assistant turn may carry "tool_calls"
    # (normalised: arguments an object), a tool turn "tool_call_id" (and "name", found from the call)
    messages: list[dict]
    max_tokens: int
    max_tokens_param: str | None = None  # "max_tokens" or "max_completion_tokens" when the request set it
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    tools: tuple[dict, ...] = ()  # normalised OpenAI function tools
    tool_choice: str = "none"  # "none", "auto", "required" or "function" (one function, `tool_name`)
    tool_name: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def uses_tools(self) -> bool:
        """Whether tools are rendered into the prompt (or the conversation holds tool calls)."""
        return bool(self.tools) or any(m.get("tool_calls") for m in self.messages)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    """A value as the error message quotes it: short, whatever its size."""
    text = json.dumps(value) if isinstance(value, (int, float, str, bool)) or value is None else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


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


def _api_error(err: DataError) -> ApiError:
    """The schema's message ('where: field "tools[0].name": ...') as a 400 naming the parameter."""
    match = re.match(r'^.*?: field "([^"]+)": (.*)$', str(err), re.DOTALL)
    if match is None:
        return ApiError(str(err))
    return ApiError(f"{match.group(1)}: {match.group(2)}", param=match.group(1))


def parse_tools(value: Any) -> tuple[dict, ...]:
    """OpenAI function tools, normalised ({"type": "function", "function": {name, description, parameters}})."""
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ApiError(f"tools: expected a list of tool definitions, got {type(value).__name__}", param="tools")
    for i, item in enumerate(value):  # the schema also takes a bare {"name", ...}; the API takes OpenAI's form
        if isinstance(item, dict) and item.get("type") == "function" and "function" not in item:
            raise ApiError(f"tools[{i}].function: required", param=f"tools[{i}].function")
        if isinstance(item, dict) and "type" not in item:
            raise ApiError(f'tools[{i}].type: required ("function")', param=f"tools[{i}].type")
    try:
        tools = normalize_tools(value, "request")
    except DataError as err:
        raise _api_error(err) from None
    for i, tool in enumerate(tools):
        name = tool["function"]["name"]
        if not TOOL_NAME.match(name):
            raise ApiError(f"tools[{i}].function.name: {_shown(name)} is not a function name (1 to 64 letters, "
                           "digits, '_', '-' or '.')", param=f"tools[{i}].function.name")
    return tools


def parse_tool_choice(value: Any, tools: tuple[dict, ...]) -> tuple[str, str | None]:
    """(mode, function name): "none", "auto", "required", or "function" with the function's name."""
    names = [tool["function"]["name"] for tool in tools]
    if value is None:
        return ("auto" if tools else "none"), None
    if isinstance(value, str):
        if value not in TOOL_CHOICES:
            raise ApiError(f"tool_choice: expected one of {', '.join(TOOL_CHOICES)} or "
                           f'{{"type": "function", "function": {{"name": ...}}}}, got {_shown(value)}',
                           param="tool_choice")
        if value == "required" and not tools:
            raise ApiError('tool_choice: "required" needs tools', param="tool_choice")
        return (value if tools else "none"), None
    function = value.get("function") if isinstance(value, dict) else None
    if (not isinstance(value, dict) or value.get("type") != "function" or not isinstance(function, dict)
            or not isinstance(function.get("name"), str)):
        raise ApiError('tool_choice: expected "none", "auto", "required" or {"type": "function", "function": '
                       '{"name": ...}}', param="tool_choice")
    name = function["name"]
    if name not in names:
        raise ApiError(f"tool_choice: the function {_shown(name)} is not among tools "
                       f"(defined: {', '.join(names) or 'none'})", param="tool_choice")
    return "function", name


def parse_messages(value: Any) -> list[dict]:
    if value is None:
        raise ApiError("messages: required", param="messages")
    if not isinstance(value, list):
        raise ApiError(f"messages: expected a list of messages, got {type(value).__name__}", param="messages")
    if not value:
        raise ApiError("messages: must contain at least one message", param="messages")
    messages, call_names = [], {}
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise ApiError(f"messages[{i}]: expected an object with role and content, got "
                           f"{type(message).__name__}", param=f"messages[{i}]")
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(f"messages[{i}].role: expected one of {', '.join(ROLES)}, got {role!r}",
                           param=f"messages[{i}].role")
        turn = {"role": "system" if role == "developer" else role,
                "content": _content_text(message.get("content"), i)}
        if role == "assistant" and message.get("tool_calls") is not None:
            if not isinstance(message["tool_calls"], list):
                raise ApiError(f"messages[{i}].tool_calls: expected a list of tool calls",
                               param=f"messages[{i}].tool_calls")
            try:
                calls = normalize_tool_calls(message["tool_calls"], "request", f"messages[{i}].tool_calls")
            except DataError as err:
                raise _api_error(err) from None
            if calls:
                turn["tool_calls"] = list(calls)
                for call in calls:
                    if "id" in call:
                        call_names[call["id"]] = call["function"]["name"]
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str):
                raise ApiError(f"messages[{i}].tool_call_id: a tool message needs the id of the call it answers",
                               param=f"messages[{i}].tool_call_id")
            turn["tool_call_id"] = call_id
            name = message.get("name")
            if isinstance(name, str) or call_id in call_names:  # templates that name the tool find it here
                turn["name"] = name if isinstance(name, str) else call_names[call_id]
        messages.append(turn)
    return messages


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP_STRINGS:
            raise ApiError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(value)}", param="stop")
        for s in value:
            if len(s) > MAX_STOP_LENGTH:
                raise ApiError(f"stop: a stop string may be at most {MAX_STOP_LENGTH} characters, got one of "
                               f"{len(s)}", param="stop")
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
        max_tokens, param = min(default_max_tokens, max_tokens_limit), None
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
    elif not _is_number(temperature) or not 0 <= temperature <= 2:  # also refuses a NaN
        raise ApiError(f"temperature: expected a number from 0 to 2, got {_shown(temperature)}", param="temperature")

    top_p = body.get("top_p")
    if top_p is None:
        top_p = 1.0
    elif not _is_number(top_p) or not 0 < top_p <= 1:
        raise ApiError(f"top_p: expected a number greater than 0 and at most 1, got {_shown(top_p)}", param="top_p")

    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not SEED_MIN <= seed <= SEED_MAX):
        raise ApiError(f"seed: expected an integer from {SEED_MIN} to {SEED_MAX}, got {_shown(seed)}", param="seed")

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
        include_usage = options.get("include_usage")
        if include_usage is not None and not isinstance(include_usage, bool):
            raise ApiError("stream_options.include_usage: expected true or false",
                           param="stream_options.include_usage")
        include_usage = bool(include_usage)

    tools = parse_tools(body.get("tools"))
    tool_choice, tool_name = parse_tool_choice(body.get("tool_choice"), tools)

    known = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "n",
             "stream", "stream_options", "stop", "tools", "tool_choice"}
    return ChatRequest(model=model, messages=messages, max_tokens=max_tokens, max_tokens_param=param,
                       stop=parse_stop(body.get("stop")),
                       temperature=float(temperature), top_p=float(top_p), seed=seed, stream=stream,
                       include_usage=include_usage, tools=tools, tool_choice=tool_choice, tool_name=tool_name,
                       extra={k: v for k, v in body.items() if k not in known})
