"""Ctrl-C and SIGTERM: how a command stops.

The first signal raises KeyboardInterrupt in the main thread, which unwinds the command (the trainer turns it
into TrainingInterrupted, naming its last checkpoint). That exception can be lost: when the handler runs inside
Python code that C code called and whose errors it clears, nothing unwinds and a training run would go on to its
last step. (torch's `__torch_function__` lookup on a non-tensor argument does this: a SIGINT landing in the
argument's Python `__getattr__`, as nn.Module has, is swallowed; seen with torch 2.13.) So the signal is also
recorded, and the training loops (each step) and greedy generation (each batch) call `check()`: a lost
interrupt stops the command one step later. A second signal exits at once, even while the main thread is stuck
in a C call.
"""

from __future__ import annotations

import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: StopSignals | None = None  # the handlers in place, if any


def check() -> None:
    """Raise KeyboardInterrupt if a stop signal arrived while the handlers were in place. Cheap: for loops to
    call once per step or batch."""
    if _active is not None and _active.received is not None:
        raise KeyboardInterrupt


class StopSignals:
    """Installs the handlers for the duration of a command (main thread only; elsewhere it does nothing).
    `received`: the first signal, if one came. A watcher thread counts signals from the wakeup pipe, which
    the C-level handler writes, so a second one exits (status 128 + signal) even when Python's handlers
    cannot run."""

    def __init__(self, enabled: bool = True) -> None:
        # Signal handlers can only be set from the main thread (an in-process caller may be another one).
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None

    def __enter__(self) -> StopSignals:
        global _active
        if not self.enabled:
            return self
        self._previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)  # the C handler must never block on a full pipe
        self._previous_wakeup = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._handle)
        self._watcher = threading.Thread(target=self._watch, name="circuit-breakers-signals", daemon=True)
        self._watcher.start()
        self._outer, _active = _active, self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        if not self.enabled:
            return
        _active = self._outer
        signal.set_wakeup_fd(self._previous_wakeup)
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        os.close(self._write)  # the watcher reads end-of-file and returns
        self._watcher.join()
        os.close(self._read)

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None:
            _exit_now(signum)
        self.received = signum
        raise KeyboardInterrupt

    def _watch(self) -> None:
        seen = 0
        while data := os.read(self._read, 64):
            for signum in data:
                if signum in STOP_SIGNALS:
                    seen += 1
                    if seen > 1:
                        _exit_now(signum)


def _exit_now(signum: int) -> None:
    os.write(2, f"\ncircuit-breakers: {signal.Signals(signum).name} again: exiting at once\n".encode())
    os._exit(128 + signum)
