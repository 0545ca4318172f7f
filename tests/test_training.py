"""Fine-tuning and scratch training on a real (tiny, synthetic) nnU-Net task, end to end on the CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import REFERENCE_PLANS, planned_tiny_task, tiny_spec

from segbook import fingerprint
from segbook.cli.main import main
from segbook.data.split import read_split
from segbook.errors import SegbookError
from segbook.evaluation.evaluate import EvaluationError, evaluate_run
from segbook.evaluation.files import METRICS_VERSION, check_run
from segbook.plan import load_plan
from segbook.registry import load_registry
from segbook.results import collect_results
from segbook.runs import FolderParts, RunSpec
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.finetune import RunExistsError, finetune
from segbook.training.manifest import RunManifest
from segbook.training.settings import STEM_TILINGS, TrainingSettings
from segbook.training.trainers import register_with_nnunet, trainer_class
from stunet import TILINGS, read_state_dict

TINY_BUDGET = dict(iterations_per_epoch=2, val_iterations_per_epoch=1, checkpoint_every=1)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """One two-channel (MRI-like T1 + T2) synthetic task, imported and planned, shared by this module's tests."""
    spec = tiny_spec(modality="MRI", channels=("T1", "T2"))
    with planned_tiny_task(tmp_path_factory.mktemp("training"), spec, seed=7, fields=REFERENCE_PLANS) as task:
        yield task


def _manifest(task, model: str, init: str, fold: str = "all") -> RunManifest:
    from segbook.paths import Paths

    spec = RunSpec.of(task.entry, model, init == "pretrained", fold)
    return RunManifest.load(spec.folder(Paths.from_env().results))


@pytest.mark.slow
def test_pretrained_run_trains_records_and_evaluates(task):
    settings = TrainingSettings(epochs=3, **TINY_BUDGET)
    result = finetune(task.entry, "tiny", pretrained=True, settings=settings, weights=task.weights,
                      device="cpu")
    manifest = result.manifest
    assert manifest.status == "finished"
    assert (result.folder / "checkpoint_final.pth").is_file()
    assert [e["epoch"] for e in manifest.data["epochs"]] == [0, 1, 2]
    for epoch in manifest.data["epochs"]:
        rates = epoch["learning_rates"]
        assert rates["head"] / rates["body"] == pytest.approx(10.0, rel=1e-12)
        assert np.isfinite(epoch["train_loss"]) and len(epoch["pseudo_dice"]) == 3
    first, last = manifest.data["epochs"][0]["learning_rates"], manifest.data["epochs"][-1]["learning_rates"]
    assert first["body"] == pytest.approx(1e-3) and first["head"] == pytest.approx(1e-2)
    assert last["body"] == pytest.approx(1e-3 * (1 - 2 / 3) ** 0.9)  # poly decay applied per group
    assert manifest.settings.weights_sha256 and manifest.data["environment"]["nnunetv2"].startswith("2.8")
    assert manifest.data["plans_summary"]["normalization"] == ["ZScoreNormalization"] * 2
    # The comparability fingerprint, recorded when training started: what the results recompute from the record.
    assert manifest.data["precision"] == "fp32" and manifest.data["plans_summary"]["input_channels"] == 2
    assert manifest.data["fingerprint"] == fingerprint.record(manifest.data)
    assert fingerprint.training_values(manifest.data)["stem_tiling"] == "repeat"  # two channels: the stem is tiled
    # What differs from the authors' is in the record: stem tiling, plans beside theirs, split, normalisations.
    split = read_split(task.raw / task.entry.nnunet_name)
    assert manifest.data["settings"]["stem_tiling"] == "repeat"
    assert manifest.data["split"] == split.record() and len(split.sha256) == 64
    assert manifest.data["plans_comparison"]["differs"] == ["patch_size", "spacing"]
    assert manifest.data["plans_comparison"]["authors"]["patch_size"] == REFERENCE_PLANS["reference_patch_size"]
    assert manifest.data["normalization"] == {
        "fine_tuning": {"schemes": ["ZScoreNormalization"] * 2, "spacing_mm": [2.5, 1.5, 1.5],
                        "plans": "nnUNetPlans"},
        "pretraining": None}  # tiny has no official checkpoint, so no catalogued pretraining

    evaluation = evaluate_run(task.entry, result.spec, device="cpu")
    summary = evaluation.summary
    assert summary["num_cases"] == task.entry.test_cases
    assert set(summary["labels"]) == {"1", "2", "3"}
    assert summary["split"] == split.record()
    metrics = (evaluation.folder / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + task.entry.test_cases * 3
    # what evaluation writes passes every check the results tables and bundle imports make of it
    verdict = check_run(result.folder, summary, task.entry, FolderParts.parse(result.folder), split)
    assert verdict.problems == () and verdict.exclusions.pairs == task.entry.test_cases * 3
    assert summary["settings"]["metrics_version"] == METRICS_VERSION
    again = evaluate_run(task.entry, result.spec, device="cpu")
    assert again.skipped and again.summary == json.loads((evaluation.folder / "summary.json").read_text())
    collected = collect_results(registry=load_registry([task.registry_file]))
    row = collected[collected["path"] == str(result.folder)].iloc[0]
    assert (row["evaluated"], row["left_out"], row["variant"]) == (True, None, "")  # its record checks out
    older = dict(summary, settings={k: v for k, v in summary["settings"].items() if k != "metrics_version"})
    (evaluation.folder / "summary.json").write_text(json.dumps(older))  # as written under the first conventions
    assert not evaluate_run(task.entry, result.spec, device="cpu").skipped  # redone without --force

    manifest.data["split"]["sha256"] = "0" * 64  # as if the dataset had been re-split since the run trained
    manifest.save()
    with pytest.raises(EvaluationError, match=f"trained beside the test split {'0' * 64}, but "
                                              f"{task.entry.key}'s test split is now {split.sha256}"):
        evaluate_run(task.entry, result.spec, device="cpu", force=True)
    manifest.data["split"]["sha256"] = split.sha256
    manifest.save()


@pytest.mark.slow
def test_paper_plans_train_and_evaluate(task):
    """`--plans paper`: the run trains on nnU-Net's plans at the authors' patch and spacing, in its own folder."""
    settings = TrainingSettings(epochs=1, **TINY_BUDGET)
    result = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu", plans="paper")
    assert result.status == "finished"
    assert result.folder.parent.name == "SegbookTrainer_tiny_scratch__SegbookPaperPlans__3d_fullres"
    manifest = result.manifest.data
    assert manifest["run"]["plans"] == "SegbookPaperPlans"
    assert manifest["plans_summary"]["patch_size"] == [16, 32, 32]
    assert manifest["plans_summary"]["spacing"] == pytest.approx([3.0, 2.0, 2.0])
    assert manifest["plans_comparison"]["plans"] == "SegbookPaperPlans"
    assert manifest["plans_comparison"]["differs"] == []
    assert manifest["preprocessed"]["data_folder"].endswith("SegbookPaperPlans_3d_fullres")
    assert main(["evaluate", "--registry", str(task.registry_file), "--task", task.entry.key, "--model", "tiny",
                 "--scratch", "--plans", "paper", "--device", "cpu"]) == 0
    summary = json.loads((result.folder / "evaluation" / "summary.json").read_text())
    assert summary["run"]["plans"] == "SegbookPaperPlans" and summary["num_cases"] == task.entry.test_cases


@pytest.mark.slow
def test_stem_tiling_reaches_the_trained_network_and_is_part_of_the_run(task):
    """`--stem-tiling mean` through finetune: the network starts from the first block divided by the channel count
    (trained at a rate of 1e-30, so its final weights are the ones it started from), and run.json records it."""
    settings = TrainingSettings(epochs=1, lr=1e-30, weight_decay=0.0, stem_tiling="mean", **TINY_BUDGET)
    result = finetune(task.entry, "tiny", pretrained=True, settings=settings, weights=task.weights, device="cpu",
                      overwrite=True)
    assert result.status == "finished" and result.manifest.settings.stem_tiling == "mean"
    official = read_state_dict(task.weights)
    trained = read_run_checkpoint(result.folder / "checkpoint_final.pth")["network_weights"]
    for key in ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight"):
        torch.testing.assert_close(trained[key], official[key].repeat(1, 2, 1, 1, 1) / 2, rtol=0, atol=1e-6)
    with pytest.raises(RunExistsError, match="stem_tiling: run 'mean', asked 'repeat'"):
        finetune(task.entry, "tiny", pretrained=True, settings=replace(settings, stem_tiling="repeat"),
                 weights=task.weights, device="cpu")


def test_stem_tiling_settings_and_records_written_before_it_existed(capsys):
    """None (the default) is the checkpoint format's rule; a record without the setting predates it and read as
    the mean it was."""
    assert STEM_TILINGS == TILINGS and TrainingSettings().validate().stem_tiling is None
    assert TrainingSettings.from_dict({"seed": 3}).stem_tiling == "mean"  # what such runs did
    assert TrainingSettings.from_dict({"stem_tiling": None}).stem_tiling is None  # a batch's: the format's rule
    assert TrainingSettings.from_dict({"stem_tiling": "repeat"}).stem_tiling == "repeat"
    assert fingerprint.training_values({"run": {"init": "pretrained"}, "settings": {"weights_sha256": "x"}},
                                       channels=2)["stem_tiling"] == "mean"
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert "(default: the checkpoint format's rule, recorded in run.json" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SegbookError, match="--stem-tiling must be one of repeat, mean, got 'sum'"):
        TrainingSettings(stem_tiling="sum").validate()
    with pytest.raises(SystemExit) as parse_error:
        main(["finetune", "--task", "613", "--model", "tiny", "--stem-tiling", "sum"])
    assert parse_error.value.code == 2 and "invalid choice: 'sum'" in capsys.readouterr().err


@pytest.mark.slow
def test_scratch_and_nnunet_baseline_runs_live_apart(task):
    settings = TrainingSettings(epochs=1, **TINY_BUDGET)
    scratch = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
    baseline = finetune(task.entry, "nnunet", pretrained=False, settings=settings, device="cpu")
    assert scratch.folder != baseline.folder
    assert scratch.folder.parent.name == "SegbookTrainer_tiny_scratch__nnUNetPlans__3d_fullres"
    assert baseline.folder.parent.name == "SegbookTrainer_nnunet_scratch__nnUNetPlans__3d_fullres"
    for result in (scratch, baseline):
        assert result.status == "finished"
        assert result.manifest.data["epochs"][0]["learning_rates"] == {"all": pytest.approx(1e-2)}
        assert result.manifest.settings.weights is None
    with pytest.raises(SegbookError, match="no pretrained weights"):
        RunSpec.of(task.entry, "nnunet", True)


@pytest.mark.slow
def test_existing_run_with_a_checkpoint_needs_continue_or_overwrite(task):
    settings = TrainingSettings(epochs=1, **TINY_BUDGET)
    spec = RunSpec.of(task.entry, "base", False)
    from segbook.paths import Paths

    folder = spec.folder(Paths.from_env().results)
    folder.mkdir(parents=True)
    RunManifest.create(folder, {"task": task.entry.key}, settings, {}).save()
    (folder / "checkpoint_latest.pth").write_bytes(b"")  # something to resume from: never read here
    with pytest.raises(RunExistsError, match="--continue.*--overwrite"):
        finetune(task.entry, "base", pretrained=False, settings=settings, device="cpu")


def _trainer(task, name: str, monkeypatch):
    """The trainer as nnU-Net's tools make it, with no run.json yet: it records the run, finding the task in the
    registry that SEGBOOK_REGISTRY names."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from segbook.paths import Paths

    Paths.from_env().export()
    register_with_nnunet()
    monkeypatch.setenv("SEGBOOK_REGISTRY", str(task.registry_file))
    return get_trainer_from_args(str(task.entry.dataset_id), "3d_fullres", 0, name, device=torch.device("cpu"))


@pytest.mark.slow
def test_pretrained_body_loaded_heads_fresh_tiled_and_all_parameters_learn(task, monkeypatch):
    trainer = _trainer(task, "SegbookTrainer_tiny_pretrained", monkeypatch)
    trainer.settings.weights = str(task.weights)
    trainer.initialize()
    official = read_state_dict(task.weights)
    state = trainer.network.state_dict()
    for key, value in official.items():
        if key.startswith("seg_outputs"):
            assert state[key].shape[0] == 4  # fresh heads for this task's 4 classes, not the checkpoint's 105
        elif key in ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight"):
            torch.testing.assert_close(state[key], value.repeat(1, 2, 1, 1, 1))  # repeated over T1 and T2
        else:
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert groups["head"]["lr"] == pytest.approx(10 * groups["body"]["lr"])
    assert sum(len(g["params"]) for g in groups.values()) == len(list(trainer.network.parameters()))

    loader, _ = trainer.get_dataloaders()
    trainer.network.train()
    trainer.train_step(next(loader))
    without_gradient = {n for n, p in trainer.network.named_parameters() if p.grad is None or not p.grad.any()}
    # nnU-Net gives the lowest-resolution deep-supervision output zero loss weight: only its 1x1 head is idle.
    assert without_gradient == {"seg_outputs.0.weight", "seg_outputs.0.bias"}
    assert trainer.loss.weight_factors[-1] == 0


@pytest.mark.parametrize("poolings", [3, pytest.param(5, marks=pytest.mark.slow),
                                      pytest.param(6, marks=pytest.mark.slow)])  # 5, 6: large forward passes
def test_deep_supervision_targets_match_stunet_outputs(poolings):
    """Plans with fewer or more than five poolings: targets are downsampled to STU-Net's five output sizes."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    small_scratch = trainer_class("SegbookTrainer_small_scratch")
    strides = [[1, 1, 1]] + [[2, 2, 2]] * (poolings - 1) + [[1, 2, 2]]
    patch = [int(np.prod([s[0] for s in strides])) * 2] + [int(np.prod([s[1] for s in strides])) * 2] * 2
    config = SimpleNamespace(pool_op_kernel_sizes=strides, patch_size=patch)
    scales = small_scratch._get_deep_supervision_scales(
        SimpleNamespace(enable_deep_supervision=True, configuration_manager=config,
                        stunet_strides=small_scratch.stunet_strides))
    network = small_scratch.build_network_architecture(None, config, 1, 3, True)
    with torch.no_grad():
        outputs = network(torch.randn(1, 1, *patch))
    targets = DownsampleSegForDSTransform(ds_scales=scales)(segmentation=torch.zeros(1, *patch))["segmentation"]
    assert len(scales) == len(outputs) == 5
    assert [tuple(t.shape[1:]) for t in targets] == [tuple(o.shape[2:]) for o in outputs]


def test_nnunet_finds_segbook_trainers():
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    register_with_nnunet()
    found = recursive_find_trainer_class_by_name("SegbookTrainer_large_pretrained")
    assert found.__name__ == "SegbookTrainer_large_pretrained" and found.identity.model == "large"
    recipe = recursive_find_trainer_class_by_name("SegbookTrainer_base_pretrained_llrd_seed2")
    assert (recipe.identity.model, recipe.identity.recipe, recipe.identity.seed) == ("base", "llrd", 2)


#: A recipe with a budget of one epoch of two iterations: `nnUNetv2_train` takes no budget options, a recipe does.
SHORT_RECIPE = {"name": "short", "description": "one epoch of two iterations, for tests", "source": "tests",
                "init": "scratch", "optimizer": {"kind": "sgd", "lr": 1e-2, "weight_decay": 3e-5, "momentum": 0.99,
                                                 "nesterov": True},
                "budget": {"epochs": 1, "iterations_per_epoch": 2}}


@pytest.mark.slow
def test_a_run_started_by_nnunetv2_train_is_recorded_as_segbooks_and_evaluates(task, tmp_path):
    """The documented path (docs/training.md, nnU-Net's own tools): `eval "$(segbook env)"`, then nnU-Net's own
    `nnUNetv2_train DATASET 3d_fullres all -tr SegbookTrainer_...`. The trainer writes the run record through
    `runs.identity_fields`, its task found in the registry, so `segbook evaluate --run FOLDER` finds and scores it."""
    import yaml

    from segbook.paths import Paths
    from segbook.runs import identity_fields

    recipe_file = tmp_path / "short.yaml"
    recipe_file.write_text(yaml.safe_dump(SHORT_RECIPE))
    spec = RunSpec.of(task.entry, "tiny", False, recipe="short")
    folder = spec.folder(Paths.from_env().results)
    env = {**os.environ, "SEGBOOK_REGISTRY": str(task.registry_file), "SEGBOOK_RECIPES": str(recipe_file),
           "PYTHONUNBUFFERED": "1"}
    nnunetv2_train = Path(sys.executable).with_name("nnUNetv2_train")
    script = (f'eval "$({sys.executable} -m segbook.cli.main env)" && exec {nnunetv2_train} '
              f'{task.entry.dataset_id} 3d_fullres all -tr {spec.trainer} -device cpu')
    trained = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    manifest = RunManifest.load(folder)
    assert manifest.status == "finished" and manifest.data["request"] == {"via": "nnU-Net"}
    assert manifest.data["run"] == identity_fields(spec)
    assert manifest.data["rng_seed"] == spec.identity.rng_seed and len(manifest.data["epochs"]) == 1
    assert manifest.data["normalization"]["fine_tuning"]["plans"] == "nnUNetPlans"  # how it normalised
    assert "pretraining" not in manifest.data["normalization"]  # a scratch run

    assert main(["evaluate", "--registry", str(task.registry_file), "--run", str(folder), "--device", "cpu"]) == 0
    summary = json.loads((folder / "evaluation" / "summary.json").read_text())
    assert summary["run"] == identity_fields(spec) and summary["num_cases"] == task.entry.test_cases


def test_a_run_of_a_dataset_the_registry_does_not_know_is_refused_before_it_is_recorded(task):
    """Started by nnU-Net's tools without the registry file that registers its dataset, a run could not be
    evaluated nor tabled: the trainer refuses it, saying where segbook looks, and writes no record."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from segbook.paths import Paths

    Paths.from_env().export()
    register_with_nnunet()
    with pytest.raises(SegbookError, match=f"{task.entry.nnunet_name} is not in segbook's registry .* "
                                           "SEGBOOK_REGISTRY=FILE"):
        get_trainer_from_args(str(task.entry.dataset_id), "3d_fullres", 1, "SegbookTrainer_tiny_scratch",
                              device=torch.device("cpu"))
    assert not (RunSpec.of(task.entry, "tiny", False, 1).folder(Paths.from_env().results) / "run.json").exists()


def test_a_run_recorded_without_a_stem_rule_records_the_rule_its_checkpoint_applied(task):
    """A record whose `stem_tiling` is null (SegBook's default settings, as for a run nnU-Net's tools start): the
    trainer tiles by the checkpoint format's rule (an STU-Net file: repeat) and records it before training."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from segbook.paths import Paths
    from segbook.recipes import get_recipe
    from segbook.runs import identity_fields

    Paths.from_env().export()
    register_with_nnunet()
    spec = RunSpec.of(task.entry, "tiny", True, 3)  # a fold of its own: no other test writes its folder
    folder = spec.folder(Paths.from_env().results)
    settings, recipe = TrainingSettings(weights=str(task.weights)).resolve(get_recipe(spec.recipe, spec.init))
    folder.mkdir(parents=True, exist_ok=True)
    RunManifest.create(folder, identity_fields(spec), settings, {"via": "nnU-Net"}, recipe).save()
    trainer = get_trainer_from_args(str(task.entry.dataset_id), "3d_fullres", 3, spec.trainer,
                                    device=torch.device("cpu"))
    trainer.initialize()
    official = read_state_dict(task.weights)["conv_blocks_context.0.0.conv1.weight"]
    loaded = trainer.network.state_dict()["conv_blocks_context.0.0.conv1.weight"]
    assert torch.equal(loaded, official.repeat(1, 2, 1, 1, 1))
    assert trainer.settings.stem_tiling == "repeat" and RunManifest.load(folder).settings.stem_tiling == "repeat"
    plan = load_plan(task.entry)  # what segbook planned, read apart from the trainer's plans manager
    expected = {"schemes": plan.normalization, "spacing_mm": plan.spacing, "plans": "nnUNetPlans"}
    # the STU-Net file says nothing of its pretraining (tiny has no catalogue entry): recorded as not said
    assert RunManifest.load(folder).data["normalization"] == {"fine_tuning": expected, "pretraining": None}


def test_a_scratch_run_nnunets_tools_start_records_the_normalisation_it_trains_with(task, monkeypatch):
    """A run started by nnU-Net's tools (no run.json): the trainer's record says how the run normalises, from the
    plans it trains on, with no pretraining to say anything of."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from segbook.paths import Paths

    Paths.from_env().export()
    register_with_nnunet()
    monkeypatch.setenv("SEGBOOK_REGISTRY", str(task.registry_file))  # the trainer finds the run's task
    spec = RunSpec.of(task.entry, "tiny", False, 4)  # a fold of its own: no other test writes its folder
    trainer = get_trainer_from_args(str(task.entry.dataset_id), "3d_fullres", 4, spec.trainer,
                                    device=torch.device("cpu"))
    trainer.initialize()
    plan = load_plan(task.entry)
    record = RunManifest.load(spec.folder(Paths.from_env().results))
    assert record.data["request"] == {"via": "nnU-Net"}
    assert record.data["normalization"] == {"fine_tuning": {"schemes": plan.normalization, "spacing_mm": plan.spacing,
                                                            "plans": "nnUNetPlans"}}
    assert plan.normalization == ["ZScoreNormalization"] * 2  # an MRI task of two channels


@pytest.mark.slow
def test_killed_run_continues_from_its_checkpoint(task):
    """Kill the training process mid-run, continue it, and it finishes without re-applying pretrained weights."""
    command = [sys.executable, "-m", "segbook.cli.main", "finetune", "--registry", str(task.registry_file),
               "--task", task.entry.key, "--model", "tiny", "--pretrained", "--weights", str(task.weights),
               "--device", "cpu", "--epochs", "4", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1",
               "--checkpoint-every", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    folder = RunSpec.of(task.entry, "tiny", True).folder(Path(os.environ["SEGBOOK_HOME"]) / "nnUNet_results")
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        manifest = RunManifest.load(folder)
        if manifest and len(manifest.data["epochs"]) >= 2 and (folder / "checkpoint_latest.pth").is_file():
            break
        time.sleep(0.2)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed = RunManifest.load(folder)
    assert killed.status == "running" and len(killed.data["epochs"]) >= 2

    finished = subprocess.run(command + ["--continue"], env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    manifest = RunManifest.load(folder)
    assert manifest.status == "finished"
    assert [e["epoch"] for e in manifest.data["epochs"]] == [0, 1, 2, 3]
    events = [e["event"] for e in manifest.data["events"]]
    assert events.count("pretrained_weights_loaded") == 1
    resumed = [e for e in manifest.data["events"] if e["event"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["from_epoch"] >= 1


@pytest.mark.parametrize("task_schemes, pretraining, warned", [
    (["CTNormalization"], {"schemes": ["ZScoreNormalization"], "checkpoint": "ssl.pth"},
     "segbook: warning: T is normalised per its plans (CT CTNormalization), but ssl.pth was pretrained on "
     "ZScoreNormalization; fine-tuning keeps the task's (run.json: normalization): pass --normalization checkpoint "
     "to preprocess the task as it was pretrained"),
    (["ZScoreNormalization"], {"schemes": ["ZScoreNormalization"], "checkpoint": "ssl.pth"}, None),
    (["CTNormalization"], None, None),  # nothing known of the pretraining: nothing to compare
])
def test_a_task_normalised_otherwise_than_the_pretraining_is_warned_about(task_schemes, pretraining, warned,
                                                                          monkeypatch):
    from segbook.training import finetune

    monkeypatch.setattr(finetune, "_SAID_NORMALIZATION", set())
    said = []
    for checkpoint in ("sha-a", "sha-a", "sha-b"):  # said once per checkpoint and dataset
        finetune._warn_normalization({"fine_tuning": {"schemes": task_schemes}, "pretraining": pretraining},
                                     SimpleNamespace(key="T", channels=["CT"]), said.append, checkpoint)
    assert said == ([warned] * 2 if warned else [])
