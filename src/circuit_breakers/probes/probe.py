"""Harmfulness probes: a linear (logistic regression) or MLP classifier of one token's hidden state.

Both are `nn.Module`s with a standardiser (per-channel mean and std of the training features, kept as
buffers and saved with the weights), trained with AdamW on a class-balanced binary cross-entropy and
deterministic for a seed. `scores` are probabilities; the threshold is kept as a logit
(`threshold_logit`), because confident probes saturate float32 probabilities at exactly 1.0 and a
threshold of 1.0 could never be crossed.

A response trips when any of its tokens scores strictly above the threshold: the monitor halts on
the first such token, so the threshold is calibrated on per-response maxima
(`calibrate_threshold`). On disk a probe is a directory with `probe.safetensors` (weights and
standardiser) and `probe.json` (kind, layer, threshold, target FPR, base model, training summary,
which sets calibrated the threshold and the content keys of the items fitted and calibrated on).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_text

PROBE_KINDS = ("linear", "mlp")
MLP_HIDDEN_SIZES = (64, 32)
FORMAT = "circuit-breakers-probe/1"
WEIGHTS_FILE = "probe.safetensors"
METADATA_FILE = "probe.json"


class ProbeError(ValueError):
    """A probe that cannot be built, loaded or used; the message names the file and the field."""


def sigmoid(logit: float) -> float:
    if logit >= 0:
        return 1.0 / (1.0 + math.exp(-logit))
    z = math.exp(logit)
    return z / (1.0 + z)


def response_max(scores: torch.Tensor, groups: torch.Tensor, n_groups: int | None = None) -> torch.Tensor:
    """The max score of every group (response): the score that decides whether the response trips."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    groups = torch.as_tensor(groups, dtype=torch.long).flatten()
    if scores.shape != groups.shape:
        raise ValueError(f"scores and groups differ in length: {len(scores)} vs {len(groups)}")
    n = int(groups.max()) + 1 if n_groups is None and len(groups) else (n_groups or 0)
    out = torch.full((n,), -math.inf, dtype=torch.float64)
    out.scatter_reduce_(0, groups, scores, reduce="amax")
    return out[out > -math.inf]  # groups without tokens do not count


def calibrate_threshold(scores, fpr: float, *, groups=None) -> float:
    """The lowest threshold such that at most `fpr` of the benign responses score strictly above it.

    `scores` are one score per response, or per token with `groups` giving each token's response (the
    per-response max is then used). Works on any monotone score: probabilities or logits.
    """
    if not 0.0 <= fpr < 1.0:
        raise ValueError(f"fpr must be in [0, 1), got {fpr}")
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if groups is not None:
        scores = response_max(scores, groups)
    if len(scores) == 0:
        raise ValueError("calibrate_threshold needs at least one benign response")
    allowed = math.floor(fpr * len(scores) + 1e-9)  # responses that may trip
    ordered = torch.sort(scores, descending=True).values
    return float(ordered[allowed])


def false_positive_rate(scores, threshold: float, *, groups=None) -> float:
    """The fraction of responses whose (max) score is strictly above `threshold`."""
    scores = torch.as_tensor(scores, dtype=torch.float64).flatten()
    if groups is not None:
        scores = response_max(scores, groups)
    return float((scores > threshold).double().mean()) if len(scores) else 0.0


class Probe(nn.Module):
    """Base class: standardise, then `net` gives one logit per token. Subclasses build `net`."""

    kind = ""

    def __init__(self, hidden_size: int, *, seed: int = 0, layer: int | None = None):
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ProbeError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.seed = seed
        self.layer = layer
        self.threshold_logit: float | None = None
        self.target_fpr: float | None = None
        self.info: dict[str, Any] = {}  # base_model, training_data, calibration, training, date
        self.history: list[float] = []
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("std", torch.ones(hidden_size))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.net = self.build(hidden_size)

    def build(self, hidden_size: int) -> nn.Module:
        raise NotImplementedError

    @property
    def threshold(self) -> float | None:
        """The threshold as a probability (display); `threshold_logit` is the one compared."""
        return None if self.threshold_logit is None else sigmoid(self.threshold_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.to(self.mean.dtype) - self.mean) / self.std
        return self.net(x).squeeze(-1)

    @torch.no_grad()
    def logits(self, X: torch.Tensor, *, batch_size: int = 8192) -> torch.Tensor:
        """One logit per row of X (on the CPU), computed on the probe's device."""
        was_training = self.training
        self.eval()
        try:
            X = torch.as_tensor(X)
            if X.shape[-1] != self.hidden_size:
                raise ProbeError(f"features have {X.shape[-1]} channels, the probe expects {self.hidden_size}")
            device = self.mean.device
            return torch.cat([self(X[i:i + batch_size].to(device)).cpu() for i in range(0, len(X), batch_size)]) \
                if len(X) else torch.zeros(0)
        finally:
            self.train(was_training)

    def scores(self, X: torch.Tensor) -> torch.Tensor:
        """Probability of "harmful" for every row of X."""
        return torch.sigmoid(self.logits(X).double()).float()

    def fit(self, X: torch.Tensor, y: torch.Tensor, *, epochs: int = 10, lr: float = 1e-3,
            weight_decay: float = 1e-2, batch_size: int = 256, progress: bool = False) -> "Probe":
        """Fit the standardiser on X, then train with AdamW on class-balanced BCE. Deterministic per seed."""
        from tqdm.auto import tqdm

        X = torch.as_tensor(X, dtype=torch.float32)
        y = torch.as_tensor(y, dtype=torch.float32).flatten()
        if X.ndim != 2 or X.shape[1] != self.hidden_size:
            raise ProbeError(f"X must be (samples, {self.hidden_size}), got {tuple(X.shape)}")
        if len(y) != len(X):
            raise ProbeError(f"X has {len(X)} rows but y has {len(y)}")
        n_pos = int((y == 1).sum())
        n_neg = int((y == 0).sum())
        if n_pos + n_neg != len(y) or n_pos == 0 or n_neg == 0:
            raise ProbeError(f"y must hold 0s and 1s with both classes present (got {n_pos} positive, "
                             f"{n_neg} negative of {len(y)})")
        device = self.mean.device
        self.mean.copy_(X.mean(0).to(device))
        self.std.copy_(X.std(0, unbiased=False).clamp_min(1e-6).to(device))
        weights = torch.where(y == 1, len(y) / (2 * n_pos), len(y) / (2 * n_neg))
        generator = torch.Generator().manual_seed(self.seed)
        optimizer = torch.optim.AdamW(self.net.parameters(), lr=lr, weight_decay=weight_decay)
        loss_fn = nn.BCEWithLogitsLoss(reduction="none")
        self.train()
        self.history = []
        for _ in tqdm(range(epochs), disable=not progress, desc=f"{self.kind} probe"):
            order = torch.randperm(len(X), generator=generator)
            total = 0.0
            for start in range(0, len(X), batch_size):
                idx = order[start:start + batch_size]
                xb, yb, wb = X[idx].to(device), y[idx].to(device), weights[idx].to(device)
                loss = (loss_fn(self(xb), yb) * wb).sum() / wb.sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
            self.history.append(total / len(X))
        self.eval()
        self.info["training"] = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay,
                                 "batch_size": batch_size, "final_loss": self.history[-1] if self.history else None,
                                 "samples": len(X), "positive": n_pos, "negative": n_neg}
        return self

    def calibrate(self, X: torch.Tensor, groups: torch.Tensor, fpr: float) -> float:
        """Set the threshold from benign responses' token features (X, groups); returns the achieved FPR."""
        logits = self.logits(X)
        self.threshold_logit = calibrate_threshold(logits, fpr, groups=groups)
        self.target_fpr = fpr
        maxima = response_max(logits, groups)
        achieved = false_positive_rate(maxima, self.threshold_logit)
        self.info["calibration"] = {"responses": int(len(maxima)), "tokens": len(logits),
                                    "tripped": int((maxima > self.threshold_logit).sum()),
                                    "achieved_fpr": achieved}
        return achieved

    def trips(self, logits: torch.Tensor) -> torch.Tensor:
        """Whether each logit crosses the threshold (strictly above)."""
        if self.threshold_logit is None:
            raise ProbeError("the probe has no threshold: calibrate it (Probe.calibrate) or set threshold_logit")
        return logits > self.threshold_logit

    # ------------------------------------------------------------ saving and loading

    def metadata(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "hidden_sizes": list(getattr(self, "hidden_sizes", ())),
            "layer": self.layer,
            "threshold": self.threshold,
            "threshold_logit": self.threshold_logit,
            "target_fpr": self.target_fpr,
            "seed": self.seed,
            "base_model": self.info.get("base_model"),
            "date": self.info.get("date") or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "training_data": self.info.get("training_data", {}),
            "calibration": self.info.get("calibration", {}),
            "training": self.info.get("training", {}),
            # content keys (splits.item_key) of the items fitted on and calibrated on; `probe eval` checks them
            "item_ids": self.info.get("item_ids", {}),
        }

    def save(self, directory: str | Path) -> Path:
        """Write probe.safetensors and probe.json into `directory` (created); returns it."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT, "kind": self.kind})
        atomic_write_text(directory / METADATA_FILE, json.dumps(self.metadata(), indent=2) + "\n")
        return directory


class LinearProbe(Probe):
    """Logistic regression on the standardised hidden state."""

    kind = "linear"

    def build(self, hidden_size: int) -> nn.Module:
        return nn.Sequential(nn.Linear(hidden_size, 1))


class MlpProbe(Probe):
    """Two hidden layers (64 and 32 units, ReLU), as in the paper's MLP probe."""

    kind = "mlp"
    hidden_sizes = MLP_HIDDEN_SIZES

    def build(self, hidden_size: int) -> nn.Module:
        a, b = self.hidden_sizes
        return nn.Sequential(nn.Linear(hidden_size, a), nn.ReLU(), nn.Linear(a, b), nn.ReLU(), nn.Linear(b, 1))


def make_probe(kind: str, hidden_size: int, *, seed: int = 0, layer: int | None = None) -> Probe:
    classes = {"linear": LinearProbe, "mlp": MlpProbe}
    if kind not in classes:
        raise ProbeError(f"probe kind must be one of {', '.join(PROBE_KINDS)}, got {kind!r}")
    return classes[kind](hidden_size, seed=seed, layer=layer)


def _field(meta: dict, name: str, where: Path, check, expected: str, *, optional: bool = False):
    if name not in meta or meta[name] is None:
        if optional:
            return None
        raise ProbeError(f'{where}: field "{name}": missing, expected {expected}')
    value = meta[name]
    if not check(value):
        raise ProbeError(f'{where}: field "{name}": expected {expected}, got {value!r}')
    return value


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def load_probe(directory: str | Path, *, device: str | torch.device = "cpu") -> Probe:
    """Load a probe saved by `Probe.save`; every inconsistency names the file and the field or tensor."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    meta_path, weights_path = directory / METADATA_FILE, directory / WEIGHTS_FILE
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise ProbeError(f"{path}: missing; a probe directory holds {METADATA_FILE} and {WEIGHTS_FILE} "
                             f"(written by `circuit-breakers probe train`)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ProbeError(f"{meta_path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ProbeError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")
    _field(meta, "format", meta_path, lambda v: v == FORMAT, f'"{FORMAT}"')
    kind = _field(meta, "kind", meta_path, lambda v: v in PROBE_KINDS, " or ".join(map(repr, PROBE_KINDS)))
    hidden_size = _field(meta, "hidden_size", meta_path, lambda v: _is_int(v) and v > 0, "a positive integer")
    layer = _field(meta, "layer", meta_path, lambda v: _is_int(v) and v >= 0, "a non-negative integer or null",
                   optional=True)
    threshold_logit = _field(meta, "threshold_logit", meta_path, _is_number, "a finite number or null",
                             optional=True)
    threshold = _field(meta, "threshold", meta_path, lambda v: _is_number(v) and 0 <= v <= 1,
                       "a probability or null", optional=True)
    if threshold is not None and threshold_logit is None:
        raise ProbeError(f'{meta_path}: field "threshold_logit": missing while "threshold" is set; '
                         f'"threshold_logit" is the value the monitor compares (threshold = sigmoid of it)')
    if threshold is not None and abs(sigmoid(threshold_logit) - threshold) > 1e-6:
        raise ProbeError(f'{meta_path}: field "threshold": {threshold} is not sigmoid(threshold_logit) = '
                         f'{sigmoid(threshold_logit):.6g}; edit "threshold_logit" (the value compared) and '
                         f'remove or update "threshold"')
    target_fpr = _field(meta, "target_fpr", meta_path, lambda v: _is_number(v) and 0 <= v < 1,
                        "a number in [0, 1) or null", optional=True)
    seed = _field(meta, "seed", meta_path, _is_int, "an integer", optional=True) or 0
    _field(meta, "item_ids", meta_path,
           lambda v: isinstance(v, dict) and all(isinstance(ids, list) and all(isinstance(i, str) for i in ids)
                                                 for ids in v.values()),
           'an object of lists of item keys ("training", "calibration")', optional=True)

    probe = make_probe(kind, hidden_size, seed=seed, layer=layer)
    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ProbeError(f"{weights_path}: not a readable safetensors file ({e})") from None
    expected = probe.state_dict()
    for name, tensor in expected.items():
        if name not in tensors:
            raise ProbeError(f'{weights_path}: tensor "{name}": missing (a {kind} probe needs '
                             f'{", ".join(expected)})')
        if tuple(tensors[name].shape) != tuple(tensor.shape):
            raise ProbeError(f'{weights_path}: tensor "{name}": shape {tuple(tensors[name].shape)}, expected '
                             f'{tuple(tensor.shape)} for a {kind} probe with hidden_size {hidden_size} '
                             f'({meta_path.name})')
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ProbeError(f'{weights_path}: unexpected tensors {extra} for a {kind} probe '
                         f'(kind in {meta_path.name} may be wrong)')
    probe.load_state_dict({k: v.float() for k, v in tensors.items()})
    probe.threshold_logit = float(threshold_logit) if threshold_logit is not None else None
    probe.target_fpr = target_fpr
    probe.info = {k: meta.get(k) for k in ("base_model", "date", "training_data", "calibration", "training",
                                           "item_ids")
                  if meta.get(k) is not None}
    return probe.to(device).eval()
