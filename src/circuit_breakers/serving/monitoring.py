"""The probe path: the server's generation loop watched by the probe monitor.

The rules are the monitor's (`circuit_breakers.probes.monitor`): its hook scores the probe's layer
for every generated token when the token is fed back in; a response trips at the first token whose
logit is strictly above the probe's threshold logit; the tripping token is never shown; a tripped
response is answered with the refusal. `serving.engine.BatchGeneration` applies them per row, which
gives the server what `monitored_generate_batch` / `monitored_stream` do not offer together: stop
strings, sampling, per-row max_tokens and streaming, all in one batch. tests/serving pin that the
server's greedy answers agree with `monitored_generate_batch` (text, trip, token index, max score).
"""

from __future__ import annotations


def make_monitor(model, probe):
    """A `ProbeMonitor` for `model`; raises `ProbeError` when the probe does not fit the model."""
    from ..probes.monitor import ProbeMonitor

    return ProbeMonitor(model, probe)
