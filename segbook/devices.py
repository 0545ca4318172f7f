"""Which device a command computes on: the one asked for if this machine has it, else the best one it has."""

from __future__ import annotations

from typing import Callable

from segbook.errors import SegbookError

DEVICES = ("cuda", "mps", "cpu")


def available_devices() -> dict[str, bool]:
    import torch

    return {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}


def resolve_device(requested: str | None, say: Callable[[str], None] | None = None) -> str:
    """`requested` when this machine has it (a clear error when not); None picks cuda, else mps, else cpu and says
    which, so a run on the CPU is never a surprise."""
    available = available_devices()
    if requested is not None:
        if requested not in available:
            raise SegbookError(f"unknown device {requested!r}; choose one of {', '.join(DEVICES)}")
        if not available[requested]:
            import torch

            found = ", ".join(d for d in DEVICES if available[d])
            raise SegbookError(f"--device {requested}: not available on this machine (PyTorch {torch.__version__} "
                               f"finds {found}); choose --device {found.split(', ')[0]} or leave --device out")
        return requested
    chosen = next(device for device in DEVICES if available[device])
    if say is not None:
        missing = "" if chosen == "cuda" else " (no CUDA GPU found)"
        say(f"device: {chosen}{missing}")
    return chosen
