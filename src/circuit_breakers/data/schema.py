"""The record schema shared by every data file.

JSONL schema (one JSON object per line; blank lines are skipped)::

    {"request": "How do I ...?",            # str: the user turn
     "response": "Sure, here is ...",        # str: the assistant turn (non-empty)
     "messages": [{"role": "user", "content": "..."}],   # optional
     "category": "cybercrime",               # optional str
     "source": "harmbench.jsonl:12",         # optional str, provenance
     "id": "cb-0001",                        # optional str (an int is accepted)
     "tools": [{"type": "function", "function": {"name": "send_email", "description": "...",
                "parameters": {"type": "object", "properties": {...}}}}],   # optional
     "tool_calls": [{"type": "function", "function": {"name": "send_email",
                     "arguments": {"to": "..."}}}],                          # optional
     "images": ["images/cat.png"]}           # optional: image paths for a vision-language model

``messages`` is the conversation *before* the response (roles ``system``, ``user``,
``assistant`` and ``tool``, ``content`` a string); when it is given, ``request`` may be left
out and is not used for formatting. An assistant turn may carry ``tool_calls`` (its content
may then be empty or null); a ``tool`` turn is a call's result.

``tools`` are OpenAI tool definitions (the bare ``{"name", "description", "parameters"}``
form is accepted too); ``tool_calls`` are the assistant's calls in the response, their
``arguments`` an object or JSON text of one. Both are normalised to the OpenAI shape above
(arguments always an object); a call of a tool missing from ``tools`` is an error. With
``tool_calls`` the response text may be empty.

Field names of the reference repository are accepted as aliases: ``prompt`` and
``instruction`` for ``request``; ``output`` for ``response``; ``llama3_output`` for
``response`` only when ``response_field="llama3_output"`` is asked for. Any other
extra field is ignored. The same schema applies to ``.json``, ``.csv`` and
``datasets`` rows; see docs/data.md.

``images`` are paths relative to the data file (the loader resolves them and checks that they
exist), ``data:`` URIs (base64), or raw bytes and ``{"bytes", "path"}`` objects from ``datasets``
rows; a single path may be given as a string. They go into the last user turn, before its text,
rendered by the vision-language model's processor (multimodal/processing.py).

``Behavior`` (a harmful request to elicit, HarmBench's unit) lives here too, below the attacks that
take it and the judges that judge against it.
"""
from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
REQUEST_ALIASES = ("request", "prompt", "instruction")
RESPONSE_ALIASES = ("response", "output")


class DataError(ValueError):
    """Bad input data; the message names the file, the line or row, and the field."""


@dataclass(frozen=True)
class Behavior:
    """A harmful behaviour to elicit (HarmBench's unit): what attacks take and judges judge against."""

    id: str
    request: str
    context: str | None = None  # HarmBench contextual behaviours
    target: str = ""  # affirmative target ("Sure, here's ..."), for optimisation attacks and prefilling
    category: str | None = None
    tools: tuple[dict, ...] | None = None  # tool definitions offered to the model (normalised, see Example)
    # {"name": tool, "key_argument": argument}: the call that would carry out the harm, for rule-based judges
    harmful_call: dict | None = None
    # Images shown with the request (paths or raw encoded bytes, as Example.images), for vision-language models
    images: tuple = ()
    # What the images show, in words: for the judges only (never shown to the model, which sees the images);
    # HarmBench's RedactedImageDescription, which its classifier reads as the behaviour's context
    image_description: str | None = None

    def __post_init__(self) -> None:
        if self.harmful_call is not None:
            _check_harmful_call(self.harmful_call, self.tools, f"behavior {self.id}")

    def user_message(self) -> str:
        """The request as HarmBench places it: the context first, then a separator."""
        return f"{self.context}\n\n---\n\n{self.request}" if self.context else self.request


@dataclass(frozen=True)
class Example:
    response: str
    request: str | None = None
    messages: tuple[dict, ...] | None = None
    category: str | None = None
    source: str | None = None
    id: str | None = None
    tools: tuple[dict, ...] | None = None
    tool_calls: tuple[dict, ...] | None = None
    images: tuple = ()  # paths (str) or raw encoded bytes, in the last user turn

    def conversation(self) -> list[dict]:
        """The turns before the response, ready for a chat template."""
        if self.messages:
            return list(self.messages)
        return [{"role": "user", "content": self.request or ""}]

    def assistant_message(self) -> dict:
        """The response as an assistant message (with its tool calls), ready for a chat template."""
        message = {"role": "assistant", "content": self.response}
        if self.tool_calls:
            message["tool_calls"] = [dict(call) for call in self.tool_calls]
        return message

    def to_json(self) -> dict:
        """A JSONL record in the documented schema, without the None fields."""
        record = {
            "id": self.id,
            "request": self.request,
            "messages": [dict(m) for m in self.messages] if self.messages else None,
            "response": self.response,
            "category": self.category,
            "source": self.source,
            "tools": list(self.tools) if self.tools else None,
            "tool_calls": list(self.tool_calls) if self.tool_calls else None,
            "images": [image if isinstance(image, str) else _data_uri(image) for image in self.images] or None,
        }
        return {k: v for k, v in record.items() if v is not None}


def _data_uri(data: bytes) -> str:
    return "data:application/octet-stream;base64," + base64.b64encode(data).decode("ascii")


def _image_ref(item: Any, where: str, field: str) -> str | bytes:
    """One image reference as a path (str) or raw bytes."""
    if isinstance(item, dict):  # a `datasets` Image feature left undecoded: {"bytes": ..., "path": ...}
        item = item.get("bytes") or item.get("path")
    elif type(item).__module__.startswith("PIL."):  # a decoded `datasets` Image feature
        buffer = io.BytesIO()
        item.save(buffer, format="PNG")
        item = buffer.getvalue()
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if not isinstance(item, str) or not item.strip():
        got = repr(item) if isinstance(item, str) else _type_name(item)
        raise DataError(f'{where}: field "{field}": expected an image path, a data: URI or bytes, got {got}')
    if item.startswith("data:"):
        header, _, payload = item.partition(",")
        try:
            if not header.endswith(";base64"):
                raise ValueError("not base64")
            return base64.b64decode(payload, validate=True)
        except (ValueError, binascii.Error):
            raise DataError(f'{where}: field "{field}": a data: URI that is not base64 '
                            "(expected data:<type>;base64,<data>)") from None
    return item


def image_refs(value: Any, where: str) -> tuple:
    """The `images` field: a list of references (or JSON text of one, as CSV cells hold it), or one."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        value = _json_list(value, where, "images", "image paths")
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return tuple(_image_ref(item, where, f"images[{i}]") for i, item in enumerate(value))


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _first_present(record: dict, names: tuple[str, ...]) -> tuple[str, Any]:
    # A None value counts as absent: `datasets` rows fill missing columns with None.
    for name in names:
        if record.get(name) is not None:
            return name, record[name]
    return names[0], None


def _optional_str(record: dict, field: str, where: str, *, allow_int: bool = False) -> str | None:
    value = record.get(field)
    if value is None:
        return None
    if allow_int and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{field}": expected a string, got {_type_name(value)}')
    return value


def _json_list(value: Any, where: str, field: str, what: str) -> list:
    """A list, or JSON text of one (CSV cells and some public datasets store lists as text)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f'{where}: field "{field}": expected a list of {what} or JSON text of one '
                            f'({e.msg})') from None
    if not isinstance(value, (list, tuple)):
        raise DataError(f'{where}: field "{field}": expected a list of {what}, got {_type_name(value)}')
    return list(value)


def _function_part(item: Any, where: str, field: str) -> dict:
    """The {"name", ...} object of an OpenAI {"type": "function", "function": {...}} item, or a bare one."""
    if not isinstance(item, dict):
        raise DataError(f'{where}: field "{field}": expected an object, got {_type_name(item)}')
    if item.get("type", "function") != "function":
        raise DataError(f'{where}: field "{field}.type": expected "function", got {item.get("type")!r}')
    if "function" not in item:
        return item
    if not isinstance(item["function"], dict):
        raise DataError(f'{where}: field "{field}.function": expected an object, '
                        f'got {_type_name(item["function"])}')
    return item["function"]


def _name(function: dict, where: str, field: str) -> str:
    name = function.get("name")
    if not isinstance(name, str) or not name.strip():
        got = "nothing" if name is None else repr(name)
        raise DataError(f'{where}: field "{field}.name": expected a non-empty string, got {got}')
    return name


def normalize_tools(value: Any, where: str, field: str = "tools") -> tuple[dict, ...]:
    """Tool definitions as {"type": "function", "function": {"name", "description", "parameters"}}."""
    tools, names = [], set()
    for i, item in enumerate(_json_list(value, where, field, "tool definitions")):
        at = f"{field}[{i}]"
        function = _function_part(item, where, at)
        at = f"{at}.function" if "function" in item else at
        name = _name(function, where, at)
        if name in names:
            raise DataError(f'{where}: field "{at}.name": tool {name!r} is defined twice')
        names.add(name)
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise DataError(f'{where}: field "{at}.description": expected a string, '
                            f'got {_type_name(description)}')
        # A tool without parameters takes none (OpenAI allows leaving them out).
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if (not isinstance(parameters, dict) or parameters.get("type") != "object"
                or not isinstance(parameters.get("properties", {}), dict)):
            raise DataError(f'{where}: field "{at}.parameters": expected a JSON-schema object '
                            f'({{"type": "object", "properties": {{...}}}}), got {json.dumps(parameters)[:80]}')
        tools.append({"type": "function",
                      "function": {"name": name, "description": description, "parameters": parameters}})
    return tuple(tools)


def tool_names(tools: tuple[dict, ...] | None) -> list[str]:
    return [tool["function"]["name"] for tool in tools or ()]


def normalize_tool_calls(value: Any, where: str, field: str = "tool_calls",
                         tools: tuple[dict, ...] | None = None) -> tuple[dict, ...]:
    """Calls as {"type": "function", "function": {"name", "arguments": {...}}} (plus "id" when given);
    with `tools`, every call must name one of them."""
    calls = []
    for i, item in enumerate(_json_list(value, where, field, "tool calls")):
        at = f"{field}[{i}]"
        function = _function_part(item, where, at)
        at = f"{at}.function" if "function" in item else at
        name = _name(function, where, at)
        if tools is not None and name not in tool_names(tools):
            raise DataError(f'{where}: field "{at}.name": the call names tool {name!r}, which is not in '
                            f'"tools" (defined: {", ".join(tool_names(tools)) or "none"})')
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError as e:
                raise DataError(f'{where}: field "{at}.arguments": expected an object or JSON text of one, '
                                f'got text that is not JSON ({e.msg}): {arguments[:80]!r}') from None
        if not isinstance(arguments, dict):
            raise DataError(f'{where}: field "{at}.arguments": expected an object or JSON text of one, '
                            f'got {_type_name(arguments)}')
        call = {"type": "function", "function": {"name": name, "arguments": arguments}}
        if isinstance(item.get("id"), str):
            call["id"] = item["id"]  # tool turns may refer to it by tool_call_id
        calls.append(call)
    return tuple(calls)


def _check_harmful_call(value: Any, tools: tuple[dict, ...] | None, where: str) -> None:
    if (not isinstance(value, dict) or not isinstance(value.get("name"), str)
            or not isinstance(value.get("key_argument"), str)):
        raise DataError(f'{where}: field "harmful_call": expected {{"name": tool name, "key_argument": '
                        f'argument name}}, got {value!r}')
    if tools is None:
        return
    by_name = {tool["function"]["name"]: tool["function"] for tool in tools}
    if value["name"] not in by_name:
        raise DataError(f'{where}: field "harmful_call.name": {value["name"]!r} is not one of the tools '
                        f'({", ".join(by_name)})')
    properties = by_name[value["name"]]["parameters"].get("properties", {})
    if value["key_argument"] not in properties:
        raise DataError(f'{where}: field "harmful_call.key_argument": {value["key_argument"]!r} is not a '
                        f'parameter of {value["name"]} ({", ".join(properties) or "none"})')


def _messages(value: Any, where: str, tools: tuple[dict, ...] | None = None) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f'{where}: field "messages": expected a non-empty list of '
                        f'{{"role", "content"}} objects, got {_type_name(value)}')
    turns = []
    for i, turn in enumerate(value):
        field = f'messages[{i}]'
        if not isinstance(turn, dict):
            raise DataError(f'{where}: field "{field}": expected an object, got {_type_name(turn)}')
        role = turn.get("role")
        if role not in ROLES:
            raise DataError(f'{where}: field "{field}.role": expected one of {", ".join(ROLES)}, '
                            f'got {role!r}')
        calls = None
        if role == "assistant" and turn.get("tool_calls"):
            calls = normalize_tool_calls(turn["tool_calls"], where, f"{field}.tool_calls", tools)
        content = turn.get("content")
        if content is None and calls:
            content = ""  # OpenAI writes null content beside tool calls
        if not isinstance(content, str):
            raise DataError(f'{where}: field "{field}.content": expected a string, '
                            f'got {_type_name(content)}')
        message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = list(calls)
        if role == "tool":  # which call a result answers, where the data says so
            message.update({k: turn[k] for k in ("name", "tool_call_id") if isinstance(turn.get(k), str)})
        turns.append(message)
    return tuple(turns)


def example_from_record(record: dict, where: str, *, response_field: str | None = None,
                        require_response: bool = True) -> Example:
    """Validate one raw record and build an Example.

    ``where`` (e.g. ``"data/harm.jsonl line 3"``) prefixes every error message.
    ``response_field`` reads the response from that field only (e.g. ``"llama3_output"``).
    ``require_response=False`` accepts request-only records (prompt lists whose
    responses are generated later); their response is then ``""``.
    """
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type_name(record)}")

    tools = normalize_tools(record["tools"], where) or None if record.get("tools") is not None else None
    tool_calls = None
    if record.get("tool_calls") is not None:
        tool_calls = normalize_tool_calls(record["tool_calls"], where, tools=tools) or None
    messages = None
    if record.get("messages") is not None:
        messages = _messages(record["messages"], where, tools)

    request_name, request = _first_present(record, REQUEST_ALIASES)
    if request is None and messages is None:
        raise DataError(f'{where}: field "request": missing (give "request", "prompt", '
                        f'"instruction" or "messages")')
    if request is not None and not isinstance(request, str):
        raise DataError(f'{where}: field "{request_name}": expected a string, got {_type_name(request)}')

    names = (response_field,) if response_field else RESPONSE_ALIASES
    response_name, response = _first_present(record, names)
    # A response that is only tool calls has no text.
    require_response = require_response and not tool_calls
    if response is None:
        if require_response:
            raise DataError(f'{where}: field "{response_name}": missing, expected a non-empty string')
        response = ""
    elif not isinstance(response, str):
        raise DataError(f'{where}: field "{response_name}": expected a non-empty string, '
                        f'got {_type_name(response)}')
    elif require_response and not response.strip():
        raise DataError(f'{where}: field "{response_name}": expected a non-empty string, '
                        f'got an empty one')

    return Example(
        response=response,
        request=request,
        messages=messages,
        category=_optional_str(record, "category", where),
        source=_optional_str(record, "source", where),
        id=_optional_str(record, "id", where, allow_int=True),
        tools=tools,
        tool_calls=tool_calls,
        images=image_refs(record["images"], where) if record.get("images") is not None else (),
    )
