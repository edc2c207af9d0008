"""Judges label model outputs: harmful, refusal, broken-down or benign answer (or "error").

`make_judge(name, judge_model=None, reference=None)`:
- "refusal":   keyword matching (`RefusalJudge`);
- "heuristic": refusal phrases + broken-down checks + on-topic overlap (`HeuristicJudge`); with
               `reference=(model, tokenizer)` of the ORIGINAL model it also uses perplexity;
- "harmbench": the HarmBench classifier from a local path or `URL[#MODEL]` (`HarmBenchJudge`);
- "llm":       a chat model behind an OpenAI-compatible endpoint `URL[#MODEL]` (`LLMJudge`);
- "fitted":    a logistic regression over the heuristic's signals, fitted on the fit part of the hand
               labels (`FittedJudge`; `judge_model`: its parameters file, default the shipped one);
               `reference` as for heuristic;
- "tool_call": a call of the behaviour's `harmful_call` tool with a non-trivial key argument
               (`ToolCallJudge`; function-calling behaviours only).
"""
from .base import ERROR, LABELS, BaseJudge, Judge, JudgeError, Verdict
from .heuristic import HeuristicJudge, output_perplexities
from .refusal import RefusalJudge, is_refusal

JUDGES = ("refusal", "heuristic", "fitted", "harmbench", "llm", "tool_call")


def make_judge(name: str, judge_model: str | None = None, *, reference=None, **kwargs) -> Judge:
    """A judge by name; `judge_model` is the classifier path or endpoint URL for harmbench and llm."""
    if name == "refusal":
        return RefusalJudge(**kwargs)
    if name == "heuristic":
        model, tokenizer = reference if reference is not None else (None, None)
        return HeuristicJudge(model=model, tokenizer=tokenizer, **kwargs)
    if name == "fitted":
        from .fitted import DEFAULT_PARAMS, FittedJudge
        model, tokenizer = reference if reference is not None else (None, None)
        return FittedJudge.load(judge_model or DEFAULT_PARAMS, model=model, tokenizer=tokenizer, **kwargs)
    if name == "harmbench":
        from .harmbench import HarmBenchJudge
        return HarmBenchJudge.from_spec(judge_model, **kwargs)
    if name == "llm":
        from .llm import LLMJudge
        return LLMJudge.from_spec(judge_model, **kwargs)
    if name == "tool_call":
        from .tool_call import ToolCallJudge
        return ToolCallJudge(**kwargs)
    raise ValueError(f"unknown judge {name!r}; choose one of {', '.join(JUDGES)}")


__all__ = ["ERROR", "JUDGES", "LABELS", "BaseJudge", "HeuristicJudge", "Judge", "JudgeError", "RefusalJudge",
           "Verdict", "is_refusal", "make_judge", "output_perplexities"]
