"""The checkpoints pretrained jobs start from, read and checked before a single job is started or submitted.

A job that would start from a checkpoint that is missing, damaged, unsafe (it would run code) or of another
network (size, input channels) would otherwise find out on an allocated GPU, after queueing. `check_weights` does
what each of those jobs would do first, once per checkpoint and network: `segbook.runs.resolve_weights` (the given
file, or the cached official one checked against its recorded SHA-256) and
`segbook.training.checkpoints.check_weights_fit` (read safely, loaded into the task's network on the meta
device). Jobs that resume from a checkpoint of their own need none.
"""

from __future__ import annotations

from typing import Callable, Iterable

from segbook.batch.matrix import Job
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.runs import has_resumable_checkpoint

#: What stunet's safe reader says of a file it cannot read at all (as opposed to one that would run code).
UNREADABLE = "was refused: it is not a PyTorch checkpoint"


class WeightsProblem(SegbookError):
    """A pretrained job's checkpoint cannot be used; nothing was started or submitted."""


def check_weights(jobs: Iterable[Job], weights_for: Callable[[Job], str | None], paths: Paths,
                  say: Callable[[str], None] = print) -> None:
    """`WeightsProblem` for the first checkpoint a pretrained job of `jobs` could not start from."""
    from segbook.runs import resolve_weights
    from segbook.training.checkpoints import check_weights_fit

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
            if (path, model, channels) not in checked:
                check_weights_fit(path, model, channels, len(job.entry.labels))
                checked.add((path, model, channels))
        except SegbookError as error:
            raise WeightsProblem(f"{job.id}: {_plainly(str(error))}") from None


def _plainly(message: str) -> str:
    """A file that cannot be read at all is corrupt (or not a checkpoint), which is not a safety refusal."""
    if UNREADABLE not in message:
        return message
    path, _, reason = message.partition(" was refused: ")
    return f"{path} is corrupt or not a checkpoint: {reason.removeprefix('it is not a PyTorch checkpoint, or ')}"
