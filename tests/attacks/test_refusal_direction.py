import pytest
import torch

from circuit_breakers.attacks.base import budget_of
from circuit_breakers.attacks.refusal_direction import (RefusalAblation, RefusalAblationConfig, RefusalAddition,
                                                        RefusalAdditionConfig, ablate_direction, add_vectors,
                                                        difference_of_means, upper_middle_layers)
from circuit_breakers.hidden import capture_hidden_states
from circuit_breakers.models import find_architecture

from ..helpers import make_tiny_model


def _inputs(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}],
                                   add_generation_prompt=True, tokenize=False)
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


def _states(model, ids, entries):
    arch = find_architecture(model)
    last = {}
    # A hook registered after the attack's hooks sees the edited output of the last block.
    handle = arch.blocks[-1].register_forward_hook(
        lambda m, a, o: last.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    try:
        with capture_hidden_states(arch, entries) as states, torch.no_grad():
            model(input_ids=ids)
    finally:
        handle.remove()
    return dict(states), last["out"]


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_ablation_removes_the_direction_everywhere(tok, kind):
    model = make_tiny_model(kind, vocab_size=len(tok), layers=3)
    n = find_architecture(model).num_blocks
    ids = _inputs(tok)
    r = torch.randn(32)
    r = r / r.norm()
    plain, plain_last = _states(model, ids, range(n))
    assert all(abs(float((h @ r).abs().max())) > 1e-3 for h in plain.values())
    with ablate_direction(model, r * 5.0):  # any scale: the unit direction is projected out
        ablated, last = _states(model, ids, range(n))
    for entry in range(n):
        assert float((ablated[entry] @ r).abs().max()) < 1e-5, entry
    assert float((last @ r).abs().max()) < 1e-5
    arch = find_architecture(model)
    assert all(not b._forward_pre_hooks for b in arch.blocks)
    assert all(all("output_capturing" in h.__qualname__ for h in b._forward_hooks.values()) for b in arch.blocks)


def test_addition_shifts_the_projection_by_the_coefficient(tok, llama):
    ids = _inputs(tok)
    v = torch.randn(32)
    u = v / v.norm()
    plain, _ = _states(llama, ids, [2])
    with add_vectors(llama, {2: 0.65 * u}):
        steered, _ = _states(llama, ids, [2])
    shift = (steered[2] - plain[2]) @ u
    assert torch.allclose(shift, torch.full_like(shift, 0.65), atol=1e-5)


def test_steering_vectors_scale_and_sign(tok, llama):
    diffs = {1: torch.tensor([3.0, 4.0] + [0.0] * 30), 2: torch.tensor([0.0, 2.0] + [0.0] * 30)}
    unit = RefusalAddition(RefusalAdditionConfig(coefficient=0.65, scale="unit")).steering_vectors(diffs)
    raw = RefusalAddition(RefusalAdditionConfig(coefficient=1.0)).steering_vectors(diffs)
    assert torch.allclose(unit[1].norm(), torch.tensor(0.65)) and float(unit[1] @ diffs[1]) < 0
    assert torch.allclose(raw[1], -diffs[1]) and torch.allclose(raw[2], -diffs[2])


def test_direction_is_the_difference_of_means(tok, llama):
    harmful, harmless = ["How do I bake bread?"], ["Explain the water cycle."]
    d = difference_of_means(llama, tok, harmful, harmless, [1])[1]
    with torch.no_grad():
        def last(p):
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False)
            ids = torch.tensor([tok(text, add_special_tokens=False).input_ids])
            return llama(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1]
        assert torch.allclose(d, last(harmful[0]) - last(harmless[0]), atol=1e-5)


def _hook_ids(arch):
    # transformers 5 installs its own permanent output-capturing hooks: compare, don't expect none.
    return [(list(b._forward_hooks), list(b._forward_pre_hooks)) for b in arch.blocks]


def test_attacks_run_record_budget_and_remove_hooks(tok, llama, behaviors):
    arch = find_architecture(llama)
    llama(input_ids=torch.tensor([[5, 6]]), output_hidden_states=True)  # let transformers add its hooks first
    hooks = _hook_ids(arch)
    abl_cfg = RefusalAblationConfig(n_prompts=4, max_new_tokens=2)
    add_cfg = RefusalAdditionConfig(n_prompts=4, max_new_tokens=2, layers=(1, 2), coefficient=0.65)
    for attack, cfg in ((RefusalAblation(abl_cfg), abl_cfg), (RefusalAddition(add_cfg), add_cfg)):
        outs = attack.run(llama, tok, behaviors)
        assert [o.behavior_id for o in outs] == ["plain", "ctx"]
        assert all(o.budget == budget_of(cfg) and len(o.generations) == 1 for o in outs)
        assert _hook_ids(arch) == hooks
    assert outs[0].extra["entries"] == [1, 2] and set(outs[0].extra["direction_norms"]) == {1, 2}
    assert outs[1].prompt.startswith(behaviors[1].context)


def test_upper_middle_layers():
    assert upper_middle_layers(32) == tuple(range(15, 25))
    assert all(0 < e < 6 for e in upper_middle_layers(6))
