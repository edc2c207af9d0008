import copy

import pytest
import torch

from circuit_breakers.data import (ChatFormatter, DataError, Example, TokenizedExample, collate,
                                   refusal_examples, tokenize_examples)

EXAMPLE = Example(response="Sure, here is a simple recipe.", request="How do I bake bread?",
                  source="harm.jsonl:7")


def decode(tokenizer, ids):
    return tokenizer.decode(list(ids))


def test_prompt_response_split_and_end_of_turn(chat_tokenizer):
    fmt = ChatFormatter(chat_tokenizer, max_length=512)
    out = fmt.format(EXAMPLE)
    prompt = decode(chat_tokenizer, out.input_ids[:out.response_start])
    assert prompt == "<|im_start|>user\nHow do I bake bread?<|im_end|>\n<|im_start|>assistant\n"
    assert decode(chat_tokenizer, out.input_ids[out.response_start:]) == EXAMPLE.response + "<|im_end|>\n"
    assert fmt.end_of_turn == "<|im_end|>\n"
    im_end = chat_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert out.input_ids[-2] == im_end  # a single special token, not its characters
    assert out.source == "harm.jsonl:7" and out.length == len(out.input_ids)


def test_messages_are_used_instead_of_request(chat_tokenizer):
    ex = Example(response="Hi!", request="ignored",
                 messages=({"role": "system", "content": "S"}, {"role": "user", "content": "U"}))
    out = ChatFormatter(chat_tokenizer, 512).format(ex)
    prompt = decode(chat_tokenizer, out.input_ids[:out.response_start])
    assert prompt.startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>")
    assert "ignored" not in prompt


def test_end_of_turn_from_other_templates(chat_tokenizer):
    llama3 = ("{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n'"
              " + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
              "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
    assert ChatFormatter(chat_tokenizer, 64, chat_template=llama3).end_of_turn == "<|eot_id|>"
    # A template that writes nothing after a reply: fall back to the eos token.
    bare = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}{% endfor %}"
    fmt = ChatFormatter(chat_tokenizer, 64, chat_template=bare)
    out = fmt.format(Example(response="ok", request="q"))
    assert fmt.end_of_turn == "</s>" and out.input_ids[-1] == chat_tokenizer.eos_token_id


def test_no_chat_template_is_a_data_error(chat_tokenizer):
    plain = copy.deepcopy(chat_tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"'tiny-chatml-test' has no chat template; pass `chat_template`"):
        ChatFormatter(plain, 64)
    assert ChatFormatter(plain, 64, chat_template=chat_tokenizer.chat_template).end_of_turn == "<|im_end|>\n"


def test_response_truncated_from_the_end(chat_tokenizer):
    full = ChatFormatter(chat_tokenizer, 512).format(EXAMPLE)
    limit = full.response_start + 3
    out = ChatFormatter(chat_tokenizer, limit).format(EXAMPLE)
    assert out.length == limit and out.response_start == full.response_start
    assert out.input_ids == full.input_ids[:limit]


def test_too_long_errors_name_source_field_and_counts(chat_tokenizer):
    full = ChatFormatter(chat_tokenizer, 512).format(EXAMPLE)
    with pytest.raises(DataError, match=rf'harm\.jsonl:7: field "response": prompt \+ response is '
                                        rf'{full.length} tokens, over max_length={full.length - 1}'):
        ChatFormatter(chat_tokenizer, full.length - 1, truncation="error").format(EXAMPLE)
    assert ChatFormatter(chat_tokenizer, full.length, truncation="error").format(EXAMPLE) == full
    with pytest.raises(DataError, match=rf'harm\.jsonl:7: field "request": the prompt is '
                                        rf'{full.response_start} tokens.*max_length={full.response_start}'):
        ChatFormatter(chat_tokenizer, full.response_start).format(EXAMPLE)
    messages_ex = Example(response="r", messages=({"role": "user", "content": "x" * 50},), source="m:1")
    with pytest.raises(DataError, match='m:1: field "messages"'):
        ChatFormatter(chat_tokenizer, 10).format(messages_ex)


def test_instruction_drop(chat_tokenizer):
    always = ChatFormatter(chat_tokenizer, 512, drop_instruction_prob=1.0).format(EXAMPLE)
    assert decode(chat_tokenizer, always.input_ids) == (
        "<|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n" + EXAMPLE.response + "<|im_end|>\n")
    never = ChatFormatter(chat_tokenizer, 512, drop_instruction_prob=0.0)
    assert all("bake bread" in decode(chat_tokenizer, never.format(EXAMPLE).input_ids) for _ in range(50))

    def choices(seed):
        fmt = ChatFormatter(chat_tokenizer, 512, drop_instruction_prob=0.5, seed=seed)
        return [fmt.format(EXAMPLE).response_start == always.response_start for _ in range(40)]

    assert choices(1) == choices(1)
    assert 0 < sum(choices(1)) < 40 and choices(1) != choices(2)


def test_tokenize_examples_and_refusals(chat_tokenizer):
    harmful = [Example(response="bad", request=f"q{i}", id=str(i), source=f"h:{i}") for i in range(20)]
    refusals = ["I can't help with that.", "I'm sorry, no."]
    retain = refusal_examples(harmful, refusals, seed=0)
    assert retain == refusal_examples(harmful, refusals, seed=0)
    assert [r.request for r in retain] == [h.request for h in harmful]
    assert {r.response for r in retain} == set(refusals)  # both drawn over 20 items
    assert all(r.category == "refusal" and r.source == h.source for r, h in zip(retain, harmful))
    assert retain[0].id == "0-refusal"
    tokenized = tokenize_examples(retain, ChatFormatter(chat_tokenizer, 128))
    assert len(tokenized) == 20 and all(isinstance(t, TokenizedExample) for t in tokenized)
    assert decode(chat_tokenizer, tokenized[3].input_ids[tokenized[3].response_start:]).startswith(
        retain[3].response)


def test_collate_right_and_left_padding():
    batch = [TokenizedExample((5, 6, 7, 8), 2), TokenizedExample((9, 10), 1)]
    out = collate(batch, pad_token_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert out["response_mask"].tolist() == [[False, False, True, True], [False, True, False, False]]
    assert out["input_ids"].dtype == torch.long and out["attention_mask"].dtype == torch.long
    assert out["response_mask"].dtype == torch.bool

    left = collate(batch, pad_token_id=0, pad_to=6, padding_side="left")
    assert left["input_ids"].shape == (2, 6)
    assert left["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8], [0, 0, 0, 0, 9, 10]]
    assert left["attention_mask"].tolist()[1] == [0, 0, 0, 0, 1, 1]
    assert left["response_mask"].tolist()[1] == [False] * 5 + [True]
    with pytest.raises(ValueError, match="shorter than the longest"):
        collate(batch, pad_token_id=0, pad_to=3)
