"""`run_local`: the pending jobs of a matrix as a queue over this machine's GPUs (or CPU workers).

`run_local(jobs, ExecutionOptions(...), LocalOptions(...))`, the shape of `submit_slurm`'s arguments: how each job
runs, then where. Each job runs in its own process, `segbook batch worker` (`segbook.batch.worker`), in its own
session, with CUDA_VISIBLE_DEVICES naming its GPU (or its `num_gpus` GPUs for nnU-Net's DDP): a crash or an
out-of-memory kill ends that job only. The worker holds the job's claim itself and ends with the launcher: a
launcher killed outright takes its workers along (they stop as on its Ctrl-C, `segbook.processes`), leaving no job
claimed by a dead process nor training without one.
Before the first worker starts, the launcher checks the checkpoints pretrained jobs start from
(`segbook.batch.weights`) and prepares, here on the CPU, the tasks whose jobs will train (`segbook.batch.preparation`);
the jobs of a task whose preparation failed are not started. Workers never plan.
Ctrl-C (or SIGTERM) stops cleanly: no new job starts, the running ones get SIGINT (they save a checkpoint at the
next iteration, their manifests say "interrupted", their claims are released) and the launcher waits for them; a
second Ctrl-C kills them. Running the same matrix again continues where it stopped. A worker that dies otherwise
(killed by the out-of-memory killer, kill -9, SIGTERM) is reported as killed, its exit status kept next to its claim
for the attempt's count and `batch status` (`segbook.batch.attempts`) and recorded in run.json (which a killed
worker leaves "running"): "interrupted" with the attempt's ending, or "failed" once --max-attempts attempts ended
badly. The launcher then exits non-zero.
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

from segbook import claims
from segbook.batch.attempts import note_ending, summarize
from segbook.batch.execute import AttemptsExhausted, ExecutionOptions, record_given_up
from segbook.batch.jobs import Job
from segbook.batch.matrix import summary_line, survey
from segbook.batch.preparation import planners_of, prepare_tasks, tasks_to_prepare
from segbook.batch.weights import check_weights
from segbook.batch.worker import EXIT_TERMINATED, result_of, worker_command
from segbook.errors import SegbookError
from segbook.io import now
from segbook.options import Bound, check_all
from segbook.paths import Paths
from segbook.training.manifest import RunManifest, failure, record_failure

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
    stopped: list[str] = field(default_factory=list)  # interrupted by the launcher; they resume next time
    killed: list[str] = field(default_factory=list)  # died otherwise (a signal, a crash); counted as attempts
    unprepared: list[str] = field(default_factory=list)  # their task was not prepared
    not_prepared_tasks: list[str] = field(default_factory=list)  # preparation failed: their jobs did not start

    def summary(self) -> str:
        parts = {"done": self.done, "failed": self.failed, "held by another process": self.busy,
                 "stopped": self.stopped, "killed": self.killed, "not prepared": self.unprepared}
        return ", ".join(f"{len(ids)} {name}" for name, ids in parts.items() if ids) or "nothing ran"

    @property
    def ok(self) -> bool:
        """No job failed, was killed or found its task unprepared, and every preparation succeeded."""
        return not (self.failed or self.killed or self.unprepared or self.not_prepared_tasks)


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
    record_given_up(statuses, paths)
    todo = [s.job for s in statuses if s.state == "pending" and not s.slurm_live]
    check_weights(todo, options.weights_for, paths, say)
    queued = sum(s.state == "pending" and s.slurm_live for s in statuses)
    say(summary_line(statuses) + (f" ({queued} pending queued in SLURM, left to it)" if queued else ""))
    failed = _prepare_first(todo, options, paths, say)
    queue = deque(job for job in todo if job.entry.key not in failed)
    say(f"running {len(queue)} on {_describe(slots)}" if queue else "nothing to run")
    report = _Launcher(options, paths, slots, say).run(queue)
    report.not_prepared_tasks = sorted(failed)
    return report


def _prepare_first(jobs: list[Job], options: ExecutionOptions, paths: Paths, say: Callable[[str], None]) -> set[str]:
    """Prepare here, on the CPU, the tasks the jobs need prepared; the tasks whose preparation failed."""
    tasks = tasks_to_prepare(jobs, paths, options.body)
    if not tasks:
        return set()
    say(f"preparing {len(tasks)} task(s) on this machine's CPU before any job starts")
    outcomes = prepare_tasks(tasks, paths, processes=options.processes, body=options.body,
                             planners=planners_of(jobs), say=say)
    failed = {o.task for o in outcomes if o.status != "prepared"}
    if failed:
        say(f"not starting the jobs of {', '.join(sorted(failed))}: preparation failed (`segbook batch status` "
            "says why)")
    return failed


def _record_ending(worker: _Worker, paths: Paths, text: str) -> None:
    """Record how a worker that did not end on its own terms ended, unless another process holds its job by now.

    A worker killed outright could not release its claim: what is left of its process group is killed (a DDP rank
    must not write on), and `text` is kept next to the claim (`note_ending`). Either way run.json says how the
    attempt ended (it would still say "running" after kill -9), and "failed" with the reason once the job's
    attempts are spent (a SIGTERM'd worker recorded "interrupted" itself)."""
    folder = paths.claims / worker.job.id
    _, record, _ = claims.latest(folder)
    if record is None or record.pid != worker.process.pid:
        return
    if not record.released:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.process.pid, signal.SIGKILL)
        note_ending(paths.claims, worker.job.id, record, text)
    attempts = summarize(folder, record, None if record.released else text)
    run = worker.job.folder(paths)
    if attempts.exhausted:
        record_failure(run, AttemptsExhausted(attempts.reason()), "attempts")
        return
    manifest = RunManifest.load(run, history=False)
    if manifest is not None and manifest.status in ("created", "running"):
        manifest.data["status"] = "interrupted"
        manifest.event("attempt_ended", attempt=attempts.count, ending=attempts.last)
        manifest.save()


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
        elif result == "unprepared":
            self.report.unprepared.append(job)
            self.say(f"[skipped] {job}: its task is not prepared (log: {worker.log})")
        elif self.interrupts:
            self.report.stopped.append(job)
            self.say(f"[stopped] {job} after {minutes:.1f} min (exit status {code}); it resumes next time "
                     f"(log: {worker.log})")
        else:
            self.report.killed.append(job)
            self.say(f"[killed]  {job} after {minutes:.1f} min: {self._ending(worker)} (log: {worker.log})")

    def _ending(self, worker: _Worker) -> str:
        """How the worker died, recorded where the next attempt and `batch status` look (`_record_ending`)."""
        code = worker.process.returncode
        if code == EXIT_TERMINATED:
            text = "the worker was terminated by SIGTERM"
        elif code < 0:
            text = f"the worker got {signal.Signals(-code).name}"
            if code == -signal.SIGKILL:
                text += ", from the out-of-memory killer or kill -9"
        else:
            text = f"the worker exited with status {code}"
        _record_ending(worker, self.paths, text)
        return text

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
