"""One RR training step on a vision-language model at LLaVA-NeXT-Mistral-7B's shape (random weights).

    python benchmarks/vlm_step.py --tiny                      # seconds, CPU: a reduced shape
    python benchmarks/vlm_step.py --device cuda --batch-size 4 --steps 3 --warmup 1

The paper's multimodal set-up (docs/method.md 9): RR on the language model only, vision tower and
projector frozen, alpha 5, rerouting loss at hidden-state entry 16; LoRA (r 16, alpha 16, q,k,v,o,gate,
up,down) on the language blocks 0..16 as this project trains (`training.lora.add_lora`), the blocks
above 16 dropped (`--full-layers` keeps them). The model is built from its config (LLaVA-NeXT: CLIP
ViT-L/14-336, anyres grid, Mistral-7B text model), bf16 on cuda, fp32 on cpu; no download.

A step, on a circuit-breaker batch and a retain batch of image + text items (one 672x672 image each:
5 views of 336 pixels, 2,928 image tokens, plus `--text-tokens` of text):
frozen forward (adapter disabled, no grad) and LoRA forward of each batch through the multimodal
decoder (vision tower, projector, language blocks; no LM head), rerouting loss (entry 16, over the
tokens after the image) and retain loss (every kept entry, masked mean), one backward, grad clip 1.0,
AdamW. Gradient checkpointing of the language blocks on cuda (the paper's setting), off on cpu.
Prints the median step time and the peak memory (cuda: max allocated; cpu: peak RSS of the process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from circuit_breakers import losses
from circuit_breakers.atomic import atomic_write_text
from circuit_breakers.config import RRConfig
from circuit_breakers.hidden import decoder_hidden_states
from circuit_breakers.models import drop_blocks_after, find_architecture
from circuit_breakers.training.lora import add_lora, switch_off_base_dropout

GIB = 1024 ** 3
BOS_ID = 1

# LLaVA-NeXT-Mistral-7B (llava-hf/llava-v1.6-mistral-7b-hf) and a reduced shape for CPU tests.
SHAPES = {
    "llava-next-mistral-7b": dict(
        text=dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32064, rope_theta=1000000.0, max_position_embeddings=32768,
                  sliding_window=None, tie_word_embeddings=False),
        vision=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                    image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu"),
        grid=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]], image_token=32000,
        image_size=672, text_tokens=256, target_layer=16),
    "tiny": dict(
        text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024, sliding_window=None,
                  tie_word_embeddings=False),
        vision=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    image_size=28, patch_size=14, projection_dim=32),
        grid=[[28, 56], [56, 28], [56, 56]], image_token=500, image_size=56, text_tokens=24, target_layer=3),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    """A randomly initialised LlavaNextForConditionalGeneration of the shape, on `device` in `dtype`."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration, MistralConfig

    spec = SHAPES[shape]
    config = LlavaNextConfig(vision_config=CLIPVisionConfig(**spec["vision"]).to_dict(),
                             text_config=MistralConfig(**spec["text"], pad_token_id=0, bos_token_id=BOS_ID,
                                                       eos_token_id=2).to_dict(),
                             image_grid_pinpoints=spec["grid"], image_token_index=spec["image_token"],
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             projector_hidden_act="gelu")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlavaNextForConditionalGeneration._from_config(config, dtype=dtype)
    return model


def image_inputs(model, shape: str, batch: int, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    """Random pixel views of `batch` square images (the anyres layout the processor would make) and the
    number of image tokens one of them takes, found by running the frozen vision part once."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    spec = SHAPES[shape]
    side, view = spec["image_size"], spec["vision"]["image_size"]
    views = image_size_to_num_patches((side, side), spec["grid"], view)
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn((batch, views, 3, view, view), generator=generator).to(device, dtype)
    sizes = torch.tensor([[side, side]] * batch, device=device)
    config = model.config
    with torch.no_grad():
        features = model.model.get_image_features(pixels[:1], sizes[:1], vision_feature_layer=config.vision_feature_layer,
                                                  vision_feature_select_strategy=config.vision_feature_select_strategy)
    pooled = features.pooler_output
    tokens = (pooled[0] if isinstance(pooled, (list, tuple)) else pooled).shape[0]
    return {"pixel_values": pixels, "image_sizes": sizes, "image_tokens": tokens}


def token_batch(shape: str, batch: int, image_tokens: int, text_tokens: int, device: torch.device, seed: int):
    """(input_ids, attention_mask, response_mask): BOS, a quarter of the text, the image tokens, the rest of
    the text; the response mask covers the text after the image (what RR reroutes)."""
    spec = SHAPES[shape]
    before = text_tokens // 4
    after = text_tokens - before
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, spec["text"]["vocab_size"] - 64, (batch, text_tokens), generator=generator)
    image = torch.full((batch, image_tokens), spec["image_token"])
    ids = torch.cat([torch.full((batch, 1), BOS_ID), text[:, :before], image, text[:, before:]], dim=1)
    response = torch.zeros_like(ids, dtype=torch.bool)
    response[:, -after:] = True
    return ids.to(device), torch.ones_like(ids).to(device), response.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a reduced shape (CPU, seconds) instead of LLaVA-NeXT-Mistral-7B")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda or cpu")
    p.add_argument("--batch-size", type=int, default=None, help="items per batch, each of the two (default 4 cuda, 1 cpu)")
    p.add_argument("--text-tokens", type=int, default=None, help="text tokens per item besides the image's")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3, tiny 1)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1, tiny 0)")
    p.add_argument("--full-layers", action="store_true", help="keep the language blocks above the target layer")
    p.add_argument("--gradient-checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="of the language blocks; auto: on for cuda, off for cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the result here too")
    return p


def benchmark(args: argparse.Namespace) -> dict:
    shape = "tiny" if args.tiny else "llava-next-mistral-7b"
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    batch = args.batch_size or (4 if device.type == "cuda" else 1)
    steps = args.steps if args.steps is not None else (1 if args.tiny else 3)
    warmup = args.warmup if args.warmup is not None else (0 if args.tiny else 1)
    text_tokens = args.text_tokens or SHAPES[shape]["text_tokens"]
    layer = SHAPES[shape]["target_layer"]
    checkpointing = args.gradient_checkpointing == "on" or (args.gradient_checkpointing == "auto" and device.type == "cuda")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    started = time.perf_counter()
    model = build_model(shape, device, dtype, args.seed)
    build_s = time.perf_counter() - started
    config = RRConfig(target_layers=[layer], alpha=5.0, lora_dropout=0.0)
    if not args.full_layers:
        drop_blocks_after(model, config.kept_blocks)
    model = add_lora(model, find_architecture(model), config)
    switch_off_base_dropout(model)
    arch = find_architecture(model)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.0)

    images = image_inputs(model, shape, batch, device, dtype, args.seed)
    batches = {name: token_batch(shape, batch, images["image_tokens"], text_tokens, device, args.seed + i)
               for i, name in enumerate(("circuit_breaker", "retain"))}
    pixels = {"pixel_values": images["pixel_values"], "image_sizes": images["image_sizes"]}
    retain_entries = list(range(arch.num_blocks + 1))

    def step(number: int) -> dict:
        c_s, c_r = losses.rr_coefficients(number, config.alpha, 300)
        cb_ids, cb_mask, cb_response = batches["circuit_breaker"]
        r_ids, r_mask, _ = batches["retain"]
        with torch.no_grad(), model.disable_adapter():
            orig_cb = decoder_hidden_states(arch, cb_ids, cb_mask, [layer], **pixels)
            orig_r = decoder_hidden_states(arch, r_ids, r_mask, retain_entries, **pixels)
        lora_cb = decoder_hidden_states(arch, cb_ids, cb_mask, [layer], **pixels)
        rerouting = losses.rerouting_loss(lora_cb, orig_cb, cb_response, [layer])
        lora_r = decoder_hidden_states(arch, r_ids, r_mask, retain_entries, **pixels)
        retain = losses.retain_loss(lora_r, orig_r, r_mask, retain_entries, normalization="masked_mean")
        total = c_s * rerouting + c_r * retain
        total.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {"rerouting_loss": rerouting.item(), "retain_loss": retain.item(), "loss": total.item()}

    times, trace = [], []
    for number in range(1, warmup + steps + 1):
        _sync(device)
        t0 = time.perf_counter()
        trace.append(step(number))
        _sync(device)
        if number > warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak, how = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        peak, how = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS of the process"
    base = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    return {
        "shape": shape, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).removeprefix("torch."), "batch_size_each": batch, "image_tokens": images["image_tokens"],
        "image_views": int(images["pixel_values"].shape[1]), "text_tokens": text_tokens,
        "sequence_length": int(batches["retain"][0].shape[1]), "target_layer": layer, "kept_blocks": arch.num_blocks,
        "gradient_checkpointing": checkpointing, "base_parameters": base,
        "lora_parameters": sum(p.numel() for p in trainable), "build_s": build_s, "warmup": warmup, "steps": steps,
        "step_s": times, "step_s_median": statistics.median(times) if times else None,
        "peak_memory_bytes": peak, "peak_memory_method": how, "trace": trace,
    }


def format_result(r: dict) -> str:
    return "\n".join([
        f"{r['shape']} on {r['device']} ({r['dtype']}): {r['kept_blocks']} language blocks kept, "
        f"{r['base_parameters'] / 1e9:.2f}B base + {r['lora_parameters'] / 1e6:.1f}M LoRA parameters",
        f"batch {r['batch_size_each']} circuit-breaker + {r['batch_size_each']} retain items of "
        f"{r['sequence_length']} tokens ({r['image_tokens']} image tokens from {r['image_views']} views), "
        f"gradient checkpointing {'on' if r['gradient_checkpointing'] else 'off'}",
        f"step time: median {r['step_s_median']:.3f} s over {r['steps']} step(s) ({r['warmup']} warm-up)",
        f"peak memory: {r['peak_memory_bytes'] / GIB:.2f} GiB ({r['peak_memory_method']})",
        f"losses (last step): rerouting {r['trace'][-1]['rerouting_loss']:.4f}, retain {r['trace'][-1]['retain_loss']:.4f}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if args.steps is not None and args.steps < 1:
        print("--steps must be at least 1", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    result = benchmark(args)
    print(format_result(result))
    if args.json:
        atomic_write_text(Path(args.json), json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
