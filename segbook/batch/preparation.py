"""Preparation: planning, preprocessing and cross-validation splits of the tasks of a matrix, as a stage of its own
that runs on CPUs before any GPU job starts.

`segbook batch prepare` runs it here or as a CPU job array on SLURM; `batch run` runs it in the launcher, on this
machine's CPU, before it starts the first worker; `batch submit` submits it as a CPU array for the tasks that need
it and makes the GPU arrays wait for that array. A GPU job never plans: it stops at once, naming the command, when
its task is not prepared (`unprepared`), without touching its run.

Preparing a task, under the dataset's claim (which import and `segbook plan` take too), is the batch's body's
(`segbook.batch.jobs.JobBody.prepare`; a rehearsal plans nothing). For real (`plan_and_split`): `segbook.plan.plan_task`
with each planner the jobs' backbones train on (`planners_of`, asking each job's backbone; nothing to do when the
plans are current; otherwise staged and swapped in), then nnU-Net's 5-fold `splits_final.json`, written once,
atomically, with nnU-Net's own split function (nnU-Net's trainer would otherwise write it on first use, with a plain
write that concurrent folds race on). Each preparation is recorded per task in
`$SEGBOOK_HOME/batch/prepare/<task>.json` (status, what it did or its error, time, host, SLURM job, and the history
of earlier preparations); a failed one blocks the task's jobs, with its error, until `batch prepare` succeeds.
"""

from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from segbook import backbones
from segbook.batch.jobs import Job, JobBody
from segbook.data.folders import dataset_claim, is_imported, preprocessed_folder
from segbook.io import atomic_write_json, now
from segbook.paths import Paths
from segbook.squeue import own_slurm_job

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

HISTORY_KEPT = 20
DEFAULT_PLANNERS = ("default",)


@dataclass(frozen=True)
class Prepared:
    """How preparing one task ended: prepared, failed (recorded), or skipped (not imported)."""

    task: str
    status: str
    detail: str
    seconds: float = 0.0


def records_folder(paths: Paths) -> Path:
    return paths.batch / "prepare"


def read_records(paths: Paths) -> dict[str, dict[str, Any]]:
    """Every task's preparation record, by task key."""
    records = {}
    for path in sorted(records_folder(paths).glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("task"):
            records[record["task"]] = record
    return records


def blocking_failure(record: dict[str, Any] | None) -> str | None:
    """Why a task's jobs cannot start: its last preparation failed (None otherwise)."""
    if not record or record.get("status") != "failed":
        return None
    return (f"preparation failed: {record.get('detail')}; fix it, then run `segbook batch prepare --tasks "
            f"{record['task']}`")


def prepare_command(entry: "DatasetEntry") -> str:
    return f"`segbook batch prepare --tasks {entry.key}` (with the --registry it was selected with)"


def planners_of(jobs: Iterable[Job]) -> tuple[str, ...]:
    """The planners the jobs' backbones train on (`segbook.backbones.PLANNERS` keys), nnU-Net's default first."""
    found = {_planner_of(job) for job in jobs}
    return tuple(sorted(found, key=lambda planner: (planner != "default", planner)))


def models_of(jobs: Iterable[Job]) -> tuple[str, ...]:
    """The jobs' models, each once: what a preparation elsewhere registers the checkpoint planners of again
    (`segbook.batch.slurm.PrepareTask`)."""
    return tuple(dict.fromkeys(job.spec.model for job in jobs))


def _planner_of(job: Job) -> str:
    """The job's planner: its backbone's own, or the checkpoint planner registered for its plans identifier
    (`segbook.batch.matrix.on_plans`, `--plans checkpoint`)."""
    own = backbones.planner_for(job.spec.model)
    if backbones.PLANNERS[own].plans == job.spec.plans:
        return own
    return next((name for name, planner in backbones.PLANNERS.items() if planner.plans == job.spec.plans), own)


def unprepared(entry: "DatasetEntry", paths: Paths, folds: Iterable[str],
               planners: Sequence[str] = DEFAULT_PLANNERS) -> str | None:
    """Why the task is not ready for training jobs of `folds` on `planners`' plans (None when it is): not planned,
    planned from raw data that changed since, or no cross-validation splits for folds 0-4 (a task with fewer
    cases than folds never has them). The message names the command."""
    from segbook.plan import plan_states

    states = plan_states(entry, paths)
    for planner in planners:
        state = states.get(planner)
        if state != "preprocessed":
            why = "its raw data changed since it was planned" if state == "stale" else "it is not planned"
            which = "" if planner == "default" else f" with the {planner} planner"
            return f"{entry.key} is not prepared ({why}{which}); run {prepare_command(entry)}"
    if any(fold != "all" for fold in folds):
        from segbook.training.trainer_parts.data import CROSSVAL_FOLDS, SPLITS

        if not (preprocessed_folder(entry, paths) / SPLITS).is_file():
            return (f"{entry.key} has no cross-validation splits ({SPLITS}); run {prepare_command(entry)} (a task "
                    f"with fewer than {CROSSVAL_FOLDS} training cases has none: train fold all)")
    return None


def tasks_to_prepare(jobs: Iterable[Job], paths: Paths, body: JobBody) -> list["DatasetEntry"]:
    """The tasks of `jobs` that training jobs among them need prepared and that are not, as `body` sees it (a job
    that only has its evaluation left needs no preparation), in the jobs' order."""
    from segbook.training.manifest import RunManifest

    folds: dict[str, tuple["DatasetEntry", set[str], list[Job]]] = {}
    for job in jobs:
        manifest = RunManifest.load(job.folder(paths), history=False)
        if manifest is None or manifest.status != "finished":
            entry, needed, training = folds.setdefault(job.entry.key, (job.entry, set(), []))
            needed.add(job.spec.fold)
            training.append(job)
    return [entry for entry, needed, training in folds.values()
            if body.unprepared(entry, paths, needed, planners_of(training))]


def prepare_tasks(entries: Sequence["DatasetEntry"], paths: Paths | None = None, *, body: JobBody,
                  processes: int | None = None, planners: Sequence[str] = DEFAULT_PLANNERS,
                  say: Callable[[str], None] = print) -> list[Prepared]:
    """Prepare each task here, one after the other (nnU-Net's preprocessing uses `processes` for each)."""
    paths = paths or Paths.from_env()
    outcomes = []
    for position, entry in enumerate(entries, 1):
        outcome = prepare_task(entry, paths, processes=processes, body=body, planners=planners, say=say)
        say(f"[{position}/{len(entries)}] {entry.key}: {outcome.status}: {outcome.detail} "
            f"({outcome.seconds:.1f} s)")
        outcomes.append(outcome)
    return outcomes


def prepare_task(entry: "DatasetEntry", paths: Paths | None = None, *, body: JobBody,
                 processes: int | None = None, planners: Sequence[str] = DEFAULT_PLANNERS,
                 say: Callable[[str], None] = print) -> Prepared:
    """Prepare one task as `body` does (the module docstring says how for real) and record how it went; a failure
    is recorded and returned, never raised. A task that is not imported is skipped (its jobs are blocked on their
    data anyway)."""
    paths = paths or Paths.from_env()
    if not is_imported(entry, paths):
        return Prepared(entry.key, "skipped", "not imported")
    started = time.perf_counter()
    try:
        with dataset_claim(entry, paths, wait=True, say=say):
            detail = body.prepare(entry, paths, processes, planners, say)
            outcome = Prepared(entry.key, "prepared", detail, time.perf_counter() - started)
            _record(paths, outcome)
        return outcome
    except Exception as error:  # noqa: BLE001 - one task's failure is recorded and blocks its own jobs only
        outcome = Prepared(entry.key, "failed", f"{type(error).__name__}: {error}", time.perf_counter() - started)
        _record(paths, outcome)
        return outcome


def preparation_refused(entry: "DatasetEntry", paths: Paths, why: str) -> Prepared:
    """Record that the task could not be prepared here, for `why` (planned nothing); its jobs are blocked with it."""
    outcome = Prepared(entry.key, "failed", why)
    _record(paths, outcome)
    return outcome


def plan_and_split(entry: "DatasetEntry", paths: Paths, processes: int | None, planners: Sequence[str],
                   say: Callable[[str], None]) -> str:
    """The real preparation of a task: its plans with each planner, then nnU-Net's cross-validation splits."""
    from segbook.plan import plan_task
    from segbook.training.trainer_parts.data import TooFewCasesForFolds, write_crossval_splits

    done, wrote, no_splits = [], False, ""
    for planner in planners:
        plan = plan_task(entry, paths, num_processes=processes, planner=planner, wait=True,
                         log=lambda line: say(f"  {line}"))
        try:
            wrote = write_crossval_splits(preprocessed_folder(entry, paths), plan.data_folder) or wrote
        except TooFewCasesForFolds as few:
            no_splits = f"; no cross-validation splits ({few})"
        which = "" if planner == "default" else f" ({planner})"
        done.append(f"plans up to date{which}" if plan.skipped else
                    f"planned and preprocessed{which} in {plan.seconds:.0f} s")
    return "; ".join(done) + ("; cross-validation splits written" if wrote else "") + no_splits


def _record(paths: Paths, outcome: Prepared) -> None:
    """The task's record: this preparation, and the earlier ones (the latest `HISTORY_KEPT`)."""
    path = records_folder(paths) / f"{outcome.task}.json"
    try:
        history = json.loads(path.read_text()).get("history", [])
    except (OSError, ValueError, AttributeError):
        history = []
    slurm_job, _ = own_slurm_job()
    entry = {"status": outcome.status, "detail": outcome.detail, "at": now(), "host": socket.gethostname(),
             "slurm_job": slurm_job, "seconds": round(outcome.seconds, 3)}
    atomic_write_json(path, {"task": outcome.task, **entry, "history": (history + [entry])[-HISTORY_KEPT:]})
