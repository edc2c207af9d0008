"""The Representation Rerouting losses and schedule (Zou et al. 2024, Algorithm 1; method.md 3-4).

Notation: h^l is hidden-state entry l (`output_hidden_states` numbering), "lora" the model being
trained, "orig" the same model with the adapter disabled, M the token mask (B x T).

Rerouting loss, on a circuit-breaker batch, at the target layers L:

    L_s = sum_{l in L} sum_{b,t} ReLU(M_bt * cos(h^l_lora[b,t], h^l_orig[b,t])) / sum_{l in L} sum_{b,t} M_bt

Retain loss, on a retain batch, over every hidden-state entry l = 0..n:

    L_r = sum_{l,b,t} || M_bt * (h^l_lora[b,t] - h^l_orig[b,t]) ||_2 / Z

    Z = n_entries * B * 1024          "reference": the reference pads every item to 1024 tokens and
                                      averages over padding too; we keep its scale without padding
    Z = n_entries * sum_{b,t} M_bt    "masked_mean": a plain mean over real tokens

`relative=True` is this project's norm-aware variant: each token's distance is divided by
||h^l_orig[b,t]||, so that models with a large residual stream (SmolLM2: ~150-220 per token against
~9 for Llama-3-8B) do not let the retain term drown the rerouting term.

Schedule, t counted in optimizer steps, D = 2T by default:

    c_s(t) = alpha * max(0, 1 - t / D)      c_r(t) = alpha * t / D
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torch.nn.functional as F

RETAIN_NORMALIZATIONS = ("reference", "masked_mean")


def rr_coefficients(step: int, alpha: float, denominator: int) -> tuple[float, float]:
    """(c_s, c_r) at optimizer step `step` (1-based). c_s stops at 0 instead of turning negative."""
    progress = step / denominator
    return alpha * max(0.0, 1.0 - progress), alpha * progress


def token_cosines(lora: torch.Tensor, orig: torch.Tensor) -> torch.Tensor:
    """Cosine per token (B x T), with norms in fp32 as the reference computes them."""
    return F.cosine_similarity(lora.float(), orig.float(), dim=-1, eps=1e-8)


def rerouting_loss(lora: Mapping[int, torch.Tensor], orig: Mapping[int, torch.Tensor],
                   mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """L_s: mean over masked tokens and target layers of ReLU(cos(h_lora, h_orig))."""
    mask = mask.float()
    total = sum((F.relu(token_cosines(lora[l], orig[l]) * mask)).sum() for l in layers)
    return total / (mask.sum() * len(layers)).clamp_min(1.0)


def retain_loss(lora: Mapping[int, torch.Tensor], orig: Mapping[int, torch.Tensor],
                mask: torch.Tensor, entries: Sequence[int], *, normalization: str = "reference",
                reference_length: int = 1024, relative: bool = False) -> torch.Tensor:
    """L_r: L2 distance per token between trained and original states, summed over entries."""
    if normalization not in RETAIN_NORMALIZATIONS:
        raise ValueError(f"retain normalization must be one of {RETAIN_NORMALIZATIONS}, got {normalization!r}")
    mask = mask.float()
    total = lora[entries[0]].new_zeros((), dtype=torch.float32)
    for l in entries:
        # The norm is accumulated in fp32 without an fp32 copy of the states, as the reference does:
        # 22 entries of fp32 copies held for backward would cost GBs at 8B scale.
        at_least_fp32 = torch.promote_types(lora[l].dtype, torch.float32)
        distance = torch.linalg.vector_norm(lora[l] - orig[l], dim=-1, dtype=at_least_fp32)
        if relative:
            distance = distance / torch.linalg.vector_norm(orig[l], dim=-1, dtype=at_least_fp32).clamp_min(1e-6)
        total = total + (distance * mask).sum()
    if normalization == "reference":
        denominator = len(entries) * mask.shape[0] * reference_length
    else:
        denominator = len(entries) * mask.sum().clamp_min(1.0)
    return total / denominator


def mean_cosine(lora: Mapping[int, torch.Tensor], orig: Mapping[int, torch.Tensor],
                mask: torch.Tensor, layers: Sequence[int]) -> float:
    """Mean cosine over masked tokens and `layers`: the diagnostic the train log records."""
    mask = mask.float()
    with torch.no_grad():
        total = sum((token_cosines(lora[l], orig[l]) * mask).sum() for l in layers)
        return float(total / (mask.sum() * len(layers)).clamp_min(1.0))
