"""`run.json`: the record of a run and the training settings it carries (`segbook.training.settings`).

The manifest is written before training starts, so every process that trains the run (the `segbook finetune`
process, nnU-Net's DDP workers, a requeued SLURM job, `nnUNetv2_train -tr ...`) reads the same settings from the run
folder. It is rewritten atomically after each epoch, so it always says how far the run got.

It stays small: the per-epoch history (losses, pseudo-Dice, rates: about 0.35 MB at 1000 epochs) lives next to it in
`epochs.jsonl`, one JSON line appended per epoch, and `run.json` keeps only the count (`epochs_done`) and where the
latest checkpoint stands (`checkpoint`). `batch status` and `batch submit` read `run.json` alone
(`RunManifest.load(folder, history=False)`); everything else gets the history as `data["epochs"]`, as before.

Reading the log replays it: a record of epoch e replaces any earlier record of epoch e or later (a resumed run trains
them again), and only the first `epochs_done` records count. The log is written before `run.json`, so a kill between
the two leaves a record `run.json` does not count yet, never a count without its records; a torn last line (a kill
mid-append) is skipped. Manifests written before the split (schema 1, history inside `run.json`) read as before and
are split on their next save.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from segbook.backbones import STUDY_RECIPES
from segbook.errors import SegbookError
from segbook.io import atomic_write_json, atomic_write_text, now
from segbook.runs import MANIFEST
from segbook.training.settings import TrainingSettings

if TYPE_CHECKING:
    from segbook.recipes import Recipe

SCHEMA_VERSION = 2
#: The per-epoch history, next to `run.json`: one JSON object per line.
HISTORY = "epochs.jsonl"


class RunManifest:
    """A run folder's `run.json` (and its history, `epochs.jsonl`): read, change, save atomically."""

    def __init__(self, folder: str | os.PathLike, data: dict[str, Any]):
        self.folder = Path(folder)
        self.data = data
        self._logged: list[dict[str, Any]] | None = None  # the history as the log holds it; None: rewrite it

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def load(cls, folder: str | os.PathLike, history: bool = True) -> "RunManifest | None":
        """The run's manifest, None when it has none. `history=False` leaves the per-epoch history unread (no
        `data["epochs"]`; `epochs_done` still counts it): what a survey of thousands of runs reads."""
        path = Path(folder) / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (ValueError, OSError) as error:
            raise SegbookError(f"{path} is damaged ({error}); move the run folder away or start the run again with "
                               "--overwrite") from None
        if not isinstance(data, dict):
            raise SegbookError(f"{path} is damaged (not a JSON object)")
        manifest = cls(folder, data)
        if history and "epochs" not in data:
            data["epochs"] = read_history(Path(folder), data.get("epochs_done"))
            manifest._logged = list(data["epochs"])
        return manifest

    @classmethod
    def create(cls, folder: str | os.PathLike, run: dict[str, Any], settings: TrainingSettings,
               request: dict[str, Any], recipe: "Recipe | None" = None) -> "RunManifest":
        data = {"schema": SCHEMA_VERSION, "run": run, "request": request, "settings": asdict(settings)}
        if recipe is not None:
            data["recipe"] = recipe.model_dump(mode="json")
        return cls(folder, {**data, "environment": environment(), "status": "created", "error": None,
                            "created_at": now(), "epochs": [], "events": []})

    @property
    def epochs_done(self) -> int:
        """Epochs recorded, whether or not the history was read."""
        epochs = self.data.get("epochs")
        return len(epochs) if epochs is not None else int(self.data.get("epochs_done") or 0)

    def resume_point(self) -> tuple[int, int] | None:
        """(epoch, iteration) the latest checkpoint resumes at, as the trainer recorded it when saving it; None
        when it recorded none (no checkpoint yet, or a run older than the record)."""
        checkpoint = self.data.get("checkpoint")
        if not isinstance(checkpoint, dict):
            return None
        return int(checkpoint.get("epoch", 0)), int(checkpoint.get("iteration", 0))

    @property
    def settings(self) -> TrainingSettings:
        return TrainingSettings.from_dict(self.data.get("settings", {}))

    @property
    def recipe(self) -> "Recipe":
        """The run's resolved recipe. Runs recorded before recipes existed, all of built-in backbones, trained
        SegBook's recipe of their initialisation with their settings' rates and budget."""
        from segbook.recipes import get_recipe, resolved_recipe

        if "recipe" in self.data:
            return resolved_recipe(self.data["recipe"])
        init = self.data.get("run", {}).get("init", "scratch")
        return self.settings.resolve(get_recipe(STUDY_RECIPES.get(init, "scratch"), init))[1]

    @property
    def status(self) -> str:
        return self.data.get("status", "unknown")

    def save(self) -> None:
        """The history first (new records appended, or the whole log rewritten when it changed otherwise), then
        `run.json` without it."""
        record = dict(self.data)
        epochs = record.pop("epochs", None)
        if epochs is not None:
            self._write_history(epochs)
            record["epochs_done"] = len(epochs)
        record["schema"] = SCHEMA_VERSION
        atomic_write_json(self.path, record)

    def _write_history(self, epochs: list[dict[str, Any]]) -> None:
        path = self.folder / HISTORY
        logged = self._logged
        if logged is not None and epochs[:len(logged)] == logged:
            _append_lines(path, epochs[len(logged):])
        elif epochs or path.exists():
            atomic_write_text(path, "".join(_line(e) for e in epochs))
        self._logged = list(epochs)

    def event(self, name: str, **details: Any) -> None:
        self.data.setdefault("events", []).append({"time": now(), "event": name, **details})

    def set_status(self, status: str, error: BaseException | None = None) -> None:
        self.data["status"] = status
        self.data["error"] = None if error is None else {
            "type": type(error).__name__, "message": str(error),
            "traceback": "".join(traceback.format_exception(error))[-4000:]}
        self.event(status, **({"error": f"{type(error).__name__}: {error}"} if error else {}))

    def record_epoch(self, record: dict[str, Any]) -> None:
        epochs = [e for e in self.data.setdefault("epochs", []) if e["epoch"] < record["epoch"]]
        self.data["epochs"] = epochs + [record]

    def truncate_epochs(self, resume_epoch: int) -> None:
        """Forget epochs after the checkpoint a resumed run restarts from: their work is redone."""
        self.data["epochs"] = [e for e in self.data.get("epochs", []) if e["epoch"] < resume_epoch]


def read_history(folder: Path, count: int | None = None) -> list[dict[str, Any]]:
    """The per-epoch records of a run folder's log, replayed (module docstring); the first `count` of them."""
    try:
        lines = (Path(folder) / HISTORY).read_bytes().splitlines()
    except FileNotFoundError:
        return []
    epochs: list[dict[str, Any]] = []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # torn by a kill mid-append
            continue
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            continue
        if epochs and epochs[-1]["epoch"] >= record["epoch"]:  # a resumed run trains these epochs again
            epochs = [e for e in epochs if e["epoch"] < record["epoch"]]
        epochs.append(record)
    return epochs if count is None else epochs[:int(count)]


def _line(record: dict[str, Any]) -> str:
    return json.dumps(record, default=str) + "\n"


def _append_lines(path: Path, records: list[dict[str, Any]]) -> None:
    """Append records to the log, durably; after a torn last line, start on a new one."""
    if not records:
        return
    data = "".join(_line(r) for r in records).encode()
    with open(path, "a+b") as log:
        if log.seek(0, os.SEEK_END) > 0:
            log.seek(-1, os.SEEK_END)
            if log.read(1) != b"\n":
                data = b"\n" + data
        log.write(data)
        log.flush()
        os.fsync(log.fileno())


def environment() -> dict[str, Any]:
    """Versions, host and commit. Versions come from the installed packages' metadata: a record written without
    torch loaded (a rehearsal's) does not import it; CUDA's version is known once torch is."""
    import sys
    from importlib.metadata import PackageNotFoundError, version

    import segbook

    def installed(package: str) -> str:
        try:
            return version(package)
        except PackageNotFoundError:
            return "unknown"

    torch = sys.modules.get("torch")
    return {"segbook": segbook.__version__, "torch": torch.__version__ if torch else installed("torch"),
            "nnunetv2": installed("nnunetv2"), "cuda": torch.version.cuda if torch else None,
            "python": platform.python_version(), "hostname": socket.gethostname(), "git_commit": _git_commit()}


def _git_commit() -> str | None:
    source = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def failure(manifest: RunManifest) -> str | None:
    """The recorded error that makes a run failed: a failed training (or planning) run, or a failed evaluation."""
    if manifest.status == "failed":
        error = manifest.data.get("error") or {}
        return f"{error.get('type', 'Error')}: {error.get('message', 'no message recorded')}"
    evaluation = manifest.data.get("evaluation_error")
    if manifest.status == "finished" and evaluation:
        return f"evaluation: {evaluation['type']}: {evaluation['message']}"
    return None


def record_failure(folder: Path, error: BaseException, stage: str | None = None,
                   new_manifest: Callable[[], RunManifest] | None = None) -> None:
    """Record how a stage of a run ended badly, in its `run.json`.

    Planning and training: status `failed` (or `interrupted` for Ctrl-C, SIGTERM and requeues) with the error,
    unless the trainer recorded it already; a finished run interrupted afterwards stays finished (an event says
    so). `new_manifest` makes the record of a run that failed before it had one.
    Evaluation: `evaluation_error`, the training staying `finished`. `stage` is added to the error.
    """
    manifest = RunManifest.load(folder) or (new_manifest() if new_manifest else None)
    if manifest is None:
        return
    if stage == "evaluate":
        manifest.data["evaluation_error"] = {"type": type(error).__name__, "message": str(error), "stage": stage,
                                             "traceback": "".join(traceback.format_exception(error))[-4000:]}
        manifest.event("evaluation_failed", error=f"{type(error).__name__}: {error}")
    elif manifest.status == "finished" and isinstance(error, (KeyboardInterrupt, SystemExit)):
        # Stopped after its last iteration (a signal acted on once training was complete): it stays finished.
        manifest.event("interrupted_after_training", error=f"{type(error).__name__}: {error}")
    else:
        status = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
        if manifest.status != status or not manifest.data.get("error"):
            manifest.set_status(status, error)
        if stage:
            manifest.data["error"]["stage"] = stage
    manifest.save()
