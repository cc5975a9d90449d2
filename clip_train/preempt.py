"""Preemption: SIGTERM or SIGUSR1 end a run after its current step, with a checkpoint.

Schedulers warn before they kill: SLURM sends the signal of `#SBATCH --signal=USR1@120` that many
seconds before the time limit, and SIGTERM on preemption or `scancel`. The handler only records
the signal; the training loop asks at the end of every step, all processes together (a scheduler
may signal only some of them), saves a checkpoint and returns; the CLI then exits with
`PREEMPTED_EXIT_CODE`, so a job script can tell "requeue me" from success and from failure.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

import torch

# EX_TEMPFAIL of sysexits.h ("try again later"). 143 (128 + SIGTERM) would read as "killed".
PREEMPTED_EXIT_CODE = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """While entered, SIGTERM and SIGUSR1 set a flag instead of ending the process.

    The previous handlers come back on exit. Signals can only be handled in the main thread;
    elsewhere (a notebook's worker thread) the guard does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _record(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def signal_name(self) -> str:
        """The signal this process received ("a signal to another process" when none)."""
        return signal.Signals(self.signum).name if self.signum else "a signal to another process"

    def stop_agreed(
        self, all_reduce_sum: Callable[[torch.Tensor], torch.Tensor], device: torch.device
    ) -> bool:
        """True on every process when any process was signalled; every process must call it."""
        flag = torch.tensor([0.0 if self.signum is None else 1.0], device=device)
        return bool(all_reduce_sum(flag).item() > 0)
