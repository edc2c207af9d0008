"""The RR trainer on tiny random models: exact step-1 values, what is trained, the schedule's end,
dropped upper blocks and the saved checkpoint, batching, gradient accumulation."""
import copy
import json

import pytest
import torch

from circuit_breakers.config import ConfigError, RRConfig
from circuit_breakers.data import TokenizedExample, tokenize_examples
from circuit_breakers.models import base_model_name
from circuit_breakers.training import RRTrainer

from ..helpers import make_tiny_model, tiny_trainer

LOG_KEYS = {"step", "c_s", "c_r", "retain_loss", "rerouting_loss", "cb_cos", "cb_cos_layers", "retain_cos",
            "grad_norm", "lr", "tokens_per_s"}


# ---------------------------------------------------------------- step 1 and what is trained


def test_step_one_values(tiny_model, chat_tokenizer):
    """With LoRA B = 0 the trained model equals the original: L_r = 0 and L_s = 1 (docs/method.md section 4)."""
    trainer = tiny_trainer(tiny_model, chat_tokenizer, steps=1, alpha=10.0)
    assert all(torch.all(p == 0) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    (record,) = trainer.train().log
    assert record["step"] == 1
    assert record["retain_loss"] == 0.0
    assert record["rerouting_loss"] == pytest.approx(1.0, abs=1e-6)
    assert record["cb_cos"] == pytest.approx(1.0, abs=1e-6)
    assert record["retain_cos"] == pytest.approx(1.0, abs=1e-6)
    assert record["c_s"] == pytest.approx(10.0 * (1 - 1 / 2))  # denominator 2 * steps = 2
    assert record["c_r"] == pytest.approx(10.0 * 1 / 2)
    assert record["lr"] == 1e-2 and record["grad_norm"] >= 0 and record["tokens_per_s"] > 0


def test_log_records_the_rerouting_cosine_per_target_layer(tiny_model, chat_tokenizer):
    first, second = tiny_trainer(tiny_model, chat_tokenizer, steps=2).train().log
    assert set(first["cb_cos_layers"]) == {"2", "4"}
    assert first["cb_cos_layers"]["2"] == pytest.approx(1.0, abs=1e-6)
    for record in (first, second):
        assert sum(record["cb_cos_layers"].values()) / 2 == pytest.approx(record["cb_cos"], abs=1e-6)


def _first_update_signs(chat_tokenizer, noise_seed: int, **overrides) -> torch.Tensor:
    """Signs of the first move of every LoRA B weight the rerouting loss reaches (blocks below the last
    target layer), with the frozen states perturbed by a relative 1e-6 (another machine's rounding)
    drawn from `noise_seed`."""
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=1, schedule_denominator=200, lr=1e-3,
                       retain_distance="relative_l2", retain_normalization="masked_mean", frozen_cache_gb=0.0,
                       **overrides)
    frozen, generator = trainer._frozen, torch.Generator().manual_seed(noise_seed)

    def noisy(batch, entries, cache):
        return {e: v * (1 + 1e-6 * torch.randn(v.shape, generator=generator))
                for e, v in frozen(batch, entries, cache).items()}
    trainer._frozen = noisy
    below = tuple(f".layers.{i}." for i in range(max(trainer.target_layers)))
    names = sorted(n for n, p in trainer.model.named_parameters() if "lora_B" in n and any(b in n for b in below))
    params = dict(trainer.model.named_parameters())
    before = torch.cat([params[n].detach().flatten().clone() for n in names])
    trainer.train()
    return torch.sign(torch.cat([params[n].detach().flatten() for n in names]) - before)


@pytest.mark.parametrize("start", ["none", "target", "lora"])
def test_seeded_start_sets_the_first_step_where_rounding_noise_did(chat_tokenizer, start):
    """The paper's start (B = 0) is a stationary point: the first step follows the noise, so two
    'machines' disagree on about half the signs. A seeded start makes them agree."""
    a = _first_update_signs(chat_tokenizer, 1, seeded_start=start, seeded_start_scale=0.1 if start == "target" else 1e-3)
    b = _first_update_signs(chat_tokenizer, 2, seeded_start=start, seeded_start_scale=0.1 if start == "target" else 1e-3)
    moved = (a != 0) | (b != 0)
    agreement = float((a[moved] == b[moved]).float().mean())
    if start == "none":
        assert agreement < 0.8
    else:
        assert agreement > 0.99


def test_seeded_start_lora_draws_nonzero_b_and_target_leaves_the_model_as_it_was(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, seeded_start="lora", seeded_start_scale=1e-3)
    b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().max() > 0 for p in b) and max(float(p.detach().std()) for p in b) == pytest.approx(1e-3, rel=0.2)
    assert trainer.target_offsets is None
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, seeded_start="target", seeded_start_scale=0.05)
    assert all(torch.all(p == 0) for n, p in trainer.model.named_parameters() if "lora_B" in n)
    assert set(trainer.target_offsets) == {2, 4}
    assert all(v.norm().item() == pytest.approx(0.05, rel=1e-5) for v in trainer.target_offsets.values())
    (record,) = trainer.train().log if trainer.config.steps == 1 else trainer.train().log[:1]
    assert record["cb_cos"] == pytest.approx(1.0, abs=1e-6)  # the log measures against the true original
    assert record["rerouting_loss"] < 1.0  # the loss against the offset target


def test_step_one_values_with_the_norm_aware_options(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=2, retain_distance="relative_l2",
                       retain_normalization="masked_mean", reroute_tokens="response", retain_weight=3.0)
    first, second = trainer.train().log
    assert first["retain_loss"] == 0.0
    assert first["rerouting_loss"] == pytest.approx(1.0, abs=1e-6)
    assert first["c_r"] == pytest.approx(3.0 * 10.0 * 1 / 4)  # retain_weight scales c_r
    assert 0 < second["retain_loss"] < 1  # a relative distance
    assert second["rerouting_loss"] < 1.0


def test_only_lora_parameters_change(tiny_model, chat_tokenizer):
    trainer = tiny_trainer(tiny_model, chat_tokenizer, steps=3)
    kept = trainer.config.kept_blocks  # 5: blocks 0..4
    params = dict(trainer.model.named_parameters())
    lora_before = {n: p.detach().clone() for n, p in params.items() if "lora_" in n}
    base_before = {n: p.detach().clone() for n, p in params.items() if "lora_" not in n}
    dropped_before = [copy.deepcopy(b.state_dict()) for b in trainer.dropped.blocks]
    assert lora_before and base_before
    # Trainable parameters are exactly the LoRA matrices of blocks 0..max(target_layers).
    assert {n for n, p in params.items() if p.requires_grad} == set(lora_before)
    layer_ids = {int(n.split(".layers.")[1].split(".")[0]) for n in lora_before}
    assert layer_ids == set(range(kept))
    modules = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lora_before}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    log = trainer.train().log
    assert len(log) == 3
    assert log[-1]["retain_loss"] > 0 and log[-1]["rerouting_loss"] < 1.0
    params = dict(trainer.model.named_parameters())
    for name, before in lora_before.items():
        assert not torch.equal(params[name], before), f"{name} did not change"
    for name, before in base_before.items():
        assert torch.equal(params[name], before), f"base parameter {name} changed"
    for block, before in zip(trainer.dropped.blocks, dropped_before):
        for key, value in block.state_dict().items():
            assert torch.equal(value, before[key])


def test_base_weights_unchanged_against_original_model(chat_tokenizer):
    """The adapter-disabled model after training computes exactly what the untouched original does."""
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    original = copy.deepcopy(model)
    trainer = tiny_trainer(model, chat_tokenizer, steps=2, full_layers=True)
    trainer.train()
    ids = torch.tensor([chat_tokenizer("How do I bake bread?")["input_ids"]])
    with torch.no_grad():
        with trainer.model.disable_adapter():
            frozen = trainer.model(input_ids=ids).logits
        trained = trainer.model(input_ids=ids).logits
        reference = original(input_ids=ids).logits
    assert torch.equal(frozen, reference)
    assert not torch.allclose(trained, reference, atol=1e-4)


# ---------------------------------------------------------------- the schedule's end


def test_training_past_the_schedule_end(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
    trainer = tiny_trainer(model, chat_tokenizer, steps=4, schedule_denominator=2, alpha=4.0)
    log = trainer.train().log
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[0]["c_s"] == pytest.approx(2.0) and log[0]["rerouting_loss"] is not None
    for record in log[1:]:
        assert record["c_s"] == 0.0
        assert record["rerouting_loss"] is None and record["cb_cos"] is None
        assert record["retain_loss"] is not None
    assert [r["c_r"] for r in log] == pytest.approx([2.0, 4.0, 6.0, 8.0])


def test_a_linear_lr_schedule_decays_from_lr_and_the_default_is_constant(chat_tokenizer):
    def lrs(**settings):
        model = make_tiny_model("llama", vocab_size=len(chat_tokenizer))
        return [r["lr"] for r in tiny_trainer(model, chat_tokenizer, **settings).train().log]

    assert lrs(steps=4, lr_schedule="linear") == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert lrs(steps=2) == [1e-2, 1e-2]
    with pytest.raises(ConfigError, match="lr_schedule"):
        RRConfig(lr_schedule="cosine").validate()


# ---------------------------------------------------------------- dropped blocks and saving


def test_dropped_blocks_saved_checkpoint(tmp_path, chat_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=6)
    original = copy.deepcopy(model)
    trainer = tiny_trainer(model, chat_tokenizer, steps=3, target_layers=[2, 3])
    assert trainer.arch.num_blocks == 4  # blocks 0..3 kept, 4 and 5 dropped while training
    assert len(trainer.dropped.blocks) == 2
    assert trainer.retain_entries == [0, 1, 2, 3, 4]
    out = tmp_path / "run"
    result = trainer.train(out)

    # A full, ordinary checkpoint.
    saved = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert len(saved.model.layers) == 6
    assert saved.config.num_hidden_layers == 6
    assert json.loads((out / "model" / "config.json").read_text())["num_hidden_layers"] == 6
    for i in (4, 5):
        got, want = saved.model.layers[i].state_dict(), original.model.layers[i].state_dict()
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]), f"block {i} {key}"
    assert torch.equal(saved.lm_head.weight, original.lm_head.weight)
    assert torch.equal(saved.model.norm.weight, original.model.norm.weight)

    # Merged weights == the original full model with the saved adapter applied.
    adapted = PeftModel.from_pretrained(copy.deepcopy(original), out / "adapter").eval()
    ids = torch.tensor([chat_tokenizer("How do I bake bread? Sure, here is a simple recipe.")["input_ids"]])
    with torch.no_grad():
        merged_logits = saved(input_ids=ids).logits
        adapter_logits = adapted(input_ids=ids).logits
        original_logits = original(input_ids=ids).logits
        in_memory = result.model(input_ids=ids).logits
    assert torch.allclose(merged_logits, adapter_logits, atol=1e-5)
    assert torch.allclose(in_memory, merged_logits, atol=1e-6)
    assert not torch.allclose(merged_logits, original_logits, atol=1e-3)  # training did something

    # The run directory.
    assert RRConfig.load(out / "config.yaml") == trainer.config
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert len(lines) == 3
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        assert LOG_KEYS <= set(record)
    card = (out / "model" / "README.md").read_text()
    assert f"base_model: {base_model_name(trainer.config.model)}" in card
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    assert tokenizer.chat_template == chat_tokenizer.chat_template
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_blocks_path_model_trains_and_saves(tmp_path, chat_tokenizer, monkeypatch):
    """A model found only through `blocks_path` (no known layout) must also save: the trainer must not
    look its blocks up again without the override."""
    from transformers import AutoModelForCausalLM

    from circuit_breakers import models

    monkeypatch.setattr(models, "KNOWN_LAYOUTS", ())
    model = make_tiny_model("mistral", vocab_size=len(chat_tokenizer), layers=4)
    with pytest.raises(models.ModelError, match="blocks_path"):
        models.find_architecture(model)
    trainer = tiny_trainer(model, chat_tokenizer, steps=1, target_layers=[2], blocks_path="model.layers")
    assert trainer.arch.num_blocks == 3
    trainer.train(tmp_path / "run")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model")
    assert len(saved.model.layers) == 4 and saved.config.num_hidden_layers == 4


def test_full_layers_keeps_every_block(chat_tokenizer):
    model = make_tiny_model("qwen2", vocab_size=len(chat_tokenizer), layers=6)
    trainer = tiny_trainer(model, chat_tokenizer, steps=1, target_layers=[2, 3], full_layers=True)
    assert trainer.dropped is None
    assert trainer.arch.num_blocks == 6 and len(model.model.layers) == 6
    assert model.config.num_hidden_layers == 6
    assert trainer.retain_entries == list(range(7))
    lora_layers = {int(n.split(".layers.")[1].split(".")[0]) for n, _ in trainer.model.named_parameters()
                   if "lora_" in n}
    assert lora_layers == {0, 1, 2, 3}  # LoRA still only on blocks 0..max(target_layers)
    (record,) = trainer.train().log
    assert record["retain_loss"] == 0.0


def test_target_layer_past_the_model_raises(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=6)
    with pytest.raises(ConfigError, match="target_layers"):
        tiny_trainer(model, chat_tokenizer, target_layers=[2, 7])
    assert len(model.model.layers) == 6  # nothing was dropped


def test_unknown_lora_module_raises(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4)
    with pytest.raises(ConfigError, match="c_attn.*q_proj"):
        tiny_trainer(model, chat_tokenizer, target_layers=[2], lora_target_modules=["c_attn"])


def test_auto_lora_targets_are_the_papers_projections_or_every_linear_layer(chat_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from circuit_breakers.models import find_architecture
    from circuit_breakers.training.lora import PAPER_LORA_TARGETS, resolve_lora_targets

    llama = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    assert resolve_lora_targets(find_architecture(llama), ["auto"]) == PAPER_LORA_TARGETS
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    assert resolve_lora_targets(find_architecture(gpt2), ["auto"]) == ["c_attn", "c_fc", "c_proj"]


def test_gpt2_style_model_trains_and_saves_with_auto_lora_targets(tmp_path, chat_tokenizer):
    """A GPT-2 layout (transformer.h, Conv1D projections) works with the defaults."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=len(chat_tokenizer),
                                       n_positions=128)).eval()
    trainer = tiny_trainer(model, chat_tokenizer, target_layers=[2], steps=3)
    log = trainer.train(tmp_path).log
    assert log[0]["rerouting_loss"] == pytest.approx(1.0, abs=1e-6) and log[0]["retain_loss"] == 0.0
    assert log[-1]["rerouting_loss"] < 1.0
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
    assert len(saved.transformer.h) == 4 and saved.config.n_layer == 4


def test_gemma_model_trains_with_its_scaled_embeddings(chat_tokenizer):
    """Gemma scales its embeddings inside the decoder: entry 0 is read at block 0's input, so it matches."""
    from transformers import GemmaConfig, GemmaForCausalLM

    torch.manual_seed(0)
    model = GemmaForCausalLM(GemmaConfig(vocab_size=len(chat_tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=8, max_position_embeddings=128)).eval()
    from circuit_breakers.hidden import decoder_hidden_states
    from circuit_breakers.models import find_architecture

    ids = torch.randint(0, len(chat_tokenizer), (2, 7))
    reference = model(input_ids=ids, output_hidden_states=True).hidden_states
    hooked = decoder_hidden_states(find_architecture(model), ids, torch.ones_like(ids), range(5), stop_early=False)
    assert all(torch.allclose(reference[i], hooked[i], atol=1e-6) for i in range(5))
    log = tiny_trainer(model, chat_tokenizer, target_layers=[2, 3], steps=3).train().log
    assert log[0]["rerouting_loss"] == pytest.approx(1.0, abs=1e-6) and log[0]["retain_loss"] == 0.0
    assert log[-1]["rerouting_loss"] < 1.0


# ---------------------------------------------------------------- gradient accumulation


def _fixed_length_items(n: int, length: int, seed: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    return [TokenizedExample(tuple(torch.randint(5, vocab, (length,), generator=g).tolist()), length // 2)
            for _ in range(n)]


def _lora_after_two_steps(chat_tokenizer, grad_accum: int):
    vocab = len(chat_tokenizer)
    model = make_tiny_model("llama", vocab_size=vocab, layers=4)
    config = RRConfig(model="tiny", target_layers=[2, 3], steps=2, batch_size=4, grad_accum=grad_accum, lr=1e-3,
                      lora_dropout=0.0, max_length=64)
    trainer = RRTrainer(config, model=model, tokenizer=chat_tokenizer,
                        circuit_breaker_items=_fixed_length_items(8, 12, 0, vocab),
                        retain_items=_fixed_length_items(8, 12, 1, vocab), progress=False)
    # Start from B != 0: with B = 0 the first gradient is pure rounding noise (the losses are at a
    # stationary point), which Adam would amplify into an update whose direction means nothing.
    g = torch.Generator().manual_seed(7)
    for name, p in trainer.model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    log = trainer.train().log
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}, log


def test_grad_accum_matches_one_big_batch(chat_tokenizer):
    one, log_one = _lora_after_two_steps(chat_tokenizer, 1)
    two, log_two = _lora_after_two_steps(chat_tokenizer, 2)
    assert one.keys() == two.keys()
    for record_one, record_two in zip(log_one, log_two):
        for key in ("rerouting_loss", "retain_loss", "grad_norm", "cb_cos", "retain_cos"):
            assert record_two[key] == pytest.approx(record_one[key], rel=1e-4, abs=1e-7), key
    moved = max((one[n] - two[n]).abs().max().item() for n in one)
    assert moved < 1e-5  # lr is 1e-3: any real difference in the gradients would show at that scale


def test_gradient_checkpointing_gives_the_same_training(chat_tokenizer):
    """Checkpointing recomputes blocks in backward; the capture hooks must be gone by then and the
    result must not change."""
    def run(checkpointing: str):
        model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4)
        trainer = tiny_trainer(model, chat_tokenizer, steps=3, target_layers=[2, 3], lora_dropout=0.0,
                           gradient_checkpointing=checkpointing)
        assert all(block.gradient_checkpointing == (checkpointing == "true") for block in model.model.layers)
        log = trainer.train().log
        return log, {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}

    log_off, lora_off = run("false")
    log_on, lora_on = run("true")
    for a, b in zip(log_off, log_on):
        assert b["rerouting_loss"] == pytest.approx(a["rerouting_loss"], abs=1e-6)
        assert b["retain_loss"] == pytest.approx(a["retain_loss"], rel=1e-4, abs=1e-8)
    assert max((lora_off[n] - lora_on[n]).abs().max().item() for n in lora_off) < 1e-4


# ---------------------------------------------------------------- tool use


@pytest.mark.parametrize("style, kind", [("hermes", "qwen2"), ("llama31", "llama")])
def test_a_training_step_on_tool_calls_reroutes_the_call_tokens(style, kind):
    """Harmful tool calls as the circuit-breaker set, benign ones as retain, through the model's own tool
    template: the call's tokens are what the rerouting loss sees, and a step trains."""
    from circuit_breakers.data import ChatFormatter, Example

    from ..helpers import make_tool_tokenizer

    tokenizer = make_tool_tokenizer(style)
    shell = {"type": "function", "function": {"name": "run", "description": "Run a shell command.",
                                              "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}

    def example(request, command):
        return Example(response="", request=request, tools=(shell,),
                       tool_calls=({"type": "function", "function": {"name": "run", "arguments": {"cmd": command}}},))
    harmful = [example(f"Wipe disk {i}", f"rm -rf /mnt/{i}") for i in range(4)]
    benign = [example(f"List folder {i}", f"ls /home/{i}") for i in range(4)]
    formatter = ChatFormatter(tokenizer, 1024)
    cb, retain = tokenize_examples(harmful, formatter), tokenize_examples(benign, formatter)
    for item in cb:  # the response span is the call
        assert "rm -rf" in tokenizer.decode(item.input_ids[item.response_start:])
        assert "rm -rf" not in tokenizer.decode(item.input_ids[:item.response_start])
    model = make_tiny_model(kind, vocab_size=len(tokenizer), layers=4)
    config = RRConfig(model="tiny", target_layers=[2, 3], steps=2, batch_size=2, lr=1e-2, max_length=1024)
    log = RRTrainer(config, model=model, tokenizer=tokenizer, circuit_breaker_items=cb, retain_items=retain,
                    progress=False).train().log
    assert [r["step"] for r in log] == [1, 2]
    assert log[0]["rerouting_loss"] == pytest.approx(1.0, abs=1e-6)  # B = 0: the original's states
    assert log[1]["cb_cos"] < 1.0  # the first step moved the call tokens' representations
