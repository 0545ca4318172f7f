"""`finetune()`: train one (task, model, initialisation, fold) run on nnU-Net v2, recorded in its `run.json`."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.training.manifest import RunManifest, TrainingSettings
from segbook.training.runs import CONFIGURATION, RunSpec

if TYPE_CHECKING:
    from segbook.registry import DatasetEntry


class RunExistsError(SegbookError):
    """A run folder already holds a run that this call would overwrite."""


@dataclass
class RunResult:
    spec: RunSpec
    folder: Path
    manifest: RunManifest

    @property
    def status(self) -> str:
        return self.manifest.status


def run_spec(entry: "DatasetEntry", model: str, pretrained: bool, fold: str | int = "all") -> RunSpec:
    try:
        return RunSpec(entry.key, entry.nnunet_name, model, "pretrained" if pretrained else "scratch", str(fold))
    except ValueError as error:
        raise SegbookError(str(error)) from None


def finetune(entry: "DatasetEntry", model: str, pretrained: bool, fold: str | int = "all", *,
             settings: TrainingSettings | None = None, weights: str | Path | None = None, device: str = "cuda",
             num_gpus: int = 1, resume: bool = False, overwrite: bool = False, compile: bool | None = None,
             paths: Paths | None = None, plan_processes: int | None = None,
             request: dict[str, Any] | None = None) -> RunResult:
    """Train one run with nnU-Net's training loop; fine-tuning and scratch differ only in initialisation.

    Plans the task first if needed. `resume` continues from the run's latest checkpoint (the pretrained weights
    are never applied over it). A run that already exists is an error unless `resume` or `overwrite` is given.
    """
    import os

    import torch
    from nnunetv2.run.run_training import run_training

    from segbook.plan import plan_task
    from segbook.training.trainers import register_with_nnunet

    paths = paths or Paths.from_env()
    paths.export()
    register_with_nnunet()
    if compile is not None:
        os.environ["nnUNet_compile"] = "1" if compile else "0"
    spec = run_spec(entry, model, pretrained, fold)
    plan_task(entry, paths=paths, num_processes=plan_processes)

    folder = spec.folder(paths.results)
    manifest = _prepare_manifest(spec, folder, settings or TrainingSettings(), weights, paths, resume, overwrite,
                                 request or {})
    if manifest.status == "finished":
        print(f"Run already finished: {folder}")
        return RunResult(spec, folder, manifest)
    print(f"Run folder: {folder}")
    try:
        run_training(str(entry.dataset_id), CONFIGURATION, spec.fold, spec.trainer, spec.plans, num_gpus=num_gpus,
                     continue_training=resume, device=torch.device(device))
    except BaseException as error:
        _record_failure(folder, error)
        raise
    return RunResult(spec, folder, RunManifest.load(folder))


def _prepare_manifest(spec: RunSpec, folder: Path, settings: TrainingSettings, weights: str | Path | None,
                      paths: Paths, resume: bool, overwrite: bool, request: dict[str, Any]) -> RunManifest:
    existing = RunManifest.load(folder)
    if existing is not None and overwrite:
        shutil.rmtree(folder)
        existing = None
    if existing is not None:
        if not resume and existing.status != "finished":
            epochs = len(existing.data.get("epochs", []))
            raise RunExistsError(f"a run already exists in {folder} (status {existing.status}, {epochs} epoch(s) "
                                 f"recorded): pass --continue to resume it or --overwrite to start again")
        if resume and existing.status != "finished":
            existing.event("continue_requested", request=request)
            existing.save()
        return existing
    if spec.init == "pretrained":
        settings = _with_weights(settings, spec.model, weights, paths)
    run = {"task": spec.task, "dataset": spec.dataset, "model": spec.model, "init": spec.init, "fold": spec.fold,
           "trainer": spec.trainer, "plans": spec.plans, "configuration": CONFIGURATION}
    manifest = RunManifest.create(folder, run, settings, request)
    folder.mkdir(parents=True, exist_ok=True)
    manifest.save()
    return manifest


def _with_weights(settings: TrainingSettings, model: str, weights: str | Path | None,
                  paths: Paths) -> TrainingSettings:
    """Resolve the checkpoint (a given file, else the cached official one) and fingerprint it for the record."""
    from stunet import WeightCache, WeightsError, get_cfg
    from stunet.checkpoints import file_sha256

    local = weights or settings.weights
    try:  # a given file needs no catalogue entry: it may hold a size the authors released no checkpoint of
        path = WeightCache(paths.weights).resolve(None if local else get_cfg(model), local)
    except WeightsError as error:
        raise SegbookError(str(error)) from None
    return replace(settings, weights=str(path.resolve()), weights_sha256=file_sha256(path))


def _record_failure(folder: Path, error: BaseException) -> None:
    """Failures before nnU-Net's loop starts (plans, data) are recorded too; the trainer records its own."""
    manifest = RunManifest.load(folder)
    if manifest is not None and manifest.status not in ("failed", "interrupted"):
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
        manifest.set_status("interrupted" if interrupted else "failed", error)
        manifest.save()
