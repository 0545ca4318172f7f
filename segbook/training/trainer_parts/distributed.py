"""nnU-Net's DDP on the CPU, and the plain network inside the wrappers nnU-Net puts around it.

nnU-Net's DDP assumes CUDA: it moves every rank to `cuda:rank`, makes a CUDA grad scaler and wraps the network with
`device_ids=[rank]`, which DDP refuses for a module on the CPU. segbook keeps DDP's other half as nnU-Net has it
(the batch split among the ranks, the loss built for DDP), so the same trainer runs with gloo on CPU ranks: what
`segbook finetune --num-gpus N --device cpu` and the DDP tests train with.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn
from torch._dynamo import OptimizedModule

_data_workers_shared = False


def unwrap(network: nn.Module) -> nn.Module:
    """The plain module inside DDP and torch.compile wrappers."""
    if isinstance(network, torch.nn.parallel.DistributedDataParallel):
        network = network.module
    if isinstance(network, OptimizedModule):
        network = network._orig_mod
    return network


def world_size(ddp: bool) -> int:
    return dist.get_world_size() if ddp else 1


def keep_device(trainer: Any, device: torch.device) -> None:
    """After nnU-Net's `__init__`: a DDP rank asked to train off CUDA stays on its device, without nnU-Net's CUDA
    grad scaler; every DDP rank takes its share of the augmentation workers."""
    if trainer.is_ddp and device.type != "cuda":
        trainer.device, trainer.grad_scaler = device, None
    if trainer.is_ddp:
        share_data_workers(dist.get_world_size())


def initialize_on_cpu(trainer: Any, initialize: Callable[[], None]) -> None:
    """nnU-Net's `initialize` (given) for a CPU rank: build everything as a single process would, then size this
    rank's share of the batch, wrap the network for the CPU and rebuild the loss as nnU-Net builds it under DDP (the
    deepest head weighted 1e-6, not 0: DDP refuses parameters that get no gradient)."""
    trainer.is_ddp = False
    try:
        initialize()
    finally:
        trainer.is_ddp = True
    trainer._set_batch_size_and_oversample()
    trainer.network = torch.nn.parallel.DistributedDataParallel(trainer.network)
    trainer.loss = trainer._build_loss()


def share_data_workers(ranks: int) -> None:
    """nnU-Net gives every DDP rank `nnUNet_n_proc_DA` augmentation workers, so N ranks would start N times what the
    job has CPUs for: each rank (a process of its own) takes its share, at least one. Once per process."""
    global _data_workers_shared
    if _data_workers_shared:
        return
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

    total = get_allowed_n_proc_DA()
    os.environ["nnUNet_n_proc_DA"] = str(max(1, total // ranks) if total else 0)
    _data_workers_shared = True
