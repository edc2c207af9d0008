"""The data this project ships, and how training sets are assembled from specs.

`builtin/` holds prompts written for this project: harmful requests over the HarmBench semantic
categories, benign instructions, borderline-safe requests, refusal styles and affirmative openers.
Each prompt file is split into train and test by a fixed seed (`split_examples`).

`generated/<model>/` holds the sets `circuit-breakers data build --model <model>` wrote, with the
responses that model generated: `harmful.{train,test}.jsonl` (the circuit-breaker set),
`benign.*`, `borderline.*` and `refusal.*` (retain sets). Those of the embedded default are
committed; "builtin" in a config means them.

`builtin/tools/` holds the tool-use sets (written by scripts/make_tool_sets.py): `tools.json`, the tool
definitions, and `{harmful,benign}.{train,test}.jsonl`, whose records name their tools by name. Their
responses are written, not generated: a harmful item's response is the harmful call itself.

`builtin/multimodal/` holds the image sets (written by scripts/make_multimodal_sets.py, every image
drawn by multimodal/images.py): `{harmful,typographic,benign}.{train,test}.jsonl` and `images/`. Harmful
items are request-only (the harmful part is in the image; each has an affirmative `target`), their
typographic variants carry the request in the image, and benign items are questions about drawn scenes
with written answers (`answers`: the accepted short forms). Training specs: `builtin:multimodal_benign`
(the written answers) and `builtin:multimodal_harmful` / `builtin:multimodal_typographic`, whose
responses `circuit-breakers data build --model <VLM>` has the model write into generated/<model>/.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from .loaders import jsonl_objects, load_examples, read_jsonl, read_text
from .schema import Behavior, DataError, Example, example_from_record
from .formatting import refusal_examples

PROMPTS_DIR = Path(__file__).parent / "builtin"
GENERATED_DIR = Path(__file__).parent / "generated"
BUILTIN_MODEL = "smollm2-135m"
PROMPT_SETS = ("harmful", "benign", "borderline")
GENERATED_SETS = ("harmful", "benign", "borderline", "refusal")
TOOLS_DIR = PROMPTS_DIR / "tools"
TOOL_SETS = {"tools_harmful": "harmful", "tools_benign": "benign"}  # data spec name -> kind
MULTIMODAL_DIR = PROMPTS_DIR / "multimodal"
MULTIMODAL_KINDS = ("harmful", "typographic", "benign")
MULTIMODAL_GENERATED = ("harmful", "typographic")  # request-only: a vision-language model writes their responses
# data spec name -> kind; the benign set's responses are written, the others generated (generated_multimodal_set)
MULTIMODAL_SETS = {"multimodal_harmful": "harmful", "multimodal_typographic": "typographic",
                   "multimodal_benign": "benign"}
SPLIT_SEED = 1234
TEST_FRACTION = 0.2


def split_examples(examples: list[Example], split: str, *, seed: int = SPLIT_SEED,
                   test_fraction: float = TEST_FRACTION) -> list[Example]:
    """The train or test part of a list, stratified by category, fixed by `seed`."""
    if split not in ("train", "test", "all"):
        raise ValueError(f"split: expected train, test or all, got {split!r}")
    if split == "all":
        return list(examples)
    rng = random.Random(seed)
    chosen: list[Example] = []
    for category in sorted({e.category or "" for e in examples}):
        group = [e for e in examples if (e.category or "") == category]
        rng.shuffle(group)
        n_test = max(1, round(len(group) * test_fraction)) if len(group) > 1 else 0
        chosen.extend(group[:n_test] if split == "test" else group[n_test:])
    return chosen


def builtin_prompts(name: str, split: str = "all") -> list[Example]:
    """Request-only examples of a built-in prompt set: harmful, benign or borderline."""
    if name not in PROMPT_SETS:
        raise ValueError(f"built-in prompt sets are {', '.join(PROMPT_SETS)}, not {name!r}")
    examples = load_examples(PROMPTS_DIR / f"{name}.jsonl", require_response=False)
    return split_examples(examples, split)


def refusal_texts() -> list[str]:
    return [r["text"] for r in read_jsonl(PROMPTS_DIR / "refusals.jsonl")]


def affirmative_starts() -> list[str]:
    return [r["template"] for r in read_jsonl(PROMPTS_DIR / "affirmative.jsonl")]


def generated_path(name: str, split: str, model: str = BUILTIN_MODEL) -> Path:
    return GENERATED_DIR / model / f"{name}.{split}.jsonl"


def generated_set(name: str, split: str, model: str = BUILTIN_MODEL) -> list[Example]:
    path = generated_path(name, split, model)
    if not path.is_file():
        raise DataError(f"{path}: missing; build it with `circuit-breakers data build --model {model}`")
    return load_examples(path)


def builtin_tool_definitions() -> dict[str, dict]:
    """The shipped tool definitions (OpenAI shape) by name."""
    tools = json.loads(read_text(TOOLS_DIR / "tools.json"))
    return {tool["function"]["name"]: tool for tool in tools}


def _tool_records(kind: str, split: str) -> list[tuple[str, dict]]:
    """(where, record) of a shipped tool set, its tool names replaced by their definitions."""
    if kind not in TOOL_SETS.values():
        raise ValueError(f"built-in tool sets are harmful and benign, not {kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split: expected train or test, got {split!r}")
    path = TOOLS_DIR / f"{kind}.{split}.jsonl"
    definitions = builtin_tool_definitions()
    records = []
    for n, record in jsonl_objects(path, read_text(path)):
        where = f"{path} line {n}"
        unknown = [name for name in record.get("tools", []) if name not in definitions]
        if unknown:
            raise DataError(f'{where}: field "tools": {", ".join(unknown)} not defined in {TOOLS_DIR / "tools.json"}')
        record = {**record, "tools": [definitions[name] for name in record.get("tools", [])],
                  "source": f"builtin/tools/{path.name}:{n}"}
        records.append((where, record))
    return records


def builtin_tool_set(kind: str, split: str = "train") -> list[Example]:
    """The shipped tool-use examples: `kind` "harmful" (each response is the harmful call) or "benign"
    (correct calls, some followed by the tool's result and the answer), `split` "train" or "test"."""
    return [example_from_record(record, where) for where, record in _tool_records(kind, split)]


def builtin_tool_behaviors(split: str = "test") -> list[Behavior]:
    """The shipped harmful tool-use requests as Behaviors, with their tools and `harmful_call`."""
    behaviors = []
    for where, record in _tool_records("harmful", split):
        example = example_from_record(record, where)
        name = record["harmful_call"]["name"]
        behaviors.append(Behavior(id=example.id, request=example.request, category=example.category,
                                  target=f"Sure, I'll use {name} to do that.", tools=example.tools,
                                  harmful_call=dict(record["harmful_call"])))
    return behaviors


def _multimodal_path(kind: str, split: str) -> Path:
    if kind not in MULTIMODAL_KINDS:
        raise ValueError(f"built-in multimodal sets are {', '.join(MULTIMODAL_KINDS)}, not {kind!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split: expected train or test, got {split!r}")
    return MULTIMODAL_DIR / f"{kind}.{split}.jsonl"


def builtin_multimodal_set(kind: str, split: str = "train") -> list[Example]:
    """The shipped image examples, their image paths absolute: `kind` "harmful" (image + request, no
    response), "typographic" (the request drawn into the image, a neutral text prompt; no response) or
    "benign" (questions about drawn scenes with written responses); `split` "train" or "test"."""
    return load_examples(_multimodal_path(kind, split), require_response=kind == "benign")


def builtin_multimodal_records(kind: str, split: str = "test") -> list[tuple[Example, dict]]:
    """(example, raw record) pairs of a shipped multimodal set: the record keeps the fields an Example
    drops (`target`, `answers`, `image_text`, `image_description`, `base_id`)."""
    path = _multimodal_path(kind, split)
    records = [record for _, record in jsonl_objects(path, read_text(path))]
    return list(zip(builtin_multimodal_set(kind, split), records))


def builtin_multimodal_behaviors(split: str = "test", kind: str = "harmful") -> list[Behavior]:
    """The shipped harmful image requests ("harmful", or their "typographic" variants) as Behaviors with
    their images, affirmative targets and image descriptions (for the judges)."""
    if kind not in ("harmful", "typographic"):
        raise ValueError(f"multimodal behaviours are harmful or typographic, not {kind!r}")
    return [Behavior(id=example.id, request=example.request, category=example.category, target=record["target"],
                     images=example.images, image_description=record.get("image_description"))
            for example, record in builtin_multimodal_records(kind, split)]


def generated_multimodal_set(name: str, split: str = "train") -> list[Example]:
    """The responses a vision-language model wrote to a request-only image set (`name` multimodal_harmful or
    multimodal_typographic): generated/<model>/<name>.<split>.jsonl, written by `circuit-breakers data build
    --model <VLM>`. None ship: the embedded default is text-only, and they should be the trained model's own
    answers. When several models' are there, the spec is ambiguous and the file must be named instead."""
    found = sorted(GENERATED_DIR.glob(f"*/{name}.{split}.jsonl"))
    if not found:
        raise DataError(f"builtin:{name}: the built-in harmful image requests have no responses yet (a vision-language "
                        f"model writes them): run `circuit-breakers data build --model <the VLM you train>`, which "
                        f"writes {GENERATED_DIR}/<model>/{name}.{{train,test}}.jsonl")
    if len(found) > 1:
        raise DataError(f"builtin:{name}: responses of several models are in {GENERATED_DIR} "
                        f"({', '.join(p.parent.name for p in found)}); name the file of the one you train instead, "
                        f"e.g. {found[0]}")
    return load_examples(found[0])


def load_training_sets(cb_specs: list[str], retain_specs: list[str], *, seed: int,
                       response_field: str | None = None, refusals: bool = True
                       ) -> tuple[list[Example], list[Example]]:
    """(circuit-breaker examples, retain examples) from config specs; `builtin` = the shipped sets.

    `builtin:NAME` is one shipped train set (harmful, benign, borderline or refusal, the tool-use sets
    tools_harmful and tools_benign, or the image sets multimodal_benign (written answers), multimodal_harmful
    and multimodal_typographic (answers a vision-language model wrote: `generated_multimodal_set`)).

    With `refusals`, every circuit-breaker request also enters the retain set answered by one of
    the project's refusal styles, so refusing stays a retained behaviour (paper, Llama-3 recipe).
    """
    def load(specs: list[str], builtin_names: tuple[str, ...]) -> list[Example]:
        examples: list[Example] = []
        for spec in specs:
            if spec == "builtin":
                for name in builtin_names:
                    examples.extend(generated_set(name, "train"))
            elif spec.startswith("builtin:"):
                # One shipped set by name; listing it again beside "builtin" weights it up.
                name = spec.removeprefix("builtin:")
                if name in TOOL_SETS:
                    examples.extend(builtin_tool_set(TOOL_SETS[name], "train"))
                    continue
                if name in MULTIMODAL_SETS:
                    kind = MULTIMODAL_SETS[name]
                    examples.extend(builtin_multimodal_set(kind, "train") if kind not in MULTIMODAL_GENERATED
                                    else generated_multimodal_set(name, "train"))
                    continue
                if name not in GENERATED_SETS:
                    raise DataError(f"data spec {spec!r}: built-in sets are "
                                    f"{', '.join('builtin:' + n for n in (*GENERATED_SETS, *TOOL_SETS, *MULTIMODAL_SETS))}")
                examples.extend(generated_set(name, "train"))
            else:
                examples.extend(load_examples(spec, response_field=response_field))
        return examples

    cb = load(cb_specs, ("harmful",))
    retain = load(retain_specs, ("benign", "borderline"))
    if refusals:
        retain.extend(refusal_examples([e for e in cb if e.request or e.messages], refusal_texts(), seed))
    return cb, retain


def check_training_data(config) -> None:
    """Load and validate the training sets of an RRConfig, as the trainer will, but without a tokenizer: for
    commands to call before the model loads, so a bad file fails in a second (the trainer loads them again;
    that is cheap next to loading a model)."""
    specs = {"circuit_breaker_data": config.circuit_breaker_data, "retain_data": config.retain_data}
    loaded = dict(zip(specs, load_training_sets(*specs.values(), seed=config.seed,
                                                response_field=config.response_field,
                                                refusals=config.refusal_retain)))
    for key, examples in loaded.items():
        if not examples:
            raise DataError(f"{key}: {specs[key]} holds no items; the circuit-breaker and the retain set both "
                            "need at least one")
