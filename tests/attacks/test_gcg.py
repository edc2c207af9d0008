import pytest
import torch

from circuit_breakers.attacks._common import PrefixCache, slot_prompt, target_loss
from circuit_breakers.attacks.base import budget_of
from circuit_breakers.attacks.gcg import GCG, GCGConfig

from ..helpers import make_tiny_model


def _cfg(**kw):
    base = dict(num_steps=6, search_width=24, topk=16, batch_size=8, max_new_tokens=2,
                optim_str_init="x x x x x x", early_stop_loss=None)
    base.update(kw)
    return GCGConfig(**base)


def test_every_candidate_passes_the_filters_and_best_loss_never_increases(llama, tok, behaviors):
    seen = []
    cfg = _cfg()
    out = GCG(cfg, candidate_hook=seen.append).run(llama, tok, behaviors[:1])[0]
    assert out.attack == "gcg" and out.budget == budget_of(cfg)
    assert len(seen) == 6 and sum(len(c) for c in seen) > 0
    special = set(tok.all_special_ids)
    for batch in seen:
        for row in batch.tolist():
            assert not special & set(row)
            for i in row:
                piece = tok.decode([i])
                assert piece and piece.isascii() and piece.isprintable(), repr(piece)
            assert tok(tok.decode(row), add_special_tokens=False).input_ids == row
    best = out.extra["best_losses"]
    assert len(best) == 7  # the initial suffix's loss, then one per step
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:]))
    assert out.extra["best_loss"] == best[-1] == min(best + out.extra["losses"])
    assert best[-1] < best[0]
    assert tok(out.extra["best_string"], add_special_tokens=False).input_ids == out.extra["best_ids"]
    assert out.prompt == behaviors[0].request + " " + out.extra["best_string"]
    assert out.extra["prompt_text"].endswith(out.extra["best_string"] + "<|im_end|>\n<|im_start|>assistant\n")


def test_same_seed_same_suffix_and_early_stop(llama, tok, behaviors):
    a = GCG(_cfg(num_steps=3)).run(llama, tok, behaviors[:1])[0]
    b = GCG(_cfg(num_steps=3)).run(llama, tok, behaviors[:1])[0]
    assert a.extra["best_ids"] == b.extra["best_ids"] and a.extra["losses"] == b.extra["losses"]
    stopped = GCG(_cfg(early_stop_loss=100.0)).run(llama, tok, behaviors[:1])[0]
    assert stopped.extra["stopped_early"] and stopped.extra["steps"] == 0


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "llama+lora"])
def test_prefix_cache_losses_match_a_full_forward(kind, tok, behaviors):
    llama = make_tiny_model(kind.split("+")[0], vocab_size=len(tok), layers=2)
    if kind.endswith("lora"):
        from peft import LoraConfig, get_peft_model

        llama = get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))

    p = slot_prompt(tok, behaviors[0].request)
    suffix = tok("x x x", add_special_tokens=False).input_ids
    target = tok(behaviors[0].target, add_special_tokens=False).input_ids
    rest = torch.tensor([suffix + p.after_ids + target] * 2)
    keep = len(p.after_ids) + len(target) + 1
    cached = target_loss(PrefixCache(llama, p.prefix_ids).logits(input_ids=rest, keep=keep), torch.tensor(target))
    with torch.no_grad():
        full = llama(input_ids=torch.tensor([p.prefix_ids + suffix + p.after_ids + target])).logits
    assert torch.allclose(cached, target_loss(full, torch.tensor(target)), atol=1e-5)


def test_gcg_on_a_peft_wrapped_model(tok, behaviors):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_tiny_model("qwen2", vocab_size=len(tok), layers=2),
                           LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    out = GCG(_cfg(num_steps=2)).run(model, tok, behaviors[1:])[0]
    assert len(out.extra["best_losses"]) == 3 and out.generations[0] is not None
