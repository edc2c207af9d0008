"""The record schema shared by every data file.

JSONL schema (one JSON object per line; blank lines are skipped)::

    {"request": "How do I ...?",            # str: the user turn
     "response": "Sure, here is ...",        # str: the assistant turn (non-empty)
     "messages": [{"role": "user", "content": "..."}],   # optional
     "category": "cybercrime",               # optional str
     "source": "harmbench.jsonl:12",         # optional str, provenance
     "id": "cb-0001"}                        # optional str (an int is accepted)

``messages`` is the conversation *before* the response (roles ``system``, ``user``
and ``assistant``, ``content`` a string); when it is given, ``request`` may be left
out and is not used for formatting.

Field names of the reference repository are accepted as aliases: ``prompt`` and
``instruction`` for ``request``; ``output`` for ``response``; ``llama3_output`` for
``response`` only when ``response_field="llama3_output"`` is asked for. Any other
extra field is ignored. The same schema applies to ``.json``, ``.csv`` and
``datasets`` rows; see docs/data.md.

``Behavior`` (a harmful request to elicit, HarmBench's unit) lives here too, below the attacks that
take it and the judges that judge against it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
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

    def conversation(self) -> list[dict]:
        """The turns before the response, ready for a chat template."""
        if self.messages:
            return list(self.messages)
        return [{"role": "user", "content": self.request or ""}]

    def to_json(self) -> dict:
        """A JSONL record in the documented schema, without the None fields."""
        record = {
            "id": self.id,
            "request": self.request,
            "messages": [dict(m) for m in self.messages] if self.messages else None,
            "response": self.response,
            "category": self.category,
            "source": self.source,
        }
        return {k: v for k, v in record.items() if v is not None}


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


def _messages(value: Any, where: str) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise DataError(f'{where}: field "messages": expected a non-empty list of '
                        f'{{"role", "content"}} objects, got {_type_name(value)}')
    turns = []
    for i, turn in enumerate(value):
        field = f'messages[{i}]'
        if not isinstance(turn, dict):
            raise DataError(f'{where}: field "{field}": expected an object, got {_type_name(turn)}')
        if turn.get("role") not in ROLES:
            raise DataError(f'{where}: field "{field}.role": expected one of {", ".join(ROLES)}, '
                            f'got {turn.get("role")!r}')
        if not isinstance(turn.get("content"), str):
            raise DataError(f'{where}: field "{field}.content": expected a string, '
                            f'got {_type_name(turn.get("content"))}')
        turns.append({"role": turn["role"], "content": turn["content"]})
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

    messages = None
    if record.get("messages") is not None:
        messages = _messages(record["messages"], where)

    request_name, request = _first_present(record, REQUEST_ALIASES)
    if request is None and messages is None:
        raise DataError(f'{where}: field "request": missing (give "request", "prompt", '
                        f'"instruction" or "messages")')
    if request is not None and not isinstance(request, str):
        raise DataError(f'{where}: field "{request_name}": expected a string, got {_type_name(request)}')

    names = (response_field,) if response_field else RESPONSE_ALIASES
    response_name, response = _first_present(record, names)
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
    )
