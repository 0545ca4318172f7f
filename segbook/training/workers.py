"""Processes forked by a trainer end when the trainer does, even when it is killed outright (kill -9, OOM killer).

nnU-Net's augmentation workers (batchgenerators, about 650 MB each) are daemon processes: they stop when their
parent exits normally, but survive a SIGKILL of it and then hold their memory for good. Every process forked from
the trainer gets a watchdog thread that ends it as soon as its parent is gone (the child is then re-parented, so
`os.getppid()` changes). It works wherever Python forks (Linux, the default start method up to Python 3.13); it
costs one sleeping thread per worker.
"""

from __future__ import annotations

import os
import threading

POLL_S = 0.5
_installed = False


def exit_with_parent() -> None:
    """From now on, every process forked from this one exits when this one dies. Idempotent."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(after_in_child=_watch_parent)
    _installed = True


def _watch_parent() -> None:
    parent = os.getppid()
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True, name="segbook parent watch").start()


def _exit_when_orphaned(parent: int) -> None:
    stop = threading.Event()
    while not stop.wait(POLL_S):
        if os.getppid() != parent:
            os._exit(1)
