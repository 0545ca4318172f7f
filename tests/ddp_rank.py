"""One DDP rank of segbook's trainer on the CPU (gloo), for tests/test_ddp.py.

nnU-Net's own `run_ddp` hard-codes NCCL (and CUDA devices), so this sets the process group up itself and then does
what `run_ddp` does: build the trainer by name, load the latest checkpoint when resuming, train. It writes what the
test checks to a JSON file: how often this rank wrote run.json, the learning rate of every group at every epoch,
its share of the augmentation workers, and how training ended.

    python tests/ddp_rank.py RANK WORLD_SIZE DATASET TRAINER RESUME(0|1) OUT.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from nnunetv2.run.run_training import get_trainer_from_args, maybe_load_checkpoint

from segbook.training.manifest import RunManifest
from segbook.training.trainers import register_with_nnunet


def main(rank: int, world: int, dataset: str, trainer_name: str, resume: bool, out: str) -> None:
    dist.init_process_group("gloo", rank=rank, world_size=world)
    saves = []
    save = RunManifest.save
    RunManifest.save = lambda manifest: (saves.append(1), save(manifest))[1]  # count this process's writes
    register_with_nnunet()
    trainer = get_trainer_from_args(dataset, "3d_fullres", "all", trainer_name, "nnUNetPlans", resume,
                                    device=torch.device("cpu"))
    maybe_load_checkpoint(trainer, resume, False)
    rates = {}
    start_epoch = trainer.on_train_epoch_start

    def record_rates() -> None:
        start_epoch()
        rates[trainer.current_epoch] = trainer.learning_rates()

    trainer.on_train_epoch_start = record_rates
    outcome = "finished"
    try:
        trainer.run_training()
    except KeyboardInterrupt:
        outcome = "stopped"
    with open(out, "w") as f:
        json.dump({"rank": rank, "saves": len(saves), "rates": rates, "outcome": outcome,
                   "data_workers": os.environ.get("nnUNet_n_proc_DA"), "device": str(trainer.device),
                   "batch_size": trainer.batch_size}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    rank, world, dataset, trainer_name, resume, out = sys.argv[1:]
    main(int(rank), int(world), dataset, trainer_name, resume == "1", out)
