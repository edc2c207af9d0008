"""Evaluation: the pipeline (one full run), behaviours, the attack harness, judges' agreement, capability, representation diagnostics.

Names load lazily, so that `circuit-breakers --help` (which imports evaluation.cli) stays light.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "representation_similarity": "diagnostics", "representation_report": "diagnostics",
    "Behavior": "behaviors", "BehaviorError": "behaviors", "derive_target": "behaviors",
    "load_behaviors": "behaviors", "load_harmbench_csv": "behaviors", "load_behaviors_jsonl": "behaviors",
    "load_targets": "behaviors", "builtin_behaviors": "behaviors",
    "evaluate": "harness", "read_samples": "harness", "summarize": "harness", "write_results": "harness",
    "wilson_interval": "stats",
    "capability_report": "capability", "token_f1": "capability", "heldout_perplexity": "capability",
    "load_labelled": "agreement", "judge_agreement": "agreement", "format_confusion": "agreement",
    "run_evaluation": "pipeline", "EvalConfig": "pipeline", "load_eval_config": "pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
