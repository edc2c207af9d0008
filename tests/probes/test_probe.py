"""Probe training, threshold calibration, save/load."""
import json
import math

import pytest
import torch

from circuit_breakers.probes import (LinearProbe, MlpProbe, ProbeError, calibrate_threshold, false_positive_rate,
                                     load_probe, make_probe)


def _blobs(n=400, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 4 == 0).float()  # imbalanced: a quarter positive
    X = torch.randn(n, dim, generator=g) * 3 + 50  # offset and scale: the standardiser must cope
    X[:, :8] += torch.where(y[:, None] == 1, 6.0, -6.0)
    return X, y


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_probes_separate_a_separable_set_deterministically(kind):
    X, y = _blobs()
    Xt, yt = _blobs(seed=1)
    a = make_probe(kind, 16, seed=3).fit(X, y, epochs=15, batch_size=64, lr=1e-2)
    b = make_probe(kind, 16, seed=3).fit(X, y, epochs=15, batch_size=64, lr=1e-2)
    accuracy = float(((a.scores(Xt) > 0.5).float() == yt).float().mean())
    assert accuracy > 0.95
    assert torch.equal(a.scores(Xt), b.scores(Xt))
    c = make_probe(kind, 16, seed=4).fit(X, y, epochs=15, batch_size=64, lr=1e-2)
    assert not torch.equal(a.scores(Xt), c.scores(Xt))
    assert torch.allclose(a.mean, X.mean(0)) and a.history[-1] < a.history[0]
    assert isinstance(a, LinearProbe if kind == "linear" else MlpProbe)


def test_fit_rejects_a_single_class():
    with pytest.raises(ProbeError, match="both classes"):
        make_probe("linear", 4).fit(torch.randn(8, 4), torch.ones(8))


@pytest.mark.parametrize("fpr", [0.0, 0.01, 0.05, 0.1, 0.25, 0.5])
def test_calibrated_threshold_keeps_per_response_fpr_under_target(fpr):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(700, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 97, (700,), generator=g)
    threshold = calibrate_threshold(scores, fpr, groups=groups)
    achieved = false_positive_rate(scores, threshold, groups=groups)
    assert achieved <= fpr
    assert achieved > fpr - 2 / 97  # the threshold is not needlessly high
    # per-response maxima decide: one hot token trips the whole response
    per_response = torch.zeros(97, dtype=torch.float64).scatter_reduce(0, groups, scores, reduce="amax")
    assert math.isclose(achieved, float((per_response > threshold).double().mean()))


def test_calibration_with_ties_and_saturated_scores():
    scores = torch.tensor([1.0, 1.0, 1.0, 0.2, 0.1])
    threshold = calibrate_threshold(scores, 0.4)
    assert false_positive_rate(scores, threshold) <= 0.4


def _trained(kind="mlp"):
    X, y = _blobs()
    probe = make_probe(kind, 16, seed=1, layer=3).fit(X, y, epochs=2, batch_size=128)
    probe.calibrate(X[y == 0], torch.arange(int((y == 0).sum())) // 3, 0.05)
    probe.info.update(base_model="tiny", training_data={"sets": {"harm": {"items": 1, "tokens": 100}}},
                      item_ids={"training": ["a1"], "calibration": ["b2"]})
    return probe, X


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_save_load_round_trip(tmp_path, kind):
    probe, X = _trained(kind)
    probe.save(tmp_path / "p")
    meta = json.loads((tmp_path / "p" / "probe.json").read_text())
    for key in ("base_model", "layer", "kind", "threshold", "threshold_logit", "target_fpr", "hidden_size",
                "training_data", "seed", "date", "calibration"):
        assert key in meta
    assert meta["kind"] == kind and meta["layer"] == 3 and meta["target_fpr"] == 0.05 and meta["hidden_size"] == 16
    assert meta["calibration"]["achieved_fpr"] <= 0.05
    assert meta["calibration"]["tripped"] == math.floor(0.05 * meta["calibration"]["responses"])
    loaded = load_probe(tmp_path / "p")
    assert torch.equal(loaded.scores(X), probe.scores(X))
    assert loaded.threshold_logit == probe.threshold_logit and loaded.layer == 3 and loaded.kind == kind
    assert loaded.info["base_model"] == "tiny"
    assert loaded.info["item_ids"] == {"training": ["a1"], "calibration": ["b2"]}


def _edit(path, **changes):
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


def test_load_errors_name_the_file_and_field(tmp_path):
    probe, _ = _trained("mlp")
    d = probe.save(tmp_path / "p")
    with pytest.raises(ProbeError, match="probe.json: missing"):
        load_probe(tmp_path / "nowhere")
    _edit(d / "probe.json", kind="forest")
    with pytest.raises(ProbeError, match=r'probe.json: field "kind"'):
        load_probe(d)
    _edit(d / "probe.json", kind="linear")
    with pytest.raises(ProbeError, match=r'probe.safetensors: tensor "net.0.weight": shape \(64, 16\)'):
        load_probe(d)
    _edit(d / "probe.json", kind="mlp", hidden_size=17)
    with pytest.raises(ProbeError, match=r'probe.safetensors: tensor "mean": shape \(16,\), expected \(17,\)'):
        load_probe(d)
    _edit(d / "probe.json", hidden_size=16, threshold=0.123)
    with pytest.raises(ProbeError, match=r'field "threshold"'):
        load_probe(d)
    _edit(d / "probe.json", threshold=None, layer="top")
    with pytest.raises(ProbeError, match=r'field "layer"'):
        load_probe(d)
    _edit(d / "probe.json", layer=3, item_ids={"calibration": "abc"})
    with pytest.raises(ProbeError, match=r'field "item_ids"'):
        load_probe(d)
    (d / "probe.json").write_text("{not json")
    with pytest.raises(ProbeError, match="probe.json: not valid JSON"):
        load_probe(d)
    (d / "probe.safetensors").write_bytes(b"garbage")
    _edit_ok = probe.metadata()
    (d / "probe.json").write_text(json.dumps(_edit_ok))
    with pytest.raises(ProbeError, match="probe.safetensors: not a readable safetensors file"):
        load_probe(d)
