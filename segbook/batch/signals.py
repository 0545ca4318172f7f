"""Signals that stop a job, the same for both launchers: SIGTERM as an exception of its own, and stop signals
passed on to nnU-Net's DDP ranks.

- SIGTERM raises `Terminated` (a KeyboardInterrupt, so the run records "interrupted" and its claim is released)
  in a worker or a SLURM task: scancel, a time limit reached without SLURM's warning, `kill`. Unlike Ctrl-C
  (SIGINT) or a requeue, it counts against --max-attempts (`segbook.batch.attempts`).
- While a run trains, the trainer defers SIGINT, SIGTERM and SLURM's warning signal (USR2) to the next iteration
  boundary, saves a checkpoint there, and only then lets the handler installed before training act (submitit's
  requeue for USR2, `Terminated`, KeyboardInterrupt): see `segbook.training.trainer_parts.stopping`.
- With nnU-Net's DDP (`--gpus-per-job` > 1) the ranks train in processes of their own, which a signal sent to
  this process alone never reaches. `forwarding_to_ranks()` passes every stop signal on to them as SIGINT (the
  one signal a freshly started Python process turns into an exception rather than dying of), lets them save and
  stop, and tells the caller which signal came, to act on it once they have. Ranks of a claim lost to another
  process are killed outright: they must not write anything more.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from typing import Any, Callable, Iterator

from segbook import claims

#: The signals that stop a job: Ctrl-C, scancel and time limits, SLURM's warning before the time limit.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: the job stops as on Ctrl-C, but the attempt counts as ended badly."""


def raise_terminated(signum: int, frame: Any) -> None:
    """A SIGTERM handler: stop the job with `Terminated`."""
    raise Terminated(f"stopped by {signal.Signals(signum).name}")


def forks_die_on_sigterm() -> None:
    """From now on a process forked from this one takes SIGTERM's default action (it dies) instead of inheriting
    `raise_terminated`. nnU-Net's planning forks pools (`create_lists_from_splitted_dataset_folder`'s `Pool`) whose
    `with` block ends by sending each worker SIGTERM: with the handler inherited, a worker turns it into
    `Terminated`, runs Python's exit code in its forked state, and can block there on a lock for good while the
    pool's owner waits for it (a SLURM preparation task hung so, a forked worker asleep on a futex). Forks only:
    a spawned process starts with the default handlers anyway."""
    global _forks_die
    if not _forks_die and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
        _forks_die = True


_forks_die = False


def act_on(signum: int, handler: Callable[[int, Any], Any] | int | None) -> None:
    """Do what `handler`, installed for `signum`, would have done had the signal reached it directly: call it, or
    stop the way the default action would (for SIGTERM and USR2 the process would have died)."""
    if callable(handler):
        handler(signum, None)
    elif handler != signal.SIG_IGN:
        raise KeyboardInterrupt if signum == signal.SIGINT else Terminated(f"stopped by {signal.Signals(signum).name}")


class Forwarded:
    """The stop signals that came while ranks trained, and the handlers they would have reached."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.previous: dict[int, Any] = {}

    def act(self) -> None:
        """Act on the first signal that came (nothing when none did), as its previous handler would have."""
        if self.received:
            signum = self.received[0]
            act_on(signum, self.previous.get(signum, signal.SIG_DFL))


@contextlib.contextmanager
def forwarding_to_ranks() -> Iterator[Forwarded]:
    """Pass stop signals on to this process's children (the DDP ranks) for the block. Handlers go in where Python
    allows them (the main thread); the previous ones come back after the block, and the caller acts on what came
    (`Forwarded.act`) once the ranks have stopped."""
    forwarded = Forwarded()
    if threading.current_thread() is not threading.main_thread():
        yield forwarded
        return

    def forward(signum: int, frame: Any) -> None:
        forwarded.received.append(signum)
        passed_on = signal.SIGKILL if claims.lost_any() else signal.SIGINT
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, passed_on)

    forwarded.previous = {sig: signal.signal(sig, forward) for sig in STOP_SIGNALS}
    try:
        yield forwarded
    finally:
        for sig, handler in forwarded.previous.items():
            signal.signal(sig, handler)
