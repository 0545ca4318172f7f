"""nnU-Net trainers for SegBook runs: subclasses that override nnU-Net's hooks, never its training loop.

`SegbookTrainer` adds what every run needs (settings and a manifest from the run folder, per-group poly LR, atomic
checkpoints, bf16 and channels-last 3D); `STUNetTrainer` builds STU-Net from the dataset's own plans and, for
fine-tuning, loads the pretrained body with fresh heads at 10x the body's rate. The concrete classes are generated,
one per (model, initialisation): `SegbookTrainer_large_pretrained`, `SegbookTrainer_nnunet_scratch`, ...

Stopping mid-epoch. While it trains, the trainer answers SIGINT, SIGTERM and SLURM's warning signal (USR2) at the
next iteration boundary (after a training or a validation iteration): it saves `checkpoint_latest.pth` there, then
lets the handler that was installed before training act as the signal asked (submitit's requeue, the worker's
stop, Ctrl-C). A second Ctrl-C stops at once. With DDP the ranks agree at every boundary, so all of them stop at
the same one. A checkpoint saved mid-epoch records where it stands (`segbook_position`: epoch e, the k training
iterations done, their losses and the seconds spent); a resume from it continues epoch e with its remaining N - k
training iterations, then e's validation, and the epoch's train loss is the mean over all N iterations. So a stop
loses less than one iteration of training, and `run.json` ends with the same epoch records, one per epoch, and the
same learning rates (a function of the epoch alone) as an uninterrupted run. What differs, as on every resume, is
the random batches drawn after it; a stop during validation redoes that validation. nnU-Net's own loader would
read such a checkpoint as "epoch e not started" and train e again whole.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn
from torch._dynamo import OptimizedModule

from segbook import claims, fingerprint
from segbook.errors import SegbookError
from segbook.io import atomic_path, atomic_write_json, now
from segbook.paths import Paths
from segbook import backbones
from segbook.backbones.models import build, load_into
from segbook.runs import RESUMABLE_CHECKPOINTS, Identity, has_resumable_checkpoint, resolve_weights
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.cost import add_epoch
from segbook.training.manifest import RunManifest
from segbook.training.schedule import RecipeSchedule
from segbook.training.settings import TrainingSettings
from segbook.processes import exit_with_parent
from segbook.training.lora import add_lora, has_lora, merge_lora
from stunet import describe_network, strides_from_plans

PLOT_EVERY_EPOCHS = 10  # nnU-Net redraws a large progress.png every epoch: seconds wasted on short epochs
LATEST_CHECKPOINT = "checkpoint_latest.pth"
#: nnU-Net's cross-validation splits, in the dataset's preprocessed folder.
SPLITS = "splits_final.json"
#: Signals answered at the next iteration boundary, after a checkpoint there.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)
_data_workers_shared = False


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def write_crossval_splits(preprocessed_folder: Path, data_folder: Path) -> bool:
    """nnU-Net's 5-fold split of the preprocessed cases (its own function and seed, over the case ids nnU-Net's
    trainer would use), written atomically unless the file exists; True when it wrote it. nnU-Net's trainer writes
    it on first use of a fold with a plain write, which folds starting together race on."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    path = Path(preprocessed_folder) / SPLITS
    if path.is_file():
        return False
    cases = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    splits = generate_crossval_split(cases, seed=12345, n_splits=5)
    atomic_write_json(path, [{part: [str(c) for c in ids] for part, ids in split.items()} for split in splits])
    return True


class DeferredStop:
    """Stop signals that arrive while a run trains, held until the next iteration boundary (module docstring).
    Handlers go in where Python allows them (the main thread), only for signals that are not ignored."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> None:
        self.previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in STOP_SIGNALS:
            handler = signal.getsignal(sig)
            if handler != signal.SIG_IGN:
                self.previous[sig] = handler
                signal.signal(sig, self._arrive)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _arrive(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:  # a second Ctrl-C: stop now
            self.act()
        self.signum = self.signum or signum

    def act(self, signum: int | None = None) -> None:
        """Do what the handler installed before training would have done with the signal (`signum`: the one the
        ranks agreed on); a handler that returns lets training go on."""
        signum = signum or self.signum
        handler = self.previous.get(signum, signal.SIG_DFL)
        self.signum = None
        if callable(handler):
            handler(signum, None)
        elif handler != signal.SIG_IGN:
            raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")


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
        if self.is_ddp and device.type != "cuda":
            # nnU-Net's DDP assumes CUDA (cuda:rank, a CUDA grad scaler); keep the CPU, for gloo.
            self.device, self.grad_scaler = device, None
        if self.is_ddp:
            _share_data_workers(dist.get_world_size())
        self.manifest = RunManifest.load(self.output_folder) or self._new_manifest()
        self.settings = self.manifest.settings
        self._apply_settings()
        self._epoch_started_at = 0.0
        self._preprocessed_version: str | None = None
        self._stop = DeferredStop()
        self._epoch_losses: list[float] = []  # this epoch's training losses so far (from before a stop, too)
        self._position: dict[str, Any] | None = None  # where a mid-epoch checkpoint being resumed stands
        self._stopping_at: dict[str, Any] | None = None  # the position a stop is saving

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
        manifest.data["rng_seed"] = identity.rng_seed
        if self.local_rank == 0:
            manifest.save()
        return manifest

    def _apply_settings(self) -> None:
        settings = self.settings.validate()  # run.json is a file on disk: never trust its values
        self.recipe = self.manifest.recipe
        self.recipe.check_fits(self.model, self.init, 2 if self.is_ddp else 1)
        self.num_epochs = self.recipe.budget.epochs
        self.num_iterations_per_epoch = self.recipe.budget.iterations_per_epoch
        self.iterations_budget = self.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = settings.val_iterations_per_epoch
        self.initial_lr = self.recipe.optimizer.lr
        self.weight_decay = self.recipe.optimizer.weight_decay
        self.save_every = settings.checkpoint_every
        self._seed_random_numbers()
        if self.device.type == "cuda":
            # nnU-Net autocasts in the process's CUDA autocast dtype (fp16 unless changed, as by an earlier bf16 run
            # in this process): set it either way. bf16 needs no loss scaling: no grad scaler.
            bf16 = self._use_bf16()
            torch.set_autocast_dtype("cuda", torch.bfloat16 if bf16 else torch.float16)
            if bf16:
                self.grad_scaler = None

    def _seed_random_numbers(self) -> None:
        """The run's seed (its name's: `Identity.rng_seed`, never a setting, so two runs of one name train alike)
        seeds Python, numpy and torch before the network is built: the fresh weights (all of them from scratch, the
        heads when fine-tuning), then nnU-Net's sampling and augmentation in this process, and the seeds of its
        augmentation workers (`get_dataloaders`). DDP ranks other than 0 get seeds of their own, so that they do
        not sample the same patches (DDP gives every rank rank 0's weights)."""
        rank = self._rank()
        seed = self.identity.rng_seed if rank == 0 else \
            int(np.random.SeedSequence([self.identity.rng_seed, rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def get_dataloaders(self):
        """nnU-Net's loaders, with augmentation workers seeded from the run's seed (nnU-Net starts them unseeded:
        numpy then draws its seed from the operating system, so no two runs would sample alike).

        With `nnUNet_n_proc_DA=0` augmentation runs in this process, seeded by `_seed_random_numbers`: same seed,
        device and settings give the same run on the CPU. With one worker its batches come in the order it makes
        them, so that is reproducible too. With several, each worker's batches are reproducible but nnU-Net's
        `NonDetMultiThreadedAugmenter` hands them out in the order they are ready, which depends on timing."""
        nnunet_trainer_module = sys.modules[nnUNetTrainer.__module__]  # where get_dataloaders finds the class
        unseeded = nnunet_trainer_module.NonDetMultiThreadedAugmenter
        streams = iter(("train", "validation"))  # nnU-Net makes the training augmenter first

        def seeded(*args: Any, num_processes: int, seeds: Any = None, **kwargs: Any):
            return unseeded(*args, num_processes=num_processes, seeds=self._worker_seeds(next(streams),
                                                                                        num_processes), **kwargs)

        nnunet_trainer_module.NonDetMultiThreadedAugmenter = seeded
        try:
            return super().get_dataloaders()
        finally:
            nnunet_trainer_module.NonDetMultiThreadedAugmenter = unseeded

    def _worker_seeds(self, stream: str, workers: int) -> list[int]:
        """One seed per augmentation worker, from the run's seed, the stream and the DDP rank (ranks must not draw
        the same batches), through numpy's SeedSequence (so the global generators' state is left as it is)."""
        entropy = [self.identity.rng_seed, self._rank(), ("train", "validation").index(stream)]
        return [int(s) for s in np.random.SeedSequence(entropy).generate_state(workers)]

    def _rank(self) -> int:
        return dist.get_rank() if self.is_ddp else 0

    def _use_bf16(self) -> bool:
        precision = self.settings.mixed_precision
        return precision == "bf16" or (precision == "auto" and torch.cuda.is_bf16_supported())

    def _effective_precision(self) -> str:
        """What this attempt computes in (`fingerprint.effective_precision`), joined with what earlier attempts
        recorded (a resume on another device), for run.json: later reads need not guess what `auto` was."""
        cuda = self.device.type == "cuda"
        mine = fingerprint.effective_precision(self.settings.mixed_precision, self.device.type,
                                               torch.cuda.is_bf16_supported() if cuda else None)
        earlier = self.manifest.data.get("precision")
        return "+".join(sorted({mine, *(earlier.split("+") if isinstance(earlier, str) and earlier else ())}))

    def _cpu_autocast(self) -> contextlib.AbstractContextManager:
        """nnU-Net autocasts on CUDA only (in the dtype `_apply_settings` chose). On the CPU, `--precision bf16`
        autocasts in bf16 too, with no scaler (nnU-Net has none off CUDA); `auto` and `fp16` train in fp32 there,
        as nnU-Net does."""
        if self.device.type == "cpu" and self.settings.mixed_precision == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _channels_last(self) -> bool:
        """`--channels-last` (3D) on CUDA and on the CPU; MPS keeps the default memory format."""
        return self.settings.channels_last and self.device.type in ("cuda", "cpu")

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
        if self.is_ddp and self.device.type != "cuda":
            self._initialize_for_cpu_ddp()
        else:
            super().initialize()
        if self._channels_last():
            self.network.to(memory_format=torch.channels_last_3d)

    def _initialize_for_cpu_ddp(self) -> None:
        """nnU-Net wraps the network for GPUs (`device_ids=[rank]`), which DDP refuses for a module on the CPU: build
        everything as a single process would, then size this rank's share of the batch, wrap the network for the
        CPU and rebuild the loss as nnU-Net builds it under DDP (the deepest head weighted 1e-6, not 0: DDP refuses
        parameters that get no gradient)."""
        self.is_ddp = False
        try:
            super().initialize()
        finally:
            self.is_ddp = True
        self._set_batch_size_and_oversample()
        self.network = torch.nn.parallel.DistributedDataParallel(self.network)
        self.loss = self._build_loss()

    def on_train_start(self):
        self._check_preprocessed()
        super().on_train_start()
        self._throttle_progress_plot()
        if self.local_rank == 0:
            self.manifest.data.setdefault("started_at", now())
            self.manifest.data["device"] = str(self.device)
            self.manifest.data["precision"] = self._effective_precision()
            self.manifest.data["cpu"] = _cpu_record()
            self.manifest.data.update(self._plans_summary())
            self.manifest.data[fingerprint.KEY] = fingerprint.record(self.manifest.data)
            self.manifest.set_status("running")
            self.manifest.save()
        self._stop.install()

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
            seconds = time.time() - self._epoch_started_at
            self.manifest.record_epoch({
                "epoch": epoch, "train_loss": float(log.get_value("train_losses", epoch)),
                "val_loss": float(log.get_value("val_losses", epoch)),
                "pseudo_dice": [float(v) for v in log.get_value("dice_per_class_or_region", epoch)],
                "ema_pseudo_dice": float(log.get_value("ema_fg_dice", epoch)),
                "learning_rates": rates, "seconds": round(seconds, 3)})
            # nnU-Net splits the configuration's batch among the DDP ranks: it is the global batch.
            samples = self.configuration_manager.batch_size * len(self._epoch_losses)
            self.manifest.data["cost"] = add_epoch(self.manifest.data.get("cost"), seconds, samples, self.device,
                                                   dist.get_world_size() if self.is_ddp else 1)
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

    def on_train_epoch_start(self):
        """The epoch's rates and log lines (nnU-Net's), then, for an epoch resumed mid-way, only the training
        iterations it has left (nnU-Net's loop reads the count after this hook)."""
        super().on_train_epoch_start()
        position, self._position = self._position, None
        self._epoch_losses = []
        if position is not None and position["epoch"] == self.current_epoch:
            self._epoch_losses = [float(v) for v in position["train_losses"]]
            self.num_iterations_per_epoch = max(0, self.iterations_budget - len(self._epoch_losses))
            self._epoch_started_at -= float(position.get("seconds", 0.0))
            self.print_to_log_file(f"resuming epoch {self.current_epoch} after {len(self._epoch_losses)} of "
                                   f"{self.iterations_budget} training iterations")

    def train_step(self, batch: dict) -> dict:
        if self._channels_last():  # converted on the device, so a pinned batch is copied there as it is
            data = batch["data"].to(self.device, non_blocking=True)
            batch = {**batch, "data": data.to(memory_format=torch.channels_last_3d)}
        with self._cpu_autocast():
            outputs = super().train_step(batch)
        self._epoch_losses.append(float(outputs["loss"]))
        self._at_iteration_boundary()
        return outputs

    def on_train_epoch_end(self, train_outputs: list[dict]):
        """nnU-Net's epoch loss, over every training iteration of the epoch (those before a stop included)."""
        self.num_iterations_per_epoch = self.iterations_budget
        super().on_train_epoch_end([{"loss": np.asarray(loss, dtype=np.float32)} for loss in self._epoch_losses])

    def validation_step(self, batch: dict) -> dict:
        with self._cpu_autocast():
            outputs = super().validation_step(batch)
        self._at_iteration_boundary()
        return outputs

    # --- stopping at an iteration boundary --------------------------------------------------------------------
    def _stop_signal(self) -> int:
        """The stop signal that came (0: none); with DDP, the ranks' agreement, so that all stop here together."""
        signum = self._stop.signum or 0
        if self.is_ddp:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _at_iteration_boundary(self) -> None:
        signum = self._stop_signal()
        if not signum:
            return
        if not claims.lost_any():  # a run taken over by another process writes nothing more
            self._save_position(signum)
        self._stop.act(signum)

    def _save_position(self, signum: int) -> None:
        """Save `checkpoint_latest.pth` where the epoch stands, and say so in run.json."""
        losses = self._epoch_losses
        if self.is_ddp:  # each iteration's loss as nnU-Net's epoch loss sees it: the ranks' mean
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, losses)
            losses = [float(np.mean(values)) for values in zip(*gathered)]
        self._stopping_at = {"epoch": self.current_epoch, "iteration": len(losses), "train_losses": losses,
                             "seconds": round(time.time() - self._epoch_started_at, 3)}
        try:
            self.save_checkpoint(os.path.join(self.output_folder, LATEST_CHECKPOINT))
        finally:
            self._stopping_at = None
        if self.local_rank == 0:
            self.print_to_log_file(f"{signal.Signals(signum).name}: saved {LATEST_CHECKPOINT} in epoch "
                                   f"{self.current_epoch} after {len(losses)} of {self.iterations_budget} training "
                                   "iterations; stopping")
            self.manifest.event("stopped_at_boundary", signal=signal.Signals(signum).name, epoch=self.current_epoch,
                                iteration=len(losses))
            self.manifest.save()

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
            self._stop_data_loaders()
            raise
        finally:
            self._stop.restore()
        if self._stop.signum:  # it came after the last iteration: training is complete, now act on it
            self._stop.act()

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

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint (its keys, and `segbook_position` when saved mid-epoch), written to a temporary file
        and renamed, so a kill never leaves a truncated one; where a resumable one stands goes into run.json."""
        if self.local_rank != 0 or self.disable_checkpointing:
            super().save_checkpoint(filename)  # nothing, or nnU-Net's note that checkpointing is off
            return
        position = self._stopping_at
        with atomic_path(filename) as partial:
            torch.save(self._checkpoint_content(position), partial)
        if os.path.basename(filename) in RESUMABLE_CHECKPOINTS:
            self.manifest.data["checkpoint"] = {
                "file": os.path.basename(filename), "saved_at": now(),
                "epoch": self.current_epoch + (0 if position else 1),
                "iteration": position["iteration"] if position else 0}
            self.manifest.save()

    def _checkpoint_content(self, position: dict[str, Any] | None) -> dict[str, Any]:
        """What nnU-Net's `save_checkpoint` writes. Mid-epoch, `current_epoch` is the unfinished epoch (nnU-Net's
        loop starts there) and `segbook_position` says how far into it the checkpoint is."""
        content = {
            "network_weights": unwrap(self.network).state_dict(), "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(), "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + (0 if position else 1), "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes}
        return {**content, "segbook_position": position} if position else content

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
        position = checkpoint.get("segbook_position") if resuming else None
        if position is not None:
            self._resume_mid_epoch(position)
        if resuming and self.local_rank == 0:
            self.manifest.truncate_epochs(self.current_epoch)
            self.manifest.event("resumed", from_epoch=self.current_epoch,
                                **({"from_iteration": position["iteration"]} if position else {}))
            self.manifest.save()

    def _resume_mid_epoch(self, position: dict[str, Any]) -> None:
        """Continue the unfinished epoch where the checkpoint stands; nnU-Net's log forgets what it had of that
        epoch (its start time and rate, and a train loss logged before a stop during validation): they are logged
        again, once, as the epoch runs."""
        self._position = position
        for values in self.logger.get_checkpoint().values():
            del values[self.current_epoch:]

    # --- the data it trains on ----------------------------------------------------------------------------------
    def do_split(self):
        """nnU-Net's split, read from `splits_final.json`, which preparation writes (`segbook batch prepare`); a
        run started without it (`segbook finetune --fold 0`) writes it first, atomically."""
        if self.fold != "all" and write_crossval_splits(Path(self.preprocessed_dataset_folder_base),
                                                        Path(self.preprocessed_dataset_folder)):
            self.print_to_log_file(f"wrote {SPLITS} (nnU-Net's 5-fold split): the task was not prepared with "
                                   "`segbook batch prepare`")
        train, validation = super().do_split()
        return self._training_subset(train, validation)

    def _training_subset(self, train: list[str], validation: list[str]) -> tuple[list[str], list[str]]:
        """The run's fraction of the cases it would train on (`segbook.data.subsets`), recorded in run.json
        (`training_cases`); a run that started on other cases (the split or the folds changed since) is refused
        rather than resumed on a mix. Fold 'all' validates on what it trains on, as nnU-Net's does; a fold's
        validation cases stay as they are."""
        from segbook.data.subsets import training_subset

        subset = training_subset(train, self.identity.fraction)
        chosen = set(subset.cases)
        cases = [case for case in train if case in chosen]  # nnU-Net's order: it samples by position
        recorded = (self.manifest.data.get("training_cases") or {}).get("cases")
        if recorded is not None and recorded != list(subset.cases):
            raise SegbookError(f"{self.output_folder} started training on {len(recorded)} case(s), and its "
                               f"{subset.fraction:g} of the training cases is now {len(cases)} case(s), not the same "
                               "ones (the split or the folds changed since): resuming would mix two training sets; "
                               "start it again with --overwrite")
        if subset.minimum_applied:
            self.print_to_log_file(f"training fraction {subset.fraction} of {subset.available} cases is below the "
                                   f"minimum: training on {len(cases)} cases")
        if self.local_rank == 0 and recorded is None:
            self.manifest.data["training_cases"] = subset.record()
            self.manifest.save()
        return cases, (cases if self.fold == "all" else validation)

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
                                  "plans_strides": [list(s) for s in config.pool_op_kernel_sizes],
                                  "input_channels": self.num_input_channels}}

    def _throttle_progress_plot(self) -> None:
        draw = self.logger.plot_progress_png

        def occasionally(output_folder: str) -> None:
            if self.current_epoch % PLOT_EVERY_EPOCHS == 0 or self.current_epoch >= self.num_epochs - 1:
                draw(output_folder)

        self.logger.plot_progress_png = occasionally


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
            if self.local_rank == 0:
                self.manifest.event("lora_merged")
                self.manifest.save()
        super().on_train_end()

    def _load_pretrained_body(self) -> None:
        path = self.settings.weights or str(resolve_weights(self.model, None, Paths.from_env(),
                                                                 self.print_to_log_file).path)
        report = load_into(unwrap(self.network), self.backbone, path, tiling=self.settings.stem_tiling)
        self.print_to_log_file(f"loaded {len(report.loaded)} pretrained tensors from {path}; "
                               f"fresh heads: {len(report.skipped_heads)} tensors; tiled: {report.tiled or 'none'}")
        if self.local_rank == 0:
            self.manifest.event("pretrained_weights_loaded", path=path, tiled=report.tiled)
            self.manifest.save()


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
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        return build(backbones.get(model), configuration_manager, num_input_channels, num_output_channels,
                     enable_deep_supervision)

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


def _share_data_workers(ranks: int) -> None:
    """nnU-Net gives every DDP rank `nnUNet_n_proc_DA` augmentation workers, so N ranks would start N times what the
    job has CPUs for: each rank (a process of its own) takes its share, at least one. Once per process."""
    global _data_workers_shared
    if _data_workers_shared:
        return
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    total = get_allowed_n_proc_DA()
    os.environ["nnUNet_n_proc_DA"] = str(max(1, total // ranks) if total else 0)
    _data_workers_shared = True


def _cpu_record() -> dict[str, Any]:
    """What a CPU run's numbers depend on besides seed, settings and versions (docs/training.md, reproducibility):
    the intra-op threads (the order of floating-point sums follows them) and the SIMD kernels torch dispatches to."""
    return {"threads": torch.get_num_threads(), "capability": torch.backends.cpu.get_cpu_capability()}


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"
