"""Attempts: how often a job was started, how each start ended, and when to stop starting it.

An attempt is one claim of a job by `run_job`. Its claim record carries the job's counts (`ClaimRecord.info`):
the attempt's number, how many earlier attempts ended badly since the last `batch retry`, the --max-attempts it
ran under, and how the previous attempt ended. The newest claim alone therefore says where a job stands: status
reads one small file per job, never a history. It also says where the job last ran (`backend`: "local" or "slurm",
which `batch retry` sends it back to). How an attempt ended:

- not counted: done; failed (the error is in run.json, and the job is failed anyway); requeued (submitit's requeue
  on SLURM's warning signal, or SLURM requeued the job itself, e.g. after a node failure: the attempt ended by
  SIGTERM or was killed, but the same SLURM job waits to run again (squeue) or runs again with a higher restart
  count); interrupted (Ctrl-C, SIGINT, the local launcher's death); stopped because its task was not prepared;
- counted: terminated (SIGTERM: scancel, a time limit reached without the warning, kill), and killed: the process
  died without releasing its claim (kill -9, the out-of-memory killer, a node failure SLURM does not requeue). A
  killed attempt is described by what is known: the exit status the local launcher saw (`note_ending`), SLURM's
  final state and exit code (scontrol while slurmctld holds the job, sacct where the cluster has accounting), else
  why its holder was judged gone (its process exited, squeue no longer lists it, its heartbeat stopped).

After --max-attempts bad endings (default 3) the job is failed with the last one as the reason; `batch submit` and
`batch run` leave it alone, and `batch retry --failed` starts the count again.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Mapping

from segbook.batch.cluster import slurm_ending
from segbook.claims import Claim, ClaimRecord, InfoFor
from segbook.io import atomic_write_text
from segbook.squeue import own_slurm_job

ATTEMPT, RESET = "attempt", "reset"
DEFAULT_MAX_ATTEMPTS = 3
#: How a released attempt ended, by its claim's outcome, when that does not count against the limit.
NOT_COUNTED = {"done": "done", "failed": "failed (the error is in run.json)",
               "unprepared": "stopped: its task was not prepared", "SystemExit": "requeued (SLURM's warning signal)",
               "KeyboardInterrupt": "interrupted (Ctrl-C, or its launcher stopped or died)",
               "reset for retry": "reset by `segbook batch retry`"}
TERMINATED = "Terminated"
REQUEUED_BY_SLURM = "requeued by SLURM (a node failure, a preemption or `scontrol requeue`)"
#: squeue's states of a SLURM job that ran and waits to run again.
REQUEUED_STATES = frozenset({"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"})


@dataclass(frozen=True)
class Attempts:
    """A job's attempts: started, ended badly since the last retry, the limit, and how the latest ones ended."""

    count: int = 0
    bad: int = 0
    max: int | None = None
    last: str | None = None  # how the latest attempt that is over ended
    last_bad: str | None = None  # the latest bad ending

    @classmethod
    def from_info(cls, info: Mapping[str, Any] | None) -> "Attempts":
        info = info or {}
        return cls(int(info.get("attempt", 0)), int(info.get("bad", 0)), info.get("max"), info.get("last"),
                   info.get("last_bad"))

    @property
    def exhausted(self) -> bool:
        return self.max is not None and self.bad >= self.max

    def reason(self) -> str:
        """Why the job is failed once its attempts are exhausted."""
        return (f"gave up after {self.bad} attempt(s) that ended badly (--max-attempts {self.max}); last: "
                f"{self.last_bad}")


def summarize(folder: Path, record: ClaimRecord | None, gone: str | None, *,
              queue: Mapping[str, str] | None = None, own: tuple[str | None, int] | None = None,
              ask_slurm: bool = False) -> Attempts:
    """The job's attempts from its newest claim (`folder` is the job's claims folder, `gone` why the claim's holder
    is gone): that claim's counts, plus its own ending when it is over."""
    info = (record.info if record is not None else None) or {}
    counted = Attempts.from_info(info)
    if record is None or info.get("kind") != ATTEMPT or not (record.released or gone):
        return counted
    text, bad = ending(folder, record, gone, queue=queue, own=own, ask_slurm=ask_slurm)
    return replace(counted, bad=counted.bad + bad, last=text, last_bad=text if bad else counted.last_bad)


def ending(folder: Path, record: ClaimRecord, gone: str | None, *, queue: Mapping[str, str] | None = None,
           own: tuple[str | None, int] | None = None, ask_slurm: bool = False) -> tuple[str, bool]:
    """(how an attempt that is over ended, whether it counts against the limit); see the module docstring.
    `own`: the SLURM job and restart count of the process asking (a later run of the same job was requeued)."""
    outcome = (record.outcome or "done") if record.released else None
    if outcome in NOT_COUNTED:
        return NOT_COUNTED[outcome], False
    if outcome not in (None, TERMINATED):
        return f"ended by {outcome}", True
    if _requeued_by_slurm(record, queue, own):
        return REQUEUED_BY_SLURM, False
    if outcome == TERMINATED:
        return "terminated by SIGTERM (scancel, a time limit reached without warning, or kill)", True
    known = _note(folder, record) or (slurm_ending(record.slurm_job) if ask_slurm and record.slurm_job else None)
    if known is None and record.slurm_job and queue and record.slurm_job in queue:
        known = f"SLURM: {queue[record.slurm_job]}"
    return f"killed ({known or gone or 'its process died'})", True


def _requeued_by_slurm(record: ClaimRecord, queue: Mapping[str, str] | None,
                       own: tuple[str | None, int] | None) -> bool:
    """SLURM requeued the attempt's job itself (a node failure, a preemption, `scontrol requeue`): the process asking
    is a later run of that SLURM job, or squeue has it waiting to run again. SLURM ends the attempt on its way with
    SIGTERM (then SIGKILL), as scancel does; scancel leaves the job CANCELLED, a requeue PENDING."""
    if not record.slurm_job:
        return False
    if own and record.slurm_job == own[0] and record.slurm_restart < own[1]:
        return True
    return bool(queue) and queue.get(record.slurm_job) in REQUEUED_STATES


def info_for(folder: Path, kind: str, max_attempts: int | None = None, backend: str | None = None) -> InfoFor:
    """What a new claim in the job's claims folder records (`claims.try_claim(info=...)`): an attempt (`ATTEMPT`) on
    `backend`, or a claim of `batch retry` (`RESET`), which carries the counts and the backend (and why the job was
    given up, if it was) until it finds the job failed and starts the counts again (`reset_count`)."""

    def make(previous: ClaimRecord | None, gone: str | None) -> dict[str, Any]:
        before = Attempts()
        if previous is not None:
            before = summarize(folder, previous, gone, own=own_slurm_job(), ask_slurm=True)
        info = {"kind": kind, "attempt": before.count + (kind == ATTEMPT), "bad": before.bad,
                "max": max_attempts if kind == ATTEMPT else before.max, "last": before.last,
                "last_bad": before.last_bad, "backend": backend if kind == ATTEMPT else last_backend(previous)}
        if kind == RESET:
            info["gave_up"] = before.reason() if before.exhausted else None
        return info

    return make


def last_backend(record: ClaimRecord | None) -> str | None:
    """Where the job's latest attempt ran ("local" or "slurm"), from its newest claim (None: it has none). Claims
    made before the backend was recorded, and `segbook finetune`'s, say so by their SLURM job."""
    if record is None:
        return None
    return (record.info or {}).get("backend") or ("slurm" if record.slurm_job else "local")


def reset_count(claim: Claim) -> None:
    """Start the job's count of bad attempts again (a retry's claim, once it found the job failed)."""
    claim.annotate(bad=0, last_bad=None, gave_up=None)


def note_ending(claims_root: Path, job_id: str, record: ClaimRecord, text: str) -> None:
    """Record how a worker process ended (its exit status, which only its parent sees) next to its claim, for
    the attempt's description. Written by the launcher, never by the claim's holder."""
    atomic_write_text(Path(claims_root) / job_id / f"{record.token}.ending", text + "\n")


def _note(folder: Path, record: ClaimRecord) -> str | None:
    try:
        return (folder / f"{record.token}.ending").read_text().strip() or None
    except OSError:
        return None
