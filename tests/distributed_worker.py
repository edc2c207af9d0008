"""One process of the data-parallel test (tests/test_distributed.py), started by torchrun; also the
single-process reference, imported by the test. Not collected by pytest (no test_ prefix).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py MODEL_DIR OUT GRAD_ACCUM [--save]
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

STEPS = 3
BATCH_SIZE = 8  # the global batch per optimizer step, from each set


def run(model_dir: Path, grad_accum: int, out: Path | None = None) -> tuple[dict[str, torch.Tensor], list[dict], int]:
    """Train the tiny model STEPS steps (into `out`, checkpointing every 2 steps, if given); returns
    (LoRA weights, log, this process's rank)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from circuit_breakers.config import RRConfig
    from circuit_breakers.training import RRTrainer
    from tests.test_training import _items

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = RRConfig(model=str(model_dir), target_layers=[2, 3], steps=STEPS, batch_size=BATCH_SIZE,
                      grad_accum=grad_accum, lr=1e-3, lora_dropout=0.0, max_length=64, save_every=2)
    trainer = RRTrainer(config, model=model, tokenizer=tokenizer,
                        circuit_breaker_items=_items(tokenizer, 12, harmful=True),
                        retain_items=_items(tokenizer, 12, harmful=False), progress=False)
    # Start from B != 0 (as test_grad_accum_matches_one_big_batch does): at B = 0 the first gradient is
    # rounding noise, which Adam would amplify into updates whose sign depends on summation order.
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                value = torch.randn(p.shape, generator=g) * 0.05
                if hasattr(p, "device_mesh"):  # sharded (FSDP): this process's part of it
                    from torch.distributed.tensor import distribute_tensor
                    value = distribute_tensor(value, p.device_mesh, p.placements)
                p.copy_(value)
    log = trainer.train(out).log
    if out is not None:  # the saved adapter (under FSDP, gathered from every process's shard)
        from safetensors.torch import load_file
        saved = load_file(out / "adapter" / "adapter_model.safetensors") if trainer.dist.is_main else {}
        return saved, log, trainer.dist.rank
    weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for n, p in trainer.model.named_parameters() if "lora_" in n}
    return weights, log, trainer.dist.rank


if __name__ == "__main__":
    model_dir, out, grad_accum = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    weights, log, rank = run(model_dir, grad_accum, out / "run" if "--save" in sys.argv else None)
    torch.save({"weights": weights, "log": log, "world_size": int(__import__("os").environ["WORLD_SIZE"])},
               out / f"rank{rank}.pt")
