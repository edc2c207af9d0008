"""The Representation Rerouting losses and schedule (Zou et al. 2024, Algorithm 1; docs/method.md 3-4).

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

Seeded start (`seeded_start: target`, not in the paper): with LoRA B = 0 the trained and original
states are equal, L_s sits at its maximum and its gradient is zero; what moves the model first is
rounding noise between the two passes, which differs between machines. A seeded unit direction u_l
per target layer moves the rerouting target off the original state by eps times its norm,

    L_s' = ... ReLU(M_bt * cos(h^l_lora[b,t], h^l_orig[b,t] + eps * ||h^l_orig[b,t]|| * u_l)) ...

so the first gradient is ~eps / ||h|| along -u_l (orthogonal to h_orig), a function of the seed.

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
                   mask: torch.Tensor, layers: Sequence[int],
                   target_offsets: Mapping[int, torch.Tensor] | None = None) -> torch.Tensor:
    """L_s: mean over masked tokens and target layers of ReLU(cos(h_lora, h_orig)).

    `target_offsets` {layer: eps * u_l} (the seeded start): the target becomes h_orig + eps ||h_orig|| u_l."""
    mask = mask.float()
    if target_offsets:
        orig = {l: offset_target(orig[l], target_offsets[l]) for l in layers}
    total = sum((F.relu(token_cosines(lora[l], orig[l]) * mask)).sum() for l in layers)
    return total / (mask.sum() * len(layers)).clamp_min(1.0)


def offset_target(orig: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """h_orig + ||h_orig|| * offset, per token (computed in at least fp32, returned in orig's dtype)."""
    at_least_fp32 = torch.promote_types(orig.dtype, torch.float32)
    norm = torch.linalg.vector_norm(orig, dim=-1, keepdim=True, dtype=at_least_fp32)
    return (orig.to(at_least_fp32) + norm * offset.to(at_least_fp32)).to(orig.dtype)


def seeded_directions(layers: Sequence[int], hidden_size: int, seed: int, scale: float) -> dict[int, torch.Tensor]:
    """{layer: scale * u_l}, u_l a unit vector drawn from a generator of its own (CPU, float64, then fp32),
    so that the same seed gives the same directions on every machine and device."""
    generator = torch.Generator().manual_seed(seed)
    directions = {}
    for layer in layers:
        u = torch.randn(hidden_size, generator=generator, dtype=torch.float64)
        directions[layer] = (scale * u / u.norm()).float()
    return directions


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
    per_layer = layer_cosines(lora, orig, mask, layers)
    return sum(per_layer.values()) / len(per_layer)


def layer_cosines(lora: Mapping[int, torch.Tensor], orig: Mapping[int, torch.Tensor],
                  mask: torch.Tensor, layers: Sequence[int]) -> dict[int, float]:
    """{layer: mean cosine over masked tokens} (to the true original state, never an offset target)."""
    mask = mask.float()
    count = mask.sum().clamp_min(1.0)
    with torch.no_grad():
        return {l: float((token_cosines(lora[l], orig[l]) * mask).sum() / count) for l in layers}
