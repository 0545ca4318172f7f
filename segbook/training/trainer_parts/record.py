"""The run's record as its trainer keeps it: `run.json` (`segbook.training.manifest`), written at every moment
worth recording.

The record exists before training when segbook starts the run (`segbook finetune`, `segbook batch`: they write its
settings into it, for every process that trains the run to read). A run started by nnU-Net's own tools
(`nnUNetv2_train ... -tr SegbookTrainer_...`) has none: the trainer creates it with SegBook's default settings, its
`run` written like every other run's, through `runs.identity_fields`, so `segbook evaluate --run` and the results
find it. That needs the run's task, the registry's key of the dataset: it is looked up by the dataset's id in the
registry (the built-in datasets and the files in SEGBOOK_REGISTRY); a dataset the registry does not know is an error
before anything is recorded (segbook could not plan it, evaluate it nor put it in a table either).

Then, as nnU-Net's hooks come: the normalisation (where segbook did not record it before training: the plans'
and what the checkpoint loaded says of its pretraining), the parameter counts, the training cases and preprocessed
data, what the run computes on and in, its plans and comparability fingerprint (`segbook.fingerprint`), each epoch
with its cost, each resumable checkpoint, events (resumed, stopped at a boundary, pretrained weights loaded, LoRA
merged) and the status at the end. With DDP every rank reads the record and rank 0 alone writes it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segbook import fingerprint
from segbook.backbones import recorded
from segbook.errors import SegbookError
from segbook.io import now
from segbook.registry import TaskLookupError, load_registry
from segbook.runs import RunSpec, identity_fields
from segbook.training.cost import add_epoch
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings


class RunRecorder:
    """A run's `run.json`; `writes`: whether this process writes it (DDP's rank 0, or the only process)."""

    def __init__(self, manifest: RunManifest, writes: bool):
        self.manifest = manifest
        self.writes = writes

    @classmethod
    def open(cls, folder: Path, writes: bool) -> "RunRecorder":
        """The record of the run in `folder`, nnU-Net's output folder; created for a run nnU-Net's tools started."""
        manifest = RunManifest.load(folder)
        if manifest is None:
            manifest = new_record(folder)
            if writes:
                manifest.save()
        return cls(manifest, writes)

    def recorded(self, key: str) -> Any:
        return self.manifest.data.get(key)

    def note(self, key: str, value: Any) -> None:
        """Record `value` under `key`."""
        if self.writes:
            self.manifest.data[key] = value
            self.manifest.save()

    def resolved_setting(self, name: str, value: Any) -> None:
        """A setting recorded as "decided later" (null), now that it is decided: run.json says what was done."""
        if self.writes:
            self.manifest.data["settings"][name] = value
            self.manifest.save()

    def normalization(self, record: dict[str, Any]) -> None:
        """run.json's `normalization` (`normalization_record`) where the run's record lacks it: a run nnU-Net's own
        tools started. `segbook finetune` writes it before training, with what it read of the checkpoint."""
        if self.writes and "normalization" not in self.manifest.data:
            self.note("normalization", record)

    def event(self, name: str, **details: Any) -> None:
        if self.writes:
            self.manifest.event(name, **details)
            self.manifest.save()

    def training_started(self, device: torch.device, precision: str, plans: dict[str, Any]) -> None:
        """What the run computes on and in, its plans and the fingerprint they and its settings give."""
        if not self.writes:
            return
        data = self.manifest.data
        data.setdefault("started_at", now())
        data["device"] = str(device)
        data["precision"] = _joined(precision, data.get("precision"))
        data["cpu"] = cpu_record()
        data["plans_summary"] = plans
        data[fingerprint.KEY] = fingerprint.record(data)
        self._backbone_source()
        self.manifest.set_status("running")
        self.manifest.save()

    def _backbone_source(self) -> None:
        """Where a user's backbone came from (its file and SHA-256, or its entry point), so that the results,
        evaluation and exports find it again without --backbone-file, and notice when it changed."""
        backbone = recorded.record_of(self.manifest.data["run"]["model"])
        if backbone is not None:
            self.manifest.data[recorded.KEY] = backbone

    def epoch_ended(self, epoch: int, logger: Any, rates: dict[str, float], seconds: float, samples: int,
                    device: torch.device, devices: int) -> None:
        """Epoch `epoch` as nnU-Net's logger has it, with its rates and time, and its cost (`samples` trained on
        `devices` devices)."""
        if not self.writes:
            return
        self.manifest.record_epoch({
            "epoch": epoch, "train_loss": float(logger.get_value("train_losses", epoch)),
            "val_loss": float(logger.get_value("val_losses", epoch)),
            "pseudo_dice": [float(v) for v in logger.get_value("dice_per_class_or_region", epoch)],
            "ema_pseudo_dice": float(logger.get_value("ema_fg_dice", epoch)),
            "learning_rates": rates, "seconds": round(seconds, 3)})
        self.manifest.data["cost"] = add_epoch(self.manifest.data.get("cost"), seconds, samples, device, devices)
        self.manifest.save()

    def recent_epochs(self, count: int) -> list[dict[str, Any]]:
        return self.manifest.data["epochs"][-count:]

    def checkpoint_saved(self, file: str, epoch: int, iteration: int) -> None:
        """Where the latest resumable checkpoint stands: the epoch, and iteration in it, a resume starts at."""
        self.note("checkpoint", {"file": file, "saved_at": now(), "epoch": epoch, "iteration": iteration})

    def resumed(self, epoch: int, iteration: int | None) -> None:
        """Forget the epochs from `epoch` on (they are trained again) and say where the resume starts."""
        if self.writes:
            self.manifest.truncate_epochs(epoch)
            self.event("resumed", from_epoch=epoch, **({"from_iteration": iteration} if iteration is not None else {}))

    def finished(self) -> None:
        if self.writes:
            self.manifest.data["finished_at"] = now()
            self.manifest.set_status("finished")
            self.manifest.save()

    def ended(self, error: BaseException) -> None:
        """Training ended by `error`: interrupted (Ctrl-C, a stop signal, SystemExit) or failed."""
        if self.writes:
            interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
            self.manifest.set_status("interrupted" if interrupted else "failed", error)
            self.manifest.save()


def new_record(folder: Path) -> RunManifest:
    """The record of a run nnU-Net's own tools started: its identity from its folder, SegBook's default settings."""
    from segbook.recipes import get_recipe

    spec = nnunet_run(folder)
    settings, recipe = TrainingSettings().resolve(get_recipe(spec.recipe, spec.init))
    manifest = RunManifest.create(folder, identity_fields(spec), settings, {"via": "nnU-Net"}, recipe)
    manifest.data["rng_seed"] = spec.identity.rng_seed
    return manifest


def nnunet_run(folder: Path) -> RunSpec:
    """The run nnU-Net's output folder `.../Dataset{id}_{Name}/{trainer}__{plans}__3d_fullres/fold_{fold}` holds,
    its task looked up by the dataset's id in the registry."""
    try:
        return RunSpec.from_folder(folder, load_registry())
    except TaskLookupError:
        raise SegbookError(
            f"{folder.parent.parent.name} is not in segbook's registry (the built-in datasets and the files in "
            "SEGBOOK_REGISTRY), and a run's record names its task: export SEGBOOK_REGISTRY=FILE, the registry file "
            "that registers it, before `nnUNetv2_train`, or train the run with `segbook finetune --registry FILE`"
        ) from None


def normalization_record(schemes: list[str], spacing: list[float], plans: str, init: str,
                         pretraining: dict[str, Any] | None) -> dict[str, Any]:
    """run.json's `normalization`: the fine-tuning's (the plans' schemes, spacing and identifier) and, for a
    pretrained run, the pretraining's as its checkpoint says (`CheckpointFacts.pretraining`; None: the checkpoint
    says nothing, or none was read). Scratch runs have no pretraining to record."""
    record: dict[str, Any] = {"fine_tuning": {"schemes": list(schemes), "spacing_mm": list(spacing), "plans": plans}}
    if init == "pretrained":
        record["pretraining"] = pretraining
    return record


def plans_summary(configuration: Any, batch_size: int, input_channels: int) -> dict[str, Any]:
    """What the run's plans say of the data (`fingerprint.DATA_KEYS` and the input channels)."""
    return {"patch_size": list(configuration.patch_size), "batch_size": batch_size,
            "spacing": list(configuration.spacing), "normalization": list(configuration.normalization_schemes),
            "plans_strides": [list(s) for s in configuration.pool_op_kernel_sizes], "input_channels": input_channels}


def cpu_record() -> dict[str, Any]:
    """What a CPU run's numbers depend on besides seed, settings and versions (docs/training.md, reproducibility):
    the intra-op threads (the order of floating-point sums follows them) and the SIMD kernels torch dispatches to."""
    return {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}


def _joined(mine: str, earlier: Any) -> str:
    """This attempt's precision joined with what earlier attempts recorded (a resume on another device)."""
    return "+".join(sorted({mine, *(earlier.split("+") if isinstance(earlier, str) and earlier else ())}))
