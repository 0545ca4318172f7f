"""The job matrix (tasks x models x initialisations x recipes x seeds x training fractions x folds) and the state of
each job, read from the files.

A job is one run (`RunSpec`) of one registered task (`segbook.batch.jobs.Job`). Every pretrained (model, init) pair
of the selection gets one job per requested fine-tuning recipe (by default its model's own); scratch jobs train with
their model's scratch recipe. Its state is never stored: it is derived each time from what the run folder, the
claims and SLURM say, so it cannot drift from the truth:

- done: the run finished training and is evaluated;
- running: a live process holds the job's claim (or its SLURM task runs and is about to claim it);
- failed: the run's manifest records an error (training, planning or evaluation), or its attempts ended badly
  --max-attempts times (`segbook.batch.attempts`); `segbook batch retry --failed`;
- blocked: cannot start: the task's data is not imported, its preparation failed, or a pretrained run has no
  weights to start from;
- pending: everything else; it is new, resumes from its latest checkpoint, or (finished, not evaluated) only
  needs evaluating.

A survey reads, per job, `run.json` without its per-epoch history, two file names in the run folder, and the newest
claim (which carries the attempt counts); per task, one preparation record; and asks squeue once for all of them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

from segbook import backbones, claims
from segbook.batch.attempts import Attempts, summarize
from segbook.batch.jobs import Job
from segbook.batch.preparation import blocking_failure, read_records
from segbook.batch.submissions import SubmittedTask, latest_tasks
from segbook.data.folders import is_imported
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.recipes import RecipeError, get_recipe, load_recipes
from segbook.runs import (DEFAULT_FRACTION, DEFAULT_SEED, FOLDS, INITS, RunIdentityError, RunSpec, default_recipe,
                          has_resumable_checkpoint, is_evaluated, named_budget, parse_budgets, parse_fractions,
                          parse_seeds, valid_combinations, weights_given)
from segbook.squeue import LIVE_STATES, RUNNING_STATES, array_of, slurm_available, squeue_states
from segbook.training.manifest import RunManifest, failure

if TYPE_CHECKING:
    from segbook.registry import Registry

STATES = ("done", "running", "failed", "pending", "blocked")


class MatrixError(SegbookError):
    """A selection that names no valid job, or a job id that does not parse."""


def _items(text: str | Sequence[str]) -> list[str]:
    return [v.strip() for v in (text.split(",") if isinstance(text, str) else text) if v.strip()]


def parse_choices(text: str | Sequence[str], choices: Sequence[str], what: str) -> list[str]:
    """"a,b" (or a list) -> ["a", "b"], checked against `choices`; "all" means every choice."""
    values = _items(text)
    if values == ["all"] and "all" not in choices:
        return list(choices)
    unknown = [v for v in values if v not in choices]
    if unknown or not values:
        raise MatrixError(f"unknown {what} {', '.join(unknown) or '(none given)'}; choose from: "
                          f"{', '.join(choices)}")
    return list(dict.fromkeys(values))


def parse_recipes(text: str | Sequence[str] | None,
                  recipe_files: Sequence[str | os.PathLike] | None = None) -> list[str] | None:
    """"a,b" (or a list) -> the named recipes, each known (built in, in `recipe_files` or in SEGBOOK_RECIPES);
    "all" means every recipe for pretrained runs; None (each model's default recipe) stays None."""
    if text is None:
        return None
    values = _items(text)
    if values == ["all"]:
        return [name for name, recipe in load_recipes(recipe_files).items() if recipe.init == "pretrained"]
    if not values:
        raise MatrixError("no recipe given; name one or more (`segbook recipes` lists them), or 'all'")
    for name in values:
        get_recipe(name, "pretrained", recipe_files)  # a RecipeError listing the known ones
    return list(dict.fromkeys(values))


def build_matrix(registry: "Registry", tasks: str | Sequence[str] = "all", *, scale: str | None = None,
                 modality: str | None = None, target: str | None = None, region: str | None = None,
                 models: str | Sequence[str] | None = None, inits: str | Sequence[str] = INITS,
                 recipes: str | Sequence[str] | None = None,
                 recipe_files: Sequence[str | os.PathLike] | None = None,
                 seeds: str | Sequence[str | int] = (DEFAULT_SEED,),
                 fractions: str | Sequence[str | float] = (DEFAULT_FRACTION,),
                 budgets: str | Sequence[str | int] | None = None,
                 folds: str | Sequence[str] = ("all",)) -> list[Job]:
    """Every valid (task, model, init, recipe, seed, fraction, budget, fold) of the selection, in registry order.

    `tasks` is "all" or task names (anything `Registry.get` resolves: 613, Task613, a key, a name); the filters
    narrow it further. `models` None is the SegBook study's (`segbook.backbones.study_models`). A backbone without
    pretrained weights (nnU-Net's network) has no pretrained job. Each pretrained job is made once per recipe of
    `recipes` ("all": every pretrained recipe; None: its model's default one); scratch jobs train with their
    model's default scratch recipe (`scratch`), so every job is the run `segbook finetune` names the same way.
    An unknown recipe, or one that cannot train a selected model, is a `RecipeError` here, before anything runs.
    Every run is made once per seed of `seeds` and training fraction of `fractions` (`segbook.runs.parse_seeds`,
    `parse_fractions`: a bad or repeated value is a `RunIdentityError` here) and budget of `budgets` (epochs,
    `parse_budgets`; None: each recipe's own), named as `finetune` names it (`named_budget`: no suffix for the
    recipe's own budget).
    Folds: "all" is nnU-Net's fold 'all' (the whole train split, SegBook's protocol), 0-4 its cross-validation folds.
    """
    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t.strip()]
    chosen = list(registry) if list(tasks) in ([], ["all"]) else [registry.get(t.strip()) for t in tasks]
    selected = {e.key for e in registry.select(modality=modality, target=target, scale=scale, region=region)}
    entries = list({e.key: e for e in chosen if e.key in selected}.values())
    models = parse_choices(models or backbones.study_models(), backbones.model_names(), "model")
    inits = parse_choices(inits, INITS, "initialisation")
    recipes = parse_recipes(recipes, recipe_files)
    seeds, fractions = parse_seeds(seeds), parse_fractions(fractions)
    epochs: list[int | None] = [None] if budgets is None else list(parse_budgets(budgets))
    folds = parse_choices(folds, FOLDS, "fold")
    valid = set(valid_combinations())
    runs = [(m, i, r) for m in models for i in inits if (m, i) in valid
            for r in (recipes if i == "pretrained" and recipes is not None else [default_recipe(m, i)])]
    recipe_epochs = {(r, i): get_recipe(r, i, recipe_files).budget.epochs for _, i, r in runs}
    jobs = [Job(RunSpec.of(e, m, i, f, recipe=r, seed=s, fraction=p, budget=named_budget(b, recipe_epochs[r, i])), e)
            for e in entries for m, i, r in runs for s in seeds for p in fractions for b in epochs for f in folds]
    check_recipes(jobs, recipe_files)
    return jobs


def on_plans(jobs: Sequence[Job], plans: str = "default", weights: Mapping[str, str] | None = None,
             normalization: str = "task") -> list[Job]:
    """The jobs on `plans` and `normalization`: "default" and "task" leave them on their backbones' own plans;
    plans "checkpoint" (`segbook.checkpoint_plans`) plans every job of a model, pretrained and scratch alike, around
    that model's nnssl file of `weights` (`segbook.runs.parse_weights`; its planner registered for this process), so
    both share one plans identifier; normalization "checkpoint" (`segbook.checkpoint_normalization`) preprocesses a
    model's jobs, pretrained and scratch alike, as its file was pretrained (the scratch job loads nothing from it:
    its Delta(PT) partner sees the same preprocessing). The identifier is derived as `finetune` derives it
    (`run_planner`), so the jobs name the runs they train. A model with no file, or a file that cannot be planned
    around or records no pretraining normalisation, is a MatrixError naming it, before anything is written."""
    from dataclasses import replace

    from segbook.checkpoint_normalization import NORMALIZATIONS
    from segbook.checkpoint_plans import CHECKPOINT_PLANS

    if plans not in ("default", CHECKPOINT_PLANS):
        raise MatrixError(f"unknown --plans {plans}; choose default or {CHECKPOINT_PLANS}")
    if normalization not in NORMALIZATIONS:
        raise MatrixError(f"unknown --normalization {normalization}; choose {' or '.join(NORMALIZATIONS)}")
    if (plans, normalization) == ("default", "task"):
        return list(jobs)
    identifiers = plans_of_models([job.spec.model for job in jobs], plans, weights, normalization)
    return [Job(replace(job.spec, plans=identifiers[job.spec.model]), job.entry) for job in jobs]


def plans_of_models(models: Iterable[str], plans: str = "default", weights: Mapping[str, str] | None = None,
                    normalization: str = "task") -> dict[str, str]:
    """Each model's plans identifier on `plans` and `normalization` (its backbone's own on the defaults), with the
    planner that writes it registered in this process. The checkpoint planners (`segbook.checkpoint_plans`,
    `segbook.checkpoint_normalization`) live in the process that read the file: a process that prepares or trains
    a batch's jobs (a worker, a SLURM task) calls this (through `on_plans`, or directly) with the batch's recorded
    options, so it reads the files itself. MatrixError as `on_plans` says."""
    models = list(dict.fromkeys(models))
    if (plans, normalization) == ("default", "task"):
        return {model: backbones.get(model).plans for model in models}
    return {model: _identifier(model, plans, normalization, weights) for model in models}


def _identifier(model: str, plans: str, normalization: str, weights: Mapping[str, str] | None) -> str:
    """The plans identifier of `model`'s jobs, from its file of `weights`, as `finetune` derives a run's."""
    from segbook.paths import Paths
    from segbook.training.finetune import run_planner

    file = weights_given(dict(weights or {}), model)
    if file is None:
        wanted = (f"--plans checkpoint plans {model}'s jobs around its nnssl checkpoint" if plans != "default" else
                  f"--normalization {normalization} normalises {model}'s jobs as its checkpoint was pretrained")
        raise MatrixError(f"{wanted}: pass --weights {model}=FILE, or leave {model} out of --models")
    try:
        return backbones.PLANNERS[run_planner(model, True, plans, normalization, file, Paths.from_env())].plans
    except SegbookError as error:
        raise MatrixError(f"{model}: {error}") from None


def check_recipes(jobs: Iterable[Job], recipe_files: Sequence[str | os.PathLike] | None = None,
                  num_gpus: int = 1) -> None:
    """A `RecipeError` when a job's recipe is unknown or cannot train its model and initialisation on `num_gpus`
    GPUs (`Recipe.check_fits`): said once per recipe, model and initialisation, before anything is written."""
    for name, model, init in dict.fromkeys((j.spec.recipe, j.spec.model, j.spec.init) for j in jobs):
        recipe = get_recipe(name, init, recipe_files)
        try:
            recipe.check_fits(model, init, num_gpus)
        except RecipeError as error:
            gpus = f" of {num_gpus} GPUs (--gpus-per-job)" if num_gpus > 1 else ""
            raise RecipeError(f"{model} {init} jobs{gpus}: {error}") from None


def several_recipes(jobs: Iterable[Job]) -> bool:
    """Whether the pretrained jobs train with more than one recipe (then tables show a recipe column)."""
    return len({j.spec.recipe for j in jobs if j.spec.init == "pretrained"}) > 1


def several_variants(jobs: Iterable[Job]) -> bool:
    """Whether the jobs train with more than one seed, training fraction or budget (then tables show their
    columns)."""
    return len({(j.spec.seed, j.spec.fraction, j.spec.budget) for j in jobs}) > 1


def job_from_id(registry: "Registry", job_id: str) -> Job:
    """The job a `RunSpec.job_id` names."""
    try:
        spec = RunSpec.from_job_id(job_id, registry)
    except RunIdentityError as error:
        raise MatrixError(str(error)) from None
    return Job(spec, registry.get(spec.task))


#: The status table's detail column is cut to this many characters (JSON has all of it).
DETAIL_WIDTH = 100


@dataclass(frozen=True)
class JobStatus:
    """A job's state with what explains it, for tables and for deciding what to run."""

    job: Job
    state: str
    detail: str = ""
    epochs_done: int = 0
    epochs_total: int | None = None
    slurm_id: str | None = None  # the job's latest SLURM task
    slurm_state: str | None = None  # squeue's state of it ("ended" once squeue no longer lists it)
    slurm_live: bool = False  # that task is still to run or running (and has written no result)
    log: str | None = None
    attempts: Attempts = Attempts()

    def row(self, recipe: bool = False, variants: bool = False) -> dict[str, object]:
        """A table row; `recipe` adds the job's recipe, `variants` its seed, training fraction and budget (epochs,
        "" for the recipe's own; for a matrix of several)."""
        spec = self.job.spec
        detail = self.detail if len(self.detail) <= DETAIL_WIDTH else self.detail[:DETAIL_WIDTH - 3] + "..."
        return {"task": spec.task, "model": spec.model, "init": spec.init,
                **({"recipe": spec.recipe} if recipe else {}),
                **({"seed": spec.seed, "fraction": spec.fraction, "budget": spec.budget or ""} if variants else {}),
                "fold": spec.fold, "state": self.state,
                "epochs": f"{self.epochs_done}/{self.epochs_total}" if self.epochs_total else "",
                "attempts": self.attempts.count or "", "slurm": self.slurm_state or "", "detail": detail}

    def record(self) -> dict[str, object]:
        """Every field, with the job id and recipe and the whole detail: for JSON output and scripts."""
        return {"job": self.job.id, **self.row(recipe=True, variants=True), "detail": self.detail,
                "epochs_done": self.epochs_done, "epochs_total": self.epochs_total, "attempts": self.attempts.count,
                "bad_endings": self.attempts.bad, "last_ending": self.attempts.last, "slurm_id": self.slurm_id,
                "log": self.log}


def weights_problem(job: Job, paths: Paths, weights: str | Path | None) -> str | None:
    """Why a pretrained job has no checkpoint to start from (None when it has one, or does not need one)."""
    if job.spec.init != "pretrained":
        return None
    if weights is not None:
        return None if Path(weights).expanduser().is_file() else f"weights missing: {weights} not found"
    from stunet import WeightCache  # here: stunet imports torch, which a status can spare

    backbone = backbones.get(job.spec.model)
    cfg = backbone.pretrained
    if cfg is None:
        return f"weights missing: {backbone.label} has no official checkpoint; pass --weights FILE"
    if WeightCache(paths.weights).is_cached(cfg):
        return None
    return f"weights missing: run `segbook weights download {job.spec.model}` or pass --weights FILE"


def _pending_detail(manifest: RunManifest | None, folder: Path) -> str:
    if manifest is None:
        return "new"
    if manifest.status == "finished":
        return "evaluate only"
    if not has_resumable_checkpoint(folder):
        return "restarts (no checkpoint yet)"
    point = manifest.resume_point()
    if point is None:
        return "resumes from its latest checkpoint"
    epoch, iteration = point
    return f"resumes after epoch {epoch}" if not iteration else \
        f"resumes in epoch {epoch + 1} after iteration {iteration}"


def _slurm_fields(task: SubmittedTask | None, queue: Mapping[str, str] | None) -> dict[str, object]:
    """What SLURM says of the job's latest task: squeue's state, and whether it is live. A result file means the
    task is over even while squeue still shows it RUNNING or COMPLETING for a moment."""
    if task is None:
        return {}
    state = None if queue is None else queue.get(task.slurm_id, "ended")
    return {"slurm_id": task.slurm_id, "slurm_state": state, "log": str(task.stdout),
            "slurm_live": state in LIVE_STATES and not task.finished()}


def job_status(job: Job, paths: Paths, *, weights: Mapping[str, str] | None = None,
               queue: Mapping[str, str] | None = None, submitted: SubmittedTask | None = None,
               ask_slurm: bool = True, claim: tuple | None = None,
               preparations: Mapping[str, dict] | None = None) -> JobStatus:
    """The state of one job (see the module docstring); `queue`, `submitted`, `claim` (its newest claim as
    `claims.latest` reads it) and `preparations` come from `survey`, which reads them for many jobs at once."""
    folder = job.folder(paths)
    manifest = RunManifest.load(folder, history=False)
    claim_folder = paths.claims / job.id
    record, current, gone = claims.judge_latest(*(claim or claims.latest(claim_folder))[1:], queue,
                                                ask_slurm=ask_slurm)
    fields = {"attempts": summarize(claim_folder, record, gone, queue=queue), **_slurm_fields(submitted, queue)}
    if manifest is not None:
        fields.update(epochs_done=manifest.epochs_done, epochs_total=manifest.settings.epochs)
    if manifest is not None and manifest.status == "finished" and is_evaluated(folder):
        return JobStatus(job, "done", "evaluated", **fields)
    if current is not None:
        return JobStatus(job, "running", current.describe(), **fields)
    error = (failure(manifest) if manifest is not None else None) or \
        (fields["attempts"].reason() if fields["attempts"].exhausted else None)
    if error:
        return JobStatus(job, "failed", error, **fields)
    if fields.get("slurm_live") and fields["slurm_state"] in RUNNING_STATES:
        return JobStatus(job, "running", f"SLURM task {submitted.slurm_id} is {fields['slurm_state']}", **fields)
    if preparations is None:
        preparations = read_records(paths)
    given = weights_given(dict(weights or {}), job.spec.model)
    blocked = _blocked(job, paths, manifest, folder, given, preparations.get(job.entry.key))
    if blocked:
        return JobStatus(job, "blocked", blocked, **fields)
    return JobStatus(job, "pending", _pending_line(manifest, folder, fields), **fields)


def _pending_line(manifest: RunManifest | None, folder: Path, fields: dict) -> str:
    parts = [_pending_detail(manifest, folder)]
    last = fields["attempts"].last
    if last and last != "done":
        parts.append(f"attempt {fields['attempts'].count} {last}")
    if fields.get("slurm_live"):
        parts.append(f"queued in SLURM as {fields['slurm_id']}")
    return "; ".join(parts)


def _blocked(job: Job, paths: Paths, manifest: RunManifest | None, folder: Path, weights: str | Path | None,
             preparation: dict | None) -> str | None:
    if not is_imported(job.entry, paths):
        return f"data missing: run `segbook data import --task {job.entry.key} --from PATH`"
    if manifest is not None and manifest.status == "finished":
        return None  # only evaluation is left: it needs neither preparation nor weights
    failed = blocking_failure(preparation)
    if failed:
        return failed
    if manifest is None or not has_resumable_checkpoint(folder):
        return weights_problem(job, paths, weights)
    return None


def survey(jobs: Iterable[Job], paths: Paths | None = None, *, weights: Mapping[str, str] | None = None,
           slurm: bool = True) -> list[JobStatus]:
    """The state of every job, asking squeue once for all of them (when `slurm` and SLURM is installed).
    `weights`: the files pretrained jobs would start from (`segbook.runs.parse_weights`)."""
    paths = paths or Paths.from_env()
    jobs = list(jobs)
    submitted = latest_tasks(paths) if slurm else {}
    newest = [claims.latest(paths.claims / job.id) for job in jobs]
    queue = None
    if slurm and slurm_available():
        ids = {array_of(t.slurm_id) for t in submitted.values()}
        ids |= {array_of(r.slurm_job) for _, r, _ in newest if r is not None and r.slurm_job and not r.released}
        queue = squeue_states(ids)
    preparations = read_records(paths)
    return [job_status(job, paths, weights=weights, queue=queue, submitted=submitted.get(job.id), ask_slurm=False,
                       claim=claim, preparations=preparations) for job, claim in zip(jobs, newest)]


def in_states(statuses: Iterable[JobStatus], states: str | Sequence[str] | None) -> list[JobStatus]:
    """The statuses whose state is one of `states` ("failed,running" or a list; None or empty: all of them)."""
    statuses = list(statuses)
    if not states:
        return statuses
    wanted = set(parse_choices(states, STATES, "state"))
    return [s for s in statuses if s.state in wanted]


def counts(statuses: Iterable[JobStatus]) -> dict[str, int]:
    tally = {state: 0 for state in STATES}
    for status in statuses:
        tally[status.state] += 1
    return tally


def summary_line(statuses: Sequence[JobStatus]) -> str:
    tally = counts(statuses)
    return f"{len(statuses)} jobs: " + ", ".join(f"{n} {state}" for state, n in tally.items() if n)


# --- job files ----------------------------------------------------------------------------------------------------

#: A job file's comment lines start with this; every other non-blank line is one job id (`RunSpec.job_id`).
JOB_FILE_COMMENT = "#"


def write_job_file(path: str | os.PathLike, jobs: Iterable[Job], header: Sequence[str] = ()) -> None:
    """`jobs` as a job file (`read_job_file`), written atomically: `header` as comment lines, then one job id a
    line."""
    from segbook.io import atomic_write_text

    lines = [f"{JOB_FILE_COMMENT} {line}" for line in header] + [job.id for job in jobs]
    atomic_write_text(path, "\n".join(lines) + "\n")


def read_job_file(registry: "Registry", path: str | os.PathLike) -> list[Job]:
    """The jobs a job file lists, in its order: one job id a line, blank lines and `#` comments skipped. Every
    line is checked before any job is returned: an id that does not parse, names a task the registry does not
    know or a network without that initialisation, or comes twice is a MatrixError naming the file and line (all
    of them at once), so nothing starts on a partly valid file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise MatrixError(f"cannot read the job file {path}: {error}") from None
    jobs, problems, seen = [], [], {}
    valid = set(valid_combinations())
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(JOB_FILE_COMMENT):
            continue
        try:
            job = job_from_id(registry, line)
        except SegbookError as error:
            problems.append(f"line {number}: {error}")
            continue
        if (job.spec.model, job.spec.init) not in valid:
            problems.append(f"line {number}: {job.spec.model} has no {job.spec.init} runs")
        elif job.id in seen:
            problems.append(f"line {number}: {job.id} repeats line {seen[job.id]}")
        else:
            seen[job.id] = number
            jobs.append(job)
    if problems:
        raise MatrixError(f"{path}: {len(problems)} bad line(s); nothing was started:\n  " + "\n  ".join(problems))
    if not jobs:
        raise MatrixError(f"{path}: the job file lists no job")
    return jobs
