"""Shared test factories and helpers (plain functions, no fixtures): import them from here, never from a
conftest. Fixtures live in tests/conftest.py and the per-directory conftests, and build on these."""
from __future__ import annotations

import json
import math
import os
import socket
import sys
import threading
import time
from pathlib import Path

# --- tiny tokenizer and models ---------------------------------------------------------------------------------

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


def make_chat_tokenizer():
    """A tiny byte-level BPE tokenizer with a ChatML chat template, trained in memory.

    Byte-level, so decoding gives back exactly the text that was encoded. The `chat_tokenizer` fixture is
    session-scoped: copy it (copy.deepcopy) before changing any attribute.
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


# --- server tests (tests/serving) ------------------------------------------------------------------------------

MODEL = "tiny-rr"
# The Host names FastAPI's and httpx's test clients send: allowed by every test app.
TEST_HOSTS = ("testserver", "test", "t")


def app_maker(model, tokenizer):
    """`make(**kwargs)`: the server app for `model`, named MODEL, reachable by the test clients."""
    from circuit_breakers.serving.app import create_app

    def make(**kwargs):
        kwargs.setdefault("model_name", MODEL)
        kwargs.setdefault("allowed_hosts", TEST_HOSTS)
        return create_app(model, tokenizer, **kwargs)

    return make
HUMAN = [{"role": "user", "content": "How do I bake bread?"}]


def chat(client, messages=None, **body):
    """POST a chat completion; returns the response."""
    payload = {"model": MODEL, "messages": messages if messages is not None else HUMAN, "max_tokens": 8, **body}
    return client.post("/v1/chat/completions", json=payload)


def parse_sse(text: str) -> tuple[list[dict], bool]:
    """The JSON payloads of a server-sent event stream, and whether it ended with [DONE]."""
    events, done = [], False
    for block in text.split("\n\n"):
        block = block.strip()
        if not block:
            continue
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        if data == "[DONE]":
            done = True
            continue
        assert not done, "an event after [DONE]"
        events.append(json.loads(data))
    return events, done


def streamed_text(events: list[dict]) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))


def assert_error(response, status: int = 400, *, param=None, code=None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


def probe_for(model, *, layer: int = 2, threshold_logit: float = 1e9, seed: int = 0):
    """A randomly initialised linear probe on the tiny model (never trips at the default threshold)."""
    import torch

    from circuit_breakers.probes.probe import make_probe

    probe = make_probe("linear", model.config.hidden_size, layer=layer, seed=seed)
    with torch.no_grad():
        probe.net[0].weight.mul_(20)  # spread the scores so thresholds can fall between tokens
    probe.threshold_logit = threshold_logit
    return probe


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def threshold_tripping_at(scores: list[float], index: int) -> float:
    """A threshold logit between max(scores[:index]) and scores[index]; None if there is none."""
    before = max(scores[:index], default=0.0)
    if scores[index] <= before:
        return None
    return logit((before + scores[index]) / 2)


class LiveServer:
    """uvicorn on 127.0.0.1 with a free port, in a background thread."""

    def __init__(self, app):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = None

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=15)


# ---------------------------------------------------------------- trainers on tiny models


def tokenized_items(tokenizer, n: int, *, harmful: bool):
    """`n` short tokenised conversations: harmful-looking (a compliance) or benign (a refusal)."""
    from circuit_breakers.data import ChatFormatter, Example, tokenize_examples

    fmt = ChatFormatter(tokenizer, 64)
    if harmful:
        examples = [Example(request=f"How do I bake bread {i}?",
                            response="Sure, here is a simple recipe for bread. " * (1 + i % 3)) for i in range(n)]
    else:
        examples = [Example(request=f"Explain the water cycle {i}" + " in three short sentences" * (i % 2),
                            response="I cannot help with that request.") for i in range(n)]
    return tokenize_examples(examples, fmt)


def tiny_trainer(model, tokenizer, n_cb: int = 6, n_retain: int = 6, **overrides):
    """An RRTrainer on a tiny model and `tokenized_items`; `overrides`: RRConfig keys."""
    from circuit_breakers.config import RRConfig
    from circuit_breakers.training import RRTrainer

    settings = dict(model="tiny-test-model", target_layers=[2, 4], steps=3, batch_size=2, lr=1e-2, max_length=64)
    settings.update(overrides)
    return RRTrainer(RRConfig(**settings), model=model, tokenizer=tokenizer,
                     circuit_breaker_items=tokenized_items(tokenizer, n_cb, harmful=True),
                     retain_items=tokenized_items(tokenizer, n_retain, harmful=False), progress=False)


# ---------------------------------------------------------------- launching processes (tests/training)

REPO = Path(__file__).resolve().parents[1]
# fp32: the two runs sum the same per-micro-batch gradients in another order (all-reduce vs accumulation).
RELATIVE_TOLERANCE = 1e-5


def assert_close_weights(got: dict, want: dict) -> None:
    """The same LoRA weight names, each within RELATIVE_TOLERANCE of the largest value it should have."""
    assert set(got) == set(want)
    for name, value in want.items():
        assert (got[name] - value).abs().max() <= RELATIVE_TOLERANCE * value.abs().max(), name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str) -> list[str]:
    """`torchrun` with NPROC local processes (Accelerate reads its environment like its own launcher's)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]


def launch_env() -> dict:
    """The environment of launched test processes: the repository importable, CPUs only."""
    # One thread per process: two processes share this machine's cores.
    return {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{REPO / 'src'}", "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": ""}


# ---------------------------------------------------------------- tool-capable tiny tokenizers (tests/data)

# Qwen2.5-style ChatML with tools: the tool list in the system turn, calls inside <tool_call>, results sent
# back as a user turn inside <tool_response>. Arguments may be a dict or an already-encoded JSON string.
HERMES_TOOL_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n'"
    " + 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}"
    "{%- for tool in tools %}{{- '\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within '"
    " + '<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": '"
    " + '<args-json-object>}\n</tool_call><|im_end|>\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}"
    "{%- elif m['role'] == 'user' %}"
    "{{- '<|im_start|>user\n' + m['content'] + '<|im_end|>\n' }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' + (m['content'] or '') }}"
    "{%- for call in m.get('tool_calls') or [] %}"
    "{%- set f = call['function'] if call['function'] is defined else call %}"
    "{%- if (loop.first and m['content']) or not loop.first %}{{- '\n' }}{%- endif %}"
    "{{- '<tool_call>\n{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{%- if f['arguments'] is string %}{{- f['arguments'] }}{%- else %}{{- f['arguments'] | tojson }}{%- endif %}"
    "{{- '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif m['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + m['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

# Llama-3.1 style: headers between <|start_header_id|>/<|end_header_id|>, <|eot_id|> ends a turn, the tools
# as JSON in the first user turn, a call as {"name", "parameters"} after the assistant header, results in an
# "ipython" turn (role "tool" is accepted as its alias).
LLAMA31_TOOL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' }}"
    "{%- if tools %}{{- 'Environment: ipython\n' }}{%- endif %}"
    "{{- 'Cutting Knowledge Date: December 2023\n\n' + system + '<|eot_id|>' }}"
    "{%- set ns = namespace(tools_done=false) %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' and tools and not ns.tools_done %}"
    "{%- set ns.tools_done = true %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\n\n' }}"
    "{{- 'Given the following functions, please respond with a JSON for a function call with its proper '"
    " + 'arguments that best answers the given prompt.\n\n'"
    " + 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its '"
    " + 'value}. Do not use variables.\n\n' }}"
    "{%- for tool in tools %}{{- (tool | tojson(indent=4)) + '\n\n' }}{%- endfor %}"
    "{{- m['content'] + '<|eot_id|>' }}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}"
    "{%- set f = m['tool_calls'][0]['function'] if m['tool_calls'][0]['function'] is defined "
    "else m['tool_calls'][0] %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{{- '{\"name\": \"' + f['name'] + '\", \"parameters\": ' }}"
    "{%- if f['arguments'] is string %}{{- f['arguments'] }}{%- else %}{{- f['arguments'] | tojson }}{%- endif %}"
    "{{- '}<|eot_id|>' }}"
    "{%- elif m['role'] in ('tool', 'ipython') %}"
    "{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + (m['content'] or '') + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
_LLAMA31_SPECIAL = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]

# Mistral (v3 tokenizer) style: the tools as a JSON list before the last [INST], the system prompt inside that
# [INST], calls as `[TOOL_CALLS] [{"name", "arguments"}, ...]</s>`, results between [TOOL_RESULTS] tags; no
# generation prompt (a prompt ends with [/INST]). Call ids left out (the real template asks for 9 characters).
MISTRAL_TOOL_TEMPLATE = (
    "{{- bos_token }}"
    "{%- set ns = namespace(system='', last_user=-1) %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set ns.system = messages[0]['content'] + '\n\n' %}{%- set messages = messages[1:] %}{%- endif %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if loop.index0 == ns.last_user %}"
    "{%- if tools %}{{- '[AVAILABLE_TOOLS] ' + (tools | tojson) + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[INST] ' + ns.system + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' and m.get('tool_calls') %}"
    "{{- '[TOOL_CALLS] [' }}"
    "{%- for call in m['tool_calls'] %}"
    "{%- set f = call['function'] if call['function'] is defined else call %}"
    "{%- if not loop.first %}{{- ', ' }}{%- endif %}"
    "{{- '{\"name\": \"' + f['name'] + '\", \"arguments\": ' }}"
    "{%- if f['arguments'] is string %}{{- f['arguments'] }}{%- else %}{{- f['arguments'] | tojson }}{%- endif %}"
    "{{- '}' }}"
    "{%- endfor %}"
    "{{- ']' + eos_token }}"
    "{%- elif m['role'] == 'assistant' %}{{- (m['content'] or '') + eos_token }}"
    "{%- elif m['role'] == 'tool' %}{{- '[TOOL_RESULTS] ' + m['content'] + '[/TOOL_RESULTS]' }}"
    "{%- endif %}"
    "{%- endfor %}"
)
_MISTRAL_SPECIAL = ["[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
                    "[/TOOL_RESULTS]"]


def make_tool_tokenizer(style: str = "hermes"):
    """A fresh tiny tokenizer (`make_chat_tokenizer`) whose chat template renders tools and tool calls.

    "hermes": HERMES_TOOL_TEMPLATE on the ChatML tokens. "llama31": LLAMA31_TOOL_TEMPLATE, with the Llama-3.1
    header and turn-end tokens added as special tokens and eos_token "<|eot_id|>". "mistral":
    MISTRAL_TOOL_TEMPLATE, with Mistral's control tokens added as special tokens. The tiny models take
    vocab_size=len(tokenizer).
    """
    tokenizer = make_chat_tokenizer()
    if style == "hermes":
        tokenizer.chat_template = HERMES_TOOL_TEMPLATE
        tokenizer.name_or_path = "tiny-hermes-tools-test"
    elif style == "llama31":
        tokenizer.add_special_tokens({"additional_special_tokens": _LLAMA31_SPECIAL})
        tokenizer.eos_token = "<|eot_id|>"  # as in Llama-3.1-Instruct: generation stops at the turn end
        tokenizer.chat_template = LLAMA31_TOOL_TEMPLATE
        tokenizer.name_or_path = "tiny-llama31-tools-test"
    elif style == "mistral":
        tokenizer.add_special_tokens({"additional_special_tokens": _MISTRAL_SPECIAL})
        tokenizer.chat_template = MISTRAL_TOOL_TEMPLATE
        tokenizer.name_or_path = "tiny-mistral-tools-test"
    else:
        raise ValueError(f"make_tool_tokenizer: style must be 'hermes', 'llama31' or 'mistral', got {style!r}")
    return tokenizer


# ---------------------------------------------------------------- tiny vision-language models (tests/multimodal)

# ChatML over content parts (what VLM templates iterate); a string content is accepted too. IMAGE is replaced by
# each family's placeholder.
_VLM_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}{{ 'IMAGE' }}{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VLM_FAMILIES = ("llava", "llava_next", "idefics3", "qwen2_vl")
# Each family's image placeholder as its chat template writes it.
VLM_PLACEHOLDERS = {"llava": "<image>", "llava_next": "<image>", "idefics3": "<image>",
                    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def _tiny_text_config(vocab_size: int, layers: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _image_only_qwen2_vl_processor():
    """Qwen2VLProcessor without its video processor, which needs torchvision (not installed here)."""
    from circuit_breakers.multimodal.processing import image_only_processor_class

    return image_only_processor_class("qwen2_vl")


def make_tiny_vlm(family: str = "llava", *, layers: int = 4, seed: int = 0):
    """(model, processor): a randomly initialised vision-language model of a real family (a 2-block vision
    tower on 16x16 images, a Llama or Qwen2-VL text model of `layers` blocks) and its processor around the
    tiny chat tokenizer, with PIL image processors (no torchvision here)."""
    import torch

    tokenizer = make_chat_tokenizer()
    template = _VLM_TEMPLATE.replace("IMAGE", VLM_PLACEHOLDERS[family])
    torch.manual_seed(seed)
    if family in ("llava", "llava_next"):
        from transformers import (CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaNextConfig,
                                  LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaProcessor)
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
        from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        common = dict(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        # LLaVA-NeXT: any-resolution grids of 16x16 tiles (as many tokens per image as its shape asks)
        grids = dict(image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]]) if family == "llava_next" else {}
        images = (LlavaNextImageProcessorPil if grids else LlavaImageProcessorPil)(**common, **grids)
        processor = (LlavaNextProcessor if grids else LlavaProcessor)(
            image_processor=images, tokenizer=tokenizer, patch_size=4, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=template)
        vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=4, projection_dim=16)
        config = (LlavaNextConfig if grids else LlavaConfig)(
            vision_config=vision, text_config=_tiny_text_config(len(tokenizer), layers),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
            vision_feature_select_strategy="default", **grids)
        model = (LlavaNextForConditionalGeneration if grids else LlavaForConditionalGeneration)(config)
    elif family == "idefics3":
        from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor, Idefics3VisionConfig
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        images = Idefics3ImageProcessorPil(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
        processor = Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                      chat_template=template)  # (16 / 4)^2 patches / scale_factor^2
        vision = Idefics3VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=16, patch_size=4)
        config = Idefics3Config(vision_config=vision.to_dict(),
                                text_config=_tiny_text_config(len(tokenizer), layers).to_dict(), scale_factor=2,
                                image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
        model = Idefics3ForConditionalGeneration(config)
    elif family == "qwen2_vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        tokenizer.add_special_tokens({"additional_special_tokens": [
            "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]})
        images = Qwen2VLImageProcessorPil(size={"shortest_edge": 8 * 8 * 4, "longest_edge": 32 * 32}, patch_size=4,
                                          merge_size=2, temporal_patch_size=2)
        processor = _image_only_qwen2_vl_processor()(image_processor=images, tokenizer=tokenizer,
                                                     chat_template=template)
        text = _tiny_text_config(len(tokenizer), layers).to_dict()
        text.update(model_type="qwen2_vl_text", rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
        config = Qwen2VLConfig(
            text_config=text, vision_config=dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2,
                                                 patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"))
        model = Qwen2VLForConditionalGeneration(config)
    else:
        raise ValueError(f"make_tiny_vlm: family must be one of {', '.join(TINY_VLM_FAMILIES)}, got {family!r}")
    tokenizer.name_or_path = f"tiny-{family}-test"
    return model.eval(), processor


def write_test_image(path, size: tuple[int, int] = (20, 24), seed: int = 0):
    """A random RGB PNG of `size` (width, height) at `path`; returns the path."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path
