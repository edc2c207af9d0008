"""Finding a model's parts, dropping and re-attaching blocks, resolving and loading --model values."""
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from circuit_breakers import models
from circuit_breakers.hidden import capture_hidden_states
from circuit_breakers.models import (Architecture, ModelError, cache_dir, check_gguf, drop_blocks_after,
                                     embedded_gguf_path, find_architecture, load_model, locate_model, resolve_device,
                                     resolve_dtype, resolve_model_path)

from .helpers import make_tiny_model


def _tiny_gpt2(vocab_size: int = 64):
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    return AutoModelForCausalLM.from_config(config).eval()


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return x + self.proj(x)


class Wrapper(nn.Module):
    """A model whose blocks live under a name no known layout uses."""

    def __init__(self):
        super().__init__()
        self.body = nn.Module()
        self.body.stages = nn.ModuleList([_Block() for _ in range(3)])
        self.body.final_norm = nn.LayerNorm(8)
        self.stack = nn.ModuleList([_Block() for _ in range(2)])


# ---------------------------------------------------------------- find_architecture


def test_find_architecture_on_tiny_decoders(tiny_model):
    arch = find_architecture(tiny_model)
    assert isinstance(arch, Architecture)
    assert arch.blocks_path == "model.layers"
    assert arch.blocks is tiny_model.model.layers
    assert arch.final_norm is tiny_model.model.norm
    assert arch.decoder is tiny_model.model
    assert arch.num_blocks == 6


def test_find_architecture_through_peft_wrapper(chat_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=3)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    arch = find_architecture(peft_model)
    assert arch.blocks is model.model.layers
    assert arch.num_blocks == 3


def test_find_architecture_gpt2():
    model = _tiny_gpt2()
    arch = find_architecture(model)
    assert arch.blocks_path == "transformer.h"
    assert arch.blocks is model.transformer.h and arch.num_blocks == 2
    assert arch.final_norm is model.transformer.ln_f
    assert arch.decoder is model.transformer
    # The hidden-state numbering holds on this layout too.
    ids = torch.arange(3, 10).unsqueeze(0)
    with torch.no_grad(), capture_hidden_states(arch, range(3)) as states:
        out = model(input_ids=ids, output_hidden_states=True)
    for entry in range(3):
        assert torch.equal(states[entry], out.hidden_states[entry])


def test_unknown_layout_raises_naming_class_and_blocks_path():
    with pytest.raises(ModelError) as err:
        find_architecture(Wrapper())
    message = str(err.value)
    assert "Wrapper" in message and "blocks_path" in message


def test_blocks_path_override():
    model = Wrapper()
    arch = find_architecture(model, blocks_path="body.stages")
    assert arch.blocks is model.body.stages and arch.num_blocks == 3
    assert arch.decoder is model.body
    assert arch.final_norm is model.body.final_norm  # guessed from the decoder's attributes


def test_blocks_path_at_the_top_level_uses_the_model_as_decoder():
    model = Wrapper()
    arch = find_architecture(model, blocks_path="stack")
    assert arch.blocks is model.stack and arch.num_blocks == 2
    assert arch.decoder is model  # the blocks' parent, never the ModuleList itself


def test_blocks_path_override_on_a_known_model(tiny_model):
    arch = find_architecture(tiny_model, blocks_path="model.layers")
    assert arch.blocks is tiny_model.model.layers and arch.final_norm is tiny_model.model.norm


@pytest.mark.parametrize("path", ["body.nothing", "body.final_norm", "body"])
def test_bad_blocks_path_raises(path):
    with pytest.raises(ModelError, match="blocks_path"):
        find_architecture(Wrapper(), blocks_path=path)


# ---------------------------------------------------------------- dropping blocks


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_drop_and_reattach_restores_blocks_and_config(kind):
    model = make_tiny_model(kind, layers=6)
    original_blocks = list(model.model.layers)
    original_config = copy.deepcopy(model.config.to_dict())
    original_layer_types = list(getattr(model.config, "layer_types", None) or [])
    ids = torch.arange(3, 12).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True)

    dropped = drop_blocks_after(model, 3)
    assert len(model.model.layers) == 3
    assert [id(b) for b in model.model.layers] == [id(b) for b in original_blocks[:3]]
    assert [id(b) for b in dropped.blocks] == [id(b) for b in original_blocks[3:]]
    assert model.config.num_hidden_layers == 3
    if kind == "qwen2":
        assert len(original_layer_types) == 6
        assert len(model.config.layer_types) == 3
    with torch.no_grad():  # the truncated model still runs, and its lower entries are unchanged
        short = model(input_ids=ids, output_hidden_states=True)
    assert len(short.hidden_states) == 4
    for entry in range(3):
        assert torch.equal(short.hidden_states[entry], before.hidden_states[entry])

    dropped.reattach(model, "model.layers")
    assert [id(b) for b in model.model.layers] == [id(b) for b in original_blocks]
    assert model.config.num_hidden_layers == 6
    if kind == "qwen2":
        assert model.config.layer_types == original_layer_types
    assert model.config.to_dict() == original_config
    with torch.no_grad():
        after = model(input_ids=ids)
    assert torch.equal(after.logits, before.logits)


def test_drop_more_blocks_than_the_model_has_raises():
    model = make_tiny_model("llama", layers=2)
    with pytest.raises(ModelError, match="2 blocks"):
        drop_blocks_after(model, 3)
    assert len(model.model.layers) == 2


def test_drop_and_reattach_gpt2_config():
    model = _tiny_gpt2()
    dropped = drop_blocks_after(model, 1)
    assert len(model.transformer.h) == 1 and model.config.n_layer == 1
    dropped.reattach(model, "transformer.h")
    assert len(model.transformer.h) == 2 and model.config.n_layer == 2


# ---------------------------------------------------------------- resolving and loading


def test_resolve_missing_gguf(tmp_path):
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_resolve_dir_without_config(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="config.json"):
        resolve_model_path(str(tmp_path))


def test_resolve_local_dir_and_hub_id(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("some-org/some-model") == "some-org/some-model"


@pytest.mark.parametrize("spec", ["./runs/model", "../model", "/no/such/model", "~/no-such-cb-model", "runs/rr/model"])
def test_a_missing_path_is_no_such_directory_not_a_bad_hub_id(spec):
    with pytest.raises(ModelError, match="no such directory or file"):
        locate_model(spec)


def test_a_hub_id_passes_without_loading_and_a_file_is_not_a_model(tmp_path):
    assert locate_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert locate_model("gpt2") == "gpt2"
    (tmp_path / "weights.txt").write_text("x")
    with pytest.raises(ModelError, match="weights.txt: not a model"):
        locate_model(str(tmp_path / "weights.txt"))


def test_the_shipped_gguf_passes_the_header_check():
    check_gguf(embedded_gguf_path())


@pytest.mark.parametrize("cut, fragment", [
    (20, "inside the metadata count"),
    (2**20, "holds 48900 items, more than the rest of the file"),  # the tokenizer's merges
    (5 * 2**20, "tensor 'token_embd.weight' (30081024 bytes) ends at byte"),
])
def test_a_truncated_gguf_names_the_file_and_where_it_ends(tmp_path, cut, fragment):
    path = tmp_path / "cut.gguf"
    with open(embedded_gguf_path(), "rb") as handle:
        path.write_bytes(handle.read(cut))
    with pytest.raises(ModelError) as err:
        check_gguf(path)
    assert str(err.value).startswith(f"{path}: truncated") and fragment in str(err.value)


@pytest.mark.parametrize("content, fragment", [
    (b"", "not a GGUF file"),
    (b"PK\x03\x04" + bytes(60), "not a GGUF file"),
    (b"GGUF" + (1).to_bytes(4, "little") + bytes(16), "GGUF version 1, expected one of 2, 3"),
    # version 3, 0 tensors, 1 key "k" of value type 99
    (b"GGUF" + (3).to_bytes(4, "little") + (0).to_bytes(8, "little") + (1).to_bytes(8, "little")
     + (1).to_bytes(8, "little") + b"k" + (99).to_bytes(4, "little"), "metadata 'k' has the unknown value type 99"),
])
def test_a_garbage_gguf_is_refused_from_its_header(tmp_path, content, fragment):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelError, match=fragment):
        check_gguf(path)


def test_devices_are_checked_against_this_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    for device, fragment in (("cuda", "no CUDA GPU"), ("cuda:1", "no CUDA GPU"), ("gpu", "expected auto, cpu"),
                             ("meta", "expected auto, cpu")):
        with pytest.raises(ModelError, match=fragment):
            resolve_device(device)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ModelError, match="has 2 CUDA GPU"):
        resolve_device("cuda:2")


def test_cache_dir_honours_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CIRCUIT_BREAKERS_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CIRCUIT_BREAKERS_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "circuit-breakers"


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ModelError, match="dtype"):
        resolve_dtype("float8", cpu)


def test_base_model_name():
    assert models.base_model_name("smollm2-135m") == models.EMBEDDED_BASE_MODEL
    assert models.base_model_name("org/model") == "org/model"


def test_load_local_checkpoint_end_to_end(tmp_path, chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    model.save_pretrained(tmp_path)
    chat_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert type(loaded) is type(model)
    assert not loaded.training
    assert next(loaded.parameters()).dtype == torch.float32
    assert tokenizer.pad_token_id == chat_tokenizer.pad_token_id
    assert tokenizer.chat_template == chat_tokenizer.chat_template
    ids = torch.tensor([chat_tokenizer("How do I bake bread?")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_sets_missing_pad_token(tmp_path, chat_tokenizer):
    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.pad_token = None
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=1).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    _, loaded = load_model(str(tmp_path), dtype="float32", device="cpu")
    assert loaded.pad_token == loaded.eos_token == "</s>"


def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch):
    import warnings

    cpu = torch.device("cpu")
    models._warn_bf16_is_converted.cache_clear()
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16") as record:
        assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
        assert resolve_dtype("bf16", cpu) == torch.bfloat16
    assert len(record) == 1  # once per process, not at every check and load
    models._warn_bf16_is_converted.cache_clear()
    monkeypatch.setattr(models, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_dtype("bf16", cpu) == torch.bfloat16
        assert resolve_dtype("float32", cpu) == torch.float32
        assert resolve_dtype("auto", cpu) == torch.float32
