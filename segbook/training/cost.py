"""What a run costs to train and to evaluate: device-hours, peak accelerator memory, throughput.

A lab with a fixed budget weighs a Dice gain against the compute it took, so every run records it as it goes:
- training: `run.json["cost"]`, updated at the end of every epoch and accumulated across attempts (a resumed run
  adds its epochs to what the earlier attempts recorded, redone epochs included: that compute was spent). Time is
  the sum of the epochs' wall times (training and validation iterations, not the set-up before the first epoch),
  times the number of devices; an epoch that a kill -9 cut short is not counted (it has no end). `gpu_hours`
  counts the epochs trained on CUDA only; on a CPU or MPS `device_hours` says what was spent and `device` says
  where. Samples per second is batch size x devices x training iterations over that time.
- prediction: `summary.json["cost"]["prediction"]` from `segbook evaluate`: the wall time of predicting the test
  split, its mean per case, the peak memory, and (on every device) the peak resident memory of the evaluating
  process and the intra-op threads it computed with (LiteMedSAM's question: is it usable on a laptop's CPU?).
Peak memory is `torch.cuda.max_memory_allocated` (the tensors PyTorch allocated on rank 0's device, the largest
across attempts); off CUDA there is no such counter and it is None, never a made-up number. Peak resident memory
(`peak_rss_bytes`) is the process's high-water mark (Linux: VmHWM, reset when prediction starts, so it is the most
the process held while predicting, what it had loaded before included; `peak_rss_since` says "prediction"; where
it cannot be reset, the `getrusage` maximum since the process started, and `peak_rss_since` says "process start").
Worker processes (`--num-processes` above 1) are not counted.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from pathlib import Path
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


#: Linux: writing "5" here resets the process's peak resident set size (VmHWM) to its current one (proc(5)).
CLEAR_REFS = Path("/proc/self/clear_refs")
PROC_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory to what it holds now; False where the system cannot."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """The process's peak resident memory: VmHWM where /proc has it, else `getrusage`'s `ru_maxrss` (kilobytes on
    Linux, bytes on macOS)."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextlib.contextmanager
def measured_prediction(device: Any, cases: int, threads: int | None = None) -> Iterator[dict[str, Any]]:
    """Times the block (predicting `cases` cases on `device` with `threads` intra-op threads) and fills the yielded
    record when it ends: its time, GPU peak memory (CUDA), peak resident memory and threads."""
    cuda = device_kind(device) == "cuda"
    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats(device)
    since = "prediction" if reset_peak_rss() else "process start"
    record: dict[str, Any] = {}
    started = time.perf_counter()
    yield record
    seconds = time.perf_counter() - started
    record.update(device=device_kind(device), cases=cases, seconds=round(seconds, 3),
                  seconds_per_case=seconds / cases if cases else None, peak_memory_bytes=peak_memory_bytes(device),
                  peak_rss_bytes=peak_rss_bytes(), peak_rss_since=since, threads=threads)
