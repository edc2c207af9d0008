import torch

from circuit_breakers.attacks.base import budget_of
from circuit_breakers.attacks.embedding import (EmbeddingAttack, EmbeddingAttackConfig, ImprovedEmbeddingAttack,
                                                ImprovedEmbeddingAttackConfig, snapshot_steps)


def test_paper_form_lowers_the_target_loss_and_keeps_the_model_frozen(llama, tok, behaviors):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    llama.train()  # the attack must switch to eval and restore
    cfg = EmbeddingAttackConfig(num_steps=8, lr=1.0, early_stop_loss=None, max_new_tokens=3)
    out = EmbeddingAttack(cfg).run(llama, tok, behaviors[:1])[0]
    assert out.attack == "embedding" and out.budget == budget_of(cfg)
    losses = out.extra["losses"]
    assert len(losses) == 8 and out.extra["final_loss"] < losses[0]
    assert len(out.generations) == 1 and out.extra["num_vectors"] == 20
    assert llama.training and all(p.requires_grad for p in llama.parameters())
    llama.eval()
    assert all(torch.equal(before[k], v) for k, v in llama.state_dict().items())


def test_paper_form_stops_early_at_the_loss_threshold(llama, tok, behaviors):
    cfg = EmbeddingAttackConfig(num_steps=50, lr=1.0, early_stop_loss=100.0, max_new_tokens=2)
    out = EmbeddingAttack(cfg).run(llama, tok, behaviors[:1])[0]
    assert out.extra["stopped_early"] and out.extra["steps"] == 0 and len(out.extra["losses"]) == 1


def test_improved_form_lowers_the_loss_and_returns_one_generation_per_snapshot(llama, tok, behaviors):
    cfg = ImprovedEmbeddingAttackConfig(num_steps=9, lr=0.05, n_snapshots=3, max_new_tokens=2)
    out = ImprovedEmbeddingAttack(cfg).run(llama, tok, behaviors[:1])[0]
    assert out.attack == "embedding_improved" and out.budget == budget_of(cfg)
    assert min(out.extra["losses"][1:] + [out.extra["final_loss"]]) < out.extra["losses"][0]
    assert len(out.generations) == 3 and out.extra["snapshot_steps"] == [3, 6, 9]
    # Natural-language init: one vector per init token.
    assert out.extra["num_vectors"] == len(tok(" " + cfg.init, add_special_tokens=False).input_ids)


def test_context_of_contextual_behaviours_is_kept_before_the_free_vectors(llama, tok, behaviors):
    ctx = behaviors[1]
    out = EmbeddingAttack(EmbeddingAttackConfig(num_steps=1, max_new_tokens=1)).run(llama, tok, [ctx])[0]
    text = out.extra["prompt_text"]
    slot = "[20 optimised embedding vectors]"
    assert f"{ctx.context}\n\n---\n\n{ctx.request}{slot}<|im_end|>\n<|im_start|>assistant\n" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_snapshot_steps_are_even_and_end_at_the_last_step():
    assert snapshot_steps(500, 10) == list(range(50, 501, 50))
    assert snapshot_steps(500, 1) == [500]
    assert snapshot_steps(3, 10) == [1, 2, 3]
