"""The RR training loop, top to bottom (Algorithm 1 of the paper; method.md sections 3-5).

Each optimizer step draws one circuit-breaker batch and one retain batch, independently, each
padded to its own longest item. For each it runs a no-grad pass with the LoRA adapter disabled
(the "original" model: the same weights, never a second copy) and a pass with gradients, both
through the decoder only (no LM head) and keeping only the hidden states the losses need. Then
`c_s(t) * L_s + c_r(t) * L_r` is minimised with AdamW; t counts optimizer steps.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from . import checkpoint as ckpt
from .. import losses
from ..config import ConfigError, RRConfig
from ..data import ChatFormatter, TokenizedExample, collate, tokenize_examples
from ..data.builtin import load_training_sets
from .parallel import Distributed, from_environment
from .memory import CheckpointPlanner, measure_activation_bytes_per_token, supports_per_block_checkpointing
from ..hidden import decoder_hidden_states
from ..models import (Architecture, DroppedBlocks, base_model_name, drop_blocks_after, find_architecture, load_model,
                     resolve_dtype, unwrap)


# ---------------------------------------------------------------- batches


def batch_indices(lengths: Sequence[int], batch_size: int, seed: int, *, group_by_length: bool = True
                  ) -> Iterator[list[int]]:
    """Endless batches of item indices. Every item is drawn once per epoch (the reference could only
    ever draw the first min(|D_s|, |D_r|) retain items). With `group_by_length`, items of similar
    length share a batch (sorted within random windows of 50 batches), so less padding is computed."""
    rng = random.Random(seed)
    order: list[int] = []
    while True:
        epoch = list(range(len(lengths)))
        rng.shuffle(epoch)
        if group_by_length:
            window = batch_size * 50
            epoch = [i for start in range(0, len(epoch), window)
                     for i in sorted(epoch[start:start + window], key=lengths.__getitem__)]
            batches = [epoch[i:i + batch_size] for i in range(0, len(epoch), batch_size)]
            rng.shuffle(batches)
            epoch = [i for b in batches for i in b]
        order.extend(epoch)
        while len(order) >= batch_size:
            yield order[:batch_size]
            del order[:batch_size]


# ---------------------------------------------------------------- model preparation


PAPER_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def resolve_lora_targets(arch: Architecture, names: list[str]) -> list[str]:
    """Check the configured LoRA module names against block 0; `all-linear` takes every linear layer,
    `auto` the paper's projections when the model has them all (Llama, Mistral, Qwen, Gemma), else all-linear."""
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in arch.blocks[0].named_modules()
                     if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"})
    if names == ["auto"]:
        names = PAPER_LORA_TARGETS if set(PAPER_LORA_TARGETS) <= set(linear) else ["all-linear"]
    if names == ["all-linear"]:
        return linear
    missing = [n for n in names if n not in linear]
    if missing:
        raise ConfigError(f"lora_target_modules: {', '.join(missing)} not found in the model's blocks; "
                          f"its linear layers are {', '.join(linear)} (or use all-linear)")
    return names


def add_lora(model: nn.Module, arch: Architecture, config: RRConfig):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout, bias="none",
        target_modules=resolve_lora_targets(arch, config.lora_target_modules),
        layers_to_transform=list(range(config.kept_blocks)),
        layers_pattern=arch.blocks_path.rsplit(".", 1)[-1],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def switch_off_base_dropout(model: nn.Module) -> None:
    """RR compares the model with its own frozen pass: base-model dropout noise would count as drift.
    Only LoRA's own dropout stays active (as in the reference, whose models have no other dropout)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and "lora_dropout" not in name:
            module.eval()
            module.p = 0.0  # attention code reads `.p` under its parent's training flag (GPT-2 + SDPA)
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


# ---------------------------------------------------------------- the trainer


class DecoderPasses(nn.Module):
    """The trainer's two passes as one module (what DeepSpeed's engine wraps): the decoder with the
    LoRA adapter, or (`frozen=True`, no gradients) with it disabled: the original model. Returns the
    hidden states of `entries` as a tuple, in that order (ZeRO-3's hooks read outputs' keys as names)."""

    def __init__(self, model: nn.Module, arch: Architecture) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.stop_early = True  # skip the blocks above the last entry asked for

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, entries: Sequence[int],
                frozen: bool = False) -> tuple[torch.Tensor, ...]:
        with torch.no_grad() if frozen else nullcontext(), self.model.disable_adapter() if frozen else nullcontext():
            states = decoder_hidden_states(self.arch, input_ids, attention_mask, entries, stop_early=self.stop_early)
        return tuple(states[entry] for entry in entries)


class FrozenStateCache:
    """Per-item hidden states of the adapter-disabled model. The base weights are frozen and base
    dropout is off, so these never change: computing them once saves a forward per step."""

    def __init__(self) -> None:
        self.items: dict[int, dict[int, torch.Tensor]] = {}

    def has(self, indices: list[int]) -> bool:
        return all(i in self.items for i in indices)

    def get(self, indices: list[int], width: int) -> dict[int, torch.Tensor] | None:
        if not self.has(indices):
            return None
        first = self.items[indices[0]]
        states = {}
        for entry, sample in first.items():
            padded = sample.new_zeros((len(indices), width, sample.shape[-1]))
            for row, i in enumerate(indices):
                value = self.items[i][entry]
                padded[row, :value.shape[0]] = value
            states[entry] = padded
        return states

    def put(self, indices: list[int], states: dict[int, torch.Tensor], lengths: list[int]) -> None:
        for row, (i, n) in enumerate(zip(indices, lengths)):
            if i not in self.items:
                self.items[i] = {entry: value[row, :n].clone() for entry, value in states.items()}


@dataclass
class TrainResult:
    output_dir: Path | None
    log: list[dict] = field(default_factory=list)
    model: nn.Module | None = None  # the merged full model
    tokenizer: object = None


class RRTrainer(ckpt.CheckpointedTraining):
    """Representation Rerouting on a causal LM. `RRTrainer(config).train(out_dir)` does it all."""

    def __init__(self, config: RRConfig, *, model=None, tokenizer=None,
                 circuit_breaker_items: list[TokenizedExample] | None = None,
                 retain_items: list[TokenizedExample] | None = None, progress: bool = True):
        self.config = config
        self.progress = progress
        self.dist: Distributed = from_environment()  # a no-op object for a single process
        torch.manual_seed(config.seed)
        if model is None:
            model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        arch = find_architecture(model, config.blocks_path)
        if config.kept_blocks - 1 > arch.num_blocks:
            raise ConfigError(f"target_layers: {max(config.target_layers)} is past the last hidden-state entry "
                              f"({arch.num_blocks}) of this {arch.num_blocks}-block model")
        if config.chat_template:
            tokenizer.chat_template = config.chat_template
        if circuit_breaker_items is None or retain_items is None:
            circuit_breaker_items, retain_items = self._tokenized_sets()
        if not circuit_breaker_items or not retain_items:
            raise ConfigError("both the circuit-breaker and the retain set need at least one item")
        self.cb_items, self.retain_items = circuit_breaker_items, retain_items

        keep = min(config.kept_blocks, arch.num_blocks)
        self.dropped: DroppedBlocks | None = None
        if not config.full_layers and keep < arch.num_blocks:
            self.dropped = drop_blocks_after(model, keep, arch.blocks_path)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = add_lora(model, find_architecture(model, arch.blocks_path), config)
        self.arch = find_architecture(self.model, arch.blocks_path)
        self.retain_entries = list(range(self.arch.num_blocks + 1))  # all of output_hidden_states
        self.target_layers = list(config.target_layers)

        checkpointing = config.gradient_checkpointing == "true" or (
            config.gradient_checkpointing == "auto" and self.device.type == "cuda")
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.model.train()
        switch_off_base_dropout(self.model)
        self.checkpoint_planner = self._plan_checkpointing() if checkpointing else None
        self._losses = _compiled_losses() if config.compile_loss else (losses.rerouting_loss, losses.retain_loss)
        self.target_offsets = self._seeded_start()
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self._plan_frozen_caches()
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.passes = DecoderPasses(self.model, self.arch)
        self.run_passes = self.passes  # DeepSpeed: its engine, around the same module
        self.zero = None  # DeepSpeed: the ZeroEngine
        self._setup_data_parallel()

    def _seeded_start(self) -> dict[int, torch.Tensor] | None:
        """Make the first steps' direction a function of the seed, not of rounding noise (config.seeded_start;
        docs/method-notes.md). Returns the rerouting-target offsets for `target`, else None."""
        config = self.config
        if config.seeded_start == "target":
            hidden = unwrap(self.model).config.get_text_config().hidden_size
            return {layer: offset.to(self.device) for layer, offset in losses.seeded_directions(
                self.target_layers, hidden, config.seed, config.seeded_start_scale).items()}
        if config.seeded_start == "lora":
            generator = torch.Generator().manual_seed(config.seed)
            with torch.no_grad():
                for name, p in sorted(self.model.named_parameters(), key=lambda item: item[0]):
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=generator) * config.seeded_start_scale)
        return None

    def _plan_checkpointing(self) -> CheckpointPlanner | None:
        """Under `auto` on CUDA, measure what a block keeps per token and checkpoint only what must be."""
        config = self.config
        if config.gradient_checkpointing != "auto" or not supports_per_block_checkpointing(self.arch):
            return None
        if self.dist.mode in ("fsdp", "deepspeed"):
            # Under FSDP (and DeepSpeed's ZeRO-3) a checkpointed block all-gathers its weights again in backward:
            # plans that differ between processes (each has its own batch lengths) would desynchronise them.
            return None
        full, checkpointed = measure_activation_bytes_per_token(self.arch, self.retain_entries)
        if config.activation_memory_gb is not None:
            budget = config.activation_memory_gb * 2**30
        else:
            free, _ = torch.cuda.mem_get_info(self.device)
            budget = 0.8 * free - config.frozen_cache_gb * 2**30
        return CheckpointPlanner(self.arch, budget, full, checkpointed)

    def _plan_frozen_caches(self) -> None:
        """Cache the frozen states of a whole set when it fits in `frozen_cache_gb` (first come, first served)."""
        base = unwrap(self.model)
        bytes_per_value = torch.finfo(next(base.parameters()).dtype).bits // 8
        budget = self.config.frozen_cache_gb * 2**30
        caches = []
        self.frozen_cache_sizes = []  # bytes of each set's cache when full (also the checkpoints' estimate)
        for items, entries in ((self.cb_items, self.target_layers), (self.retain_items, self.retain_entries)):
            size = sum(x.length for x in items) * len(entries) * base.config.hidden_size * bytes_per_value
            caches.append(FrozenStateCache() if size <= budget else None)
            self.frozen_cache_sizes.append(size)
            budget -= size if size <= budget else 0
        self.cb_cache, self.retain_cache = caches

    def _tokenized_sets(self):
        config = self.config
        cb, retain = load_training_sets(config.circuit_breaker_data, config.retain_data, seed=config.seed,
                                        response_field=config.response_field, refusals=config.refusal_retain)
        # Augmentation applies to both sets, as in the reference; tokenised once here, never again.
        formatter = ChatFormatter(self.tokenizer, config.max_length, seed=config.seed,
                                  drop_instruction_prob=config.drop_instruction_prob, truncation=config.truncation)
        return tokenize_examples(cb, formatter), tokenize_examples(retain, formatter)

    # ------------------------------------------------------------ one step

    def _batch(self, items: list[TokenizedExample], indices: list[int]) -> dict[str, torch.Tensor]:
        batch = collate([items[i] for i in indices], self.tokenizer.pad_token_id)
        return {**{k: v.to(self.device) for k, v in batch.items()}, "indices": list(indices)}

    def _frozen(self, batch, entries, cache: "FrozenStateCache | None"):
        """Hidden states of the adapter-disabled model, from the cache when every item is in it."""
        if cache is not None and (states := cache.get(batch["indices"], batch["input_ids"].shape[1])) is not None:
            return states
        states = self._hidden_states(batch["input_ids"], batch["attention_mask"], entries, frozen=True)
        if cache is not None:
            cache.put(batch["indices"], states, batch["attention_mask"].sum(dim=1).tolist())
        return states

    def _trained(self, batch, entries):
        if self.checkpoint_planner is not None:
            self.checkpoint_planner.plan(batch["input_ids"].numel())
        return self._hidden_states(batch["input_ids"], batch["attention_mask"], entries)

    def _hidden_states(self, input_ids, attention_mask, entries, *, frozen: bool = False) -> dict[int, torch.Tensor]:
        return dict(zip(entries, self.run_passes(input_ids, attention_mask, list(entries), frozen=frozen)))

    def _frozen_joint(self, cb_batch, retain_batch):
        """One adapter-disabled pass over both batches (rows stacked, right-padded to the longer one):
        the states of a right-padded row do not depend on the padding after it."""
        if any(cache is not None and cache.has(batch["indices"])
               for cache, batch in ((self.cb_cache, cb_batch), (self.retain_cache, retain_batch))):
            return None  # a cached set needs no pass: the other one gets its own
        width = max(cb_batch["input_ids"].shape[1], retain_batch["input_ids"].shape[1])
        stack = lambda key: torch.cat([nn.functional.pad(b[key], (0, width - b[key].shape[1]))  # noqa: E731
                                       for b in (cb_batch, retain_batch)])
        states = self._hidden_states(stack("input_ids"), stack("attention_mask"), self.retain_entries, frozen=True)
        rows, cb_width = cb_batch["input_ids"].shape
        cb = {entry: states[entry][:rows, :cb_width] for entry in self.target_layers}
        retain = {entry: value[rows:, :retain_batch["input_ids"].shape[1]] for entry, value in states.items()}
        for cache, batch, part in ((self.cb_cache, cb_batch, cb), (self.retain_cache, retain_batch, retain)):
            if cache is not None:
                cache.put(batch["indices"], part, batch["attention_mask"].sum(dim=1).tolist())
        return cb, retain

    def rerouting_terms(self, batch, orig=None) -> tuple[torch.Tensor, dict[int, float]]:
        mask = batch["response_mask"] if self.config.reroute_tokens == "response" else batch["attention_mask"]
        orig = orig if orig is not None else self._frozen(batch, self.target_layers, self.cb_cache)
        lora = self._trained(batch, self.target_layers)
        loss = self._losses[0](lora, orig, mask, self.target_layers, self.target_offsets)
        return loss, losses.layer_cosines(lora, orig, mask, self.target_layers)

    def retain_terms(self, batch, orig=None) -> tuple[torch.Tensor, float]:
        mask = batch["attention_mask"]
        orig = orig if orig is not None else self._frozen(batch, self.retain_entries, self.retain_cache)
        lora = self._trained(batch, self.retain_entries)
        loss = self._losses[1](lora, orig, mask, self.retain_entries,
                               normalization=self.config.retain_normalization,
                               reference_length=self.config.reference_length,
                               relative=self.config.retain_distance == "relative_l2")
        return loss, losses.mean_cosine(lora, orig, mask, self.target_layers)

    def step(self, step: int, cb_indices: list[int], retain_indices: list[int]) -> dict:
        """One optimizer step (1-based `step`); returns its train-log record."""
        config = self.config
        started = time.perf_counter()
        c_s, c_r = losses.rr_coefficients(step, config.alpha, config.denominator)
        c_r *= config.retain_weight
        micro = config.grad_accum
        totals = {"rerouting_loss": 0.0, "retain_loss": 0.0, "cb_cos": 0.0, "retain_cos": 0.0}
        cb_cos_layers = dict.fromkeys(map(str, self.target_layers), 0.0)  # str keys: a JSON log
        tokens = 0
        for k in range(micro):
            size = len(cb_indices) // micro
            retain_batch = self._batch(self.retain_items, retain_indices[k * size:(k + 1) * size])
            cb_batch = None  # past the end of the schedule the rerouting term has no weight: its passes are skipped
            if c_s > 0:
                cb_batch = self._batch(self.cb_items, cb_indices[k * size:(k + 1) * size])
            orig_cb = orig_retain = None
            if cb_batch is not None and config.joint_frozen_pass:
                orig_cb, orig_retain = self._frozen_joint(cb_batch, retain_batch) or (None, None)
            # Retain first: its backward reaches every LoRA weight, and ZeRO-3 needs that of a step's first
            # backward (a weight it leaves out would add this step's gradient to the previous step's).
            loss, cos = self.retain_terms(retain_batch, orig_retain)
            self._backward(c_r * loss / micro, last=cb_batch is None and k == micro - 1)
            totals["retain_loss"] += loss.item() / micro
            totals["retain_cos"] += cos / micro
            tokens += int(retain_batch["attention_mask"].sum())
            if cb_batch is not None:
                loss, per_layer = self.rerouting_terms(cb_batch, orig_cb)
                self._backward(c_s * loss / micro, last=k == micro - 1)
                totals["rerouting_loss"] += loss.item() / micro
                totals["cb_cos"] += sum(per_layer.values()) / len(per_layer) / micro
                for layer, cos in per_layer.items():
                    cb_cos_layers[str(layer)] += cos / micro
                tokens += int(cb_batch["attention_mask"].sum())
        grad_norm = self._optimizer_step()
        elapsed = time.perf_counter() - started
        if c_s <= 0:
            totals["rerouting_loss"] = totals["cb_cos"] = cb_cos_layers = None
        return {"step": step, "c_s": c_s, "c_r": c_r, **totals, "cb_cos_layers": cb_cos_layers, "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tokens / elapsed,
                "step_time_s": elapsed, **self._checkpointing_record()}

    def _backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """`last`: the step's final backward (DeepSpeed reduces the gradients there)."""
        if self.zero is not None:
            self.zero.backward(loss, last=last)
        else:
            loss.backward()

    def _optimizer_step(self) -> float | None:
        """Clip and step; returns the gradient norm before clipping (None if DeepSpeed did not compute it)."""
        if self.zero is not None:
            return self.zero.step()
        self._sync_gradients()  # several processes: average the LoRA gradients once per optimizer step
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def _checkpointing_record(self) -> dict:
        planner = self.checkpoint_planner
        return {} if planner is None else {"blocks_without_checkpointing": planner.last_uncheckpointed}

    # ------------------------------------------------------------ several processes

    def _setup_data_parallel(self) -> None:
        """Under a launcher: check the batch splits evenly, give every process rank 0's LoRA weights."""
        world, micro = self.dist.world, self.config.grad_accum
        if self.config.batch_size % (world * micro):
            raise ConfigError(f"batch_size ({self.config.batch_size}) is the global batch per optimizer step and "
                              f"must be a multiple of processes x grad_accum ({world} x {micro} = {world * micro})")
        self.dist.broadcast_(self.trainable)
        if self.dist.sharded:
            self._shard_model()
        elif self.dist.mode == "deepspeed":
            self._start_deepspeed()

    def _start_deepspeed(self) -> None:
        """Hand the passes and AdamW to DeepSpeed's engine (see deepspeed_engine.py for how it is driven)."""
        from .zero import ZeroEngine

        self.zero = ZeroEngine(self.dist.accelerator, self.passes, self.optimizer, self.config, self.dist.world)
        self.run_passes = self.zero.passes
        if self.zero.sharded:
            self.passes.stop_early = False  # an exception mid-forward would leave ZeRO-3's gathered weights behind
            self.cb_cache = self.retain_cache = None  # every forward is a collective (see _shard_model)

    def _shard_model(self) -> None:
        """FSDP2: shard each decoder block, then the decoder (embeddings, final norm), over all processes.
        The parameters become DTensors, so the optimizer is made again over them."""
        from torch.distributed.fsdp import fully_shard

        for block in self.arch.blocks:
            fully_shard(block)
        fully_shard(self.arch.decoder)
        # Every forward is now a collective (all-gathers), so all processes must run the same ones: a
        # frozen-state cache would skip passes on some processes only and deadlock the others.
        self.cb_cache = self.retain_cache = None
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=self.config.lr, weight_decay=self.config.weight_decay)

    def _lora_names(self) -> dict[str, str]:
        """{name in an adapter file: parameter name} (PEFT drops the adapter name from saved keys)."""
        adapter = f".{self.model.active_adapter}."
        return {name.replace(adapter, "."): name for name, p in self.model.named_parameters() if p.requires_grad}

    @property
    def _weights_sharded(self) -> bool:
        """FSDP or ZeRO-3: no process holds the whole model."""
        return self.dist.sharded or (self.zero is not None and self.zero.sharded)

    def _full_lora_state(self) -> dict[str, torch.Tensor] | None:
        """Sharded: the whole LoRA weights gathered from all processes (a collective: every process
        calls it), on the CPU. None otherwise (PEFT reads the model's own)."""
        if not self._weights_sharded:
            return None
        if self.zero is not None:
            with self.zero.gathered(self.trainable):
                return {name: p.detach().cpu().clone() for name, p in self.model.named_parameters() if p.requires_grad}
        return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                for name, p in self.model.named_parameters() if p.requires_grad}

    def _parallel_name(self) -> str:
        """How the run is spread, as checkpoints record it: single, ddp, fsdp or deepspeed-zeroN."""
        return f"deepspeed-zero{self.zero.stage}" if self.zero is not None else self.dist.mode

    def _optimizer_state(self) -> dict:
        if not self.dist.sharded:
            return self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _sync_gradients(self) -> None:
        """Average the LoRA gradients over processes (one all-reduce per optimizer step; no-op alone;
        FSDP reduce-scatters them itself in each backward)."""
        if self.dist.active and not self.dist.sharded:
            for p in self.trainable:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
            self.dist.average_([p.grad for p in self.trainable])

    def _shard(self, indices: list[int]) -> list[int]:
        """This process's contiguous share of a global batch."""
        size = len(indices) // self.dist.world
        return indices[self.dist.rank * size:(self.dist.rank + 1) * size]

    def _global_record(self, record: dict) -> dict:
        """Losses and cosines averaged over processes (each saw an equal share), token rates summed."""
        if not self.dist.active:
            return record
        keys = ("rerouting_loss", "retain_loss", "cb_cos", "retain_cos")
        layers = list(record["cb_cos_layers"] or {})
        values = [record[k] if record[k] is not None else 0.0 for k in keys] + [record["tokens_per_s"]]
        values += [record["cb_cos_layers"][layer] for layer in layers]
        summed = self.dist.sum_floats(values, self.device)
        for key, value in zip(keys, summed):
            if record[key] is not None:
                record[key] = value / self.dist.world
        record["tokens_per_s"] = summed[len(keys)]
        for layer, value in zip(layers, summed[len(keys) + 1:]):
            record["cb_cos_layers"][layer] = value / self.dist.world
        return record

    # ------------------------------------------------------------ the loop

    def train(self, output_dir: str | os.PathLike | None = None, *, resume: str | os.PathLike | bool | None = None
              ) -> TrainResult:
        """Train `config.steps` optimizer steps; with `output_dir`, checkpoint every `save_every` steps and
        save OUT/adapter and OUT/model at the end. `resume`: a checkpoint directory, or True for the
        newest under OUT/checkpoints (none yet: start at step 1)."""
        config = self.config
        out = Path(output_dir) if output_dir is not None else None
        if resume and out is None:
            raise ConfigError("resuming needs the run's output directory")
        cb_batches = batch_indices([x.length for x in self.cb_items], config.batch_size, config.seed)
        retain_batches = batch_indices([x.length for x in self.retain_items], config.batch_size, config.seed + 1)
        fingerprint = ckpt.data_fingerprint(self.cb_items, self.retain_items)
        start = 0
        log: list[dict] = []
        self._last_checkpoint: Path | None = None
        if out is not None:
            checkpoint = self.dist.on_main(lambda: self._prepare_output(out, resume))
            log_path = out / ckpt.LOG_FILE
            if checkpoint is not None:
                state = self._load_checkpoint(checkpoint, fingerprint)
                start = state["step"]
                for _ in range(state["batches_drawn"]["circuit_breaker"]):
                    next(cb_batches)
                for _ in range(state["batches_drawn"]["retain"]):
                    next(retain_batches)
                self._last_checkpoint = checkpoint
                log = ckpt.read_log(log_path, start)
        if start == 0 and self.dist.active:
            torch.manual_seed(config.seed + 1 + self.dist.rank)  # independent LoRA-dropout masks per process
        bar = _progress(config.steps, self.progress and self.dist.is_main, initial=start)
        for step in range(start + 1, config.steps + 1):
            record = self.step(step, self._shard(next(cb_batches)), self._shard(next(retain_batches)))
            record = self._global_record(record)
            values = {k: record[k] for k in ("rerouting_loss", "retain_loss", "grad_norm") if record[k] is not None}
            if not all(math.isfinite(v) for v in values.values()):
                raise ckpt.NonFiniteLossError(self._non_finite_message(step, values, out))
            log.append(record)
            if out is not None and self.dist.is_main and (step % config.log_every == 0 or step == config.steps):
                with open(log_path, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
            if out is not None and config.save_every and step % config.save_every == 0:
                self._save_checkpoint(out, step, fingerprint)
            bar.set_postfix({k: f"{record[k]:.3g}" for k in ("rerouting_loss", "retain_loss", "cb_cos")
                             if record[k] is not None}, refresh=False)
            bar.update(1)
        bar.close()
        merged = None
        if out is not None:
            lora = self._full_lora_state()  # sharded: gathered by every process; else None
            merged = self.dist.on_main(lambda: self.save(out) if lora is None else self._save_sharded(out, lora),
                                       share=False)
        return TrainResult(out, log, merged if self.dist.is_main else None, self.tokenizer)

    # ------------------------------------------------------------ saving

    def _save_sharded(self, out: Path, lora: dict[str, torch.Tensor]) -> nn.Module:
        """Rank 0 after sharded training, which holds only a shard of the base weights: load the original
        model on the CPU, put the gathered LoRA weights on it, and save it as `save` does."""
        config = self.config
        dtype = str(resolve_dtype(config.dtype, self.device)).removeprefix("torch.")
        with self.zero.plain_models() if self.zero is not None else nullcontext():
            model, _ = load_model(config.model, dtype=dtype, device="cpu")
            for p in model.parameters():
                p.requires_grad_(False)
            peft_model = add_lora(model, find_architecture(model, self.arch.blocks_path), config)
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, value in lora.items():
                params[name].copy_(value)
        self.model, self.dropped = peft_model, None
        return self.save(out)

    def save(self, out: Path) -> nn.Module:
        """Write OUT/adapter (PEFT) and OUT/model (merged, upper blocks re-attached, original config)."""
        blocks_path = self.arch.blocks_path  # also right for a model found through config.blocks_path
        _atomic_dir(out / "adapter", self.model.save_pretrained)
        merged = self.model.merge_and_unload()
        if self.dropped is not None:
            reference = next(merged.parameters())
            for block in self.dropped.blocks:
                block.to(device=reference.device, dtype=reference.dtype)
            self.dropped.reattach(merged, blocks_path)
            self.dropped = None
        merged.eval()

        def write_model(tmp: Path) -> None:
            merged.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            (tmp / "README.md").write_text(model_card(self.config))
        _atomic_dir(out / "model", write_model)
        self.model = merged
        return merged


def _compiled_losses():
    """The two losses through torch.compile (dynamic shapes: every batch has its own length)."""
    return (torch.compile(losses.rerouting_loss, dynamic=True), torch.compile(losses.retain_loss, dynamic=True))


def _atomic_dir(target: Path, write) -> None:
    """Fill a temporary sibling directory, then swap it in: never a half-written checkpoint."""
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def model_card(config: RRConfig) -> str:
    settings = {k: getattr(config, k) for k in ("target_layers", "alpha", "steps", "batch_size", "lr", "lora_r",
                                                 "lora_alpha", "retain_normalization", "retain_distance",
                                                 "retain_weight", "reroute_tokens", "drop_instruction_prob")}
    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in settings.items())
    return f"""---
base_model: {base_model_name(config.model)}
library_name: transformers
tags:
- circuit-breakers
- representation-rerouting
- safety
---

# {base_model_name(config.model)} + circuit breakers (Representation Rerouting)

This checkpoint is `{base_model_name(config.model)}` fine-tuned with Representation Rerouting
(Zou et al., "Improving Alignment and Robustness with Circuit Breakers", NeurIPS 2024) by the
`circuit-breakers` toolkit. LoRA weights are merged; it loads with `AutoModelForCausalLM.from_pretrained`.

| setting | value |
|---|---|
{rows}

The full resolved configuration is in `config.yaml` beside this directory.
"""


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=not enabled, desc="RR training", unit="step")


def train(config: RRConfig | None = None, output_dir: str | os.PathLike | None = None, **overrides) -> TrainResult:
    """Circuit-break a model in one call: `train(RRConfig(model="smollm2-135m"), "runs/rr")`."""
    if config is None:
        config = RRConfig(**overrides)
    elif overrides:
        config = RRConfig.from_dict({**config.to_dict(), **overrides})
    return RRTrainer(config).train(output_dir)
