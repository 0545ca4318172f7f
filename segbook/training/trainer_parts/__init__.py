"""The parts `segbook.training.trainers.SegbookTrainer` is made of, one job each.

nnU-Net's way of changing its training is to subclass its trainer and override the hooks its loop calls
(`on_train_start`, `train_step`, `save_checkpoint`, ...), never to fork the loop. SegBook needs a good deal at those
hooks, so the trainer keeps its overrides thin and hands each job to the part that owns it:

- `record.RunRecorder`: the run's `run.json`, opened or (for a run started by `nnUNetv2_train`) created, and written
  at every moment worth recording (start, epochs, cost, checkpoints, events, the end); rank 0 alone writes.
- `stopping.BoundaryStop`: where the epoch stands (its losses so far, its clock), stop signals held until the next
  iteration boundary, the position a mid-epoch checkpoint saves and the resume from it.
- `checkpointing`: nnU-Net's checkpoint written atomically (with that position) and restored from a safely read one.
- `snapshots.Snapshots`: the network kept at chosen points of the budget (`--snapshots`), and a resume's repair of
  those past its checkpoint.
- `seeding.RunSeeding`: the run's seed in Python, numpy and torch, and in nnU-Net's augmentation workers.
- `optimiser.OptimiserGroups`: the recipe's parameter groups, optimiser and per-group schedule, and its phases.
- `data.DataGuard`: what the run trains on: nnU-Net's split written safely, the run's fraction of the cases, the
  preprocessed data checked before and while it trains.
- `precision.Precision`: the number format and memory layout it computes in (bf16, fp16, fp32; channels-last).
- `distributed`: nnU-Net's DDP on the CPU, and the plain network inside its wrappers.
- `progress`: what the log shows as it trains.

The parts import nothing of the trainer; the trainer module imports them all.
"""
