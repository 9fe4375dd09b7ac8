"""Preemption: SIGTERM or SIGUSR1 asks the trainer to finish its step, save a checkpoint and exit 0.

The handler only sets a flag; the training loop calls `StopRequest.agreed()` after each step. In a
multi-process run every rank calls it on the same step and the flags are summed over all ranks, so the
ranks stop together even when the signal reached only some of them. SLURM sends SIGTERM (or, with
`--signal=USR1@120`, SIGUSR1 ahead of the time limit); the requeued job resumes with checkpoint.resume=auto.
"""
from __future__ import annotations

import signal

import torch

from parallel.comm import all_reduce_sum, is_distributed

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Installs the handlers on creation (main thread only); `restore()` puts the previous ones back."""

    def __init__(self, device: torch.device, signals=STOP_SIGNALS):
        self.device = device
        self.received: str | None = None  # name of the first signal caught
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:  # no printing here: the signal may interrupt a print
        if self.received is None:
            self.received = signal.Signals(signum).name

    def agreed(self) -> bool:
        """True when any rank has received a stop signal. A collective in multi-process runs: call on every rank."""
        if not is_distributed():
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=self.device)
        return all_reduce_sum(flag).item() > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
