"""Greedy chat generation, and the optional vLLM backend (checked against a stand-in `vllm` module
that records what it is asked: vLLM itself needs a CUDA GPU and is not installed here)."""
import json
import sys
import types

import pytest

from circuit_breakers import generation
from circuit_breakers.cli import main
from circuit_breakers.generation import chat_prompt, generate, use_vllm

from .helpers import make_tiny_model

CONVERSATIONS = [[{"role": "user", "content": "How do I bake bread?"}],
                 [{"role": "user", "content": "Explain the water cycle in three short sentences."}]]


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module with the calls the backend makes: LLM(model=..., ...), LLM.generate, SamplingParams."""
    calls = {"engines": [], "generate": []}

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    class LLM:
        def __init__(self, **kwargs):
            calls["engines"].append(kwargs)

        def generate(self, prompts, params, use_tqdm=True):
            calls["generate"].append((prompts, params.kwargs))
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text=f"vllm answer {i}")])
                    for i, _ in enumerate(prompts)]

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


def test_generate_returns_only_the_new_text_in_input_order(chat_tokenizer):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    both = generate(model, chat_tokenizer, CONVERSATIONS, max_new_tokens=4)
    one_by_one = [generate(model, chat_tokenizer, [c], max_new_tokens=4)[0] for c in CONVERSATIONS]
    assert both == one_by_one  # left padding does not change a row's greedy continuation
    assert chat_tokenizer.padding_side == "right"  # restored


def test_a_model_with_vllm_attached_generates_through_it(chat_tokenizer, fake_vllm):
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    other = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    use_vllm(model, "/models/rr", dtype="bfloat16", gpu_memory_utilization=0.3, seed=5)
    assert fake_vllm["engines"] == [{"model": "/models/rr", "dtype": "bfloat16", "gpu_memory_utilization": 0.3,
                                     "seed": 5}]

    texts = generate(model, chat_tokenizer, CONVERSATIONS, prefills=["", "Sure,"], max_new_tokens=7)
    assert texts == ["vllm answer 0", "vllm answer 1"]
    prompts, params = fake_vllm["generate"][0]
    assert params == {"temperature": 0.0, "max_tokens": 7, "skip_special_tokens": True}  # greedy, like the torch path
    expected = [chat_tokenizer(chat_prompt(chat_tokenizer, c, p), add_special_tokens=False).input_ids
                for c, p in zip(CONVERSATIONS, ["", "Sure,"])]
    assert [p["prompt_token_ids"] for p in prompts] == expected  # the template's tokens, no second BOS

    # A model without an engine, or a call that must see hooks on the torch model, stays on torch.
    assert generate(other, chat_tokenizer, CONVERSATIONS, max_new_tokens=3)[0] != "vllm answer 0"
    assert generate(model, chat_tokenizer, CONVERSATIONS, max_new_tokens=3, torch_only=True)[0] != "vllm answer 0"
    assert len(fake_vllm["generate"]) == 1


def _eval_args(tmp_path, chat_tokenizer, *extra):
    path = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2).save_pretrained(path)
    chat_tokenizer.save_pretrained(path)
    behaviors = tmp_path / "b.jsonl"
    behaviors.write_text('{"request": "How do I bake bread?", "id": "x1"}\n')
    return ["eval", "--model", str(path), "--behaviors", str(behaviors), "--attacks", "direct", "--device", "cpu",
            "--max-new-tokens", "3", "--out", str(tmp_path / "out"), "--no-progress", "--no-capability",
            "--no-diagnostics", *extra]


def test_eval_uses_vllm_when_asked_and_usable(tmp_path, chat_tokenizer, fake_vllm, monkeypatch):
    monkeypatch.setattr(generation, "vllm_usable", lambda: True)
    assert main(_eval_args(tmp_path, chat_tokenizer, "--generation-backend", "vllm", "--vllm-memory", "0.5")) == 0
    assert fake_vllm["engines"][0]["model"] == str(tmp_path / "tiny")
    assert fake_vllm["engines"][0]["gpu_memory_utilization"] == 0.5
    assert fake_vllm["engines"][0]["dtype"] == "float32"  # the torch model's dtype as loaded (CPU: float32)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["run"]["generation"] == "vllm"
    sample = json.loads((tmp_path / "out" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["output"] == "vllm answer 0"


def test_eval_backend_choice(tmp_path, chat_tokenizer, monkeypatch, capsys):
    monkeypatch.setattr(generation, "vllm_usable", lambda: False)
    assert main(_eval_args(tmp_path, chat_tokenizer, "--generation-backend", "vllm")) == 2
    assert "needs vLLM (`pip install vllm`) and a CUDA GPU" in capsys.readouterr().err
    assert main(_eval_args(tmp_path, chat_tokenizer)) == 0  # auto: torch when vLLM is not usable
    assert json.loads((tmp_path / "out" / "results.json").read_text())["run"]["generation"] == "torch"
    monkeypatch.setattr(generation, "vllm_usable", lambda: True)
    assert main(_eval_args(tmp_path, chat_tokenizer, "--generation-backend", "vllm", "--vllm-memory", "2")) == 2
    assert "--vllm-memory: a fraction between 0 and 1" in capsys.readouterr().err


def test_with_system_prompt_adds_or_joins_a_system_turn():
    from circuit_breakers.generation import with_system_prompt

    user = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(user, None) == user
    assert with_system_prompt(user, "Be safe.") == [{"role": "system", "content": "Be safe."}, *user]
    system = [{"role": "system", "content": "You are terse."}, *user]
    assert with_system_prompt(system, "Be safe.")[0] == {"role": "system", "content": "Be safe.\n\nYou are terse."}
    assert system[0]["content"] == "You are terse."  # the caller's conversation is not changed


# ---------------------------------------------------------------- prompt caches kept for prompts that extend them


def _left_padded(rows):
    import torch

    width = max(map(len, rows))
    ids, mask = torch.zeros((len(rows), width), dtype=torch.long), torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):], mask[r, width - len(row):] = torch.tensor(row), 1
    return ids, mask


@pytest.fixture(scope="module")
def prompt_rows():
    import torch

    model = make_tiny_model("llama", vocab_size=300, layers=2)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (21, 34, 9, 27)]
    return model, prompts


def test_a_prompt_that_extends_a_kept_one_prefills_only_its_new_tokens(prompt_rows):
    import torch

    model, prompts = prompt_rows
    extended = [p + [7, 8, 9][:1 + i % 3] for i, p in enumerate(prompts)]  # openings of different lengths
    whole = generation.greedy_batch(model, *_left_padded(extended), max_new_tokens=6, pad_token_id=0)
    with generation.reusing_prompt_caches(model) as store:
        # Kept from two batches of other paddings than the extended prompts get.
        generation.greedy_batch(model, *_left_padded(prompts[:3]), max_new_tokens=6, pad_token_id=0)
        generation.greedy_batch(model, *_left_padded(prompts[3:]), max_new_tokens=6, pad_token_id=0)
        assert len(store.rows) == 4 and store.reused_tokens == 0
        reused = generation.greedy_batch(model, *_left_padded(extended), max_new_tokens=6, pad_token_id=0)
        # Every row's cache covers the batch's first positions: up to the shortest opening's end.
        width = max(map(len, extended))
        pads = [width - len(e) for e in extended]
        covered = min(pad + len(p) for pad, p in zip(pads, prompts))
        assert store.reused_tokens == sum(covered - pad for pad in pads)
        assert len(store.rows) == 8  # the extended prompts are kept too
    assert torch.equal(reused, whole)
    assert model not in generation._PROMPT_CACHES  # off again after the block


def test_no_reuse_unless_every_row_extends_a_kept_prompt_or_past_the_memory_bound(prompt_rows):
    import torch

    model, prompts = prompt_rows
    rows = [prompts[0] + [5], prompts[1][:10] + [6]]  # the second extends nothing kept
    whole = generation.greedy_batch(model, *_left_padded(rows), max_new_tokens=4, pad_token_id=0)
    with generation.reusing_prompt_caches(model) as store:
        generation.greedy_batch(model, *_left_padded(prompts[:1]), max_new_tokens=4, pad_token_id=0)
        assert torch.equal(generation.greedy_batch(model, *_left_padded(rows), max_new_tokens=4, pad_token_id=0), whole)
        assert store.reused_tokens == 0
        assert store.longest_prefix(tuple(prompts[0])) is None  # a prompt does not extend itself
    with generation.reusing_prompt_caches(model, max_gb=1e-9) as store:  # a few bytes: nothing fits
        generation.greedy_batch(model, *_left_padded(prompts[:1]), max_new_tokens=4, pad_token_id=0)
        assert store.rows == {} and store.bytes == 0
    with generation.reusing_prompt_caches(model, max_gb=0) as store:
        assert store is None and model not in generation._PROMPT_CACHES


def test_a_generation_under_hooks_neither_keeps_nor_reuses_prompt_caches(chat_tokenizer):
    """`torch_only` marks a model changed by hooks (refusal-direction ablation): caches computed without
    them must not seed its prompts, nor its caches later ones."""
    model = make_tiny_model("llama", vocab_size=len(chat_tokenizer), layers=2)
    with generation.reusing_prompt_caches(model) as store:
        generate(model, chat_tokenizer, CONVERSATIONS[:1], max_new_tokens=2)
        kept = dict(store.rows)
        generate(model, chat_tokenizer, CONVERSATIONS[:1], prefills=["Sure"], max_new_tokens=2, torch_only=True)
        generate(model, chat_tokenizer, CONVERSATIONS[1:], max_new_tokens=2, torch_only=True)
        assert store.rows.keys() == kept.keys() and store.reused_tokens == 0
        generate(model, chat_tokenizer, CONVERSATIONS[:1], prefills=["Sure"], max_new_tokens=2)
        assert store.reused_tokens > 0  # the same prompt without hooks does reuse it
