"""One process of the data-parallel tests (tests/training/test_parallel.py, tests/training/test_zero.py); also the
single-process reference, imported by the test. Not collected by pytest (no test_ prefix).

    python -m torch.distributed.run --nproc_per_node 2 tests/training/distributed_worker.py MODEL_DIR OUT GRAD_ACCUM [--save [--resume]]
    accelerate launch --config_file CONFIG --num_processes 2 tests/training/distributed_worker.py ...   (DeepSpeed)
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

STEPS = 3
BATCH_SIZE = 8  # the global batch per optimizer step, from each set


def run(model_dir: Path, grad_accum: int, out: Path | None = None, resume: bool = False
        ) -> tuple[dict[str, torch.Tensor], list[dict], int]:
    """Train the tiny model STEPS steps (into `out`, checkpointing every 2 steps, if given; with `resume`,
    from the newest checkpoint there); returns (LoRA weights, log, this process's rank)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuit_breakers.training import trainer as training
    from circuit_breakers.config import RRConfig
    from tests.helpers import tokenized_items

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = RRConfig(model=str(model_dir), target_layers=[2, 3], steps=STEPS, batch_size=BATCH_SIZE,
                      grad_accum=grad_accum, lr=1e-3, lora_dropout=0.0, max_length=64, save_every=2)

    # Start from B != 0 (as test_grad_accum_matches_one_big_batch does): at B = 0 the first gradient is
    # rounding noise, which Adam would amplify into updates whose sign depends on summation order. Set
    # as the adapter is made, before any sharding or engine copies the weights.
    def add_lora_with_nonzero_b(*args, **kwargs):
        peft_model = add_lora(*args, **kwargs)
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        return peft_model
    add_lora, training.add_lora = training.add_lora, add_lora_with_nonzero_b
    try:
        trainer = training.RRTrainer(config, model=model, tokenizer=tokenizer,
                                     circuit_breaker_items=tokenized_items(tokenizer, 12, harmful=True),
                                     retain_items=tokenized_items(tokenizer, 12, harmful=False), progress=False)
    finally:
        training.add_lora = add_lora
    log = trainer.train(out, resume=resume or None).log
    if out is not None:  # the saved adapter (under FSDP and ZeRO-3, gathered from every process's shard)
        from safetensors.torch import load_file
        weights = load_file(out / "adapter" / "adapter_model.safetensors") if trainer.dist.is_main else {}
    else:
        weights = trainer.parallel.full_lora_state(trainer.model) or {
            n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    rank = trainer.dist.rank
    trainer.dist.close()
    return weights, log, rank


if __name__ == "__main__":
    model_dir, out, grad_accum = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    weights, log, rank = run(model_dir, grad_accum, out / "run" if "--save" in sys.argv else None,
                             resume="--resume" in sys.argv)
    torch.save({"weights": weights, "log": log, "world_size": int(__import__("os").environ["WORLD_SIZE"])},
               out / f"rank{rank}.pt")
