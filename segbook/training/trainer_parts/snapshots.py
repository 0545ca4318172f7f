"""Snapshots: the network kept at chosen points of a run's budget (`--snapshots 25 50 75`), for learning curves.

After the epoch at or past each percentage (`segbook.training.settings.snapshot_epochs`) the network's weights are
written, atomically, to `snapshots/snapshot_ep{E}.pth` (`segbook.runs.snapshot_path`; E the epochs trained), then
recorded in `run.json`'s `snapshots` (epoch, percent, the budget, the fraction of the schedule, the rates it trained
at and that they had not decayed yet, and the training compute spent so far). Both happen at the end of the epoch,
before nnU-Net saves that epoch's checkpoint: a resumable checkpoint at or past a snapshot's epoch always has the
snapshot, file and record, behind it.

A resume starts from a checkpoint: a snapshot past it (written by the attempt that was killed, on a trajectory the
resumed run does not follow), a record past it and a half-written file are removed then, and the snapshot is taken
again when the resumed run gets there. So a run killed between snapshots neither loses one nor has two of one
point. DDP's rank 0 alone writes.

A snapshot holds what evaluation needs and no optimiser state: `network_weights`, `trainer_name`, nnU-Net's
`inference_allowed_mirroring_axes` and `segbook_snapshot` (the record). It is read back like any checkpoint, never
unpickled (`segbook.training.checkpoints.read_snapshot`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from segbook.io import atomic_path, now
from segbook.runs import snapshot_epoch, snapshot_path, snapshots_folder
from segbook.training.trainer_parts.distributed import unwrap
from segbook.training.trainer_parts.record import RunRecorder
from segbook.training.settings import snapshot_epochs

#: `run.json`'s key of the snapshots taken, and the snapshot file's key of its own record.
KEY = "snapshots"
FILE_KEY = "segbook_snapshot"


class Snapshots:
    """Which epochs keep the network, and keeping it; `writes`: this process writes (DDP's rank 0)."""

    def __init__(self, folder: Path, percents: list[int], epochs: int, recorder: RunRecorder, writes: bool):
        self.folder = Path(folder)
        self.epochs = epochs
        self.recorder = recorder
        self.writes = writes
        self.at = {epoch: percent for percent, epoch in snapshot_epochs(percents, epochs).items()} if percents else {}

    def epoch_ended(self, trainer: Any, trained: int, rates: dict[str, float]) -> None:
        """After `trained` epochs: keep the network if a snapshot falls here (file first, then its record)."""
        percent = self.at.get(trained)
        if percent is None or not self.writes:
            return
        record = {"epoch": trained, "percent": percent, "budget_epochs": self.epochs,
                  "schedule_fraction": trained / self.epochs, "learning_rates": rates,
                  "learning_rate_decayed": False, "cost": self._cost(), "file": str(snapshot_path(Path(), trained)),
                  "saved_at": now()}
        path = snapshot_path(self.folder, trained)
        with atomic_path(path) as partial:
            torch.save({"network_weights": unwrap(trainer.network).state_dict(),
                        "trainer_name": trainer.__class__.__name__,
                        "inference_allowed_mirroring_axes": trainer.inference_allowed_mirroring_axes,
                        FILE_KEY: record}, partial)
        kept = [r for r in self.recorder.recorded(KEY) or [] if isinstance(r, dict) and r.get("epoch") != trained]
        self.recorder.note(KEY, sorted([*kept, record], key=lambda r: r["epoch"]))

    def _cost(self) -> dict[str, Any]:
        """The training compute up to here, as run.json's `cost` has it (its epochs, device- and GPU-hours: a
        learning curve's x axis), counted across attempts like the run's."""
        cost = self.recorder.recorded("cost")
        keys = ("device", "devices", "epochs", "device_hours", "gpu_hours")
        return {key: cost.get(key) for key in keys} if isinstance(cost, dict) else {}

    def resumed(self, trained: int) -> None:
        """A resume after `trained` epochs: snapshots past it, and files a killed write left, are removed."""
        if not self.writes:
            return
        folder = snapshots_folder(self.folder)
        files = [*folder.glob("*.pth"), *folder.glob(".*.tmp")] if folder.is_dir() else []
        for file in files:
            epoch = snapshot_epoch(file)
            if epoch is None or epoch > trained:
                file.unlink(missing_ok=True)
        recorded = self.recorder.recorded(KEY)
        if recorded is not None:
            self.recorder.note(KEY, [r for r in recorded if isinstance(r, dict) and isinstance(r.get("epoch"), int)
                                     and r["epoch"] <= trained and snapshot_path(self.folder, r["epoch"]).is_file()])


def recorded(manifest: dict[str, Any], folder: Path) -> list[dict[str, Any]]:
    """The snapshots a run's `run.json` records whose files are there, by epoch; a malformed record is left out
    (run.json is a file on disk)."""
    records = manifest.get(KEY) if isinstance(manifest, dict) else None
    found = []
    for record in records if isinstance(records, list) else []:
        epoch = record.get("epoch") if isinstance(record, dict) else None
        if isinstance(epoch, int) and not isinstance(epoch, bool) and epoch > 0 and \
                snapshot_path(folder, epoch).is_file():
            found.append(record)
    return sorted(found, key=lambda r: r["epoch"])
