"""`--plans checkpoint`: a task planned around an nnssl checkpoint's own network (patch a multiple of the total
stride, shrunk for memory, impossible tasks refused), its own plans identifier, and the way out named where the
default plans cannot take a checkpoint."""

from __future__ import annotations

import math

import pytest
from nnssl_helpers import resenc, resenc_kwargs

from segbook.backbones import PLANNERS
from segbook.backbones.nnssl import (adapt_for_fine_tuning, checkpoint_architecture, read_nnssl_checkpoint,
                                     write_nnssl_checkpoint)
from segbook.checkpoint_plans import (CheckpointPlanError, batch_size, fit_patch, initial_patch, planner_for_weights,
                                      register)
from segbook.errors import SegbookError
from stunet import CheckpointError

STRIDE = (32, 32, 32)


def test_the_patch_starts_at_the_median_rounded_up_to_the_stride_capped_by_the_recommended_patch():
    assert initial_patch((24, 40, 40), (160, 160, 160), STRIDE) == [64, 64, 64]  # bottleneck 2 voxels at least
    assert initial_patch((200, 512, 512), (160, 160, 160), STRIDE) == [160, 160, 160]
    assert initial_patch((40, 300, 300), (150, 150, 150), STRIDE) == [64, 128, 128]  # recommended rounded down


def test_the_patch_shrinks_for_memory_one_stride_at_a_time_on_the_relatively_largest_axis():
    shrunk, used = fit_patch([160, 160, 160], (100, 400, 400), STRIDE, lambda p: float(math.prod(p)), 96 ** 3)
    assert all(v % 32 == 0 and v > 0 for v in shrunk) and used <= 96 ** 3
    assert shrunk[0] == 64 < min(shrunk[1:])  # the axis largest relative to the median shrank first, to 2 strides
    unchanged, _ = fit_patch([64, 64, 64], (64, 64, 64), STRIDE, lambda p: float(math.prod(p)), 1e9)
    assert unchanged == [64, 64, 64]


def test_an_impossible_task_is_refused_naming_what_does_not_fit():
    with pytest.raises(CheckpointPlanError, match="no patch fits the memory target"):
        fit_patch([96, 64, 64], (64, 64, 64), STRIDE, lambda p: 1e12, 1e9)
    with pytest.raises(CheckpointPlanError, match=r"too small .* axes \[0\] \[32\]-fold"):
        initial_patch((6, 64, 64), (160, 160, 160), STRIDE)


def test_the_batch_follows_nnunets_formula_floored_at_two():
    assert batch_size(2.1e9, 1.09e9, (160, 160, 160), 1e12, 1) == 4  # memo section 6: 160^3 ResEnc-L at 24 GB
    assert batch_size(2.1e9, 2.0e9, (160, 160, 160), 1e12, 1) == 2
    assert batch_size(2.1e9, 1e6, (32, 32, 32), 32 ** 3 * 3, 1) == 3  # capped by the dataset's voxels
    assert batch_size(2.1e9, 1e6, (32, 32, 32), 32 ** 3, 1) == 2


def test_a_checkpoints_architecture_is_read_and_planned_under_its_own_identifier(tmp_path):
    four = write_nnssl_checkpoint(resenc(num_classes=1, widths=(4, 8, 8, 8), blocks=(1, 2, 1, 1)),
                                  tmp_path / "four.pth", {"architecture": "ResidualEncoderUNet",
                                                          "arch_kwargs": resenc_kwargs((4, 8, 8, 8), (1, 2, 1, 1))})
    three = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "three.pth",
                                   {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
    architecture = checkpoint_architecture(read_nnssl_checkpoint(four))
    assert architecture.stages == 4 and architecture.total_stride == (8, 8, 8)
    assert architecture.recommended_patch == (160, 160, 160)
    names = {planner_for_weights("resenc-l", four), planner_for_weights("resenc-l", three)}
    identifiers = {PLANNERS[name].plans for name in names}
    assert len(identifiers) == 2 and not identifiers & {p.plans for p in PLANNERS.values() if p.architecture is None}
    assert register(architecture) == planner_for_weights("resenc-l", four)  # the same network: the same plans


def test_a_checkpoint_that_cannot_be_planned_is_refused_before_planning(tmp_path):
    with pytest.raises(SegbookError, match="'PrimusM' cannot be planned"):
        planner_for_weights("resenc-l", write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "p.pth",
                                                               {"architecture": "PrimusM"}))
    broken = resenc_kwargs()
    broken["n_blocks_per_stage"] = [1, 2]
    with pytest.raises(SegbookError, match="inconsistent"):
        planner_for_weights("resenc-l", write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "b.pth", {
            "architecture": "ResidualEncoderUNet", "arch_kwargs": broken}))
    with pytest.raises(SegbookError, match="do not fit the architecture its plan names"):
        planner_for_weights("resenc-l", write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "w.pth", {
            "architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs((4, 8, 16))}))
    with pytest.raises(SegbookError, match="reads no nnssl checkpoints"):
        planner_for_weights("large", tmp_path / "w.pth")


def test_a_checkpoint_the_default_plans_cannot_take_names_the_way_out(tmp_path):
    deeper = read_nnssl_checkpoint(write_nnssl_checkpoint(resenc(num_classes=1, widths=(4, 8, 8, 8),
                                                                 blocks=(1, 2, 1, 1)), tmp_path / "deep.pth"))
    with pytest.raises(CheckpointError, match=r"unexpected keys .*`--plans checkpoint`"):
        adapt_for_fine_tuning(resenc().state_dict(), deeper)


@pytest.mark.slow
def test_a_six_stage_resenc_l_checkpoint_fine_tunes_on_a_small_task_from_its_weights_in_every_stage(tmp_path):
    """The issue's case: nnssl's ResEnc-L (6 stages, 3x3x3) on a task whose own ResEnc-L plans have fewer stages.
    `segbook plan --plans checkpoint` plans the task around the file's network under its own identifier and data;
    `finetune --plans checkpoint` (encoder frozen) ends with every stem and encoder stage as the file has them."""
    import json

    import torch
    from helpers import planned_tiny_task, run_segbook, tiny_spec

    from segbook.backbones.models import create_model
    from segbook.paths import Paths
    from segbook.training.checkpoints import read_run_checkpoint
    from segbook.training.manifest import RunManifest

    with planned_tiny_task(tmp_path, tiny_spec(size=(32, 32, 24), cases=4), seed=3) as task:
        torch.manual_seed(5)
        weights = create_model("resenc-l", num_classes=1).state_dict()
        openmind = write_nnssl_checkpoint(weights, tmp_path / "openmind.pth")
        shown = run_segbook("plan", "--registry", str(task.registry_file), "--task", task.entry.key, "--plans",
                            "checkpoint", "--weights", str(openmind)).stdout
        assert "compared with the task's own plans" in shown
        run_segbook("finetune", "--registry", str(task.registry_file), "--task", task.entry.key, "--device", "cpu",
                    "--model", "resenc-l", "--pretrained", "--weights", str(openmind), "--plans", "checkpoint",
                    "--recipe", "frozen-encoder", "--epochs", "1", "--iters-per-epoch", "1",
                    "--val-iters-per-epoch", "1")
        identifier = PLANNERS[planner_for_weights("resenc-l", openmind)].plans
        plans = json.loads((task.preprocessed / task.entry.nnunet_name / f"{identifier}.json").read_text())
        configuration = plans["configurations"]["3d_fullres"]
        assert configuration["architecture"]["arch_kwargs"]["n_stages"] == 6
        assert all(v % 32 == 0 for v in configuration["patch_size"]) and configuration["batch_size"] >= 2
        assert configuration["data_identifier"] == f"{identifier}_3d_fullres"  # never nnUNetPlans_3d_fullres
        folder = next(Paths.from_env().results.glob(f"*/SegbookTrainer_resenc-l_pretrained_frozen-encoder__"
                                                   f"{identifier}__3d_fullres")) / "fold_all"
        assert RunManifest.load(folder).status == "finished"
        after = read_run_checkpoint(folder / "checkpoint_final.pth")["network_weights"]
        body = [k for k in weights if k.startswith(("encoder.stem.", "encoder.stages."))]
        assert {k.split(".")[2] for k in body if k.startswith("encoder.stages.")} == {str(s) for s in range(6)}
        assert all(torch.equal(weights[k], after[k]) for k in body)


def test_a_scratch_run_on_checkpoint_plans_is_planned_by_the_file_and_shares_the_pretrained_runs_plans(tmp_path):
    """Issue 24: `--plans checkpoint --weights FILE` without --pretrained plans the scratch run around the file's
    network (nothing loaded), under the plans identifier of the pretrained run of that file."""
    from segbook.training.finetune import _planned_around, _planner
    from segbook.runs import Weights

    openmind = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "o.pth",
                                      {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
    scratch, pretrained = (_planner("resenc-l", init, "checkpoint", openmind) for init in (False, True))
    assert scratch == pretrained and PLANNERS[scratch].plans.startswith("SegbookCheckpointResidualEncoderUNet_")
    with pytest.raises(SegbookError, match="needs the checkpoint: pass --weights FILE"):
        _planner("resenc-l", False, "checkpoint", None)
    with pytest.raises(SegbookError, match="reads no nnssl checkpoints"):
        _planner("large", False, "checkpoint", openmind)

    class Spec:
        plans, init = PLANNERS[scratch].plans, "scratch"

    assert _planned_around(Spec, Weights(openmind, "ab" * 32)) == {
        "checkpoint": str(openmind), "sha256": "ab" * 32, "plans": Spec.plans, "weights_loaded": False}


def test_results_of_checkpoint_plans_pair_the_scratch_and_pretrained_runs(segbook_home, tmp_path, capsys):
    """Scratch and pretrained runs on one checkpoint's plans are tabulated together with their Delta(PT) by
    `segbook results --plans <identifier>`, apart from the default plans' runs."""
    from results_helpers import A, write_registry, write_run

    from segbook.cli.main import main
    from segbook.paths import Paths
    from segbook.registry import load_registry

    registry_file = write_registry(tmp_path / "registry.yaml")
    registry = load_registry([registry_file])
    openmind = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "o.pth",
                                      {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
    identifier = PLANNERS[planner_for_weights("resenc-l", openmind)].plans
    results = Paths.from_env().results
    write_run(results, registry, A, "resenc-l", "scratch", "all", (0.5, 0.5), plans=identifier)
    write_run(results, registry, A, "resenc-l", "pretrained", "all", (0.75, 0.75), plans=identifier)
    write_run(results, registry, A, "resenc-l", "scratch", "all", (0.1, 0.1))  # default plans: never paired in
    assert main(["results", "--registry", str(registry_file), "--plans", identifier, "--models", "resenc-l",
                 "--table", "datasets", "--format", "csv"]) == 0
    printed = capsys.readouterr().out
    assert ",small,50.0,1,,75.0,1,,25.0,1," in printed, printed  # scratch, pretrained, Delta(PT)


# --- kill -9 and two processes on checkpoint plans --------------------------------------------------------------

def _finetune_command(task, openmind, *extra: str) -> list[str]:
    import sys

    return [sys.executable, "-m", "segbook.cli.main", "finetune", "--registry", str(task.registry_file), "--task",
            task.entry.key, "--device", "cpu", "--model", "resenc-l", "--pretrained", "--weights", str(openmind),
            "--plans", "checkpoint", "--normalization", "checkpoint", "--epochs", "6", "--iters-per-epoch", "2",
            "--val-iters-per-epoch", "1", "--checkpoint-every", "1", "--plan-processes", "1", *extra]


def _killed_when(process, condition, what: str, timeout_s: float = 300) -> None:
    """SIGKILL the process's whole group (the trainer and nnU-Net's workers) once `condition` holds."""
    import os
    import signal
    import time

    deadline = time.time() + timeout_s
    while time.time() < deadline and process.poll() is None and not condition():
        time.sleep(0.01)
    assert process.poll() is None, f"the run ended before {what}: {process.stderr.read()[-3000:]}"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.mark.slow
def test_a_checkpoint_planned_run_killed_while_planning_and_while_training_never_goes_on_from_partial_state(
        tmp_path):
    """kill -9 of `finetune --plans checkpoint --normalization checkpoint` during preprocessing leaves no plans, data
    or run that a later run could take for complete (the next one plans from the start); killed during training,
    the next `--continue` resumes from the checkpoint on the complete data and finishes."""
    import json
    import subprocess

    from helpers import prepare_synthetic_task, tiny_spec

    from segbook.checkpoint_normalization import register as normalised
    from segbook.paths import Paths
    from segbook.plan import plan_states, verify_preprocessed
    from segbook.runs import RunSpec
    from segbook.training.manifest import RunManifest

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
        patch.setenv("nnUNet_n_proc_DA", "0")
        registry_file, entry = prepare_synthetic_task(tmp_path, tiny_spec("KilledCkpt", size=(32, 32, 24), cases=14),
                                                      dataset_id=968, plan=False)
        task = type("Task", (), {"registry_file": registry_file, "entry": entry})
        openmind = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "openmind.pth",
                                          {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
        planner = normalised(planner_for_weights("resenc-l", openmind), ("ZScoreNormalization",), (False,))
        identifier = PLANNERS[planner].plans
        paths = Paths.from_env()
        folder = RunSpec.of(entry, "resenc-l", True, plans=identifier).folder(paths.results)

        def staged() -> list:
            return list(paths.preprocessed.glob(f".{entry.nnunet_name}.*.partial/{entry.nnunet_name}/"
                                                f"{identifier}_3d_fullres/*.b2nd"))

        first = subprocess.Popen(_finetune_command(task, openmind), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True, start_new_session=True)
        _killed_when(first, staged, "its preprocessing")
        assert 0 < len(staged()) < entry.train_cases  # killed half-way through preprocessing
        assert plan_states(entry, paths).get(planner) != "preprocessed"
        assert not (paths.preprocessed / entry.nnunet_name / f"{identifier}.json").exists()
        assert RunManifest.load(folder) is None  # no run was started on the partial data

        second = subprocess.Popen(_finetune_command(task, openmind), stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True, start_new_session=True)

        def trained_an_epoch() -> bool:
            manifest = RunManifest.load(folder)
            return bool(manifest and manifest.data.get("epochs")) and (folder / "checkpoint_latest.pth").is_file()

        _killed_when(second, trained_an_epoch, "an epoch and a checkpoint")
        assert not staged()  # the second run repaired what the first left, and planned from the start
        cases = verify_preprocessed(entry.nnunet_name, paths, identifier, task=entry.key)
        assert cases.count == entry.train_cases and plan_states(entry, paths)[planner] == "preprocessed"
        plans = json.loads((paths.preprocessed / entry.nnunet_name / f"{identifier}.json").read_text())
        assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
        assert RunManifest.load(folder).status == "running"  # what the killed process last wrote

        refused = subprocess.run(_finetune_command(task, openmind), capture_output=True, text=True, timeout=300)
        assert refused.returncode == 2 and "pass --continue to resume it" in refused.stderr  # never silently anew
        resumed = subprocess.run(_finetune_command(task, openmind, "--continue"), capture_output=True, text=True,
                                 timeout=900)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        manifest = RunManifest.load(folder)
        assert manifest.status == "finished" and "resumed" in [e["event"] for e in manifest.data["events"]]
        assert [e["event"] for e in manifest.data["events"]].count("pretrained_weights_loaded") == 1
        assert manifest.data["preprocessed"] == cases.as_dict()


@pytest.mark.slow
def test_two_processes_planning_one_checkpoints_plans_on_one_dataset_take_turns(tmp_path):
    """`segbook plan --plans checkpoint` twice at once on one dataset: one plans, the other waits for the dataset
    and then finds the plans current; the data is complete, once."""
    import subprocess
    import sys

    from helpers import prepare_synthetic_task, tiny_spec

    from segbook.paths import Paths
    from segbook.plan import plan_states, verify_preprocessed

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
        registry_file, entry = prepare_synthetic_task(tmp_path, tiny_spec("TurnsCkpt", size=(32, 32, 24)),
                                                      dataset_id=969, plan=False)
        openmind = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "openmind.pth",
                                          {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
        command = [sys.executable, "-m", "segbook.cli.main", "plan", "--registry", str(registry_file), "--task",
                   entry.key, "--plans", "checkpoint", "--weights", str(openmind), "-np", "1"]
        processes = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for _ in range(2)]
        outputs = [process.communicate(timeout=600) for process in processes]
        assert [p.returncode for p in processes] == [0, 0], outputs
        assert any("waiting for dataset" in err for _, err in outputs), outputs
        planner = planner_for_weights("resenc-l", openmind)
        paths = Paths.from_env()
        cases = verify_preprocessed(entry.nnunet_name, paths, PLANNERS[planner].plans, task=entry.key)
        assert cases.count == entry.train_cases and plan_states(entry, paths)[planner] == "preprocessed"
        assert [p.name for p in paths.preprocessed.iterdir()] == [entry.nnunet_name]  # no staging left
