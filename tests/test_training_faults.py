"""Faults and bad input on the training path: refused before anything is written, never silently wrong, no code
from pickles, one trainer per run, no orphaned workers. Real training on a tiny synthetic task, on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import (descendants, planned_tiny_task, prepare_synthetic_task, tiny_spec, wait_until_gone,
                     write_payload_checkpoint)

from segbook.cli.main import main
from segbook.errors import SegbookError
from segbook.evaluation.evaluate import evaluate_run
from segbook.options import OptionError
from segbook.paths import Paths
from segbook.data.folders import preprocessed_folder
from segbook.plan import plan_states
from segbook.runs import RunSpec
from segbook.training.finetune import RunExistsError, finetune
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings
from stunet import create_stunet, write_official_checkpoint
from stunet.checkpoints import file_sha256

TINY = dict(iterations_per_epoch=2, val_iterations_per_epoch=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A planned tiny task, and a second one imported but never planned (to see that nothing gets planned)."""
    root = tmp_path_factory.mktemp("faults")
    with planned_tiny_task(root) as task:
        task.unplanned_file, task.unplanned = prepare_synthetic_task(root / "unplanned", tiny_spec("Unplanned"),
                                                                     dataset_id=991, plan=False)
        yield task


def _cli(task, *args: str, registry=None) -> list[str]:
    return ["finetune", "--registry", str(registry or task.registry_file), *args]


def _nothing_written(paths: Paths) -> bool:
    return not paths.results.exists() and not paths.claims.exists()


@pytest.fixture
def fresh(task, tmp_path, monkeypatch) -> Paths:
    """This test's own results folder and claims; the module's raw and preprocessed data."""
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
    return Paths.from_env()


@pytest.mark.parametrize("option,value", [("--epochs", "0"), ("--epochs", "-3"), ("--head-lr-multiplier", "-5"),
                                          ("--lr", "-1"), ("--lr", "nan"), ("--weight-decay", "-1"),
                                          ("--checkpoint-every", "0"), ("--val-iters-per-epoch", "-2"),
                                          ("--iters-per-epoch", "0"), ("--num-gpus", "0")])
def test_an_option_out_of_range_is_refused_at_parse_time(task, fresh, capsys, option, value):
    with pytest.raises(SystemExit) as exit_:
        main(_cli(task, "--task", task.unplanned.key, "--model", "tiny", option, value,
                  registry=task.unplanned_file))
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and f"argument {option}: must be" in error and value in error
    assert "Traceback" not in error
    assert _nothing_written(fresh) and plan_states(task.unplanned, fresh) == {}


@pytest.mark.parametrize("field,value,option", [("epochs", 0, "--epochs"), ("head_lr_multiplier", -5.0,
                                                                            "--head-lr-multiplier"),
                                                ("lr", float("inf"), "--lr"), ("checkpoint_every", 0,
                                                                              "--checkpoint-every")])
def test_the_python_api_checks_the_same_ranges(task, fresh, field, value, option):
    settings = TrainingSettings(**{field: value})
    with pytest.raises(OptionError, match=f"{option} must be"):
        finetune(task.unplanned, "tiny", pretrained=False, settings=settings, device="cpu")
    assert _nothing_written(fresh) and plan_states(task.unplanned, fresh) == {}


@pytest.mark.slow
def test_a_finished_run_asked_for_with_other_settings_is_an_error(task, fresh):
    settings = TrainingSettings(epochs=1, **TINY)
    first = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
    assert first.status == "finished"
    record = first.manifest.data["preprocessed"]
    assert record["count"] == task.entry.train_cases and len(record["ids_sha256"]) == 64 and record["version"]
    log = next(first.folder.glob("training_log_*.txt")).read_text()
    assert "'architecture': 'STU-Net tiny (widths 8..128" in log and "PlainConvUNet" not in log

    with pytest.raises(RunExistsError, match=r"already finished with other settings \(budget.epochs: run 1, asked "
                                             r"2\); pass --overwrite"):
        finetune(task.entry, "tiny", pretrained=False, settings=TrainingSettings(epochs=2, **TINY), device="cpu")
    again = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
    assert again.status == "finished" and again.manifest.data == first.manifest.data
    longer = finetune(task.entry, "tiny", pretrained=False, settings=TrainingSettings(epochs=2, **TINY),
                      device="cpu", overwrite=True)
    assert len(longer.manifest.data["epochs"]) == 2
    assert longer.manifest.data["request"]["previous_attempt"]["status"] == "finished"


def _checkpoints(tmp_path: Path) -> dict[str, Path]:
    files = {"of another size": write_official_checkpoint(create_stunet("small", 1, 105).state_dict(),
                                                          tmp_path / "small.model"),
             "with two input channels": write_official_checkpoint(create_stunet("tiny", 2, 105).state_dict(),
                                                                  tmp_path / "two_channels.model"),
             "random bytes": tmp_path / "random.model", "empty": tmp_path / "empty.model"}
    files["random bytes"].write_bytes(os.urandom(4096))
    files["empty"].write_bytes(b"")
    return files


def test_bad_checkpoints_are_refused_before_planning_with_one_line(task, fresh, tmp_path, capsys):
    expected = {"of another size": "holds STU-Net small (widths 16..256", "with two input channels":
                "cannot adapt conv_blocks_context.0.0.conv1.weight from 2 to 1 input channels",
                "random bytes": "is not a PyTorch checkpoint, or it is damaged", "empty": "is empty (0 bytes)"}
    for what, path in _checkpoints(tmp_path).items():
        code = main(_cli(task, "--task", task.unplanned.key, "--model", "tiny", "--pretrained", "--weights",
                         str(path), "--device", "cpu", registry=task.unplanned_file))
        error = capsys.readouterr().err
        assert code == 2 and error.startswith("segbook: error: ") and expected[what] in error, (what, error)
        assert len(error.strip().splitlines()) == 1 and "Traceback" not in error
    marker = tmp_path / "payload_ran"
    payload = write_payload_checkpoint(tmp_path / "payload.model", marker)
    code = main(_cli(task, "--task", task.unplanned.key, "--model", "tiny", "--pretrained", "--weights",
                     str(payload), "--device", "cpu", registry=task.unplanned_file))
    error = capsys.readouterr().err
    assert code == 2 and "would import and run `posix.system`" in error and not marker.exists()
    assert "weights_only" not in error
    assert _nothing_written(fresh) and plan_states(task.unplanned, fresh) == {}


def test_tiny_without_weights_and_weights_without_pretrained_say_what_to_do(task, fresh, capsys):
    assert main(_cli(task, "--task", task.entry.key, "--model", "tiny", "--pretrained", "--device", "cpu")) == 2
    assert "STU-Net tiny has no official pretrained checkpoint: pass the file to fine-tune from with --weights" \
        in capsys.readouterr().err
    assert main(_cli(task, "--task", task.entry.key, "--model", "tiny", "--weights", str(task.weights),
                     "--device", "cpu")) == 2
    assert "--weights is for fine-tuning: add --pretrained" in capsys.readouterr().err
    assert _nothing_written(fresh)


def test_a_cached_checkpoint_without_a_recorded_checksum_is_named_and_a_corrupted_one_refused(task, fresh, capsys):
    from segbook.runs import resolve_weights

    # base: a size whose SHA-256 is not catalogued (small's is). Resolving checks the bytes, not the network, so a
    # tiny checkpoint stands in for the 230 MB one.
    cache = fresh.weights / "base_ep4k.model"
    cache.parent.mkdir(parents=True)
    write_official_checkpoint(create_stunet("tiny", 1, 105).state_dict(), cache)
    lines: list[str] = []
    weights = resolve_weights("base", None, fresh, lines.append)
    path, digest = weights.path, weights.sha256
    assert path == cache and digest == file_sha256(cache)
    assert len(lines) == 1 and "has no recorded SHA-256" in lines[0] and digest in lines[0]
    (cache.parent / "base_ep4k.model.sha256").write_text("0" * 64 + "  base_ep4k.model\n")
    with pytest.raises(SegbookError, match="is corrupted: SHA-256 .* differs from the recorded 0000"):
        resolve_weights("base", None, fresh, lines.append)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_the_device_is_chosen_and_said_and_cuda_without_a_gpu_is_a_clear_error(task, fresh, capsys):
    code = main(_cli(task, "--task", task.entry.key, "--model", "tiny", "--device", "cuda"))
    error = capsys.readouterr().err
    assert code == 2 and "segbook: error: --device cuda: not available on this machine" in error
    assert _nothing_written(fresh)
    assert main(_cli(task, "--task", task.entry.key, "--model", "tiny", "--epochs", "1", "--iters-per-epoch", "2",
                     "--val-iters-per-epoch", "1")) == 0
    assert "device: cpu (no CUDA GPU found)" in capsys.readouterr().out


@pytest.mark.slow
def test_a_run_that_never_got_a_checkpoint_starts_over_with_the_new_weights(task, fresh, tmp_path):
    """A failed first attempt (bad weights, a crash before the first checkpoint): --continue starts over with the
    weights given now, and the record keeps what happened before."""
    spec = RunSpec.of(task.entry, "tiny", True)
    folder = spec.folder(fresh.results)
    folder.mkdir(parents=True)
    failed = RunManifest.create(folder, {"task": task.entry.key}, TrainingSettings(weights="/old/weights.model"), {})
    failed.set_status("failed", RuntimeError("the old weights did not fit"))
    failed.save()
    torch.manual_seed(3)
    weights = write_official_checkpoint(create_stunet("tiny", 1, 105).state_dict(), tmp_path / "new.model")
    result = finetune(task.entry, "tiny", pretrained=True, settings=TrainingSettings(epochs=1, **TINY),
                      weights=weights, device="cpu", resume=True)
    manifest = result.manifest
    assert manifest.status == "finished" and manifest.settings.weights_sha256 == file_sha256(weights)
    loaded = [e for e in manifest.data["events"] if e["event"] == "pretrained_weights_loaded"]
    assert [e["path"] for e in loaded] == [str(weights.resolve())]
    assert manifest.data["request"]["previous_attempt"]["error"]["message"] == "the old weights did not fit"


@pytest.mark.slow
def test_resuming_with_other_settings_is_an_error_naming_them(task, fresh):
    settings = TrainingSettings(epochs=1, **TINY)
    run = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
    manifest = RunManifest.load(run.folder)
    manifest.data["status"] = "interrupted"  # as if killed after its checkpoint
    manifest.save()
    with pytest.raises(RunExistsError, match="--continue to resume it"):
        finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
    with pytest.raises(RunExistsError,
                       match=r"resumes with the settings it started with.*mixed_precision: run 'auto', asked 'bf16'"):
        finetune(task.entry, "tiny", pretrained=False,
                 settings=TrainingSettings(epochs=1, mixed_precision="bf16", **TINY), device="cpu", resume=True)


HOLD_RUN = """
import sys, time
from segbook import claims
from segbook.paths import Paths
with claims.exclusive(Paths.from_env().claims, sys.argv[1], "run"):
    print("held", flush=True)
    time.sleep(120)
"""


@pytest.mark.slow
def test_an_evaluation_is_refused_while_another_process_holds_the_run(task, fresh, capsys):
    run = finetune(task.entry, "tiny", pretrained=False, settings=TrainingSettings(epochs=1, **TINY), device="cpu")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_RUN, run.spec.job_id], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        code = main(["evaluate", "--registry", str(task.registry_file), "--task", task.entry.key, "--model",
                     "tiny", "--device", "cpu"])
        assert code == 2 and f"is in use: claimed by {socket.gethostname()} pid {holder.pid}" in \
            capsys.readouterr().err
        assert not (run.folder / "evaluation").exists()
    finally:
        holder.kill()
        holder.wait()
    assert evaluate_run(task.entry, run.spec, device="cpu").summary["num_cases"] == task.entry.test_cases


def test_help_shows_the_defaults_of_options_with_values_never_of_flags(capsys):
    for command in (["finetune", "--help"], ["evaluate", "--help"]):
        with pytest.raises(SystemExit):
            main(command)
        text = " ".join(capsys.readouterr().out.split())
        assert "(default: True)" not in text and "(default: False)" not in text
        if command[0] == "finetune":
            assert "training iterations per epoch (default: the recipe's; 250 in the built-in ones)" in text
            assert "--checkpoint-every CHECKPOINT_EVERY epochs between resumable checkpoints (default: 50)" in text
        else:
            assert "--no-gaussian uniform window weighting --no-mirroring" in text


@pytest.mark.slow
def test_evaluate_run_dir_evaluates_the_folder_given(task, fresh, tmp_path, capsys):
    run = finetune(task.entry, "tiny", pretrained=False, settings=TrainingSettings(epochs=1, **TINY), device="cpu")
    copy = tmp_path / "elsewhere" / run.folder.parent.name
    shutil.copytree(run.folder.parent, copy)
    code = main(["evaluate", "--registry", str(task.registry_file), "--run", str(copy / "fold_all"),
                 "--device", "cpu"])
    assert code == 0, capsys.readouterr().err
    assert (copy / "fold_all" / "evaluation" / "summary.json").is_file()
    assert not (run.folder / "evaluation").exists()
    summary = json.loads((copy / "fold_all" / "evaluation" / "summary.json").read_text())
    assert summary["training"] == {"status": "finished", "epochs_completed": 1, "epochs_planned": 1,
                                   "complete": True}


@pytest.mark.slow
def test_payload_checkpoints_in_run_folders_never_run(task, fresh, tmp_path, capsys):
    """`segbook evaluate` (nnU-Net's predictor) and `segbook finetune --continue` (nnU-Net's load_checkpoint)."""
    run = finetune(task.entry, "tiny", pretrained=False, settings=TrainingSettings(epochs=2, **TINY), device="cpu")
    marker = tmp_path / "payload_ran"
    write_payload_checkpoint(run.folder / "checkpoint_final.pth", marker)
    code = main(["evaluate", "--registry", str(task.registry_file), "--task", task.entry.key, "--model", "tiny",
                 "--device", "cpu"])
    error = capsys.readouterr().err
    assert code == 2 and "checkpoint_final.pth was refused: reading it would import and run `posix.system`" in error
    assert "weights_only" not in error and not marker.exists() and not (run.folder / "evaluation").exists()

    (run.folder / "checkpoint_final.pth").unlink()
    write_payload_checkpoint(run.folder / "checkpoint_latest.pth", marker)
    manifest = RunManifest.load(run.folder)
    manifest.data["status"] = "interrupted"
    manifest.save()
    code = main(_cli(task, "--task", task.entry.key, "--model", "tiny", "--continue", "--device", "cpu",
                     "--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1",
                     "--checkpoint-every", "1"))
    error = capsys.readouterr().err
    assert code == 2 and "checkpoint_latest.pth was refused: reading it would import and run" in error
    assert not marker.exists() and RunManifest.load(run.folder).status == "failed"


def test_training_refuses_preprocessed_data_that_is_not_the_train_split(task, fresh, tmp_path, capsys,
                                                                        monkeypatch):
    """What a killed re-plan of an older segbook left: a complete plan record over a partly refilled folder."""
    preprocessed = tmp_path / "preprocessed"
    shutil.copytree(task.preprocessed, preprocessed)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    data = preprocessed_folder(task.entry, Paths.from_env()) / "nnUNetPlans_3d_fullres"
    lost = sorted(p.name.removesuffix(".pkl") for p in data.glob("*.pkl"))[:4]
    for case in lost:
        for file in data.glob(f"{case}*"):
            file.unlink()
    code = main(_cli(task, "--task", task.entry.key, "--model", "tiny", "--device", "cpu", "--epochs", "1"))
    error = capsys.readouterr().err
    assert code == 2 and f"holds 2 case(s) in {data}, but the train split has 6 (missing 4: {', '.join(lost)})" \
        in error and f"run `segbook plan --task {task.entry.key} --force`" in error
    assert not Paths.from_env().results.exists()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process parents from /proc (Linux)")
def test_a_run_is_claimed_while_it_trains_and_its_workers_die_with_a_killed_trainer(task, fresh, capsys):
    command = [sys.executable, "-m", "segbook.cli.main", *_cli(task, "--task", task.entry.key, "--model", "tiny",
                                                               "--device", "cpu", "--epochs", "30",
                                                               "--iters-per-epoch", "2", "--val-iters-per-epoch",
                                                               "1", "--checkpoint-every", "1")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "nnUNet_n_proc_DA": "2"}
    trainer = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = RunSpec.of(task.entry, "tiny", False).folder(fresh.results)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and trainer.poll() is None:
            manifest = RunManifest.load(folder)
            if manifest and manifest.data.get("epochs") and (folder / "checkpoint_latest.pth").is_file():
                break
            time.sleep(0.2)
        assert trainer.poll() is None, "training ended before the test could look at it"
        workers = descendants(trainer.pid)
        assert len(workers) >= 2  # nnU-Net's augmentation workers

        second = subprocess.run([*command, "--continue"], env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2 and f"pid {trainer.pid}" in second.stderr and "is in use" in second.stderr
    finally:
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
    assert not wait_until_gone(workers, 10), "augmentation workers outlived the killed trainer"

    resumed = subprocess.run([*command, "--continue"], env={**env, "nnUNet_n_proc_DA": "0"},
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = RunManifest.load(folder)
    assert manifest.status == "finished" and "resumed" in [e["event"] for e in manifest.data["events"]]
    assert [e["epoch"] for e in manifest.data["epochs"]] == list(range(30))


# --- stopping at an iteration boundary ----------------------------------------------------------------------------

STOP_EPOCHS, STOP_ITERATIONS = 3, 4


class _Steps:
    """Every optimizer step nnU-Net takes, as (epoch, loss); at step `signal_at` (1-based) a signal reaches this
    process in the middle of the step, as one from outside would."""

    def __init__(self, monkeypatch, signum: int, signal_at: int):
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        self.taken: list[tuple[int, float]] = []
        self.signum, self.signal_at = signum, signal_at
        step = nnUNetTrainer.train_step

        def counted(trainer, batch):
            if len(self.taken) + 1 == self.signal_at:
                os.kill(os.getpid(), self.signum)
            outputs = step(trainer, batch)
            self.taken.append((trainer.current_epoch, float(outputs["loss"])))
            return outputs

        monkeypatch.setattr(nnUNetTrainer, "train_step", counted)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGUSR2], ids=lambda s: s.name)
def test_a_stop_signal_saves_at_the_next_iteration_and_the_resume_finishes_that_epoch(task, fresh, monkeypatch,
                                                                                       signum):
    from segbook.batch.jobs import Job
    from segbook.batch.matrix import job_status

    settings = TrainingSettings(epochs=STOP_EPOCHS, iterations_per_epoch=STOP_ITERATIONS, val_iterations_per_epoch=1,
                                checkpoint_every=100)
    steps = _Steps(monkeypatch, signum, signal_at=STOP_ITERATIONS + 2)  # during epoch 1's second iteration
    with pytest.raises(KeyboardInterrupt, match=None if signum == signal.SIGINT else signum.name):
        finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
    spec = RunSpec.of(task.entry, "tiny", False)
    stopped = RunManifest.load(spec.folder(fresh.results))
    (stop,) = [e for e in stopped.data["events"] if e["event"] == "stopped_at_boundary"]
    assert (stop["signal"], stop["epoch"], stop["iteration"]) == (signum.name, 1, 2)  # after that iteration
    assert len(steps.taken) == STOP_ITERATIONS + 2
    assert stopped.status == "interrupted" and [e["epoch"] for e in stopped.data["epochs"]] == [0]
    assert stopped.data["checkpoint"] == {**stopped.data["checkpoint"], "file": "checkpoint_latest.pth", "epoch": 1,
                                          "iteration": 2}
    assert job_status(Job(spec, task.entry), fresh).detail == "resumes in epoch 2 after iteration 2"

    steps.signal_at = None
    finished = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu", resume=True).manifest
    # Nothing lost, nothing twice: the resume trains the 2 iterations epoch 1 had left, then epoch 2.
    assert [epoch for epoch, _ in steps.taken] == sorted([0, 1, 2] * STOP_ITERATIONS)
    (resumed,) = [e for e in finished.data["events"] if e["event"] == "resumed"]
    assert (resumed["from_epoch"], resumed["from_iteration"]) == (1, 2)
    assert finished.status == "finished" and [e["epoch"] for e in finished.data["epochs"]] == [0, 1, 2]
    for record in finished.data["epochs"]:  # each epoch's loss over all its iterations, before and after the stop
        losses = [loss for epoch, loss in steps.taken if epoch == record["epoch"]]
        assert record["train_loss"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
        assert record["learning_rates"] == finished.recipe.rates(record["epoch"], STOP_EPOCHS)
