"""Rehearse a benchmark matrix on a SLURM cluster: submit it whole with no-op job bodies, wait, and check the result.

Issue 14's proof at full size. The jobs go through the real submission code (`segbook.batch.slurm.submit_slurm`:
preparation array, arrays split to --max-array-size and interleaved by task, afterany dependencies, claims,
attempts, manifests, states); only training and preprocessing are no-ops (`ExecutionOptions(body=REHEARSAL)`,
`segbook.batch.rehearsal`), so a task needs nothing but its `dataset.json`, which this script writes for every task
of the selection (from the built-in registry) in a work folder of its own. Pretrained jobs are given a placeholder
checkpoint file: a rehearsal reads no weights (`submit_slurm` checks checkpoints only for jobs that train).

Then it waits for every job to end and checks that:

- every job is `done` (`segbook batch status`'s states) and ran exactly once: one claim, released "done", and one
  SLURM task result saying it rehearsed the job;
- preparation ran once per task: one record with one entry in its history, one claim of the dataset, and each task
  once in the preparation array;
- no job waited on preparation: every job's claim was taken after the last task was prepared, no dataset claim was
  waited for, and no job touched a dataset claim;
- the arrays fit: each at most --max-array-size jobs, each waiting (afterany) for the preparation array, and none
  holding the jobs of a single task when the matrix has several;
- a second submission submits nothing.

    python scripts/rehearse_matrix.py --tasks all --models base,large,huge,nnunet --folds 0,1,2,3,4 \\
        --max-array-size 100                     # the full study: 3,045 jobs (87 tasks x 7 runs x 5 folds)
    python scripts/rehearse_matrix.py --task-count 4 --models base,nnunet --folds 0,1 --max-array-size 7

Prints progress and figures (submission time, wall time, jobs per minute, the time of one `batch status`), and with
--json a summary object as the last line. Exit status 0 when every check passed, 1 otherwise. On a timeout or
Ctrl-C the submitted arrays are cancelled, so nothing is left in the queue. Stopped with SIGTERM instead, the script
leaves them running; the same command with `--attach` (and the same --workdir) then waits for them and checks. Run
it from the repository root, with the SLURM commands on PATH and segbook installed (the array tasks run
`sys.executable`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from segbook.batch.execute import ExecutionOptions
from segbook.batch.jobs import Job
from segbook.batch.matrix import build_matrix, counts, survey
from segbook.batch.preparation import read_records
from segbook.batch.rehearsal import REHEARSAL
from segbook.batch.slurm import SUBMITTING, PrepareSlurmOptions, SlurmOptions, submit_slurm
from segbook.batch.submissions import PREPARE_RECORD, SUBMISSION_RECORD, submissions_folder
from segbook.claims import claim_records, latest
from segbook.data.folders import raw_folder
from segbook.data.importer import dataset_json
from segbook.io import atomic_write_json
from segbook.paths import Paths
from segbook.registry import DatasetEntry, load_registry
from segbook.squeue import squeue_states

#: What a job's SLURM task returns when it rehearsed the job, not when it found it done already.
REHEARSED = REHEARSAL.done
POLL_S = 5.0


@dataclass
class Rehearsal:
    """What one rehearsal submitted and measured, and the problems its checks found."""

    jobs: int = 0
    tasks: int = 0
    arrays: list[str] = field(default_factory=list)
    figures: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"jobs": self.jobs, "tasks": self.tasks, "arrays": len(self.arrays), "figures": self.figures,
                "problems": self.problems, "ok": not self.problems}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="all", help="'all' or comma-separated tasks, as `segbook batch`")
    parser.add_argument("--task-count", type=int, default=None, help="only the first N tasks of the selection")
    parser.add_argument("--models", default="base,large,huge,nnunet")
    parser.add_argument("--init", default="pretrained,scratch")
    parser.add_argument("--folds", default="0,1,2,3,4")
    parser.add_argument("--max-array-size", type=int, default=100)
    parser.add_argument("--array-parallelism", type=int, default=None)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--nice", type=int, default=None,
                        help="sbatch --nice for every task: on a shared cluster, let other people's jobs go first")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the rehearsal's SEGBOOK_HOME and nnU-Net folders go (default: a new temporary "
                             "folder, kept)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="give up (and cancel) after this long")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on the last line")
    parser.add_argument("--attach", action="store_true",
                        help="submit nothing: wait for and check the rehearsal already submitted in --workdir (one "
                             "whose script was stopped, leaving its arrays to run)")
    return parser.parse_args(argv)


def select_jobs(args: argparse.Namespace) -> list[Job]:
    """The matrix of the selection, from the built-in registry; --task-count keeps its first tasks."""
    jobs = build_matrix(load_registry(), args.tasks, models=args.models, inits=args.init, folds=args.folds)
    if args.task_count is not None:
        keep = set(list(dict.fromkeys(job.entry.key for job in jobs))[:args.task_count])
        jobs = [job for job in jobs if job.entry.key in keep]
    return jobs


def use_workdir(workdir: Path | None) -> Paths:
    """A SEGBOOK_HOME and nnU-Net folders of the rehearsal's own, exported for the array tasks to inherit."""
    root = (workdir or Path(tempfile.mkdtemp(prefix="segbook-rehearsal-"))).resolve()
    os.environ["SEGBOOK_HOME"] = str(root / "home")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[variable] = str(root / variable)
    os.environ.pop("SEGBOOK_REGISTRY", None)  # the built-in registry, as the selection used
    paths = Paths.from_env()
    paths.export()
    return paths


def write_datasets(entries: list[DatasetEntry], paths: Paths) -> None:
    """Each task "imported" with its dataset.json alone: what a rehearsal needs of its data."""
    for entry in entries:
        atomic_write_json(raw_folder(entry, paths) / "dataset.json",
                          dataset_json(entry, entry.train_cases, entry.test_cases))


def submit(jobs: list[Job], args: argparse.Namespace, paths: Paths,
           say: Callable[[str], None]) -> tuple[ExecutionOptions, SlurmOptions]:
    """The matrix through `submit_slurm`, as no-op bodies on one CPU each (preparation too); with --attach,
    nothing: the options only."""
    placeholder = paths.home / "rehearsal-weights.model"
    placeholder.parent.mkdir(parents=True, exist_ok=True)
    placeholder.write_text("a rehearsal reads no weights\n")
    options = ExecutionOptions.create(weights=placeholder, device="cpu", body=REHEARSAL)
    extra = (f"nice={args.nice}",) if args.nice is not None else ()
    slurm = SlurmOptions(partition=args.partition, time="10", cpus_per_job=1, mem="200M", extra_sbatch=extra,
                         max_array_size=args.max_array_size, array_parallelism=args.array_parallelism,
                         prepare=PrepareSlurmOptions(partition=args.partition, time="10", cpus=1, mem="200M",
                                                     extra_sbatch=extra))
    if not args.attach:
        submit_slurm(jobs, options, slurm, paths=paths, say=say)
    return options, slurm


def submitted_at(arrays: list[dict[str, Any]]) -> float:
    """When the first array was submitted (seconds since the epoch), from its record."""
    return min(datetime.strptime(a["created_at"], "%Y-%m-%dT%H:%M:%S%z").timestamp() for a in arrays)


def submitted_arrays(paths: Paths) -> list[dict[str, Any]]:
    """The records of every array submitted (preparation first), in submission order."""
    folder = submissions_folder(paths)
    records = [json.loads(p.read_text()) | {"record": p.name} for p in folder.glob(f"*/{PREPARE_RECORD}")]
    records += [json.loads(p.read_text()) | {"record": p.name}
                for p in sorted(folder.glob(f"*/{SUBMISSION_RECORD}"))]
    return records


def wait_until_over(jobs: list[Job], paths: Paths, weights: dict[str, str], arrays: list[str], timeout_s: float,
                    say: Callable[[str], None]) -> dict[str, int]:
    """Poll `batch status` until every job is done, one failed or is blocked, or no array task is left to run;
    returns the last counts per state."""
    deadline = time.monotonic() + timeout_s
    while True:
        tally = counts(survey(jobs, paths, weights=weights))
        live = _live_tasks(arrays)
        say(f"  {time.strftime('%H:%M:%S')} " + ", ".join(f"{n} {s}" for s, n in tally.items() if n)
            + f"; {live} array task(s) queued or running")
        if tally["done"] == len(jobs) or tally["failed"] or tally["blocked"] or live == 0:
            return tally
        if time.monotonic() > deadline:
            raise TimeoutError(f"not over after {timeout_s:.0f} s")
        time.sleep(POLL_S)


def _live_tasks(arrays: list[str]) -> int:
    states = squeue_states(arrays) or {}
    return sum(state in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED") for state in
               states.values())


def cancel(arrays: list[str]) -> None:
    if arrays:
        subprocess.run(["scancel", *arrays], capture_output=True, timeout=60)


# --- checks: each returns the problems it found ---------------------------------------------------------------------

def check_done(jobs: list[Job], paths: Paths, weights: dict[str, str]) -> list[str]:
    """Every job is done by `batch status`."""
    statuses = survey(jobs, paths, weights=weights)
    return [f"{s.job.id} is {s.state}: {s.detail}" for s in statuses if s.state != "done"]


def check_exactly_once(jobs: list[Job], paths: Paths, arrays: list[dict[str, Any]]) -> list[str]:
    """Each job: one claim, released "done"; one SLURM task, whose result says it rehearsed the job."""
    problems = []
    for job in jobs:
        records = claim_records(paths.claims, job.id)
        outcomes = [(r["released"], r["outcome"]) for r in records]
        if outcomes != [(True, "done")]:
            problems.append(f"{job.id}: claims {outcomes}, expected one released 'done'")
    results = Counter()
    for array in arrays:
        if array["record"] != SUBMISSION_RECORD:
            continue
        for item in array["jobs"]:
            results[item["job"], _task_result(Path(array["folder"]), item["slurm_id"])] += 1
    for job in jobs:
        ran = {result: n for (name, result), n in results.items() if name == job.id}
        if ran != {REHEARSED: 1}:
            problems.append(f"{job.id}: SLURM task results {ran}, expected one {REHEARSED!r}")
    return problems


def _task_result(folder: Path, slurm_id: str) -> str:
    """What a finished array task returned (its outcome's message), or why there is none."""
    from submitit.core.utils import JobPaths

    path = JobPaths(folder, job_id=slurm_id, task_id=0).result_pickle
    try:
        kind, value = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, ValueError, EOFError) as error:
        return f"no result ({type(error).__name__})"
    return value.get("message", "") if kind == "success" else f"{kind}: {str(value)[:200]}"


def check_prepared_once(entries: list[DatasetEntry], paths: Paths, arrays: list[dict[str, Any]]) -> list[str]:
    """Each task: prepared, by one preparation (its record's history), in one claim of its dataset, listed once in
    the preparation array."""
    problems = []
    records = read_records(paths)
    listed = Counter(item["job"] for a in arrays if a["record"] == PREPARE_RECORD for item in a["jobs"])
    for entry in entries:
        record = records.get(entry.key) or {}
        history = record.get("history", [])
        if record.get("status") != "prepared" or len(history) != 1:
            problems.append(f"{entry.key}: preparation {record.get('status')} with {len(history)} run(s)")
        claims = claim_records(paths.claims, f"dataset__{entry.nnunet_name}")
        if len(claims) != 1:
            problems.append(f"{entry.key}: its dataset was claimed {len(claims)} time(s), expected once")
        if listed[entry.key] != 1:
            problems.append(f"{entry.key}: {listed[entry.key]} task(s) of the preparation array, expected one")
    return problems


def check_no_waiting(jobs: list[Job], paths: Paths, arrays: list[dict[str, Any]]) -> list[str]:
    """No job started before every task was prepared, none waited for (or touched) a dataset's claim; the
    submission's own claim was released."""
    problems = []
    prepared_at = max((r["at"] for r in read_records(paths).values()), default="")
    early = [job.id for job in jobs
             if any(r["created_at"] < prepared_at for r in claim_records(paths.claims, job.id))]
    if early:
        problems.append(f"{len(early)} job(s) claimed before the last preparation ended ({prepared_at}): "
                        f"{early[:5]}")
    job_ids = {job.id for job in jobs}
    for folder in paths.claims.iterdir() if paths.claims.is_dir() else ():
        if folder.name == SUBMITTING:
            if not latest(folder)[1].released:
                problems.append("the submission's claim was not released")
        elif folder.name not in job_ids and not folder.name.startswith("dataset__"):
            problems.append(f"an unexpected claim: {folder.name}")
    for array in arrays:
        for log in Path(array["folder"]).parent.glob("*/*_log.out"):
            if "waiting for dataset" in log.read_text(errors="replace"):
                problems.append(f"{log}: a task waited for a dataset's claim")
    return problems


def check_arrays(jobs: list[Job], arrays: list[dict[str, Any]], max_size: int) -> list[str]:
    """The GPU arrays: all jobs once, at most `max_size` each, each after the preparation array, none of a single
    task when there are several."""
    problems = []
    prepare = [a["array_job_id"] for a in arrays if a["record"] == PREPARE_RECORD]
    gpu = [a for a in arrays if a["record"] == SUBMISSION_RECORD]
    tasks = {job.entry.key for job in jobs}
    by_id = {job.id: job for job in jobs}
    sent = Counter(item["job"] for a in gpu for item in a["jobs"])
    if set(sent) != set(by_id) or set(sent.values()) != {1}:
        problems.append(f"the arrays hold {sum(sent.values())} job entries for {len(by_id)} jobs")
    if len(gpu) != math.ceil(len(jobs) / max_size):
        problems.append(f"{len(gpu)} arrays for {len(jobs)} jobs at most {max_size} each")
    for array in gpu:
        dependency = (array["parameters"].get("additional_parameters") or {}).get("dependency")
        if len(array["jobs"]) > max_size:
            problems.append(f"array {array['array_job_id']} holds {len(array['jobs'])} jobs (> {max_size})")
        if prepare and dependency != f"afterany:{prepare[0]}":
            problems.append(f"array {array['array_job_id']} depends on {dependency!r}, not the preparation")
        if len(tasks) > 1 and len(array["jobs"]) > 1 and \
                len({by_id[item["job"]].entry.key for item in array["jobs"] if item["job"] in by_id}) == 1:
            problems.append(f"array {array['array_job_id']} holds one task's jobs only")
    return problems


def check_resubmission(jobs: list[Job], options: ExecutionOptions, slurm: SlurmOptions, paths: Paths) -> list[str]:
    """A second submission finds nothing to submit."""
    before = len(list(submissions_folder(paths).iterdir()))
    lines: list[str] = []
    sent = submit_slurm(jobs, options, slurm, paths=paths, say=lines.append)
    after = len(list(submissions_folder(paths).iterdir()))
    if sent or after != before:
        return [f"a second submission submitted {len(sent)} job(s) ({after - before} new arrays): {lines}"]
    return []


def rehearse(args: argparse.Namespace, say: Callable[[str], None] = print) -> Rehearsal:
    """Submit, wait, check (module docstring)."""
    jobs = select_jobs(args)
    entries = list({job.entry.key: job.entry for job in jobs}.values())
    if args.attach and not args.workdir:
        raise SystemExit("rehearse_matrix: --attach needs the --workdir of the rehearsal")
    paths = use_workdir(args.workdir)
    rehearsal = Rehearsal(jobs=len(jobs), tasks=len(entries))
    say(f"rehearsal of {len(jobs)} jobs of {len(entries)} tasks in {paths.home.parent}")
    if not args.attach:
        write_datasets(entries, paths)
    started = time.perf_counter()
    options, slurm = submit(jobs, args, paths, say)
    arrays = submitted_arrays(paths)
    rehearsal.arrays = [a["array_job_id"] for a in arrays]
    if args.attach:  # the time since the submission, which took about as long as it took to record it
        started -= time.time() - submitted_at(arrays)
    rehearsal.figures["submit_s"] = round(time.perf_counter() - started, 2) if not args.attach else None
    try:
        tally = wait_until_over(jobs, paths, options.pretrained_weights, rehearsal.arrays, args.timeout_s, say)
    except BaseException as error:  # a timeout, Ctrl-C: leave nothing queued
        cancel(rehearsal.arrays)
        if not isinstance(error, TimeoutError):
            raise
        tally = counts(survey(jobs, paths, weights=options.pretrained_weights))
        rehearsal.problems.append(f"{error}: {tally['done']} of {len(jobs)} jobs done; the arrays were cancelled")
    rehearsal.figures["wall_s"] = round(time.perf_counter() - started, 1)
    rehearsal.figures["done"] = tally["done"]
    rehearsal.figures["jobs_per_min"] = round(tally["done"] / rehearsal.figures["wall_s"] * 60, 1)
    if not rehearsal.problems:
        check(rehearsal, jobs, entries, paths, arrays, args.max_array_size, (options, slurm))
    return rehearsal


def check(rehearsal: Rehearsal, jobs: list[Job], entries: list[DatasetEntry], paths: Paths,
          arrays: list[dict[str, Any]], max_size: int, submitted: tuple[ExecutionOptions, SlurmOptions]) -> None:
    """Every check, its problems added to the rehearsal; `batch status` of all the jobs timed on the way."""
    timed = time.perf_counter()
    rehearsal.problems += check_done(jobs, paths, submitted[0].pretrained_weights)
    rehearsal.figures["status_s"] = round(time.perf_counter() - timed, 2)
    rehearsal.problems += check_exactly_once(jobs, paths, arrays)
    rehearsal.problems += check_prepared_once(entries, paths, arrays)
    rehearsal.problems += check_no_waiting(jobs, paths, arrays)
    rehearsal.problems += check_arrays(jobs, arrays, max_size)
    rehearsal.problems += check_resubmission(jobs, *submitted, paths)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rehearsal = rehearse(args, say=lambda line: print(line, flush=True))
    figures = rehearsal.figures
    print(f"{rehearsal.jobs} jobs of {rehearsal.tasks} tasks in {len(rehearsal.arrays)} arrays (preparation "
          f"included): submitted in {figures['submit_s']} s, {figures['done']} done after {figures['wall_s']} s "
          f"({figures['jobs_per_min']} jobs/min)"
          + (f"; `batch status` of all of them: {figures['status_s']} s" if "status_s" in figures else ""))
    for problem in rehearsal.problems[:50]:
        print(f"PROBLEM: {problem}")
    print("all checks passed" if not rehearsal.problems else f"{len(rehearsal.problems)} problem(s)")
    if args.json:
        print(json.dumps(rehearsal.summary()))
    return 0 if not rehearsal.problems else 1


if __name__ == "__main__":
    sys.exit(main())
