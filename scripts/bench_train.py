"""Training-step speed of each network: segbook's step next to nnU-Net's stock step, measured in one run.

Both paths run nnU-Net's own `nnUNetTrainer.train_step` on the same network, loss (Dice + CE with deep
supervision), optimiser and random batch, configured as each trainer configures it: stock is fp16 autocast with a
GradScaler; segbook is what `SegbookTrainer` sets up (bf16 autocast where the GPU supports it and no scaler,
optionally torch.compile and channels-last 3D batches).

    python scripts/bench_train.py --patch 128 128 128 --batch 2                 # every model, auto device
    python scripts/bench_train.py --models small,nnunet --patch 48 48 48 --device cpu --iters 3 --warmup 1
    python scripts/bench_train.py --models large --compile --channels-last --loader-task 901

Model FLOP utilisation counts a training step as 3x the forward pass (2 FLOPs per multiply-accumulate, counted on
the meta device) against the GPU's dense bf16 peak (--peak-tflops, or looked up from the device name).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from segbook.batch.estimate import build_network

DENSE_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A6000": 155.0, "V100": 125.0}


def ds_scales(network: torch.nn.Module, patch: list[int], channels: int, device: torch.device) -> list[list[int]]:
    with torch.no_grad():
        outputs = network(torch.zeros(1, channels, *patch, device=device))
    return [list(o.shape[2:]) for o in outputs]


def make_loss(num_outputs: int):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    weights = np.array([1 / 2 ** i for i in range(num_outputs)])
    weights[-1] = 0
    loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def random_batch(batch: int, channels: int, classes: int, patch: list[int], shapes: list[list[int]]) -> dict:
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(batch, channels, *patch, generator=generator)
    target = [torch.randint(0, classes, (batch, 1, *s), generator=generator).float() for s in shapes]
    return {"data": data, "target": target}


def time_path(path: str, args: argparse.Namespace, model: str, device: torch.device) -> dict:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.manual_seed(0)
    network = build_network(model, args.patch, args.channels, args.classes).to(device)
    shapes = ds_scales(network, args.patch, args.channels, device)
    segbook = path == "segbook"
    bf16 = segbook and device.type == "cuda" and torch.cuda.is_bf16_supported()
    if device.type == "cuda":
        torch.set_autocast_dtype("cuda", torch.bfloat16 if bf16 else torch.float16)
    if segbook and args.channels_last and device.type == "cuda":
        network = network.to(memory_format=torch.channels_last_3d)
    if segbook and args.compile:
        network = torch.compile(network)
    scaler = torch.GradScaler("cuda") if device.type == "cuda" and not bf16 else None
    trainer = SimpleNamespace(
        network=network, loss=make_loss(len(shapes)), device=device, grad_scaler=scaler,
        optimizer=torch.optim.SGD(network.parameters(), 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5))
    batch = random_batch(args.batch, args.channels, args.classes, args.patch, shapes)
    if segbook and args.channels_last and device.type == "cuda":
        batch["data"] = batch["data"].to(memory_format=torch.channels_last_3d)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(args.warmup + args.iters):
        _sync(device)
        start = time.perf_counter()
        nnUNetTrainer.train_step(trainer, batch)
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"seconds": seconds, "samples_per_s": args.batch / seconds, "peak_gib": peak,
            "precision": "bf16" if bf16 else ("fp16" if device.type == "cuda" else "fp32")}


def forward_macs(model: str, args: argparse.Namespace) -> int:
    from stunet import count_forward_macs

    with torch.device("meta"):
        network = build_network(model, args.patch, args.channels, args.classes)
    return count_forward_macs(network, (1, args.channels, *args.patch))


def loader_throughput(task: str, seconds: float, registry_files: list[str] | None = None) -> float:
    """Batches per second that nnU-Net's augmentation pipeline delivers for a planned task (its own workers)."""
    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.training.trainers import register_with_nnunet
    from nnunetv2.run.run_training import get_trainer_from_args

    Paths.from_env().export()
    register_with_nnunet()
    entry = load_registry(registry_files).get(task)
    if registry_files:  # the trainer records the run, its task found in the registry SEGBOOK_REGISTRY names
        os.environ["SEGBOOK_REGISTRY"] = os.pathsep.join(
            [*filter(None, os.environ.get("SEGBOOK_REGISTRY", "").split(os.pathsep)), *map(str, registry_files)])
    trainer = get_trainer_from_args(str(entry.dataset_id), "3d_fullres", 0, "SegbookTrainer_tiny_scratch",
                                    device=torch.device("cpu"))
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        next(loader)
        count += 1
    rate = count / (time.perf_counter() - start)
    if hasattr(loader, "_finish"):
        loader._finish()
    return rate


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in DENSE_BF16_TFLOPS.items() if k in name), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="small,base,large,huge,nnunet")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the segbook path")
    parser.add_argument("--channels-last", action="store_true", help="channels-last 3D on the segbook path")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak (default: from its name)")
    parser.add_argument("--loader-task", help="also measure nnU-Net's augmentation throughput on this planned task")
    parser.add_argument("--loader-registry", action="append", help="registry file that defines --loader-task")
    parser.add_argument("--loader-seconds", type=float, default=30.0)
    parser.add_argument("--json", help="also write every figure to this JSON file")
    args = parser.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    peak = peak_tflops(args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name} | patch {args.patch} batch {args.batch} | torch {torch.__version__} | "
          f"peak {peak or 'n/a'} TFLOP/s (bf16 dense)")
    header = (f"{'model':7} {'path':8} {'prec':5} {'s/iter':>8} {'samples/s':>10} {'peak GiB':>9} "
              f"{'TFLOP/s':>8} {'MFU':>6} {'vs stock':>8}")
    print(header)
    rows = []
    for model in args.models.split(","):
        train_flops = 3 * 2 * forward_macs(model, args) * args.batch
        stock = None
        for path in ("stock", "segbook"):
            result = time_path(path, args, model, device)
            tflops = train_flops / result["seconds"] / 1e12
            mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
            stock = stock or result
            ratio = result["samples_per_s"] / stock["samples_per_s"]
            print(f"{model:7} {path:8} {result['precision']:5} {result['seconds']:8.3f} "
                  f"{result['samples_per_s']:10.2f} {result['peak_gib']:9.2f} {tflops:8.2f} {mfu:>6} {ratio:7.2f}x")
            rows.append({"model": model, "path": path, **result, "tflops": tflops,
                         "mfu": tflops / peak if peak else None, "vs_stock": ratio})
    figures = {"device": name, "patch": args.patch, "batch": args.batch, "peak_tflops": peak,
               "compile": args.compile, "channels_last": args.channels_last, "rows": rows}
    if args.loader_task:
        rate = loader_throughput(args.loader_task, args.loader_seconds, args.loader_registry)
        consumed = max(r["samples_per_s"] for r in rows) / args.batch
        print(f"data loader: {rate:.2f} batches/s from nnU-Net's augmentation workers; the fastest training step "
              f"above consumes {consumed:.2f} batches/s ({'keeps up' if rate >= consumed else 'does NOT keep up'})")
        figures["loader"] = {"batches_per_s": rate, "consumed_batches_per_s": consumed}
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2, default=str))


if __name__ == "__main__":
    main()
