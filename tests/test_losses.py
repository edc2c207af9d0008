"""The RR losses and schedule against direct, loop-by-loop computations of docs/method.md section 3-4."""
import math

import pytest
import torch

from circuit_breakers.losses import (layer_cosines, logit_kl, mean_cosine, pairwise_cosine_loss, pgd_l2_step,
                                    rerouting_loss, restoration_cosine, retain_loss, rr_coefficients,
                                    seeded_directions, token_cosines)

B, T, D = 2, 4, 3
# Row 0: three real tokens and one pad at the end; row 1: one pad at the start (left padding).
MASK = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])


def _states(seed: int, entries) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {l: torch.randn(B, T, D, generator=g, dtype=torch.float64) for l in entries}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.tolist(), b.tolist()
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def _norm(v: torch.Tensor) -> float:
    return math.sqrt(sum(x * x for x in v.tolist()))


def _rerouting_by_hand(lora, orig, mask, layers) -> float:
    num = den = 0.0
    for l in layers:
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                num += max(0.0, float(mask[b, t]) * _cos(lora[l][b, t], orig[l][b, t]))
                den += float(mask[b, t])
    return num / den


def _retain_distances(lora, orig, mask, entries, relative=False) -> float:
    total = 0.0
    for l in entries:
        for b in range(mask.shape[0]):
            for t in range(mask.shape[1]):
                d = _norm(float(mask[b, t]) * (lora[l][b, t] - orig[l][b, t]))
                if relative:
                    d /= _norm(orig[l][b, t])
                total += d
    return total


@pytest.fixture
def rerouting_case():
    layers = [2, 5]
    orig = _states(0, layers)
    lora = _states(1, layers)
    # A token pointing away from the original: cos = -1/sqrt(5), which ReLU must zero.
    v = orig[2][0, 1]
    w = torch.tensor([0.3, -1.2, 0.7], dtype=v.dtype)
    w = w - (w @ v) / (v @ v) * v
    lora[2][0, 1] = -v + 2.0 * w * v.norm() / w.norm()
    # A token aligned with the original: cos = +1.
    lora[5][1, 2] = 2.0 * orig[5][1, 2]
    # A pad token with a large positive cosine: the mask must remove it.
    lora[2][0, 3] = orig[2][0, 3]
    return lora, orig, layers


def test_rerouting_loss_matches_direct_computation(rerouting_case):
    lora, orig, layers = rerouting_case
    got = rerouting_loss(lora, orig, MASK, layers)
    expected = _rerouting_by_hand(lora, orig, MASK, layers)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # The negative-cosine token exists and ReLU matters: without ReLU the value would be lower.
    assert _cos(lora[2][0, 1], orig[2][0, 1]) == pytest.approx(-1 / math.sqrt(5))
    no_relu = sum(float(MASK[b, t]) * _cos(lora[l][b, t], orig[l][b, t])
                  for l in layers for b in range(B) for t in range(T)) / (len(layers) * MASK.sum().item())
    assert got.item() > no_relu + 1e-3


def test_rerouting_loss_ignores_padding(rerouting_case):
    lora, orig, layers = rerouting_case
    base = rerouting_loss(lora, orig, MASK, layers).item()
    changed = {l: v.clone() for l, v in lora.items()}
    changed[2][0, 3] = -changed[2][0, 3] + 7.0  # anything at a pad position
    changed[5][1, 0] = 100.0
    assert rerouting_loss(changed, orig, MASK, layers).item() == pytest.approx(base, abs=1e-7)


def test_rerouting_loss_identical_states_is_one_and_opposite_is_zero():
    layers = [1, 3]
    orig = _states(3, layers)
    assert rerouting_loss(orig, orig, MASK, layers).item() == pytest.approx(1.0, abs=1e-6)
    opposite = {l: -v for l, v in orig.items()}
    assert rerouting_loss(opposite, orig, MASK, layers).item() == 0.0
    assert mean_cosine(opposite, orig, MASK, layers) == pytest.approx(-1.0, abs=1e-6)


def test_rerouting_loss_has_gradient_only_on_positive_real_tokens(rerouting_case):
    lora, orig, layers = rerouting_case
    lora = {l: v.clone().requires_grad_(True) for l, v in lora.items()}
    rerouting_loss(lora, orig, MASK, layers).backward()
    assert torch.all(lora[2].grad[0, 3] == 0)  # pad
    assert torch.all(lora[2].grad[0, 1] == 0)  # cos < 0: ReLU is flat there
    assert lora[2].grad[0, 0].abs().sum() > 0


# ---------------------------------------------------------------- the seeded start (seeded_start: target)


def test_seeded_directions_are_unit_vectors_scaled_and_depend_only_on_the_seed():
    first = seeded_directions([10, 20], 64, seed=7, scale=0.1)
    again = seeded_directions([10, 20], 64, seed=7, scale=0.1)
    other = seeded_directions([10, 20], 64, seed=8, scale=0.1)
    for layer in (10, 20):
        assert first[layer].norm().item() == pytest.approx(0.1, rel=1e-6)
        assert torch.equal(first[layer], again[layer])
        assert not torch.allclose(first[layer], other[layer])
    assert abs(_cos(first[10], first[20])) < 0.5  # one direction per layer, not one for all


def test_offset_target_matches_direct_computation(rerouting_case):
    lora, orig, layers = rerouting_case
    offsets = seeded_directions(layers, D, seed=0, scale=0.1)
    got = rerouting_loss(lora, orig, MASK, layers, offsets)
    target = {l: torch.stack([torch.stack([orig[l][b, t] + _norm(orig[l][b, t]) * offsets[l].double()
                                           for t in range(T)]) for b in range(B)]) for l in layers}
    assert got.item() == pytest.approx(_rerouting_by_hand(lora, target, MASK, layers), abs=1e-6)


def test_offset_target_gives_a_seeded_gradient_where_the_plain_loss_has_none():
    """At h_lora == h_orig the paper's loss is at its maximum (gradient ~0, rounding noise decides the
    start); with the offset target the gradient is ~scale/|h| along -u_perp, the same for every seed run."""
    layers = [1]
    orig = {1: torch.randn(B, T, 16, generator=torch.Generator().manual_seed(1))}
    offsets = seeded_directions(layers, 16, seed=3, scale=0.1)
    plain = {1: orig[1].clone().requires_grad_(True)}
    rerouting_loss(plain, orig, MASK, layers).backward()
    assert plain[1].grad.abs().max() < 1e-6
    seeded = {1: orig[1].clone().requires_grad_(True)}
    loss = rerouting_loss(seeded, orig, MASK, layers, offsets)
    assert loss.item() < 1.0
    loss.backward()
    g = seeded[1].grad[0, 0]
    h = orig[1][0, 0]
    u_perp = offsets[1] - (offsets[1] @ h) / (h @ h) * h
    assert _cos(g, u_perp) > 0.99  # so descent (-g) moves the state away from u, orthogonally to h_orig


def test_layer_cosines_average_to_mean_cosine(rerouting_case):
    lora, orig, layers = rerouting_case
    per_layer = layer_cosines(lora, orig, MASK, layers)
    assert set(per_layer) == set(layers)
    assert sum(per_layer.values()) / len(layers) == pytest.approx(mean_cosine(lora, orig, MASK, layers), abs=1e-9)


def test_cosines_are_fp32_for_bf16_inputs():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(B, T, 64, generator=g).to(torch.bfloat16)
    b = torch.randn(B, T, 64, generator=g).to(torch.bfloat16)
    cos = token_cosines(a, b)
    assert cos.dtype == torch.float32
    expected = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert torch.allclose(cos.double(), expected, atol=1e-6)
    loss = rerouting_loss({4: a}, {4: b}, MASK, [4])
    assert loss.dtype == torch.float32
    direct = (torch.relu(expected) * MASK).sum() / MASK.sum()
    assert loss.item() == pytest.approx(direct.item(), abs=1e-6)
    r = retain_loss({0: a}, {0: b}, MASK, [0], normalization="masked_mean")
    assert r.dtype == torch.float32


@pytest.mark.parametrize("relative", [False, True])
def test_retain_loss_reference_normalisation(relative):
    entries = [0, 1, 2]
    lora, orig = _states(4, entries), _states(5, entries)
    got = retain_loss(lora, orig, MASK, entries, normalization="reference", reference_length=16,
                      relative=relative)
    expected = _retain_distances(lora, orig, MASK, entries, relative) / (len(entries) * B * 16)
    assert got.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("relative", [False, True])
def test_retain_loss_masked_mean_normalisation(relative):
    entries = [0, 2, 3, 6]
    lora, orig = _states(6, entries), _states(7, entries)
    got = retain_loss(lora, orig, MASK, entries, normalization="masked_mean", relative=relative)
    expected = _retain_distances(lora, orig, MASK, entries, relative) / (len(entries) * MASK.sum().item())
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_retain_loss_default_is_reference_over_1024():
    entries = [0, 1]
    lora, orig = _states(8, entries), _states(9, entries)
    got = retain_loss(lora, orig, MASK, entries)
    assert got.item() == pytest.approx(_retain_distances(lora, orig, MASK, entries) / (2 * B * 1024), rel=1e-6)


def test_retain_relative_divides_each_token_by_original_norm():
    # One real token; its distance is 3 and the original's norm is 5: relative distance 3/5.
    mask = torch.tensor([[1, 0]])
    orig = {0: torch.tensor([[[3.0, 4.0], [1.0, 1.0]]])}
    lora = {0: torch.tensor([[[3.0, 7.0], [9.0, 9.0]]])}
    absolute = retain_loss(lora, orig, mask, [0], normalization="masked_mean")
    relative = retain_loss(lora, orig, mask, [0], normalization="masked_mean", relative=True)
    assert absolute.item() == pytest.approx(3.0)
    assert relative.item() == pytest.approx(0.6)


def test_retain_loss_ignores_padding_and_is_zero_for_identical_states():
    entries = [0, 1]
    orig = _states(10, entries)
    assert retain_loss(orig, orig, MASK, entries).item() == 0.0
    lora = {l: v.clone() for l, v in orig.items()}
    lora[0][0, 3] += 50.0  # pad position of row 0
    lora[1][1, 0] -= 50.0  # pad position of row 1
    for normalization in ("reference", "masked_mean"):
        assert retain_loss(lora, orig, MASK, entries, normalization=normalization).item() == 0.0


def test_retain_loss_bad_normalization():
    states = _states(0, [0])
    with pytest.raises(ValueError, match="masked_mean"):
        retain_loss(states, states, MASK, [0], normalization="mean")


# ---------------------------------------------------------------- schedule


def test_schedule_step_one():
    c_s, c_r = rr_coefficients(1, alpha=10.0, denominator=300)
    assert c_s == pytest.approx(10.0 * (1 - 1 / 300))
    assert c_r == pytest.approx(10.0 / 300)


def test_schedule_at_T_coefficients_meet():
    T = 150
    c_s, c_r = rr_coefficients(T, alpha=10.0, denominator=2 * T)
    assert c_s == pytest.approx(5.0) and c_r == pytest.approx(5.0)
    assert c_s == pytest.approx(c_r)


def test_schedule_at_2T_and_beyond():
    T = 150
    c_s, c_r = rr_coefficients(2 * T, alpha=10.0, denominator=2 * T)
    assert c_s == 0.0 and c_r == pytest.approx(10.0)
    previous = c_r
    for step in (2 * T + 1, 3 * T, 10 * T):  # the reference crashed here; we must not
        c_s, c_r = rr_coefficients(step, alpha=10.0, denominator=2 * T)
        assert c_s == 0.0
        assert c_r > previous
        previous = c_r
    assert c_r == pytest.approx(10.0 * 10 * T / (2 * T))


def test_schedule_custom_denominator_and_alpha():
    c_s, c_r = rr_coefficients(25, alpha=5.0, denominator=100)
    assert c_s == pytest.approx(5.0 * 0.75) and c_r == pytest.approx(5.0 * 0.25)
    assert sum(rr_coefficients(7, alpha=5.0, denominator=100)) == pytest.approx(5.0)


# ---------------------------------------------------------------- RepBend (method: repbend)


def test_pairwise_cosine_loss_matches_direct_computation():
    g = torch.Generator().manual_seed(11)
    layers = [3, 7]
    states = {l: torch.randn(4, 5, generator=g, dtype=torch.float64) for l in layers}
    expected = 0.0
    for l in layers:
        pairs = [1 - _cos(states[l][i], states[l][j]) for i in range(4) for j in range(4) if i != j]
        expected += sum(pairs) / len(pairs)
    assert pairwise_cosine_loss(states, layers).item() == pytest.approx(expected / len(layers), abs=1e-6)


def test_pairwise_cosine_loss_is_zero_for_aligned_states_and_pulls_them_together():
    direction = torch.tensor([1.0, -2.0, 0.5])
    aligned = {1: torch.stack([direction, 3 * direction, 0.2 * direction])}
    assert pairwise_cosine_loss(aligned, [1]).item() == pytest.approx(0.0, abs=1e-6)
    opposite = {1: torch.stack([direction, -direction])}
    assert pairwise_cosine_loss(opposite, [1]).item() == pytest.approx(2.0)
    assert pairwise_cosine_loss({1: direction[None]}, [1]).item() == 0.0  # one item: no pair
    # Direction: a gradient step on the loss raises the cosine between the two items.
    x = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0]], requires_grad=True)
    pairwise_cosine_loss({1: x}, [1]).backward()
    moved = x.detach() - 0.1 * x.grad
    assert _cos(moved[0], moved[1]) > _cos(x[0].detach(), x[1].detach())


def test_logit_kl_matches_direct_computation_and_direction():
    g = torch.Generator().manual_seed(12)
    lora, orig = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g, dtype=torch.float64)
    tau, sequences = 2.0, 2
    expected = 0.0
    for n in range(5):
        p = [math.exp(v / tau) for v in orig[n].tolist()]
        q = [math.exp(v / tau) for v in lora[n].tolist()]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        expected += sum(a * math.log(a / b) for a, b in zip(p, q))  # KL(original || trained)
    got = logit_kl(lora, orig, sequences, tau)
    assert got.item() == pytest.approx(expected * tau ** 2 / sequences, rel=1e-5)
    assert logit_kl(orig, orig, sequences, tau).item() == pytest.approx(0.0, abs=1e-6)
    assert logit_kl(lora + 5.0, lora, sequences, tau).item() == pytest.approx(0.0, abs=1e-5)  # a shift is no change


def test_repbend_l2_terms_are_the_masked_mean_retain_distance():
    """safe_L2, unsafe_L2 and the refusal term are retain_loss with masked_mean (the RepBend reference's mean
    over layers and real tokens); unsafe_L2 is subtracted, so its gradient pushes away from the original."""
    entries = [1, 4]
    lora, orig = _states(20, entries), _states(21, entries)
    expected = _retain_distances(lora, orig, MASK, entries) / (len(entries) * MASK.sum().item())
    assert retain_loss(lora, orig, MASK, entries, normalization="masked_mean").item() == pytest.approx(expected)
    x = {l: v.clone().requires_grad_(True) for l, v in lora.items()}
    (-0.1 * retain_loss(x, orig, MASK, entries, normalization="masked_mean")).backward()
    moved = {l: x[l].detach() - 0.5 * x[l].grad for l in entries}
    assert _retain_distances(moved, orig, MASK, entries) > _retain_distances(lora, orig, MASK, entries)


# ---------------------------------------------------------------- the latent adversary (method: rr_lat)


def test_restoration_cosine_is_the_mean_cosine_without_relu(rerouting_case):
    lora, orig, layers = rerouting_case
    got = restoration_cosine(lora, orig, MASK, layers)
    direct = sum(float(MASK[b, t]) * _cos(lora[l][b, t], orig[l][b, t])
                 for l in layers for b in range(B) for t in range(T)) / (len(layers) * MASK.sum().item())
    assert got.item() == pytest.approx(direct, abs=1e-6)
    assert got.item() == pytest.approx(mean_cosine(lora, orig, MASK, layers), abs=1e-6)
    assert got.item() < rerouting_loss(lora, orig, MASK, layers).item()  # the ReLU'd one counts no negatives


def test_pgd_l2_step_moves_along_the_normalised_gradient_and_projects_per_token():
    delta = torch.zeros(1, 3, 2)
    grad = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [0.0, -2.0]]])
    radius = torch.tensor([[[1.0], [1.0], [0.25]]])
    step = torch.full((1, 3, 1), 0.5)
    moved = pgd_l2_step(delta, grad, radius, step)
    assert torch.allclose(moved[0, 0], torch.tensor([0.3, 0.4]))  # 0.5 along (3, 4) / 5
    assert torch.equal(moved[0, 1], torch.zeros(2))  # no gradient: no move
    assert torch.allclose(moved[0, 2], torch.tensor([0.0, -0.25]))  # 0.5 projected back to the radius 0.25
    again = pgd_l2_step(moved, grad, radius, step)
    assert torch.linalg.vector_norm(again[0, 0]).item() == pytest.approx(1.0)  # 0.5 + 0.5, on the ball's edge
    assert torch.all(torch.linalg.vector_norm(again, dim=-1, keepdim=True) <= radius + 1e-6)
