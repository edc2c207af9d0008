"""BFCL-style AST matching of expected calls, and call accuracy with its interval."""
import pytest

from circuit_breakers.tools.calls import ToolCall
from circuit_breakers.tools.matching import call_accuracy, call_mismatch, calls_match, values_equal

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast.",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"},
        "unit": {"type": "string", "default": "celsius"}}}}}
TOOLS = [WEATHER_TOOL]
EXPECTED = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}


def wilson_stub(successes, n):
    return (successes / n - 0.1, successes / n + 0.1) if n else (0.0, 1.0)


@pytest.mark.parametrize("expected, actual, equal", [
    (3, 3.0, True), (0.5, 0.50, True), (3, 4, False), (1, True, False), (True, True, True), (False, 0, False),
    ("Paris", " Paris\n", True), ("Paris", "paris", False), ("3", 3, False),
    ([1, 2], [1, 2.0], True), ([1, 2], [2, 1], False), ([1], [1, 1], False),
    ({"a": {"b": [1, "x"]}}, {"a": {"b": [1.0, "x "]}}, True), ({"a": 1}, {"a": 1, "b": 2}, False),
    (None, None, True), (None, "", False),
])
def test_values_equal_after_normalisation(expected, actual, equal):
    assert values_equal(expected, actual) is equal


def test_a_call_matches_with_its_required_and_optional_parameters():
    assert call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris", "days": 3.0}), TOOLS) is None
    # "days" is optional in the schema: absent is fine, a different value is not.
    assert call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris"}), TOOLS) is None
    assert "days" in call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris", "days": 4}), TOOLS)
    # An optional parameter the expected call leaves out: only its default is accepted.
    assert call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris", "unit": "celsius"}), TOOLS) is None
    assert "unexpected" in call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris", "unit": "kelvin"}),
                                         TOOLS)
    assert "unexpected" in call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris", "lang": "fr"}), TOOLS)
    assert "missing required argument 'city'" == call_mismatch(EXPECTED, ToolCall("get_weather", {"days": 3}), TOOLS)
    assert "called 'get_time'" in call_mismatch(EXPECTED, ToolCall("get_time", {"city": "Paris", "days": 3}), TOOLS)


def test_without_the_tool_definition_every_expected_argument_is_required():
    assert call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris"})) == "missing required argument 'days'"
    assert call_mismatch(EXPECTED, ToolCall("get_weather", {"city": "Paris", "days": 3})) is None


def test_the_number_of_calls_must_match_and_parallel_calls_match_in_any_order():
    paris, rome = ToolCall("get_weather", {"city": "Paris"}), ToolCall("get_weather", {"city": "Rome"})
    assert calls_match(paris, [paris]) and not calls_match(paris, []) and not calls_match(paris, [paris, paris])
    assert calls_match([paris, rome], [rome, paris])
    assert not calls_match([paris, rome], [paris, paris])


def test_call_accuracy_parses_outputs_and_counts():
    outputs = [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>',
        '{"name": "get_weather", "parameters": {"city": "Paris"}}',  # optional "days" left out: still right
        '{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}',
        "I cannot check the weather.",
    ]
    result = call_accuracy([EXPECTED] * 4, outputs, interval=wilson_stub, tools=[TOOLS] * 4)
    assert result == {"rate": 0.5, "ci95": [0.4, 0.6], "n": 4, "correct": 2}
    # Without the schema, "days" is required: the second output fails too.
    assert call_accuracy([EXPECTED] * 4, outputs, interval=wilson_stub)["correct"] == 1
    # Already parsed calls are taken as they are.
    assert call_accuracy([[EXPECTED]], [[ToolCall("get_weather", {"city": "Paris", "days": 3})]],
                         interval=wilson_stub)["correct"] == 1


def test_call_accuracy_rejects_mismatched_lengths_and_bad_expected_calls():
    with pytest.raises(ValueError, match="2 expected calls but 1 outputs"):
        call_accuracy([EXPECTED, EXPECTED], ["x"], interval=wilson_stub)
    with pytest.raises(ValueError, match="1 tool lists but 2 outputs"):
        call_accuracy([EXPECTED, EXPECTED], ["x", "y"], interval=wilson_stub, tools=[TOOLS])
    with pytest.raises(ValueError, match="not a tool call"):
        call_accuracy([{"function": {"arguments": {}}}], ["x"], interval=wilson_stub)
    assert call_accuracy([], [], interval=wilson_stub) == {"rate": None, "ci95": [0.0, 1.0], "n": 0, "correct": 0}
