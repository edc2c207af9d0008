"""Teach a chat model to call tools: a short supervised LoRA fine-tune on tool-use examples, merged.

The embedded default (SmolLM2-135M-Instruct) has a chat template without tool support and does not call
tools, so a tool-use circuit breaker has nothing to reroute on it. `teach_tool_calls` makes a tool-using
subject from it (or from any ChatML model) before RR:

1. `install_tool_template`: a model whose template ignores ``tools`` gets a ChatML template in the Hermes /
   Qwen2.5 style: the tools as JSON inside ``<tools></tools>`` in the system turn, each call written as
   ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, tool results sent back as a user turn
   inside ``<tool_response>``. Conversations without tools render exactly as under the model's own template
   (checked), so its text behaviour and the text sets generated with it stay what they were.
2. Supervised fine-tuning of a LoRA adapter on the responses only (the prompt's tokens carry no loss), the
   examples written by `data.ChatFormatter` with ``tool_format="template"``: the calls are learnt in the
   format the template renders, so the prompts of the evaluation, the attacks (the forced call's
   `tools.forcing.call_opening`), serving and RR itself are the ones the model was taught with.
3. The adapter is merged; `save_tool_model` writes the model with the tokenizer and its tool template, a
   directory `load_model` loads and `circuit-breakers train --model` takes.

Why the template and not ``tool_format="json"`` (tools listed in the first user turn, calls as JSON lines):
every other path renders prompts with ``apply_chat_template(..., tools=...)``. Under a template that
ignores tools, a model taught in the JSON format would be evaluated, attacked and served without ever being
shown its tools, and the forced-call attack has no call opening to prefill.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from .. import stopping
from ..atomic import atomic_directory
from ..data import ChatFormatter, Example, TokenizedExample, collate, tokenize_examples
from ..losses import response_cross_entropy
from ..models import ModelError, find_architecture, unwrap
from ..tools.forcing import call_opening
from .lora import resolve_lora_targets

__all__ = ["TOOL_SFT_DEFAULTS", "chatml_tool_template", "has_tool_support", "install_tool_template",
           "response_loss", "save_tool_model", "teach_tool_calls"]

# Measured on SmolLM2-135M-Instruct (benchmarks/RESULTS.md, 2026-11-29).
TOOL_SFT_DEFAULTS = dict(steps=20, lr=3e-3, lora_r=16, batch_size=4, max_length=768, seed=0)

_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_TOOLS_INTRO = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')
# Conversations whose rendering must not change when the tool template replaces a model's own.
_SAME_RENDERING = (
    [{"role": "user", "content": "Hi."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."}],
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "?"}],
    [{"role": "user", "content": ""}],
)


def _literal(text: str | None) -> str:
    """A Jinja expression for `text` (a JSON string is a Jinja string literal), `none` for None."""
    return "none" if text is None else json.dumps(text, ensure_ascii=False)


def chatml_tool_template(default_system: str | None = None) -> str:
    """A ChatML chat template with Hermes-style tool calls (see the module docstring). `default_system`: the
    system turn written when the conversation has none (SmolLM2: "You are a helpful AI assistant named
    SmolLM, trained by Hugging Face"); None writes no system turn then, unless there are tools."""
    return (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set rest = messages[1:] %}"
        "{%- else %}{%- set system = " + _literal(default_system) + " %}{%- set rest = messages %}{%- endif %}"
        "{%- if tools %}"
        "{{- '<|im_start|>system\\n' }}{%- if system %}{{- system + '\\n\\n' }}{%- endif %}"
        "{{- " + _literal(_TOOLS_INTRO) + " }}"
        "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
        "{{- " + _literal(_TOOLS_OUTRO) + " + '<|im_end|>\\n' }}"
        "{%- elif system is not none %}"
        "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- for m in rest %}"
        "{%- if m['role'] == 'assistant' and m.get('tool_calls') %}"
        "{{- '<|im_start|>assistant\\n' + (m['content'] or '') }}"
        "{%- for call in m['tool_calls'] %}"
        "{%- set f = call['function'] if call['function'] is defined else call %}"
        "{%- if m['content'] or not loop.first %}{{- '\\n' }}{%- endif %}"
        "{{- '<tool_call>\\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
        "{%- if f['arguments'] is string %}{{- f['arguments'] }}{%- else %}{{- f['arguments'] | tojson }}{%- endif %}"
        "{{- '}\\n</tool_call>' }}"
        "{%- endfor %}"
        "{{- '<|im_end|>\\n' }}"
        "{%- elif m['role'] == 'tool' %}"
        "{%- if loop.first or rest[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
        "{{- '\\n<tool_response>\\n' + m['content'] + '\\n</tool_response>' }}"
        "{%- if loop.last or rest[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
        "{%- else %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + (m['content'] or '') + '<|im_end|>\\n' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def _render(tokenizer, conversation, template: str | None = None, **kwargs) -> str:
    return tokenizer.apply_chat_template(list(conversation), tokenize=False, chat_template=template, **kwargs)


def has_tool_support(tokenizer) -> bool:
    """Does the tokenizer's chat template write tools into the prompt and a call into the assistant turn?"""
    if not getattr(tokenizer, "chat_template", None):
        return False
    user = [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": "cb_probe", "description": "A probe.",
                                             "parameters": {"type": "object", "properties": {}}}}
    try:
        if _render(tokenizer, user, add_generation_prompt=True, tools=[tool]) == \
                _render(tokenizer, user, add_generation_prompt=True):
            return False
        call_opening(tokenizer, [tool])
    except Exception:  # jinja raise_exception(), a template that chokes on tool_calls, no call rendered
        return False
    return True


def _default_system(tokenizer) -> str | None:
    """The system turn a ChatML template writes when the conversation has none (None: it writes none)."""
    rendered = _render(tokenizer, [{"role": "user", "content": "x"}], add_generation_prompt=False)
    head = f"{_IM_START}system\n"
    end = rendered.find(f"{_IM_END}\n{_IM_START}user\n")
    if rendered.startswith(head) and end >= 0 and _IM_START not in rendered[len(head):end]:
        return rendered[len(head):end]
    return None


def install_tool_template(tokenizer) -> bool:
    """Give `tokenizer` the ChatML tool template when its own template has no tool support; True when it was
    replaced, False when the template already renders tools (then it is kept). Raises ModelError for a
    template that is not ChatML, or whose renderings without tools the replacement would change."""
    if has_tool_support(tokenizer):
        return False
    name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
    original = getattr(tokenizer, "chat_template", None)
    vocab = tokenizer.get_vocab()
    if not original or _IM_START not in vocab or _IM_END not in vocab:
        raise ModelError(f"{name}: its chat template has no tool support and it is not a ChatML model "
                         f"({_IM_START}/{_IM_END}); give the tokenizer a chat template that renders tools first")
    template = chatml_tool_template(_default_system(tokenizer))
    for conversation in _SAME_RENDERING:
        for prompt in (True, False):
            if _render(tokenizer, conversation, template, add_generation_prompt=prompt) != \
                    _render(tokenizer, conversation, original, add_generation_prompt=prompt):
                raise ModelError(f"{name}: the ChatML tool template would render conversations without tools "
                                 f"differently from the model's own template; give the tokenizer a chat "
                                 f"template that renders tools first")
    tokenizer.chat_template = template
    return True


def response_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of a collated batch (the prompt's tokens and the
    padding carry none). The LM head runs on the predicting positions only."""
    base = unwrap(model)
    decoder = find_architecture(base).decoder
    hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return response_cross_entropy(hidden, base.get_output_embeddings(), batch["input_ids"], batch["response_mask"])


def _length_grouped_batches(items: Sequence[TokenizedExample], batch_size: int, rng: random.Random):
    """Endless batches of indices: every epoch shuffled, then sorted by length within groups of 8 batches (less
    padding), the batches of a group in random order."""
    while True:
        order = list(range(len(items)))
        rng.shuffle(order)
        group = 8 * batch_size
        for start in range(0, len(order), group):
            chunk = sorted(order[start:start + group], key=lambda i: items[i].length)
            batches = [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
            rng.shuffle(batches)
            yield from batches


def teach_tool_calls(model: nn.Module, tokenizer, examples: Sequence[Example], *, steps: int = 20,
                     lr: float = 3e-3, lora_r: int = 16, lora_alpha: float | None = None, batch_size: int = 4,
                     max_length: int = 768, seed: int = 0, warmup_steps: int | None = None,
                     max_grad_norm: float = 1.0,
                     on_step: Callable[[dict], None] | None = None) -> nn.Module:
    """Fine-tune `model` to make the calls of `examples` (tool-use Examples, e.g.
    ``builtin_tool_set("benign", "train")``) and return it with the LoRA adapter merged.

    `model` is changed in place (the adapter is merged into its weights; the returned model is it, unwrapped)
    and so is the tokenizer: it gets the ChatML tool template first when its own has no tool support
    (`install_tool_template`). LoRA of rank `lora_r` (alpha `lora_alpha`, default
    = rank) on every attention and MLP projection, AdamW at `lr` with a linear warm-up over `warmup_steps`
    (default a tenth of `steps`) and a cosine decay to 0, `steps` optimizer steps of `batch_size` examples
    drawn without replacement by epoch, seeded by `seed`. `on_step` receives {"step", "loss", "lr",
    "tokens", "seconds"} after every step. An example longer than `max_length` tokens has its response cut
    (a prompt that leaves no room raises DataError)."""
    from peft import LoraConfig, get_peft_model

    if steps < 1 or batch_size < 1 or lora_r < 1 or not lr > 0:
        raise ValueError(f"steps, batch_size and lora_r must be >= 1 and lr > 0; got steps={steps}, "
                         f"batch_size={batch_size}, lora_r={lora_r}, lr={lr}")
    if not examples:
        raise ValueError("teach_tool_calls needs at least one example")
    install_tool_template(tokenizer)
    formatter = ChatFormatter(tokenizer, max_length, seed=seed, tool_format="template")
    items = tokenize_examples(examples, formatter)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    torch.manual_seed(seed)
    for p in model.parameters():
        p.requires_grad_(False)
    arch = find_architecture(model)
    lora = LoraConfig(r=lora_r, lora_alpha=lora_alpha or lora_r, lora_dropout=0.0, bias="none",
                      target_modules=resolve_lora_targets(arch, ["auto"]), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    peft_model.train()
    parameters = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 10) if warmup_steps is None else warmup_steps

    def factor(step: int) -> float:  # LambdaLR's step counts from 0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    device = next(model.parameters()).device
    batches = _length_grouped_batches(items, batch_size, random.Random(seed))
    start = time.perf_counter()
    for step in range(1, steps + 1):
        stopping.check()  # a Ctrl-C whose KeyboardInterrupt was lost on the way
        batch = collate([items[i] for i in next(batches)], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = response_loss(peft_model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"teach_tool_calls: the loss is {loss.item()} at step {step}; lower lr")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        rate = schedule.get_last_lr()[0]
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            on_step({"step": step, "loss": loss.item(), "lr": rate, "tokens": int(batch["attention_mask"].sum()),
                     "seconds": time.perf_counter() - start})
    merged = peft_model.merge_and_unload()
    merged.eval()
    return merged


def save_tool_model(model: nn.Module, tokenizer, out: str | Path, *, base_model: str, settings: dict,
                    log: Sequence[dict] = ()) -> Path:
    """Write OUT/ = the merged model, the tokenizer with its tool template, a model card and teach.json (the
    settings and the loss log); the directory loads with `models.load_model(OUT)`."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.items())
    card = f"""---
base_model: {base_model}
library_name: transformers
tags:
- circuit-breakers
- tool-use
---

# {base_model}, taught to call tools

`{base_model}` fine-tuned (LoRA, merged) on tool-use examples by `circuit-breakers train --teach-tools`, so
that it calls tools: the subject a tool-use circuit breaker is then trained on. Its chat template renders
tools in the Hermes style (`<tools>` in the system turn, calls as `<tool_call>{{"name", "arguments"}}</tool_call>`).

| setting | value |
|---|---|
{rows}
"""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / "teach.json").write_text(json.dumps({"base_model": base_model, "settings": settings, "log": list(log)},
                                                   indent=1) + "\n", encoding="utf-8")
    return out
