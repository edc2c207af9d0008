"""Figures for the report, as PNG bytes (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import io

MODEL_LABELS = {"baseline": "before (baseline)", "model": "after (model)"}
COLOURS = {"baseline": "#9e9e9e", "model": "#1f77b4", "harmful": "#d62728", "benign": "#2ca02c",
           "borderline": "#ff7f0e"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def asr_chart(asr: dict[str, dict[str, dict]]) -> bytes | None:
    """Grouped bars of ASR (%) per attack, before/after, with Wilson 95% whiskers."""
    models = [m for m in ("baseline", "model") if m in asr] + [m for m in asr if m not in ("baseline", "model")]
    attacks = list(dict.fromkeys(a for m in models for a in asr[m]))
    if not attacks:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.1 * len(attacks) + 2), 3.6))
    width = 0.8 / len(models)
    for j, model in enumerate(models):
        xs, heights, low, high = [], [], [], []
        for i, attack in enumerate(attacks):
            entry = asr[model].get(attack)
            if not entry or entry.get("asr") is None:
                continue
            value = 100 * entry["asr"]
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            heights.append(value)
            low.append(value - 100 * entry["ci95"][0])
            high.append(100 * entry["ci95"][1] - value)
        ax.bar(xs, heights, width, yerr=[low, high], capsize=3, label=MODEL_LABELS.get(model, model),
               color=COLOURS.get(model), edgecolor="black", linewidth=0.4)
    ax.set_xticks(range(len(attacks)))
    ax.set_xticklabels(attacks, rotation=30, ha="right")
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 100)
    ax.set_title("ASR per attack (whiskers: Wilson 95% CI)")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def over_refusal_chart(over_refusal: dict[str, dict[str, dict]]) -> bytes | None:
    """Stacked bars: refusal and broken-down rates (%) per prompt set and model."""
    bars = [(model, kind, rates) for model in ("baseline", "model") if model in over_refusal
            for kind, rates in over_refusal[model].items() if rates.get("n")]
    if not bars:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 1.0 * len(bars) + 2), 3.4))
    names = [f"{kind}\n{MODEL_LABELS.get(model, model).split(' ')[0]}" for model, kind, _ in bars]
    refusal = [100 * r["refusal_rate"] for _, _, r in bars]
    broken = [100 * r["broken_down_rate"] for _, _, r in bars]
    ax.bar(names, refusal, label="refusal", color="#8c564b")
    ax.bar(names, broken, bottom=refusal, label="broken-down", color="#bcbd22")
    ax.set_ylabel("% of prompts not answered")
    ax.set_ylim(0, 100)
    ax.set_title("Over-refusal (heuristic judge)")
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def cosine_chart(diagnostics: dict) -> bytes | None:
    """Cosine (model vs baseline) per layer on held-out harmful and benign text; dotted lines at
    `diagnostics["target_layers"]` when known."""
    sets = {name: d for name, d in diagnostics.items() if isinstance(d, dict) and d.get("per_layer")}
    if not sets:
        return None
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for axis in (ax, ax2):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name, d in sets.items():
        layers = sorted(d["per_layer"], key=int)
        xs = [int(layer) for layer in layers]
        ax.plot(xs, [d["per_layer"][l]["cosine"] for l in layers], marker="o", ms=3, label=name,
                color=COLOURS.get(name))
        ax2.plot(xs, [d["per_layer"][l]["norm_ratio"] for l in layers], marker="o", ms=3, label=name,
                 color=COLOURS.get(name))
    for layer in diagnostics.get("target_layers") or []:
        for axis in (ax, ax2):
            axis.axvline(layer, color="gray", ls=":", lw=1)
    ax.axhline(0, color="black", lw=0.6)
    ax.set_xlabel("hidden-state entry (0 = embeddings)" + (", dotted: target layers"
                                                          if diagnostics.get("target_layers") else ""))
    ax.set_ylabel("cosine(model, baseline)")
    ax.set_ylim(-1.05, 1.05)
    ax.set_title("Representation cosine per layer")
    ax.legend(frameon=False, loc="lower left")
    ax.grid(alpha=0.3)
    ax2.axhline(1, color="black", lw=0.6)
    ax2.set_xlabel("hidden-state entry")
    ax2.set_ylabel("|h_model| / |h_baseline|")
    ax2.set_title("Norm ratio per layer")
    ax2.grid(alpha=0.3)
    return _png(fig)
