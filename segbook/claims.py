"""Claims: at most one process works on a thing at a time, across launchers, hosts and SLURM requeues.

A thing is a job (a run: `segbook finetune` and `segbook batch` claim the same name) or a dataset's folders
(import and planning). Its claims are numbered generations in `$SEGBOOK_HOME/batch/claims/<name>/`:
`00000000.json`, `00000001.json`, ... The highest generation is the current claim; it is *held* unless it was
released or its holder is gone.

- Claiming creates the next generation with O_CREAT|O_EXCL: of any number of racers exactly one creates it, and the
  others see its claim and back off.
- Taking over a claim whose holder is gone is the same step (create the generation after it), so it is atomic too;
  no file is ever deleted or rewritten except by the process that created it, so there is no moment at which two
  processes both believe they hold the job.
- The holder refreshes its heartbeat (a thread rewrites its own file) and marks the file released when it stops.

A holder is gone when (first rule that applies):
1. it runs on this host: its pid has exited (or was reused: the process start time differs);
2. it is an earlier run of this very SLURM job (SLURM restarts a requeued job only after the previous run ended);
3. it runs in a SLURM job that squeue no longer lists as pending or running;
4. nothing better is known (another host, no SLURM answer): its heartbeat is older than the timeout.

A live holder is never taken over. A holder that finds a newer generation than its own (it was judged gone, e.g.
its heartbeat stalled past the timeout on a hung file system) stops its job (`lost_any()` tells its code not to
write anything more on the way out).

A claimer may store facts of its own in its record (`info`), computed from the previous generation and why its
holder was judged gone: `segbook.batch.attempts` keeps a job's attempt counts there, so the newest claim alone says
how often the job was started and how its attempts ended.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import re
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from segbook.errors import SegbookError
from segbook.io import atomic_write_json, now
from segbook.squeue import LIVE_STATES, array_of, own_slurm_job, squeue_states

HEARTBEAT_INTERVAL_S = 30.0
#: Generous: a holder on another host, outside SLURM, is judged by its heartbeat alone.
HEARTBEAT_TIMEOUT_S = 600.0
_GENERATION = re.compile(r"^(\d{8})\.json$")
#: Claims this process holds, by folder: a nested request for one of them (`segbook batch` holds a job's claim
#: and calls `finetune`, which claims the same run) is granted without a second generation.
_HELD: dict[Path, "Claim"] = {}
#: Claims this process holds that another process has taken over since.
_LOST: set[Path] = set()
#: What a claimer stores in its record, from the previous generation's record and why its holder is gone (None:
#: released, or no previous generation).
InfoFor = Callable[["ClaimRecord | None", "str | None"], dict[str, Any]]


class ClaimBusy(SegbookError):
    """Another live process holds the claim; the message names it (host, pid, SLURM job)."""

    def __init__(self, what: str, holder: "ClaimRecord"):
        super().__init__(f"{what} is in use: {holder.describe()}. Wait for it to finish, or stop that process; "
                         "a claim whose process has died is taken over automatically")
        self.holder = holder


@dataclass(frozen=True)
class ClaimRecord:
    job: str
    token: str
    host: str
    pid: int
    pid_start: int | None
    slurm_job: str | None
    slurm_restart: int
    created_at: str
    heartbeat: float
    released: bool = False
    outcome: str | None = None
    info: dict[str, Any] | None = None

    def describe(self) -> str:
        where = f"{self.host} pid {self.pid}" + (f", SLURM job {self.slurm_job}" if self.slurm_job else "")
        return f"claimed by {where} since {self.created_at}"


def _pid_start(pid: int) -> int | None:
    """The process's start time (clock ticks after boot) on Linux, to tell a reused pid from the holder."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _pid_alive(pid: int, start: int | None) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0] != "Z" and (start is None or int(fields[19]) == start)  # a zombie has exited


def _new_record(job_id: str, info: dict[str, Any] | None = None) -> ClaimRecord:
    slurm_job, restart = own_slurm_job()
    return ClaimRecord(job=job_id, token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                       pid_start=_pid_start(os.getpid()), slurm_job=slurm_job, slurm_restart=restart,
                       created_at=now(), heartbeat=time.time(), info=info)


def _generations(folder: Path) -> list[int]:
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    return sorted(int(m[1]) for m in map(_GENERATION.match, names) if m)


def _path(folder: Path, generation: int) -> Path:
    return folder / f"{generation:08d}.json"


def _read(path: Path) -> ClaimRecord | None:
    """The record, or None while its creator is still writing it (O_EXCL creates it empty first)."""
    try:
        return ClaimRecord(**json.loads(path.read_text()))
    except (ValueError, TypeError):
        return None


def latest(folder: Path) -> tuple[int, ClaimRecord | None, Path | None]:
    """(generation, record, path) of the job's newest claim; (-1, None, None) when it never had one."""
    generations = _generations(folder)
    if not generations:
        return -1, None, None
    path = _path(folder, generations[-1])
    return generations[-1], _read(path), path


def gone_reason(record: ClaimRecord, queue: Mapping[str, str] | None, *,
                timeout_s: float = HEARTBEAT_TIMEOUT_S) -> str | None:
    """Why the holder of an unreleased claim is gone, or None while it may still be working (module docstring)."""
    if record.host == socket.gethostname():
        return None if _pid_alive(record.pid, record.pid_start) else f"process {record.pid} has exited"
    own_job, own_restart = own_slurm_job()
    if record.slurm_job and record.slurm_job == own_job and record.slurm_restart < own_restart:
        return f"an earlier run of SLURM job {own_job} (requeued since)"
    if record.slurm_job and queue is not None:
        state = queue.get(record.slurm_job)
        if state not in LIVE_STATES:
            return f"SLURM job {record.slurm_job} is {state or 'no longer in squeue'}"
        return None
    age = time.time() - record.heartbeat
    return f"no heartbeat for {age:.0f} s" if age > timeout_s else None


def _queue_for(record: ClaimRecord | None) -> Mapping[str, str] | None:
    if record is None or not record.slurm_job or record.host == socket.gethostname():
        return None
    return squeue_states([array_of(record.slurm_job)])


def holder(folder: Path, queue: Mapping[str, str] | None = None, *, ask_slurm: bool = True,
           timeout_s: float = HEARTBEAT_TIMEOUT_S) -> ClaimRecord | None:
    """The live holder of a job's claim, or None when the job is free (never claimed, released or holder gone).

    `queue`: squeue states already fetched (for many jobs at once); else squeue is asked when it matters.
    """
    return judge(folder, queue, ask_slurm=ask_slurm, timeout_s=timeout_s)[1]


def judge(folder: Path, queue: Mapping[str, str] | None = None, *, ask_slurm: bool = True,
          timeout_s: float = HEARTBEAT_TIMEOUT_S) -> tuple[ClaimRecord | None, ClaimRecord | None, str | None]:
    """(newest record, its live holder or None, why that holder is gone): the reason is None when the newest
    claim was released, is held, or there is none."""
    return _judge(folder, queue, ask_slurm, timeout_s)[1:]


def _judge(folder: Path, queue: Mapping[str, str] | None, ask_slurm: bool,
           timeout_s: float) -> tuple[int, ClaimRecord | None, ClaimRecord | None, str | None]:
    generation, record, path = latest(folder)
    return (generation, *judge_latest(record, path, queue, ask_slurm=ask_slurm, timeout_s=timeout_s))


def judge_latest(record: ClaimRecord | None, path: Path | None, queue: Mapping[str, str] | None = None, *,
                 ask_slurm: bool = True, timeout_s: float = HEARTBEAT_TIMEOUT_S
                 ) -> tuple[ClaimRecord | None, ClaimRecord | None, str | None]:
    """`judge` for a newest claim already read (`latest`): for surveys that read it once for many purposes."""
    if path is None:
        return None, None, None
    if record is None:  # being written right now, or its writer died in the act
        if time.time() - path.stat().st_mtime > timeout_s:
            return None, None, "its claim file was never completed"
        return None, _placeholder(path), None
    if record.released:
        return record, None, None
    if queue is None and ask_slurm:
        queue = _queue_for(record)
    reason = gone_reason(record, queue, timeout_s=timeout_s)
    return record, (None if reason else record), reason


def _placeholder(path: Path) -> ClaimRecord:
    return ClaimRecord(job=path.parent.name, token="", host="(being written)", pid=0, pid_start=None,
                       slurm_job=None, slurm_restart=0, created_at=now(), heartbeat=path.stat().st_mtime)


class Claim:
    """A claim this process holds: refresh it while working, release it when done."""

    def __init__(self, path: Path, record: ClaimRecord):
        self.path = path
        self.record = record
        self.outcome = "done"  # what `held` records on release; the block may set it

    @property
    def generation(self) -> int:
        return int(self.path.stem)

    def lost(self) -> bool:
        """True when a newer generation exists: another process judged this holder gone and took the job."""
        generations = _generations(self.path.parent)
        return bool(generations) and generations[-1] > self.generation

    def beat(self) -> bool:
        """Refresh the heartbeat; False (and nothing written) when the claim was lost."""
        if self.lost():
            return False
        self.record = replace(self.record, heartbeat=time.time())
        atomic_write_json(self.path, asdict(self.record))
        return True

    def annotate(self, **info: Any) -> None:
        """Change what this claim records in `info` (its creator alone writes its file)."""
        self.record = replace(self.record, info={**(self.record.info or {}), **info})
        atomic_write_json(self.path, asdict(self.record))

    def release(self, outcome: str) -> None:
        """Mark the claim released, recording how the work ended; the job is free for the next claimer."""
        self.record = replace(self.record, released=True, outcome=outcome, heartbeat=time.time())
        atomic_write_json(self.path, asdict(self.record))

    @contextlib.contextmanager
    def held(self, interval_s: float = HEARTBEAT_INTERVAL_S,
             on_lost: Callable[[], None] = _thread.interrupt_main) -> Iterator["Claim"]:
        """Heartbeat in a thread while the block runs; release on the way out (`outcome`, or the exception)."""
        stop = threading.Event()
        thread = threading.Thread(target=self._heartbeat, args=(stop, interval_s, on_lost), daemon=True,
                                  name=f"claim heartbeat {self.record.job}")
        thread.start()
        _HELD[self.path.parent] = self
        try:
            yield self
        except BaseException as error:
            self.outcome = type(error).__name__
            raise
        finally:
            _HELD.pop(self.path.parent, None)
            stop.set()
            thread.join()
            _LOST.discard(self.path.parent)
            if not self.lost():
                self.release(self.outcome)

    def _heartbeat(self, stop: threading.Event, interval_s: float, on_lost: Callable[[], None]) -> None:
        while not stop.wait(interval_s):
            if not self.beat():
                _LOST.add(self.path.parent)
                print(f"segbook: the claim on {self.record.job} was taken over by another process; stopping "
                      "this run", flush=True)
                on_lost()
                return


def try_claim(root: Path, job_id: str, *, timeout_s: float = HEARTBEAT_TIMEOUT_S,
              info: InfoFor | None = None) -> Claim | ClaimRecord:
    """Claim a job: a `Claim` when this process now holds it, else the live holder's record. `info` makes the
    record's `info` from the previous generation (module docstring)."""
    folder = Path(root) / job_id
    folder.mkdir(parents=True, exist_ok=True)
    while True:
        generation, previous, current, reason = _judge(folder, None, True, timeout_s)
        if current is not None:
            return current
        record = _new_record(job_id, info(previous, reason) if info else None)
        path = _path(folder, generation + 1)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue  # another process claimed it first: look at its claim
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(record)))
            f.flush()
            os.fsync(f.fileno())
        return Claim(path, record)


def lost_any() -> bool:
    """Whether another process has taken over a claim this process still holds: its work must stop without
    writing anything more."""
    return bool(_LOST)


@contextlib.contextmanager
def exclusive(root: Path, name: str, what: str, *, wait: bool = False, poll_s: float = 5.0,
              say: Callable[[str], None] | None = None) -> Iterator[Claim]:
    """Hold the claim `name` for the block: `ClaimBusy` when a live process holds it (or, with `wait`, wait for it).

    Re-entrant within a process: a block inside another block of the same claim holds it already.
    """
    folder = Path(root) / name
    if folder in _HELD:
        yield _HELD[folder]
        return
    claim = try_claim(root, name)
    if not isinstance(claim, Claim) and wait:
        (say or print)(f"waiting for {what} ({claim.describe()})")
        while not isinstance(claim, Claim):
            time.sleep(poll_s)
            claim = try_claim(root, name)
    if not isinstance(claim, Claim):
        raise ClaimBusy(what, claim)
    with claim.held():
        yield claim


def claim_records(root: Path, job_id: str) -> list[dict[str, Any]]:
    """Every claim a job has had, oldest first (the history of who worked on it and how it ended)."""
    folder = Path(root) / job_id
    return [asdict(r) for g in _generations(folder) if (r := _read(_path(folder, g))) is not None]
