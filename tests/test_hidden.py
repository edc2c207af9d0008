"""Hook-captured hidden states must be exactly `output_hidden_states` (docs/method.md section 7)."""
import pytest
import torch

from circuit_breakers.hidden import capture_hidden_states, decoder_hidden_states
from circuit_breakers.models import find_architecture


def _inputs(vocab_size: int):
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(5, vocab_size, (2, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0  # right padding in the second row
    return input_ids, attention_mask


def _reference(model, input_ids, attention_mask):
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    return out.hidden_states


def _hook_set(arch) -> set:
    """Every forward (pre-)hook on the blocks, final norm and decoder. transformers 5 installs its own
    persistent output-capturing hooks on the first `output_hidden_states` call, so tests compare sets
    before and after instead of expecting none."""
    modules = list(arch.blocks) + [arch.final_norm, arch.decoder]
    return {(id(m), kind, key) for m in modules
            for kind, hooks in (("post", m._forward_hooks), ("pre", m._forward_pre_hooks)) for key in hooks}


def test_hooks_match_output_hidden_states(tiny_model):
    arch = find_architecture(tiny_model)
    n = arch.num_blocks
    assert n == 6
    input_ids, attention_mask = _inputs(tiny_model.config.vocab_size)
    with torch.no_grad(), capture_hidden_states(arch, range(n + 1)) as states:
        out = tiny_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True,
                         use_cache=False)
    reference = out.hidden_states
    assert len(reference) == n + 1
    assert sorted(states) == list(range(n + 1))
    for entry in range(n + 1):
        assert states[entry].shape == reference[entry].shape
        assert torch.equal(states[entry], reference[entry]), f"entry {entry}"
    # Entry 0 is the embedding output; the last entry has the final norm applied.
    embeddings = tiny_model.get_input_embeddings()(input_ids)
    assert torch.equal(states[0], embeddings)
    assert torch.equal(states[n], reference[-1])
    assert torch.allclose(states[n], arch.final_norm(_block_output(arch, input_ids, attention_mask, n - 1)),
                          atol=1e-6)


def _block_output(arch, input_ids, attention_mask, block):
    """Raw output of block `block`, captured without any of the code under test."""
    captured = {}
    handle = arch.blocks[block].register_forward_hook(
        lambda m, a, out: captured.setdefault("x", out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            arch.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        handle.remove()
    return captured["x"]


def test_block_i_output_is_entry_i_plus_one(tiny_model):
    arch = find_architecture(tiny_model)
    input_ids, attention_mask = _inputs(tiny_model.config.vocab_size)
    reference = _reference(tiny_model, input_ids, attention_mask)
    for block in range(arch.num_blocks - 1):  # the last block's output is normed in hidden_states
        assert torch.equal(_block_output(arch, input_ids, attention_mask, block), reference[block + 1])


@pytest.mark.parametrize("entries", [[2, 4], [0, 3], [6], [1, 6]])
def test_decoder_hidden_states_stop_early_gives_same_tensors(tiny_model, entries):
    arch = find_architecture(tiny_model)
    input_ids, attention_mask = _inputs(tiny_model.config.vocab_size)
    reference = _reference(tiny_model, input_ids, attention_mask)
    baseline = _hook_set(arch)
    with torch.no_grad():
        early = decoder_hidden_states(arch, input_ids, attention_mask, entries, stop_early=True)
        full = decoder_hidden_states(arch, input_ids, attention_mask, entries, stop_early=False)
    assert sorted(early) == sorted(entries) == sorted(full)
    for entry in entries:
        assert torch.equal(early[entry], reference[entry])
        assert torch.equal(full[entry], reference[entry])
    assert _hook_set(arch) == baseline


def test_stop_early_skips_the_upper_blocks(tiny_model):
    arch = find_architecture(tiny_model)
    input_ids, attention_mask = _inputs(tiny_model.config.vocab_size)
    calls = []
    handles = [block.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, block in enumerate(arch.blocks)]
    try:
        with torch.no_grad():
            decoder_hidden_states(arch, input_ids, attention_mask, [1, 3], stop_early=True)
            assert calls == [0, 1, 2]  # entry 3 is the output of block 2: blocks 3..5 never ran
            calls.clear()
            decoder_hidden_states(arch, input_ids, attention_mask, [1, 3], stop_early=False)
            assert calls == list(range(arch.num_blocks))
    finally:
        for handle in handles:
            handle.remove()


def test_hooks_removed_after_context(tiny_model):
    arch = find_architecture(tiny_model)
    before = _hook_set(arch)
    with capture_hidden_states(arch, [0, 2, arch.num_blocks]) as states:
        assert len(_hook_set(arch) - before) == 3
    assert _hook_set(arch) == before
    assert states == {}  # nothing ran inside


def test_hooks_removed_when_body_raises(tiny_model):
    arch = find_architecture(tiny_model)
    input_ids, attention_mask = _inputs(tiny_model.config.vocab_size)
    before = _hook_set(arch)
    with pytest.raises(RuntimeError, match="boom"):
        with capture_hidden_states(arch, [0, 3, 5]):
            assert len(_hook_set(arch) - before) == 3
            raise RuntimeError("boom")
    assert _hook_set(arch) == before
    # stop_early's internal exception also leaves no hook behind, and the model still runs normally.
    with torch.no_grad():
        decoder_hidden_states(arch, input_ids, attention_mask, [2], stop_early=True)
        out = tiny_model(input_ids=input_ids, attention_mask=attention_mask)
    assert _hook_set(arch) == before
    assert out.logits.shape == (*input_ids.shape, tiny_model.config.vocab_size)


@pytest.mark.parametrize("entries", [[-1], [0, 7], [100]])
def test_bad_entries_raise(tiny_model, entries):
    arch = find_architecture(tiny_model)
    before = _hook_set(arch)
    with pytest.raises(ValueError, match=r"0\.\.6"):
        with capture_hidden_states(arch, entries):
            pass
    assert _hook_set(arch) == before
