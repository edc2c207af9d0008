"""Reports: report.md with figure files and a self-contained report.html."""
import re

from circuit_breakers.reports import write_report


def _entry(asr, n=10, errors=0):
    return {"asr": asr, "ci95": [max(0.0, asr - 0.2), min(1.0, asr + 0.2)], "n": n, "broken": int(asr * n),
            "errors": errors, "judge": "heuristic", "budget": {"max_new_tokens": 64, "batch_size": 16},
            "samples_per_behavior": 1, "max_new_tokens": 64}


def full_results():
    return {
        "version": 1, "seed": 0, "created": "2025-01-01T00:00:00", "judge": {"name": "heuristic"},
        "behaviors": {"n": 10}, "run": {"model": "runs/demo/model", "baseline": "smollm2-135m"},
        "asr": {"model": {"direct": _entry(0.1), "prefilling": _entry(0.2, errors=1)},
                "baseline": {"direct": _entry(0.5), "prefilling": _entry(0.9)}},
        "capability": {
            "over_refusal": {m: {k: {"n": 5, "refusal_rate": 0.2, "broken_down_rate": 0.1, "not_answered_rate": 0.3,
                                     "labels": {}} for k in ("borderline", "benign")} for m in ("model", "baseline")},
            "agreement": {"exact_match": 0.4, "token_f1": 0.8, "n": 5},
            "perplexity": {"model": {"perplexity": 5.0}, "baseline": {"perplexity": 4.5}},
            "lm_eval": {"skipped": "lm_eval is not installed", "command": "lm_eval --model hf ..."}},
        "diagnostics": {name: {"per_layer": {str(l): {"cosine": c - 0.1 * l, "norm_ratio": 1 + 0.2 * l}
                                             for l in range(4)}, "mean_cosine": c, "items": 3, "tokens": "response"}
                        for name, c in (("harmful", 0.5), ("benign", 1.0))} | {"target_layers": [1, 2]},
        "judge_agreement": {"heuristic": {"n": 7, "accuracy": 0.7, "binary_accuracy": 0.9, "harmful_precision": 0.5,
                                          "harmful_recall": 1.0, "errors": 0,
                                          "confusion": {t: {p: 1 for p in ("harmful", "refusal", "broken-down",
                                                                             "benign answer", "error")}
                                                        for t in ("harmful", "refusal", "broken-down", "benign answer")}}},
    }


def test_report_files_are_written_and_self_contained(tmp_path):
    md, page = write_report(full_results(), tmp_path)
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 3  # ASR, over-refusal, cosine
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', text)
    assert "<script" not in text and "<link" not in text and "http://" not in text and "https://" not in text
    assert "prefilling" in text and "50.0% [30.0, 70.0]" in text and "harmful vs not" in text
    markdown = md.read_text()
    for figure in re.findall(r"\]\((figures/[^)]+)\)", markdown):
        assert (tmp_path / figure).stat().st_size > 1000
    assert "| attack | judge | n | budget |" in markdown
    assert "Agreement with hand labels: 70.0%" in markdown
    assert "max_new_tokens=64" in markdown and "Target layers: [1, 2]" in markdown
    assert "heuristic (agrees 90.0% harmful-vs-not, n=7)" in markdown


def test_report_from_a_results_file_with_missing_sections(tmp_path):
    import json

    results = full_results()
    for key in ("capability", "diagnostics", "judge_agreement"):
        results.pop(key)
    results["asr"].pop("baseline")
    (tmp_path / "results.json").write_text(json.dumps(results))
    md, page = write_report(tmp_path / "results.json")
    text = md.read_text()
    assert "not measured" in text and "No hand-labelled set given" in text
    assert page.read_text().count("data:image/png;base64,") == 1


def test_asr_figures_have_one_formatter():
    """The report, the eval summary and the demo's table print an ASR entry the same way."""
    from circuit_breakers.demo import eval_report
    from circuit_breakers.evaluation.cli import summary
    from circuit_breakers.evaluation.stats import asr_text
    from circuit_breakers.reports.render import build_blocks

    entry = _entry(0.5)
    assert asr_text(entry) == "50.0% [30.0, 70.0]" and asr_text(entry, with_n=True) == "50.0% [30.0, 70.0] n=10"
    assert asr_text(None) == "n/a" and asr_text({**entry, "asr": None}) == "n/a"
    assert asr_text(entry, "complied") == "n/a"  # an entry from before the two rates: harmful only
    table = next(b for b in build_blocks(full_results()) if b.kind == "table")
    assert asr_text(entry) in table.rows[0]
    assert f"harmful {asr_text(entry)}  n=10" in summary(full_results())
    cells = {"asr": {"direct": {"before": entry, "after": _entry(0.1)}}, "dir": "d", "seconds": 1, "judge": "j"}
    assert f"{asr_text(entry, with_n=True):<30} {asr_text(_entry(0.1), with_n=True)}" in eval_report(cells)


def test_image_capability_table(tmp_path):
    results = full_results()
    accuracy = {"model": {"rate": 0.25, "ci95": [0.05, 0.7], "n": 4, "correct": 1},
                "baseline": {"rate": 0.5, "ci95": [0.15, 0.85], "n": 4, "correct": 2}}
    results["image_capability"] = {"n": 4, "max_new_tokens": 32, "accuracy_delta": -0.25,
                                   "agreement": {"exact_match": 0.5, "token_f1": 0.75, "n": 4},
                                   **{m: {"accuracy": a} for m, a in accuracy.items()}}
    md, page = write_report(results, tmp_path)
    markdown = md.read_text()
    assert "Image questions" in markdown and "50.0% exact, mean token F1 0.750" in markdown
    assert "| after (model) | 1 / 4 | 25.0% [5.0, 70.0] |" in markdown
    assert "2 / 4" in page.read_text()
    results["image_capability"]["agreement"] = {"skipped": "no baseline model to compare with"}
    assert "baseline's answers: no baseline model to compare with." in write_report(results, tmp_path)[0].read_text()
