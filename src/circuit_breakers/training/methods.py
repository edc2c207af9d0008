"""The training methods (`config.method`): what each computes on a step's two batches.

The trainer owns the data, the passes (`_frozen`, `_trained`, `_hidden_states`), the frozen-state caches
and the optimizer; a method says which hidden-state entries its circuit-breaker ("harmful") loss reads,
how its two losses are weighted at step t, and computes them (equations: losses.py; choices:
docs/method-notes.md):

- `RR`: the paper's rerouting and retain losses under Algorithm 1's schedule.
- `RRLat`: RR whose rerouting loss is computed on a pass perturbed by a latent adversary (inner PGD on
  the residual stream at prompt positions, restoring the original harmful states).
- `RepBend`: Representation Bending's five terms with constant weights; needs the logits, so the
  model keeps every block.
- `Refusal`: refusal-only fine-tuning, the classic baseline: the cross-entropy of a refusal to each harmful
  request and of the retain items' own responses, constant weights; reads the logits, so keeps every block.

Each loss comes back as (loss, diagnostics) in the shapes the trainer logs; a method's own figures (its
terms, the adversary's cosines) are collected with `take_metrics` after each micro-batch.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch

from .. import losses
from ..config import ConfigError, RRConfig
from ..models import Architecture, unwrap
from .batches import Batch, make_batch


def lm_head(trainer) -> torch.nn.Module:
    """The LM head: applied to the final-norm entry (`trainer.retain_entries[-1]`) it gives the model's logits,
    exactly so for models without logit soft-capping or scaling (Llama, Mistral, Qwen2)."""
    return unwrap(trainer.model).get_output_embeddings()


def harmful_mask(config: RRConfig, batch: Batch) -> torch.Tensor:
    """The circuit-breaker tokens the harmful-side loss acts on (`reroute_tokens`)."""
    return batch.response_mask if config.reroute_tokens == "response" else batch.attention_mask


def retain_token_weights(config: RRConfig, batch: Batch) -> torch.Tensor:
    """The retain loss's per-token weights: 1 at every real token (the paper), the response tokens weighted
    `retain_response_weight`. A tool-use item is ~400 tokens of tool definitions, shared with the harmful items,
    before a ~40-token call: weighted alike, the call tokens are a tenth of the term that is to keep them."""
    if config.retain_response_weight == 1.0:
        return batch.attention_mask
    return batch.attention_mask.float() + (config.retain_response_weight - 1.0) * batch.response_mask.float()


def last_prompt_positions(response_mask: torch.Tensor) -> torch.Tensor:
    """Per row, the position of the last prompt token (the one that predicts the first response token)."""
    return response_mask.float().argmax(dim=1) - 1


def prompt_positions(batch: Batch) -> torch.Tensor:
    """B x T x 1: 1 at the prompt's real tokens (request and chat tags), 0 at the response and padding."""
    return (batch.attention_mask.bool() & ~batch.response_mask).unsqueeze(-1).float()


@contextmanager
def perturbed(arch: Architecture, deltas: dict[int, torch.Tensor], where: torch.Tensor) -> Iterator[None]:
    """Add `deltas[l] * where` to hidden-state entry l in every forward the body runs (hidden.py's numbering:
    entry 0 is block 0's input, entry l >= 1 block l-1's output). Registered before the trainer's capture
    hooks, so the states it reads are the perturbed ones."""
    def add(entry: int, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + (deltas[entry] * where).to(hidden.dtype)

    def pre_hook(module, args, kwargs):
        if args:
            return (add(0, args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": add(0, kwargs["hidden_states"])}

    def hook(module, args, output, entry):
        return (add(entry, output[0]), *output[1:]) if isinstance(output, tuple) else add(entry, output)

    handles = []
    try:
        for entry in deltas:
            if entry == 0:
                handles.append(arch.blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                handles.append(arch.blocks[entry - 1].register_forward_hook(
                    lambda module, args, output, entry=entry: hook(module, args, output, entry)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class RR:
    """Representation Rerouting (the paper): c_s(t) L_s on circuit-breaker batches, c_r(t) L_r on retain ones."""

    name = "rr"
    keeps_every_block = False  # True where a loss reads the logits: no block is dropped during training

    def __init__(self, config: RRConfig) -> None:
        self.config = config
        self.metrics: dict[str, float] = {}

    def harmful_layers(self, num_blocks: int) -> list[int]:
        """The entries the circuit-breaker loss reads (LoRA and the kept blocks end at the highest)."""
        if max(self.config.target_layers) > num_blocks:
            raise ConfigError(f"target_layers: {max(self.config.target_layers)} is past the last hidden-state entry "
                              f"({num_blocks}) of this {num_blocks}-block model")
        return list(self.config.target_layers)

    def coefficients(self, step: int) -> tuple[float, float]:
        c_s, c_r = losses.rr_coefficients(step, self.config.alpha, self.config.denominator)
        return c_s, c_r * self.config.retain_weight

    @property
    def relative(self) -> bool:
        return self.config.retain_distance == "relative_l2"

    def harmful_terms(self, trainer, batch: Batch, orig=None) -> tuple[torch.Tensor, dict[int, float]]:
        """(L_s, {target layer: mean cosine to the original})."""
        mask = harmful_mask(self.config, batch)
        orig = orig if orig is not None else trainer._frozen(batch, trainer.target_layers, trainer.cb_cache)
        lora = trainer._trained(batch, trainer.target_layers)
        loss = trainer._losses[0](lora, orig, mask, trainer.target_layers, trainer.target_offsets)
        return loss, losses.layer_cosines(lora, orig, mask, trainer.target_layers)

    def retain_terms(self, trainer, batch: Batch, orig=None) -> tuple[torch.Tensor, float]:
        """(L_r, mean cosine to the original at the target layers, over the real tokens)."""
        orig = orig if orig is not None else trainer._frozen(batch, trainer.retain_entries, trainer.retain_cache)
        lora = trainer._trained(batch, trainer.retain_entries)
        # Packed rows hold several items: the reference normalisation counts items, not rows.
        packed = {"sequences": len(batch.indices)} if batch.packed else {}
        loss = trainer._losses[1](lora, orig, retain_token_weights(self.config, batch), trainer.retain_entries,
                                  normalization=self.config.retain_normalization,
                                  reference_length=self.config.reference_length, relative=self.relative, **packed)
        return loss, losses.mean_cosine(lora, orig, batch.attention_mask, trainer.target_layers)

    def take_metrics(self) -> dict[str, float]:
        metrics, self.metrics = self.metrics, {}
        return metrics


class RRLat(RR):
    """RR against a latent adversary: before each rerouting loss, `lat_steps` of PGD choose a perturbation of
    the prompt positions' states at `lat_layers` (per-token L2 ball of radius lat_eps * ||h||) that maximises
    the cosine to the original states at the target layers, i.e. restores the harmful representation the
    breaker removed; L_s is then computed under it. Retain passes are not perturbed.

    Restoring the representation, not the harmful completion's likelihood, is the adversary's goal: it is
    the quantity the breaker changes, and needs neither the LM head nor the blocks RR drops."""

    name = "rr_lat"

    def harmful_terms(self, trainer, batch: Batch, orig=None) -> tuple[torch.Tensor, dict[int, float]]:
        orig = orig if orig is not None else trainer._frozen(batch, trainer.target_layers, trainer.cb_cache)
        deltas, clean, attacked = self.attack(trainer, batch, orig)
        self.metrics.update(lat_cos_clean=clean, lat_cos_attacked=attacked)
        # The hooks may go before the backward: adding a constant saves nothing for it, so blocks that activation
        # checkpointing recomputes without the perturbation give the same gradients.
        with perturbed(trainer.arch, deltas, prompt_positions(batch)):
            return super().harmful_terms(trainer, batch, orig)

    def attack(self, trainer, batch: Batch, orig) -> tuple[dict[int, torch.Tensor], float, float]:
        """The inner PGD. Returns the perturbations {entry: B x T x D} that gave the highest restoration cosine
        A (the clean pass included, so the attack never does worse than none), A clean and A attacked."""
        config, layers = self.config, trainer.target_layers
        mask, where = harmful_mask(config, batch), prompt_positions(batch)
        rows, width = batch.attention_mask.shape
        hidden = orig[layers[0]].shape[-1]
        deltas = {l: torch.zeros(rows, width, hidden, device=trainer.device, requires_grad=True)
                  for l in config.lat_layers}
        entries = sorted(set(layers) | set(config.lat_layers))
        best, best_value, clean, norms = None, -float("inf"), None, None
        for step in range(config.lat_steps + 1):  # the last pass only evaluates the last update
            last = step == config.lat_steps
            with perturbed(trainer.arch, deltas, where), torch.no_grad() if last else nullcontext():
                states = trainer._trained(batch, entries)
                value = losses.restoration_cosine(states, orig, mask, layers)
                # Gradients to the perturbations only: the model's parameters get none.
                grads = None if last else torch.autograd.grad(value, list(deltas.values()))
            if norms is None:  # the first pass is clean (delta = 0): the balls' radii come from it
                norms = {l: torch.linalg.vector_norm(states[l].detach(), dim=-1, keepdim=True, dtype=torch.float32)
                         for l in config.lat_layers}
                clean = value.item()
            if value.item() > best_value:
                best_value, best = value.item(), {l: d.detach().clone() for l, d in deltas.items()}
            del states, value
            if last:
                break
            with torch.no_grad():
                deltas = {l: losses.pgd_l2_step(d.detach(), g, config.lat_eps * norms[l],
                                                config.lat_step_size * norms[l]).requires_grad_(True)
                          for (l, d), g in zip(deltas.items(), grads)}
        return best, clean, best_value


class RepBend(RR):
    """Representation Bending (Yousefpour et al. 2025): alpha safe_L2 + eps KL on retain batches, -beta
    unsafe_L2 + gamma cos_term (+ eta refusal) on circuit-breaker batches, constant weights (no schedule).

    safe_L2 is a masked mean over every entry and real token, unsafe_L2 the same over the unsafe layers and
    the `reroute_tokens`; both use `retain_distance` (l2, or relative_l2 on models with a large residual
    stream). The KL reads the logits of the whole model, which the LM head computes from the final-norm
    entry the retain loss already captures (no logit soft-capping, as in Llama, Mistral, Qwen2)."""

    name = "repbend"
    keeps_every_block = True

    def __init__(self, config: RRConfig) -> None:
        super().__init__(config)
        self.refusals = RefusalAnswers(end_of_turn=False)

    def harmful_layers(self, num_blocks: int) -> list[int]:
        # Default: the paper's "layer 20 to the last" of Llama-3-8B's 32 blocks, as a fraction of the depth.
        layers = self.config.repbend_unsafe_layers or list(range((5 * num_blocks + 4) // 8, num_blocks))
        if max(layers) > num_blocks:
            raise ConfigError(f"repbend_unsafe_layers: {max(layers)} is past the last hidden-state entry "
                              f"({num_blocks}) of this {num_blocks}-block model")
        return sorted(set(layers))

    def coefficients(self, step: int) -> tuple[float, float]:
        return 1.0, 1.0  # the terms carry their own weights

    def harmful_terms(self, trainer, batch: Batch, orig=None) -> tuple[torch.Tensor, dict[int, float]]:
        config, layers = self.config, trainer.target_layers
        mask = harmful_mask(config, batch)
        orig = orig if orig is not None else trainer._frozen(batch, layers, trainer.cb_cache)
        lora = trainer._trained(batch, layers)
        unsafe = losses.retain_loss(lora, orig, mask, layers, normalization="masked_mean", relative=self.relative)
        last = last_prompt_positions(batch.response_mask)
        rows = torch.arange(len(last), device=last.device)
        cosine = losses.pairwise_cosine_loss({l: lora[l][rows, last] for l in layers}, layers)
        loss = config.repbend_cosine_weight * cosine - config.repbend_unsafe_weight * unsafe
        self.metrics.update(repbend_unsafe_l2=unsafe.item(), repbend_cos_term=cosine.item())
        if config.repbend_refusal_weight > 0:
            refusal = self.refusal_distance(trainer, batch, lora)
            loss = loss + config.repbend_refusal_weight * refusal
            self.metrics["repbend_refusal"] = refusal.item()
        return loss, losses.layer_cosines(lora, orig, mask, layers)

    def retain_terms(self, trainer, batch: Batch, orig=None) -> tuple[torch.Tensor, float]:
        config, entries = self.config, trainer.retain_entries
        mask = batch.attention_mask
        orig = orig if orig is not None else trainer._frozen(batch, entries, trainer.retain_cache)
        lora = trainer._trained(batch, entries)
        safe = losses.retain_loss(lora, orig, mask, entries, normalization="masked_mean", relative=self.relative)
        loss = config.repbend_safe_weight * safe
        self.metrics["repbend_safe_l2"] = safe.item()
        if config.repbend_kl_weight > 0:
            real = mask.bool()
            head = lm_head(trainer)
            final = entries[-1]  # the final-norm entry: what the LM head reads
            with torch.no_grad():
                orig_logits = head(orig[final][real])
            kl = losses.logit_kl(head(lora[final][real]), orig_logits, mask.shape[0], config.repbend_kl_temperature)
            loss = loss + config.repbend_kl_weight * kl
            self.metrics["repbend_kl"] = kl.item()
        return loss, losses.mean_cosine(lora, orig, mask, trainer.target_layers)

    def refusal_distance(self, trainer, batch: Batch, lora) -> torch.Tensor:
        """The eta term: the trained states reading each item's harmful response, against the original model's
        reading the same prompt followed by a refusal (one of the project's refusal styles per item), over the
        K = repbend_refusal_tokens positions from the last prompt token (fewer where a response is shorter)."""
        config, layers = self.config, trainer.target_layers
        paired = self.refusals.items(trainer, batch.indices, config.repbend_refusal_tokens - 1)
        refusal_batch = self.refusals.batch(trainer, paired)
        orig = trainer._hidden_states(refusal_batch.inputs, layers, frozen=True)
        width = min(batch.width, refusal_batch.width)
        window = torch.zeros(len(paired), width, dtype=torch.bool, device=trainer.device)
        for row, (index, item) in enumerate(zip(batch.indices, paired)):
            start = item.response_start
            count = min(config.repbend_refusal_tokens, trainer.cb_items[index].length - start + 1,
                        item.length - start + 1)
            window[row, start - 1:start - 1 + count] = True
        return losses.retain_loss({l: lora[l][:, :width] for l in layers}, {l: orig[l][:, :width] for l in layers},
                                  window, layers, normalization="masked_mean", relative=self.relative)


class Refusal(RR):
    """Refusal-only fine-tuning, the classic baseline (docs/method-notes.md): on circuit-breaker batches the
    token-mean cross-entropy of a refusal to each request (one of the project's refusal styles, whole, and the
    end of the turn), on retain batches that of the items' own responses (the built-in retain sets are the
    model's own answers, so this is ordinary SFT toward what it already says). Constant weights refusal_weight
    and refusal_retain_weight (the log's c_s and c_r; rerouting_loss and retain_loss are the two
    cross-entropies, unweighted).

    LoRA as RR's, on blocks 0..max(target_layers); the loss reads the logits, so every block is kept. The logged
    cosines are diagnostics only: to the original model's states at the target layers, on the harmful requests'
    prompt tokens (the refusal items share them with the circuit-breaker items) and on the retain tokens."""

    name = "refusal"
    keeps_every_block = True

    def __init__(self, config: RRConfig) -> None:
        super().__init__(config)
        self.refusals = RefusalAnswers(end_of_turn=True)

    def coefficients(self, step: int) -> tuple[float, float]:
        return self.config.refusal_weight, self.config.refusal_retain_weight

    def harmful_terms(self, trainer, batch: Batch, orig=None) -> tuple[torch.Tensor, dict[int, float]]:
        """(the refusals' cross-entropy, {target layer: mean cosine to the original over the requests' tokens})."""
        layers, final = trainer.target_layers, trainer.retain_entries[-1]
        orig = orig if orig is not None else trainer._frozen(batch, layers, trainer.cb_cache)
        refusal = self.refusals.batch(trainer, self.refusals.items(trainer, batch.indices))
        lora = trainer._trained(refusal, sorted({*layers, final}))
        loss = losses.response_cross_entropy(lora[final], lm_head(trainer), refusal.inputs["input_ids"],
                                             refusal.response_mask)
        # The prompt positions are the same tokens in both batches (causal attention, right padding).
        width = min(batch.width, refusal.width)
        requests = prompt_positions(refusal)[:, :width, 0]
        return loss, losses.layer_cosines({l: lora[l][:, :width] for l in layers},
                                          {l: orig[l][:, :width] for l in layers}, requests, layers)

    def retain_terms(self, trainer, batch: Batch, orig=None) -> tuple[torch.Tensor, float]:
        """(the responses' cross-entropy, mean cosine to the original at the target layers over the real tokens)."""
        layers, final = trainer.target_layers, trainer.retain_entries[-1]
        if orig is None:  # the cosine needs the target layers only; a cache holds every entry (as RR's)
            cache = trainer.retain_cache
            orig = trainer._frozen(batch, trainer.retain_entries if cache is not None else layers, cache)
        lora = trainer._trained(batch, sorted({*layers, final}))
        loss = losses.response_cross_entropy(lora[final], lm_head(trainer), batch.inputs["input_ids"],
                                             batch.response_mask)
        return loss, losses.mean_cosine(lora, orig, batch.attention_mask, layers)


class RefusalAnswers:
    """Circuit-breaker items answered by the project's refusal styles (`data.builtin.refusal_texts`): item i gets
    style i mod n, tokenised once. Shared by RepBend's eta term (the first K - 1 tokens, no end of turn) and the
    refusal baseline (the whole refusal and the chat template's end of the assistant turn, as the data's
    refusal items are written). A refusal is cut where the item would pass max_length."""

    def __init__(self, end_of_turn: bool) -> None:
        self.end_of_turn = end_of_turn
        self._ids: list[list[int]] | None = None

    def ids(self, trainer, index: int) -> list[int]:
        """The refusal answering circuit-breaker item `index`, as token ids."""
        if self._ids is None:
            from ..data import ChatFormatter
            from ..data.builtin import refusal_texts

            def tokenize(text: str) -> list[int]:
                return list(trainer.tokenizer(text, add_special_tokens=False)["input_ids"])

            end = []
            if self.end_of_turn:  # what the template writes after an assistant message, e.g. "<|im_end|>\n"
                end = tokenize(ChatFormatter(trainer.tokenizer, trainer.config.max_length).end_of_turn)
            self._ids = [tokenize(text) + end for text in refusal_texts()]
        return self._ids[index % len(self._ids)]

    def items(self, trainer, indices: list[int], tokens: int | None = None) -> list:
        """Circuit-breaker items `indices` with their responses replaced by (the first `tokens` of) their refusals."""
        paired = []
        for index in indices:
            item = trainer.cb_items[index]
            room = trainer.config.max_length - item.response_start
            refusal = self.ids(trainer, index)[:room if tokens is None else min(tokens, room)]
            paired.append(dataclasses.replace(item, input_ids=tuple(item.input_ids[:item.response_start])
                                              + tuple(refusal)))
        return paired

    @staticmethod
    def batch(trainer, items: list) -> Batch:
        return make_batch(trainer.collator, items, list(range(len(items))), trainer.device)


METHODS = {method.name: method for method in (RR, RRLat, RepBend, Refusal)}


def make_method(config: RRConfig) -> RR:
    return METHODS[config.method](config)
