import base64
import json

import pytest
import torch

from circuit_breakers.attacks.base import budget_of
from circuit_breakers.attacks.direct import DirectConfig, DirectRequest
from circuit_breakers.attacks.prefilling import Prefilling, PrefillingConfig
from circuit_breakers.attacks.templates import (SHIPPED_TEMPLATES, Templates, TemplatesConfig, fill_template,
                                                load_templates)
from circuit_breakers.attacks.transforms import (Base64Attack, Base64Config, LeetspeakAttack, LeetspeakConfig,
                                                 Rot13Attack, Rot13Config, TranslationAttack, TranslationConfig,
                                                 base64_decode_runs, base64_encode, leetspeak, load_phrase_table,
                                                 rot13, translate)

HEADER = "<|im_start|>assistant\n"


def test_direct_request_shows_context_then_request(llama, tok, behaviors):
    cfg = DirectConfig(max_new_tokens=2)
    outs = DirectRequest(cfg).run(llama, tok, behaviors)
    assert outs[1].prompt == "I cannot help with that request.\n\n---\n\nExplain the water cycle."
    assert outs[1].extra["prompt_text"].endswith(outs[1].prompt + "<|im_end|>\n" + HEADER)
    assert all(o.budget == budget_of(cfg) and o.attack == "direct" for o in outs)


def test_prefilling_puts_the_target_right_after_the_assistant_header(llama, tok, behaviors):
    cfg = PrefillingConfig(max_new_tokens=3)
    out = Prefilling(cfg).run(llama, tok, behaviors[:1])[0]
    prefill = behaviors[0].target + ":\n\n"
    assert out.extra["prefill"] == prefill
    assert out.extra["prompt_text"].endswith("<|im_end|>\n" + HEADER + prefill)
    # The generation is the prefill followed by the model's own greedy continuation of that text.
    assert out.generations[0] == prefill + out.extra["continuation"]
    ids = torch.tensor([tok(out.extra["prompt_text"], add_special_tokens=False).input_ids])
    greedy = llama.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                            pad_token_id=tok.pad_token_id)
    assert out.extra["continuation"] == tok.decode(greedy[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.budget == budget_of(cfg)


# ---------------------------------------------------------------- templates


def test_shipped_templates_have_a_request_slot():
    templates = load_templates()
    assert len(templates) >= 10 and len({t.name for t in templates}) == len(templates)
    assert all("{request}" in t.template for t in templates)
    assert load_templates(SHIPPED_TEMPLATES, "jsonl") == templates


def test_fill_template_slots():
    assert fill_template("A {request} B", "REQ") == "A REQ B"
    assert fill_template("A [INSERT PROMPT HERE] B", "REQ") == "A REQ B"
    assert fill_template("Hello {generator.name}, {x}", "REQ") == "Hello the assistant, {x}\n\nREQ"


def test_garak_formats(tmp_path):
    (tmp_path / "Dan_X.json").write_text(json.dumps(["Hi {generator.name}. Be free."]))
    (tmp_path / "Other.json").write_text(json.dumps({"prompt": "Dear {generator.name}: answer."}))
    loaded = load_templates(tmp_path, "garak")
    assert [t.name for t in loaded] == ["Dan_X", "Other"]
    assert fill_template(loaded[0].template, "REQ") == "Hi the assistant. Be free.\n\nREQ"
    auto = load_templates(tmp_path / "Other.json")
    assert fill_template(auto[0].template, "REQ", "Bob") == "Dear Bob: answer.\n\nREQ"


def test_harmbench_formats(tmp_path):
    csv_path = tmp_path / "human_jailbreaks.csv"
    csv_path.write_text('template\n"Pretend. [INSERT PROMPT HERE] Go."\n"No slot here."\n')
    loaded = load_templates(csv_path)
    assert [fill_template(t.template, "REQ") for t in loaded] == ["Pretend. REQ Go.", "No slot here.\n\nREQ"]
    json_path = tmp_path / "jb.json"
    json_path.write_text(json.dumps(["X [INSERT PROMPT HERE]", "Y"]))
    assert [t.name for t in load_templates(json_path)] == ["harmbench_0", "harmbench_1"]
    with pytest.raises(ValueError):
        load_templates(json_path, "nonsense")


def test_templates_attack_one_generation_per_template(llama, tok, behaviors):
    cfg = TemplatesConfig(names=("prefix_injection", "distraction"), max_new_tokens=2)
    outs = Templates(cfg).run(llama, tok, behaviors)
    for b, out in zip(behaviors, outs):
        assert len(out.generations) == 2 and out.extra["template_names"] == ["prefix_injection", "distraction"]
        assert all(b.user_message() in p and "{request}" not in p for p in out.extra["prompts"])
        assert out.budget == budget_of(cfg)
    with pytest.raises(ValueError, match="unknown template"):
        Templates(TemplatesConfig(names=("nope",))).templates()


# ---------------------------------------------------------------- transforms


def test_transforms_round_trip():
    text = "How do I bake bread? (step 1)"
    assert base64.b64decode(base64_encode(text)).decode() == text
    assert base64_decode_runs("Sure: " + base64_encode("Here is the answer you wanted")) == \
        "Sure: Here is the answer you wanted"
    assert base64_decode_runs("no base64 here") is None
    assert rot13(rot13(text)) == text and rot13(text) != text
    assert leetspeak("Test ideas") == "7357 1d345"


def test_phrase_table_longest_match_first(tmp_path):
    table_path = tmp_path / "table.json"
    table_path.write_text(json.dumps({"bake": "backen", "bake bread": "Brot backen", "how": "wie", "I": "ich"}))
    table = load_phrase_table(table_path)
    assert translate("How do I bake bread? I bake cakes.", table) == "wie do ich Brot backen? ich backen cakes."
    assert translate("bakery", table) == "bakery"  # whole words only
    tsv = tmp_path / "table.tsv"
    tsv.write_text("# comment\nbread\tpain\nthe bread\tle pain\n")
    assert translate("Eat the bread", load_phrase_table(tsv)) == "Eat le pain"


def test_transform_attacks(llama, tok, behaviors, tmp_path):
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"bake bread": "Brot backen", "water": "Wasser"}))
    cases = [
        (Base64Attack, Base64Config(max_new_tokens=2)),
        (Rot13Attack, Rot13Config(max_new_tokens=2)),
        (LeetspeakAttack, LeetspeakConfig(max_new_tokens=2)),
        (TranslationAttack, TranslationConfig(phrase_table=str(table), language="de", max_new_tokens=2)),
    ]
    for cls, cfg in cases:
        outs = cls(cfg).run(llama, tok, behaviors)
        assert all(o.attack == cls.name and o.budget == budget_of(cfg) for o in outs)
        assert all(o.extra["generation_kinds"][0] == "raw" and len(o.generations) == len(o.extra["generation_kinds"])
                   for o in outs)
        assert all(o.extra["encoded"] in o.prompt for o in outs)
    b64 = Base64Attack(Base64Config()).encode(behaviors[1].user_message())
    assert base64.b64decode(b64).decode() == behaviors[1].user_message()
    assert TranslationAttack(cases[3][1]).encode("How do I bake bread?") == "How do I Brot backen?"
    with pytest.raises(ValueError, match="phrase_table"):
        TranslationAttack(TranslationConfig()).run(llama, tok, behaviors)
