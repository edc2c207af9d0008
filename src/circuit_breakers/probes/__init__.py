"""Harmfulness probes (method.md section 8): read harmfulness from hidden states and halt generation.

A probe is trained on per-token hidden states of response tokens at one layer (circuit-breaker set
positive, retain sets negative), calibrated to a false-positive rate on held-out benign responses,
and run by a monitor during generation. See docs/probes.md.
"""

from .probe import (LinearProbe, MlpProbe, Probe, ProbeError, calibrate_threshold, false_positive_rate,
                    load_probe, make_probe, response_max)

__all__ = [
    "LinearProbe",
    "MlpProbe",
    "Probe",
    "ProbeError",
    "calibrate_threshold",
    "false_positive_rate",
    "load_probe",
    "make_probe",
    "response_max",
]
