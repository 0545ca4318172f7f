"""Time `segbook batch status` on the study's 3,045 runs, in the compact state a matrix under way leaves.

Issue 14, item 6: status (and submit, which surveys the same way) must not read every run's per-epoch history. This
writes, with segbook's own manifest code, what the matrix `--tasks all --models base,large,huge,nnunet --folds
0,1,2,3,4` leaves part-way through: 60 % of the runs finished and evaluated (every epoch of their budget recorded),
10 % training (a live claim, half their epochs), 10 % interrupted with a checkpoint (a third of their epochs), 20 %
not started; each run's `run.json` without its history, which is in `epochs.jsonl` next to it (about 330 bytes an
epoch, as the trainer writes them: losses, pseudo-Dice per label, rates per parameter group). Each started run has
its claims, the tasks their dataset.json and preparation record, and the jobs a SLURM submission record (31 arrays;
their ids are not the cluster's, so squeue answers for none).

Then it times, each `--repeat` times (median and range):
- `survey` + the table rows: the Python API `segbook batch status` calls (`segbook.batch.matrix.survey`);
- the CLI, `segbook batch status ... --format json`, in a new process as a user runs it (imports included),
  with `--weights FILE` and without (then the cached official checkpoints are looked up through `stunet`, whose
  package imports torch);
- for comparison, reading every run's manifest with its history, as status did before the history moved out
  (`RunManifest.load(folder)`, which replays `epochs.jsonl`).

    python scripts/bench_status.py                  # 3,045 runs in a temporary folder (about 2 min to write)
    python scripts/bench_status.py --keep DIR       # write them in DIR and leave them there (about 0.8 GB);
                                                    # run again with the same DIR: times them without rewriting

(from the repository root, with segbook installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

from segbook import claims
from segbook.batch.execute import ExecutionOptions
from segbook.batch.jobs import Job
from segbook.batch.matrix import build_matrix, counts, survey
from segbook.batch.preparation import prepare_task
from segbook.batch.rehearsal import REHEARSAL
from segbook.batch.submissions import SubmittedTask, write_submission
from segbook.data.folders import raw_folder
from segbook.data.importer import dataset_json
from segbook.io import atomic_write_json, now
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.runs import RESUMABLE_CHECKPOINTS, identity_fields, summary_path
from segbook.training.manifest import HISTORY, RunManifest

SELECTION = {"tasks": "all", "models": "base,large,huge,nnunet", "folds": "0,1,2,3,4"}
CLI_SELECTION = [f"--{key}={value}" for key, value in SELECTION.items()]
#: The share of runs in each state (the rest are not started).
FINISHED, RUNNING, INTERRUPTED = 0.6, 0.1, 0.1
ARRAY_SIZE = 100
TARGET_S = 2.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, default=None, help="write the runs here and leave them")
    parser.add_argument("--repeat", type=int, default=3, help="timings of each kind (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def use_folder(root: Path) -> Paths:
    """A SEGBOOK_HOME and nnU-Net folders under `root`, exported (the CLI run inherits them)."""
    os.environ["SEGBOOK_HOME"] = str(root / "home")
    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ[variable] = str(root / variable)
    os.environ.pop("SEGBOOK_REGISTRY", None)
    paths = Paths.from_env()
    paths.export()
    return paths


def epoch_record(epoch: int, labels: int, groups: int, rng: random.Random) -> dict[str, Any]:
    """One epoch as the trainer records it."""
    return {"epoch": epoch, "train_loss": -0.5 - rng.random() * 0.3, "val_loss": -0.4 - rng.random() * 0.3,
            "pseudo_dice": [rng.random() for _ in range(labels)], "ema_pseudo_dice": rng.random(),
            "learning_rates": {f"group{g}": 0.01 * rng.random() for g in range(groups)},
            "seconds": round(100 + rng.random() * 50, 3)}


def write_run(job: Job, paths: Paths, state: str, options: ExecutionOptions, template: dict[str, Any],
              rng: random.Random) -> None:
    """The run folder, claims and files a job in `state` leaves (module docstring)."""
    folder = job.folder(paths)
    settings = options.settings_for(job)
    epochs = settings.epochs or 1000
    done = {"finished": epochs, "running": epochs // 2, "interrupted": epochs // 3}[state]
    labels = len(job.entry.foreground_labels)
    manifest = RunManifest(folder, {**template, "run": identity_fields(job.spec), "settings": asdict(settings),
                                    "status": state, "started_at": now(),
                                    "epochs": [epoch_record(e, labels, 3, rng) for e in range(done)]})
    if state != "finished":
        manifest.data["checkpoint"] = {"file": RESUMABLE_CHECKPOINTS[0], "epoch": done, "iteration": 0}
    folder.mkdir(parents=True, exist_ok=True)
    manifest.save()
    if state == "finished":
        atomic_write_json(summary_path(folder), {"run": identity_fields(job.spec), "num_cases": 50})
    else:
        (folder / RESUMABLE_CHECKPOINTS[0]).write_bytes(b"")
    claim = claims.try_claim(paths.claims, job.id)  # held by this process: alive while the timings run
    if state != "running":
        claim.release("done" if state == "finished" else "KeyboardInterrupt")


def write_matrix(jobs: list[Job], paths: Paths, options: ExecutionOptions, seed: int) -> dict[str, str]:
    """Every job's leftovers, the tasks' dataset.json and preparation records, and a submission record; each job's
    state."""
    rng = random.Random(seed)
    template = RunManifest.create(paths.results, {}, options.settings, {"via": "segbook batch", "backend": "slurm"})
    template = {k: v for k, v in template.data.items() if k not in ("run", "settings", "epochs")}
    for entry in {job.entry.key: job.entry for job in jobs}.values():
        atomic_write_json(raw_folder(entry, paths) / "dataset.json",
                          dataset_json(entry, entry.train_cases, entry.test_cases))
        prepare_task(entry, paths, body=REHEARSAL, say=lambda text: None)  # its record, as a preparation leaves it
    states = {}
    for job in jobs:
        draw = rng.random()
        state = "finished" if draw < FINISHED else "running" if draw < FINISHED + RUNNING else \
            "interrupted" if draw < FINISHED + RUNNING + INTERRUPTED else "new"
        if state != "new":
            write_run(job, paths, state, options, template, rng)
        states[job.id] = state
    _write_submissions(jobs, paths)
    return states


def _write_submissions(jobs: list[Job], paths: Paths) -> None:
    """31 array records, as `batch submit` leaves them (with SLURM ids no cluster knows)."""
    for number in range(0, len(jobs), ARRAY_SIZE):
        name = f"20260101-000000-bench.a{number // ARRAY_SIZE:03d}"
        folder = paths.batch / "slurm" / name
        array = 90_000_000 + number // ARRAY_SIZE
        tasks = [SubmittedTask(name, job.id, f"{array}_{i}", folder / "%j")
                 for i, job in enumerate(jobs[number:number + ARRAY_SIZE])]
        write_submission(folder, tasks, {}, {})


def timed(action: Callable[[], Any], repeat: int) -> tuple[list[float], Any]:
    """Seconds of each of `repeat` runs of `action`, and its last result."""
    seconds, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - started)
    return seconds, result


def cli_status(weights: str | None) -> str:
    given = ["--weights", weights] if weights else []
    done = subprocess.run([sys.executable, "-m", "segbook.cli.main", "batch", "status", *CLI_SELECTION, *given,
                           "--format", "json"], capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(f"segbook batch status failed:\n{done.stderr[-3000:]}")
    return done.stdout


def sizes(jobs: list[Job], paths: Paths) -> tuple[int, int]:
    """Bytes of every run.json, and of every epochs.jsonl."""
    manifests = histories = 0
    for job in jobs:
        folder = job.folder(paths)
        manifests += (folder / "run.json").stat().st_size if (folder / "run.json").is_file() else 0
        histories += (folder / HISTORY).stat().st_size if (folder / HISTORY).is_file() else 0
    return manifests, histories


def line(name: str, seconds: list[float]) -> str:
    return (f"  {name:<44} median {statistics.median(seconds):6.2f} s  (min {min(seconds):.2f}, "
            f"max {max(seconds):.2f}; {len(seconds)} runs)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    root = args.keep or Path(tempfile.mkdtemp(prefix="segbook-bench-status-"))
    paths = use_folder(root.resolve())
    jobs = build_matrix(load_registry(), SELECTION["tasks"], models=SELECTION["models"], folds=SELECTION["folds"])
    weights = paths.home / "weights-placeholder.model"
    weights.parent.mkdir(parents=True, exist_ok=True)
    weights.write_text("status only checks that it exists\n")
    options = ExecutionOptions.create(weights=weights)
    marker = paths.home / "bench-status.json"
    if marker.is_file():
        states, written = json.loads(marker.read_text()), "found"
        for job_id in (key for key, state in states.items() if state == "running"):
            claims.try_claim(paths.claims, job_id)  # the process that wrote them is gone: this one trains them now
    else:
        started = time.perf_counter()
        states = write_matrix(jobs, paths, options, args.seed)
        atomic_write_json(marker, states)
        written = f"written in {time.perf_counter() - started:.0f} s"
    manifests, histories = sizes(jobs, paths)
    print(f"{len(jobs)} jobs {written} under {root}: "
          + ", ".join(f"{n} {state}" for state, n in sorted(Counter(states.values()).items()))
          + f"; run.json {manifests / 1e6:.1f} MB in all, epochs.jsonl {histories / 1e6:.0f} MB")

    api_s, statuses = timed(lambda: [s.row() for s in survey(jobs, paths, weights=options.pretrained_weights)],
                            args.repeat)
    tally = counts(survey(jobs, paths, weights=options.pretrained_weights))
    cli_s, _ = timed(lambda: cli_status(str(weights)), args.repeat)
    bare_s, _ = timed(lambda: cli_status(None), args.repeat)
    full_s, _ = timed(lambda: [RunManifest.load(job.folder(paths)) for job in jobs], 1)  # once: it is slow
    print("states: " + ", ".join(f"{n} {state}" for state, n in tally.items() if n))
    print(line("survey + rows (the API status calls)", api_s))
    print(line("CLI status --weights FILE --format json", cli_s))
    print(line("CLI status --format json (no --weights)", bare_s))
    print(line("every manifest with its history (as before)", full_s))
    ratio = statistics.median(full_s) / statistics.median(api_s)
    print(f"reading the histories alone takes {ratio:.0f}x the whole survey; target < {TARGET_S} s: the API "
          f"{_verdict(api_s)}, the CLI with --weights {_verdict(cli_s)}, without {_verdict(bare_s)}")
    return 0


def _verdict(seconds: list[float]) -> str:
    return "meets it" if statistics.median(seconds) < TARGET_S else "does NOT"


if __name__ == "__main__":
    sys.exit(main())
