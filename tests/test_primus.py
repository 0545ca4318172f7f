"""Primus as built-in backbones: OpenMind's sizes (checked on the meta device), the Primus planner's patch, nnssl
Primus checkpoints loaded strictly (prefixes from the plan, pos_embed interpolated), wrong files refused."""

from __future__ import annotations

import pytest
import torch
from nnssl_helpers import TINY_PRIMUS_FILE, tiny_primus

from segbook import backbones
from segbook.backbones.models import count_cost, create_model, load_into
from segbook.backbones.nnssl import interpolate_pos_embed, read_nnssl_checkpoint, write_nnssl_primus_checkpoint
from segbook.checkpoint_plans import CheckpointPlanError
from segbook.primus_plans import primus_patch
from segbook.recipes import get_recipe
from stunet import CheckpointError


def test_primus_m_is_openminds_configuration_on_the_meta_device():
    network = create_model("primus-m", num_classes=3, device="meta")
    state = network.state_dict()
    assert state["eva.pos_embed"].shape == (1, 20 ** 3, 864)  # 160^3 / 8^3 tokens
    assert state["down_projection.proj.weight"].shape == (864, 1, 8, 8, 8)
    assert {int(k.split(".")[2]) for k in state if k.startswith("eva.blocks.")} == set(range(16))
    assert {"eva.blocks.0.gamma_1", "eva.blocks.0.attn.norm.weight"} <= set(state)  # init_values, scale_attn_inner
    assert network.eva.blocks[0].attn.num_heads == 12 and network.input_shape == (160, 160, 160)
    backbone = backbones.get("primus-m")
    assert backbone.cost == count_cost(backbone) and not backbone.deep_supervision
    assert backbone.plans == "SegbookPrimusPlans" and backbone.default_recipe("scratch") == "primus-scratch"
    for name, init in (("primus", "pretrained"), ("primus-scratch", "scratch")):
        get_recipe(name, init).check_fits("primus-m", init)


def test_the_primus_patch_is_the_planned_one_in_multiples_of_eight():
    assert primus_patch([28, 40, 44], [30, 50, 60]) == [24, 40, 40]
    assert primus_patch([128, 128, 128], [20, 300, 300]) == [24, 128, 128]
    with pytest.raises(CheckpointPlanError, match="too small for the network planned"):
        primus_patch([8, 64, 64], [1, 64, 64])


def test_a_task_too_small_for_primus_is_refused_before_anything_is_planned(segbook_home, tmp_path, capsys):
    """Issue 24: a scratch Primus run on a one-slice task is refused from the images' headers, naming the task,
    its smallest axis and the 8-voxel patch embedding, before a fingerprint, plans or a run folder exist."""
    from helpers import prepare_synthetic_task, tiny_spec

    from segbook.cli.main import main
    from segbook.paths import Paths

    registry, entry = prepare_synthetic_task(tmp_path, tiny_spec(size=(40, 40, 1), cases=4), plan=False)
    for command in (["finetune", "--model", "primus-s", "--device", "cpu"], ["plan", "--plans", "primus"]):
        assert main([*command, "--registry", str(registry), "--task", entry.key]) == 2
        error = capsys.readouterr().err
        assert error.startswith(f"segbook: error: {entry.key} is too small for Primus: ")
        assert "1 along its smallest axis, but Primus embeds 8-voxel patches (its smallest patch: 16" in error
    paths = Paths.from_env()
    assert not (paths.preprocessed / entry.nnunet_name).exists() and not (paths.results / entry.nnunet_name).exists()


def test_an_nnssl_primus_file_loads_its_encoder_and_interpolates_pos_embed(tmp_path):
    source = tiny_primus((32, 32, 32), seed=1)
    path = write_nnssl_primus_checkpoint(source, tmp_path / "primus.pth", (32, 32, 32), wrapper="encoder.")
    assert read_nnssl_checkpoint(path).metadata["key_to_lpe"] == "encoder.eva.pos_embed"
    network = tiny_primus((16, 24, 32), input_channels=2, num_classes=3)
    report = load_into(network, backbones.get("primus-tiny"), path)
    loaded, original = network.state_dict(), source.state_dict()
    body = [k for k in original if k.startswith(("eva.", "down_projection.")) and k != "eva.pos_embed"]
    assert all(torch.equal(loaded[k], original[k]) for k in body if k != "down_projection.proj.weight")
    assert torch.allclose(loaded["down_projection.proj.weight"], original["down_projection.proj.weight"].repeat(
        1, 2, 1, 1, 1) / 2)  # nnssl's rule: repeat and divide
    assert report.adapted == ["eva.pos_embed"] and torch.allclose(
        loaded["eva.pos_embed"], interpolate_pos_embed(original["eva.pos_embed"], (4, 4, 4), (2, 3, 4)))
    assert network(torch.zeros(1, 2, 16, 24, 32)).shape == (1, 3, 16, 24, 32)


def test_a_primus_file_of_another_size_is_refused_naming_what_does_not_fit(tmp_path):
    backbones.load_backbone_file(TINY_PRIMUS_FILE)
    wider = backbones.primus_backbone("primus-wide", 96, 2, 4)
    backbones.PRIMUS_SIZES["primus-wide"] = (96, 2, 4)
    path = write_nnssl_primus_checkpoint(tiny_primus(), tmp_path / "primus.pth", (32, 32, 32))
    from segbook.backbones.models import primus_network

    with pytest.raises(CheckpointError, match="embed dim 48, depth 2.*embed dim 96.*shape mismatches"):
        load_into(primus_network("primus-wide", (32, 32, 32), 1, 1), wider, path)


@pytest.mark.slow
def test_an_nnssl_primus_file_fine_tunes_on_a_small_task_from_its_weights(tmp_path):
    """The done-when case: a tiny Primus written in nnssl's layout at 32^3 fine-tunes (encoder frozen, so it must
    come out as loaded) on a task whose Primus plans fix another patch: eva blocks and down_projection equal the
    file's, pos_embed is the file's interpolated to the planned patch's tokens; the plans are Primus' own."""
    import json

    from helpers import planned_tiny_task, run_segbook, tiny_spec

    from segbook.paths import Paths
    from segbook.training.checkpoints import read_run_checkpoint

    with planned_tiny_task(tmp_path, tiny_spec(size=(32, 32, 24), cases=4), seed=3) as task:
        source = tiny_primus((32, 32, 32), seed=5)
        weights = write_nnssl_primus_checkpoint(source, tmp_path / "primus.pth", (32, 32, 32))
        run_segbook("finetune", "--registry", str(task.registry_file), "--task", task.entry.key, "--device", "cpu",
                    "--backbone-file", str(TINY_PRIMUS_FILE), "--model", "primus-tiny", "--pretrained",
                    "--weights", str(weights), "--recipe", "frozen-encoder", "--epochs", "1",
                    "--iters-per-epoch", "1", "--val-iters-per-epoch", "1")
        plans = json.loads((task.preprocessed / task.entry.nnunet_name / "SegbookPrimusPlans.json").read_text())
        configuration = plans["configurations"]["3d_fullres"]
        patch = configuration["patch_size"]
        assert all(p % 8 == 0 for p in patch) and configuration["data_identifier"] == "SegbookPrimusPlans_3d_fullres"
        folder = next(Paths.from_env().results.glob("*/SegbookTrainer_primus-tiny_pretrained_frozen-encoder__"
                                                   "SegbookPrimusPlans__3d_fullres")) / "fold_all"
        after = read_run_checkpoint(folder / "checkpoint_final.pth")["network_weights"]
        original = source.state_dict()
        body = [k for k in original if k.startswith(("eva.", "down_projection.")) and k != "eva.pos_embed"]
        assert all(torch.equal(original[k], after[k]) for k in body)
        grid = tuple(p // 8 for p in patch)
        assert after["eva.pos_embed"].shape[1] == grid[0] * grid[1] * grid[2]
        if grid != (4, 4, 4):
            assert torch.allclose(after["eva.pos_embed"],
                                  interpolate_pos_embed(original["eva.pos_embed"], (4, 4, 4), grid))


def test_a_recipes_drop_path_rate_reaches_primus_and_no_other_backbone():
    """dna's stochastic depth rises linearly over the EVA blocks to the recipe's rate; it adds no parameters (the
    same weights load with or without); a backbone whose builder takes none refuses it."""
    from types import SimpleNamespace

    from timm.layers import DropPath

    from segbook.backbones import BackboneError
    from segbook.backbones.models import build

    tiny_primus()  # registers primus-tiny
    configuration = SimpleNamespace(patch_size=(16, 16, 16))
    dropping = build(backbones.get("primus-tiny"), configuration, 1, 2, drop_path_rate=0.2)
    rates = [m.drop_prob for m in dropping.modules() if isinstance(m, DropPath)]
    assert rates == [pytest.approx(0.2)] * 2  # block 1 of 2 (block 0: rate 0, no module), attention and MLP
    plain = build(backbones.get("primus-tiny"), configuration, 1, 2)
    assert not any(isinstance(m, DropPath) for m in plain.modules())
    plain.load_state_dict(dropping.state_dict())
    with pytest.raises(BackboneError, match=r"STU-Net tiny \(tiny\) takes no drop-path rate"):
        build(backbones.get("tiny"), None, 1, 2, drop_path_rate=0.1)


@pytest.mark.slow
def test_primus_from_scratch_trains_with_the_recipes_clipping_and_drop_path(tmp_path, monkeypatch):
    """`primus-scratch` in a real (tiny, CPU) run: every training step's clip_grad_norm_ clips at the recipe's 1 and
    leaves a gradient norm of at most 1, the trainer's network drops paths at 0.2, and run.json records both."""
    from helpers import planned_tiny_task, tiny_spec
    from nnunetv2.run.run_training import get_trainer_from_args
    from timm.layers import DropPath

    from segbook.training.finetune import finetune
    from segbook.training.manifest import RunManifest
    from segbook.training.settings import TrainingSettings
    from segbook.training.trainers import register_with_nnunet

    calls = []
    nnunets = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = [p for p in parameters if p.grad is not None]
        total = nnunets(parameters, max_norm, *args, **kwargs)
        after = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in parameters]))
        calls.append((max_norm, float(total), float(after)))
        return total

    tiny_primus()  # registers primus-tiny
    with planned_tiny_task(tmp_path, tiny_spec(size=(32, 32, 24), cases=4), seed=3) as task:
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
        run = finetune(task.entry, "primus-tiny", pretrained=False, device="cpu",
                       settings=TrainingSettings(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1))
        monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", nnunets)
        assert [max_norm for max_norm, _, _ in calls] == [1.0, 1.0]
        assert all(after <= 1.0 + 1e-5 and after == pytest.approx(min(total, 1.0), rel=1e-4)
                   for _, total, after in calls)
        recorded = RunManifest.load(run.folder).data["recipe"]
        assert (recorded["grad_clip_norm"], recorded["drop_path_rate"]) == (1.0, 0.2)
        register_with_nnunet()
        task.patch.setenv("SEGBOOK_REGISTRY", str(task.registry_file))  # the trainer finds the run's task
        trainer = get_trainer_from_args(task.entry.nnunet_name, "3d_fullres", "all", run.spec.trainer,
                                        device=torch.device("cpu"))
        trainer.initialize()
        assert [m.drop_prob for m in trainer.network.modules() if isinstance(m, DropPath)] == [0.2, 0.2]


@pytest.mark.slow
def test_a_normalisation_mismatch_is_said_once_per_process_and_recorded_for_every_run(tmp_path, monkeypatch):
    """Two fine-tunes of one z-score-pretrained nnssl file on one CT task in one process (two seeds): one warning
    line, and each run's run.json records both normalisations."""
    from helpers import planned_tiny_task, tiny_spec

    from segbook.training import finetune as finetuning
    from segbook.training.manifest import RunManifest
    from segbook.training.settings import TrainingSettings

    monkeypatch.setattr(finetuning, "_SAID_NORMALIZATION", set())  # what earlier tests of this process said
    with planned_tiny_task(tmp_path, tiny_spec(size=(32, 32, 24), cases=4), seed=3) as task:
        weights = write_nnssl_primus_checkpoint(tiny_primus((32, 32, 32), seed=5), tmp_path / "primus.pth",
                                                (32, 32, 32))
        said: list[str] = []
        runs = [finetuning.finetune(task.entry, "primus-tiny", pretrained=True, seed=seed, weights=weights,
                                    device="cpu", say=said.append,
                                    settings=TrainingSettings(epochs=1, iterations_per_epoch=1,
                                                              val_iterations_per_epoch=1)) for seed in (0, 1)]
    warnings = [line for line in said if "was pretrained on ZScoreNormalization" in line]
    assert len(warnings) == 1 and warnings[0].startswith(f"segbook: warning: {task.entry.key} is normalised per "
                                                         "its plans (CT CTNormalization)")
    assert len({run.folder for run in runs}) == 2
    for run in runs:
        normalization = RunManifest.load(run.folder).data["normalization"]
        assert normalization["pretraining"]["schemes"] == ["ZScoreNormalization"]
        assert normalization["fine_tuning"]["schemes"] == ["CTNormalization"]
