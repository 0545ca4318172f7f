"""What a run costs to train and to evaluate: device-hours, peak accelerator memory, throughput.

A lab with a fixed budget weighs a Dice gain against the compute it took, so every run records it as it goes:
- training: `run.json["cost"]`, updated at the end of every epoch and accumulated across attempts (a resumed run
  adds its epochs to what the earlier attempts recorded, redone epochs included: that compute was spent). Time is
  the sum of the epochs' wall times (training and validation iterations, not the set-up before the first epoch),
  times the number of devices; an epoch that a kill -9 cut short is not counted (it has no end). `gpu_hours`
  counts the epochs trained on CUDA only; on a CPU or MPS `device_hours` says what was spent and `device` says
  where. Samples per second is batch size x devices x training iterations over that time.
- prediction: `summary.json["cost"]["prediction"]` from `segbook evaluate`: the wall time of predicting the test
  split, its mean per case, and the peak memory.
Peak memory is `torch.cuda.max_memory_allocated` (the tensors PyTorch allocated on rank 0's device, the largest
across attempts); off CUDA there is no such counter and it is None, never a made-up number.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

SECONDS_PER_HOUR = 3600.0


def device_kind(device: Any) -> str:
    """`cuda`, `cpu` or `mps` for a torch device or its name."""
    return str(getattr(device, "type", device)).split(":")[0]


def peak_memory_bytes(device: Any) -> int | None:
    """The most memory PyTorch has allocated on `device` in this process (since the last reset); None off CUDA."""
    if device_kind(device) != "cuda":
        return None
    import torch

    return int(torch.cuda.max_memory_allocated(device))


def add_epoch(cost: dict[str, Any] | None, seconds: float, samples: int, device: Any, devices: int) -> dict[str, Any]:
    """The run's cost record after one more epoch of `seconds` on `devices` devices that trained on `samples`."""
    cost = dict(cost or {})
    kind = device_kind(device)
    kinds = set(filter(None, str(cost.get("device") or "").split("+"))) | {kind}
    train_seconds = float(cost.get("train_seconds") or 0.0) + seconds
    device_seconds = float(cost.get("device_seconds") or 0.0) + seconds * devices
    gpu_seconds = float(cost.get("gpu_seconds") or 0.0) + (seconds * devices if kind == "cuda" else 0.0)
    total_samples = int(cost.get("samples") or 0) + samples
    peaks = [p for p in (cost.get("peak_memory_bytes"), peak_memory_bytes(device)) if p is not None]
    return {"device": "+".join(sorted(kinds)), "devices": devices, "epochs": int(cost.get("epochs") or 0) + 1,
            "train_seconds": round(train_seconds, 3), "device_seconds": round(device_seconds, 3),
            "gpu_seconds": round(gpu_seconds, 3), "device_hours": device_seconds / SECONDS_PER_HOUR,
            "gpu_hours": gpu_seconds / SECONDS_PER_HOUR if "cuda" in kinds else None, "samples": total_samples,
            "samples_per_second": total_samples / train_seconds if train_seconds > 0 else None,
            "peak_memory_bytes": max(peaks) if peaks else None}


@contextlib.contextmanager
def measured_prediction(device: Any, cases: int) -> Iterator[dict[str, Any]]:
    """Times the block (predicting `cases` cases on `device`) and fills the yielded record when it ends."""
    cuda = device_kind(device) == "cuda"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    record: dict[str, Any] = {}
    started = time.perf_counter()
    yield record
    seconds = time.perf_counter() - started
    record.update(device=device_kind(device), cases=cases, seconds=round(seconds, 3),
                  seconds_per_case=seconds / cases if cases else None, peak_memory_bytes=peak_memory_bytes(device))
