"""nnU-Net trainers for SegBook runs: subclasses that override nnU-Net's hooks, never its training loop.

Every run trains with its own class, made on demand from its name (`trainer_class`): nnU-Net finds trainers by class
name and names the run folder after it, so the name carries the run's identity (model, initialisation, recipe,
seed, training fraction: `SegbookTrainer_large_pretrained_llrd_seed1_frac25`, `segbook.runs.Identity`), and the
classes of one family differ only in `identity` (and their backbone's builder). What a run trains, at which rates,
on which schedule and for how long is its recipe's (`segbook.recipes`), read with its settings from `run.json`.

- `SegbookTrainer`: what every run needs. Its hook overrides are thin; each job is a part of its own
  (`segbook.training.trainer_parts`): the run record, stopping at an iteration boundary and resuming there, the
  checkpoint, seeding, the recipe's optimiser groups, the data guard, precision, DDP on the CPU, the log.
  A backbone that is nnU-Net's own network of the plans trains with it as it is.
- `BackboneTrainer`: a network of `segbook.backbones` on the dataset's own plans, split into the parts recipes
  address; fine-tuning loads its pretrained body (fresh heads) by the registry's strict loader, and LoRA's adapters
  are added, then merged before the final checkpoint.
- `STUNetTrainer`: STU-Net, with five strides from the plans and its deep-supervision scales.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from segbook import backbones
from segbook.backbones.models import build, checkpoint_facts, load_into
from segbook.paths import Paths
from segbook.processes import exit_with_parent
from segbook.runs import RESUMABLE_CHECKPOINTS, Identity, has_resumable_checkpoint, resolve_weights
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.lora import add_lora, has_lora, merge_lora
from segbook.training.trainer_parts import checkpointing, distributed, progress
from segbook.training.trainer_parts.data import DataGuard
from segbook.training.trainer_parts.distributed import unwrap
from segbook.training.trainer_parts.optimiser import OptimiserGroups
from segbook.training.trainer_parts.precision import Precision
from segbook.training.trainer_parts.record import RunRecorder, normalization_record, plans_summary
from segbook.training.trainer_parts.seeding import RunSeeding
from segbook.training.trainer_parts.stopping import LATEST_CHECKPOINT, BoundaryStop
from stunet import describe_network, strides_from_plans


class SegbookTrainer(nnUNetTrainer):
    """nnU-Net's trainer for every SegBook run: its settings and recipe from `run.json`, and at each hook the part
    that owns the job (`segbook.training.trainer_parts`), made here."""

    identity: ClassVar[Identity] = Identity("nnunet", "scratch")

    @property
    def model(self) -> str:
        return self.identity.model

    @property
    def init(self) -> str:
        return self.identity.init

    def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        exit_with_parent()  # nnU-Net's augmentation workers must not outlive a killed trainer
        self.resume_requested = bool(plans.get("continue_training", False))
        super().__init__(plans, configuration, fold, dataset_json, device)
        distributed.keep_device(self, device)
        self.run_record = RunRecorder.open(Path(self.output_folder), writes=self.local_rank == 0)
        self.settings = self.run_record.manifest.settings.validate()  # run.json is a file on disk: never trust it
        self.recipe = self.run_record.manifest.recipe
        self._apply_recipe()
        self.seeding = RunSeeding(self.identity.rng_seed, self.local_rank)
        self.seeding.seed_generators()  # before the network is built: its fresh weights are the seed's
        self.precision = Precision(self.settings.mixed_precision, self.settings.channels_last, self.device)
        if self.precision.set_cuda_autocast():  # bf16 on CUDA: no loss scaling
            self.grad_scaler = None
        self.optimiser_groups = OptimiserGroups(self.recipe, self.num_epochs)
        #: What the checkpoint loaded says of its pretraining normalisation, where it was read (`run.json`).
        self.pretraining_normalization: dict[str, Any] | None = None
        self.boundary = BoundaryStop(self.num_iterations_per_epoch, self.is_ddp, self.device, self.run_record,
                                     self._save_latest, self.print_to_log_file)
        self.data_guard = DataGuard(self.run_record, self.print_to_log_file, dataset=self.plans_manager.dataset_name,
                                    plans=self.plans_manager.plans_name, fold=self.fold,
                                    fraction=self.identity.fraction, folder=self.output_folder)

    def _apply_recipe(self) -> None:
        """The recipe's budget and optimiser, and the settings' validation and checkpoints, where nnU-Net reads
        them."""
        self.recipe.check_fits(self.model, self.init, 2 if self.is_ddp else 1)
        self.num_epochs = self.recipe.budget.epochs
        self.num_iterations_per_epoch = self.recipe.budget.iterations_per_epoch
        self.num_val_iterations_per_epoch = self.settings.val_iterations_per_epoch
        self.initial_lr = self.recipe.optimizer.lr
        self.weight_decay = self.recipe.optimizer.weight_decay
        self.save_every = self.settings.checkpoint_every

    # --- the network and its optimiser --------------------------------------------------------------------------
    def group_of(self, name: str, parameter: nn.Parameter) -> str | None:
        """The recipe group a parameter trains in; None when the recipe freezes it. nnU-Net's own network trains
        with one rate for all (`Recipe.check_fits` refuses recipes that would need its parts named)."""
        return "all"

    def prepare_network(self) -> None:
        """Hook for what changes the network before the optimiser sees its parameters (pretrained weights, LoRA)."""

    def configure_optimizers(self):
        """Called by nnU-Net's `initialize` once the network is built, before DDP wraps it: the last moment to
        change which parameters exist and train."""
        self.prepare_network()
        optimizer, schedule = self.optimiser_groups.build(unwrap(self.network), self.group_of)
        self.run_record.note("parameters", self.optimiser_groups.parameter_counts(unwrap(self.network)))
        return optimizer, schedule

    def learning_rates(self) -> dict[str, float]:
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    def initialize(self):
        if self.is_ddp and self.device.type != "cuda":
            distributed.initialize_on_cpu(self, super().initialize)
        else:
            super().initialize()
        self.precision.lay_out_network(self.network)
        configuration = self.configuration_manager
        self.run_record.normalization(normalization_record(
            configuration.normalization_schemes, configuration.spacing, self.plans_manager.plans_name, self.init,
            self.pretraining_normalization))

    def get_dataloaders(self):
        """nnU-Net's loaders, with augmentation workers seeded from the run's seed (`trainer_parts.seeding`)."""
        with self.seeding.seeded_workers():
            return super().get_dataloaders()

    def do_split(self):
        """nnU-Net's split (written first when missing), then the run's fraction of its training cases."""
        self.data_guard.write_splits(Path(self.preprocessed_dataset_folder_base),
                                     Path(self.preprocessed_dataset_folder))
        return self.data_guard.training_subset(*super().do_split())

    # --- nnU-Net's loop -----------------------------------------------------------------------------------------
    def on_train_start(self):
        self.data_guard.check_preprocessed()
        super().on_train_start()
        progress.throttle_plot(self.logger, lambda: (self.current_epoch, self.num_epochs))
        self.run_record.training_started(self.device, self.precision.effective(),
                                         plans_summary(self.configuration_manager, self.batch_size,
                                                       self.num_input_channels))
        self.boundary.install()

    def on_epoch_start(self):
        self.boundary.epoch_started()
        super().on_epoch_start()

    def on_train_epoch_start(self):
        """The epoch's rates and log lines (nnU-Net's), then, for an epoch resumed mid-way, only the training
        iterations it has left (nnU-Net's loop reads the count after this hook)."""
        super().on_train_epoch_start()
        left = self.boundary.training_started(self.current_epoch)
        if left is not None:
            self.num_iterations_per_epoch = left
            self.print_to_log_file(f"resuming epoch {self.current_epoch} after {len(self.boundary.losses)} of "
                                   f"{self.boundary.budget} training iterations")

    def train_step(self, batch: dict) -> dict:
        batch = self.precision.lay_out_batch(batch)
        with self.precision.cpu_autocast(), self.optimiser_groups.clipping():
            outputs = super().train_step(batch)
        self.boundary.trained(float(outputs["loss"]))
        self.boundary.at_boundary(self.current_epoch)
        return outputs

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """nnU-Net's epoch loss, over every training iteration of the epoch (those before a stop included)."""
        self.num_iterations_per_epoch = self.boundary.budget
        super().on_train_epoch_end([{"loss": np.asarray(loss, dtype=np.float32)} for loss in self.boundary.losses])

    def validation_step(self, batch: dict) -> dict:
        with self.precision.cpu_autocast():
            outputs = super().validation_step(batch)
        self.boundary.at_boundary(self.current_epoch)
        return outputs

    def on_epoch_end(self):
        epoch, rates = self.current_epoch, self.learning_rates()
        self.data_guard.check_unchanged()
        # Recorded before nnU-Net saves this epoch's checkpoint: a run killed in between has a record its checkpoint
        # lacks, which a resume drops and trains again, never a checkpoint without a record. nnU-Net splits the
        # configuration's batch among the DDP ranks: it is the global batch.
        self.run_record.epoch_ended(epoch, self.logger, rates, self.boundary.seconds(),
                                    self.configuration_manager.batch_size * len(self.boundary.losses), self.device,
                                    distributed.world_size(self.is_ddp))
        super().on_epoch_end()
        if self.local_rank == 0:
            self.print_to_log_file(progress.epoch_line(epoch, self.num_epochs, rates,
                                                       self.run_record.recent_epochs(10)), add_timestamp=False)

    def on_train_end(self):
        super().on_train_end()
        self.run_record.finished()

    def run_training(self):
        try:
            super().run_training()
        except BaseException as error:
            self.run_record.ended(error)
            self._stop_data_loaders()
            raise
        finally:
            self.boundary.restore()
        self.boundary.act_on_late_signal()

    def _stop_data_loaders(self) -> None:
        """Shut nnU-Net's augmentation down as its `on_train_end` does (quietly): a run stopped midway would leave
        its workers to be killed at exit, under a results thread that prints a traceback when they die."""
        for loader in (self.dataloader_train, self.dataloader_val):
            if hasattr(loader, "_finish"):  # the multi-process augmenters
                with contextlib.redirect_stdout(io.StringIO()):
                    loader._finish()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all":
            # With fold 'all' nnU-Net would "validate" on the training cases; SegBook evaluates on the held-out
            # test split instead (`segbook evaluate`).
            self.print_to_log_file("fold 'all': skipping validation on the training cases; "
                                   "run `segbook evaluate` for the held-out test split")
            return
        super().perform_actual_validation(save_probabilities)

    # --- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically, mid-epoch with where the epoch stands
        (`trainer_parts.checkpointing`); where a resumable one stands goes into run.json."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # nothing, or nnU-Net's note that checkpointing is off
            return
        position = self.boundary.saving
        checkpointing.write(self, filename, position)
        if os.path.basename(filename) in RESUMABLE_CHECKPOINTS:
            self.run_record.checkpoint_saved(os.path.basename(filename), self.current_epoch + (0 if position else 1),
                                             position["iteration"] if position else 0)

    def _save_latest(self) -> None:
        self.save_checkpoint(os.path.join(self.output_folder, LATEST_CHECKPOINT))

    def load_checkpoint(self, filename_or_checkpoint):
        """nnU-Net's checkpoint loading, from a dictionary read safely; before training, a resume (mid-epoch where
        the checkpoint says so), otherwise a reload of the best weights."""
        resuming = self.dataloader_train is None
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            read_run_checkpoint(filename_or_checkpoint, map_location=self.device)
        checkpointing.restore(self, checkpoint)
        if not resuming:
            return
        position = checkpoint.get("segbook_position")
        if position is not None:
            self.boundary.resume(position, self.current_epoch, self.logger)
        self.run_record.resumed(self.current_epoch, position["iteration"] if position else None)


class BackboneTrainer(SegbookTrainer):
    """A backbone of `segbook.backbones` on the dataset's own plans: built by its family's builder, split into the
    parts recipes address, and, for fine-tuning, initialised from a checkpoint by the registry's strict loader."""

    @property
    def backbone(self) -> backbones.Backbone:
        return backbones.get(self.model)

    def __init__(self, plans: dict, configuration: str, fold: int | str, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        if not self.backbone.deep_supervision:
            self.enable_deep_supervision = False
        if self.recipe.drop_path_rate is not None:  # training's network only: the predictor's needs no drop-path
            self.build_network_architecture = functools.partial(type(self).build_network_architecture,
                                                                drop_path_rate=self.recipe.drop_path_rate)

    def set_deep_supervision_enabled(self, enabled: bool):
        """nnU-Net switches `network.decoder.deep_supervision`; a backbone with one output has nothing to switch."""
        if self.backbone.deep_supervision:
            super().set_deep_supervision_enabled(enabled)

    def group_of(self, name: str, parameter: nn.Parameter) -> str | None:
        if self.recipe.lora is not None:  # add_lora has frozen all but the adapters and the heads
            return "all" if parameter.requires_grad else None
        parts = self.backbone.parts
        return "all" if parts is None else self.recipe.group_of(*parts.part_of(name))

    def prepare_network(self) -> None:
        """The pretrained body (never over a checkpoint a resume will load), then LoRA's adapters: a resumed LoRA
        run's checkpoint holds the adapted network."""
        if self.init == "pretrained" and not (self.resume_requested and has_resumable_checkpoint(self.output_folder)):
            self._load_pretrained_body()
        lora = self.recipe.lora
        if lora is not None:
            report = add_lora(unwrap(self.network), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                              exclude_prefixes=self.backbone.parts.heads)
            self.print_to_log_file(f"LoRA (rank {lora.rank}) on {len(report.adapted)} convolutions; "
                                   f"{report.trainable_parameters:,} parameters train, "
                                   f"{report.frozen_parameters:,} frozen")

    def on_train_end(self):
        """Merge LoRA's adapters into plain weights before nnU-Net writes the final checkpoint, so its predictor
        (and `segbook evaluate`) load it into the plain network."""
        if has_lora(unwrap(self.network)):
            merge_lora(unwrap(self.network))
            self.run_record.event("lora_merged")
        super().on_train_end()

    def _load_pretrained_body(self) -> None:
        path = self.settings.weights or str(resolve_weights(self.model, None, Paths.from_env(),
                                                                 self.print_to_log_file).path)
        report = load_into(unwrap(self.network), self.backbone, path, tiling=self.settings.stem_tiling)
        if self.settings.stem_tiling is None or self.run_record.recorded("normalization") is None:
            # a run nnU-Net's tools started: record the format's rule it applied and what the file says
            facts = checkpoint_facts(self.backbone, path)
            self.pretraining_normalization = facts.pretraining
            for warning in facts.warnings:
                self.print_to_log_file(f"warning: {warning}")
            if self.settings.stem_tiling is None:
                self.settings = replace(self.settings, stem_tiling=facts.stem_tiling)
                self.run_record.resolved_setting("stem_tiling", self.settings.stem_tiling)
        self.print_to_log_file(f"loaded {len(report.loaded)} pretrained tensors from {path}; "
                               f"fresh heads: {len(report.skipped_heads)} tensors; tiled: {report.tiled or 'none'}; "
                               f"adapted: {report.adapted or 'none'}")
        self.run_record.event("pretrained_weights_loaded", path=path, tiled=report.tiled, adapted=report.adapted)


class STUNetTrainer(BackboneTrainer):
    """STU-Net on the dataset's own plans: patch, spacing, batch size and normalisation from nnU-Net, five strides."""

    @staticmethod
    def stunet_strides(configuration_manager) -> list[list[int]]:
        return strides_from_plans(configuration_manager.pool_op_kernel_sizes)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        strides = self.stunet_strides(self.configuration_manager)
        cumulative = np.cumprod(np.vstack([[1] * len(strides[0])] + strides), axis=0)
        return [list(1 / s) for s in cumulative[:-1]]

    def print_plans(self):
        """nnU-Net prints the plans' network (its plain U-Net) with the configuration: show STU-Net's instead."""
        if self.local_rank != 0:
            return
        configuration = {**self.plans_manager.plans["configurations"][self.configuration_name]}
        configuration["architecture"] = describe_network(self.model, unwrap(self.network))
        self.print_to_log_file(f"\nThis is the configuration used by this training:\nConfiguration name: "
                               f"{self.configuration_name}\n{configuration}\n", add_timestamp=False)


def _backbone_builder(model: str):
    """nnU-Net's `build_network_architecture` hook for a backbone (also what its predictor calls)."""
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True,
                                   drop_path_rate: float | None = None) -> nn.Module:
        return build(backbones.get(model), configuration_manager, num_input_channels, num_output_channels,
                     enable_deep_supervision, drop_path_rate)

    return build_network_architecture


@functools.cache
def trainer_class(name: str) -> type[SegbookTrainer]:
    """The trainer class a segbook trainer name spells (`SegbookTrainer_large_pretrained_llrd`), made on first use.

    nnU-Net finds trainers by class name, and a run's folder is named after its trainer, so every identity (model,
    initialisation, recipe, seed, fraction) has its own class; they differ only in `identity` (and STU-Net's
    builder). `KeyError` for a name that is no segbook trainer's.
    """
    identity = Identity.from_trainer(name)
    if identity is None:
        raise KeyError(name)
    attributes: dict[str, Any] = {"identity": identity, "__module__": __name__, "__qualname__": name}
    backbone = backbones.get(identity.model)
    if backbone.build is None and backbone.parts is None and not backbone.pretrainable:
        return type(name, (SegbookTrainer,), attributes)  # nnU-Net's own network of the plans, as nnU-Net trains it
    attributes["build_network_architecture"] = staticmethod(_backbone_builder(identity.model))
    return type(name, (backbones.resolve(backbone.trainer) if backbone.trainer else BackboneTrainer,), attributes)


def __getattr__(name: str) -> type[SegbookTrainer]:
    """Importable (and picklable) as `segbook.training.trainers.SegbookTrainer_large_pretrained`, for every name."""
    try:
        return trainer_class(name)
    except KeyError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


#: The folder nnU-Net searches for our trainers when `nnUNet_extTrainer` points at it.
EXTERNAL_TRAINER_FOLDER = Path(__file__).resolve().parent / "nnunet_trainers"


def register_with_nnunet() -> None:
    """Let nnU-Net's own lookup (training, prediction, `nnUNetv2_*` tools) find the segbook trainers."""
    folders = [p for p in os.environ.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(EXTERNAL_TRAINER_FOLDER) not in folders:
        os.environ["nnUNet_extTrainer"] = os.pathsep.join([*folders, str(EXTERNAL_TRAINER_FOLDER)])
