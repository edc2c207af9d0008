"""Tool use (function calling): calls parsed from model text (`calls`), matched against expected calls
BFCL-style (`matching`), and the opening of a call in a model's own chat template,
for the forced-call attack (`forcing`).

Sits below attacks/judges/evaluation/serving and above data/: it never imports those.
"""
from .calls import ToolCall, call_marker_ids, decode_keeping_call_markers, parse_tool_calls
from .forcing import call_opening
from .matching import call_accuracy, call_mismatch, calls_match, values_equal

__all__ = ["ToolCall", "call_accuracy", "call_marker_ids", "call_mismatch", "call_opening", "calls_match",
           "decode_keeping_call_markers", "parse_tool_calls", "values_equal"]
