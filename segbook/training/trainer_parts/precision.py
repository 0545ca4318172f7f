"""The number format and memory layout a run computes in: `--precision` (auto, bf16, fp16) and `--channels-last`.

nnU-Net autocasts on CUDA only, in the process's CUDA autocast dtype, with a grad scaler for fp16. segbook decides
that dtype for every run (an earlier bf16 run in the same process must not leave an fp16 run in bf16), drops the
scaler for bf16 (no loss scaling needed), autocasts bf16 on the CPU too when asked, and records what a run
effectively computed in (`fingerprint.effective_precision`), so later reads need not guess what `auto` was.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from segbook import fingerprint


class Precision:
    """A run's `mixed_precision` and `channels_last` settings applied on its device."""

    def __init__(self, setting: str, channels_last: bool, device: torch.device):
        self.setting = setting
        self.device = device
        #: `--channels-last` (3D) on CUDA and on the CPU; MPS keeps the default memory format.
        self.channels_last = channels_last and device.type in ("cuda", "cpu")

    def bf16(self) -> bool:
        return self.setting == "bf16" or (self.setting == "auto" and torch.cuda.is_bf16_supported())

    def set_cuda_autocast(self) -> bool:
        """On CUDA, set the process's autocast dtype to the run's (bf16 or fp16); True when that is bf16, which
        needs no grad scaler. False off CUDA, where nnU-Net does not autocast."""
        if self.device.type != "cuda":
            return False
        bf16 = self.bf16()
        torch.set_autocast_dtype("cuda", torch.bfloat16 if bf16 else torch.float16)
        return bf16

    def effective(self) -> str:
        """What this process computes in (`fingerprint.effective_precision`)."""
        cuda = self.device.type == "cuda"
        return fingerprint.effective_precision(self.setting, self.device.type,
                                               torch.cuda.is_bf16_supported() if cuda else None)

    def cpu_autocast(self) -> contextlib.AbstractContextManager:
        """nnU-Net autocasts on CUDA only (in the dtype `set_cuda_autocast` chose). On the CPU, `--precision bf16`
        autocasts in bf16 too, with no scaler (nnU-Net has none off CUDA); `auto` and `fp16` train in fp32 there,
        as nnU-Net does."""
        if self.device.type == "cpu" and self.setting == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def lay_out_network(self, network: nn.Module) -> None:
        if self.channels_last:
            network.to(memory_format=torch.channels_last_3d)

    def lay_out_batch(self, batch: dict) -> dict:
        """The batch in the network's memory format, converted on the device (so a pinned batch is copied there as
        it is)."""
        if not self.channels_last:
            return batch
        data = batch["data"].to(self.device, non_blocking=True)
        return {**batch, "data": data.to(memory_format=torch.channels_last_3d)}
