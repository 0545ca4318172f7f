"""segbook's DDP logic with two CPU ranks on the gloo backend: rank 0 alone writes run.json, every group's rate is the
same on both ranks, the augmentation workers are shared, a stop signal that reaches one rank stops both at the same
iteration after a checkpoint, and the resume finishes the run with the records of an uninterrupted one.

nnU-Net's own DDP path (`run_ddp`, NCCL on GPUs) is not exercised here: tests/ddp_rank.py sets up the process group
itself and drives the trainer as `run_ddp` does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import planned_tiny_task, tiny_spec

from segbook.paths import Paths
from segbook.recipes import get_recipe
from segbook.runs import RunSpec, identity_fields
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings

RANK = Path(__file__).with_name("ddp_rank.py")
EPOCHS, ITERATIONS = 4, 6


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    with planned_tiny_task(tmp_path_factory.mktemp("ddp"), tiny_spec(name="TinyDdp"), dataset_id=993,
                           seed=11) as task:
        yield task


def _new_run(task, folder: Path) -> RunManifest:
    """The run.json `finetune` writes before it starts nnU-Net (which, with DDP, spawns the ranks)."""
    spec = RunSpec.of(task.entry, "tiny", True)
    settings = TrainingSettings(epochs=EPOCHS, iterations_per_epoch=ITERATIONS, val_iterations_per_epoch=2,
                                checkpoint_every=100, weights=str(task.weights))
    settings, recipe = settings.resolve(get_recipe(spec.recipe, spec.init))
    folder.mkdir(parents=True)
    manifest = RunManifest.create(folder, identity_fields(spec), settings, {"via": "test"}, recipe)
    manifest.save()
    return manifest


def _start_ranks(task, tmp_path: Path, resume: bool, name: str) -> list[tuple[subprocess.Popen, Path]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "nnUNet_n_proc_DA": "2",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    spec = RunSpec.of(task.entry, "tiny", True)
    ranks = []
    for rank in range(2):
        out = tmp_path / f"{name}_rank{rank}.json"
        log = (tmp_path / f"{name}_rank{rank}.log").open("w")
        process = subprocess.Popen([sys.executable, str(RANK), str(rank), "2", task.entry.nnunet_name, spec.trainer,
                                    "1" if resume else "0", str(out)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        ranks.append((process, out))
    return ranks


def _finish(ranks, tmp_path: Path, name: str) -> list[dict]:
    for rank, (process, _) in enumerate(ranks):
        code = process.wait(timeout=600)
        log = (tmp_path / f"{name}_rank{rank}.log").read_text()
        assert code == 0, f"rank {rank} exited {code}:\n{log[-4000:]}"
    return [json.loads(out.read_text()) for _, out in ranks]


@pytest.mark.slow
def test_two_gloo_ranks_share_workers_write_once_stop_together_and_resume(task, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
    paths = Paths.from_env()
    folder = RunSpec.of(task.entry, "tiny", True).folder(paths.results)
    manifest = _new_run(task, folder)

    ranks = _start_ranks(task, tmp_path, resume=False, name="first")
    deadline = time.monotonic() + 300
    while (RunManifest.load(folder, history=False).epochs_done < 1):  # rank 0 has recorded epoch 0
        assert all(p.poll() is None for p, _ in ranks) and time.monotonic() < deadline, "the ranks ended early"
        time.sleep(0.1)
    ranks[1][0].send_signal(signal.SIGUSR2)  # SLURM's warning, to one rank only
    first = _finish(ranks, tmp_path, "first")

    assert [r["outcome"] for r in first] == ["stopped", "stopped"]
    assert [r["device"] for r in first] == ["cpu", "cpu"] and [r["batch_size"] for r in first] == [1, 1]
    assert [r["data_workers"] for r in first] == ["1", "1"]  # 2 shared between 2 ranks
    assert first[1]["saves"] == 0 and first[0]["saves"] > 0  # rank 0 alone writes run.json
    assert first[0]["rates"] == first[1]["rates"]
    stopped = RunManifest.load(folder)
    (stop,) = [e for e in stopped.data["events"] if e["event"] == "stopped_at_boundary"]
    assert stopped.status == "interrupted" and stop["signal"] == "SIGUSR2"
    assert stopped.data["checkpoint"] == {**stopped.data["checkpoint"], "file": "checkpoint_latest.pth",
                                          "epoch": stop["epoch"], "iteration": stop["iteration"]}
    assert [e["epoch"] for e in stopped.data["epochs"]] == list(range(stop["epoch"]))

    second = _finish(_start_ranks(task, tmp_path, resume=True, name="second"), tmp_path, "second")
    assert [r["outcome"] for r in second] == ["finished", "finished"]
    assert second[1]["saves"] == 0 and second[0]["saves"] > 0
    assert second[0]["rates"] == second[1]["rates"]
    finished = RunManifest.load(folder)
    (resumed,) = [e for e in finished.data["events"] if e["event"] == "resumed"]
    assert (resumed["from_epoch"], resumed.get("from_iteration", 0)) == (stop["epoch"], stop["iteration"])
    assert finished.status == "finished" and [e["epoch"] for e in finished.data["epochs"]] == list(range(EPOCHS))
    expected = {epoch: manifest.recipe.rates(epoch, EPOCHS) for epoch in range(EPOCHS)}
    recorded = {e["epoch"]: e["learning_rates"] for e in finished.data["epochs"]}
    assert recorded == expected  # as an uninterrupted run's: a function of the epoch alone
    seen = {int(epoch): values for run in (first[0], second[0]) for epoch, values in run["rates"].items()}
    assert seen == expected
