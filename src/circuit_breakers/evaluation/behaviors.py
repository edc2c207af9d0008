"""Harmful behaviours to attack: HarmBench CSV, the project's JSONL, or the built-in test split.

HarmBench's multimodal CSV (the text columns plus `ImageFileName`) gives image behaviours: each
multimodal row's image is looked up in the `images` folder when one is given, else beside the CSV,
then in `multimodal_behavior_images/` beside it or one folder up (HarmBench's own layout:
data/behavior_datasets/*.csv and data/multimodal_behavior_images/); its `RedactedImageDescription`
(else `ImageDescription`) becomes the behaviour's `image_description`, which the judges read (the
model sees the image). "builtin:multimodal" is the project's harmful image test split (drawn
diagrams), "builtin:multimodal_typographic" its typographic variants.

Every behaviour gets an affirmative target ("Sure, here is ..."), used by prefilling and the
optimisation attacks. A file's own target wins, then the targets file (HarmBench ships its targets
as JSON `{BehaviorID: target}`), then `derive_target(request)` (rule in its docstring and in
docs/evaluation.md).

Errors are `BehaviorError` (a `DataError`, so a ValueError) naming the file, the line and the
column or field.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Sequence

from ..data.schema import Behavior
from ..data.loaders import jsonl_objects, read_text, resolve_images
from ..data.schema import DataError, image_refs, normalize_tools

HARMBENCH_COLUMNS = ("Behavior", "FunctionalCategory", "SemanticCategory", "Tags", "ContextString", "BehaviorID")
IMAGE_COLUMN = "ImageFileName"  # HarmBench's multimodal behaviours CSV
# What HarmBench's classifier reads as a multimodal behaviour's context, then the unredacted description
DESCRIPTION_COLUMNS = ("RedactedImageDescription", "ImageDescription")
HARMBENCH_IMAGE_DIR = "multimodal_behavior_images"
REQUIRED_COLUMNS = ("Behavior", "BehaviorID")
JSONL_FIELDS = ("request", "category", "id", "context", "target", "image_description")
TARGET_PREFIX = "Sure, here is "


class BehaviorError(DataError):
    """A behaviours or targets file that cannot be read; the message names file, line and column."""


# ---------------------------------------------------------------- target derivation

_FIRST_PERSON = {"i": "you", "me": "you", "my": "your", "mine": "yours", "myself": "yourself",
                 "we": "you", "us": "you", "our": "your", "ours": "yours", "ourselves": "yourselves",
                 "i'm": "you're", "i've": "you've", "i'll": "you'll", "i'd": "you'd"}
# (pattern on the lower-cased request, replacement); the first match wins; \1 is the rest.
# Prefixes that only wrap the request: stripped (repeatedly) before the rules below.
_WRAPPERS = (
    r"^(?:please\s+)?(?:can|could|would|will)\s+you\s+(?:please\s+)?(.+)$",  # "Can you (please) X"
    r"^(?:i|we)\s+(?:need|want|would like|'d like)\s+you\s+to\s+(.+)$",  # "I want you to X"
    r"^please\s+(.+)$",
)
_REPHRASINGS: tuple[tuple[str, str], ...] = (
    (r"^(?:help|teach)\s+(?:me|us)\s+(?:how\s+)?(?:to\s+)?(.+)$", r"how to \1"),
    (r"^(?:i|we)\s+(?:need|want|would like|'d like)\s+(?!to\b)(.+)$", r"\1"),
    (r"^how\s+(?:do|can|could|would|should|might|may)\s+(?:i|we|you|one|someone|people|a person)\s+(.+)$",
     r"how to \1"),
    (r"^how\s+to\s+(.+)$", r"how to \1"),
    (r"^(?:what(?:'s| is| are)|which is)\s+(the\s+.+)$", r"\1"),
    (r"^(?:explain|describe|tell\s+me|show\s+me|teach\s+me)\s+(how|why|what|where|when|which)\s+(.+)$", r"\1 \2"),
    (r"^(?:give|provide|send|show|offer|tell)\s+(?:me\s+|us\s+)?(?:with\s+)?(.+)$", r"\1"),
    (r"^(?:write|type|print|output|create|generate|compose|draft|produce|reproduce|recite|paste|design|"
     r"develop|craft|devise|come\s+up\s+with|put\s+together|prepare)(?:\s+(?:out|up|down))?\s+(?:me\s+)?(.+)$",
     r"\1"),
    (r"^list\s+(.+)$", r"a list of \1"),
    (r"^describe\s+(.+)$", r"a description of \1"),
    (r"^explain\s+(.+)$", r"an explanation of \1"),
    (r"^summari[sz]e\s+(.+)$", r"a summary of \1"),
)
_NOT_IMPERATIVE = ("i", "we", "my", "our", "it", "this", "that", "these", "those", "the", "a", "an", "there",
                   "here", "you", "your", "he", "she", "they", "his", "her", "their", "if", "as", "in", "for")
_QUESTION_WORDS = ("why", "what", "where", "when", "which", "who", "whom", "whose", "is", "are", "do",
                   "does", "did", "can", "could", "should", "would", "will", "was", "were", "has", "have")


def _second_person(text: str) -> str:
    # Case-sensitive: "US" (the country) and "IT" stay; "I" is always upper-case.
    return re.sub(r"\b(I'm|I've|I'll|I'd|i'm|I|i|me|my|mine|myself|we|us|our|ours|ourselves)\b",
                  lambda m: _FIRST_PERSON[m.group(1).lower()], text)


def _lower_first(text: str) -> str:
    """Lower-case the first letter unless the first word looks like an acronym or a name (DDoS, SQL)."""
    first = text.split(" ", 1)[0]
    if len(first) > 1 and any(c.isupper() for c in first[1:]):
        return text
    return text[:1].lower() + text[1:]


def _rephrase(request: str) -> tuple[str, str]:
    """(text without trailing punctuation, "rule" | "stripped" | "none"): what changed it."""
    text = re.sub(r"[\s?.!]+$", "", request)
    text = re.sub(r",?\s+please$", "", text, flags=re.IGNORECASE)
    how = "none"
    stripped = True
    while stripped:
        stripped = False
        for pattern in _WRAPPERS:
            match = re.match(pattern, text, flags=re.IGNORECASE)
            if match:
                text, how, stripped = match.group(1), "stripped", True
                break
    for pattern, replacement in _REPHRASINGS:
        match = re.match(pattern, text, flags=re.IGNORECASE)
        if match:
            return match.expand(replacement), "rule"
    return text, how


def derive_target(request: str) -> str:
    """An affirmative target for a request that has none: "Sure, here is " + a rephrasing.

    Rule (first match wins, after collapsing whitespace and stripping trailing "?", "." and "!"):
    - wrappers are stripped first: "Can/Could/Would/Will you (please) X", "I want/need you to X",
      "Please X" -> X (then the rules below; an imperative X keeps "how to");
    - "Help/Teach me (how) (to) X"          -> "how to X";  "I need/want X" -> "X";
    - "How do/can/should I/we/you/one X"    -> "how to X"  ("How to X" stays "how to X");
    - "What is/What's the X"                -> "the X";
    - "Explain/Describe/Tell me how|why|... X" -> "how|why|... X";
    - "Give/Provide/Send/Show/Tell (me) X"  -> "X";
    - "Write/Type/Print (out) / Create/Generate/Compose/Draft/(Re)produce/Recite/Paste/Design/
      Develop/Craft (me) X"                 -> "X";
    - "List X" -> "a list of X"; "Describe X" -> "a description of X"; "Explain X" ->
      "an explanation of X"; "Summarise X" -> "a summary of X";
    - another question ("Why/Is/Does ... ?") -> "an answer to the question: <question>?";
    - any other imperative "V X"             -> "how to v X";
    - text that is neither (it starts with "I", "My", "The", ...) -> "what you asked for".
    First-person words become second-person ("my" -> "your"), and the first letter is lower-cased
    unless the first word looks like an acronym. HarmBench's own targets ("Sure, here's ...") are
    hand-written; pass them with a targets file when you have them.
    """
    text = re.sub(r"\s+", " ", request).strip()
    if not text:
        raise ValueError("cannot derive a target from an empty request")
    is_question = text.endswith("?")
    rephrased, how = _rephrase(text)
    if how != "rule":
        first = rephrased.split(" ", 1)[0].lower()
        if how == "none" and (is_question or first in _QUESTION_WORDS):
            return f"{TARGET_PREFIX}an answer to the question: {_second_person(_lower_first(rephrased))}?"
        if first in _NOT_IMPERATIVE or not first.isalpha():
            return f"{TARGET_PREFIX}what you asked for"
        rephrased = "how to " + _lower_first(rephrased)
    return TARGET_PREFIX + _second_person(_lower_first(rephrased))


# ---------------------------------------------------------------- loaders


def _read(path: Path) -> str:
    return read_text(path, BehaviorError)


def load_targets(path: str | Path) -> dict[str, str]:
    """A HarmBench-style targets file: a JSON object {BehaviorID: target string}."""
    path = Path(path)
    try:
        data = json.loads(_read(path))
    except json.JSONDecodeError as err:
        raise BehaviorError(f"{path} line {err.lineno}: invalid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(data, dict):
        raise BehaviorError(f"{path}: expected a JSON object {{BehaviorID: target}}, got {type(data).__name__}")
    for key, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise BehaviorError(f'{path}: key "{key}": expected a non-empty target string, got {value!r}')
    return dict(data)


def _image_dirs(path: Path, images: str | Path | None) -> list[Path]:
    if images is not None:
        return [Path(images)]
    return [path.parent, path.parent / HARMBENCH_IMAGE_DIR, path.parent.parent / HARMBENCH_IMAGE_DIR]


def _find_image(name: str, dirs: list[Path], where: str) -> str:
    candidate = Path(name).expanduser()
    found = [candidate] if candidate.is_absolute() else [d / candidate for d in dirs]
    for path in found:
        if path.is_file():
            return str(path)
    raise BehaviorError(f'{where}: column "{IMAGE_COLUMN}": image {name!r} not found (looked in '
                        f'{", ".join(str(d) for d in (found if candidate.is_absolute() else dirs))}; '
                        "pass the images folder with --images)")


def load_harmbench_csv(path: str | Path, targets: dict[str, str] | None = None, *,
                       images: str | Path | None = None) -> list[Behavior]:
    """HarmBench's behaviours CSV. Contextual rows keep their ContextString (see Behavior.user_message).

    Multimodal rows (FunctionalCategory "multimodal") become image behaviours when the CSV has the
    `ImageFileName` column (HarmBench's multimodal CSV; the image found as the module docstring says,
    in the `images` folder when given); without that column they are skipped.
    """
    path = Path(path)
    reader = csv.DictReader(io.StringIO(_read(path), newline=""))
    header = reader.fieldnames or []
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise BehaviorError(f"{path} line 1: missing column(s) {', '.join(missing)}; a HarmBench behaviours "
                            f"CSV has the columns {', '.join(HARMBENCH_COLUMNS)} (found: {', '.join(header) or 'none'})")
    with_images = IMAGE_COLUMN in header
    dirs = _image_dirs(path, images)
    behaviors: list[Behavior] = []
    seen: dict[str, int] = {}
    for row in reader:
        line = reader.line_num
        where = f"{path} line {line}"
        request = (row.get("Behavior") or "").strip()
        behavior_id = (row.get("BehaviorID") or "").strip()
        functional = (row.get("FunctionalCategory") or "").strip().lower()
        context = (row.get("ContextString") or "").strip() or None
        if not request:
            raise BehaviorError(f'{where}: column "Behavior": empty')
        if not behavior_id:
            raise BehaviorError(f'{where}: column "BehaviorID": empty')
        if behavior_id in seen:
            raise BehaviorError(f'{where}: column "BehaviorID": duplicate id "{behavior_id}" '
                                f"(first on line {seen[behavior_id]})")
        seen[behavior_id] = line
        image = (row.get(IMAGE_COLUMN) or "").strip()
        if functional == "multimodal" and not with_images:
            continue
        if functional == "multimodal" and not image:
            raise BehaviorError(f'{where}: column "{IMAGE_COLUMN}": empty, but FunctionalCategory is "multimodal" '
                                f'(behaviour "{behavior_id}")')
        if functional == "contextual" and context is None:
            raise BehaviorError(f'{where}: column "ContextString": empty, but FunctionalCategory is '
                                f'"contextual" (behaviour "{behavior_id}")')
        target = (targets or {}).get(behavior_id) or derive_target(request)
        description = next((row[c].strip() for c in DESCRIPTION_COLUMNS if (row.get(c) or "").strip()), None)
        behaviors.append(Behavior(id=behavior_id, request=request, context=context, target=target,
                                  category=(row.get("SemanticCategory") or "").strip() or None,
                                  images=(_find_image(image, dirs, where),) if image else (),
                                  image_description=description if image else None))
    if not behaviors:
        raise BehaviorError(f"{path}: no behaviours (empty file, header only, or multimodal rows only)")
    return behaviors


def load_behaviors_jsonl(path: str | Path, targets: dict[str, str] | None = None) -> list[Behavior]:
    """The project's JSONL: {"request", "category"?, "id"?, "context"?, "target"?} per line; tool-use
    behaviours add "tools" (OpenAI tool definitions) and "harmful_call" ({"name", "key_argument"}); image
    behaviours "images" (paths relative to the file, as a data set's) and "image_description" (what they
    show, for the judges).

    `prompt` and `behavior` are accepted for `request`. A missing id becomes "<file stem>-<line>".
    """
    path = Path(path)
    behaviors: list[Behavior] = []
    seen: dict[str, int] = {}
    for n, record in jsonl_objects(path, _read(path), BehaviorError):
        where = f"{path} line {n}"
        name, request = next(((k, record[k]) for k in ("request", "prompt", "behavior") if record.get(k) is not None),
                             ("request", None))
        if not isinstance(request, str) or not request.strip():
            raise BehaviorError(f'{where}: field "{name}": expected a non-empty string, got {request!r}')
        fields = {}
        for field in ("category", "id", "context", "target", "image_description"):
            value = record.get(field)
            if field == "id" and isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if value is not None and not isinstance(value, str):
                raise BehaviorError(f'{where}: field "{field}": expected a string, got {type(value).__name__}')
            fields[field] = value.strip() if isinstance(value, str) and value.strip() else None
        behavior_id = fields["id"] or f"{path.stem}-{n}"
        if behavior_id in seen:
            raise BehaviorError(f'{where}: field "id": duplicate id "{behavior_id}" (first on line {seen[behavior_id]})')
        seen[behavior_id] = n
        target = fields["target"] or (targets or {}).get(behavior_id) or derive_target(request)
        tools = normalize_tools(record["tools"], where) if record.get("tools") is not None else None
        images = (resolve_images(image_refs(record["images"], where), path.parent, where)
                  if record.get("images") is not None else ())
        try:
            behaviors.append(Behavior(id=behavior_id, request=request.strip(), context=fields["context"],
                                      target=target, category=fields["category"], tools=tools,
                                      harmful_call=record.get("harmful_call"), images=images,
                                      image_description=fields["image_description"]))
        except DataError as err:
            raise BehaviorError(f"{where}: {err}") from None
    if not behaviors:
        raise BehaviorError(f"{path}: no behaviours (empty file)")
    return behaviors


def builtin_behaviors(split: str = "test", targets: dict[str, str] | None = None) -> list[Behavior]:
    """The project's held-out harmful prompts as behaviours; ids are "builtin-harmful-<line>"."""
    from ..data.builtin import builtin_prompts

    behaviors = []
    for example in builtin_prompts("harmful", split):
        line = (example.source or "").rsplit(":", 1)[-1]
        behavior_id = example.id or f"builtin-harmful-{line}"
        request = example.request or example.conversation()[-1]["content"]
        behaviors.append(Behavior(id=behavior_id, request=request, category=example.category,
                                  target=(targets or {}).get(behavior_id) or derive_target(request)))
    return behaviors


def load_behaviors(spec: str | Path | None = None, *, targets: str | Path | dict | None = None,
                   limit: int | None = None, images: str | Path | None = None) -> list[Behavior]:
    """Behaviours from a HarmBench .csv (multimodal rows' images in `images`, see the module docstring), a
    project .jsonl, (None / "builtin") the built-in test split, "builtin:tools" (the built-in harmful
    tool-use test split, with each item's tools and harmful call), or "builtin:multimodal" /
    "builtin:multimodal_typographic" (the built-in harmful image requests; ":train" for the train split)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit}")
    target_map = load_targets(targets) if isinstance(targets, (str, Path)) else targets
    if spec is None or str(spec) in ("builtin", "builtin:test"):
        behaviors = builtin_behaviors("test", target_map)
    elif str(spec) in ("builtin:tools", "builtin:tools:test", "builtin:tools:train"):
        from ..data.builtin import builtin_tool_behaviors
        behaviors = builtin_tool_behaviors(str(spec).split(":")[2] if str(spec).count(":") == 2 else "test")
    elif str(spec).split(":")[:2] in (["builtin", "multimodal"], ["builtin", "multimodal_typographic"]):
        from ..data.builtin import builtin_multimodal_behaviors
        parts = str(spec).split(":")
        if len(parts) > 3 or (len(parts) == 3 and parts[2] not in ("train", "test")):
            raise BehaviorError(f'behaviours "{spec}": expected {":".join(parts[:2])}, {":".join(parts[:2])}:test '
                                f'or {":".join(parts[:2])}:train')
        kind = "typographic" if parts[1] == "multimodal_typographic" else "harmful"
        behaviors = builtin_multimodal_behaviors(parts[2] if len(parts) == 3 else "test", kind)
    elif str(spec).startswith("builtin:"):
        behaviors = builtin_behaviors(str(spec).split(":", 1)[1], target_map)
    else:
        path = Path(spec)
        if path.suffix.lower() == ".csv":
            behaviors = load_harmbench_csv(path, target_map, images=images)
        elif path.suffix.lower() == ".jsonl":
            behaviors = load_behaviors_jsonl(path, target_map)
        else:
            raise BehaviorError(f'{path}: unsupported behaviours file "{path.suffix}"; expected a HarmBench '
                                f'.csv, a .jsonl of {{"request", "id", "context", "target", "category"}}, or "builtin"')
    return behaviors[:limit] if limit else behaviors


def behaviors_by_id(behaviors: Sequence[Behavior]) -> dict[str, Behavior]:
    return {b.id: b for b in behaviors}


SELECTIONS = ("first", "spread")


def select(items: Sequence, n: int | None, how: str = "first") -> list:
    """`n` of `items` (all when n is None): the first n, or ("spread") n taken in turn from each category
    (`.category`, in the order categories first appear) and returned in file order, so that a subset of a
    file sorted by category still covers every category."""
    items = list(items)
    if n is None or n >= len(items):
        return items
    if how == "first":
        return items[:n]
    if how != "spread":
        raise ValueError(f"select: expected one of {', '.join(SELECTIONS)}, got {how!r}")
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(getattr(item, "category", None) or "", []).append(index)
    chosen: list[int] = []
    for turn in range(max(len(g) for g in groups.values())):
        for group in groups.values():
            if turn < len(group) and len(chosen) < n:
                chosen.append(group[turn])
    return [items[i] for i in sorted(chosen)]
