"""Load examples from JSONL, JSON, CSV, `datasets` directories or the hub; write JSONL.

Every bad input raises DataError naming the file, the line (or row) and the field.

Besides the project's schema (data/schema.py), three public tool-use layouts are recognised by
their field names and converted, so their files and hub datasets load unchanged:

- OpenAI chat: ``messages`` ending in the assistant turn (possibly with ``tool_calls``), no
  ``response`` field, optional ``tools``: the last turn becomes the response.
- Glaive function-calling v2: ``system`` text with the function definitions after "SYSTEM: You
  are a helpful assistant with access to the following functions...", ``chat`` text of
  ``USER:``/``ASSISTANT:``/``FUNCTION RESPONSE:`` turns with ``<functioncall> {...}`` calls. The
  response is the first assistant turn that calls a function (the last turn if none does).
- xLAM / APIGen: ``query``, ``tools`` and ``answers`` (JSON text); the response is the calls.
"""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..atomic import atomic_file
from .schema import RESPONSE_ALIASES, DataError, Example, example_from_record

SUPPORTED = ('".jsonl", ".json", ".csv", a directory written by datasets save_to_disk, '
             'or "hf:NAME[:SPLIT]"')

# (where, source, record): `where` prefixes error messages, `source` is "path:n".
Row = tuple[str, str, Any]


def _import_datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError("loading `datasets` directories or hub data needs the `datasets` "
                          "package: pip install circuit-breakers[datasets]") from e
    return datasets


def read_text(path: Path, error: type[Exception] = DataError) -> str:
    """A data file's text; a missing or non-UTF-8 file raises `error` naming the file."""
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark.
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text ({e})") from None


def jsonl_objects(path: Path, text: str, error: type[Exception] = DataError) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of `text`, read from `path`; a bad JSON line or
    a line that is not an object raises `error` naming the file and the line."""
    # split("\n"), not splitlines(): U+2028 may appear unescaped inside JSON strings.
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path} line {n}: invalid JSON: {e.msg} (column {e.colno})") from None
        if not isinstance(record, dict):
            raise error(f"{path} line {n}: expected a JSON object, got {type(record).__name__}")
        yield n, record


def _jsonl_rows(path: Path) -> Iterator[Row]:
    count = 0
    for n, record in jsonl_objects(path, read_text(path)):
        count += 1
        yield f"{path} line {n}", f"{path}:{n}", record
    if count == 0:
        raise DataError(f"{path}: no records (empty file)")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The raw records of a JSONL file; DataError on a missing/empty file or a bad line."""
    return [record for _, _, record in _jsonl_rows(Path(path))]


def _json_rows(path: Path) -> Iterator[Row]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} line {e.lineno}: invalid JSON: {e.msg} (column {e.colno})") from None
    if isinstance(data, dict):
        lists = [k for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of records, or an object with exactly one "
                            f"list-valued key such as \"data\"; found list keys {lists}")
        data = data[lists[0]]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of records, got {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: no records (empty list)")
    for n, record in enumerate(data, 1):
        yield f"{path} record {n}", f"{path}:{n}", record


def _csv_rows(path: Path) -> Iterator[Row]:
    # newline="": quoted cells may hold line breaks; only \r and \n end a row.
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))
    count = 0
    for row in reader:
        n = reader.line_num
        # An empty cell means "absent"; cells beyond the header (key None) are ignored.
        record: dict[str, Any] = {k: v for k, v in row.items() if k is not None and v}
        if "messages" in record:
            try:
                record["messages"] = json.loads(record["messages"])
            except json.JSONDecodeError as e:
                raise DataError(f'{path} line {n}: field "messages": expected JSON text of a list '
                                f'of {{"role", "content"}} objects ({e.msg})') from None
        count += 1
        yield f"{path} line {n}", f"{path}:{n}", record
    if count == 0:
        raise DataError(f"{path}: no records (empty file or header only)")


def _dataset_rows(ds: Any, label: str, limit: int | None) -> Iterator[Row]:
    if len(ds) == 0:
        raise DataError(f"{label}: no records (empty dataset)")
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))  # avoid materialising rows we drop
    for n, record in enumerate(ds, 1):
        yield f"{label} row {n}", f"{label}:{n}", record


def _disk_rows(path: Path, split: str, limit: int | None) -> Iterator[Row]:
    datasets = _import_datasets()
    try:
        obj = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: a directory, but not one written by datasets "
                        f"save_to_disk ({e}); supported inputs: {SUPPORTED}") from None
    if isinstance(obj, datasets.DatasetDict):
        if split not in obj:
            raise DataError(f'{path}: split "{split}" not found; available: {", ".join(obj)}')
        return _dataset_rows(obj[split], f"{path}[{split}]", limit)
    return _dataset_rows(obj, str(path), limit)


def _hub_rows(spec: str, split: str, limit: int | None) -> Iterator[Row]:
    name, _, hub_split = spec[len("hf:"):].partition(":")
    split = hub_split or split
    if not name:
        raise DataError(f'{spec}: expected "hf:NAME" or "hf:NAME:SPLIT"')
    datasets = _import_datasets()
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # network, auth, unknown name or split: all mean "not loadable"
        raise DataError(
            f'{spec}: could not load split "{split}" of "{name}" from the Hugging Face hub '
            f"({type(e).__name__}: {e}). The hub may be unreachable or the name/split wrong; "
            f"download the data where the hub is reachable and pass a local .jsonl, .json or "
            f".csv file, or a datasets save_to_disk directory, instead") from None
    return _dataset_rows(ds, f"hf:{name}:{split}", limit)


def _rows(spec: str | os.PathLike, split: str, limit: int | None) -> Iterator[Row]:
    if isinstance(spec, str) and spec.startswith("hf:"):
        return _hub_rows(spec, split, limit)
    path = Path(spec)
    if path.is_dir():
        return _disk_rows(path, split, limit)
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        if not path.exists():
            raise DataError(f"{path}: file not found")
        raise DataError(f'{path}: unsupported file type "{path.suffix}"; supported: {SUPPORTED}')
    return reader(path)


# ---- public tool-use layouts

def _openai_chat(record: dict) -> dict:
    """The final assistant turn of `messages` becomes the response and its tool calls."""
    *history, last = record["messages"]
    converted = {**record, "messages": history or None, "response": last.get("content") or ""}
    if last.get("tool_calls"):
        converted["tool_calls"] = last["tool_calls"]
    return converted


_GLAIVE_TURN = re.compile(r"(?:^|\n)\s*(USER|ASSISTANT|FUNCTION RESPONSE):")
_GLAIVE_ROLES = {"USER": "user", "ASSISTANT": "assistant", "FUNCTION RESPONSE": "tool"}
# Glaive quotes the arguments' JSON text in single quotes, which is not JSON: {"name": "f", "arguments": '{...}'}
_GLAIVE_CALL = re.compile(
    r"""^\{\s*"name"\s*:\s*"(?P<name>[^"]+)"\s*,\s*"arguments"\s*:\s*'(?P<arguments>.*)'\s*\}$""", re.S)


def _glaive_functions(system: str, where: str) -> tuple[str, list]:
    """(the system text before the definitions, the JSON objects after it)."""
    text = system.strip().removeprefix("SYSTEM:").strip()
    decoder, functions = json.JSONDecoder(), []
    start = text.find("{")
    preamble = text if start < 0 else text[:start].strip()
    while start >= 0:
        try:
            function, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as e:
            raise DataError(f'{where}: field "system": function definition {len(functions) + 1} is not JSON '
                            f"({e.msg})") from None
        functions.append(function)
        start = text.find("{", end)
    return preamble, functions


def _glaive_call(text: str, where: str) -> dict:
    text = text.strip()
    match = _GLAIVE_CALL.match(text)
    if match:
        return {"name": match["name"], "arguments": match["arguments"]}
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f'{where}: field "chat": a <functioncall> is not JSON ({e.msg}): {text[:80]!r}') from None


def _glaive(record: dict, where: str) -> dict:
    if not isinstance(record["system"], str) or not isinstance(record["chat"], str):
        raise DataError(f'{where}: fields "system" and "chat" (Glaive layout): expected strings')
    preamble, functions = _glaive_functions(record["system"], where)
    parts = _GLAIVE_TURN.split(record["chat"])
    turns = []
    for label, content in zip(parts[1::2], parts[2::2]):
        content = content.replace("<|endoftext|>", "").strip()
        turn = {"role": _GLAIVE_ROLES[label], "content": content}
        if label == "ASSISTANT" and "<functioncall>" in content:
            text, _, call = content.partition("<functioncall>")
            turn = {"role": "assistant", "content": text.strip(), "tool_calls": [_glaive_call(call, where)]}
        turns.append(turn)
    assistant = [i for i, t in enumerate(turns) if t["role"] == "assistant"]
    if not assistant:
        raise DataError(f'{where}: field "chat": no ASSISTANT: turn (Glaive layout)')
    chosen = next((i for i in assistant if turns[i].get("tool_calls")), assistant[-1])
    # The definitions become `tools`; the system text is kept only when it is all there is.
    history = ([{"role": "system", "content": preamble}] if preamble and not functions else []) + turns[:chosen]
    return {"messages": history or None, "tools": functions or None, "response": turns[chosen]["content"],
            "tool_calls": turns[chosen].get("tool_calls"), **{k: record[k] for k in ("id", "category", "source")
                                                               if k in record}}


_XLAM_TYPES = {"str": "string", "string": "string", "int": "integer", "integer": "integer", "float": "number",
               "number": "number", "bool": "boolean", "boolean": "boolean", "list": "array", "dict": "object"}


def _xlam_parameters(parameters: Any) -> Any:
    """xLAM's {argument: {"type": "str, optional", "description", "default"}} as a JSON-schema object."""
    if not isinstance(parameters, dict) or parameters.get("type") == "object":
        return parameters  # already a schema (or invalid: the schema check names it)
    properties, required = {}, []
    for name, spec in parameters.items():
        spec = spec if isinstance(spec, dict) else {}
        kind = str(spec.get("type", "string"))
        base = kind.split(",")[0].split("[")[0].strip().lower()
        properties[name] = {"type": _XLAM_TYPES.get(base, "string"),
                            **{k: spec[k] for k in ("description", "default") if k in spec}}
        if "optional" not in kind and "default" not in spec:
            required.append(name)
    return {"type": "object", "properties": properties, "required": required}


def _xlam(record: dict, where: str) -> dict:
    tools = record["tools"]
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f'{where}: field "tools": expected JSON text of a list of tools ({e.msg})') from None
    if isinstance(tools, list):
        tools = [{**t, "parameters": _xlam_parameters(t.get("parameters", {}))} if isinstance(t, dict) else t
                 for t in tools]
    return {"request": record["query"], "tools": tools, "tool_calls": record["answers"], "response": "",
            **{k: record[k] for k in ("id", "category", "source") if k in record}}


def from_public_layout(record: Any, where: str, response_field: str | None = None) -> Any:
    """A record of a public tool-use layout converted to the project's schema; other records unchanged."""
    if not isinstance(record, dict):
        return record
    if record.get("query") is not None and record.get("answers") is not None:
        return _xlam(record, where)
    if record.get("chat") is not None and record.get("system") is not None and record.get("messages") is None:
        return _glaive(record, where)
    messages = record.get("messages")
    has_response = any(record.get(name) is not None
                       for name in ((response_field,) if response_field else RESPONSE_ALIASES))
    if (not has_response and isinstance(messages, list) and messages and isinstance(messages[-1], dict)
            and messages[-1].get("role") == "assistant"):
        return _openai_chat(record)
    return record


def load_examples(spec: str | os.PathLike, *, response_field: str | None = None,
                  require_response: bool = True, split: str = "train",
                  limit: int | None = None) -> list[Example]:
    """Load and validate examples from a file, a `datasets` directory or ``hf:NAME[:SPLIT]``.

    ``split`` picks the split of a DatasetDict or hub dataset; ``limit`` keeps the first
    records only. An example without its own ``source`` gets ``"path:n"`` (n: the line
    for JSONL and CSV, the 1-based record or row number otherwise).
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    examples = []
    base = _image_base(spec)
    for where, source, record in itertools.islice(_rows(spec, split, limit), limit):
        example = example_from_record(from_public_layout(record, where, response_field), where,
                                      response_field=response_field,
                                      require_response=require_response)
        if example.images:
            example = replace(example, images=resolve_images(example.images, base, where))
        examples.append(example if example.source else replace(example, source=source))
    return examples


def _image_base(spec: str | os.PathLike) -> Path:
    """What relative image paths are relative to: the data file's folder (a `datasets` directory itself;
    the working directory for hub data)."""
    if isinstance(spec, str) and spec.startswith("hf:"):
        return Path()
    path = Path(spec)
    return path if path.is_dir() else path.parent


def resolve_images(images: tuple, base: Path, where: str) -> tuple:
    """Image paths made relative to `base` (raw bytes kept), each checked to exist."""
    resolved = []
    for i, image in enumerate(images):
        if isinstance(image, str):
            path = Path(image).expanduser()
            path = path if path.is_absolute() else base / path
            if not path.is_file():
                raise DataError(f'{where}: field "images[{i}]": {path}: image file not found')
            image = str(path)
        resolved.append(image)
    return tuple(resolved)


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example | dict]) -> None:
    """Write records as JSONL atomically: readers see the old file or the whole new one."""
    with atomic_file(path, fsync=True) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for item in examples:
            record = item.to_json() if isinstance(item, Example) else item
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
