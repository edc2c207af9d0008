"""Small statistics for attack success rates."""

from __future__ import annotations

import math

Z95 = 1.959963984540054  # the 0.975 quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when n == 0.

    Unlike the normal approximation it stays inside [0, 1] and is not degenerate at 0 or n
    successes, which matters for a circuit-broken model whose ASR is often 0/n.
    """
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def mean_interval(values, z: float = Z95) -> tuple[float, float]:
    """Normal-approximation 95% interval of a mean (e.g. token F1 over prompts); (nan, nan) below 2 values."""
    values = [float(v) for v in values]
    n = len(values)
    if n < 2:
        return math.nan, math.nan
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean - z * sd / math.sqrt(n), mean + z * sd / math.sqrt(n)


def rate_of(entry: dict, measure: str | None = None) -> dict | None:
    """{"rate", "ci95"} of an ASR entry: its headline (`asr`), or one measure ("complied", "harmful") when
    the entry has it; None where the judge did not measure it. Entries written before the two rates
    existed have only the headline, which was the harmful label's rate."""
    headline = {"rate": entry.get("asr"), "ci95": entry.get("ci95")}
    if measure is None:
        return headline
    if measure not in entry:
        return headline if measure == "harmful" else None
    return entry[measure]


def rate_text(cell: dict | None) -> str:
    """{"rate", "ci95"} as text, "12.5% [3.5, 36.0]"; "n/a" where there is no rate."""
    if not cell or cell.get("rate") is None:
        return "n/a"
    low, high = cell["ci95"]
    return f"{100 * cell['rate']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def asr_text(entry: dict | None, measure: str | None = None, *, with_n: bool = False) -> str:
    """An ASR entry of results.json as text, "12.5% [3.5, 36.0]" (+ " n=8" with `with_n`): its headline rate,
    or `measure`'s (see `rate_of`), with the Wilson 95% interval; "n/a" where there is none. The one
    formatter of ASR figures: the eval summary, the demo's table and the report all use it."""
    text = rate_text(rate_of(entry, measure) if entry else None)
    return text + (f" n={entry['n']}" if with_n and text != "n/a" else "")
