"""Stop signals passed on to nnU-Net's DDP ranks (`segbook.batch.signals.forwarding_to_ranks`): a signal that reaches
the job's process alone (scancel, SLURM's warning) must reach every rank, which stop at an iteration boundary, and
the job then acts on the signal that came, as the handler it replaced would have."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from segbook.batch.signals import Terminated, forwarding_to_ranks


def _rank(ready: Path, outcome: Path) -> None:
    """A rank as nnU-Net starts it: a fresh process in which SIGINT is a KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    ready.touch()
    try:
        time.sleep(60)
        outcome.write_text("not stopped")
    except KeyboardInterrupt:
        outcome.write_text("KeyboardInterrupt")


def _start_ranks(tmp_path: Path, count: int) -> list[tuple[multiprocessing.Process, Path]]:
    context = multiprocessing.get_context("spawn")
    ranks = []
    for index in range(count):
        ready, outcome = tmp_path / f"ready{index}", tmp_path / f"outcome{index}"
        process = context.Process(target=_rank, args=(ready, outcome))
        process.start()
        ranks.append((process, outcome))
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready{i}").exists() for i in range(count)):
        assert time.monotonic() < deadline, "the ranks did not start"
        time.sleep(0.05)
    return ranks


@pytest.mark.parametrize("signum", [signal.SIGUSR2, signal.SIGTERM])
def test_a_stop_signal_reaches_every_rank_and_the_job_acts_on_it_afterwards(tmp_path, signum):
    seen: list[int] = []

    def handler(received: int, frame: object) -> None:
        seen.append(received)

    previous = signal.signal(signum, handler)
    try:
        with forwarding_to_ranks() as forwarded:
            ranks = _start_ranks(tmp_path, 2)
            os.kill(os.getpid(), signum)  # to the job's process only, as SLURM signals the batch step
            for process, _ in ranks:
                process.join(timeout=60)
            assert seen == []  # held while the ranks stop
        assert [outcome.read_text() for _, outcome in ranks] == ["KeyboardInterrupt"] * 2
        assert forwarded.received == [signum]
        forwarded.act()
        assert seen == [signum]  # the handler installed before (submitit's requeue, the worker's stop) acts
        assert signal.getsignal(signum) is handler  # back in place after the block
    finally:
        signal.signal(signum, previous)


def test_sigterm_under_the_default_handler_stops_the_job_as_terminated(tmp_path):
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        with forwarding_to_ranks() as forwarded:
            ranks = _start_ranks(tmp_path, 1)
            os.kill(os.getpid(), signal.SIGTERM)
            ranks[0][0].join(timeout=60)
        assert ranks[0][1].read_text() == "KeyboardInterrupt"
        with pytest.raises(Terminated, match="SIGTERM"):
            forwarded.act()  # the process would have died: it stops, and the attempt counts as terminated
    finally:
        signal.signal(signal.SIGTERM, previous)
