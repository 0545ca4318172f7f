"""`run.json`: the record of a run and the training settings it carries (`segbook.training.settings`).

The manifest is written before training starts, so every process that trains the run (the `segbook finetune`
process, nnU-Net's DDP workers, a requeued SLURM job, `nnUNetv2_train -tr ...`) reads the same settings from the run
folder. It is rewritten atomically after each epoch, so it always says how far the run got.
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

from segbook.errors import SegbookError
from segbook.io import atomic_write_json, now
from segbook.runs import DEFAULT_RECIPES, MANIFEST
from segbook.training.settings import TrainingSettings

if TYPE_CHECKING:
    from segbook.recipes import Recipe

SCHEMA_VERSION = 1


class RunManifest:
    """A run folder's `run.json`: read, change, save atomically."""

    def __init__(self, folder: str | os.PathLike, data: dict[str, Any]):
        self.folder = Path(folder)
        self.data = data

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "RunManifest | None":
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
        return cls(folder, data)

    @classmethod
    def create(cls, folder: str | os.PathLike, run: dict[str, Any], settings: TrainingSettings,
               request: dict[str, Any], recipe: "Recipe | None" = None) -> "RunManifest":
        data = {"schema": SCHEMA_VERSION, "run": run, "request": request, "settings": asdict(settings)}
        if recipe is not None:
            data["recipe"] = recipe.model_dump(mode="json")
        return cls(folder, {**data, "environment": environment(), "status": "created", "error": None,
                            "created_at": now(), "epochs": [], "events": []})

    @property
    def settings(self) -> TrainingSettings:
        return TrainingSettings.from_dict(self.data.get("settings", {}))

    @property
    def recipe(self) -> "Recipe":
        """The run's resolved recipe. Runs recorded before recipes existed trained the default recipe of their
        initialisation with their settings' rates and budget."""
        from segbook.recipes import get_recipe, resolved_recipe

        if "recipe" in self.data:
            return resolved_recipe(self.data["recipe"])
        init = self.data.get("run", {}).get("init", "scratch")
        return self.settings.resolve(get_recipe(DEFAULT_RECIPES.get(init, "scratch"), init))[1]

    @property
    def status(self) -> str:
        return self.data.get("status", "unknown")

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

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


def environment() -> dict[str, Any]:
    import torch

    import segbook

    try:
        from importlib.metadata import version
        nnunet_version = version("nnunetv2")
    except Exception:  # noqa: BLE001 - an uninstalled metadata entry must not stop a run
        nnunet_version = "unknown"
    return {"segbook": segbook.__version__, "torch": torch.__version__, "nnunetv2": nnunet_version,
            "cuda": torch.version.cuda, "python": platform.python_version(), "hostname": socket.gethostname(),
            "git_commit": _git_commit()}


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

    Planning and training: status `failed` (or `interrupted` for Ctrl-C and SIGTERM) with the error, unless the
    trainer recorded it already; `new_manifest` makes the record of a run that failed before it had one.
    Evaluation: `evaluation_error`, the training staying `finished`. `stage` is added to the error.
    """
    manifest = RunManifest.load(folder) or (new_manifest() if new_manifest else None)
    if manifest is None:
        return
    if stage == "evaluate":
        manifest.data["evaluation_error"] = {"type": type(error).__name__, "message": str(error), "stage": stage,
                                             "traceback": "".join(traceback.format_exception(error))[-4000:]}
        manifest.event("evaluation_failed", error=f"{type(error).__name__}: {error}")
    else:
        status = "interrupted" if isinstance(error, (KeyboardInterrupt, SystemExit)) else "failed"
        if manifest.status != status or not manifest.data.get("error"):
            manifest.set_status(status, error)
        if stage:
            manifest.data["error"]["stage"] = stage
    manifest.save()
