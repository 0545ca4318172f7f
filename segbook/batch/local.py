"""`run_local`: the pending jobs of a matrix as a queue over this machine's GPUs (or CPU workers).

`run_local(jobs, ExecutionOptions(...), LocalOptions(...))`, the shape of `submit_slurm`'s arguments: how each job
runs, then where. Each job runs in its own process, `segbook batch worker` (`segbook.batch.worker`), in its own
session, with CUDA_VISIBLE_DEVICES naming its GPU (or its `num_gpus` GPUs for nnU-Net's DDP): a crash or an
out-of-memory kill ends that job only, and the worker holds the job's claim itself, so even a launcher killed
outright leaves no job claimed by a dead process.
Ctrl-C (or SIGTERM) stops cleanly: no new job starts, the running ones get SIGINT (their manifests say
"interrupted", their claims are released) and the launcher waits for them; a second Ctrl-C kills them. Running the
same matrix again continues where it stopped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from segbook.batch.execute import ExecutionOptions
from segbook.batch.matrix import Job, summary_line, survey
from segbook.batch.worker import result_of, worker_command
from segbook.errors import SegbookError
from segbook.io import now
from segbook.options import Bound, check_all
from segbook.paths import Paths
from segbook.training.manifest import RunManifest, failure

POLL_S = 0.5
BOUNDS = {"workers": Bound("--workers", int, low=1)}


@dataclass(frozen=True)
class LocalOptions:
    """Where on this machine the jobs run: `gpus` (ids; default: every visible GPU) and `workers`, the most jobs at
    once (default: one per `num_gpus` GPUs on cuda, 1 on the CPU or mps)."""

    gpus: tuple[str, ...] | None = None
    workers: int | None = None

    def slots(self, options: ExecutionOptions) -> list[str]:
        """One CUDA_VISIBLE_DEVICES value per concurrent job ("" for CPU workers)."""
        check_all({"workers": self.workers}, BOUNDS)
        if options.device != "cuda":
            if self.gpus:
                raise SegbookError(f"--gpus is for --device cuda (got --device {options.device}); use --workers N")
            return [""] * (self.workers or 1)
        per_job = options.gpus_per_job
        visible = [str(g).strip() for g in self.gpus] if self.gpus else _visible_gpus()
        if len(visible) < per_job:
            raise SegbookError(f"{len(visible)} GPU(s) visible ({','.join(visible) or 'none'}) but --gpus-per-job is "
                               f"{per_job}: name GPUs with --gpus 0,1,... or run on the CPU with --device cpu")
        groups = [",".join(visible[i:i + per_job]) for i in range(0, len(visible) - per_job + 1, per_job)]
        return groups[:self.workers] if self.workers else groups


@dataclass
class LocalReport:
    """What a `run_local` call did, job ids by how they ended."""

    done: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    busy: list[str] = field(default_factory=list)  # another process held the claim
    stopped: list[str] = field(default_factory=list)  # interrupted or killed; they resume next time

    def summary(self) -> str:
        parts = {"done": self.done, "failed": self.failed, "held by another process": self.busy,
                 "stopped": self.stopped}
        return ", ".join(f"{len(ids)} {name}" for name, ids in parts.items() if ids) or "nothing ran"


@dataclass
class _Worker:
    job: Job
    slot: str
    process: subprocess.Popen
    log: Path
    started: float


def worker_log(paths: Paths, job: Job) -> Path:
    return paths.batch / "logs" / f"{job.id}.log"


def _visible_gpus() -> list[str]:
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        return [g for g in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def run_local(jobs: Iterable[Job], options: ExecutionOptions, local: LocalOptions = LocalOptions(), *,
              paths: Paths | None = None, say: Callable[[str], None] = print) -> LocalReport:
    """Run the matrix's pending jobs on this machine; done, running, failed and blocked jobs are left alone.

    `options.registry_files` must define every task of `jobs` that is not built in (the workers load them). Options
    out of range and recipes that do not fit their jobs are refused before anything starts. Raises
    KeyboardInterrupt after a clean stop on Ctrl-C or SIGTERM.
    """
    jobs = list(jobs)
    options.validate(jobs)
    slots = local.slots(options)
    paths = paths or Paths.from_env()
    paths.export()
    statuses = survey(jobs, paths, weights=options.pretrained_weights)
    queue = deque(s.job for s in statuses if s.state == "pending" and not s.slurm_live)
    queued = sum(s.state == "pending" and s.slurm_live for s in statuses)
    say(summary_line(statuses) + (f" ({queued} pending queued in SLURM, left to it)" if queued else "") + "; "
        + (f"running {len(queue)} on {_describe(slots)}" if queue else "nothing to run"))
    return _Launcher(options, paths, slots, say).run(queue)


def _describe(slots: list[str]) -> str:
    if slots[0] == "":
        return f"{len(slots)} CPU worker(s)"
    return ", ".join(f"GPU {slot}" for slot in slots)


class _Launcher:
    def __init__(self, options: ExecutionOptions, paths: Paths, slots: list[str], say: Callable[[str], None]):
        self.options, self.paths, self.say = options, paths, say
        self.free = list(slots)
        self.active: list[_Worker] = []
        self.report = LocalReport()
        self.interrupts = 0
        self.started = 0

    def run(self, queue: deque[Job]) -> LocalReport:
        total = len(queue)
        with self._signals():
            while (queue and not self.interrupts) or self.active:
                while queue and self.free and not self.interrupts:
                    self.started += 1
                    self._start(queue.popleft(), f"{self.started}/{total}")
                time.sleep(POLL_S)
                for worker in [w for w in self.active if w.process.poll() is not None]:
                    self._finish(worker)
        self.say(f"batch run: {self.report.summary()}"
                 + (f"; {len(queue)} not started" if queue else ""))
        if self.interrupts:
            raise KeyboardInterrupt
        return self.report

    def _start(self, job: Job, position: str) -> None:
        slot = self.free.pop(0)
        log = worker_log(self.paths, job)
        log.parent.mkdir(parents=True, exist_ok=True)
        where = f"GPU {slot}" if slot else "CPU"
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot, "PYTHONUNBUFFERED": "1"}
        if self.options.device == "mps":
            env.pop("CUDA_VISIBLE_DEVICES")
        with log.open("a") as out:
            out.write(f"\n=== {now()} segbook batch run: {job.id} on {where} ===\n")
            out.flush()
            process = subprocess.Popen(worker_command(job, self.options), stdout=out, stderr=subprocess.STDOUT, env=env,
                                       start_new_session=True)
        self.active.append(_Worker(job, slot, process, log, time.time()))
        self.say(f"[{position}] start  {job.id} on {where} (log: {log})")

    def _finish(self, worker: _Worker) -> None:
        self.active.remove(worker)
        self.free.append(worker.slot)
        code = worker.process.returncode
        minutes = (time.time() - worker.started) / 60
        job = worker.job.id
        result = result_of(code)
        if result == "done":
            self.report.done.append(job)
            self.say(f"[done]    {job} in {minutes:.1f} min")
        elif result == "failed":
            self.report.failed.append(job)
            self.say(f"[failed]  {job}: {self._error(worker)} (log: {worker.log})")
        elif result == "busy":
            self.report.busy.append(job)
            self.say(f"[skipped] {job}: another process holds it")
        else:
            self.report.stopped.append(job)
            self.say(f"[stopped] {job} after {minutes:.1f} min (exit status {code}); it resumes next time "
                     f"(log: {worker.log})")

    def _error(self, worker: _Worker) -> str:
        manifest = RunManifest.load(worker.job.folder(self.paths))
        return (failure(manifest) if manifest else None) or "see the log"

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM stop the queue; handlers only where Python allows them (the main thread)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.interrupts += 1
        if self.interrupts == 1:
            self.say(f"stopping: no new jobs; waiting for {len(self.active)} running job(s) to stop "
                     "(Ctrl-C again kills them)")
            for worker in self.active:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(worker.process.pid, signal.SIGINT)
        else:
            self.say("killing the running jobs")
            for worker in self.active:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.process.pid, signal.SIGKILL)
