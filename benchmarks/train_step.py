"""One RR optimizer step, reference-style against the project's trainer, in one process on the same items.

    python benchmarks/train_step.py --shape tiny                                  # seconds, CPU
    python benchmarks/train_step.py --shape smollm2-135m --device cpu --batch-size 4 --steps 3 --warmup 1
    python benchmarks/train_step.py --shape llama3-8b --device cuda --batch-size 16 --steps 5 --warmup 2

Both variants start from identical random weights (no download) and identical LoRA adapters whose B
matrices are perturbed (so that the losses are not the trivial L_s = 1, L_r = 0 of a fresh adapter),
see the same circuit-breaker and retain items at every step, and run interleaved (reference, trainer,
reference, trainer, ...) so that machine noise hits both alike.

* "reference": docs/method.md section 6. A circuit-breaker item is its request left-padded to 512 tokens
  plus its response right-padded to 512 (1024 in all); a retain item is left-padded to 1024 (all
  lengths times --length-scale). Two no-grad forwards with the adapter disabled (retain: every hidden
  state; circuit-breaker: the target layers), then two forwards with gradients, every one through the
  full causal LM including the LM head (logits discarded, KV cache as the model's default), losses from
  `circuit_breakers.losses` (retain: reference normalisation with reference_length = the padded length),
  one backward of the total, grad clip 1.0, AdamW. The reference's validation (two no-grad forwards of a
  padded batch, orig and LoRA, every 10th step) is amortised: both are timed after every reference step,
  outside its timed region, and a tenth of their time is added to the step time.
* "trainer": `circuit_breakers.training.RRTrainer.step` on the same indices (items padded to the longest
  in the batch, decoder only, hooks keep only the needed hidden states, gradient checkpointing "auto":
  by memory on cuda, off on cpu; the frozen-state cache off, since no item repeats here as in a first
  epoch). `--variants` adds trainers that switch one thing (TRAINER_VARIANTS), each on its own copy
  of the weights: among them "packed" and "packed-flex" (packing: true, rows of the reference's padded
  retain length; sdpa or flex_attention), and with `--compile` "compiled-blocks" (each decoder block's
  forward through torch.compile, timed as a variant of its own; its first steps compile); `--match-reference-memory` gives their checkpoint planners the activation budget
  that the reference's first step leaves, so they are compared at no more memory than it.

Items are token-id sequences with a stated length distribution (see SHAPES/`synthesise_items` and
benchmarks/README.md). Exit status 1 when the step-1 losses of the two variants disagree by more than
1e-3 relative (fp32) or 2e-2 (bf16/fp16).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import random
import resource
import statistics
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

from circuit_breakers import losses
from circuit_breakers.config import RRConfig
from circuit_breakers.data.formatting import TokenizedExample, collate
from circuit_breakers.models import find_architecture
from circuit_breakers.training import RRTrainer, batch_indices
from circuit_breakers.training.lora import add_lora, switch_off_base_dropout
from circuit_breakers.training.packing import PackingCollator

PAD_ID, BOS_ID = 0, 1
GIB = 1024 ** 3

# The model shapes (random weights). `layers` is the full model's block count; both variants get only
# blocks 0..max(target_layers), as the reference trains ("drop layers after").
SHAPES = {
    "tiny": dict(config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=1000),
                 target_layers=[2, 3]),
    "smollm2-135m": dict(config=dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                                     tie_word_embeddings=True, rope_theta=100000.0, max_position_embeddings=8192),
                         target_layers=[10, 20]),
    "llama3-8b": dict(config=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                  num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                  tie_word_embeddings=False, rope_theta=500000.0, max_position_embeddings=8192),
                      target_layers=[10, 20]),
}

# Defaults per (shape, device): (batch size, length scale, timed steps, warmup steps). The CPU ones keep
# one reference step of smollm2-135m under about a minute on 2 cores.
DEFAULTS = {
    ("tiny", "cpu"): (4, 0.25, 3, 1), ("tiny", "cuda"): (4, 0.25, 3, 1),
    ("smollm2-135m", "cpu"): (4, 0.5, 3, 1), ("smollm2-135m", "cuda"): (16, 1.0, 5, 2),
    ("llama3-8b", "cpu"): (1, 0.125, 1, 0), ("llama3-8b", "cuda"): (16, 1.0, 5, 2),
}

# The trainer's variants a run can compare (--variants): config overrides on top of the trainer's
# defaults, one model copy each. "trainer" is the default fast path; the others switch one thing.
TRAINER_VARIANTS = {
    "trainer": {},
    "ckpt-all": {"gradient_checkpointing": "true"},
    "no-ckpt": {"gradient_checkpointing": "false"},
    "joint-frozen": {"joint_frozen_pass": True},
    "compiled-loss": {"compile_loss": True},
    # Packed rows (training/packing.py) of the reference's padded retain length (1024 x --length-scale), the
    # decoder's attention as loaded (sdpa: a dense per-item mask), or flex_attention (a block mask that skips
    # the other items' blocks).
    "packed": {"packing": True},
    # packed-flex fails on CPU with torch 2.13 (inductor C++ error at the second batch shape): GPU only.
    "packed-flex": {"packing": True, "attn_implementation": "flex_attention"},
    # The trainer with each decoder block's forward through torch.compile (--compile adds it).
    "compiled-blocks": {"compile_blocks": True},
}
# Keys of TRAINER_VARIANTS that are not RRConfig keys: what the benchmark does to the variant's model.
MODEL_OPTIONS = ("attn_implementation", "compile_blocks")

FLOP_FORMULA = ("useful FLOP per step = 8 * P * N: 2*P*N for the frozen forward + 6*P*N for the forward and "
                "backward (activation and weight grads) of the grad pass, P = base parameters of the kept blocks "
                "(no embeddings, LM head, LoRA or attention-score FLOPs), N = real (non-pad) tokens of both "
                "batches; the same N for both variants, padding and recomputation earn nothing")


# ---------------------------------------------------------------- items


def synthesise_items(n: int, scale: float, vocab: int, seed: int) -> tuple[list[TokenizedExample], list[TokenizedExample]]:
    """`n` circuit-breaker and `n` retain items as token ids (docs/method.md section 6).

    Circuit-breaker: request uniform 20..80 tokens (BOS and chat tags included), response uniform
    150..450. Retain: total length log-uniform 100..1000, prompt 10-30% of it. All lengths times
    `scale`, capped to fit the reference's padding (512 + 512 and 1024, times `scale`)."""
    rng = random.Random(seed)
    half = padded_lengths(scale)[0]

    def ids(k: int, bos: bool) -> list[int]:
        return ([BOS_ID] if bos else []) + [rng.randrange(3, vocab) for _ in range(k - int(bos))]

    def scaled(lo: int, hi: int) -> int:
        return rng.randint(max(1, round(lo * scale)), max(1, round(hi * scale)))

    cb, retain = [], []
    for _ in range(n):
        request = min(max(2, scaled(20, 80)), half)
        response = min(scaled(150, 450), half)
        cb.append(TokenizedExample(tuple(ids(request, True) + ids(response, False)), request, "bench-cb"))
        total = round(math.exp(rng.uniform(math.log(100 * scale), math.log(1000 * scale))))
        total = min(max(3, total), 2 * half)
        prompt = max(2, round(total * rng.uniform(0.1, 0.3)))
        retain.append(TokenizedExample(tuple(ids(total, True)), prompt, "bench-retain"))
    return cb, retain


def padded_lengths(scale: float) -> tuple[int, int]:
    """(request/response half of a circuit-breaker item, retain length) of the reference: 512, 1024."""
    half = max(8, round(512 * scale))
    return half, 2 * half


def reference_cb_batch(items: list[TokenizedExample], half: int) -> dict[str, torch.Tensor]:
    """Request left-padded to `half`, response right-padded to `half`: (B, 2*half), pads at both ends."""
    input_ids = torch.full((len(items), 2 * half), PAD_ID, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, item in enumerate(items):
        request, response = item.input_ids[:item.response_start], item.input_ids[item.response_start:]
        start = half - len(request)
        input_ids[row, start:half + len(response)] = torch.tensor(request + response)
        mask[row, start:half + len(response)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


# ---------------------------------------------------------------- models


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A randomly initialised Llama of the shape, already truncated to blocks 0..max(target_layers)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    spec = SHAPES[shape]
    values = dict(spec["config"])
    values["num_hidden_layers"] = min(values["num_hidden_layers"], max(spec["target_layers"]) + 1)
    config = LlamaConfig(**values, pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def sync_and_perturb_lora(reference, trainer_model, std: float, seed: int) -> int:
    """Give the trainer's adapter the reference's A matrices and both the same random B (std `std`)."""
    src, dst = lora_parameters(reference), lora_parameters(trainer_model)
    if set(src) != set(dst) or not src:
        raise RuntimeError("the two variants' LoRA adapters differ in their parameter names")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in sorted(src):
            if "lora_B" in name and std > 0:
                src[name].copy_(torch.randn(src[name].shape, generator=generator) * std)
            dst[name].copy_(src[name])
    return sum(p.numel() for p in src.values())


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def resident_bytes(model, optimizer, device: torch.device) -> int:
    """Weights and optimizer state of one variant on `device` (what it holds between steps)."""
    params = [p for p in model.parameters() if p.device.type == device.type]
    states = [v for state in optimizer.state.values() for v in state.values()
              if isinstance(v, torch.Tensor) and v.device.type == device.type]
    return tensor_bytes(params) + tensor_bytes(states)


# ---------------------------------------------------------------- the reference step


class ReferenceStep:
    """docs/method.md section 6, with this project's loss functions."""

    def __init__(self, model, config: RRConfig, items_cb, items_retain, half: int, checkpointing: bool):
        self.config = config
        self.cb_items, self.retain_items = items_cb, items_retain
        self.half, self.retain_length = half, 2 * half
        self.target_layers = list(config.target_layers)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = add_lora(model, find_architecture(model), config)
        if checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.model.enable_input_require_grads()
        self.model.train()
        switch_off_base_dropout(self.model)
        self.device = next(self.model.parameters()).device
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.lr, weight_decay=config.weight_decay)

    def _move(self, batch):
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _cb_batch(self, indices):
        return self._move(reference_cb_batch([self.cb_items[i] for i in indices], self.half))

    def _retain_batch(self, indices):
        return self._move(collate([self.retain_items[i] for i in indices], PAD_ID, pad_to=self.retain_length,
                                  padding_side="left"))

    def _hidden_states(self, batch):
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                         output_hidden_states=True)
        states = out.hidden_states
        del out  # the logits are discarded, as in the reference
        return states

    def _loss(self, step: int, cb, retain) -> tuple[torch.Tensor, dict]:
        """The reference's compute_loss: its hidden states are freed when it returns, before backward."""
        config, model, layers = self.config, self.model, self.target_layers
        c_s, c_r = losses.rr_coefficients(step, config.alpha, config.denominator)
        with model.disable_adapter():
            model.eval()
            with torch.no_grad():
                orig_retain = dict(enumerate(self._hidden_states(retain))) if c_r > 0 else None
                if c_s > 0:
                    states = self._hidden_states(cb)
                    orig_cb = {l: states[l] for l in layers}
                    del states
        model.train()
        loss = torch.zeros((), device=self.device)
        record = {"step": step, "c_s": c_s, "c_r": c_r, "rerouting_loss": None, "retain_loss": None}
        if c_r > 0:
            lora_retain = dict(enumerate(self._hidden_states(retain)))
            entries = list(range(len(lora_retain)))
            retain_loss = losses.retain_loss(lora_retain, orig_retain, retain["attention_mask"], entries,
                                             normalization="reference", reference_length=self.retain_length)
            loss = loss + c_r * retain_loss
            record["retain_loss"] = retain_loss.detach()
        if c_s > 0:
            states = self._hidden_states(cb)
            rerouting = losses.rerouting_loss({l: states[l] for l in layers}, orig_cb, cb["attention_mask"], layers)
            loss = loss + c_s * rerouting
            record["rerouting_loss"] = rerouting.detach()
        return loss, record

    def step(self, step: int, cb_indices, retain_indices) -> dict:
        loss, record = self._loss(step, self._cb_batch(cb_indices), self._retain_batch(retain_indices))
        loss.backward()
        del loss
        torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: (float(v) if isinstance(v, torch.Tensor) else v) for k, v in record.items()}

    def validation(self, retain_indices) -> None:
        """The reference's every-10th-step validation: orig and LoRA no-grad forwards of a padded batch."""
        batch = self._retain_batch(retain_indices)
        with torch.no_grad():
            with self.model.disable_adapter():
                self.model.eval()
                self._hidden_states(batch)
            self.model.train()
            self._hidden_states(batch)


# ---------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _proc_status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


MEMORY_METHOD = {
    "cuda": ("per step: torch.cuda.max_memory_allocated minus what was allocated before the step, plus the "
             "variant's own weights and optimizer state (the other variant's model, also resident, not counted)"),
    "cpu": ("per step: growth of the process's peak RSS during the step (VmHWM reset through /proc/self/clear_refs "
            "after malloc_trim) plus the variant's own weights and optimizer state; approximate, the allocator "
            "may keep freed memory resident"),
}


class MemoryProbe:
    """Peak memory of one step: the variant's resident bytes plus what the step added at its peak
    (MEMORY_METHOD says how, per device). `process_peak` is the whole process's peak over the run (both
    variants' models included): peak allocated on cuda, peak RSS (VmHWM) on cpu."""

    def __init__(self, device: torch.device):
        self.device = device
        self.process_peak = 0
        self.cpu_peak_reset = device.type == "cpu" and self._reset_hwm()

    def _reset_hwm(self) -> bool:
        self._note_process_peak()  # the reset forgets the peak so far (ru_maxrss too)
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return _proc_status_kib("VmHWM") is not None
        except OSError:
            return False

    def _note_process_peak(self) -> None:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            hwm = _proc_status_kib("VmHWM")
            peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.process_peak = max(self.process_peak, peak)

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._note_process_peak()
            self.before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_peak_reset:
            _release_free_heap()
            self._reset_hwm()
            self.before = _proc_status_kib("VmRSS") * 1024
        else:
            self.before = 0

    def added(self) -> int | None:
        """Bytes the step added at its peak."""
        self._note_process_peak()
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.before
        if self.cpu_peak_reset:
            return max(0, _proc_status_kib("VmHWM") * 1024 - self.before)
        return None


@dataclass
class Variant:
    name: str
    run: object  # step(step, cb_indices, retain_indices) -> record
    model: object
    optimizer: object
    extra: object = None  # untimed work whose time is amortised into the step (reference validation)
    trainer: object = None


def compile_blocks(arch) -> None:
    """Each decoder block's forward through torch.compile (dynamic shapes). The forward, not the module's
    __call__: the trainer's hidden-state hooks and per-block gradient checkpointing stay outside the graph."""
    for block in arch.blocks:
        block.forward = torch.compile(block.forward, dynamic=True)


def match_reference_memory(variants: list[Variant], reference_peak: int, device: torch.device) -> None:
    """Give each trainer's checkpoint planner the activation budget that keeps its step's peak under
    the reference's (its own weights and optimizer state out of it, then a 10% margin for the
    frozen states and the allocator)."""
    for v in variants:
        planner = getattr(v.trainer, "checkpoint_planner", None)
        if planner is not None:
            planner.budget = 0.9 * (reference_peak - resident_bytes(v.model, v.optimizer, device))


def _quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


# ---------------------------------------------------------------- the benchmark


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    parser.add_argument("--batch-size", type=int, default=None, help="items per set per step (default per shape/device)")
    parser.add_argument("--length-scale", type=float, default=None,
                        help="scales the item lengths and the reference's padding (512+512, 1024); default per shape/device")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-dropout", type=float, default=0.0,
                        help="LoRA dropout of both variants (0 so that their losses can be compared; reference: 0.05)")
    parser.add_argument("--lora-b-std", type=float, default=1e-2, help="std of the random LoRA B matrices (0: zero B)")
    parser.add_argument("--group-by-length", action="store_true",
                        help="draw both variants' batches with the trainer's length grouping (default: random batches)")
    parser.add_argument("--gradient-checkpointing", choices=["auto", "on", "off"], default="auto",
                        help="the reference's; auto: on for cuda (as the reference), off on cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's own); 1 avoids spin-waiting on a busy machine")
    parser.add_argument("--variants", default="trainer",
                        help="comma-separated trainer variants to time against the reference: "
                             + ", ".join(f"{k} {v or '(defaults)'}" for k, v in TRAINER_VARIANTS.items()))
    parser.add_argument("--match-reference-memory", action="store_true",
                        help="cuda: give auto checkpointing the activation budget the reference's first step "
                             "peak leaves (less 10%%), so that the variants run at no more memory than it")
    parser.add_argument("--compile", action="store_true",
                        help="also time the compiled-blocks variant: the trainer with each decoder block's forward "
                             "through torch.compile (dynamic shapes), measured on its own")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    return parser


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    args = copy.copy(args)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    batch, scale, steps, warmup = DEFAULTS[(args.shape, args.device)]
    args.batch_size = args.batch_size or batch
    args.length_scale = args.length_scale or scale
    args.steps = args.steps if args.steps is not None else steps
    args.warmup = args.warmup if args.warmup is not None else warmup
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.steps < 1 or args.warmup < 0 or args.batch_size < 1 or args.length_scale <= 0:
        raise SystemExit("need --steps >= 1, --warmup >= 0, --batch-size >= 1 and --length-scale > 0")
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.compile and "compiled-blocks" not in args.variants:
        args.variants.append("compiled-blocks")
    unknown = [v for v in args.variants if v not in TRAINER_VARIANTS]
    if unknown or not args.variants:
        raise SystemExit(f"--variants: unknown {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(TRAINER_VARIANTS)}")
    return args


def benchmark(args: argparse.Namespace) -> dict:
    """Run both variants interleaved; return the results (rows, ratios, loss check, settings)."""
    args = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    spec = SHAPES[args.shape]
    layers = list(spec["target_layers"])
    half, retain_length = padded_lengths(args.length_scale)
    n_steps = args.warmup + args.steps
    n_items = args.batch_size * n_steps
    cb_items, retain_items = synthesise_items(n_items, args.length_scale, spec["config"]["vocab_size"], args.seed)
    if args.group_by_length:
        cb_draw = batch_indices([x.length for x in cb_items], args.batch_size, args.seed)
        retain_draw = batch_indices([x.length for x in retain_items], args.batch_size, args.seed + 1)
        schedule = [(next(cb_draw), next(retain_draw)) for _ in range(n_steps)]
    else:
        schedule = [(list(range(k * args.batch_size, (k + 1) * args.batch_size)),) * 2 for k in range(n_steps)]

    checkpointing = (device.type == "cuda" if args.gradient_checkpointing == "auto"  # as the trainer's "auto"
                     else args.gradient_checkpointing == "on")
    config = RRConfig(model="bench", target_layers=layers, batch_size=args.batch_size, lora_dropout=args.lora_dropout,
                      dtype=args.dtype, device=args.device, full_layers=False, reference_length=retain_length,
                      retain_normalization="reference", gradient_checkpointing="true" if checkpointing else "false",
                      seed=args.seed, frozen_cache_gb=0.0)  # every item is new here, as in a first epoch

    started = time.perf_counter()
    base = build_model(args.shape, device, dtype, args.seed)
    twins = [copy.deepcopy(base) for _ in args.variants]
    arch = find_architecture(base)
    block_params = sum(p.numel() for block in arch.blocks for p in block.parameters())
    reference = ReferenceStep(base, config, cb_items, retain_items, half, checkpointing)
    tokenizer = types.SimpleNamespace(pad_token_id=PAD_ID, chat_template=None)
    # The trainer's own checkpointing default ("auto": by memory on cuda, off on cpu) unless a variant says.
    trainer_defaults = {**config.to_dict(), "gradient_checkpointing": "auto"}
    variants = [Variant("reference", reference.step, reference.model, reference.optimizer, reference.validation)]
    failed: dict[str, str] = {}  # variant -> why it stopped
    for name, twin in zip(args.variants, twins):
        overrides = {k: v for k, v in TRAINER_VARIANTS[name].items() if k not in MODEL_OPTIONS}
        options = {k: v for k, v in TRAINER_VARIANTS[name].items() if k in MODEL_OPTIONS}
        if overrides.get("packing"):  # rows as long as the reference's padded retain items
            overrides.update(max_length=retain_length, pack_length=retain_length)
        try:  # a variant that cannot run here (e.g. flex_attention on this torch's CPU) is reported, not fatal
            if "attn_implementation" in options:
                twin.set_attn_implementation(options["attn_implementation"])
            trainer_config = RRConfig.from_dict({**trainer_defaults, **overrides})
            trainer = RRTrainer(trainer_config, model=twin, tokenizer=tokenizer, circuit_breaker_items=cb_items,
                                retain_items=retain_items, progress=False)
        except Exception as err:
            failed[name] = _failure(err, "set-up")
            continue
        lora_count = sync_and_perturb_lora(reference.model, trainer.model, args.lora_b_std, args.seed + 1)
        if options.get("compile_blocks"):
            compile_blocks(trainer.arch)
        variants.append(Variant(name, trainer.step, trainer.model, trainer.optimizer, trainer=trainer))
    del twins
    # Lazy imports and first-call set-up inside transformers and peft take seconds on the first forward:
    # one short no-grad forward of each model, outside any timing, pays them.
    with torch.no_grad():
        prime = torch.tensor([[BOS_ID, 5, 6, 7]], device=device)
        for v in variants:
            v.model(input_ids=prime, attention_mask=torch.ones_like(prime), use_cache=False)
    setup_s = time.perf_counter() - started

    probe = MemoryProbe(device)
    samples = {v.name: {"time": [], "memory": [], "records": []} for v in variants}
    real_tokens, trainer_positions, packed_positions = [], [], []
    packer = PackingCollator(PAD_ID, retain_length)
    for k, (cb_idx, retain_idx) in enumerate(schedule):
        step = k + 1
        real_tokens.append(sum(cb_items[i].length for i in cb_idx) + sum(retain_items[i].length for i in retain_idx))
        trainer_positions.append(len(cb_idx) * max(cb_items[i].length for i in cb_idx)
                                 + len(retain_idx) * max(retain_items[i].length for i in retain_idx))
        packed_positions.append(sum(packer([items[i] for i in idx])["input_ids"].numel()
                                    for items, idx in ((cb_items, cb_idx), (retain_items, retain_idx))))
        for v in variants:
            if v.name in failed:
                continue
            resident = resident_bytes(v.model, v.optimizer, device)
            # Untimed: collect the previous variant's garbage and start from an empty allocator cache.
            # On the H200 the variant timed right after the reference ran up to 2.8x slower whichever it
            # was (benchmarks/RESULTS.md); this is meant to remove that, and is not verified on a GPU yet.
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            probe.start()
            _sync(device)
            t0 = time.perf_counter()
            try:
                record = v.run(step, cb_idx, retain_idx)
            except Exception as err:
                if v.name == "reference":
                    raise
                failed[v.name] = _failure(err, f"step {step}")
                continue
            _sync(device)
            elapsed = time.perf_counter() - t0
            added = probe.added()
            if v.extra is not None:
                _sync(device)
                t1 = time.perf_counter()
                v.extra(retain_idx)
                _sync(device)
                elapsed += (time.perf_counter() - t1) / 10
            if v.name == "reference" and k == 0 and args.match_reference_memory and added is not None:
                match_reference_memory(variants[1:], resident + added, device)
            samples[v.name]["records"].append({k2: record.get(k2) for k2 in
                                               ("step", "rerouting_loss", "retain_loss", "blocks_without_checkpointing")})
            if k >= args.warmup:
                samples[v.name]["time"].append(elapsed)
                samples[v.name]["memory"].append(None if added is None else resident + added)

    timed_tokens = real_tokens[args.warmup:]
    flops_per_token = 8 * block_params
    rows = []
    for v in variants:
        if v.name in failed:
            continue
        times = samples[v.name]["time"]
        q1, q3 = _quantiles(times)
        tokens_per_s = statistics.median(n / t for n, t in zip(timed_tokens, times))  # robust to one slow step
        memory = [m for m in samples[v.name]["memory"] if m is not None]
        first = samples[v.name]["records"][0]
        rows.append({
            "variant": v.name, "step_s_median": statistics.median(times), "step_s_q1": q1, "step_s_q3": q3,
            "step_s_min": min(times), "step_s_max": max(times), "step_times_s": times,
            "real_tokens_per_s": tokens_per_s, "peak_memory_gib": max(memory) / GIB if memory else None,
            "useful_tflops": flops_per_token * tokens_per_s / 1e12,
            "rerouting_loss_step1": first["rerouting_loss"], "retain_loss_step1": first["retain_loss"],
            "losses_per_step": samples[v.name]["records"],
        })
    tolerance = 1e-3 if dtype == torch.float32 else 2e-2
    ref_row = rows[0]
    for row in rows[1:]:
        row["ratio_real_tokens_per_s"] = row["real_tokens_per_s"] / ref_row["real_tokens_per_s"]
        row["ratio_peak_memory"] = (row["peak_memory_gib"] / ref_row["peak_memory_gib"]
                                    if ref_row["peak_memory_gib"] and row["peak_memory_gib"] else None)
        row["loss_check"] = loss_check(ref_row, row, tolerance, checked=args.lora_dropout == 0.0)
    if len(rows) < 2:
        raise SystemExit(f"no trainer variant ran: {failed}")
    fast_row = rows[1]
    ratios = {"real_tokens_per_s": fast_row["ratio_real_tokens_per_s"], "peak_memory": fast_row["ratio_peak_memory"]}
    check = {**fast_row["loss_check"], "agree": (all(r["loss_check"]["agree"] for r in rows[1:])
                                                 if args.lora_dropout == 0.0 else None)}

    return {
        "shape": args.shape, "device": args.device, "device_name": _device_name(device), "dtype": args.dtype,
        "settings": {"batch_size": args.batch_size, "length_scale": args.length_scale, "steps": args.steps,
                     "warmup": args.warmup, "seed": args.seed, "target_layers": layers,
                     "kept_blocks": arch.num_blocks, "lora_dropout": args.lora_dropout, "lora_b_std": args.lora_b_std,
                     "group_by_length": args.group_by_length, "gradient_checkpointing": checkpointing,
                     "reference_padding": {"circuit_breaker": [half, half], "retain": retain_length},
                     "block_params": block_params, "lora_params": lora_count,
                     "mean_real_tokens_per_step": statistics.mean(timed_tokens), "real_tokens_per_step": real_tokens,
                     "reference_padded_tokens_per_step": args.batch_size * 2 * retain_length,
                     "trainer_padded_tokens_per_step": statistics.mean(trainer_positions[args.warmup:]),
                     "packed_positions_per_step": statistics.mean(packed_positions[args.warmup:]),
                     "validation": "the reference's 2 no-grad validation forwards every 10th step, amortised (1/10 "
                                   "of their time added to each step)",
                     "setup_s": setup_s},
        "flop_formula": FLOP_FORMULA,
        "memory_method": MEMORY_METHOD[device.type] if device.type == "cuda" or probe.cpu_peak_reset
                         else "cpu: per-step peak unavailable (/proc/self/clear_refs not writable)",
        "process_peak_memory_gib": probe.process_peak / GIB,
        "rows": [{k: v for k, v in row.items()} for row in rows],
        "ratios_trainer_over_reference": ratios,  # of the first trainer variant
        "loss_check": check,
        "failed_variants": failed,
    }


def _failure(err: Exception, where: str) -> str:
    import traceback
    traceback.print_exc()
    return f"{where}: {type(err).__name__}: {str(err).strip().splitlines()[0][:300] if str(err).strip() else ''}"


def loss_check(ref_row: dict, row: dict, tolerance: float, *, checked: bool) -> dict:
    """Step-1 and all-step relative differences of both losses between the reference and a variant."""
    check = {"tolerance_relative": tolerance, "checked": checked}
    for key in ("rerouting_loss", "retain_loss"):
        diffs = [_relative(r[key], t[key]) for r, t in zip(ref_row["losses_per_step"], row["losses_per_step"])
                 if r[key] is not None and t[key] is not None]
        check[f"{key}_step1_relative_diff"] = diffs[0] if diffs else None
        check[f"{key}_max_relative_diff_all_steps"] = max(diffs) if diffs else None
    check["agree"] = all(check[f"{key}_step1_relative_diff"] is not None
                         and check[f"{key}_step1_relative_diff"] <= tolerance
                         for key in ("rerouting_loss", "retain_loss")) if checked else None
    return check


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform
    return f"{platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"


def format_table(result: dict) -> str:
    s = result["settings"]
    lines = [f"RR train step, shape {result['shape']} ({s['kept_blocks']} blocks kept, target layers "
             f"{s['target_layers']}), {result['device_name']}, {result['dtype']}, batch {s['batch_size']}+"
             f"{s['batch_size']}, length scale {s['length_scale']}, {s['steps']} timed steps after {s['warmup']} "
             f"warmup, reference gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}",
             f"real tokens per step {s['mean_real_tokens_per_step']:.0f}; positions computed per step: reference "
             f"{s['reference_padded_tokens_per_step']} (fixed padding), trainer {s['trainer_padded_tokens_per_step']:.0f} "
             f"(each batch padded to its longest item), packed variants {s['packed_positions_per_step']:.0f} (rows of "
             f"{s['reference_padding']['retain']})",
             "",
             f"{'variant':<16} {'step s median':>13} {'[min, max]':>18} {'real tok/s':>11} {'x ref':>6} "
             f"{'peak GiB':>9} {'x ref':>6} {'TFLOP/s':>8} {'L_s step1':>11} {'L_r step1':>11} {'loss check':>10} "
             f"{'no-ckpt blocks':>14}"]
    for r in result["rows"]:
        mem = f"{r['peak_memory_gib']:.2f}" if r["peak_memory_gib"] is not None else "n/a"
        speed = f"{r['ratio_real_tokens_per_s']:.2f}" if "ratio_real_tokens_per_s" in r else "1"
        mem_ratio = (f"{r['ratio_peak_memory']:.2f}" if r.get("ratio_peak_memory") is not None
                     else ("1" if "loss_check" not in r else "n/a"))
        check = r.get("loss_check")
        verdict = "-" if check is None else ("n/a" if not check["checked"] else ("OK" if check["agree"] else "DISAGREE"))
        blocks = sorted({x["blocks_without_checkpointing"] for x in r["losses_per_step"]
                         if x.get("blocks_without_checkpointing") is not None})
        lines.append(f"{r['variant']:<16} {r['step_s_median']:>13.3f} "
                     f"{'[%.3f, %.3f]' % (r['step_s_min'], r['step_s_max']):>18} {r['real_tokens_per_s']:>11.0f} "
                     f"{speed:>6} {mem:>9} {mem_ratio:>6} {r['useful_tflops']:>8.3f} "
                     f"{_fmt(r['rerouting_loss_step1']):>11} {_fmt(r['retain_loss_step1']):>11} {verdict:>10} "
                     f"{(f'{blocks[0]}-{blocks[-1]}' if blocks else '-'):>14}")
    ratios = result["ratios_trainer_over_reference"]
    mem_ratio = f"{ratios['peak_memory']:.2f}x" if ratios["peak_memory"] is not None else "n/a"
    check = result["loss_check"]
    first = result["rows"][1]["variant"]
    lines += ["", f"{first} / reference: real tokens/s {ratios['real_tokens_per_s']:.2f}x, peak memory {mem_ratio}"]
    if check["checked"]:
        lines.append(f"loss agreement at step 1 (before the update), {first}: rerouting rel. diff "
                     f"{check['rerouting_loss_step1_relative_diff']:.2e}, retain rel. diff "
                     f"{check['retain_loss_step1_relative_diff']:.2e} (tolerance {check['tolerance_relative']:.0e}); "
                     f"all variants: {'OK' if check['agree'] else 'DISAGREE'}; max over all steps "
                     f"{check['rerouting_loss_max_relative_diff_all_steps']:.2e} / "
                     f"{check['retain_loss_max_relative_diff_all_steps']:.2e}")
    else:
        lines.append("loss agreement not checked (LoRA dropout > 0 draws different masks in each variant)")
    lines += [f"variant {name} FAILED ({why})" for name, why in result.get("failed_variants", {}).items()]
    lines += [f"FLOPs: {result['flop_formula']}",
              f"memory: {result['memory_method']}. Whole process, every variant's model included: peak "
              f"{'allocated' if result['device'] == 'cuda' else 'RSS'} {result['process_peak_memory_gib']:.2f} GiB.",
              f"the reference step time includes {s['validation']}."]
    return "\n".join(lines)


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.6g}"


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    result = benchmark(args)
    print(format_table(result), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 1 if result["loss_check"]["agree"] is False or result["failed_variants"] else 0


if __name__ == "__main__":
    sys.exit(main())
