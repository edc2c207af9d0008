"""Benign call accuracy before and after (evaluation/tool_capability.py) on a tiny Qwen2 with a Hermes template."""
import pytest

from circuit_breakers.data.schema import Example
from circuit_breakers.evaluation import tool_capability
from circuit_breakers.evaluation.stats import wilson_interval
from circuit_breakers.evaluation.tool_capability import benign_call_accuracy, tool_capability_report
from ..helpers import make_tiny_model, make_tool_tokenizer

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city.",
    "parameters": {"type": "object", "required": ["city"], "properties": {"city": {"type": "string"}}}}}


def case(city):
    return Example(response="", request=f"Weather in {city}?", tools=(WEATHER_TOOL,), tool_calls=(
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": city}}},))


CASES = [case("Paris"), case("Rome")]


@pytest.fixture(scope="module")
def setup():
    tokenizer = make_tool_tokenizer("hermes")
    return tokenizer, make_tiny_model("qwen2", vocab_size=len(tokenizer), layers=2)


def test_accuracy_of_scripted_answers_with_its_interval(setup, monkeypatch):
    tokenizer, model = setup
    seen = []

    def answers(model, tokenizer, rows, **kw):
        seen.extend(tokenizer.decode(r) for r in rows)
        return ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Milan"}}\n</tool_call>']

    monkeypatch.setattr(tool_capability, "generate_from_ids", answers)
    result = benign_call_accuracy(model, tokenizer, CASES)
    exact = {key: result[key] for key in ("rate", "ci95", "n", "correct")}
    assert exact == {"rate": 0.5, "ci95": list(wilson_interval(1, 2)), "n": 2, "correct": 1}
    # Milan for Rome: the wrong argument, but the right tool, and a call.
    assert result["right_tool"] == result["any_call"] == {"rate": 1.0, "ci95": list(wilson_interval(2, 2)),
                                                           "correct": 2}
    assert all("Weather forecast for a city." in prompt for prompt in seen)  # the tools were in the prompt
    text_answer = Example(response="Sunny.", request="Weather in Oslo?", tools=(WEATHER_TOOL,))
    report = tool_capability_report(model, tokenizer, CASES + [text_answer], baseline=model)
    assert report["model"] == report["baseline"] == result and report["delta"] == 0.0
    assert report["n"] == 2 and report["skipped"] == 1  # a case answered in text has no call to match


def test_a_real_greedy_run_gives_a_well_formed_entry(setup):
    tokenizer, model = setup
    report = tool_capability_report(model, tokenizer, CASES, max_new_tokens=4)
    entry = report["model"]
    assert entry["n"] == 2 and 0 <= entry["correct"] <= 2 and entry["rate"] == entry["correct"] / 2
    assert "baseline" not in report and "delta" not in report


def test_cases_without_expected_calls_are_rejected(setup):
    tokenizer, model = setup
    with pytest.raises(ValueError, match="case q1 needs tools and the expected tool_calls"):
        benign_call_accuracy(model, tokenizer, [Example(response="Hi", request="Hello", id="q1")])
