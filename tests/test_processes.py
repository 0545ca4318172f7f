"""Children end with their parent (`segbook.processes`, issue 22): by the kernel's parent-death signal, by the
watching thread where there is none, at once when the parent died before the child asked, and with their process
group when they do not stop in time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from helpers import alive, wait_until_gone

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads processes from /proc (Linux)")

#: A parent that starts a child bound to it, prints the child's pid and waits; `{kernel}`: False takes the thread's
#: way, as where there is no prctl.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import os, time
import segbook.processes as processes
if not {kernel}:
    processes._prctl = None
processes.bind_to_parent(os.getppid())
print("bound", flush=True)
time.sleep(120)
'''], stdout=subprocess.PIPE, text=True)
assert child.stdout.readline() == "bound\\n"
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("kernel", [True, False], ids=["parent-death signal", "watching thread"])
def test_a_child_bound_to_its_parent_ends_when_the_parent_is_killed_outright(kernel):
    parent = subprocess.Popen([sys.executable, "-c", PARENT.format(kernel=kernel)], stdout=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        assert not wait_until_gone([child], 5), "the child outlived its parent"
    finally:
        os.killpg(parent.pid, signal.SIGKILL)


def test_a_child_whose_parent_died_before_it_asked_ends_at_once():
    """The window between the parent's death and the child's request: the kernel would never send the signal."""
    gone = subprocess.run([sys.executable, "-c", "import os; import segbook.processes as p; p.bind_to_parent(1); "
                                                 "print('still here')"], capture_output=True, text=True, timeout=60)
    assert gone.returncode == -signal.SIGKILL and "still here" not in gone.stdout


def test_a_worker_whose_launcher_dies_stops_once_as_on_ctrl_c_however_often_the_kernel_says_so(tmp_path):
    """The kernel may send the parent-death signal once per thread of the dying parent; a second SIGINT would stop
    training at once, without its checkpoint: the worker turns the first SIGHUP into one SIGINT."""
    script = textwrap.dedent("""
        import os, signal, sys, time
        from segbook.batch.worker import _launcher_gone
        signal.signal(signal.SIGHUP, _launcher_gone)
        interrupts = []
        signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(signum))
        print("ready", flush=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not os.path.exists(sys.argv[1]):
            time.sleep(0.05)
        time.sleep(0.5)
        print(len(interrupts), flush=True)
    """)
    sent = tmp_path / "sent"
    worker = subprocess.Popen([sys.executable, "-c", script, str(sent)], stdout=subprocess.PIPE, text=True)
    assert worker.stdout.readline() == "ready\n"
    for _ in range(3):
        os.kill(worker.pid, signal.SIGHUP)
        time.sleep(0.1)
    sent.touch()
    assert worker.stdout.readline() == "1\n"
    assert worker.wait(timeout=30) == 0


#: A parent whose child (leading a process group of its own, with a grandchild in it) ignores the signal it asked
#: for, as a hung worker would; it prints the child's and the grandchild's pids.
HUNG = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", '''
import os, signal, subprocess, sys, time
import segbook.processes as processes
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
processes.bind_to_parent(os.getppid(), signal.SIGUSR1, grace_s=1)
grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(grandchild.pid, flush=True)
time.sleep(120)
'''], stdout=subprocess.PIPE, text=True, start_new_session=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(120)
"""


def test_a_child_that_does_not_stop_is_killed_with_its_process_group_after_the_grace_period():
    parent = subprocess.Popen([sys.executable, "-c", HUNG], stdout=subprocess.PIPE, text=True, start_new_session=True)
    child, grandchild = map(int, parent.stdout.readline().split())
    try:
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        time.sleep(0.3)
        assert alive(child)  # it ignored the signal ...
        assert not wait_until_gone([child, grandchild], 10), "the hung child's group outlived the grace period"
    finally:
        for pid in (child, grandchild):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
