"""Harmfulness probes (docs/method.md section 8): read harmfulness from hidden states and halt generation.

A probe is trained on per-token hidden states of response tokens at one layer (circuit-breaker set
positive, retain sets negative), calibrated to a false-positive rate on benign responses it was not
fitted on (a held-out part of the retain train sets), evaluated on test sets disjoint from both
(`splits`), and run by a monitor during generation. See docs/probes.md.
"""

from .probe import (LinearProbe, MlpProbe, Probe, ProbeError, calibrate_threshold, false_positive_rate,
                    load_probe, make_probe, response_max)
from .splits import ProbeOverlapWarning, calibration_split, item_key

__all__ = [
    "LinearProbe",
    "MlpProbe",
    "Probe",
    "ProbeError",
    "ProbeOverlapWarning",
    "calibrate_threshold",
    "calibration_split",
    "false_positive_rate",
    "item_key",
    "load_probe",
    "make_probe",
    "response_max",
]
