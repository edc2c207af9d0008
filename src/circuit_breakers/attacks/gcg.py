"""GCG: greedy coordinate gradient over a discrete adversarial suffix (Zou et al. 2023).

Shaped after nanoGCG (a flat config, a result with `best_loss`, `best_string`, `losses`): the
suffix (default 20 tokens, "x x ... x") follows the request inside the user turn, separated by a
space (HarmBench's `behavior + " " + suffix`). Each step:

1. the gradient of the target loss w.r.t. the one-hot matrix of the current suffix;
2. per position, the `topk` tokens with the most negative gradient (disallowed tokens excluded:
   non-ASCII or unprintable tokens and special tokens, unless `allow_non_ascii`);
3. `search_width` candidates, each replacing `n_replace` random positions of the current suffix
   with a random top-k token (seeded from `seed` and the behaviour id: the same seed gives the
   same run, whatever the order or sharding of the behaviours);
4. the re-tokenisation filter: a candidate survives only if decoding and encoding it gives back
   the same ids (so the string reported is the suffix that was optimised);
5. the survivors' losses, in batches of `batch_size` over only suffix + end-of-turn + assistant
   header + target, on a KV cache of the fixed prefix computed once per behaviour;
6. the best candidate replaces the current suffix only if it improves on the best loss so far
   (nanoGCG's buffer of size 1), so `best_losses` never increases.

The loop stops after `num_steps` or once the best loss is below `early_stop_loss`. Then one greedy
generation from the exact token ids (prefix + best suffix + assistant header). HarmBench's setting
is 500 steps, search width 512, top-k 256; nanoGCG's default is 250 steps. Loss: mean CE of the
target tokens after the assistant header.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ._common import (DEFAULT_TARGET, PrefixCache, encode, frozen, generate_from_ids, model_device,
                      slot_prompt, target_loss, target_of)
from .base import AttackOutput, Behavior, budget_of, refuse_images


@dataclass
class GCGConfig:
    """GCG's budget (nanoGCG defaults; HarmBench used num_steps=500)."""

    num_steps: int = 250
    optim_str_init: str = "x x x x x x x x x x x x x x x x x x x x"  # 20 tokens with most tokenizers
    search_width: int = 512  # candidates sampled per step (before filtering)
    topk: int = 256  # tokens per position to sample replacements from
    n_replace: int = 1  # positions changed per candidate
    batch_size: int = 256  # candidates per forward pass
    early_stop_loss: float | None = 0.05  # stop once the best loss is below this (None: run all steps)
    allow_non_ascii: bool = False  # if False, non-ASCII/unprintable tokens are never sampled
    allow_special: bool = False  # if False, special tokens are never sampled
    filter_ids: bool = True  # the decode/encode round-trip filter
    separator: str = " "  # between the request and the suffix
    max_new_tokens: int = 256
    gen_batch_size: int = 16
    seed: int = 0
    fallback_target: str = DEFAULT_TARGET
    system_prompt: str | None = None


@dataclass
class GCGResult:
    """One behaviour's optimisation (nanoGCG's result shape)."""

    best_loss: float
    best_string: str
    best_ids: list[int]
    losses: list[float]  # the best candidate's loss at each step (may go up and down)
    best_losses: list[float]  # the best loss so far, starting with the initial suffix's (never increases)
    strings: list[str]  # the current suffix after each step
    stopped_early: bool


_DISALLOWED_CACHE: dict[tuple, torch.Tensor] = {}


def disallowed_token_ids(tokenizer, vocab_size: int, *, allow_non_ascii: bool = False,
                         allow_special: bool = False) -> torch.Tensor:
    """Ids the suffix may not use: outside the tokenizer, (non-ASCII/unprintable/empty), (special)."""
    key = (id(tokenizer), len(tokenizer), vocab_size, allow_non_ascii, allow_special)
    if key in _DISALLOWED_CACHE:
        return _DISALLOWED_CACHE[key]
    bad: set[int] = set(range(len(tokenizer), vocab_size))
    if not allow_special:
        bad.update(i for i in tokenizer.all_special_ids if i is not None)
        for i, tok in getattr(tokenizer, "added_tokens_decoder", {}).items():
            if getattr(tok, "special", False):
                bad.add(i)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
            i = getattr(tokenizer, name, None)
            if i is not None:
                bad.add(i)
    if not allow_non_ascii:
        n = min(len(tokenizer), vocab_size)
        texts = tokenizer.batch_decode([[i] for i in range(n)])
        bad.update(i for i, t in enumerate(texts) if not (t and t.isascii() and t.isprintable()))
    ids = torch.tensor(sorted(i for i in bad if i < vocab_size), dtype=torch.long)
    _DISALLOWED_CACHE[key] = ids
    return ids


def sample_candidates(ids: torch.Tensor, grad: torch.Tensor, search_width: int, topk: int, n_replace: int,
                      generator: torch.Generator, disallowed: torch.Tensor | None = None) -> torch.Tensor:
    """`search_width` copies of `ids` [S], each with `n_replace` random positions set to a random top-k token."""
    grad = grad.detach().float().cpu().clone()
    if disallowed is not None and disallowed.numel():
        grad[:, disallowed] = float("inf")
    topk = max(1, min(topk, grad.shape[1] - (disallowed.numel() if disallowed is not None else 0)))
    n = ids.shape[0]
    top = (-grad).topk(topk, dim=1).indices  # [S, topk]
    positions = torch.argsort(torch.rand((search_width, n), generator=generator), dim=1)[:, :n_replace]
    choice = torch.randint(0, topk, (search_width, n_replace), generator=generator)
    values = top[positions, choice]  # [W, n_replace]
    return ids.cpu().repeat(search_width, 1).scatter_(1, positions, values)


def retokenization_filter(tokenizer, candidates: torch.Tensor) -> torch.Tensor:
    """The rows that decode and re-encode to exactly the same ids."""
    texts = tokenizer.batch_decode(candidates.tolist())
    again = tokenizer(texts, add_special_tokens=False).input_ids
    keep = [i for i, (row, re) in enumerate(zip(candidates.tolist(), again)) if row == re]
    return candidates[keep]


def behavior_seed(seed: int, behavior_id: str) -> int:
    """A per-behaviour seed that does not depend on the behaviour's position in the list."""
    return zlib.crc32(f"{seed}:{behavior_id}".encode())


class GCG:
    name = "gcg"
    takes_images = False
    config_class = GCGConfig

    def __init__(self, config: GCGConfig | None = None, *,
                 candidate_hook: Callable[[torch.Tensor], None] | None = None):
        """`candidate_hook(ids)` sees every batch of candidate suffixes before it is evaluated (tests)."""
        self.config = config or GCGConfig()
        self.candidate_hook = candidate_hook

    def run(self, model, tokenizer, behaviors: Sequence[Behavior]) -> list[AttackOutput]:
        cfg = self.config
        refuse_images(self.name, behaviors)
        results, rows, prompts = [], [], []
        with frozen(model):
            for behavior in behaviors:
                prompt = slot_prompt(tokenizer, behavior.user_message(), separator=cfg.separator,
                                     system_prompt=cfg.system_prompt, tools=behavior.tools)
                target, fallback = target_of(behavior, cfg.fallback_target)
                result = self.optimize(model, tokenizer, prompt.prefix_ids, prompt.after_ids,
                                       encode(tokenizer, target), seed=behavior_seed(cfg.seed, behavior.id))
                results.append((result, target, fallback))
                rows.append(prompt.prefix_ids + result.best_ids + prompt.after_ids)
                prompts.append(prompt)
            generations = generate_from_ids(model, tokenizer, rows, max_new_tokens=cfg.max_new_tokens,
                                            batch_size=cfg.gen_batch_size)
        outputs = []
        for behavior, (result, target, fallback), prompt, generation in zip(behaviors, results, prompts,
                                                                            generations):
            outputs.append(AttackOutput(
                behavior_id=behavior.id, attack=self.name,
                prompt=behavior.user_message() + cfg.separator + result.best_string,
                generations=[generation], budget=budget_of(cfg),
                extra={"losses": result.losses, "best_losses": result.best_losses,
                       "best_loss": result.best_loss, "best_string": result.best_string,
                       "best_ids": result.best_ids, "steps": len(result.losses),
                       "stopped_early": result.stopped_early, "target": target, "target_fallback": fallback,
                       "prompt_text": prompt.text(result.best_string)},
            ))
        return outputs

    # ------------------------------------------------------------------------------------------

    def optimize(self, model, tokenizer, prefix_ids: list[int], after_ids: list[int], target_ids: list[int],
                 *, seed: int = 0) -> GCGResult:
        """Optimise the suffix between `prefix_ids` and `after_ids` for `target_ids`."""
        cfg = self.config
        device = model_device(model)
        embed = model.get_input_embeddings()
        weight = embed.weight
        vocab = weight.shape[0]
        generator = torch.Generator().manual_seed(seed)
        disallowed = disallowed_token_ids(tokenizer, vocab, allow_non_ascii=cfg.allow_non_ascii,
                                          allow_special=cfg.allow_special)
        prefix = PrefixCache(model, prefix_ids)
        after = torch.tensor(after_ids, device=device, dtype=torch.long)
        target = torch.tensor(target_ids, device=device, dtype=torch.long)
        if target.numel() == 0:
            raise ValueError("GCG needs a non-empty target")
        keep = after.numel() + target.numel() + 1
        with torch.no_grad():
            after_emb, target_emb = embed(after), embed(target)

        current = torch.tensor(encode(tokenizer, cfg.optim_str_init), dtype=torch.long)
        if current.numel() == 0:
            raise ValueError("optim_str_init tokenizes to nothing")

        def gradient(ids: torch.Tensor) -> tuple[torch.Tensor, float]:
            onehot = torch.zeros(ids.numel(), vocab, device=device, dtype=weight.dtype)
            onehot.scatter_(1, ids.to(device)[:, None], 1)
            onehot.requires_grad_(True)
            with torch.enable_grad():
                x = torch.cat([onehot @ weight, after_emb, target_emb])[None]
                loss = target_loss(prefix.logits(inputs_embeds=x, keep=keep), target)[0]
                (grad,) = torch.autograd.grad(loss, onehot)
            return grad, loss.item()

        @torch.no_grad()
        def losses_of(candidates: torch.Tensor) -> torch.Tensor:
            out = []
            for start in range(0, candidates.shape[0], cfg.batch_size):
                chunk = candidates[start:start + cfg.batch_size].to(device)
                n = chunk.shape[0]
                ids = torch.cat([chunk, after.expand(n, -1), target.expand(n, -1)], dim=1)
                out.append(target_loss(prefix.logits(input_ids=ids, keep=keep), target).cpu())
            return torch.cat(out)

        grad, best_loss = gradient(current)
        best_losses, losses, strings = [best_loss], [], []
        stopped = cfg.early_stop_loss is not None and best_loss < cfg.early_stop_loss
        for _ in range(0 if stopped else cfg.num_steps):
            candidates = torch.empty(0, current.numel(), dtype=torch.long)
            for _attempt in range(5):
                sampled = sample_candidates(current, grad, cfg.search_width, cfg.topk, cfg.n_replace,
                                            generator, disallowed)
                candidates = retokenization_filter(tokenizer, sampled) if cfg.filter_ids else sampled
                if candidates.shape[0]:
                    break
            if candidates.shape[0] == 0:
                raise RuntimeError("GCG: no candidate survived the re-tokenisation filter in 5 tries; "
                                   "try another optim_str_init or filter_ids=False")
            if self.candidate_hook is not None:
                self.candidate_hook(candidates)
            cand_losses = losses_of(candidates)
            i = int(cand_losses.argmin())
            losses.append(float(cand_losses[i]))
            improved = losses[-1] < best_loss
            if improved:
                best_loss, current = losses[-1], candidates[i].clone()
            best_losses.append(best_loss)
            strings.append(tokenizer.decode(current))
            if cfg.early_stop_loss is not None and best_loss < cfg.early_stop_loss:
                stopped = True
                break
            if improved:  # otherwise the suffix, and so its gradient, is unchanged
                grad, _ = gradient(current)
        return GCGResult(best_loss=best_loss, best_string=tokenizer.decode(current), best_ids=current.tolist(),
                         losses=losses, best_losses=best_losses, strings=strings, stopped_early=stopped)
