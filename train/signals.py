"""Stopping a run cleanly: SIGTERM, SIGUSR1 or Ctrl-C (SIGINT) asks the trainer to finish its step, save a
checkpoint and exit.

The handler only sets a flag; the training loop calls `StopRequest.agreed()` after each step. In a
multi-process run every rank calls it on the same step and the flags are summed over all ranks, so the
ranks stop together even when the signal reached only some of them. SLURM sends SIGTERM (or, with
`--signal=USR1@120`, SIGUSR1 ahead of the time limit): exit 0, and the requeued job resumes with
checkpoint.resume=auto. Ctrl-C: exit 130 (a stop asked for by the user, not a success); a second Ctrl-C raises
KeyboardInterrupt at once, which leaves at most an unfinished step-N.tmp folder that resume ignores.
The handlers are installed first thing in pretrain.py (this module imports nothing heavy), so a signal during
start-up stops the run as cleanly.
"""
from __future__ import annotations

import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
EXIT_CODES = {"SIGINT": 130}  # the others: 0 (preemption, to be requeued)


class StopRequest:
    """Installs the handlers on creation (main thread only); `restore()` puts the previous ones back. `device`:
    where the flag is all-reduced (set once the device is known)."""

    def __init__(self, device=None, signals=STOP_SIGNALS):
        self.device = device
        self.received: str | None = None  # name of the first signal caught
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:  # no printing here: the signal may interrupt a print
        if self.received is None:
            self.received = signal.Signals(signum).name
        elif signum == signal.SIGINT:  # the second Ctrl-C: stop at once
            raise KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.received, 0)

    def agreed(self) -> bool:
        """True when any rank has received a stop signal. A collective in multi-process runs: call on every rank."""
        import torch

        from parallel.comm import all_reduce_sum, is_distributed
        if not is_distributed():
            return self.received is not None
        flag = torch.tensor([float(self.received is not None)], device=self.device)
        return all_reduce_sum(flag).item() > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
