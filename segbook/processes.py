"""Child processes end with their parent, even when the parent is killed outright (kill -9, the out-of-memory killer).

A child left behind holds its memory (nnU-Net's augmentation workers: about 650 MB each; a worker of `segbook data
import`'s pool: about 145 MB) or, for a batch worker, a GPU and a job's claim, with nobody left to stop it.
`bind_to_parent` is the one mechanism, for every kind of child:

- processes forked from a trainer (nnU-Net's augmentation workers): `exit_with_parent()` binds every fork to the
  process it was forked from, which kills it (SIGKILL);
- workers of a spawned process pool (`segbook.data.validate.parallel_map`, the evaluation's metrics):
  `ProcessPoolExecutor(initializer=bind_to_parent, initargs=(os.getpid(),))`, SIGKILL too;
- the worker `segbook batch run` starts for each job (`segbook.batch.worker`) is bound to its launcher with SIGHUP,
  which it turns into one SIGINT: it stops as on the launcher's Ctrl-C (a checkpoint at the next iteration, its claim
  released, resumed by the next launcher) and, if it has not ended `grace_s` seconds later (hung), is killed with
  its process group.

On Linux the kernel sends the signal (prctl PR_SET_PDEATHSIG): at once, whatever the child does, even in code that
holds the GIL. It comes when the *thread* that started the child ends, so children are started from a thread that
outlives them (the main thread, or the one that owns the pool), and it may come more than once (once for each thread
of the dying parent the child passes through on the way to its new parent; seen with SIGINT, whose second arrival is
a second Ctrl-C). It never comes when the parent died before the child asked for it, which a look at the parent
right after closes. Elsewhere a thread polls the parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

POLL_S = 0.5
_PR_SET_PDEATHSIG = 1


def _find_prctl():
    """libc's prctl, looked up once in the parent: a forked child must not load libraries (another thread may have
    held the loader's lock at the fork)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _find_prctl()
_installed = False
_forked_from: int | None = None


def bind_to_parent(parent: int, signum: int = signal.SIGKILL, grace_s: float | None = None) -> None:
    """From now on this process gets `signum` when `parent`, the process that started it, dies; with `grace_s`, its
    process group (itself, when it leads none) is killed if it is still alive that many seconds later."""
    by_kernel = _prctl is not None and _prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) == 0
    if os.getppid() != parent:  # it died before the kernel was asked
        os.kill(os.getpid(), signum)
    if not by_kernel or grace_s is not None:
        threading.Thread(target=_watch, args=(parent, None if by_kernel else signum, grace_s), daemon=True,
                         name="segbook parent watch").start()


def _watch(parent: int, signum: int | None, grace_s: float | None) -> None:
    while os.getppid() == parent:  # an orphan is adopted by another process
        time.sleep(POLL_S)
    if signum is not None:
        os.kill(os.getpid(), signum)
    if grace_s is not None:
        time.sleep(grace_s)
        if os.getpgrp() == os.getpid():
            os.killpg(os.getpid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)


def exit_with_parent() -> None:
    """From now on, every process forked from this one (and from those) is killed when the process it was forked
    from dies. Idempotent."""
    global _installed
    if _installed or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(before=_note_parent, after_in_child=_bind_fork)
    _installed = True


def _note_parent() -> None:
    global _forked_from
    _forked_from = os.getpid()


def _bind_fork() -> None:
    bind_to_parent(_forked_from)
