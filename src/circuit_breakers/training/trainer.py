"""The RR training loop, top to bottom (Algorithm 1 of the paper; docs/method.md sections 3-5).

data -> model -> steps -> save. Each optimizer step draws one circuit-breaker batch and one retain
batch, independently, each padded to its own longest item. For each it runs a no-grad pass with the
LoRA adapter disabled (the "original" model: the same weights, never a second copy) and a pass with
gradients, both through the decoder only (no LM head) and keeping only the hidden states the losses
need. Then `c_s(t) * L_s + c_r(t) * L_r` is minimised with AdamW; t counts optimizer steps.

`config.method` chooses what the two losses are (methods.py): rr (the above), repbend, rr_lat or refusal
(refusal-only fine-tuning, the classic baseline); the loop and the passes are the same for all.

The parts, each in its own module: LoRA set-up and saving (lora.py), batches and model inputs
(batches.py), the frozen-state cache (frozen_cache.py), activation checkpointing (memory.py),
checkpoints (checkpoint.py), and how the run is spread over processes (parallel.py, zero.py): the
loop calls the same methods in every parallel mode.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .. import losses, stopping
from ..config import ConfigError, RRConfig
from ..data import ChatFormatter, TokenizedExample, tokenize_examples
from ..data.builtin import load_training_sets
from ..hidden import decoder_hidden_states
from ..models import Architecture, drop_blocks_after, find_architecture, is_multimodal, load_model, resolve_dtype, unwrap
from ..multimodal.processing import MultimodalCollator, MultimodalFormatter, ProcessorTokenizer, is_processor
from .batches import Batch, Collator, TextCollator, batch_indices, make_batch, stack_batches
from .checkpoint import (Checkpointer, NonFiniteLossError, TrainingInterrupted, data_fingerprint, non_finite_message,
                         read_log, state_bytes)
from .frozen_cache import FrozenStateCache, cache_bytes, plan_caches
from .lora import add_lora, save_adapter_and_merged, seed_lora_b, switch_off_base_dropout, trainable_parameters
from .memory import setup_activation_checkpointing
from .methods import make_method
from .packing import PackingCollator, check_packing_support
from .parallel import Distributed, from_environment, make_parallel


class DecoderPasses(nn.Module):
    """The trainer's two passes as one module (what DeepSpeed's engine wraps): the decoder with the
    LoRA adapter, or (`frozen=True`, no gradients) with it disabled: the original model. `inputs` are
    the collator's model inputs. Returns the hidden states of `entries` as a tuple, in that order
    (ZeRO-3's hooks read outputs' keys as names). For a vision-language model `arch.decoder` is the
    multimodal base model: it runs the frozen vision tower and projector on the collator's pixel inputs
    and merges their features into the embeddings before the language model's blocks (models.py)."""

    def __init__(self, model: nn.Module, arch: Architecture) -> None:
        super().__init__()
        self.model = model
        self.arch = arch
        self.stop_early = True  # skip the blocks above the last entry asked for

    def forward(self, entries: Sequence[int], frozen: bool = False, **inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad() if frozen else nullcontext(), self.model.disable_adapter() if frozen else nullcontext():
            # Packed rows carry no attention_mask (training/packing.py): the decoder masks per item.
            states = decoder_hidden_states(self.arch, attention_mask=inputs.pop("attention_mask", None),
                                           entries=entries, stop_early=self.stop_early, **inputs)
        return tuple(states[entry] for entry in entries)


@dataclass
class TrainResult:
    output_dir: Path | None
    log: list[dict] = field(default_factory=list)
    model: nn.Module | None = None  # the merged full model
    tokenizer: object = None


class RRTrainer:
    """Representation Rerouting on a causal LM. `RRTrainer(config).train(out_dir)` does it all.

    `collator` turns tokenised items into model inputs (default: padded token ids); see batches.py
    for what another one (images, tool schemas) returns."""

    def __init__(self, config: RRConfig, *, model=None, tokenizer=None,
                 circuit_breaker_items: list[TokenizedExample] | None = None,
                 retain_items: list[TokenizedExample] | None = None, collator: Collator | None = None,
                 progress: bool = True):
        self.config = config
        self.progress = progress
        self.dist: Distributed = from_environment()  # a single process unless a launcher started several
        self.parallel = make_parallel(self.dist)
        torch.manual_seed(config.seed)

        # The model, and the data tokenised with its chat template.
        if model is None:
            model, tokenizer = load_model(config.model, dtype=config.dtype, device=config.device)
        # A vision-language model: its processor stands in for the tokenizer, and is saved beside the model.
        self.multimodal = is_processor(tokenizer)
        if self.multimodal:
            tokenizer = ProcessorTokenizer.wrap(tokenizer)
        if is_multimodal(model) and self.parallel.name not in ("single", "ddp"):
            raise ConfigError(f"{self.parallel.name}: vision-language models train in one process or data parallel "
                              "(multi-gpu) only; FSDP and DeepSpeed are not supported for them")
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        arch = find_architecture(model, config.blocks_path)
        self.method = make_method(config)  # what the two losses are (methods.py)
        if config.method != "rr" and self.parallel.name != "single":
            raise ConfigError(f"method: {config.method} trains in one process only; the parallel modes "
                              f"({self.parallel.name} here) are built and tested for rr")
        harmful_layers = self.method.harmful_layers(arch.num_blocks)
        if config.chat_template:
            tokenizer.chat_template = config.chat_template
        if circuit_breaker_items is None or retain_items is None:
            circuit_breaker_items, retain_items = self._tokenized_sets()
        if not circuit_breaker_items or not retain_items:
            raise ConfigError("both the circuit-breaker and the retain set need at least one item")
        self.cb_items, self.retain_items = circuit_breaker_items, retain_items
        if config.packing:
            if self.multimodal or collator is not None:
                raise ConfigError("packing: packs token ids only (its own collator); it is not supported with "
                                  "vision-language models or a collator of your own")
            check_packing_support(model, arch)
            collator = PackingCollator(tokenizer.pad_token_id, config.pack_length or config.max_length)
        if collator is None:  # images need the processor's pixels beside the token ids
            collator = MultimodalCollator(tokenizer) if self.multimodal else TextCollator(tokenizer.pad_token_id)
        self.collator = collator
        if config.batch_size % (self.dist.world * config.grad_accum):
            raise ConfigError(f"batch_size ({config.batch_size}) is the global batch per optimizer step and must "
                              f"be a multiple of processes x grad_accum ({self.dist.world} x {config.grad_accum} = "
                              f"{self.dist.world * config.grad_accum})")

        # LoRA on the kept blocks; the blocks above the last target layer are dropped until the save
        # (kept where the method reads the logits).
        keep = min(max(harmful_layers) + 1, arch.num_blocks)
        self.dropped = None
        if not (config.full_layers or self.method.keeps_every_block) and keep < arch.num_blocks:
            self.dropped = drop_blocks_after(model, keep, arch.blocks_path)
        self.model = add_lora(model, find_architecture(model, arch.blocks_path), config, blocks=keep)
        self.arch = find_architecture(self.model, arch.blocks_path)
        self.retain_entries = list(range(self.arch.num_blocks + 1))  # all of output_hidden_states
        self.target_layers = harmful_layers  # the entries the circuit-breaker loss reads (and the cache keeps)
        self.model.train()
        switch_off_base_dropout(self.model)
        self.checkpoint_planner = setup_activation_checkpointing(
            self.model, self.arch, config, self.device, self.retain_entries,
            per_batch_plans=self.parallel.per_batch_checkpoint_plans)
        self._losses = _compiled_losses() if config.compile_loss else (losses.rerouting_loss, losses.retain_loss)
        self.target_offsets = self._seeded_start()
        self._plan_frozen_caches()

        # The passes and the optimizer, as the parallel mode runs them.
        self.passes = DecoderPasses(self.model, self.arch)
        self.parallel.prepare(self.passes, config)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.parallel.optimizer

    @property
    def trainable(self) -> list[nn.Parameter]:
        return self.parallel.trainable

    def _tokenized_sets(self):
        config = self.config
        cb, retain = load_training_sets(config.circuit_breaker_data, config.retain_data, seed=config.seed,
                                        response_field=config.response_field, refusals=config.refusal_retain)
        # Augmentation applies to both sets, as in the reference; tokenised once here, never again.
        formatter = (MultimodalFormatter if self.multimodal else ChatFormatter)(
            self.tokenizer, config.max_length, seed=config.seed, drop_instruction_prob=config.drop_instruction_prob,
            truncation=config.truncation, tool_format=config.tool_format)
        return tokenize_examples(cb, formatter), tokenize_examples(retain, formatter)

    def _seeded_start(self) -> dict[int, torch.Tensor] | None:
        """Make the first steps' direction a function of the seed, not of rounding noise (config.seeded_start;
        docs/method-notes.md). Returns the rerouting-target offsets for `target`, else None."""
        config = self.config
        if config.seeded_start == "target":
            hidden = unwrap(self.model).config.get_text_config().hidden_size
            return {layer: offset.to(self.device) for layer, offset in losses.seeded_directions(
                self.target_layers, hidden, config.seed, config.seeded_start_scale).items()}
        if config.seeded_start == "lora":
            seed_lora_b(self.model, config.seed, config.seeded_start_scale)
        return None

    def _plan_frozen_caches(self) -> None:
        base = unwrap(self.model)
        bytes_per_value = torch.finfo(next(base.parameters()).dtype).bits // 8
        hidden = base.config.get_text_config().hidden_size
        self.frozen_cache_sizes = {  # bytes of each set's cache when full (also the checkpoints' estimate)
            "circuit_breaker": cache_bytes(self.cb_items, self.target_layers, hidden, bytes_per_value),
            "retain": cache_bytes(self.retain_items, self.retain_entries, hidden, bytes_per_value)}
        caches = plan_caches(self.frozen_cache_sizes, self.config.frozen_cache_gb, self.parallel.caches_allowed)
        self.cb_cache, self.retain_cache = caches["circuit_breaker"], caches["retain"]

    def _caches(self) -> dict[str, FrozenStateCache]:
        """The frozen-state caches in use, by set name."""
        return {name: cache for name, cache in (("circuit_breaker", self.cb_cache), ("retain", self.retain_cache))
                if cache is not None}

    # ------------------------------------------------------------ one step

    def _batch(self, items: list[TokenizedExample], indices: list[int]) -> Batch:
        return make_batch(self.collator, items, indices, self.device)

    def _hidden_states(self, inputs: dict[str, torch.Tensor], entries, *, frozen: bool = False
                       ) -> dict[int, torch.Tensor]:
        return dict(zip(entries, self.parallel.forward(list(entries), frozen=frozen, **inputs)))

    def _frozen(self, batch: Batch, entries, cache: FrozenStateCache | None):
        """Hidden states of the adapter-disabled model, from the cache when every item is in it."""
        if batch.packed:
            return self._frozen_packed(batch, entries, cache)
        if cache is not None and (states := cache.get(batch.indices, batch.width)) is not None:
            return states
        states = self._hidden_states(batch.inputs, entries, frozen=True)
        if cache is not None:
            cache.put(batch.indices, states, batch.lengths)
        return states

    def _frozen_packed(self, batch: Batch, entries, cache: FrozenStateCache | None):
        """`_frozen` for packed rows: the cache holds each item's states, wherever its row put it."""
        shape = tuple(batch.attention_mask.shape)
        if cache is not None and (states := cache.get_packed(batch.indices, batch.spans, shape)) is not None:
            return states
        states = self._hidden_states(batch.inputs, entries, frozen=True)
        if cache is not None:
            cache.put_packed(batch.indices, states, batch.spans)
        return states

    def _trained(self, batch: Batch, entries):
        if self.checkpoint_planner is not None:
            self.checkpoint_planner.plan(batch.attention_mask.numel())
        return self._hidden_states(batch.inputs, entries)

    def _frozen_joint(self, cb_batch: Batch, retain_batch: Batch):
        """One adapter-disabled pass over both batches stacked (config.joint_frozen_pass)."""
        if not self.collator.stackable or any(
                cache is not None and cache.has(batch.indices)
                for cache, batch in ((self.cb_cache, cb_batch), (self.retain_cache, retain_batch))):
            return None  # a cached set needs no pass: the other one gets its own
        states = self._hidden_states(stack_batches(cb_batch, retain_batch), self.retain_entries, frozen=True)
        rows = len(cb_batch.indices)
        cb = {entry: states[entry][:rows, :cb_batch.width] for entry in self.target_layers}
        retain = {entry: value[rows:, :retain_batch.width] for entry, value in states.items()}
        for cache, batch, part in ((self.cb_cache, cb_batch, cb), (self.retain_cache, retain_batch, retain)):
            if cache is not None:
                cache.put(batch.indices, part, batch.lengths)
        return cb, retain

    def rerouting_terms(self, batch: Batch, orig=None) -> tuple[torch.Tensor, dict[int, float]]:
        """The method's circuit-breaker loss (rr: L_s) and the mean cosine to the original per target layer."""
        return self.method.harmful_terms(self, batch, orig)

    def retain_terms(self, batch: Batch, orig=None) -> tuple[torch.Tensor, float]:
        """The method's retain loss (rr: L_r) and the mean cosine to the original at the target layers."""
        return self.method.retain_terms(self, batch, orig)

    def step(self, step: int, cb_indices: list[int], retain_indices: list[int]) -> dict:
        """One optimizer step (1-based `step`) on this process's items; returns its train-log record."""
        config = self.config
        started = time.perf_counter()
        c_s, c_r = self.method.coefficients(step)
        micro = config.grad_accum
        totals = {"rerouting_loss": 0.0, "retain_loss": 0.0, "cb_cos": 0.0, "retain_cos": 0.0}
        method_metrics: dict[str, float] = {}  # the method's own terms (repbend, rr_lat), averaged like the losses
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
            self.parallel.backward(c_r * loss / micro, last=cb_batch is None and k == micro - 1)
            totals["retain_loss"] += loss.item() / micro
            totals["retain_cos"] += cos / micro
            tokens += retain_batch.tokens
            if cb_batch is not None:
                loss, per_layer = self.rerouting_terms(cb_batch, orig_cb)
                self.parallel.backward(c_s * loss / micro, last=k == micro - 1)
                totals["rerouting_loss"] += loss.item() / micro
                totals["cb_cos"] += sum(per_layer.values()) / len(per_layer) / micro
                for layer, cos in per_layer.items():
                    cb_cos_layers[str(layer)] += cos / micro
                tokens += cb_batch.tokens
            for key, value in self.method.take_metrics().items():
                method_metrics[key] = method_metrics.get(key, 0.0) + value / micro
        for group in self.optimizer.param_groups:  # a function of the step alone: a resumed run continues it
            group["lr"] = learning_rate(config, step)
        grad_norm = self.parallel.step()
        elapsed = time.perf_counter() - started
        if c_s <= 0:
            totals["rerouting_loss"] = totals["cb_cos"] = cb_cos_layers = None
        planner = self.checkpoint_planner
        return {"step": step, "c_s": c_s, "c_r": c_r, **totals, "cb_cos_layers": cb_cos_layers, "grad_norm": grad_norm,
                "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
                **({} if planner is None else {"blocks_without_checkpointing": planner.last_uncheckpointed}),
                **method_metrics}

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
        checkpointer = None
        start, log = 0, []
        if out is not None:
            fingerprint = data_fingerprint(self.cb_items, self.retain_items)
            checkpointer = Checkpointer(out, config, self.dist, self.parallel, fingerprint)
            checkpoint = checkpointer.prepare(resume, **self._output_sizes())
            if checkpoint is not None:
                start = checkpointer.load(checkpoint, self.model, self._caches(), self.device)["step"]
                for _ in range(start):  # one batch of each set per step
                    next(cb_batches), next(retain_batches)
                log = read_log(checkpointer.log_path, start)
        if start == 0 and self.dist.active:
            torch.manual_seed(config.seed + 1 + self.dist.rank)  # independent LoRA-dropout masks per process

        bar = _progress(config.steps, self.progress and self.dist.is_main, initial=start)
        step = start
        try:
            for step in range(start + 1, config.steps + 1):
                stopping.check()  # a Ctrl-C whose KeyboardInterrupt was lost on the way
                record = self._logged_step(step, next(cb_batches), next(retain_batches), out, checkpointer)
                log.append(record)
                bar.set_postfix({k: f"{record[k]:.3g}" for k in ("rerouting_loss", "retain_loss", "cb_cos")
                                 if record[k] is not None}, refresh=False)
                bar.update(1)
        except KeyboardInterrupt:  # Ctrl-C (or SIGTERM via the CLI): say where a resumed run would continue from
            raise TrainingInterrupted(step, checkpointer and checkpointer.newest(), out) from None
        finally:
            bar.close()  # before any message: a half-drawn bar would swallow it

        merged = None
        if out is not None:
            lora = self.parallel.full_lora_state(self.model)  # where no process holds it whole: gathered by all
            merged = self.dist.on_main(lambda: self.save(out, lora), share=False)
        return TrainResult(out, log, merged if self.dist.is_main else None, self.tokenizer)

    def _logged_step(self, step: int, cb_indices: list[int], retain_indices: list[int], out: Path | None,
                     checkpointer: Checkpointer | None) -> dict:
        """One step on this process's share of the global batches; stops on a non-finite loss; logs and
        checkpoints as configured. Returns the step's record, averaged over processes."""
        config = self.config
        record = self._global_record(self.step(step, self._shard(cb_indices), self._shard(retain_indices)))
        values = {k: record[k] for k in ("rerouting_loss", "retain_loss", "grad_norm") if record[k] is not None}
        if not all(math.isfinite(v) for v in values.values()):
            raise NonFiniteLossError(non_finite_message(step, values, out, checkpointer and checkpointer.last,
                                                        config.save_every))
        if checkpointer is not None and self.dist.is_main and (step % config.log_every == 0 or step == config.steps):
            with open(checkpointer.log_path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if checkpointer is not None and config.save_every and step % config.save_every == 0:
            checkpointer.save(step, self.model, self._caches())
        return record

    def _output_sizes(self) -> dict[str, int]:
        """Bytes the output directory must hold, for the free-space check before the first step."""
        model = state_bytes(list(unwrap(self.model).parameters()))
        if self.dropped is not None:
            model += state_bytes([p for block in self.dropped.blocks for p in block.parameters()])
        return {"adapter_bytes": state_bytes(trainable_parameters(self.model)), "model_bytes": model,
                "cache_bytes": sum(self.frozen_cache_sizes[name] for name in self._caches())}

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

    # ------------------------------------------------------------ saving

    def save(self, out: Path, lora: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Write OUT/adapter and OUT/model (merged). `lora`: the whole LoRA weights where this process holds
        only a shard of the model (FSDP, ZeRO-3): the original model is then loaded on the CPU and they
        are put on it."""
        peft_model, dropped = self.model, self.dropped
        if lora is not None:
            peft_model, dropped = self._plain_copy_with(lora), None
        merged = save_adapter_and_merged(peft_model, dropped, self.arch.blocks_path, self.tokenizer, self.config, out)
        self.model, self.dropped = merged, None
        return merged

    def _plain_copy_with(self, lora: dict[str, torch.Tensor]) -> nn.Module:
        dtype = str(resolve_dtype(self.config.dtype, self.device)).removeprefix("torch.")
        with self.parallel.plain_loading():
            model, _ = load_model(self.config.model, dtype=dtype, device="cpu")
            peft_model = add_lora(model, find_architecture(model, self.arch.blocks_path), self.config)
        params = dict(peft_model.named_parameters())
        with torch.no_grad():
            for name, value in lora.items():
                params[name].copy_(value)
        return peft_model


def learning_rate(config: RRConfig, step: int) -> float:
    """The lr of optimizer step `step` (1-based): `lr`, or under `lr_schedule: linear` lr * (1 - (step-1)/steps)
    (docs/method-notes.md: meant to let the two terms settle late in training; on the agent recipe it did not)."""
    if config.lr_schedule == "linear":
        return config.lr * (1 - (step - 1) / config.steps)
    return config.lr


def _compiled_losses():
    """The two losses through torch.compile (dynamic shapes: every batch has its own length)."""
    return (torch.compile(losses.rerouting_loss, dynamic=True), torch.compile(losses.retain_loss, dynamic=True))


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
