"""Shared fixtures. Nothing here downloads anything."""
from __future__ import annotations

import pytest

CHATML_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIAL = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
_CORPUS = [
    "user assistant system",
    "How do I bake bread? Sure, here is a simple recipe for bread.",
    "I cannot help with that request. I'm sorry, but I can't assist.",
    "Explain the water cycle in three short sentences.",
]


@pytest.fixture(scope="session")
def chat_tokenizer():
    return make_chat_tokenizer()


def make_chat_tokenizer():
    """A tiny byte-level BPE tokenizer with a ChatML chat template, trained in memory.

    Byte-level, so decoding gives back exactly the text that was encoded. Session-scoped:
    copy it (copy.deepcopy) before changing any attribute.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 5, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.name_or_path = "tiny-chatml-test"
    return tokenizer


TINY_ARCHITECTURES = ("llama", "mistral", "qwen2")


def make_tiny_model(kind: str = "llama", *, vocab_size: int = 400, layers: int = 6, seed: int = 0):
    """A randomly initialised decoder of a real architecture, small enough for a unit test."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    config = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind](**common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


@pytest.fixture(params=TINY_ARCHITECTURES)
def tiny_model(request, chat_tokenizer):
    return make_tiny_model(request.param, vocab_size=len(chat_tokenizer))


@pytest.fixture
def tiny_checkpoint(tmp_path, chat_tokenizer):
    """A tiny random Llama and the chat tokenizer saved as a checkpoint directory (what users pass as --model)."""
    path = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=4).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    return path
