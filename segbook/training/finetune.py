"""`finetune()`: train one (task, model, initialisation, fold) run on nnU-Net v2, recorded in its `run.json`.

Everything a user can get wrong is checked before anything is planned or written: the settings' ranges, the
device, the plans, and for a pretrained run that its checkpoint reads safely and fits the task's network. The run is
then claimed (a second trainer on the same run is refused, naming the first), the task planned if needed, and the
preprocessed cases checked against the train split.

`run.json` records what makes the run differ from the authors' (docs/fidelity.md): its plans beside theirs
(`plans_comparison`), the test split it leaves out (`split`, with its SHA-256), both normalisations (`normalization`:
the pretraining's, as the checkpoint or its catalogue entry says, and the fine-tuning's, with a warning where they
differ) and, in its settings, how the stem was tiled (`stem_tiling`: the checkpoint format's rule unless given).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from segbook import backbones, claims
from segbook.errors import SegbookError
from segbook.options import Bound, check_all
from segbook.paths import Paths
from segbook.runs import (CONFIGURATION, DEFAULT_FRACTION, DEFAULT_SEED, RunSpec, Weights, has_resumable_checkpoint,
                          identity_fields, resolve_weights)
from segbook.training.checkpoints import check_weights_fit
from segbook.training.manifest import RunManifest, record_failure
from segbook.recipes import get_recipe
from segbook.training.settings import TrainingSettings, recipe_differences

if TYPE_CHECKING:
    from segbook.backbones.models import CheckpointFacts
    from segbook.plan import PlanResult
    from segbook.recipes import Recipe
    from segbook.registry import DatasetEntry

BOUNDS = {"num_gpus": Bound("--num-gpus", int, low=1), "plan_processes": Bound("--plan-processes", int, low=1)}


class RunExistsError(SegbookError):
    """A run folder already holds a run that this call would overwrite or contradict."""


@dataclass
class RunResult:
    spec: RunSpec
    folder: Path
    manifest: RunManifest

    @property
    def status(self) -> str:
        return self.manifest.status


def finetune(entry: "DatasetEntry", model: str, pretrained: bool, fold: str | int = "all", *,
             recipe: str | None = None, seed: int = DEFAULT_SEED, fraction: float = DEFAULT_FRACTION,
             recipe_files: Sequence[str | Path] | None = None,
             settings: TrainingSettings | None = None, weights: str | Path | None = None, device: str | None = None,
             num_gpus: int = 1, resume: bool = False, overwrite: bool = False, compile: bool | None = None,
             paths: Paths | None = None, plan_processes: int | None = None, plans: str = "default",
             normalization: str = "task", request: dict[str, Any] | None = None,
             say: Callable[[str], None] = print) -> RunResult:
    """Train one run with nnU-Net's training loop, following a recipe (None: the default of its initialisation).

    `seed` and `fraction` are part of the run's identity (its name): the seed drives the fresh weights, nnU-Net's
    sampling and augmentation (`segbook.runs.Identity.rng_seed`, recorded in run.json as `rng_seed`); the run
    trains on `fraction` of its training cases (`segbook.data.subsets`, recorded as `training_cases`).
    `recipe_files` add user recipes to the built-in ones. `plans` is a planner of `segbook.backbones.PLANNERS`
    (`paper`: nnU-Net's plans at the SegBook authors' patch size and spacing), or `checkpoint` (the task planned
    around the pretrained checkpoint's own network, `segbook.checkpoint_plans`); its plans identifier is part of the
    run's folder. `normalization` "checkpoint" preprocesses the task as the checkpoint's pretraining normalised its
    images (`segbook.checkpoint_normalization`: plans of their own, `<plans>_ZScoreNorm`); "task" (the default)
    keeps the task's own plans' normalisation. `device` None picks cuda, else mps, else cpu. `resume` continues from
    the run's latest checkpoint (the pretrained weights are never applied over it) with the settings the run started
    with; a run with no checkpoint yet has nothing to resume and starts again with the settings given. A run that
    exists is otherwise an error unless `overwrite`; a finished one asked for with other settings too.
    """
    import os

    import torch
    from nnunetv2.run.run_training import run_training

    from segbook.data.folders import is_imported
    from segbook.checkpoint_normalization import CHECKPOINT_NORMALIZATION
    from segbook.devices import resolve_device
    from segbook.plan import check_planner, plan_task, verify_preprocessed
    from segbook.primus_plans import check_task_fits
    from segbook.training.trainers import register_with_nnunet

    settings = (settings or TrainingSettings()).validate()
    check_all({"num_gpus": num_gpus, "plan_processes": plan_processes}, BOUNDS)
    planner = _planner(model, pretrained, plans, weights or settings.weights)
    _check_normalization(normalization)
    spec = RunSpec.of(entry, model, pretrained, fold, recipe=recipe, seed=seed, fraction=fraction,
                      plans=check_planner(entry, planner))
    chosen = get_recipe(spec.recipe, spec.init, recipe_files)
    chosen.check_fits(spec.model, spec.init, num_gpus)
    settings, resolved = settings.resolve(chosen)
    device = resolve_device(device, say)
    if num_gpus > 1 and device != "cuda":
        raise SegbookError(f"--num-gpus {num_gpus} needs --device cuda (nnU-Net's DDP), not {device}")
    paths = paths or Paths.from_env()
    paths.export()
    if not is_imported(entry, paths):
        raise SegbookError(f"{entry.key} is not imported; run `segbook data import --task {entry.key} --from PATH` "
                           "first")
    from segbook.checkpoint_plans import CHECKPOINT_PLANS

    by_file = plans == CHECKPOINT_PLANS or normalization == CHECKPOINT_NORMALIZATION
    chosen = None
    if by_file and spec.init != "pretrained":  # the file plans or normalises the run; nothing is loaded
        chosen = resolve_weights(spec.model, weights or settings.weights, paths, say)
        weights, settings = None, replace(settings, weights=None, weights_sha256=None)
    settings, facts = _with_weights(entry, spec, settings, weights, paths, say)
    if spec.init == "pretrained":
        chosen = Weights(Path(settings.weights), settings.weights_sha256)
    if normalization == CHECKPOINT_NORMALIZATION:  # the checkpoint is read: its plans are known before planning
        planner = (normalised_like(planner, facts, chosen.path) if facts is not None  # pretrained: read already
                   else normalised_like_weights(planner, spec.model, chosen.path))
        spec = RunSpec.of(entry, model, pretrained, fold, recipe=recipe, seed=seed, fraction=fraction,
                          plans=check_planner(entry, planner))
    planned_around = _planned_around(spec, chosen) if by_file else None
    planned_cases = _training_cases(entry, spec, paths)
    check_task_fits(entry, paths, planner)  # before the run's claim: plan_task checks again for other callers
    folder = spec.folder(paths.results)
    with claims.exclusive(paths.claims, spec.job_id, f"run {folder}"):
        existing = RunManifest.load(folder)
        tiles_stem = spec.init == "pretrained" and len(entry.channels) > 1
        action = _decide(folder, existing, settings, resolved, resume, overwrite, tiles_stem)
        if action == "finished":
            say(f"Run already finished with these settings: {folder}")
            return RunResult(spec, folder, existing)
        if action == "resume":
            _check_same_training_cases(folder, existing, planned_cases)
        register_with_nnunet()
        if compile is not None:
            os.environ["nnUNet_compile"] = "1" if compile else "0"
        plan = plan_task(entry, paths=paths, num_processes=plan_processes, planner=planner)
        cases = verify_preprocessed(entry.nnunet_name, paths, spec.plans, task=entry.key)
        if action == "new" and settings.weights is not None and backbones.get(spec.model).shapes_from_plans:
            check_weights_fit(Path(settings.weights), spec.model, len(entry.channels), len(entry.labels),
                              configuration_of(plan))
        if action == "resume":
            existing.event("continue_requested", request=request or {})
            existing.save()
        else:
            records = {"preprocessed": cases.as_dict(), "rng_seed": spec.identity.rng_seed,
                       **fidelity_records(entry, spec, plan, paths, facts)}
            if planned_around is not None:
                records["planned_around"] = planned_around
            _warn_normalization(records["normalization"], entry, say, settings.weights_sha256 or settings.weights)
            _new_run(spec, folder, existing, settings, resolved, request or {}, records)
        say(f"Run folder: {folder}")
        try:
            run_training(entry.nnunet_name, CONFIGURATION, spec.fold, spec.trainer, spec.plans, num_gpus=num_gpus,
                         continue_training=action == "resume", device=torch.device(device))
        except BaseException as error:
            record_failure(folder, error)
            raise
    return RunResult(spec, folder, RunManifest.load(folder))


def _planner(model: str, pretrained: bool, plans: str, weights: str | Path | None) -> str:
    """The planner a run trains on; for `--plans checkpoint` the one around its nnssl checkpoint's network, read and
    checked here, before anything is planned or written."""
    from segbook.backbones import planner_for
    from segbook.checkpoint_plans import CHECKPOINT_PLANS, planner_for_weights

    if plans != CHECKPOINT_PLANS:
        return planner_for(model, plans)
    return planner_for_weights(model, weights)  # a scratch run too: the file decides its network, nothing loaded


def run_planner(model: str, pretrained: bool, plans: str, normalization: str, weights: str | Path | None,
                paths: Paths, say: Callable[[str], None] = print) -> str:
    """The planner (a `PLANNERS` key) whose plans identifier names the folder of the run `finetune` trains with
    these options; `segbook evaluate` asks it, so `--task/--model` finds runs on checkpoint plans or checkpoint
    normalisation too. The checkpoint's network or normalisation is read, no weights loaded, nothing written."""
    from segbook.checkpoint_normalization import CHECKPOINT_NORMALIZATION

    planner = _planner(model, pretrained, plans, weights)
    _check_normalization(normalization)
    if normalization != CHECKPOINT_NORMALIZATION:
        return planner
    return normalised_like_weights(planner, model, resolve_weights(model, weights, paths, say).path)


def normalised_like_weights(planner: str, model: str, weights: str | Path | None) -> str:
    """`planner` normalising as `model`'s checkpoint `weights` was pretrained, its facts read (no weights loaded)
    before anything is planned; SegbookError when no file is given or it cannot be read."""
    from segbook.backbones.models import checkpoint_facts
    from segbook.checkpoint_normalization import CHECKPOINT_NORMALIZATION
    from stunet import CheckpointError

    if weights is None:
        raise SegbookError(f"--normalization {CHECKPOINT_NORMALIZATION} needs the checkpoint: pass --weights FILE")
    try:
        facts = checkpoint_facts(backbones.get(model), weights)
    except CheckpointError as error:
        raise SegbookError(f"--normalization {CHECKPOINT_NORMALIZATION}: {error}") from None
    return normalised_like(planner, facts, weights)


def normalised_like(planner: str, facts: "CheckpointFacts", weights: str | Path) -> str:
    """`planner` normalising as the checkpoint `weights` (whose facts are `facts`) was pretrained; one place for
    `finetune`, `run_planner` and `segbook plan`, so planning, training and evaluation derive the same identifier."""
    from segbook.checkpoint_normalization import pretraining_schemes, register

    return register(planner, *pretraining_schemes(facts.pretraining, weights))


def _planned_around(spec: RunSpec, chosen: Weights) -> dict[str, Any]:
    """run.json's `planned_around` of a `--plans checkpoint` or `--normalization checkpoint` run: the file whose
    network the task was planned around or whose pretraining normalisation it was preprocessed with, its SHA-256 and
    the plans identifier, the same for the scratch and the pretrained run of one file (so results pair them). A
    scratch run reads only what the file says of itself: no weights are loaded."""
    return {"checkpoint": str(chosen.path), "sha256": chosen.sha256, "plans": spec.plans,
            "weights_loaded": spec.init == "pretrained"}


def _check_normalization(normalization: str) -> None:
    """A scratch run may take the checkpoint's normalisation too (the file then only normalises it, nothing is
    loaded): its Delta(PT) partner must see the pretrained run's preprocessing."""
    from segbook.checkpoint_normalization import NORMALIZATIONS

    if normalization not in NORMALIZATIONS:
        raise SegbookError(f"unknown normalization {normalization!r}; choose one of {', '.join(NORMALIZATIONS)}")


def _training_cases(entry: "DatasetEntry", spec: RunSpec, paths: Paths) -> list[str] | None:
    """The cases a fold-'all' run will train on (its fraction of the train split), checked before anything is
    written: a split too small for a fraction is refused here. None for a fold, whose training part the trainer
    takes from nnU-Net's splits file (and checks there)."""
    from segbook.data.folders import raw_folder
    from segbook.data.subsets import training_subset
    from segbook.data.split import train_case_ids

    if spec.fold != "all" and spec.fraction == 1:
        return None
    subset = training_subset(train_case_ids(raw_folder(entry, paths)), spec.fraction)
    return list(subset.cases) if spec.fold == "all" else None


def _check_same_training_cases(folder: Path, existing: RunManifest, planned: list[str] | None) -> None:
    """A run resumes on the cases it started on (`training_cases` in run.json), or not at all."""
    recorded = (existing.data.get("training_cases") or {}).get("cases")
    if planned is not None and recorded is not None and recorded != planned:
        raise RunExistsError(f"{folder} started training on {len(recorded)} case(s) and would now train on "
                             f"{len(planned)}, not the same ones (the train split changed since it started): "
                             "resuming would mix two training sets; pass --overwrite to start it again")


def _with_weights(entry: "DatasetEntry", spec: RunSpec, settings: TrainingSettings, weights: str | Path | None,
                  paths: Paths, say: Callable[[str], None]) -> tuple[TrainingSettings, "CheckpointFacts | None"]:
    """Resolve a pretrained run's checkpoint, fingerprint it, check it fits the task's network and read what it
    says of itself: the stem tiling becomes its format's rule unless the settings name one, so run.json records
    the rule applied, and what of the file was ignored is said as a warning."""
    given = weights or settings.weights
    if spec.init != "pretrained":
        if given is not None:
            raise SegbookError("--weights is for fine-tuning: add --pretrained, or leave --weights out to train from "
                               "scratch (a scratch run takes it only with --plans checkpoint or --normalization "
                               "checkpoint, which plan or normalise the run by it)")
        return settings, None
    weights = resolve_weights(spec.model, given, paths, say)
    backbone = backbones.get(spec.model)
    if backbone.shapes_from_plans:  # the whole fit is checked once the task is planned; the file is read now
        from segbook.backbones.models import checkpoint_facts
        from stunet import CheckpointError

        try:
            facts = checkpoint_facts(backbone, weights.path)
        except CheckpointError as error:
            raise SegbookError(str(error)) from None
    else:
        facts = check_weights_fit(weights.path, spec.model, len(entry.channels), len(entry.labels))
    for warning in facts.warnings:
        say(f"segbook: warning: {warning}")
    return replace(settings, weights=str(weights.path), weights_sha256=weights.sha256,
                   stem_tiling=settings.stem_tiling or facts.stem_tiling), facts


def configuration_of(plan: "PlanResult") -> Any:
    """nnU-Net's ConfigurationManager of a task's plans: what a backbone is built from."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(str(plan.plans_file)).get_configuration(CONFIGURATION)


def fidelity_records(entry: "DatasetEntry", spec: RunSpec, plan: "PlanResult", paths: Paths,
                     facts: "CheckpointFacts | None") -> dict[str, Any]:
    """What `run.json` keeps of how the run differs from the authors' (docs/fidelity.md): the plans beside theirs,
    the test split left out, and the normalisation of pretraining (as the checkpoint says, `facts`: its plan, or
    its backbone's catalogue entry; null where neither says) and of fine-tuning (the plans')."""
    from segbook.data.folders import raw_folder
    from segbook.data.split import read_split
    from segbook.training.trainer_parts.record import normalization_record

    split = read_split(raw_folder(entry, paths))
    normalization = normalization_record(plan.normalization, plan.spacing, plan.plans_identifier, spec.init,
                                         facts.pretraining if facts is not None else None)
    return {"plans_comparison": plan.comparison, "split": None if split is None else split.record(),
            "normalization": normalization}


#: (checkpoint, dataset, task's schemes) whose normalisation mismatch this process has said: a loop of fine-tunes
#: (seeds, folds, fractions, a Python script's study) says it once; each run's `run.json` records it regardless.
_SAID_NORMALIZATION: set[tuple[str, str, tuple[str, ...]]] = set()


def _warn_normalization(normalization: dict[str, Any], entry: "DatasetEntry", say: Callable[[str], None],
                        checkpoint: str | None = None) -> None:
    """One line where the task is normalised otherwise than the checkpoint's pretraining was (a CT task's
    CTNormalization against a z-score pretraining): the pretrained filters then see other intensities. The
    pretraining's single scheme stands for every channel, as its stem is tiled over them. Said once per process
    for a checkpoint (`checkpoint`: its SHA-256, or path) and dataset; `run.json` keeps the record of every run."""
    pretraining = normalization.get("pretraining") or {}
    schemes, task = pretraining.get("schemes"), normalization["fine_tuning"]["schemes"]
    if not schemes or not task:
        return
    differing = [f"{channel} {scheme}" for index, (channel, scheme) in enumerate(zip(entry.channels, task))
                 if scheme != schemes[min(index, len(schemes) - 1)]]
    said = (checkpoint or str(pretraining.get("checkpoint")), entry.key, tuple(task))
    if differing and said not in _SAID_NORMALIZATION:
        _SAID_NORMALIZATION.add(said)
        say(f"segbook: warning: {entry.key} is normalised per its plans ({', '.join(differing)}), but "
            f"{pretraining.get('checkpoint')} was pretrained on {', '.join(dict.fromkeys(schemes))}; fine-tuning "
            "keeps the task's (run.json: normalization): pass --normalization checkpoint to preprocess the task as "
            "it was pretrained")


def _decide(folder: Path, existing: RunManifest | None, settings: TrainingSettings, recipe: "Recipe", resume: bool,
            overwrite: bool, tiles_stem: bool) -> str:
    """"new" (start, replacing what is there), "resume" or "finished"; RunExistsError when the call contradicts
    the run in the folder. The stem tiling counts only where it is applied (`tiles_stem`: a pretrained run of a
    multi-channel task), and not on a resume, which never applies the pretrained weights again."""
    if existing is None or overwrite:
        return "new"
    differences = {**existing.settings.differences(settings), **recipe_differences(existing.recipe, recipe)}
    if not tiles_stem or (resume and existing.status != "finished" and has_resumable_checkpoint(folder)):
        differences.pop("stem_tiling", None)
    if existing.status == "finished":
        if differences:
            raise RunExistsError(f"{folder} already finished with other settings ({_listing(differences)}); "
                                 "pass --overwrite to train it again with yours, or keep it and train yours in "
                                 "another results folder")
        return "finished"
    if not has_resumable_checkpoint(folder):
        return "new"  # nothing to resume: starting again loses nothing
    epochs = len(existing.data.get("epochs", []))
    if not resume:
        raise RunExistsError(f"a run already exists in {folder} (status {existing.status}, {epochs} epoch(s) "
                             "recorded): pass --continue to resume it from its latest checkpoint, or --overwrite "
                             "to start again")
    if differences:
        raise RunExistsError(f"{folder} resumes with the settings it started with, and yours differ "
                             f"({_listing(differences)}); leave them out to resume it, or pass --overwrite to start "
                             "again with yours")
    return "resume"


def _listing(differences: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{name}: run {old!r}, asked {new!r}" for name, (old, new) in differences.items())


def _new_run(spec: RunSpec, folder: Path, existing: RunManifest | None, settings: TrainingSettings,
             recipe: "Recipe", request: dict[str, Any], records: dict[str, Any]) -> None:
    if existing is not None:  # overwritten, or never got as far as a checkpoint: keep what happened to it
        request = {**request, "previous_attempt": {k: existing.data.get(k) for k in ("status", "error", "events")}}
    if folder.exists():
        shutil.rmtree(folder)
    manifest = RunManifest.create(folder, identity_fields(spec), settings, request, recipe)
    manifest.data.update(records)
    folder.mkdir(parents=True, exist_ok=True)
    manifest.save()
