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

In L_r, M may carry weights instead of 0/1: `retain_response_weight` w gives a retain item's response tokens
M_bt = w (training.methods.retain_token_weights), so "masked_mean" becomes a weighted mean.

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

RepBend (`method: repbend`; Yousefpour et al. 2025, docs/method.md 13). S is the safe (retain) batch,
U the unsafe (circuit-breaker) batch, E every hidden-state entry, L_u the unsafe layers, d the per-token
distance of L_r (l2 or relative_l2), r_b the last prompt token of row b, z the LM-head logits:

    safe_L2   = mean_{l in E; b,t in M_S} d(h^l_lora[b,t], h^l_orig[b,t])          retain_loss, masked_mean
    unsafe_L2 = mean_{l in L_u; b,t in M_U} d(h^l_lora[b,t], h^l_orig[b,t])        retain_loss, masked_mean
    cos_term  = mean_{l in L_u} mean_{i != j} (1 - cos(h^l_lora[i, r_i], h^l_lora[j, r_j]))    pairwise_cosine_loss
    KL        = tau^2 / B * sum_{b,t in M_S} KL(softmax(z_orig[b,t] / tau) || softmax(z_lora[b,t] / tau))    logit_kl
    refusal   = mean_{l in L_u; b; k < K_b} || h^l_lora[b, r_b + k] - h^l_orig,refusal[b, r_b + k] ||   retain_loss

    L = alpha * safe_L2 - beta * unsafe_L2 + gamma * cos_term + eps * KL + eta * refusal

unsafe_L2 is maximised (pushes harmful states away from the original), cos_term minimised (pulls the
harmful requests' last-prompt-token states together, toward one "unsafe" direction). KL, as the reference
computes it: the original distribution is the target, summed over tokens and divided by the number of
sequences. The eta term is the reference implementation's "safe-unsafe" loss: the trained states while
reading the harmful response are pulled toward the original model's states while reading a refusal to
the same request, over the K positions from the last prompt token (h_orig,refusal comes from a frozen
pass over request + refusal).

RR with a latent adversary (`method: rr_lat`; targeted LAT, Sheshadri et al. 2024). An additive
perturbation delta^l on hidden-state entries l in lat_layers, at prompt positions only, each token's
inside the L2 ball ||delta^l[b,t]|| <= eps * ||h^l[b,t]|| (h: the clean trained state; relative, so that
one eps fits residual streams whose norms differ 20x between models), is chosen by PGD to restore the
harmful representation, i.e. to maximise

    A(delta) = mean_{l in L; b,t in M} cos(h^l_lora+delta[b,t], h^l_orig[b,t])         restoration_cosine

(no ReLU: once the breaker has formed the cosines are <= 0, where the ReLU would leave the adversary no
gradient), with normalised steps of a * ||h^l[b,t]|| per token:

    delta <- Proj_ball(delta + a * ||h|| * g / ||g||),   g = dA / d delta                  pgd_l2_step

The outer step then minimises c_s(t) * L_s on the perturbed pass (L_r stays unperturbed).

Refusal-only fine-tuning (`method: refusal`, the classic baseline). x the token ids, R the response tokens
(B x T mask; a circuit-breaker item's response is replaced by a refusal), z[b,t] = W_head h^n_lora[b,t] the
logits from the final-norm entry n; each response token is predicted from the position before it:

    CE = - sum_{b,t in R} log softmax(z[b,t-1])[x_bt] / |R|                          response_cross_entropy

a mean over the batch's response tokens (not per item). L = w_refusal * CE(circuit-breaker items answered
by refusals) + w_retain * CE(retain items with their own responses), constant weights.
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
                reference_length: int = 1024, relative: bool = False, sequences: int | None = None) -> torch.Tensor:
    """L_r: L2 distance per token between trained and original states, summed over entries. `sequences`:
    B of the reference normalisation where the rows are not the items (packed rows); default mask's rows."""
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
        denominator = len(entries) * (mask.shape[0] if sequences is None else sequences) * reference_length
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


def restoration_cosine(lora: Mapping[int, torch.Tensor], orig: Mapping[int, torch.Tensor],
                       mask: torch.Tensor, layers: Sequence[int]) -> torch.Tensor:
    """A: mean cosine over masked tokens and `layers`, differentiable (what the latent adversary maximises)."""
    mask = mask.float()
    total = sum((token_cosines(lora[l], orig[l]) * mask).sum() for l in layers)
    return total / (mask.sum() * len(layers)).clamp_min(1.0)


def pgd_l2_step(delta: torch.Tensor, grad: torch.Tensor, radius: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """One ascent step of length `step` along grad / ||grad|| per token, projected back into the per-token L2
    ball of `radius` (`step`, `radius`: B x T x 1). Tokens without gradient do not move."""
    at_least_fp32 = torch.promote_types(grad.dtype, torch.float32)
    grad_norm = torch.linalg.vector_norm(grad, dim=-1, keepdim=True, dtype=at_least_fp32)
    moved = delta + step * grad / grad_norm.clamp_min(1e-12)
    norm = torch.linalg.vector_norm(moved, dim=-1, keepdim=True, dtype=at_least_fp32)
    return moved * (radius / norm.clamp_min(1e-12)).clamp(max=1.0)


def pairwise_cosine_loss(states: Mapping[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """RepBend's cos_term: mean over `layers` of the mean over ordered pairs i != j of 1 - cos(x_i, x_j), for
    states {layer: B x D} (one row per item). 0 for a single item (no pair)."""
    first = states[layers[0]]
    rows = first.shape[0]
    if rows < 2:
        return first.new_zeros((), dtype=torch.float32)
    off_diagonal = ~torch.eye(rows, dtype=torch.bool, device=first.device)
    total = first.new_zeros((), dtype=torch.float32)
    for l in layers:
        unit = F.normalize(states[l].float(), dim=-1, eps=1e-8)
        total = total + (1 - unit @ unit.T)[off_diagonal].mean()
    return total / len(layers)


def logit_kl(lora_logits: torch.Tensor, orig_logits: torch.Tensor, sequences: int, temperature: float = 2.0
             ) -> torch.Tensor:
    """RepBend's KL: tau^2 * sum over tokens of KL(softmax(z_orig / tau) || softmax(z_lora / tau)) / sequences,
    for the logits of the real tokens only (N x V each)."""
    log_p = F.log_softmax(lora_logits.float() / temperature, dim=-1)
    log_q = F.log_softmax(orig_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, reduction="sum", log_target=True) * temperature ** 2 / max(sequences, 1)


def response_cross_entropy(final: torch.Tensor, head: torch.nn.Module, input_ids: torch.Tensor,
                           response_mask: torch.Tensor) -> torch.Tensor:
    """CE: the token-mean cross-entropy of the response tokens (`response_mask`, B x T), each predicted from the
    final-norm state `final` (B x T x D) one position before it. The LM head `head` runs on those positions only
    (N x V logits, not B x T x V); computed in fp32."""
    predicting = response_mask[:, 1:].bool()
    if not predicting.any():
        return final.sum() * 0.0
    logits = head(final[:, :-1][predicting])
    return F.cross_entropy(logits.float(), input_ids[:, 1:][predicting], reduction="mean")
