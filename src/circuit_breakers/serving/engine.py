"""Batched token-by-token generation for the server: per-row stop strings, sampling and streaming.

`circuit_breakers.generation.generate` runs `model.generate` with one setting for a whole batch. A
server needs more per row: its own `max_tokens`, stop strings, temperature/top_p/seed, a finish
reason, and a callback that streams text as it is decoded. This is a small KV-cached loop that gives
each row those; rows that are done keep feeding a pad token until the whole batch is done (or
cancelled). With a probe, the monitor's hook (`circuit_breakers.probes.monitor.ProbeMonitor`) scores
every token as it is fed back in, so one loop serves plain and monitored requests, streamed or not.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

# Called from the generation thread with (text delta, per-token probe score or None).
DeltaCallback = Callable[[str, "float | None"], None]


@dataclass
class GenRequest:
    """One row of a batch. `temperature == 0` means greedy."""

    prompt_ids: list[int]
    max_tokens: int
    stop: tuple[str, ...] = ()
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    on_delta: DeltaCallback | None = None
    cancelled: Callable[[], bool] | None = None


@dataclass
class GenResult:
    text: str
    finish_reason: str  # "stop", "length" or "content_filter"
    prompt_tokens: int
    completion_tokens: int
    circuit_breaker: dict | None = None
    token_scores: list[float] = field(default_factory=list)


class StopTracker:
    """Accumulates decoded text, trims it at the first stop string, and says how much is safe to emit.

    Text that could still become a stop string (a suffix that is a prefix of one) and an unfinished
    multi-byte character (decoded as U+FFFD) are held back until the next token decides.
    """

    def __init__(self, stop: Sequence[str] = ()):
        self.stop = tuple(s for s in stop if s)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def update(self, full_text: str) -> str:
        """Set the text decoded so far; return the new text that is safe to send."""
        if self.stopped:
            return ""
        cut = min((i for i in (full_text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = full_text[:cut]
            self.stopped = True
            return self._take(len(self.text))
        self.text = full_text
        safe = len(full_text.rstrip("\ufffd")) if full_text.endswith("\ufffd") else len(full_text)
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if full_text[safe - k:safe] == s[:k]:
                    hold = max(hold, k)
                    break
        return self._take(safe - hold)

    def flush(self) -> str:
        """At the end of the generation: whatever was held back."""
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.emitted:
            return ""
        delta = self.text[self.emitted:upto]
        self.emitted = upto
        return delta


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def _pick(logits: torch.Tensor, request: GenRequest, generator: torch.Generator | None) -> int:
    if request.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _cache_argument(model) -> str:
    """transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


@torch.no_grad()
def generate_rows(model, tokenizer, requests: Sequence[GenRequest], *, monitor=None,
                  refusal: str = "") -> list[GenResult]:
    """Generate every request in one left-padded batch; each row stops on its own terms.

    monitor: a `circuit_breakers.probes.monitor.ProbeMonitor` for this model. Its hook scores every
    generated token when the token is fed back in; a token is accepted (and streamed, with its score)
    only once scored, and a row whose token scores strictly above the threshold logit halts there:
    the token is dropped, the row answers `refusal` with finish_reason "content_filter". These are
    the monitor's own rules (`monitored_stream`), applied per row of a batch.
    """
    if not requests:
        return []
    device = next(model.parameters()).device
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    width = max(len(r.prompt_ids) for r in requests)
    input_ids = torch.full((len(requests), width), pad, dtype=torch.long)
    attention = torch.zeros((len(requests), width), dtype=torch.long)
    for i, r in enumerate(requests):
        if r.prompt_ids:
            input_ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            attention[i, width - len(r.prompt_ids):] = 1
    input_ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)

    generators = []
    for r in requests:
        if r.temperature > 0 and r.seed is not None:
            g = torch.Generator(device="cpu")
            g.manual_seed(r.seed)
            generators.append(g)
        else:
            generators.append(None)
    trackers = [StopTracker(r.stop) for r in requests]
    tokens: list[list[int]] = [[] for _ in requests]
    scores: list[list[float]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    trip_index: list[int | None] = [None] * len(requests)
    cache_arg = _cache_argument(model)

    def accept(i: int, token: int, score: float | None) -> None:
        r = requests[i]
        tokens[i].append(token)
        delta = trackers[i].update(tokenizer.decode(tokens[i], skip_special_tokens=True))
        if trackers[i].stopped:
            finish[i] = "stop"
        elif len(tokens[i]) >= r.max_tokens:
            finish[i] = "length"
        if r.on_delta is not None:
            if delta or score is not None:
                r.on_delta(delta, score)
            rest = trackers[i].flush() if finish[i] is not None else ""
            if rest:
                r.on_delta(rest, None)

    def forward(ids, mask, pos, cache=None):
        kwargs = {cache_arg: cache} if cache is not None else {}
        return model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kwargs)

    context = monitor.attached() if monitor is not None else contextlib.nullcontext()
    with context:
        if monitor is not None:
            monitor.reset(attention)
        out = forward(input_ids, attention, positions)
        for _ in range(max(r.max_tokens for r in requests)):
            logits = out.logits[:, -1, :].float().cpu()
            chosen: list[int | None] = []
            for i, r in enumerate(requests):
                if finish[i] is None and r.cancelled is not None and r.cancelled():
                    finish[i] = "cancelled"
                if finish[i] is not None:
                    chosen.append(None)
                    continue
                token = _pick(logits[i], r, generators[i])
                if token in eos:
                    finish[i] = "stop"
                    rest = trackers[i].flush()
                    if rest and r.on_delta is not None:
                        r.on_delta(rest, None)
                    chosen.append(None)
                else:
                    chosen.append(token)
                    if monitor is None:
                        accept(i, token, None)
            if all(f is not None for f in finish) and (monitor is None or all(c is None for c in chosen)):
                break
            step = torch.tensor([pad if c is None else c for c in chosen], dtype=torch.long, device=device)[:, None]
            attention = torch.cat([attention, torch.ones_like(step)], dim=1)
            positions = positions[:, -1:] + 1
            out = forward(step, attention, positions, _cache_of(out))
            if monitor is not None:  # the forward that fed the chosen tokens has scored them
                step_logits = monitor.step_logits[-1].float().cpu().tolist()
                for i, token in enumerate(chosen):
                    if token is None:
                        continue
                    logit = step_logits[i]
                    scores[i].append(sigmoid(logit))
                    if logit > monitor.threshold:
                        finish[i], trip_index[i] = "content_filter", len(scores[i]) - 1
                    else:
                        accept(i, token, scores[i][-1])
                if all(f is not None for f in finish):
                    break

    results = []
    for i, r in enumerate(requests):
        reason = finish[i] if finish[i] in ("stop", "length", "content_filter") else "stop"
        breaker = None
        if monitor is not None:
            breaker = {"tripped": reason == "content_filter", "max_score": max(scores[i], default=0.0),
                       "token_index": trip_index[i]}
        text = refusal if reason == "content_filter" else trackers[i].text
        results.append(GenResult(text=text, finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                                 completion_tokens=len(scores[i]) if monitor is not None else len(tokens[i]),
                                 circuit_breaker=breaker, token_scores=scores[i]))
    return results
