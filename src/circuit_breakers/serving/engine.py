"""Batched token-by-token generation for the server: per-row stop strings, sampling and streaming.

`circuit_breakers.generation.generate` runs `model.generate` with one setting for a whole batch. A
server needs more per row: its own `max_tokens`, stop strings, temperature/top_p/seed, a finish
reason, and a callback that streams text as it is decoded. `BatchGeneration` is a small KV-cached loop
that gives each row those, one bounded step at a time (a slice of the prompts, then one token per row),
so that the server's scheduler can interleave batches and stop a row between steps; rows that are done
keep feeding a pad token until the whole batch is done (or cancelled). A row's own failure (its
sampling, its stop strings, its callback) ends that row alone. With a probe, the monitor's hook
(`circuit_breakers.probes.monitor.ProbeMonitor`) scores every token as it is fed back in, so one loop
serves plain and monitored requests, streamed or not. `generate_rows` runs a batch to its end.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..tools.calls import call_marker_ids, decode_keeping_call_markers

# Called from the generation thread with (text delta, per-token probe score or None).
DeltaCallback = Callable[[str, "float | None"], None]

GREEDY_BELOW = 1e-5  # as vLLM: a smaller temperature is greedy (dividing logits by it overflows float32)
PREFILL_TOKENS = 256  # prompt tokens (all rows together) fed per step: a long prompt is prefilled in slices


@dataclass
class GenRequest:
    """One row of a batch. A temperature below `GREEDY_BELOW` (0 included) means greedy."""

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
    if request.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    # Shifted first, so that a small temperature sends the other logits to -inf rather than the top one to inf.
    probs = torch.softmax((logits - logits.max()) / request.temperature, dim=-1)
    if request.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < request.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def _forward_arguments(model) -> tuple[str, dict]:
    """The cache argument's name (transformers 5 renamed `past_key_values` to `cache`; the old name still
    works, with a warning), and `logits_to_keep=1` where the model takes it: only the last position's
    logits are used, and the LM head over a whole prompt slice is a tenth of its cost."""
    import inspect

    parameters = inspect.signature(model.forward).parameters
    return ("cache" if "cache" in parameters else "past_key_values",
            {"logits_to_keep": 1} if "logits_to_keep" in parameters else {})


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


class BatchGeneration:
    """One left-padded batch, generated a step at a time; each row stops on its own terms.

    `step()` feeds the next slice of the prompts (at most `prefill_tokens` tokens, all rows together) or,
    once they are in, picks and feeds one token per row; it returns {row index: GenResult or the row's
    exception} for the rows that finished in it, so a finished row's caller need not wait for the batch.
    `remaining` estimates the work left per unfinished row (prompt tokens not fed yet plus tokens not
    generated yet), which the server's batcher compares across batches. `done` once every row finished.

    monitor: a `circuit_breakers.probes.monitor.ProbeMonitor` for this model. Its hook scores every
    generated token when the token is fed back in; a token is accepted (and streamed, with its score)
    only once scored, and a row whose token scores strictly above the threshold logit halts there:
    the token is dropped, the row answers `refusal` with finish_reason "content_filter". These are
    the monitor's own rules (`monitored_stream`), applied per row of a batch. The batch scores with its
    own copy of the monitor (the same probe and threshold), so batches can be interleaved.
    """

    def __init__(self, model, tokenizer, requests: Sequence[GenRequest], *, monitor=None, refusal: str = "",
                 prefill_tokens: int = PREFILL_TOKENS):
        self.model, self.tokenizer, self.requests, self.refusal = model, tokenizer, list(requests), refusal
        self.call_markers = call_marker_ids(tokenizer)  # read once: every token of every row is decoded again
        n = len(self.requests)
        self.device = next(model.parameters()).device
        self.eos = eos_token_ids(model, tokenizer)
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(self.eos) if self.eos else 0)
        self.width = max((len(r.prompt_ids) for r in self.requests), default=0)
        input_ids = torch.full((n, self.width), self.pad, dtype=torch.long)
        attention = torch.zeros((n, self.width), dtype=torch.long)
        for i, r in enumerate(self.requests):
            if r.prompt_ids:
                input_ids[i, self.width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
                attention[i, self.width - len(r.prompt_ids):] = 1
        self.input_ids, self.attention = input_ids.to(self.device), attention.to(self.device)
        self.positions = (self.attention.cumsum(-1) - 1).clamp(min=0)
        self.chunk = max(32, prefill_tokens // max(1, n))
        self.fed = 0  # prompt columns fed so far
        self.out = self.cache = None
        self.cache_arg, self.forward_kwargs = _forward_arguments(model)
        self.monitor = copy.copy(monitor) if monitor is not None else None  # per-batch scoring state
        if self.monitor is not None:
            self.monitor.reset(self.attention)

        self.trackers = [StopTracker(r.stop) for r in self.requests]
        self.tokens: list[list[int]] = [[] for _ in self.requests]
        self.scores: list[list[float]] = [[] for _ in self.requests]
        self.finish: list[str | None] = [None] * n
        self.trip_index: list[int | None] = [None] * n
        self.errors: list[BaseException | None] = [None] * n
        self.reported = [False] * n
        self.steps_left = max((r.max_tokens for r in self.requests), default=0)
        self.generators: list[torch.Generator | None] = []
        for i, r in enumerate(self.requests):
            self.generators.append(self._row(i, self._generator, r))
        self.done = n == 0

    # ------------------------------------------------------------------ rows

    @staticmethod
    def _generator(r: GenRequest) -> torch.Generator | None:
        if r.temperature < GREEDY_BELOW or r.seed is None:
            return None
        g = torch.Generator(device="cpu")
        g.manual_seed(r.seed)
        return g

    def _row(self, i: int, fn, *args):
        """fn(*args) for row i; an exception ends that row alone (its request fails, the batch goes on)."""
        try:
            return fn(*args)
        except Exception as err:  # noqa: BLE001 - handed to this row's caller
            self.errors[i], self.finish[i] = err, "error"
            return None

    def _accept(self, i: int, token: int, score: float | None) -> None:
        r = self.requests[i]
        self.tokens[i].append(token)
        delta = self.trackers[i].update(decode_keeping_call_markers(self.tokenizer, self.tokens[i], self.call_markers))
        if self.trackers[i].stopped:
            self.finish[i] = "stop"
        elif len(self.tokens[i]) >= r.max_tokens:
            self.finish[i] = "length"
        if r.on_delta is not None:
            if delta or score is not None:
                r.on_delta(delta, score)
            rest = self.trackers[i].flush() if self.finish[i] is not None else ""
            if rest:
                r.on_delta(rest, None)

    def _end_of_turn(self, i: int) -> None:
        self.finish[i] = "stop"
        rest = self.trackers[i].flush()
        if rest and self.requests[i].on_delta is not None:
            self.requests[i].on_delta(rest, None)

    def _choose(self, i: int, logits: torch.Tensor) -> int | None:
        token = _pick(logits, self.requests[i], self.generators[i])
        if token in self.eos:
            self._end_of_turn(i)
            return None
        if self.monitor is None:
            self._accept(i, token, None)
        return token

    def _score(self, i: int, token: int, logit: float) -> None:
        self.scores[i].append(sigmoid(logit))
        if logit > self.monitor.threshold:
            self.finish[i], self.trip_index[i] = "content_filter", len(self.scores[i]) - 1
        else:
            self._accept(i, token, self.scores[i][-1])

    # ------------------------------------------------------------------ steps

    @property
    def remaining(self) -> float:
        live = [i for i, f in enumerate(self.finish) if f is None]
        if not live:
            return 0.0
        left = 0
        for i in live:
            r = self.requests[i]
            fed = min(len(r.prompt_ids), max(0, self.fed - (self.width - len(r.prompt_ids))))
            left += len(r.prompt_ids) - fed + r.max_tokens - len(self.tokens[i])
        return left / len(live)

    def _forward(self, ids, mask, positions):
        kwargs = {self.cache_arg: self.cache} if self.cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         **self.forward_kwargs, **kwargs)
        self.out, self.cache = out, _cache_of(out)

    @torch.no_grad()
    def step(self) -> dict[int, GenResult | BaseException]:
        if self.done:
            return {}
        for i, r in enumerate(self.requests):
            if self.finish[i] is None and r.cancelled is not None and self._row(i, r.cancelled):
                self.finish[i] = "cancelled"
        if all(f is not None for f in self.finish):
            self.done = True
        else:
            context = self.monitor.attached() if self.monitor is not None else contextlib.nullcontext()
            with context:
                if self.fed < self.width:
                    end = min(self.width, self.fed + self.chunk)
                    self._forward(self.input_ids[:, self.fed:end], self.attention[:, :end],
                                  self.positions[:, self.fed:end])
                    self.fed = end
                else:
                    self._next_token()
        return self._finished()

    def _next_token(self) -> None:
        logits = self.out.logits[:, -1, :].float().cpu()
        chosen = [self._row(i, self._choose, i, logits[i]) if self.finish[i] is None else None
                  for i in range(len(self.requests))]
        self.steps_left -= 1
        if all(f is not None for f in self.finish) and (self.monitor is None or all(c is None for c in chosen)):
            self.done = True
            return
        step = torch.tensor([self.pad if c is None else c for c in chosen], dtype=torch.long,
                            device=self.device)[:, None]
        self.attention = torch.cat([self.attention, torch.ones_like(step)], dim=1)
        self.positions = self.positions[:, -1:] + 1
        self._forward(step, self.attention, self.positions)
        if self.monitor is not None:  # the forward that fed the chosen tokens has scored them
            step_logits = self.monitor.step_logits[-1].float().cpu().tolist()
            for i, token in enumerate(chosen):
                if token is not None and self.finish[i] is None:
                    self._row(i, self._score, i, token, step_logits[i])
        if self.steps_left <= 0 or all(f is not None for f in self.finish):
            self.done = True

    def _finished(self) -> dict[int, GenResult | BaseException]:
        """The results of the rows that finished since the last step (all of them once the batch is done)."""
        results = {}
        for i, r in enumerate(self.requests):
            if self.reported[i] or (self.finish[i] is None and not self.done):
                continue
            self.reported[i] = True
            if self.errors[i] is not None:
                results[i] = self.errors[i]
                continue
            reason = self.finish[i] if self.finish[i] in ("stop", "length", "content_filter") else "stop"
            breaker = None
            if self.monitor is not None:
                breaker = {"tripped": reason == "content_filter", "max_score": max(self.scores[i], default=0.0),
                           "token_index": self.trip_index[i]}
            text = self.refusal if reason == "content_filter" else self.trackers[i].text
            results[i] = GenResult(text=text, finish_reason=reason, prompt_tokens=len(r.prompt_ids),
                                   completion_tokens=len(self.scores[i]) if self.monitor is not None
                                   else len(self.tokens[i]),
                                   circuit_breaker=breaker, token_scores=self.scores[i])
        return results


def generate_rows(model, tokenizer, requests: Sequence[GenRequest], *, monitor=None,
                  refusal: str = "") -> list[GenResult]:
    """Generate every request in one left-padded batch, to the end (`BatchGeneration`); a row's failure raises."""
    run = BatchGeneration(model, tokenizer, requests, monitor=monitor, refusal=refusal)
    results: dict[int, GenResult | BaseException] = run._finished() if run.done else {}
    while not run.done:
        results.update(run.step())
    for result in results.values():
        if isinstance(result, BaseException):
            raise result
    return [results[i] for i in range(len(requests))]
