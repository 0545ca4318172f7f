"""Stopping at an iteration boundary, and resuming from there.

While it trains, the trainer answers SIGINT, SIGTERM and SLURM's warning signal (USR2) at the next iteration
boundary (after a training or a validation iteration): it saves `checkpoint_latest.pth` there, then lets the handler
that was installed before training act as the signal asked (submitit's requeue, the worker's stop, Ctrl-C). A
second Ctrl-C stops at once. With DDP the ranks agree at every boundary, so all of them stop at the same one.

A checkpoint saved mid-epoch records where it stands (`segbook_position`: epoch e, the k training iterations done,
their losses and the seconds spent); a resume from it continues epoch e with its remaining N - k training
iterations, then e's validation, and the epoch's train loss is the mean over all N iterations. So a stop loses less
than one iteration of training, and `run.json` ends with the same epoch records, one per epoch, and the same
learning rates (a function of the epoch alone) as an uninterrupted run. What differs, as on every resume, is the
random batches drawn after it; a stop during validation redoes that validation. nnU-Net's own loader would read
such a checkpoint as "epoch e not started" and train e again whole.
"""

from __future__ import annotations

import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from segbook import claims

if TYPE_CHECKING:
    from segbook.training.trainer_parts.record import RunRecorder

LATEST_CHECKPOINT = "checkpoint_latest.pth"
#: Signals answered at the next iteration boundary, after a checkpoint there.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR2)


class DeferredStop:
    """Stop signals that arrive while a run trains, held until the next iteration boundary. Handlers go in where
    Python allows them (the main thread), only for signals that are not ignored."""

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


class BoundaryStop:
    """Where the epoch being trained stands (its training losses so far, its clock), and the stop that waits for
    the next iteration boundary to save it.

    `budget`: the training iterations of an epoch; `save_latest` saves `checkpoint_latest.pth` (the trainer's
    `save_checkpoint`, which reads the position from `saving`); `say` logs.
    """

    def __init__(self, budget: int, ddp: bool, device: torch.device, record: RunRecorder,
                 save_latest: Callable[[], None], say: Callable[[str], None]):
        self.signals = DeferredStop()
        self.budget = budget
        self.ddp = ddp
        self.device = device
        self.record = record
        self.save_latest = save_latest
        self.say = say
        self.losses: list[float] = []  # this epoch's training losses so far (from before a stop, too)
        self.started_at = 0.0
        self.saving: dict[str, Any] | None = None  # the position a stop is saving
        self._resuming: dict[str, Any] | None = None  # where a mid-epoch checkpoint being resumed stands

    # --- the epoch ----------------------------------------------------------------------------------------------
    def epoch_started(self) -> None:
        self.started_at = time.time()

    def seconds(self) -> float:
        """Seconds the epoch has taken (those before a stop included)."""
        return time.time() - self.started_at

    def resume(self, position: dict[str, Any], epoch: int, logger: Any) -> None:
        """Continue the unfinished epoch `epoch` (the checkpoint's) where the checkpoint stands; nnU-Net's log
        forgets what it had of that epoch (its start time and rate, and a train loss logged before a stop during
        validation): they are logged again, once, as the epoch runs."""
        self._resuming = position
        for values in logger.get_checkpoint().values():
            del values[epoch:]

    def training_started(self, epoch: int) -> int | None:
        """The training iterations epoch `epoch` has left when it resumes mid-way (its losses and time so far
        restored); None for an epoch that starts from its first iteration."""
        position, self._resuming = self._resuming, None
        self.losses = []
        if position is None or position["epoch"] != epoch:
            return None
        self.losses = [float(v) for v in position["train_losses"]]
        self.started_at -= float(position.get("seconds", 0.0))
        return max(0, self.budget - len(self.losses))

    def trained(self, loss: float) -> None:
        self.losses.append(loss)

    # --- stopping -----------------------------------------------------------------------------------------------
    def install(self) -> None:
        """From now on (training starts), hold stop signals until the next boundary."""
        self.signals.install()

    def restore(self) -> None:
        self.signals.restore()

    def act_on_late_signal(self) -> None:
        """A signal that came after the last iteration: training is complete, now act on it."""
        if self.signals.signum:
            self.signals.act()

    def at_boundary(self, epoch: int) -> None:
        """After an iteration of epoch `epoch`: when a stop signal came, save the position and act on it."""
        signum = self._agreed_signal()
        if not signum:
            return
        if not claims.lost_any():  # a run taken over by another process writes nothing more
            self._save_position(signum, epoch)
        self.signals.act(signum)

    def _agreed_signal(self) -> int:
        """The stop signal that came (0: none); with DDP, the ranks' agreement, so that all stop here together."""
        signum = self.signals.signum or 0
        if self.ddp:
            flag = torch.tensor([signum], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            signum = int(flag.item())
        return signum

    def _save_position(self, signum: int, epoch: int) -> None:
        """Save `checkpoint_latest.pth` where the epoch stands, and say so in run.json."""
        losses = self.losses
        if self.ddp:  # each iteration's loss as nnU-Net's epoch loss sees it: the ranks' mean
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, losses)
            losses = [float(np.mean(values)) for values in zip(*gathered)]
        self.saving = {"epoch": epoch, "iteration": len(losses), "train_losses": losses,
                       "seconds": round(self.seconds(), 3)}
        try:
            self.save_latest()
        finally:
            self.saving = None
        if self.record.writes:
            name = signal.Signals(signum).name
            self.say(f"{name}: saved {LATEST_CHECKPOINT} in epoch {epoch} after {len(losses)} of {self.budget} "
                     "training iterations; stopping")
            self.record.event("stopped_at_boundary", signal=name, epoch=epoch, iteration=len(losses))
