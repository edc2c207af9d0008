"""report.md and a self-contained report.html from results.json.

The report is built once as a list of blocks (heading, text, table, figure, preformatted) and
rendered twice: Markdown (figures written as PNG files under figures/) and HTML (figures inlined
as base64 data URIs; no external scripts, styles, fonts or images).
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write_text
from ..evaluation.stats import asr_text, rate_text
from ..judges.base import MEASURES
from . import plots

NOT_DONE = "not measured"


@dataclass
class Block:
    kind: str  # "h2", "p", "table", "figure", "pre"
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    png: bytes | None = None
    name: str = ""


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _budget(budget: dict, limit: int = 6) -> str:
    parts = []
    for key, value in (budget or {}).items():
        if isinstance(value, (dict, list)) or (isinstance(value, str) and len(value) > 30):
            continue
        parts.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    more = len(parts) - limit
    return ", ".join(parts[:limit]) + (f", +{more} more" if more > 0 else "") if parts else "-"


def _num(value, fmt: str = "{:.3f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _heldout_text(judge: dict) -> str:
    """The judge's own held-out agreement (a fitted judge records it), or where to measure it."""
    own = (judge.get("heldout") or {}).get(judge.get("name"))
    if not own:
        return "Judge not validated against hand labels in this run (see docs/labelling.md)."
    return (f"Held-out agreement with hand labels of smollm2-135m outputs it was never fitted on: "
            f"{_pct(own.get('complied_accuracy'))} complied-vs-not (n={own.get('complied_n')}), "
            f"{_pct(own.get('accuracy'))} over 4 labels (n={own.get('n')}); another model's outputs may differ.")


def build_blocks(results: dict) -> list[Block]:
    blocks: list[Block] = []
    spec = results.get("run", {})
    judge = results.get("judge", {})
    agreement = results.get("judge_agreement") or {}
    judge_name = judge.get("name", "?")
    validated = agreement.get(judge_name)
    lines = [f"Model (after): `{spec.get('model', 'model')}`" + (f"; baseline (before): `{spec['baseline']}`"
                                                                    if spec.get("baseline") else "; no baseline"),
             f"Behaviours: {results.get('behaviors', {}).get('n', '?')} ({spec.get('behaviors', 'built-in test split')}); "
             f"seed {results.get('seed')}; created {results.get('created', '?')}.",
             f"Judge: `{judge_name}` ({', '.join(f'{k}={v}' for k, v in judge.items() if k != 'name') or 'defaults'}). "
             + (f"Agreement with hand labels: {_pct(validated['accuracy'])} over 4 labels, "
                f"{_pct(validated['binary_accuracy'])} harmful-vs-not, "
                f"{_pct(validated.get('complied_accuracy'))} complied-vs-not (n={validated['n']})."
                if validated else _heldout_text(judge))]
    blocks.append(Block("p", "\n\n".join(lines)))

    asr = results.get("asr", {})
    blocks.append(Block("h2", "Attack success rate"))
    measures = [m for m in MEASURES if m in judge.get("measures", ["harmful"])]
    blocks.append(Block("p", "Two rates: **complied**, the behaviour's output attempted what was asked (actionable "
                             "or not), and **harmful**, the output is actionable harm; a judge reports those it can "
                             f"tell (`{judge_name}`: {', '.join(measures)}). A behaviour counts if any of its samples "
                             "does; samples the judge could not label (\"error\") are left out and counted. "
                             "Brackets: Wilson 95% interval."))
    attacks = list(dict.fromkeys(a for m in asr.values() for a in m))
    header = ["attack", "judge", "n", "budget", "samples/behaviour", "max_new_tokens"]
    header += [f"{measure} {plots.MODEL_LABELS.get(m, m).split(' ')[0]}"
               for measure in measures for m in ("baseline", "model") if m in asr]
    header += ["errors"]
    rows = []
    for attack in attacks:
        entry = asr.get("model", {}).get(attack) or next(m[attack] for m in asr.values() if attack in m)
        name = entry.get("judge", judge_name)
        checked = agreement.get(name)
        judge_cell = name + (f" (agrees {_pct(checked['binary_accuracy'])} harmful-vs-not, n={checked['n']})"
                             if checked else " (not validated)")
        row = [attack, judge_cell, str(entry.get("n")), _budget(entry.get("budget", {})),
               str(entry.get("samples_per_behavior")), str(entry.get("max_new_tokens") or "-")]
        row += [asr_text(asr[m][attack], measure) if attack in asr[m] else "-"
                for measure in measures for m in ("baseline", "model") if m in asr]
        row += [", ".join(f"{m}: {asr[m][attack]['errors']}" for m in asr if attack in asr[m])]
        rows.append(row)
    blocks.append(Block("table", header=header, rows=rows))
    png = plots.asr_chart(asr)
    if png:
        blocks.append(Block("figure", "ASR per attack, before and after", png=png, name="asr.png"))

    capability = results.get("capability")
    blocks.append(Block("h2", "Over-refusal and capability"))
    if not capability:
        why = ("the eval config's text_capability is false" if results.get("eval_config", {}).get("capability")
               else "run without --no-capability")
        blocks.append(Block("p", f"Plain-text prompts: {NOT_DONE} ({why})."))
    else:
        over = capability.get("over_refusal", {})
        rows = []
        for model in ("baseline", "model"):
            for kind, rates in over.get(model, {}).items():
                ci = rates.get("not_answered_ci95")
                rows.append([plots.MODEL_LABELS.get(model, model), kind, str(rates["n"]), _pct(rates["refusal_rate"]),
                             _pct(rates["broken_down_rate"]), _pct(rates["not_answered_rate"]) +
                             (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")])
        if rows:
            blocks.append(Block("table", header=["model", "prompts", "n", "refusal", "broken-down",
                                                 "not answered [Wilson 95% CI]"],
                                rows=rows))
        png = plots.over_refusal_chart(over)
        if png:
            blocks.append(Block("figure", "Over-refusal on borderline and benign prompts", png=png,
                                name="over_refusal.png"))
        agree = capability.get("agreement", {})
        ppl = capability.get("perplexity", {})
        rows = []
        if "skipped" in agree:
            rows.append(["agreement with baseline", agree["skipped"]])
        else:
            rows.append(["exact greedy match with baseline (benign test)", _pct(agree.get("exact_match"))])
            ci = agree.get("token_f1_ci95")
            rows.append([f"mean token F1 with baseline (benign test, n={agree.get('n')})", _num(agree.get("token_f1")) +
                         (f" [{_num(ci[0])}, {_num(ci[1])}]" if ci else "")])
        if "skipped" in ppl:
            rows.append(["held-out benign perplexity", ppl["skipped"]])
        else:
            for model in ("baseline", "model"):
                if model in ppl:
                    rows.append([f"held-out benign perplexity, {plots.MODEL_LABELS[model]}",
                                 _num(ppl[model].get("perplexity"), "{:.2f}")])
        lm = capability.get("lm_eval", {})
        if "skipped" in lm:
            rows.append(["lm-evaluation-harness", f"{lm['skipped']}; run: {lm.get('command', '')}"])
        else:
            for model, out in lm.items():
                for task, values in (out.get("results") or {}).items():
                    metric = next((f"{k}={v:.3f}" for k, v in values.items() if isinstance(v, float)), "")
                    rows.append([f"lm-eval {task} ({model})", metric])
        blocks.append(Block("table", header=["measure", "value"], rows=rows))
    tools = results.get("tool_capability")
    if tools:
        rows = [[plots.MODEL_LABELS.get(model, model), f"{tools[model]['correct']} / {tools[model]['n']}",
                 rate_text(tools[model]), rate_text(tools[model].get("right_tool")),
                 rate_text(tools[model].get("any_call"))] for model in ("baseline", "model") if model in tools]
        skipped = f" ({tools['skipped']} whose answer is text left out)" if tools.get("skipped") else ""
        blocks.append(Block("p", f"Tool calling: benign call accuracy (function name and arguments, BFCL-style "
                                 f"AST match) on {tools['n']} benign tool-use test requests with expected calls"
                                 f"{skipped}."))
        blocks.append(Block("table", header=["model", "correct", "exact call [Wilson 95% CI]", "right tool(s)",
                                             "any call"], rows=rows))
    images = results.get("image_capability")
    if images:
        agree = images.get("agreement", {})
        rows = [[plots.MODEL_LABELS.get(model, model), f"{images[model]['accuracy']['correct']} / {images['n']}",
                 rate_text(images[model]["accuracy"])] for model in ("baseline", "model") if model in images]
        blocks.append(Block("p", f"Image questions: share of answers that contain an accepted answer, on {images['n']} "
                                 "benign image test questions (colour, count, shape, reading text, ...). "
                                 + (f"Agreement with the baseline's answers: {agree['skipped']}." if "skipped" in agree
                                    else f"Agreement with the baseline's answers: {_pct(agree.get('exact_match'))} "
                                         f"exact, mean token F1 {_num(agree.get('token_f1'))}.")))
        blocks.append(Block("table", header=["model", "correct", "accuracy [Wilson 95% CI]"], rows=rows))

    diagnostics = results.get("diagnostics")
    blocks.append(Block("h2", "Representations"))
    sets = {k: v for k, v in (diagnostics or {}).items() if isinstance(v, dict) and "per_layer" in v}
    if not diagnostics or "skipped" in diagnostics or not sets:
        blocks.append(Block("p", f"{NOT_DONE}: {(diagnostics or {}).get('skipped', 'no baseline')}."))
    else:
        blocks.append(Block("p", "Cosine between the model's and the baseline's hidden states, averaged over tokens, "
                                 "at every hidden-state entry. Circuit breaking should push harmful text to <= 0 at "
                                 "the target layers and keep benign text near 1. "
                                 + " ".join(f"{name}: mean {d['mean_cosine']:+.3f} over {d['items']} items "
                                            f"({d['tokens']} tokens)." for name, d in sets.items())
                                 + (f" Target layers: {diagnostics['target_layers']}."
                                    if diagnostics.get("target_layers") else "")))
        png = plots.cosine_chart(diagnostics)
        if png:
            blocks.append(Block("figure", "Cosine and norm ratio per layer", png=png, name="cosine.png"))

    blocks.append(Block("h2", "Judge agreement with hand labels"))
    if not agreement:
        blocks.append(Block("p", "No hand-labelled set given (--labels FILE; guide: docs/labelling.md)."))
    else:
        rows = [[name, str(s["n"]), _pct(s["accuracy"]), _pct(s["binary_accuracy"]), _pct(s["harmful_precision"]),
                 _pct(s["harmful_recall"]), str(s["errors"])] for name, s in agreement.items()]
        blocks.append(Block("table", header=["judge", "n", "accuracy (4 labels)", "harmful vs not", "harmful precision",
                                             "harmful recall", "errors"], rows=rows))
        from ..evaluation.agreement import format_confusion

        for name, scores in agreement.items():
            blocks.append(Block("pre", format_confusion(name, scores)))
    return blocks


# ---------------------------------------------------------------- renderers


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], title: str, figure_dir: str = "figures") -> str:
    out = [f"# {title}", ""]
    for b in blocks:
        if b.kind == "h2":
            out += [f"## {b.text}", ""]
        elif b.kind == "p":
            out += [b.text, ""]
        elif b.kind == "table":
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("|" + "---|" * len(b.header))
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif b.kind == "figure":
            out += [f"![{b.text}]({figure_dir}/{b.name})", ""]
        elif b.kind == "pre":
            out += ["```", b.text, "```", ""]
    return "\n".join(out)


STYLE = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}th{background:#f3f3f3}
pre{background:#f7f7f7;padding:0.8em;overflow-x:auto}figure{margin:1em 0}img{max-width:100%}
figcaption{font-size:0.85em;color:#555}"""


def render_html(blocks: list[Block], title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
           f"<style>{STYLE}</style></head><body>", f"<h1>{e(title)}</h1>"]
    for b in blocks:
        if b.kind == "h2":
            out.append(f"<h2>{e(b.text)}</h2>")
        elif b.kind == "p":
            for para in b.text.split("\n\n"):
                out.append(f"<p>{e(para)}</p>")
        elif b.kind == "table":
            out.append("<table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in b.header) + "</tr></thead><tbody>")
            out += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in b.rows]
            out.append("</tbody></table>")
        elif b.kind == "figure":
            data = base64.b64encode(b.png or b"").decode("ascii")
            out.append(f'<figure><img alt="{e(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{e(b.text)}</figcaption></figure>")
        elif b.kind == "pre":
            out.append(f"<pre>{e(b.text)}</pre>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(results: dict | str | Path, out_dir: str | Path | None = None, *,
                 title: str = "Circuit-breakers evaluation") -> tuple[Path, Path]:
    """Write OUT/report.md (+ OUT/figures/*.png) and a self-contained OUT/report.html.

    `results` is the results dict or the path of a results.json; `out_dir` defaults to its folder.
    """
    if not isinstance(results, dict):
        path = Path(results)
        out_dir = out_dir or path.parent
        results = json.loads(path.read_text(encoding="utf-8"))
    if out_dir is None:
        raise ValueError("out_dir is needed when results is a dict")
    out = Path(out_dir)
    blocks = build_blocks(results)
    figures = out / "figures"
    for b in blocks:
        if b.kind == "figure" and b.png:
            figures.mkdir(parents=True, exist_ok=True)
            (figures / b.name).write_bytes(b.png)
    md, page = out / "report.md", out / "report.html"
    atomic_write_text(md, render_markdown(blocks, title))
    atomic_write_text(page, render_html(blocks, title))
    return md, page
