"""Teaching tool calls (training/tool_sft.py, `train --teach-tools`) on tiny random models: the tool template,
the loss on assistant tokens only, a step that lowers it, and the saved subject."""
import json

import pytest
import torch

from circuit_breakers.cli import main
from circuit_breakers.data import ChatFormatter, Example, collate
from circuit_breakers.data.schema import DataError
from circuit_breakers.models import ModelError, load_model
from circuit_breakers.tools import call_opening, parse_tool_calls
from circuit_breakers.training.tool_sft import has_tool_support, install_tool_template, response_loss, teach_tool_calls

from ..helpers import make_chat_tokenizer, make_tiny_model, make_tool_tokenizer

SMOLLM2_TEMPLATE = (  # SmolLM2-135M-Instruct's own: a default system turn, no tools
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}


def smollm2_like_tokenizer():
    tokenizer = make_chat_tokenizer()
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    return tokenizer


def call_example(city: str = "Oslo") -> Example:
    return Example(response="", request=f"Weather in {city}?", tools=(TOOL,),
                   tool_calls=({"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}},))


def examples(n: int = 8) -> list[Example]:
    cities = ["Oslo", "Bergen", "Lima", "Quito", "Accra", "Hanoi", "Perth", "Cork"]
    return [call_example(cities[i % len(cities)]) for i in range(n)]


# ---------------------------------------------------------------- the tool template


def test_the_tool_template_renders_tools_and_keeps_conversations_without_them():
    tokenizer = smollm2_like_tokenizer()
    user = [{"role": "user", "content": "Hi."}]
    before = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    assert not has_tool_support(tokenizer)
    assert install_tool_template(tokenizer) is True
    assert has_tool_support(tokenizer)
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == before
    prompt = tokenizer.apply_chat_template(user, tools=[TOOL], tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")  # the default kept
    assert '"name": "get_weather"' in prompt and "<tools>" in prompt
    assert call_opening(tokenizer, [TOOL]) == '<tool_call>\n{"name": "'  # the forced-call attack's prefill
    assert install_tool_template(tokenizer) is False  # already renders tools: left alone


def test_a_rendered_call_parses_back_and_tool_results_are_user_turns():
    tokenizer = smollm2_like_tokenizer()
    install_tool_template(tokenizer)
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    turns = [{"role": "user", "content": "Weather in Oslo?"},
             {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": '{"temp": 3}'}]
    text = tokenizer.apply_chat_template(turns, tools=[TOOL], tokenize=False, add_generation_prompt=True)
    assert [(c.name, c.arguments) for c in parse_tool_calls(text)] == [("get_weather", {"city": "Oslo"})]
    assert '<|im_start|>user\n<tool_response>\n{"temp": 3}\n</tool_response><|im_end|>\n' in text


def test_a_template_with_tool_support_is_kept_and_others_refused():
    hermes = make_tool_tokenizer("hermes")
    template = hermes.chat_template
    assert install_tool_template(hermes) is False and hermes.chat_template == template
    dated = smollm2_like_tokenizer()  # ChatML, but a system turn the replacement would not write
    dated.chat_template = "{{ '<|im_start|>system\\nToday is Monday.<|im_end|>\\n' }}" + SMOLLM2_TEMPLATE
    with pytest.raises(ModelError, match="differently"):
        install_tool_template(dated)
    other = smollm2_like_tokenizer()
    other.get_vocab = lambda: {"hello": 0}  # no ChatML tokens
    with pytest.raises(ModelError, match="not a ChatML model"):
        install_tool_template(other)


# ---------------------------------------------------------------- the loss


def test_only_assistant_tokens_carry_the_loss():
    tokenizer = smollm2_like_tokenizer()
    install_tool_template(tokenizer)
    item = ChatFormatter(tokenizer, 1024, tool_format="template").format(call_example())
    response = tokenizer.decode(item.input_ids[item.response_start:])
    assert response == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
    batch = collate([item], tokenizer.pad_token_id)
    model = make_tiny_model("llama", vocab_size=len(tokenizer), layers=2)
    loss = response_loss(model, batch)
    logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
    targets, mask = batch["input_ids"][0, 1:], batch["response_mask"][0, 1:]
    assert int(mask.sum()) == item.length - item.response_start
    assert loss.item() == pytest.approx(torch.nn.functional.cross_entropy(logits[mask], targets[mask]).item(), rel=1e-5)
    assert loss.item() != pytest.approx(torch.nn.functional.cross_entropy(logits, targets).item(), rel=1e-3)


def test_padding_carries_no_loss():
    tokenizer = smollm2_like_tokenizer()
    install_tool_template(tokenizer)
    fmt = ChatFormatter(tokenizer, 1024, tool_format="template")
    short, long = fmt.format(Example(response="Sure. " * 10, request="Hi")), fmt.format(call_example("Oslo"))
    model = make_tiny_model("llama", vocab_size=len(tokenizer), layers=2)
    alone = response_loss(model, collate([short], tokenizer.pad_token_id))
    padded = collate([short, long], tokenizer.pad_token_id)
    assert padded["input_ids"].shape[1] > short.length  # the short row is padded
    n_short = short.length - short.response_start
    n_long = long.length - long.response_start
    both = response_loss(model, padded)
    other = response_loss(model, collate([long], tokenizer.pad_token_id))
    assert both.item() == pytest.approx((alone.item() * n_short + other.item() * n_long) / (n_short + n_long), rel=1e-4)


def test_teaching_lowers_the_loss_and_returns_a_merged_model():
    tokenizer = smollm2_like_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer), layers=2)
    data = examples(8)
    log = []
    taught = teach_tool_calls(model, tokenizer, data, steps=6, lr=1e-2, lora_r=4, batch_size=4, max_length=1024,
                              seed=0, warmup_steps=0, on_step=log.append)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert set(log[0]) == {"step", "loss", "lr", "tokens", "seconds"}
    assert log[-1]["loss"] < log[0]["loss"]
    assert not any("lora" in name for name, _ in taught.named_parameters())  # merged, a plain model
    assert type(taught).__name__ == "LlamaForCausalLM"
    assert has_tool_support(tokenizer)  # the template went in on the way


def test_teaching_is_reproducible_from_its_seed():
    def weights(seed):
        tokenizer = smollm2_like_tokenizer()
        model = make_tiny_model("llama", vocab_size=len(tokenizer), layers=2)
        taught = teach_tool_calls(model, tokenizer, examples(8), steps=2, lr=1e-2, lora_r=4, batch_size=2,
                                  max_length=1024, seed=seed)
        return taught.model.layers[0].self_attn.q_proj.weight.detach().clone()

    assert torch.equal(weights(0), weights(0))
    assert not torch.equal(weights(0), weights(1))


def test_bad_settings_and_a_prompt_over_max_length_are_refused():
    tokenizer = smollm2_like_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer), layers=2)
    with pytest.raises(ValueError, match="steps"):
        teach_tool_calls(model, tokenizer, examples(2), steps=0)
    with pytest.raises(ValueError, match="at least one example"):
        teach_tool_calls(model, tokenizer, [], steps=1)
    with pytest.raises(DataError, match="max_length"):
        teach_tool_calls(model, tokenizer, examples(2), steps=1, max_length=16)


def test_teaching_stops_at_the_next_step_once_a_signal_came():
    """A Ctrl-C whose KeyboardInterrupt was lost on the way (stopping.py) stops the teaching before its next step."""
    import signal

    from circuit_breakers.stopping import StopSignals

    tokenizer = smollm2_like_tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tokenizer), layers=2)
    log = []
    with StopSignals() as signals:
        signals.received = signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            teach_tool_calls(model, tokenizer, examples(4), steps=3, lr=1e-2, lora_r=4, batch_size=2,
                             max_length=1024, on_step=log.append)
    assert log == []


# ---------------------------------------------------------------- the command and the saved subject


@pytest.fixture
def smollm2_like_checkpoint(tmp_path):
    tokenizer = smollm2_like_tokenizer()
    path = tmp_path / "tiny"
    make_tiny_model("llama", vocab_size=len(tokenizer), layers=2).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_teach_tools_command_saves_a_subject_that_loads_and_renders_tools(tmp_path, smollm2_like_checkpoint, capsys):
    data = tmp_path / "calls.jsonl"
    data.write_text("\n".join(json.dumps(e.to_json()) for e in examples(4)) + "\n")
    out = tmp_path / "taught"
    code = main(["train", "--teach-tools", "--model", str(smollm2_like_checkpoint), "--out", str(out), "--no-progress",
                 "steps=2", "lr=1e-2", "lora_r=4", "batch_size=2", "max_length=1024", f"data={data}", "device=cpu"])
    assert code == 0, capsys.readouterr().err
    assert "saved" in capsys.readouterr().out
    model, tokenizer = load_model(str(out), device="cpu")
    assert has_tool_support(tokenizer)
    assert call_opening(tokenizer, [TOOL]) == '<tool_call>\n{"name": "'
    assert not any("lora" in name for name, _ in model.named_parameters())
    teach = json.loads((out / "teach.json").read_text())
    assert teach["settings"]["steps"] == 2 and len(teach["log"]) == 2
    # A saved subject is a --model for RR: the tool sets format under its own template.
    item = ChatFormatter(tokenizer, 1024, tool_format="template").format(call_example())
    assert "<tool_call>" in tokenizer.decode(item.input_ids[item.response_start:])


@pytest.mark.parametrize("argv, message", [
    (["steps=0"], "steps=0"),
    (["wat=1"], "unknown key"),
    (["lr=-1"], "lr=-1"),
    (["--config", "smollm2-135m"], "no --config"),
])
def test_teach_tools_command_refuses_bad_settings(tmp_path, smollm2_like_checkpoint, capsys, argv, message):
    out = tmp_path / "never"
    options = [a for a in argv if a.startswith("--") or a == "smollm2-135m"]
    overrides = [a for a in argv if a not in options]
    code = main(["train", "--teach-tools", *options, "--model", str(smollm2_like_checkpoint), "--out", str(out),
                 *overrides])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_the_agent_recipe_loads_with_the_tool_sets():
    from circuit_breakers.config import RRConfig, recipe_path
    from circuit_breakers.data.builtin import load_training_sets

    config = RRConfig.load(recipe_path("smollm2-135m-agent"))
    assert config.tool_format == "template" and config.model == "runs/smollm2-tools"
    cb, retain = load_training_sets(config.circuit_breaker_data, config.retain_data, seed=config.seed,
                                    refusals=config.refusal_retain)
    assert any(e.tool_calls for e in cb) and any(e.tool_calls for e in retain)
