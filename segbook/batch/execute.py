"""`run_job`: one job from start to results, the same code on a local GPU and in a SLURM array task.

claim (an attempt, `segbook.batch.attempts`) -> check that the task is prepared -> train -> evaluate -> release. A
job never plans: preparation is a stage of its own (`segbook.batch.preparation`), and a job whose task is not
prepared stops at once with the command to run, its run untouched (outcome "unprepared"). Training resumes a run
from its latest checkpoint (`finetune(resume=True)`, which never re-applies pretrained weights over one); a run
that has no checkpoint yet has nothing to resume and starts again with the current options (its new manifest keeps
the old one's status, error and events under `request.previous_attempt`). Each step is idempotent, so running a job
again after any interruption continues where it stopped, and running a done job does nothing: a job that is done
(or failed earlier) is not even claimed, so a duplicate of it (a job submitted twice) counts no attempt. A failure is
recorded in the run's manifest (training: `status: failed` and `error`; evaluation: `evaluation_error`, training stays
finished) and ends this job only; `segbook.batch.retry` clears it. A job whose attempts ended badly --max-attempts
times is recorded failed the same way instead of being run again.

With DDP (`num_gpus` > 1) the ranks are processes of their own: stop signals are passed on to them
(`segbook.batch.signals`), and acted on here once they have saved and stopped.

`ExecutionOptions` are how every job of a batch runs, the same for both launchers (`run_local`, `submit_slurm`),
each of which adds its own options (`LocalOptions`, `SlurmOptions`). Their `body` (`segbook.batch.jobs.JobBody`) is
the test seam: `TRAINING` plans, trains and evaluates, `segbook.batch.rehearsal.REHEARSAL` rehearses; the options'
JSON names it (`BODIES`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence

from segbook.batch.attempts import ATTEMPT, DEFAULT_MAX_ATTEMPTS, Attempts, info_for
from segbook.batch.jobs import Job, JobBody
from segbook.batch.matrix import JobStatus, check_recipes
from segbook.batch.preparation import plan_and_split, planners_of, unprepared
from segbook.batch.rehearsal import REHEARSAL
from segbook.batch.signals import forwarding_to_ranks
from segbook.claims import Claim, try_claim
from segbook.errors import SegbookError
from segbook.options import Bound, OptionError, check_all
from segbook.paths import Paths
from segbook.recipes import get_recipe
from segbook.recipes import recipe_files as user_recipe_files
from segbook.runs import ANY_MODEL, identity_fields, is_evaluated, parse_weights, weights_given
from segbook.squeue import own_slurm_job
from segbook.training.manifest import RunManifest, failure, record_failure
from segbook.training.settings import TrainingSettings

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry

BOUNDS = {"num_gpus": Bound("--gpus-per-job", int, low=1), "processes": Bound("--processes", int, low=1),
          "data_workers": Bound("--data-workers", int, low=0), "max_attempts": Bound("--max-attempts", int, low=1),
          "threads": Bound("threads", int, low=1)}


class JobFailed(SegbookError):
    """A stage of a job failed; its error is recorded in the run's manifest."""


class NotPrepared(SegbookError):
    """The job's task is not prepared; the message names the command. Nothing about the run was written."""


class AttemptsExhausted(SegbookError):
    """The job's attempts ended badly --max-attempts times; recorded as its failure."""


def record_given_up(statuses: Iterable[JobStatus], paths: Paths) -> None:
    """Record in `run.json` that a job was given up (its attempts exhausted), where it does not say so yet. The last
    attempt was killed outright or terminated, so run.json may still say what its process last wrote ("running");
    no launcher starts the job again, so the one that finds it given up (`batch submit`, `batch run`) writes it."""
    for status in statuses:
        if status.state != "failed" or not status.attempts.exhausted:
            continue
        folder = status.job.folder(paths)
        manifest = RunManifest.load(folder, history=False)
        if manifest is not None and manifest.status not in ("failed", "finished"):
            record_failure(folder, AttemptsExhausted(status.attempts.reason()), "attempts")


class Training:
    """The real `segbook.batch.jobs.JobBody`: a task is planned and split (`plan_and_split`), a job trained through
    `finetune` (resuming from its latest checkpoint) and evaluated on its test split."""

    name = "train"
    reads_weights = True
    done = "trained and evaluated"

    def prepare(self, entry: "DatasetEntry", paths: Paths, processes: int | None, planners: Sequence[str],
                say: Callable[[str], None]) -> str:
        return plan_and_split(entry, paths, processes, planners, say)

    def unprepared(self, entry: "DatasetEntry", paths: Paths, folds: Iterable[str],
                   planners: Sequence[str]) -> str | None:
        return unprepared(entry, paths, folds, planners)

    def train(self, job: Job, options: "ExecutionOptions", paths: Paths, request: dict[str, Any]) -> None:
        """Resume (or start) the run. With DDP, stop signals go on to the ranks, and are acted on here once they
        have saved and stopped (submitit's requeue, or a stop)."""
        from segbook.training.finetune import finetune

        ranks = forwarding_to_ranks() if options.num_gpus > 1 else contextlib.nullcontext()
        with ranks as forwarded:
            result = finetune(job.entry, job.spec.model, job.spec.init == "pretrained", job.spec.fold,
                              recipe=job.spec.recipe, seed=job.spec.seed, fraction=job.spec.fraction,
                              recipe_files=options.recipe_files,
                              settings=options.settings_for(job), weights=options.file_for(job),
                              plans=options.plans, normalization=options.normalization, device=options.device,
                              num_gpus=options.num_gpus, resume=True, compile=options.compile,
                              paths=paths, plan_processes=_processes(options), request=request)
        if forwarded is not None:
            forwarded.act()
        if result.status == "interrupted":  # the ranks stopped without a signal reaching this process
            raise KeyboardInterrupt(f"the ranks of {job.id} were interrupted")
        if result.status != "finished":
            raise SegbookError(f"training of {job.id} ended with status {result.status}")

    def evaluate(self, job: Job, options: "ExecutionOptions", paths: Paths) -> None:
        from segbook.evaluation.evaluate import evaluate_run  # here: a rehearsal's task does without scipy's import

        evaluate_run(job.entry, job.spec, paths, device=options.device, num_processes=_processes(options))


TRAINING = Training()
#: The bodies a batch's options can name (`ExecutionOptions.body`, as its JSON carries it to workers and SLURM tasks).
BODIES: dict[str, JobBody] = {body.name: body for body in (TRAINING, REHEARSAL)}


def job_body(body: JobBody | str) -> JobBody:
    """A body given as itself or by name; `OptionError` naming the known ones otherwise."""
    if not isinstance(body, str):
        return body
    if body not in BODIES:
        raise OptionError(f"unknown job body {body!r}; choose one of {', '.join(BODIES)}")
    return BODIES[body]


@dataclass(frozen=True)
class ExecutionOptions:
    """How every job of a batch runs; the same for all of them, sent as JSON to each worker and SLURM task.

    `pretrained_settings` (default: `settings`) lets fine-tuning use other hyperparameters than scratch training.
    `num_gpus` is each job's GPUs on cuda (nnU-Net's DDP when > 1). `registry_files` and `recipe_files` are absolute
    paths: the workers load the same registry and recipes wherever they start. `body` may be given by name.
    """

    settings: TrainingSettings = field(default_factory=TrainingSettings)
    pretrained_settings: TrainingSettings | None = None
    weights: dict[str, str] = field(default_factory=dict)  # `segbook.runs.parse_weights`: {model or "*": file}
    plans: str = "default"  # or "checkpoint": every job planned around its model's file of `weights`
    normalization: str = "task"  # or "checkpoint": jobs preprocessed as their model's file was pretrained
    device: str = "cuda"
    num_gpus: int = 1
    compile: bool | None = None
    processes: int | None = None  # planning, preprocessing and evaluation (default: nnUNet_def_n_proc)
    data_workers: int | None = None  # nnUNet_n_proc_DA of each job (default: inherited)
    threads: int | None = None  # torch's intra-op threads in each job's process (default: torch's); see run_job
    registry_files: tuple[str, ...] = ()
    recipe_files: tuple[str, ...] = ()
    max_attempts: int = DEFAULT_MAX_ATTEMPTS  # bad endings (killed, terminated) before a job is failed
    body: JobBody = TRAINING  # REHEARSAL ("noop"): a rehearsal (segbook.batch.rehearsal)

    def __post_init__(self) -> None:
        object.__setattr__(self, "body", job_body(self.body))

    @classmethod
    def create(cls, *, registry_files: Iterable[str | os.PathLike] = (),
               recipe_files: Iterable[str | os.PathLike] = (),
               weights: str | os.PathLike | Iterable[str] | dict[str, str] | None = None,
               **values: Any) -> "ExecutionOptions":
        """Options with file paths made absolute (workers may start in another directory, on another node); the
        recipe files of SEGBOOK_RECIPES are added to `recipe_files`, so they reach the workers explicitly too.
        `weights`: a file for every pretrained job, or `MODEL=FILE` items (`segbook.runs.parse_weights`)."""
        absolute = lambda files: tuple(str(Path(f).expanduser().resolve()) for f in files)  # noqa: E731
        return cls(registry_files=absolute(registry_files), recipe_files=absolute(user_recipe_files(recipe_files)),
                   weights=parse_weights(weights), **values)

    def validate(self, jobs: Iterable[Job] = ()) -> "ExecutionOptions":
        """Before a single job is started or submitted: `OptionError` for any value out of range, `RecipeError` for
        a job whose recipe is unknown or cannot train it with these options (see `check_recipes`)."""
        for settings in (self.settings, self.pretrained_settings):
            if settings is not None:
                settings.validate()
        check_all({"num_gpus": self.num_gpus, "processes": self.processes, "data_workers": self.data_workers,
                   "max_attempts": self.max_attempts, "threads": self.threads}, BOUNDS)
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
    def pretrained_weights(self) -> dict[str, str]:
        """The checkpoints pretrained jobs start from, by model (`segbook.runs.parse_weights`); a model without
        one starts from its cached official checkpoint."""
        fallback = (self.pretrained_settings or self.settings).weights
        return {**({ANY_MODEL: fallback} if fallback else {}), **self.weights}

    def weights_for(self, job: Job) -> str | None:
        return weights_given(self.pretrained_weights, job.spec.model) if job.spec.init == "pretrained" else None

    def file_for(self, job: Job) -> str | None:
        """What `finetune` gets as --weights: the file a pretrained job starts from, or on checkpoint plans or
        normalisation the file that plans or normalises a scratch job too (which loads nothing from it)."""
        if job.spec.init == "pretrained" or (self.plans, self.normalization) != ("default", "task"):
            return weights_given(self.pretrained_weights, job.spec.model)
        return None

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "body": self.body.name})

    @classmethod
    def from_json(cls, text: str) -> "ExecutionOptions":
        data = json.loads(text)
        data["settings"] = TrainingSettings.from_dict(data["settings"])
        if data.get("pretrained_settings"):
            data["pretrained_settings"] = TrainingSettings.from_dict(data["pretrained_settings"])
        data["registry_files"] = tuple(data.get("registry_files", ()))
        data["recipe_files"] = tuple(data.get("recipe_files", ()))
        data["weights"] = parse_weights(data.get("weights"))  # a single path in records made before MODEL=FILE
        return cls(**data)


@dataclass(frozen=True)
class JobOutcome:
    job: str
    result: str  # done (trained and evaluated), failed (error recorded), busy (another process holds the claim),
    #              unprepared (its task is not prepared; nothing written)
    message: str = ""
    seconds: float = 0.0


def run_job(job: Job, options: ExecutionOptions, paths: Paths | None = None, *,
            backend: str = "local") -> JobOutcome:
    """Claim the job and take it as far as it goes; a failure is recorded and returned, never raised.

    Interruptions (Ctrl-C, SIGTERM turned into `Terminated`, SLURM's requeue exit) propagate after the manifest
    says "interrupted" and the claim is released: running the job again resumes it.
    """
    paths = paths or Paths.from_env()
    paths.export()
    if options.data_workers is not None:
        os.environ["nnUNet_n_proc_DA"] = str(options.data_workers)
    if options.threads is not None:
        _set_threads(options.threads)
    started = time.time()
    settled = _settled(job, job.folder(paths), RunManifest.load(job.folder(paths), history=False))
    if settled is not None:  # nothing to do: no claim, so no attempt (a job submitted twice runs twice in SLURM)
        return JobOutcome(job.id, *settled)
    claim = try_claim(paths.claims, job.id, info=info_for(paths.claims / job.id, ATTEMPT, options.max_attempts,
                                                          backend))
    if not isinstance(claim, Claim):
        return JobOutcome(job.id, "busy", claim.describe())
    with claim.held():
        try:
            message = _work(job, options, paths, backend, Attempts.from_info(claim.record.info))
        except NotPrepared as error:
            claim.outcome = "unprepared"
            return JobOutcome(job.id, "unprepared", str(error), time.time() - started)
        except JobFailed as failed:
            claim.outcome = "failed"
            return JobOutcome(job.id, "failed", str(failed), time.time() - started)
    return JobOutcome(job.id, "done", message, time.time() - started)


def _settled(job: Job, folder: Path, manifest: RunManifest | None) -> tuple[str, str] | None:
    """("done" or "failed", why) for a job with nothing left to do: done, or failed earlier (it waits for `batch
    retry`); None otherwise."""
    if manifest is not None and failure(manifest):
        return "failed", (f"{job.id} failed earlier ({failure(manifest)}); `segbook batch retry --failed` runs it "
                          "again")
    if manifest is not None and manifest.status == "finished" and is_evaluated(folder):
        return "done", "already done"
    return None


def _set_threads(threads: int) -> None:
    """Set torch's intra-op threads in this process. The environment cannot pin them: torch takes MKL_NUM_THREADS
    over OMP_NUM_THREADS and caps either at the machine's cores, so a worker given OMP_NUM_THREADS=2 trains with 1
    thread in a shell that sets MKL_NUM_THREADS=1, or on a 1-core machine, and computes other sums."""
    import torch

    torch.set_num_threads(threads)


def _work(job: Job, options: ExecutionOptions, paths: Paths, backend: str, attempts: Attempts) -> str:
    folder = job.folder(paths)
    manifest = RunManifest.load(folder, history=False)
    settled = _settled(job, folder, manifest)  # again, under the claim: another process may have settled it since
    if settled is not None:
        if settled[0] == "failed":
            raise JobFailed(settled[1])
        return settled[1]
    if attempts.exhausted:
        with _stage(job, options, folder, "attempts", backend, attempts):
            raise AttemptsExhausted(attempts.reason())
    training = manifest is None or manifest.status != "finished"
    body = options.body
    problem = body.unprepared(job.entry, paths, [job.spec.fold], planners_of([job])) if training else None
    if problem:
        raise NotPrepared(f"{job.id}: {problem}")
    if training:
        with _stage(job, options, folder, "train", backend, attempts):
            body.train(job, options, paths, _request(job, backend, attempts))
    with _stage(job, options, folder, "evaluate", backend, attempts):
        body.evaluate(job, options, paths)
    return body.done


def _processes(options: ExecutionOptions) -> int:
    return options.processes or int(os.environ.get("nnUNet_def_n_proc") or 1)


def _request(job: Job, backend: str, attempts: Attempts) -> dict[str, Any]:
    slurm_job, restart = own_slurm_job()
    return {"via": "segbook batch", "job": job.id, "backend": backend, "host": socket.gethostname(),
            "slurm_job": slurm_job, "slurm_restart": restart, "attempt": attempts.count,
            "previous_attempt_ended": attempts.last}


@contextlib.contextmanager
def _stage(job: Job, options: ExecutionOptions, folder: Path, stage: str, backend: str,
           attempts: Attempts) -> Iterator[None]:
    """Record an exception of this stage in the manifest and turn it into `JobFailed`."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - any failure of one job is recorded and must not stop the others
        record_failure(folder, error, stage,
                       new_manifest=lambda: _new_manifest(job, options, folder, backend, attempts))
        raise JobFailed(f"{job.id}: {stage} failed: {type(error).__name__}: {error}") from error


def _new_manifest(job: Job, options: ExecutionOptions, folder: Path, backend: str,
                  attempts: Attempts) -> RunManifest:
    """The record of a run that failed before `finetune` created it (it has no checkpoint, so the next attempt
    starts afresh and keeps this record under `request.previous_attempt`)."""
    settings = replace(options.settings_for(job), weights=options.weights_for(job))
    folder.mkdir(parents=True, exist_ok=True)
    return RunManifest.create(folder, identity_fields(job.spec), settings, _request(job, backend, attempts))
