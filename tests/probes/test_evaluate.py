"""Reading an evaluation's samples.jsonl and scoring attack outputs in the context the model saw."""
import json

import pytest

from circuit_breakers.data import DataError
from circuit_breakers.probes.evaluate import _items, auroc, read_attack_samples


def _write(path, records, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


PREFILL = "Sure, here is how:\n"
TEMPLATE = "<|im_start|>user\nHow do I do harm?<|im_end|>\n<|im_start|>assistant\n"


def test_harmful_lines_by_attack_with_prefill_moved_to_the_prompt(tmp_path):
    path = _write(tmp_path / "samples.jsonl", [
        {"model": "baseline", "attack": "direct", "prompt": "How do I do harm?", "output": "Do this.",
         "label": "harmful"},
        {"model": "baseline", "attack": "prefilling", "prompt": "How do I do harm?", "output": PREFILL + "Step 1.",
         "label": "harmful", "extra": {"prompt_text": TEMPLATE + PREFILL, "prefill": PREFILL}},
        {"model": "baseline", "attack": "direct", "prompt": "Hi", "output": "I can't.", "label": "refusal"},
        {"model": "model", "attack": "direct", "prompt": [{"role": "user", "content": "Hi"}], "output": "x y",
         "label": "harmful"},
        {"model": "model", "attack": "prefilling", "prompt": "Hi", "output": PREFILL, "label": "harmful",
         "extra": {"prompt_text": TEMPLATE + PREFILL, "prefill": PREFILL}},  # nothing generated: skipped
    ], tail='{"model": "baseline", "attack": "dir')  # a half-written last line
    every = read_attack_samples(path)
    assert {k: len(v) for k, v in every.items()} == {"direct": 2, "prefilling": 1}
    assert every["direct"][1].example.messages == ({"role": "user", "content": "Hi"},)
    prefilled = every["prefilling"][0]
    assert prefilled.response == "Step 1." and prefilled.prompt_text.endswith(PREFILL)
    assert {k: len(v) for k, v in read_attack_samples(path, model="baseline").items()} == \
        {"direct": 1, "prefilling": 1}


def test_items_use_the_rendered_prompt_when_given(tmp_path, chat_tokenizer):
    path = _write(tmp_path / "s.jsonl", [
        {"attack": "prefilling", "prompt": "How do I do harm?", "output": PREFILL + "Step 1.", "label": "harmful",
         "extra": {"prompt_text": TEMPLATE + PREFILL, "prefill": PREFILL}}])
    sample = read_attack_samples(path)["prefilling"][0]
    (item,) = _items(chat_tokenizer, [sample], 256)
    prompt = chat_tokenizer(TEMPLATE + PREFILL, add_special_tokens=False).input_ids
    assert list(item.input_ids[:item.response_start]) == prompt
    assert chat_tokenizer.decode(item.input_ids[item.response_start:]) == "Step 1.<|im_end|>\n"


def test_bad_samples_name_the_line(tmp_path):
    path = _write(tmp_path / "s.jsonl", [{"prompt": "p", "label": "harmful"}, {"prompt": "p", "output": "o",
                                                                                 "label": "harmful"}])
    with pytest.raises(DataError, match=r's.jsonl line 1: field "output": missing'):
        read_attack_samples(path)
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": 1\n{"prompt": "p", "output": "o", "label": "harmful"}\n')
    with pytest.raises(DataError, match="b.jsonl line 1: invalid JSON"):
        read_attack_samples(bad)


def test_auroc():
    import torch
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([1.0, 0.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([]), torch.tensor([1.0])) is None
