"""The checkpoints pretrained jobs start from, read and checked before a single job is started or submitted.

A job that would start from a checkpoint that is missing, damaged, unsafe (it would run code) or of another
network (size, input channels) would otherwise find out on an allocated GPU, after queueing. `check_weights` does
what each of those jobs would do first, once per checkpoint and network: `segbook.runs.resolve_weights` (the given
file, or the cached official one checked against its recorded SHA-256) and
`segbook.training.checkpoints.check_weights_fit` (read safely, loaded into the task's network on the meta
device). Jobs that resume from a checkpoint of their own need none.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from segbook import backbones
from segbook.batch.jobs import Job
from segbook.data.folders import preprocessed_folder
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.runs import CONFIGURATION, has_resumable_checkpoint

#: What stunet's safe reader says of a file it cannot read at all (as opposed to one that would run code).
UNREADABLE = "was refused: it is not a PyTorch checkpoint"


class WeightsProblem(SegbookError):
    """A pretrained job's checkpoint cannot be used; nothing was started or submitted."""


def check_weights(jobs: Iterable[Job], weights_for: Callable[[Job], str | None], paths: Paths,
                  say: Callable[[str], None] = print) -> None:
    """`WeightsProblem` for the first checkpoint a pretrained job of `jobs` could not start from."""
    from segbook.runs import resolve_weights

    resolved: dict[tuple[str, str | None], str] = {}
    checked: set[tuple[str, str, int]] = set()
    for job in jobs:
        if job.spec.init != "pretrained" or has_resumable_checkpoint(job.folder(paths)):
            continue
        given, model = weights_for(job), job.spec.model
        try:
            if (model, given) not in resolved:
                resolved[model, given] = str(resolve_weights(model, given, paths, say).path)
            path, channels = resolved[model, given], len(job.entry.channels)
            plans = plans_file(job, paths) if backbones.get(model).shapes_from_plans else None
            if (path, model, channels, plans) not in checked:
                _check_fit(path, model, channels, len(job.entry.labels), plans)
                checked.add((path, model, channels, plans))
        except SegbookError as error:
            raise WeightsProblem(f"{job.id}: {_plainly(str(error))}") from None


def plans_file(job: Job, paths: Paths) -> Path:
    """The nnU-Net plans the job's network is built from (which need not exist yet: preparation writes them)."""
    return preprocessed_folder(job.entry, paths) / f"{job.spec.plans}.json"


def _check_fit(path: str, model: str, channels: int, classes: int, plans: Path | None) -> None:
    """The checkpoint loads into the job's network. A backbone whose shapes come from the plans (ResEnc: its stages
    follow the patch) is checked against the task's plans once they exist; before preparation only that the file
    is one the backbone reads (the trainer checks the whole fit before its first iteration)."""
    from segbook.training.checkpoints import check_weights_fit

    if plans is None:
        check_weights_fit(path, model, channels, classes)
    elif plans.is_file():
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        check_weights_fit(path, model, channels, classes, PlansManager(str(plans)).get_configuration(CONFIGURATION))
    else:
        from segbook.backbones.models import read_checkpoint
        from stunet import CheckpointError

        try:
            read_checkpoint(backbones.get(model), path)
        except CheckpointError as error:
            raise SegbookError(str(error)) from None


def _plainly(message: str) -> str:
    """A file that cannot be read at all is corrupt (or not a checkpoint), which is not a safety refusal."""
    if UNREADABLE not in message:
        return message
    path, _, reason = message.partition(" was refused: ")
    return f"{path} is corrupt or not a checkpoint: {reason.removeprefix('it is not a PyTorch checkpoint, or ')}"
