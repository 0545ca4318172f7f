"""The run's seed, everywhere the run draws random numbers.

The seed is the run's name's (`Identity.rng_seed`, never a setting), so two runs of one name train alike: it seeds
Python, numpy and torch before the network is built (the fresh weights: all of them from scratch, the heads when
fine-tuning), then nnU-Net's sampling and augmentation in the training process, and the seeds of its augmentation
workers, which nnU-Net starts unseeded (numpy then draws a seed from the operating system, so no two runs would
sample alike). DDP ranks other than 0 get seeds of their own, so that they do not sample the same patches (DDP
gives every rank rank 0's weights).

With `nnUNet_n_proc_DA=0` augmentation runs in the training process: same seed, device and settings give the same
run on the CPU. With one worker its batches come in the order it makes them, so that is reproducible too. With
several, each worker's batches are reproducible but nnU-Net's `NonDetMultiThreadedAugmenter` hands them out in the
order they are ready, which depends on timing.
"""

from __future__ import annotations

import contextlib
import random
import sys
from typing import Any, Iterator

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

#: The augmenters nnU-Net's `get_dataloaders` makes, in the order it makes them.
STREAMS = ("train", "validation")


class RunSeeding:
    """The seeds of one rank of one run."""

    def __init__(self, rng_seed: int, rank: int):
        self.rng_seed = rng_seed
        self.rank = rank

    def seed_generators(self) -> None:
        """Seed Python, numpy and torch: with the run's seed on rank 0, with one drawn from it for other ranks."""
        seed = self.rng_seed if self.rank == 0 else \
            int(np.random.SeedSequence([self.rng_seed, self.rank]).generate_state(1)[0])
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def worker_seeds(self, stream: str, workers: int) -> list[int]:
        """One seed per augmentation worker, from the run's seed, the stream and the DDP rank (ranks must not draw
        the same batches), through numpy's SeedSequence (so the global generators' state is left as it is)."""
        entropy = [self.rng_seed, self.rank, STREAMS.index(stream)]
        return [int(s) for s in np.random.SeedSequence(entropy).generate_state(workers)]

    @contextlib.contextmanager
    def seeded_workers(self) -> Iterator[None]:
        """While nnU-Net's `get_dataloaders` runs: its augmenters start their workers with `worker_seeds`."""
        nnunet_trainer_module = sys.modules[nnUNetTrainer.__module__]  # where get_dataloaders finds the class
        unseeded = nnunet_trainer_module.NonDetMultiThreadedAugmenter
        streams = iter(STREAMS)

        def seeded(*args: Any, num_processes: int, seeds: Any = None, **kwargs: Any):
            return unseeded(*args, num_processes=num_processes, seeds=self.worker_seeds(next(streams), num_processes),
                            **kwargs)

        nnunet_trainer_module.NonDetMultiThreadedAugmenter = seeded
        try:
            yield
        finally:
            nnunet_trainer_module.NonDetMultiThreadedAugmenter = unseeded
