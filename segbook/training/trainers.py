"""nnU-Net trainers for SegBook runs: subclasses that override nnU-Net's hooks, never its training loop.

`SegbookTrainer` adds what every run needs (settings and a manifest from the run folder, per-group poly LR, atomic
checkpoints, bf16 and channels-last on GPU); `STUNetTrainer` builds STU-Net from the dataset's own plans and, for
fine-tuning, loads the pretrained body with fresh heads at 10x the body's rate. The concrete classes are generated,
one per (model, initialisation): `SegbookTrainer_large_pretrained`, `SegbookTrainer_nnunet_scratch`, ...
"""

from __future__ import annotations

import functools
import os
import random
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch._dynamo import OptimizedModule

from segbook.errors import SegbookError
from segbook.io import now
from segbook.paths import Paths
from segbook.runs import STUNET_MODELS, Identity, has_resumable_checkpoint, resolve_weights
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.manifest import RunManifest
from segbook.training.schedule import RecipeSchedule
from segbook.training.settings import TrainingSettings
from segbook.training.workers import exit_with_parent
from segbook.training.lora import add_lora, has_lora, merge_lora
from stunet import create_stunet, describe_network, strides_from_plans
from stunet.loading import load_pretrained, read_state_dict
from stunet.model import HEADS, PART_PREFIXES, part_of

PLOT_EVERY_EPOCHS = 10  # nnU-Net redraws a large progress.png every epoch: seconds wasted on short epochs


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


class SegbookTrainer(nnUNetTrainer):
    """nnU-Net's trainer with SegBook's settings, run records and per-group learning rates."""

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
        self.manifest = RunManifest.load(self.output_folder) or self._new_manifest()
        self.settings = self.manifest.settings
        self._apply_settings()
        self._epoch_started_at = 0.0
        self._preprocessed_version: str | None = None

    # --- settings -----------------------------------------------------------------------------------------------
    def _new_manifest(self) -> RunManifest:
        """A run started by nnU-Net's own tools (`nnUNetv2_train -tr ...`) gets SegBook's default settings."""
        identity = self.identity
        run = {"dataset": self.plans_manager.dataset_name, "model": identity.model, "init": identity.init,
               "recipe": identity.recipe, "seed": identity.seed, "fraction": identity.fraction,
               "fold": str(self.fold), "trainer": type(self).__name__, "plans": self.plans_manager.plans_name,
               "configuration": self.configuration_name}
        from segbook.recipes import get_recipe

        settings, recipe = TrainingSettings().resolve(get_recipe(identity.recipe, identity.init))
        manifest = RunManifest.create(self.output_folder, run, settings, {"via": "nnU-Net"}, recipe)
        if self.local_rank == 0:
            manifest.save()
        return manifest

    def _apply_settings(self) -> None:
        settings = self.settings.validate()  # run.json is a file on disk: never trust its values
        self.recipe = self.manifest.recipe
        self.recipe.check_fits(self.model, self.init, 2 if self.is_ddp else 1)
        self.num_epochs = self.recipe.budget.epochs
        self.num_iterations_per_epoch = self.recipe.budget.iterations_per_epoch
        self.num_val_iterations_per_epoch = settings.val_iterations_per_epoch
        self.initial_lr = self.recipe.optimizer.lr
        self.weight_decay = self.recipe.optimizer.weight_decay
        self.save_every = settings.checkpoint_every
        random.seed(settings.seed)
        np.random.seed(settings.seed)
        torch.manual_seed(settings.seed)
        if self.device.type == "cuda" and self._use_bf16():
            # nnU-Net autocasts with the device's default dtype; bf16 needs no loss scaling.
            torch.set_autocast_dtype("cuda", torch.bfloat16)
            self.grad_scaler = None

    def _use_bf16(self) -> bool:
        precision = self.settings.mixed_precision
        return precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())

    # --- optimiser: the recipe's groups, rates and phases ---------------------------------------------------------
    def group_of(self, name: str, parameter: nn.Parameter) -> str | None:
        """The recipe group a parameter trains in; None when the recipe freezes it. nnU-Net's own network trains
        with one rate for all (`Recipe.check_fits` refuses recipes that would need its parts named)."""
        return "all"

    def param_groups(self) -> list[dict[str, Any]]:
        """The recipe's groups in its order; frozen parameters stay out of the optimiser and get no gradient."""
        groups: dict[str, list[nn.Parameter]] = {name: [] for name in self.recipe.group_names()}
        for name, parameter in unwrap(self.network).named_parameters():
            group = self.group_of(name, parameter)
            parameter.requires_grad_(group is not None)
            if group is not None:
                groups[group].append(parameter)
        return [{"name": name, "params": params, "lr": self.recipe.initial_rate(name)}
                for name, params in groups.items() if params]

    def prepare_network(self) -> None:
        """Hook for what changes the network before the optimiser sees its parameters (pretrained weights, LoRA)."""

    def configure_optimizers(self):
        """Called by nnU-Net's `initialize` once the network is built, before DDP wraps it: the last moment to
        change which parameters exist and train."""
        self.prepare_network()
        optimizer_settings = self.recipe.optimizer
        groups = self.param_groups()
        if optimizer_settings.kind == "adamw":
            optimizer = torch.optim.AdamW(groups, optimizer_settings.lr, betas=optimizer_settings.betas,
                                          weight_decay=optimizer_settings.weight_decay)
        else:
            optimizer = torch.optim.SGD(groups, optimizer_settings.lr, weight_decay=optimizer_settings.weight_decay,
                                        momentum=optimizer_settings.momentum, nesterov=optimizer_settings.nesterov)
        self._record_parameter_counts(optimizer)
        return optimizer, RecipeSchedule(optimizer, self.recipe, self.num_epochs, self._train_only)

    def _train_only(self, phase) -> None:
        """Give gradients to the groups that train in this phase only (the others also have rate 0)."""
        for group in self.optimizer.param_groups:
            trains = self.recipe.trains_in(phase, group["name"])
            for parameter in group["params"]:
                parameter.requires_grad_(trains)

    def _record_parameter_counts(self, optimizer: torch.optim.Optimizer) -> None:
        trainable = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
        total = sum(p.numel() for p in unwrap(self.network).parameters())
        if self.local_rank == 0:
            self.manifest.data["parameters"] = {"trainable": trainable, "frozen": total - trainable}
            self.manifest.save()

    def learning_rates(self) -> dict[str, float]:
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    # --- hooks --------------------------------------------------------------------------------------------------
    def initialize(self):
        super().initialize()
        if self.settings.channels_last and self.device.type == "cuda":
            self.network.to(memory_format=torch.channels_last_3d)

    def on_train_start(self):
        self._check_preprocessed()
        super().on_train_start()
        self._throttle_progress_plot()
        if self.local_rank == 0:
            self.manifest.data.setdefault("started_at", now())
            self.manifest.data["device"] = str(self.device)
            self.manifest.data.update(self._plans_summary())
            self.manifest.set_status("running")
            self.manifest.save()

    def on_epoch_start(self):
        self._epoch_started_at = time.time()
        super().on_epoch_start()

    def on_epoch_end(self):
        epoch = self.current_epoch
        rates = self.learning_rates()
        self._check_preprocessed_unchanged()
        if self.local_rank == 0:
            # Recorded before nnU-Net saves this epoch's checkpoint: a run killed in between has a record its
            # checkpoint lacks, which a resume drops and trains again, never a checkpoint without a record.
            log = self.logger
            self.manifest.record_epoch({
                "epoch": epoch, "train_loss": float(log.get_value("train_losses", epoch)),
                "val_loss": float(log.get_value("val_losses", epoch)),
                "pseudo_dice": [float(v) for v in log.get_value("dice_per_class_or_region", epoch)],
                "ema_pseudo_dice": float(log.get_value("ema_fg_dice", epoch)),
                "learning_rates": rates, "seconds": round(time.time() - self._epoch_started_at, 3)})
            self.manifest.save()
        super().on_epoch_end()
        if self.local_rank == 0:
            self._print_progress(epoch, rates)

    def _print_progress(self, epoch: int, rates: dict[str, float]) -> None:
        recent = self.manifest.data["epochs"][-10:]
        remaining = (self.num_epochs - epoch - 1) * sum(e["seconds"] for e in recent) / len(recent)
        lr_text = " ".join(f"{name}={rate:.2e}" for name, rate in rates.items())
        self.print_to_log_file(f"[segbook] epoch {epoch + 1}/{self.num_epochs} | train loss "
                               f"{recent[-1]['train_loss']:.3f} | EMA pseudo-Dice {recent[-1]['ema_pseudo_dice']:.3f} "
                               f"| lr {lr_text} | ETA {_duration(remaining)}", add_timestamp=False)

    def train_step(self, batch: dict) -> dict:
        if self.settings.channels_last and self.device.type == "cuda":
            batch = {**batch, "data": batch["data"].to(memory_format=torch.channels_last_3d)}
        return super().train_step(batch)

    def on_train_end(self):
        super().on_train_end()
        if self.local_rank == 0:
            self.manifest.data["finished_at"] = now()
            self.manifest.set_status("finished")
            self.manifest.save()

    def run_training(self):
        try:
            super().run_training()
        except BaseException as error:
            if self.local_rank == 0:
                interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
                self.manifest.set_status("interrupted" if interrupted else "failed", error)
                self.manifest.save()
            raise

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.fold == "all":
            # With fold 'all' nnU-Net would "validate" on the training cases; SegBook evaluates on the held-out
            # test split instead (`segbook evaluate`).
            self.print_to_log_file("fold 'all': skipping validation on the training cases; "
                                   "run `segbook evaluate` for the held-out test split")
            return
        super().perform_actual_validation(save_probabilities)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written to a temporary file and renamed: a kill never leaves a truncated one."""
        partial = f"{filename}.partial"
        super().save_checkpoint(partial)
        if os.path.isfile(partial):
            os.replace(partial, filename)

    def load_checkpoint(self, filename_or_checkpoint):
        """nnU-Net's checkpoint loading, from a dictionary read safely (nnU-Net's own would unpickle the file, and
        ignores a dictionary): weights, optimiser, logs, epoch and best EMA, as nnU-Net restores them."""
        resuming = self.dataloader_train is None  # before training: a resume, not a reload of the best weights
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint if isinstance(filename_or_checkpoint, dict) else \
            read_run_checkpoint(filename_or_checkpoint, map_location=self.device)
        weights = {key.removeprefix("module."): value for key, value in checkpoint["network_weights"].items()}
        unwrap(self.network).load_state_dict(weights)
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint.get("_best_ema")
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        if resuming and self.local_rank == 0:
            self.manifest.truncate_epochs(self.current_epoch)
            self.manifest.event("resumed", from_epoch=self.current_epoch)
            self.manifest.save()

    # --- the data it trains on ----------------------------------------------------------------------------------
    def _check_preprocessed(self) -> None:
        """Refuse to train on preprocessed data that is not exactly the train split (a re-plan killed by an older
        segbook, files deleted by hand), or that changed since this run started; record what it trains on."""
        from segbook.plan import verify_preprocessed

        dataset = self.plans_manager.dataset_name
        cases = verify_preprocessed(dataset, Paths.from_env(), self.plans_manager.plans_name)
        recorded = self.manifest.data.get("preprocessed") or {}
        if recorded.get("version") not in (None, cases.version) or \
                recorded.get("ids_sha256") not in (None, cases.ids_sha256):
            raise SegbookError(f"{dataset} was preprocessed again since this run started (its cases or their "
                               "preprocessing differ); resuming would mix two versions of the data: start the run "
                               "again with --overwrite")
        self._preprocessed_version = cases.version
        if self.local_rank == 0:
            self.manifest.data["preprocessed"] = cases.as_dict()
            self.manifest.save()

    def _check_preprocessed_unchanged(self) -> None:
        from segbook.plan import preprocessed_version

        current = preprocessed_version(self.plans_manager.dataset_name, Paths.from_env(),
                                       self.plans_manager.plans_name)
        if current != self._preprocessed_version:
            raise SegbookError(f"{self.plans_manager.dataset_name} was preprocessed again while this run trained "
                               "(`segbook plan --force`?): it stops rather than mix two versions of the data; "
                               "start it again with --overwrite")

    # --- helpers ------------------------------------------------------------------------------------------------
    def _plans_summary(self) -> dict[str, Any]:
        config = self.configuration_manager
        return {"plans_summary": {"patch_size": list(config.patch_size), "batch_size": self.batch_size,
                                  "spacing": list(config.spacing), "normalization": list(config.normalization_schemes),
                                  "plans_strides": [list(s) for s in config.pool_op_kernel_sizes]}}

    def _throttle_progress_plot(self) -> None:
        draw = self.logger.plot_progress_png

        def occasionally(output_folder: str) -> None:
            if self.current_epoch % PLOT_EVERY_EPOCHS == 0 or self.current_epoch >= self.num_epochs - 1:
                draw(output_folder)

        self.logger.plot_progress_png = occasionally


class STUNetTrainer(SegbookTrainer):
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

    def group_of(self, name: str, parameter: nn.Parameter) -> str | None:
        if self.recipe.lora is not None:  # add_lora has frozen all but the adapters and the heads
            return "all" if parameter.requires_grad else None
        return self.recipe.group_of(*part_of(name))

    def print_plans(self):
        """nnU-Net prints the plans' network (its plain U-Net) with the configuration: show STU-Net's instead."""
        if self.local_rank != 0:
            return
        configuration = {**self.plans_manager.plans["configurations"][self.configuration_name]}
        configuration["architecture"] = describe_network(self.model, unwrap(self.network))
        self.print_to_log_file(f"\nThis is the configuration used by this training:\nConfiguration name: "
                               f"{self.configuration_name}\n{configuration}\n", add_timestamp=False)

    def prepare_network(self) -> None:
        """The pretrained body (never over a checkpoint a resume will load), then LoRA's adapters: a resumed LoRA
        run's checkpoint holds the adapted network."""
        if self.init == "pretrained" and not (self.resume_requested and has_resumable_checkpoint(self.output_folder)):
            self._load_pretrained_body()
        lora = self.recipe.lora
        if lora is not None:
            report = add_lora(unwrap(self.network), rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout,
                              exclude_prefixes=PART_PREFIXES[HEADS])
            self.print_to_log_file(f"LoRA (rank {lora.rank}) on {len(report.adapted)} convolutions; "
                                   f"{report.trainable_parameters:,} parameters train, "
                                   f"{report.frozen_parameters:,} frozen")

    def on_train_end(self):
        """Merge LoRA's adapters into plain weights before nnU-Net writes the final checkpoint, so its predictor
        (and `segbook evaluate`) load it into a plain STU-Net."""
        if has_lora(unwrap(self.network)):
            merge_lora(unwrap(self.network))
            if self.local_rank == 0:
                self.manifest.event("lora_merged")
                self.manifest.save()
        super().on_train_end()

    def _load_pretrained_body(self) -> None:
        path = self.settings.weights or str(resolve_weights(self.model, None, Paths.from_env(),
                                                                 self.print_to_log_file).path)
        report = load_pretrained(unwrap(self.network), read_state_dict(path), source=path)
        self.print_to_log_file(f"loaded {len(report.loaded)} pretrained tensors from {path}; "
                               f"fresh heads: {len(report.skipped_heads)} tensors; tiled: {report.tiled or 'none'}")
        if self.local_rank == 0:
            self.manifest.event("pretrained_weights_loaded", path=path, tiled=report.tiled)
            self.manifest.save()


def _stunet_builder(preset: str):
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return create_stunet(preset, num_input_channels, num_output_channels,
                             STUNetTrainer.stunet_strides(configuration_manager), enable_deep_supervision)

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
    if identity.model in STUNET_MODELS:
        attributes["build_network_architecture"] = staticmethod(_stunet_builder(identity.model))
        return type(name, (STUNetTrainer,), attributes)
    return type(name, (SegbookTrainer,), attributes)


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


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
