"""`--normalization checkpoint`: a task planned (by whichever planner a run uses) with the checkpoint's pretraining
normalisation on every channel, under plans and data of its own; a checkpoint that says none is refused before
anything is planned."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import FINGERPRINT_SAMPLES, planned_tiny_task, run_segbook, tiny_spec
from nnssl_helpers import resenc

from segbook.backbones import PLANNERS
from segbook.checkpoint_normalization import register
from segbook.plan import plan_task

ZSCORE = (["ZScoreNormalization"], [False])


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    spec = tiny_spec(modality="CT&PET", size=(32, 32, 24), cases=4)
    with planned_tiny_task(tmp_path_factory.mktemp("normck"), spec, seed=1) as planned:
        yield planned


@pytest.mark.parametrize("base", ["default", "resenc-l"])
def test_the_wrapped_planner_writes_the_checkpoints_scheme_for_every_channel_under_plans_of_its_own(task, base):
    name = register(base, *ZSCORE)
    result = plan_task(task.entry, planner=name, num_processes=1, progress=False,
                       fingerprint_samples=FINGERPRINT_SAMPLES)
    identifier = PLANNERS[name].plans
    assert identifier == f"{PLANNERS[base].plans}_ZScoreNorm" and result.plans_identifier == identifier
    configuration = json.loads(result.plans_file.read_text())["configurations"]["3d_fullres"]
    assert configuration["normalization_schemes"] == ["ZScoreNormalization"] * 2
    assert configuration["use_mask_for_norm"] == [False, False]
    assert configuration["data_identifier"] == f"{identifier}_3d_fullres" and result.data_folder.is_dir()
    task_plans = plan_task(task.entry, planner=base, num_processes=1, progress=False)
    assert task_plans.normalization[0] == "CTNormalization"  # the task's own plans are untouched
    assert task_plans.data_folder != result.data_folder


def test_a_checkpoint_that_records_no_normalisation_is_refused_before_anything_is_planned(task, tmp_path):
    plain = tmp_path / "nnunet.pth"  # an nnU-Net training checkpoint without init_args: no normalisation said
    torch.save({"network_weights": resenc(num_classes=2).state_dict(), "trainer_name": "nnUNetTrainer"}, plain)
    before = sorted(p.name for p in (task.preprocessed / task.entry.nnunet_name).iterdir())
    refused = run_segbook("plan", "--registry", str(task.registry_file), "--task", task.entry.key,
                          "--normalization", "checkpoint", "--weights", str(plain), check=False)
    assert refused.returncode == 2
    assert f"segbook: error: --normalization checkpoint: {plain} records no pretraining normalisation" \
        in refused.stderr
    assert sorted(p.name for p in (task.preprocessed / task.entry.nnunet_name).iterdir()) == before


def _openmind(path):
    """An nnssl ResEnc file (pretrained on z-score, as OpenMind)."""
    from nnssl_helpers import resenc_kwargs

    from segbook.backbones.nnssl import write_nnssl_checkpoint

    return write_nnssl_checkpoint(resenc(num_classes=1), path,
                                  {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})


def test_segbook_plan_reads_the_checkpoint_as_the_model_it_names(task, tmp_path, capsys):
    """`segbook plan --model`: its default is the backbones' (a model reading nnssl files), an unknown model or one
    that reads no nnssl file is a usage error before anything is planned, and the nnssl file is read and planned
    around as that model's, with its normalisation from the one owner finetune asks."""
    from segbook import backbones
    from segbook.checkpoint_plans import planner_for_weights
    from segbook.cli.main import build_parser, main

    assert "nnssl" in backbones.get(backbones.CHECKPOINT_PLANS_MODEL).checkpoint_formats
    assert build_parser().parse_args(["plan", "--task", "613"]).model == backbones.CHECKPOINT_PLANS_MODEL
    openmind = str(_openmind(tmp_path / "openmind.pth"))
    common = ["plan", "--registry", str(task.registry_file), "--task", task.entry.key, "--weights", openmind]
    before = sorted(p.name for p in (task.preprocessed / task.entry.nnunet_name).iterdir())
    refusals = {("--plans", "checkpoint", "--model", "bogus"): "unknown model 'bogus'",
                ("--normalization", "checkpoint", "--model", "bogus"): "unknown model 'bogus'",
                ("--plans", "checkpoint", "--model", "large"): "reads no nnssl checkpoints"}
    for extra, message in refusals.items():
        assert main([*common, *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith("segbook: error: ") and message in error
    assert sorted(p.name for p in (task.preprocessed / task.entry.nnunet_name).iterdir()) == before
    assert main([*common, "--plans", "checkpoint", "--normalization", "checkpoint", "--model", "resenc-l",
                 "--format", "json"]) == 0
    planned = json.loads(capsys.readouterr().out)
    around = PLANNERS[planner_for_weights("resenc-l", openmind)].plans
    assert planned["plans_identifier"] == f"{around}_ZScoreNorm"
    assert planned["normalization"] == ["ZScoreNormalization"] * 2  # a CT&PET task, as the file was pretrained


def test_evaluate_names_the_run_finetune_trains_on_checkpoint_plans_and_normalisation(tmp_path, capsys):
    """Issue 24: `segbook evaluate --task --model` with finetune's --plans/--normalization/--weights resolves the
    plans identifier finetune's folder carries; bad combinations are refused as usage errors."""
    from segbook.checkpoint_plans import planner_for_weights
    from segbook.cli.evaluate import _runs
    from segbook.cli.main import build_parser, main
    from segbook.registry import load_registry

    openmind = str(_openmind(tmp_path / "openmind.pth"))
    around = PLANNERS[planner_for_weights("resenc-l", openmind)].plans
    expected = {("checkpoint", "task"): around, ("checkpoint", "checkpoint"): f"{around}_ZScoreNorm",
                ("default", "checkpoint"): "nnUNetResEncUNetLPlans_ZScoreNorm"}
    for (plans, normalization), identifier in expected.items():
        for init in ("--pretrained", "--scratch"):  # a scratch run on the file's plans pairs with the pretrained
            args = build_parser().parse_args(["evaluate", "--task", "613", "--model", "resenc-l", init, "--plans",
                                              plans, "--normalization", normalization, "--weights", openmind])
            [(_, spec, _)] = _runs(args, load_registry())
            assert spec.plans == identifier and f"__{identifier}__" in spec.folder(tmp_path).as_posix()
    refusals = {("--pretrained", "--plans", "checkpoint"): "needs the checkpoint: pass --weights FILE",
                ("--run", str(tmp_path), "--plans", "checkpoint"): "--run DIR names the run"}
    for extra, message in refusals.items():
        assert main(["evaluate", "--task", "613", "--model", "resenc-l", *extra]) == 2
        error = capsys.readouterr().err
        assert error.startswith("segbook: error: ") and message in error


@pytest.mark.slow
def test_finetune_with_the_checkpoints_normalisation_trains_on_z_scored_plans_of_its_own(tmp_path):
    """A CT task fine-tuned from an nnssl (z-score) file: the run's plans normalise by z-score, and its folder's
    plans identifier is not the task-normalised one's."""
    from nnssl_helpers import resenc_kwargs

    from segbook.backbones.nnssl import write_nnssl_checkpoint
    from segbook.checkpoint_plans import planner_for_weights
    from segbook.paths import Paths
    from segbook.training.manifest import RunManifest

    with planned_tiny_task(tmp_path, tiny_spec(size=(32, 32, 24), cases=4), seed=3) as task:
        torch.manual_seed(5)
        openmind = write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "openmind.pth",
                                          {"architecture": "ResidualEncoderUNet", "arch_kwargs": resenc_kwargs()})
        shown = run_segbook("finetune", "--registry", str(task.registry_file), "--task", task.entry.key, "--device",
                            "cpu", "--model", "resenc-l", "--pretrained", "--weights", str(openmind), "--plans",
                            "checkpoint", "--normalization", "checkpoint", "--recipe", "frozen-encoder", "--epochs",
                            "1", "--iters-per-epoch", "1", "--val-iters-per-epoch", "1")
        assert "pass --normalization checkpoint" not in shown.stdout + shown.stderr
        task_normalised = PLANNERS[planner_for_weights("resenc-l", openmind)].plans
        identifier = f"{task_normalised}_ZScoreNorm"
        plans = json.loads((task.preprocessed / task.entry.nnunet_name / f"{identifier}.json").read_text())
        assert plans["configurations"]["3d_fullres"]["normalization_schemes"] == ["ZScoreNormalization"]
        results = Paths.from_env().results
        folder = next(results.glob(f"*/SegbookTrainer_resenc-l_pretrained_frozen-encoder__{identifier}__3d_fullres"))
        manifest = RunManifest.load(folder / "fold_all")
        assert manifest.status == "finished"
        assert manifest.data["normalization"]["fine_tuning"]["schemes"] == ["ZScoreNormalization"]
        assert manifest.data["normalization"]["fine_tuning"]["plans"] == identifier != task_normalised
        evaluated = run_segbook("evaluate", "--registry", str(task.registry_file), "--task", task.entry.key,
                                "--model", "resenc-l", "--pretrained", "--recipe", "frozen-encoder", "--weights",
                                str(openmind), "--plans", "checkpoint", "--normalization", "checkpoint",
                                "--device", "cpu")
        assert f"evaluated: {folder / 'fold_all'}" in evaluated.stdout
