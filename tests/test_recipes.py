"""Fine-tuning recipes: validated on load, refused before anything is written when they do not fit, and followed
exactly by real (tiny, CPU) training runs: frozen parameters bit-identical, every group's rate as the recipe's
formula at every epoch, LoRA merged into a checkpoint nnU-Net's predictor loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import planned_tiny_task

from segbook import backbones
from segbook.cli.main import main
from segbook.evaluation.evaluate import evaluate_run
from segbook.paths import Paths
from segbook.recipes import RecipeError, get_recipe, load_recipes, read_recipe_file
from segbook.runs import RunSpec
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.finetune import finetune
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings
from stunet import read_state_dict

#: (part, encoder stage) of an STU-Net parameter, as its backbone says.
part_of = backbones.get("tiny").parts.part_of

TINY = dict(iterations_per_epoch=2, val_iterations_per_epoch=1, checkpoint_every=1)
PHASED = {"name": "heads-then-all", "description": "heads alone for half the budget, then everything",
          "source": "a test", "init": "pretrained", "optimizer": {"lr": 1e-3},
          "groups": {"head_multiplier": 10},
          "phases": [{"until": 0.5, "train": "heads", "rate": "linear-warmup"},
                     {"until": 1.0, "train": "all", "rate": "poly"}]}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    with planned_tiny_task(tmp_path_factory.mktemp("recipes")) as task:
        task.recipe_file = task.root / "phased.yaml"
        task.recipe_file.write_text(yaml.safe_dump(PHASED))
        yield task


@pytest.fixture
def fresh(task, tmp_path, monkeypatch) -> Paths:
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
    return Paths.from_env()


# --- recipes as data ------------------------------------------------------------------------------------------


def test_the_built_in_recipes_load_and_name_their_source():
    recipes = load_recipes()
    assert list(recipes) == ["segbook", "stunet-official", "scratch", "heads-only", "frozen-encoder", "llrd",
                             "warmup", "lora", "primus", "primus-scratch"]
    assert all(recipe.source and recipe.description for recipe in recipes.values())
    assert get_recipe(None, "pretrained").name == "segbook" and get_recipe(None, "scratch").name == "scratch"
    segbook = recipes["segbook"]
    assert segbook.rates(0, 1000) == {"body": 1e-3, "head": 1e-2}
    assert segbook.rates(500, 1000)["body"] == pytest.approx(1e-3 * 0.5 ** 0.9)
    assert recipes["stunet-official"].rates(0, 1000) == {"all": 1e-3}
    llrd = recipes["llrd"].rates(0, 1000)
    assert llrd["encoder.5"] == llrd["decoder"] == 1e-3 and llrd["encoder.0"] == pytest.approx(1e-3 * 0.8 ** 5)


@pytest.mark.parametrize("change,message", [
    ({"colour": "red"}, "colour.*Extra inputs are not permitted"),
    ({"name": "My_Recipe"}, "field 'name'.*lower-case"),
    ({"phases": [{"until": 0.5}]}, "the last at 1.0"),
    ({"phases": [{"until": 0.6}, {"until": 0.4}, {"until": 1.0}]}, "increasing"),
    ({"frozen": ["heads"]}, "heads are new for every task"),
    ({"init": "scratch", "frozen": ["encoder"]}, "a scratch recipe trains every part"),
    ({"optimizer": {"lr": -1}}, "optimizer.lr.*greater than 0"),
    ({"lora": {"rank": 0, "alpha": 1}}, "lora.rank"),
    ({"grad_clip_norm": -1}, "field 'grad_clip_norm'.*greater than 0"),
    ({"grad_clip_norm": 0}, "field 'grad_clip_norm'.*greater than 0"),
    ({"grad_clip_norm": "1"}, "field 'grad_clip_norm'.*valid number"),
    ({"grad_clip_norm": [1]}, "field 'grad_clip_norm'.*valid number"),
    ({"drop_path_rate": -0.1}, "field 'drop_path_rate'.*greater than or equal to 0"),
    ({"drop_path_rate": 1}, "field 'drop_path_rate'.*less than 1"),
    ({"drop_path_rate": "0.2"}, "field 'drop_path_rate'.*valid number"),
    ({"drop_path_rate": True}, "field 'drop_path_rate'.*valid number"),
])
def test_a_malformed_recipe_file_is_refused_naming_the_field(tmp_path, change, message):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**PHASED, **change}))
    with pytest.raises(RecipeError, match=message):
        read_recipe_file(path)


def test_clipping_and_drop_path_are_recipe_settings_of_the_runs_identity():
    """The Primus recipes clip at 1 (and, from scratch, drop paths at 0.2), the others at nnU-Net's 12; a recipe with
    a drop-path rate fits only a backbone that takes one; runs differing in either never share a fingerprint, and a
    run recorded before the fields existed reads nnU-Net's values."""
    from segbook import fingerprint
    from segbook.recipes import NNUNET_GRAD_CLIP_NORM, RecipeError

    recipes = load_recipes()
    assert (recipes["primus"].grad_clip_norm, recipes["primus"].drop_path_rate) == (1.0, None)
    assert (recipes["primus-scratch"].grad_clip_norm, recipes["primus-scratch"].drop_path_rate) == (1.0, 0.2)
    assert recipes["segbook"].grad_clip_norm == NNUNET_GRAD_CLIP_NORM == 12
    recipes["primus-scratch"].check_fits("primus-m", "scratch")
    dropping = recipes["scratch"].model_copy(update={"drop_path_rate": 0.1})
    with pytest.raises(RecipeError, match=r"drop_path_rate 0.1, and STU-Net tiny \(tiny\) takes no drop-path"):
        dropping.check_fits("tiny", "scratch")

    def digest(recipe) -> str:
        return fingerprint.digest(fingerprint.training_values({"run": {"init": "scratch", "plans": "nnUNetPlans"},
                                                               "recipe": recipe}))

    scratch = recipes["scratch"].model_dump(mode="json")
    older = {k: v for k, v in scratch.items() if k not in ("grad_clip_norm", "drop_path_rate")}
    assert digest(older) == digest(scratch)
    assert len({digest(scratch), digest({**scratch, "grad_clip_norm": 1.0}),
                digest({**scratch, "drop_path_rate": 0.2})}) == 3


def test_the_recipes_clip_norm_is_the_one_nnunets_step_clips_at():
    """`OptimiserGroups.clipping` around a real backward pass: nnU-Net's call with its 12 clips at the recipe's norm
    (the gradient's norm comes out at it), and at nnU-Net's own 12 the function is left alone."""
    from segbook.training.trainer_parts.optimiser import OptimiserGroups

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8)

    def nnunets_step() -> float:
        layer.zero_grad()
        (layer(torch.randn(4, 8)) * 100).sum().backward()
        torch.nn.utils.clip_grad_norm_(layer.parameters(), 12)  # as nnUNetTrainer.train_step calls it
        return float(torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in layer.parameters()])))

    nnunets = torch.nn.utils.clip_grad_norm_
    with OptimiserGroups(get_recipe("primus-scratch", "scratch"), 10).clipping():
        assert nnunets_step() == pytest.approx(1.0, rel=1e-5)
    assert torch.nn.utils.clip_grad_norm_ is nnunets
    with OptimiserGroups(get_recipe("scratch", "scratch"), 10).clipping():
        assert torch.nn.utils.clip_grad_norm_ is nnunets
        assert nnunets_step() == pytest.approx(12.0, rel=1e-5)


def test_a_repeated_key_or_a_clash_with_a_built_in_is_an_error(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text(yaml.safe_dump(PHASED) + "name: again\n")
    with pytest.raises(RecipeError, match="key 'name' appears twice"):
        read_recipe_file(path)
    clash = tmp_path / "clash.yaml"
    clash.write_text(yaml.safe_dump({**PHASED, "name": "segbook"}))
    with pytest.raises(RecipeError, match="recipe 'segbook' in .*clash.yaml differs from the one in built-in"):
        load_recipes([clash])


@pytest.mark.slow
def test_recipes_that_do_not_fit_the_run_are_refused_before_anything_is_written(task, fresh, capsys):
    cases = [(["--model", "tiny", "--recipe", "llrd"], "recipe 'llrd' is for pretrained runs, and this run is "
                                                       "scratch"),
             (["--model", "tiny", "--pretrained", "--recipe", "scratch", "--weights", str(task.weights)],
              "recipe 'scratch' is for scratch runs, and this run is pretrained"),
             (["--model", "nnunet", "--recipe", "lora"], "recipe 'lora' is for pretrained runs"),
             (["--model", "tiny", "--pretrained", "--recipe", "nope"], "unknown recipe 'nope'; known: segbook"),
             (["--model", "tiny", "--pretrained", "--recipe", "heads-then-all", "--recipe-file",
               str(task.root / "missing.yaml")], "cannot read recipe file")]
    for args, message in cases:
        code = main(["finetune", "--registry", str(task.registry_file), "--task", task.entry.key, "--device", "cpu",
                     *args])
        error = capsys.readouterr().err
        assert code == 2 and message in error and "Traceback" not in error, (args, error)
    wide = task.root / "wide.yaml"
    wide.write_text(yaml.safe_dump({**PHASED, "name": "wide-scratch", "init": "scratch", "phases": [{"until": 1.0}]}))
    code = main(["finetune", "--registry", str(task.registry_file), "--task", task.entry.key, "--device", "cpu",
                 "--model", "nnunet", "--recipe", "wide-scratch", "--recipe-file", str(wide)])
    assert code == 2 and "nnU-Net's default network does not name" in capsys.readouterr().err
    assert not fresh.results.exists() and not fresh.claims.exists()


def test_recipes_cli_lists_and_shows_resolved(capsys, tmp_path):
    assert main(["recipes", "--format", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in listed][:3] == ["segbook", "stunet-official", "scratch"]
    assert main(["recipes", "show", "warmup", "--epochs", "40"]) == 0
    shown = capsys.readouterr().out
    assert "epochs: 40" in shown and "epoch     0  linear-warmup trains heads         body 0, head 0.01" in shown


# --- recipes followed by real training --------------------------------------------------------------------------


def _pretrained(task) -> dict[str, torch.Tensor]:
    return {k: v for k, v in read_state_dict(task.weights).items() if not k.startswith("seg_outputs.")}


def _train(task, recipe: str, epochs: int = 3, **kwargs):
    files = [task.recipe_file] if recipe == PHASED["name"] else None
    return finetune(task.entry, "tiny", pretrained=recipe != "scratch", recipe=recipe, recipe_files=files,
                    settings=TrainingSettings(epochs=epochs, **TINY), weights=None if recipe == "scratch" else
                    task.weights, device="cpu", **kwargs)


def _final_weights(run) -> dict[str, torch.Tensor]:
    return read_run_checkpoint(run.folder / "checkpoint_final.pth")["network_weights"]


def _assert_rates_follow_the_recipe(manifest: RunManifest) -> None:
    recipe, epochs = manifest.recipe, manifest.recipe.budget.epochs
    for record in manifest.data["epochs"]:
        expected = {g: r for g, r in recipe.rates(record["epoch"], epochs).items()}
        assert record["learning_rates"] == pytest.approx(expected, rel=1e-12, abs=0), record["epoch"]


FROZEN_PARTS = {"segbook": set(), "stunet-official": set(), "llrd": set(), "warmup": set(),
                "heads-only": {"encoder", "decoder"}, "frozen-encoder": {"encoder"}}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(FROZEN_PARTS))
def test_each_recipe_trains_what_it_says_at_its_rates(task, fresh, recipe):
    run = _train(task, recipe, epochs=20 if recipe == "warmup" else 3)
    manifest = run.manifest
    assert manifest.status == "finished" and manifest.data["run"]["recipe"] == recipe
    assert manifest.data["recipe"]["name"] == recipe and manifest.recipe == get_recipe(recipe, "pretrained") \
        .with_overrides(epochs=manifest.recipe.budget.epochs, iterations_per_epoch=2)
    assert run.folder.parent.name.startswith("SegbookTrainer_tiny_pretrained" +
                                             ("" if recipe == "segbook" else f"_{recipe}") + "__")
    _assert_rates_follow_the_recipe(manifest)
    pretrained, final = _pretrained(task), _final_weights(run)
    frozen = FROZEN_PARTS[recipe]
    for key, value in pretrained.items():
        if part_of(key)[0] in frozen:
            assert torch.equal(final[key], value), key  # bit-identical
    trained = [k for k in pretrained if part_of(k)[0] not in frozen and k.endswith("conv1.weight")]
    assert all(not torch.equal(final[k], pretrained[k]) for k in trained)
    assert len(trained) == {"heads-only": 0, "frozen-encoder": 5}.get(recipe, 11)  # 6 encoder, 5 decoder stages
    counts = manifest.data["parameters"]
    total = sum(v.numel() for v in final.values())
    assert counts["trainable"] + counts["frozen"] == total
    assert counts["frozen"] == sum(v.numel() for k, v in pretrained.items() if part_of(k)[0] in frozen)


@pytest.mark.slow
def test_scratch_recipe_keeps_its_one_rate_and_folder(task, fresh):
    run = _train(task, "scratch", epochs=2)
    assert run.folder.parent.name == "SegbookTrainer_tiny_scratch__nnUNetPlans__3d_fullres"
    _assert_rates_follow_the_recipe(run.manifest)
    assert set(run.manifest.data["epochs"][0]["learning_rates"]) == {"all"}


@pytest.mark.slow
def test_a_phase_trains_only_its_parts(task, fresh):
    """Within the trainer: in the heads phase only the heads move (the body gets no gradient), then all do."""
    from nnunetv2.run.run_training import get_trainer_from_args

    from segbook.training.trainers import register_with_nnunet

    run = _train(task, PHASED["name"], epochs=4)
    _assert_rates_follow_the_recipe(run.manifest)
    rates = [e["learning_rates"] for e in run.manifest.data["epochs"]]
    assert [r["body"] for r in rates[:2]] == [0.0, 0.0] and all(r["body"] > 0 for r in rates[2:])
    register_with_nnunet()
    trainer = get_trainer_from_args(task.entry.nnunet_name, "3d_fullres", "all", run.spec.trainer,
                                    device=torch.device("cpu"))
    trainer.initialize()
    loader, _ = trainer.get_dataloaders()
    for epoch, body_moves in ((0, False), (2, True)):
        trainer.lr_scheduler.step(epoch)
        before = {k: v.clone() for k, v in trainer.network.state_dict().items()}
        trainer.train_step(next(loader))
        after = trainer.network.state_dict()
        body = [k for k in before if k.endswith("conv1.weight") and not k.startswith("seg_outputs.")]
        assert all(torch.equal(before[k], after[k]) != body_moves for k in body), epoch
        assert not torch.equal(before["seg_outputs.4.weight"], after["seg_outputs.4.weight"])


@pytest.mark.slow
def test_lora_trains_adapters_and_merges_into_a_checkpoint_nnunet_loads(task, fresh):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from segbook.training.trainers import register_with_nnunet

    run = _train(task, "lora", epochs=2)
    manifest = run.manifest
    assert "lora_merged" in [e["event"] for e in manifest.data["events"]]
    assert manifest.data["parameters"]["trainable"] < manifest.data["parameters"]["frozen"]
    pretrained, final = _pretrained(task), _final_weights(run)
    assert set(final) == set(pretrained) | {k for k in final if k.startswith("seg_outputs.")}  # plain keys only
    for key, value in pretrained.items():
        spatial = value.dim() == 5 and tuple(value.shape[2:]) == (3, 3, 3)
        assert torch.equal(final[key], value) != spatial, key  # adapters merged into 3x3x3 convs only
    summary = evaluate_run(task.entry, run.spec, device="cpu").summary  # segbook's safe predictor
    assert summary["num_cases"] == task.entry.test_cases

    register_with_nnunet()  # and nnU-Net's own, as nnUNetv2_predict sets it up (our own file: trusted here)
    predictor = nnUNetPredictor(device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(run.folder.parent), use_folds=("all",))
    case = sorted((Path(task.raw) / task.entry.nnunet_name / "imagesTs").glob("*.nii.gz"))[0]
    out = fresh.home / "predicted"
    predictor.predict_from_files([[str(case)]], [str(out / "case")], num_processes_preprocessing=1,
                                 num_processes_segmentation_export=1)
    assert (out / "case.nii.gz").is_file()


@pytest.mark.slow
def test_a_phased_run_killed_mid_phase_continues_on_the_uninterrupted_schedule(task, fresh):
    command = [sys.executable, "-m", "segbook.cli.main", "finetune", "--registry", str(task.registry_file),
               "--task", task.entry.key, "--model", "tiny", "--pretrained", "--weights", str(task.weights),
               "--recipe", PHASED["name"], "--recipe-file", str(task.recipe_file), "--device", "cpu",
               "--epochs", "8", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", "--checkpoint-every", "1"]
    folder = RunSpec.of(task.entry, "tiny", True, recipe=PHASED["name"]).folder(fresh.results)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        manifest = RunManifest.load(folder)
        if manifest and len(manifest.data.get("epochs", [])) >= 2 and (folder / "checkpoint_latest.pth").is_file():
            break
        time.sleep(0.1)
    assert process.poll() is None, "training ended before it could be killed"
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    killed_at = len(RunManifest.load(folder).data["epochs"])
    assert 2 <= killed_at < 8
    resumed = subprocess.run([*command, "--continue"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    manifest = RunManifest.load(folder)
    assert [e["epoch"] for e in manifest.data["epochs"]] == list(range(8))
    assert "resumed" in [e["event"] for e in manifest.data["events"]]
    _assert_rates_follow_the_recipe(manifest)
    assert json.loads((folder / "run.json").read_text())["recipe"]["phases"][0]["train"] == "heads"
