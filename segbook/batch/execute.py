"""`run_job`: one job from start to results, the same code on a local GPU and in a SLURM array task.

claim -> plan (if needed) -> train -> evaluate -> release. Training resumes a run from its latest checkpoint
(`finetune(resume=True)`, which never re-applies pretrained weights over one); a run that has no checkpoint yet has
nothing to resume and starts again with the current options (its new manifest keeps the old one's status, error
and events under `request.previous_attempt`). Each step is idempotent, so running a job again after any
interruption continues where it stopped, and running a done job does nothing. A failure is recorded in the run's
manifest (planning and training: `status: failed` and `error`; evaluation: `evaluation_error`, training stays
finished) and ends this job only; `segbook.batch.retry` clears it.

`ExecutionOptions` are how every job of a batch runs, the same for both launchers (`run_local`, `submit_slurm`),
each of which adds its own options (`LocalOptions`, `SlurmOptions`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from segbook.batch.matrix import Job, check_recipes
from segbook.claims import Claim, try_claim
from segbook.errors import SegbookError
from segbook.options import Bound, OptionError, check_all
from segbook.paths import Paths
from segbook.recipes import get_recipe
from segbook.recipes import recipe_files as user_recipe_files
from segbook.runs import identity_fields, is_evaluated
from segbook.squeue import own_slurm_job
from segbook.training.manifest import RunManifest, failure, record_failure
from segbook.training.settings import TrainingSettings


BOUNDS = {"num_gpus": Bound("--gpus-per-job", int, low=1), "processes": Bound("--processes", int, low=1),
          "data_workers": Bound("--data-workers", int, low=0)}


class JobFailed(SegbookError):
    """A stage of a job failed; its error is recorded in the run's manifest."""


@dataclass(frozen=True)
class ExecutionOptions:
    """How every job of a batch runs; the same for all of them, sent as JSON to each worker and SLURM task.

    `pretrained_settings` (default: `settings`) lets fine-tuning use other hyperparameters than scratch training.
    `num_gpus` is each job's GPUs on cuda (nnU-Net's DDP when > 1). `registry_files` and `recipe_files` are absolute
    paths: the workers load the same registry and recipes wherever they start.
    """

    settings: TrainingSettings = field(default_factory=TrainingSettings)
    pretrained_settings: TrainingSettings | None = None
    weights: str | None = None
    device: str = "cuda"
    num_gpus: int = 1
    compile: bool | None = None
    processes: int | None = None  # planning, preprocessing and evaluation (default: nnUNet_def_n_proc)
    data_workers: int | None = None  # nnUNet_n_proc_DA of each job (default: inherited)
    registry_files: tuple[str, ...] = ()
    recipe_files: tuple[str, ...] = ()

    @classmethod
    def create(cls, *, registry_files: Iterable[str | os.PathLike] = (),
               recipe_files: Iterable[str | os.PathLike] = (), weights: str | os.PathLike | None = None,
               **values: Any) -> "ExecutionOptions":
        """Options with file paths made absolute (workers may start in another directory, on another node); the
        recipe files of SEGBOOK_RECIPES are added to `recipe_files`, so they reach the workers explicitly too."""
        absolute = lambda files: tuple(str(Path(f).expanduser().resolve()) for f in files)  # noqa: E731
        weights = str(Path(weights).expanduser().resolve()) if weights else None
        return cls(registry_files=absolute(registry_files), recipe_files=absolute(user_recipe_files(recipe_files)),
                   weights=weights, **values)

    def validate(self, jobs: Iterable[Job] = ()) -> "ExecutionOptions":
        """Before a single job is started or submitted: `OptionError` for any value out of range, `RecipeError` for
        a job whose recipe is unknown or cannot train it with these options (see `check_recipes`)."""
        for settings in (self.settings, self.pretrained_settings):
            if settings is not None:
                settings.validate()
        check_all({"num_gpus": self.num_gpus, "processes": self.processes, "data_workers": self.data_workers},
                  BOUNDS)
        if self.num_gpus > 1 and self.device != "cuda":
            raise OptionError(f"--gpus-per-job {self.num_gpus} needs --device cuda (nnU-Net's DDP), not "
                              f"{self.device}")
        check_recipes(jobs, self.recipe_files, self.num_gpus)
        return self

    @property
    def gpus_per_job(self) -> int:
        """The GPUs each job holds: `num_gpus` on cuda, none on the CPU (or mps, which is not counted in GPUs)."""
        return self.num_gpus if self.device == "cuda" else 0

    def settings_for(self, job: Job) -> TrainingSettings:
        """The job's settings with its recipe's budget filled in (the run resolves the rest from its recipe)."""
        settings = (self.pretrained_settings if job.spec.init == "pretrained" else None) or self.settings
        return settings.resolve(get_recipe(job.spec.recipe, job.spec.init, self.recipe_files))[0]

    @property
    def pretrained_weights(self) -> str | None:
        """The checkpoint pretrained jobs start from; None: the cached official one of each model."""
        return self.weights or (self.pretrained_settings or self.settings).weights

    def weights_for(self, job: Job) -> str | None:
        return self.pretrained_weights if job.spec.init == "pretrained" else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ExecutionOptions":
        data = json.loads(text)
        data["settings"] = TrainingSettings.from_dict(data["settings"])
        if data.get("pretrained_settings"):
            data["pretrained_settings"] = TrainingSettings.from_dict(data["pretrained_settings"])
        data["registry_files"] = tuple(data.get("registry_files", ()))
        data["recipe_files"] = tuple(data.get("recipe_files", ()))
        return cls(**data)


@dataclass(frozen=True)
class JobOutcome:
    job: str
    result: str  # done (trained and evaluated), failed (error recorded), busy (another process holds the claim)
    message: str = ""
    seconds: float = 0.0


def run_job(job: Job, options: ExecutionOptions, paths: Paths | None = None, *,
            backend: str = "local") -> JobOutcome:
    """Claim the job and take it as far as it goes; a failure is recorded and returned, never raised.

    Interruptions (Ctrl-C, SIGTERM turned into KeyboardInterrupt, SLURM's requeue exit) propagate after the
    manifest says "interrupted" and the claim is released: running the job again resumes it.
    """
    paths = paths or Paths.from_env()
    paths.export()
    if options.data_workers is not None:
        os.environ["nnUNet_n_proc_DA"] = str(options.data_workers)
    started = time.time()
    claim = try_claim(paths.claims, job.id)
    if not isinstance(claim, Claim):
        return JobOutcome(job.id, "busy", claim.describe())
    with claim.held():
        try:
            message = _work(job, options, paths, backend)
        except JobFailed as failed:
            claim.outcome = "failed"
            return JobOutcome(job.id, "failed", str(failed), time.time() - started)
    return JobOutcome(job.id, "done", message, time.time() - started)


def _work(job: Job, options: ExecutionOptions, paths: Paths, backend: str) -> str:
    from segbook.evaluation.evaluate import evaluate_run
    from segbook.plan import plan_task
    from segbook.training.finetune import finetune

    folder = job.folder(paths)
    manifest = RunManifest.load(folder)
    if manifest is not None and failure(manifest):
        raise JobFailed(f"{job.id} failed earlier ({failure(manifest)}); `segbook batch retry --failed` runs it "
                        "again")
    if manifest is not None and manifest.status == "finished" and is_evaluated(folder):
        return "already done"
    processes = options.processes or int(os.environ.get("nnUNet_def_n_proc") or 1)
    if manifest is None or manifest.status != "finished":
        with _stage(job, options, folder, "plan", backend):
            # Jobs of one task that start together wait for the first to plan it, then find it up to date.
            plan_task(job.entry, paths, num_processes=processes, wait=True)
        with _stage(job, options, folder, "train", backend):
            # Resumes from the latest checkpoint; a run without one starts again with today's options.
            result = finetune(job.entry, job.spec.model, job.spec.init == "pretrained", job.spec.fold,
                              recipe=job.spec.recipe, recipe_files=options.recipe_files,
                              settings=options.settings_for(job), weights=options.weights_for(job),
                              device=options.device, num_gpus=options.num_gpus, resume=True,
                              compile=options.compile, paths=paths, plan_processes=processes,
                              request=_request(job, backend))
            if result.status != "finished":
                raise SegbookError(f"training of {job.id} ended with status {result.status}")
    with _stage(job, options, folder, "evaluate", backend):
        evaluate_run(job.entry, job.spec, paths, device=options.device, num_processes=processes)
    return "trained and evaluated"


def _request(job: Job, backend: str) -> dict[str, Any]:
    slurm_job, restart = own_slurm_job()
    return {"via": "segbook batch", "job": job.id, "backend": backend, "host": socket.gethostname(),
            "slurm_job": slurm_job, "slurm_restart": restart}


@contextlib.contextmanager
def _stage(job: Job, options: ExecutionOptions, folder: Path, stage: str, backend: str) -> Iterator[None]:
    """Record an exception of this stage in the manifest and turn it into `JobFailed`."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure of one job is recorded and must not stop the others
        record_failure(folder, error, stage, new_manifest=lambda: _new_manifest(job, options, folder, backend))
        raise JobFailed(f"{job.id}: {stage} failed: {type(error).__name__}: {error}") from error


def _new_manifest(job: Job, options: ExecutionOptions, folder: Path, backend: str) -> RunManifest:
    """The record of a run that failed before `finetune` created it (it has no checkpoint, so the next attempt
    starts afresh and keeps this record under `request.previous_attempt`)."""
    settings = replace(options.settings_for(job), weights=options.weights_for(job))
    folder.mkdir(parents=True, exist_ok=True)
    return RunManifest.create(folder, identity_fields(job.spec), settings, _request(job, backend))
