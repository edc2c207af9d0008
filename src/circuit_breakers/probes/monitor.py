"""Run a harmfulness probe while a model generates, and halt at the first token that crosses its threshold.

Pieces, usable with `model.generate` directly:

- `ProbeMonitor`: a forward hook on the module whose output is the probe's layer (hidden-state entry l
  = block l-1's output, `circuit_breakers.hidden` numbering). At every decoding step it scores the
  last position's hidden state; the prompt's positions (the first forward) are scored only with
  `score_prompt=True`. `with monitor.attached(): ...` removes the hook in `finally`.
- `ProbeStoppingCriteria` (`monitor.stopping_criteria()`): returns one flag per row, so each row of
  a batch stops on its own; `generate` ends when every row tripped or finished.

A token's hidden state at a layer exists only once the token is fed back in, so the forward that
scores generated token i is the one that produces token i+1: a tripping row carries one generated
token past the trip, which is discarded. The last token of a row that reached `max_new_tokens` is
scored by one extra single-token forward over the KV cache that stops at the probe's layer.

`monitored_generate` / `monitored_generate_batch` return `MonitoredGeneration` records (the refusal
as `text` when tripped, the partial text in `halted_text`); `monitored_stream` is a manual greedy
loop with a KV cache that yields `(token_text, score)` for every token only after it has been
scored (a tripping token is never yielded), then the final record.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..generation import cache_kwarg, chat_prompt, output_cache
from ..hidden import _StopForward, _first_tensor
from ..models import find_architecture
from .probe import Probe, ProbeError, sigmoid

DEFAULT_REFUSAL = "I'm sorry, but I can't help with that."


@dataclass
class MonitoredGeneration:
    """One monitored completion.

    `scores` (probabilities), `tokens` (text pieces; `"".join(tokens)` is the generated text) and
    `token_ids` cover the scored response tokens: up to and including the tripping one. A piece that
    ends inside a multi-byte character is "" and the character comes with the next token. `token_index` is the index of
    the tripping token (None if none tripped, or if the prompt tripped: `tripped_on == "prompt"`).
    """

    text: str
    tripped: bool
    max_score: float
    token_index: int | None
    scores: list[float] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    halted_text: str | None = None
    token_ids: list[int] = field(default_factory=list)
    tripped_on: str | None = None  # "response", "prompt" or None
    prompt_max_score: float | None = None


def _conversation(item) -> list[dict]:
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    return list(item)


def eos_token_ids(model) -> set[int]:
    """The ids `generate` stops on (the generation config's), so the monitor agrees with it."""
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


class ProbeMonitor:
    """Scores the probe's layer during generation; keeps per-row trip state for `ProbeStoppingCriteria`."""

    def __init__(self, model, probe: Probe, *, layer: int | None = None, score_prompt: bool = False,
                 blocks_path: str | None = None):
        self.arch = find_architecture(model, blocks_path)
        self.layer = probe.layer if layer is None else layer
        n = self.arch.num_blocks
        if self.layer is None:
            raise ProbeError("the probe records no layer; pass layer=")
        if not 0 <= self.layer <= n:
            raise ProbeError(f"probe layer {self.layer} is outside 0..{n} for a model with {n} blocks")
        if probe.threshold_logit is None:
            raise ProbeError("the probe has no threshold: calibrate it (Probe.calibrate) or set threshold_logit")
        device = next(model.parameters()).device
        self.probe = probe.to(device).eval()
        if probe.hidden_size != getattr(model.config, "hidden_size", probe.hidden_size):
            raise ProbeError(f"the probe expects hidden size {probe.hidden_size}, the model has "
                             f"{model.config.hidden_size}: it was trained on another model")
        self.threshold = float(probe.threshold_logit)
        self.score_prompt = score_prompt
        self.eos = eos_token_ids(model)
        self.device = device
        self.stop_after_scoring = False  # raise _StopForward once scored (tail forwards)
        self.reset(torch.ones(1, 1, dtype=torch.long))

    # ---------------------------------------------------------------- hook

    def _module(self):
        if self.layer == 0:
            return self.arch.blocks[0], True
        if self.layer == self.arch.num_blocks and self.arch.final_norm is not None:
            return self.arch.final_norm, False
        return self.arch.blocks[self.layer - 1], False

    @torch.no_grad()
    def _on_hidden(self, hidden: torch.Tensor) -> None:
        if self.forwards == 0:
            if self.score_prompt:
                logits = self.probe(hidden.float())  # (B, P)
                mask = self.prompt_mask.to(logits.device).bool()
                self.prompt_logits = logits.masked_fill(~mask, -torch.inf).amax(-1)
        else:
            self.step_logits.append(self.probe(hidden[:, -1].float()))
        self.forwards += 1
        if self.stop_after_scoring:
            raise _StopForward

    @contextmanager
    def attached(self):
        """Register the hook for the body; always removed afterwards."""
        module, pre = self._module()
        if pre:
            def hook(module, args, kwargs):
                self._on_hidden(args[0] if args else kwargs["hidden_states"])
            handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        else:
            def hook(module, args, output):
                self._on_hidden(_first_tensor(output))
            handle = module.register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    # ---------------------------------------------------------------- per-row state

    def reset(self, prompt_mask: torch.Tensor) -> None:
        """Start a new generation for a (left-padded) prompt batch with this attention mask."""
        batch = prompt_mask.shape[0]
        self.prompt_mask = prompt_mask
        self.prompt_width = prompt_mask.shape[1]
        self.forwards = 0
        self.step_logits: list[torch.Tensor] = []
        self.prompt_logits: torch.Tensor | None = None
        self.tripped = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self.tripped_prompt = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        self.n_scored = torch.zeros(batch, dtype=torch.long, device=self.device)
        self._eos = torch.tensor(sorted(self.eos), dtype=torch.long, device=self.device)

    def update(self, input_ids: torch.Tensor) -> torch.Tensor:
        """After each forward: record the newest score per row; returns the rows that tripped (so far)."""
        if self.forwards == 1:  # the prefill
            if self.prompt_logits is not None:
                self.tripped_prompt = self.prompt_logits > self.threshold
                self.tripped |= self.tripped_prompt
            return self.tripped.clone()
        index = self.forwards - 2  # the generated token the newest forward scored
        token = input_ids[:, self.prompt_width + index]
        logit = self.step_logits[-1]
        active = ~self.tripped & ~self.finished
        is_eos = torch.isin(token, self._eos)
        self.finished |= active & is_eos
        scored = active & ~is_eos
        self.n_scored += scored.long()
        self.tripped |= scored & (logit > self.threshold)
        return self.tripped.clone()

    def stopping_criteria(self) -> "ProbeStoppingCriteria":
        return ProbeStoppingCriteria(self)

    def step_logits_matrix(self) -> torch.Tensor:
        """(rows, scored steps) logits on the CPU; row r's first n_scored[r] entries are its scores."""
        if not self.step_logits:
            return torch.zeros(self.tripped.shape[0], 0)
        return torch.stack(self.step_logits, 1).float().cpu()


class ProbeStoppingCriteria(StoppingCriteria):
    """Per-row stop flags for `model.generate`: a row stops as soon as one of its tokens trips."""

    def __init__(self, monitor: ProbeMonitor):
        self.monitor = monitor

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return self.monitor.update(input_ids)


# -------------------------------------------------------------------- records


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    """Text pieces per token, `"".join(pieces) == decode(ids)`; an incomplete UTF-8 character waits."""
    pieces, emitted = [], ""
    for i in range(len(ids)):
        full = tokenizer.decode(ids[: i + 1], skip_special_tokens=True)
        if full.endswith("\ufffd") and i + 1 < len(ids):
            pieces.append("")
            continue
        pieces.append(full[len(emitted):] if full.startswith(emitted) else full)
        emitted = full
    return pieces


def _record(tokenizer, ids: list[int], logits: list[float], *, trip_index: int | None, prompt_trip: bool,
            prompt_logit: float | None, refusal: str) -> MonitoredGeneration:
    scores = [sigmoid(x) for x in logits]
    kept = ids[: len(logits)]
    text = tokenizer.decode(kept, skip_special_tokens=True)
    tripped = prompt_trip or trip_index is not None
    return MonitoredGeneration(
        text=refusal if tripped else text,
        tripped=tripped,
        max_score=max(scores, default=0.0),
        token_index=None if prompt_trip else trip_index,
        scores=scores,
        tokens=_pieces(tokenizer, kept),
        halted_text=text if tripped else None,
        token_ids=list(kept),
        tripped_on="prompt" if prompt_trip else ("response" if tripped else None),
        prompt_max_score=None if prompt_logit is None else sigmoid(prompt_logit),
    )


# -------------------------------------------------------------------- generation


def monitored_generate(model, tokenizer, conversation_or_prompt, probe: Probe, *, max_new_tokens: int = 128,
                       refusal: str = DEFAULT_REFUSAL, score_prompt: bool = False, prefill: str = "",
                       layer: int | None = None, **generate_kwargs) -> MonitoredGeneration:
    """One monitored completion. A string is one user turn; a list is a conversation."""
    return monitored_generate_batch(model, tokenizer, [conversation_or_prompt], probe,
                                    max_new_tokens=max_new_tokens, refusal=refusal, score_prompt=score_prompt,
                                    prefills=[prefill], layer=layer, **generate_kwargs)[0]


@torch.no_grad()
def monitored_generate_batch(model, tokenizer, conversations: Sequence, probe: Probe, *,
                             max_new_tokens: int = 128, refusal: str = DEFAULT_REFUSAL,
                             score_prompt: bool = False, prefills: Sequence[str] | None = None,
                             batch_size: int = 16, layer: int | None = None, **generate_kwargs
                             ) -> list[MonitoredGeneration]:
    """Monitored `model.generate` (greedy unless `generate_kwargs` say otherwise), in batches.

    Each row stops on its own when it trips or ends; a batch ends when all rows have. Results come
    back in input order.
    """
    monitor = ProbeMonitor(model, probe, layer=layer, score_prompt=score_prompt)
    prefills = list(prefills) if prefills is not None else [""] * len(conversations)
    texts = [chat_prompt(tokenizer, _conversation(c), p) for c, p in zip(conversations, prefills)]
    results: list[MonitoredGeneration | None] = [None] * len(texts)
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    kwargs = {"do_sample": False, **generate_kwargs}
    try:
        for start in range(0, len(texts), batch_size):
            chunk = list(range(start, min(start + batch_size, len(texts))))
            batch = tokenizer([texts[i] for i in chunk], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(monitor.device)
            for i, record in zip(chunk, _generate_chunk(model, tokenizer, monitor, batch, max_new_tokens,
                                                        refusal, kwargs)):
                results[i] = record
    finally:
        tokenizer.padding_side = side
    return results


def _generate_chunk(model, tokenizer, monitor: ProbeMonitor, batch, max_new_tokens: int, refusal: str,
                    kwargs: dict) -> list[MonitoredGeneration]:
    monitor.reset(batch["attention_mask"])
    with monitor.attached():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             stopping_criteria=StoppingCriteriaList([monitor.stopping_criteria()]),
                             return_dict_in_generate=True, **kwargs)
        sequences = out.sequences
        generated = sequences.shape[1] - monitor.prompt_width
        # Rows still running at max_new_tokens have one unscored last token, unless it is an end token.
        last = sequences[:, -1]
        pending = ~monitor.tripped & ~monitor.finished & ~torch.isin(last, monitor._eos)
        if generated > 0 and bool(pending.any()):
            _score_last_token(monitor, sequences, batch["attention_mask"], output_cache(out))
    logits = monitor.step_logits_matrix()
    n_scored = monitor.n_scored.cpu().tolist()
    tripped = monitor.tripped.cpu().tolist()
    prompt_trip = monitor.tripped_prompt.cpu().tolist()
    prompt_logits = monitor.prompt_logits.cpu().tolist() if monitor.prompt_logits is not None else None
    records = []
    for row in range(sequences.shape[0]):
        ids = sequences[row, monitor.prompt_width:].tolist()
        row_logits = logits[row, : n_scored[row]].tolist()
        trip_index = n_scored[row] - 1 if tripped[row] and not prompt_trip[row] else None
        records.append(_record(tokenizer, ids, row_logits, trip_index=trip_index, prompt_trip=prompt_trip[row],
                               prompt_logit=prompt_logits[row] if prompt_logits else None, refusal=refusal))
    return records


def _cache_kwargs(module, cache, **extra) -> dict:
    """The KV-cache argument under its name for this transformers version, and those of `extra` the
    module's forward takes (e.g. cache_position before 5.x)."""
    params = inspect.signature(module.forward).parameters
    return {cache_kwarg(module): cache, **{k: v for k, v in extra.items() if k in params}}


def _score_last_token(monitor: ProbeMonitor, sequences: torch.Tensor, prompt_mask: torch.Tensor, past) -> None:
    """One single-token forward over generate's KV cache, stopped at the probe's layer."""
    mask = torch.cat([prompt_mask, prompt_mask.new_ones(prompt_mask.shape[0],
                                                        sequences.shape[1] - prompt_mask.shape[1])], 1)
    position_ids = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -1:]
    cache_position = torch.tensor([sequences.shape[1] - 1], device=sequences.device)
    monitor.stop_after_scoring = True
    try:
        monitor.arch.decoder(input_ids=sequences[:, -1:], attention_mask=mask, position_ids=position_ids,
                             use_cache=True, **_cache_kwargs(monitor.arch.decoder, past,
                                                             cache_position=cache_position))
    except _StopForward:
        pass
    finally:
        monitor.stop_after_scoring = False
    monitor.update(sequences)  # the newest forward scored the last generated token


@torch.no_grad()
def monitored_stream(model, tokenizer, conversation_or_prompt, probe: Probe, *, max_new_tokens: int = 128,
                     refusal: str = DEFAULT_REFUSAL, score_prompt: bool = False, prefill: str = "",
                     layer: int | None = None, min_new_tokens: int = 0) -> Iterator:
    """Greedy decoding with a KV cache: yields `(token_text, score)` per token once scored, then the record.

    A token is yielded only after its own score is known, so a tripping token is never shown; the
    final item is a `MonitoredGeneration` (its `text` is the refusal when tripped). As in `generate`,
    `min_new_tokens` holds off the end tokens until that many tokens were generated. The hook is
    attached for each forward only, so an abandoned iterator leaves no hook behind.
    """
    monitor = ProbeMonitor(model, probe, layer=layer, score_prompt=score_prompt)
    text = chat_prompt(tokenizer, _conversation(conversation_or_prompt), prefill)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(monitor.device)
    monitor.reset(torch.ones_like(ids))
    generated: list[int] = []
    logits: list[float] = []
    emitted = ""

    def finish(trip_index=None):
        prompt_logit = float(monitor.prompt_logits[0]) if monitor.prompt_logits is not None else None
        return _record(tokenizer, generated, logits, trip_index=trip_index,
                       prompt_trip=bool(monitor.tripped_prompt[0]), prompt_logit=prompt_logit, refusal=refusal)

    with monitor.attached():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    if bool(monitor.update(ids)[0]):
        yield finish()
        return
    eos = sorted(monitor.eos)

    def greedy(logits: torch.Tensor) -> int:
        if len(generated) < min_new_tokens and eos:
            logits = logits.clone()
            logits[eos] = -torch.inf
        return int(logits.argmax())

    past = output_cache(out)
    next_id = greedy(out.logits[0, -1])
    for step in range(max_new_tokens):
        if next_id in monitor.eos:
            break
        generated.append(next_id)
        monitor.stop_after_scoring = step == max_new_tokens - 1  # no next token is needed
        out = None
        try:
            with monitor.attached():
                out = model(input_ids=torch.tensor([[next_id]], device=monitor.device), use_cache=True,
                            logits_to_keep=1, **_cache_kwargs(model, past))
        except _StopForward:
            pass
        logit = float(monitor.step_logits[-1][0])
        logits.append(logit)
        if logit > monitor.threshold:
            yield finish(trip_index=len(logits) - 1)
            return
        full = tokenizer.decode(generated, skip_special_tokens=True)
        piece = ""
        if not full.endswith("\ufffd"):
            piece, emitted = (full[len(emitted):] if full.startswith(emitted) else full), full
        yield piece, sigmoid(logit)
        if out is None:
            break
        past = output_cache(out)
        next_id = greedy(out.logits[0, -1])
    yield finish()
