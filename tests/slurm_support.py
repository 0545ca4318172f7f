"""The one-node SLURM test cluster (scripts/slurm_cluster.sh) for pytest.

`ensure_slurm_cluster()` returns the running cluster, starting it first if it is down (as root). Where it cannot
run, it skips the calling test with the precise reason; with SEGBOOK_REQUIRE_SLURM=1 (CI) that reason fails the
test instead, so a broken cluster cannot pass as skipped tests.

The cluster has no accounting database, so `sacct` does not work and submitit sees every job as UNKNOWN. A job
that writes its result pickle is still done for submitit, but one that ends without it (cancelled, killed) is
never done and `job.result()` would wait forever: tests wait with `wait_for_results()`, which reads the job's
state from squeue (slurmctld keeps finished jobs for MinJobAge, 30 min here).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest
import submitit

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "slurm_cluster.sh"
REQUIRE_ENV = "SEGBOOK_REQUIRE_SLURM"
# What submitit and the tests call (the daemons, in /usr/sbin, are the script's to check).
CLIENT_COMMANDS = ("sbatch", "squeue", "scancel", "scontrol", "srun", "sinfo")
# squeue states after which a job does nothing more (short of a requeue, which makes it PENDING again).
FINAL_STATES = frozenset(
    {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"}
)
START_TIMEOUT_S = 120


@dataclass(frozen=True)
class SlurmCluster:
    partition: str
    node: str
    state_dir: Path

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "log"


# ensure_slurm_cluster()'s answer for this session: the cluster, or why there is none.
_answer: SlurmCluster | str | None = None


def ensure_slurm_cluster() -> SlurmCluster:
    """The running test cluster; skips (or, under SEGBOOK_REQUIRE_SLURM=1, fails) the test where there is none.

    The first call checks the cluster with `slurm_cluster.sh status` and starts it if needed; later calls return
    the same answer at once.
    """
    global _answer
    if _answer is None:
        _answer = _find_or_start()
    if isinstance(_answer, str):
        _unavailable(_answer)
    return _answer


def _find_or_start() -> SlurmCluster | str:
    missing = [command for command in CLIENT_COMMANDS if shutil.which(command) is None]
    if missing:
        return f"SLURM packages missing ({', '.join(missing)} not found): run `{SCRIPT} install` as root"
    if _run_script("status").returncode != 0:
        if os.geteuid() != 0:
            return f"the SLURM test cluster is not running and starting it needs root: `{SCRIPT} start`"
        try:
            started = _run_script("start", timeout_s=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return f"`{SCRIPT} start` did not finish in {START_TIMEOUT_S} s"
        if started.returncode != 0:
            return f"`{SCRIPT} start` failed:\n{started.stdout[-6000:]}"
    return _describe_cluster()


def _run_script(subcommand: str, timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), subcommand],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout_s,
    )


def _describe_cluster() -> SlurmCluster | str:
    """The default partition and its node, as sinfo reports them."""
    listing = subprocess.run(
        ["sinfo", "--noheader", "--format=%P %N"], capture_output=True, text=True, timeout=30
    )
    for line in listing.stdout.splitlines():
        partition, node = line.split()
        if partition.endswith("*"):
            state_dir = Path(os.environ.get("SEGBOOK_SLURM_DIR", "/tmp/segbook-slurm"))
            return SlurmCluster(partition=partition.rstrip("*"), node=node, state_dir=state_dir)
    return f"the SLURM test cluster runs but sinfo shows no default partition:\n{listing.stdout}{listing.stderr}"


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the SLURM test cluster is unavailable: {reason}", pytrace=False)
    pytest.skip(reason)


def queue_states(job_id: str) -> dict[str, str]:
    """{job id: state} for a job, an array (all its tasks, e.g. "12_0") or one array task, as squeue reports them.

    Finished jobs are included while slurmctld still holds them (MinJobAge); an unknown job gives {}.
    """
    listing = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", f"--jobs={job_id}", "--format=%i %T"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if listing.returncode != 0:
        if "Invalid job id" in listing.stderr:
            return {}
        raise RuntimeError(f"squeue failed: {listing.stderr.strip()}")
    return dict(line.split() for line in listing.stdout.splitlines())


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test naming `what` after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}; the cluster then:\n{_cluster_now()}")
        time.sleep(0.2)


def idle_node(timeout_s: float = 120) -> None:
    """Cancel what earlier tests left in the queue and wait until nothing holds a CPU: a test whose job takes all of
    a node's CPUs would otherwise wait for another test's job to reach its time limit. The test cluster runs only
    the tests' jobs, and the tests run one at a time."""
    subprocess.run(["scancel", "--full", f"--user={getpass.getuser()}"], capture_output=True,
                   timeout=30)
    wait_for(lambda: not _active_jobs(), timeout_s, "the jobs of earlier tests to leave the node")


def _active_jobs() -> list[str]:
    listing = subprocess.run(["squeue", "--noheader", "--states=PENDING,RUNNING,COMPLETING,SUSPENDED",
                              "--format=%i"], capture_output=True, text=True, timeout=30)
    return listing.stdout.split()


def _cluster_now() -> str:
    """The queue (every job, with its reason) and the nodes' states, for a test that timed out waiting on them."""
    commands = (["squeue", "--noheader", "--array", "--states=all", "--format=%i %T %r %C %j"],
                ["sinfo", "--Node", "--noheader", "--format=%N %T %C %m %E"])
    shown = []
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30)
            shown.append(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}")
        except (OSError, subprocess.TimeoutExpired) as error:
            shown.append(f"$ {' '.join(command)}: {error}")
    return "\n".join(shown)


def wait_for_results(jobs: Sequence[submitit.Job[Any]], timeout_s: float) -> list[Any]:
    """The jobs' results, once each has written its result pickle.

    Fails the test, with the job's state and stderr, when a job ends without a result or time runs out.
    """
    deadline = time.monotonic() + timeout_s
    for job in jobs:
        while not job.paths.result_pickle.exists():
            state = queue_states(job.job_id).get(job.job_id, "UNKNOWN")
            # The job may write its result just as it ends: look once more before calling it lost.
            ended = state in FINAL_STATES and not job.paths.result_pickle.exists()
            if ended or time.monotonic() > deadline:
                reason = f"ended as {state}" if ended else f"still {state} after {timeout_s} s"
                pytest.fail(f"SLURM job {job.job_id} {reason} without a result; stderr:\n{job.stderr()}")
            time.sleep(0.2)
    return [job.result() for job in jobs]
