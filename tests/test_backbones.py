"""The backbone registry: built-in families, nnU-Net's ResEnc networks as nnU-Net builds them, strict checkpoint
loading across families, recipes that fit or not, and the catalogued costs."""

from __future__ import annotations

import json
import os
import runpy
from pathlib import Path

import pytest
import torch
from helpers import planned_tiny_task, run_segbook, tiny_spec, use_planned_task

from segbook import backbones, fingerprint
from segbook.backbones.models import check_fits, count_cost, create_model, load_into
from segbook.backbones.nnssl import write_nnssl_checkpoint
from segbook.recipes import RecipeError, get_recipe
from segbook.runs import MODELS, Identity, RunIdentityError, valid_combinations
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.manifest import RunManifest
from segbook.training.trainers import EXTERNAL_TRAINER_FOLDER
from stunet import CheckpointError, create_stunet, read_state_dict, write_official_checkpoint
from stunet.checkpoints import file_sha256


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A tiny task planned by nnU-Net's default planner and by nnUNetPlannerResEncL."""
    from segbook.plan import plan_task

    with planned_tiny_task(tmp_path_factory.mktemp("backbones"), tiny_spec(), seed=11) as task:
        task.resenc_plan = plan_task(task.entry, planner="resenc-l", progress=False, fingerprint_samples=1000)
        yield task


def _configuration(plan):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(str(plan.plans_file)).get_configuration("3d_fullres")


def test_registry_keeps_the_existing_models_and_adds_resenc():
    assert MODELS == ("tiny", "small", "base", "large", "huge", "nnunet", "resenc-m", "resenc-l", "primus-s",
                      "primus-b", "primus-m", "primus-l")
    assert backbones.get("resenc-l").plans == "nnUNetResEncUNetLPlans"
    assert backbones.get("resenc-m").planner == "resenc-m"
    assert ("resenc-l", "pretrained") in valid_combinations() and ("nnunet", "pretrained") not in valid_combinations()
    assert Identity("large", "pretrained").trainer == "SegbookTrainer_large_pretrained"
    assert Identity("resenc-l", "scratch").trainer == "SegbookTrainer_resenc-l_scratch"
    with pytest.raises(RunIdentityError, match="nnU-Net's default network has no pretrained weights"):
        Identity("nnunet", "pretrained")
    with pytest.raises(backbones.BackboneError, match="unknown model 'giant'"):
        backbones.get("giant")
    with pytest.raises(backbones.BackboneError, match="--plans paper varies nnU-Net's default planner"):
        backbones.planner_for("resenc-l", "paper")
    assert backbones.planner_for("large", "paper") == "paper" and backbones.planner_for("resenc-m") == "resenc-m"


def test_nnunet_trainer_lookup_finds_a_hyphenated_model_name():
    """A `-` cannot be in a Python identifier, but nnU-Net looks trainers up with getattr on the module, which
    segbook's module answers for every trainer name."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    found = recursive_find_python_class(str(EXTERNAL_TRAINER_FOLDER), "SegbookTrainer_resenc-l_pretrained",
                                        current_module=None)
    assert found.__name__ == "SegbookTrainer_resenc-l_pretrained"
    assert found.identity == Identity("resenc-l", "pretrained")
    assert found.__mro__[1].__name__ == "BackboneTrainer"
    from segbook.training.trainers import STUNetTrainer, trainer_class

    assert trainer_class("SegbookTrainer_large_pretrained").__mro__[1] is STUNetTrainer  # its backbone's `trainer`


@pytest.mark.slow
def test_resenc_is_the_network_nnunet_builds_from_the_same_plans(task):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from segbook.plan import load_plan

    assert task.resenc_plan.plans_identifier == "nnUNetResEncUNetLPlans"
    configuration = _configuration(task.resenc_plan)
    ours = create_model("resenc-l", input_channels=1, num_classes=4, configuration=configuration)
    theirs = get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                    configuration.network_arch_init_kwargs_req_import, 1, 4, deep_supervision=True)
    assert type(ours) is type(theirs) and type(ours).__name__ == "ResidualEncoderUNet"
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    with pytest.raises(backbones.BackboneError, match="needs ResEnc plans"):
        create_model("resenc-l", configuration=_configuration(load_plan(task.entry)), device="meta")


NNUNET_PLANS = {"configurations": {
    "3d_fullres": {"normalization_schemes": ["CTNormalization", "ZScoreNormalization"],
                   "use_mask_for_norm": [False, True], "spacing": [2.5, 0.8, 0.8], "batch_size": 2},
    "3d_fullres_bs4": {"inherits_from": "3d_fullres", "batch_size": 4}}}


def _nnunet_file(path: Path, init_args: dict) -> Path:
    """An nnU-Net v2 training checkpoint's layout (nnUNetTrainer.save_checkpoint, 2.8.1 L1195-1215), tiny weights."""
    from nnssl_helpers import resenc

    torch.save({"network_weights": resenc(num_classes=2).state_dict(), "optimizer_state": {}, "logging": {},
                "current_epoch": 3, "init_args": init_args, "trainer_name": "nnUNetTrainer",
                "grad_scaler_state": None, "_best_ema": None, "inference_allowed_mirroring_axes": (0, 1, 2)}, path)
    return path


def test_an_nnunet_checkpoint_says_how_its_training_normalised_and_a_malformed_record_is_warned(tmp_path):
    """nnU-Net v2 `.pth`: `init_args.plans.configurations[init_args.configuration]` (inheritance followed) gives the
    schemes, mask flags and spacing; a record that is not nnU-Net's is ignored with one warning line, the weights
    still read; a file without init_args says nothing."""
    from segbook.backbones.models import checkpoint_facts

    resenc_l = backbones.get("resenc-l")
    good = _nnunet_file(tmp_path / "good.pth", {"plans": NNUNET_PLANS, "configuration": "3d_fullres_bs4",
                                                "fold": 0, "dataset_json": {}, "device": torch.device("cpu")})
    facts = checkpoint_facts(resenc_l, good)
    assert (facts.format, facts.warnings) == ("nnunet", ())
    assert facts.pretraining == {"schemes": ["CTNormalization", "ZScoreNormalization"],
                                 "use_mask_for_norm": [False, True], "spacing_mm": [2.5, 0.8, 0.8],
                                 "source": "init_args", "configuration": "3d_fullres_bs4", "checkpoint": "good.pth"}
    full = NNUNET_PLANS["configurations"]["3d_fullres"]
    malformed = {
        "scheme-string": ({**full, "normalization_schemes": "CTNormalization"}, "not a list of scheme names"),
        "unknown-scheme": ({**full, "normalization_schemes": ["CTNormalization", "nonCT"]}, "unknown scheme(s)"),
        "masks": ({**full, "use_mask_for_norm": [False]}, "not one boolean per scheme"),
        "mask-strings": ({**full, "use_mask_for_norm": ["no", "no"]}, "not one boolean per scheme"),
        "no-schemes": ({k: v for k, v in full.items() if k != "normalization_schemes"}, "not a list of scheme names"),
    }
    for name, (configuration, message) in malformed.items():
        path = _nnunet_file(tmp_path / f"{name}.pth", {"plans": {"configurations": {"3d_fullres": configuration}},
                                                       "configuration": "3d_fullres"})
        facts = checkpoint_facts(resenc_l, path)
        assert facts.pretraining is None and len(facts.warnings) == 1, name
        assert facts.warnings[0].startswith(f"{path}: its training normalisation is not recorded: ") and \
            message in facts.warnings[0], name
    elsewhere = {"missing": ({"plans": NNUNET_PLANS, "configuration": "2d"}, "hold no configuration '2d'"),
                 "not-a-name": ({"plans": NNUNET_PLANS, "configuration": 3}, "names configuration 3"),
                 "no-configurations": ({"plans": {"configurations": []}, "configuration": "3d_fullres"},
                                       "no 'configurations' mapping"),
                 "cycle": ({"plans": {"configurations": {"a": {"inherits_from": "b"}, "b": {"inherits_from": "a"}}},
                            "configuration": "a"}, "is circular")}
    for name, (init_args, message) in elsewhere.items():
        facts = checkpoint_facts(resenc_l, _nnunet_file(tmp_path / f"{name}.pth", init_args))
        assert facts.pretraining is None and message in " ".join(facts.warnings), name
    silent = checkpoint_facts(resenc_l, _nnunet_file(tmp_path / "bare.pth", {}))
    assert (silent.pretraining, silent.warnings) == (None, ())


@pytest.mark.slow
def test_a_resenc_checkpoint_loads_with_fresh_head_and_a_tiled_stem(tmp_path):
    torch.manual_seed(0)
    pretrained = create_model("resenc-l", input_channels=1, num_classes=7)
    path = tmp_path / "resenc.pth"
    torch.save({"network_weights": pretrained.state_dict(), "trainer_name": "nnUNetTrainer"}, path)
    torch.manual_seed(1)
    network = create_model("resenc-l", input_channels=2, num_classes=3)
    fresh_head = network.decoder.seg_layers[-1].weight.clone()
    report = load_into(network, backbones.get("resenc-l"), path)
    body = {k: v for k, v in pretrained.state_dict().items() if not k.startswith("decoder.seg_layers.")}
    loaded = network.state_dict()
    for key, value in body.items():
        if key.endswith(("stem.convs.0.conv.weight", "stem.convs.0.all_modules.0.weight")):
            assert torch.equal(loaded[key], value.repeat(1, 2, 1, 1, 1)), key
        else:
            assert torch.equal(loaded[key], value), key
    assert torch.equal(network.decoder.seg_layers[-1].weight, fresh_head)
    assert "encoder.stem.convs.0.conv.weight" in report.tiled


@pytest.mark.slow
def test_a_checkpoint_without_the_aliased_decoder_keys_still_loads(tmp_path):
    """dynamic_network_architectures' decoder holds the encoder, so its state_dict names every encoder tensor
    twice; a checkpoint that names them once (as a pretraining framework may save them) is complete."""
    pretrained = create_model("resenc-m", num_classes=2)
    path = tmp_path / "encoder_once.pth"
    torch.save({k: v for k, v in pretrained.state_dict().items() if not k.startswith("decoder.encoder.")}, path)
    network = create_model("resenc-m", pretrained=path, num_classes=2)
    assert torch.equal(network.decoder.encoder.stem.convs[0].conv.weight, pretrained.encoder.stem.convs[0].conv.weight)


@pytest.mark.slow
def test_a_checkpoint_of_another_backbone_is_refused_naming_both(tmp_path):
    stunet_file = write_official_checkpoint(create_stunet("tiny", 1, 105, device="meta").to_empty(device="cpu")
                                            .state_dict(), tmp_path / "tiny.model")
    with pytest.raises(CheckpointError, match=r"holds STU-Net tiny .*, but the network is nnU-Net ResEnc-L: a "
                                              r"ResEnc U-Net \(6 stages.*unexpected key conv_blocks_context"):
        check_fits(backbones.get("resenc-l"), stunet_file, 1, 3)
    resenc_file = tmp_path / "resenc.pth"
    torch.save(create_model("resenc-l", num_classes=2).state_dict(), resenc_file)
    with pytest.raises(CheckpointError, match=r"holds a ResEnc U-Net \(6 stages, widths 32..320, encoder blocks "
                                              r"1-3-4-6-6-6, 1 input channel\(s\)\), but the network is STU-Net large"):
        check_fits(backbones.get("large"), resenc_file, 1, 3)
    with pytest.raises(CheckpointError, match="missing key"):
        truncated = tmp_path / "truncated.pth"
        weights = create_model("resenc-l", num_classes=2).state_dict()
        torch.save({k: v for k, v in weights.items() if "stages.5" not in k}, truncated)
        check_fits(backbones.get("resenc-l"), truncated, 1, 3)


@pytest.mark.slow
def test_an_nnssl_checkpoint_loads_through_the_registry_encoder_only(task, tmp_path):
    """The OpenMind/nnssl format is read by ResEnc's first format: the stem and encoder come from the file (the stem
    divided over two channels, as nnssl's fine-tuning does by default), decoder and heads stay as initialised."""
    configuration = _configuration(task.resenc_plan)
    torch.manual_seed(0)
    pretrained = create_model("resenc-l", input_channels=1, num_classes=4, configuration=configuration)
    path = write_nnssl_checkpoint(pretrained, tmp_path / "openmind.pth")
    torch.manual_seed(1)
    network = create_model("resenc-l", input_channels=2, num_classes=3, configuration=configuration)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    report = load_into(network, backbones.get("resenc-l"), path)
    loaded, source = network.state_dict(), pretrained.state_dict()
    stem = "encoder.stem.convs.0.conv.weight"
    assert torch.allclose(loaded[stem], source[stem].repeat(1, 2, 1, 1, 1) / 2) and stem in report.tiled
    first_conv = backbones.get("resenc-l").first_conv
    encoder = [k for k in source if k.startswith("encoder.") and k not in first_conv]
    assert encoder and all(torch.equal(loaded[k], source[k]) for k in encoder)
    assert all(torch.equal(loaded[k], before[k]) for k in loaded
               if k.startswith(("decoder.stages.", "decoder.seg_layers.")))
    check_fits(backbones.get("resenc-l"), path, 2, 3, configuration)
    with pytest.raises(CheckpointError, match="holds"):
        check_fits(backbones.get("resenc-l"), path, 2, 3)  # the reference ResEnc-L: six stages, not the tiny plans'


def test_recipes_declare_what_they_need_of_a_backbone():
    get_recipe("frozen-encoder", "pretrained").check_fits("resenc-l", "pretrained")
    get_recipe("lora", "pretrained").check_fits("resenc-l", "pretrained")
    with pytest.raises(RecipeError, match="decays the rate over 6 encoder stages, and nnU-Net ResEnc-L has a number "
                                          "of encoder stages its plans decide"):
        get_recipe("llrd", "pretrained").check_fits("resenc-l", "pretrained")
    get_recipe("llrd", "pretrained").check_fits("large", "pretrained")
    get_recipe("scratch", "scratch").check_fits("nnunet", "scratch")


def test_catalogued_costs_are_the_counted_ones():
    for name in ("tiny", "small", "resenc-m", "resenc-l"):
        backbone = backbones.get(name)
        assert backbone.cost == count_cost(backbone), name


EXAMPLE = Path(__file__).resolve().parents[1] / "docs" / "examples" / "my_backbone.py"


def _finetune(task, *args: str) -> None:
    run_segbook("finetune", "--registry", str(task.registry_file), "--task", task.entry.key, "--device", "cpu",
                "--epochs", "1", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", *args)


@pytest.mark.slow
def test_the_documented_example_backbone_trains_and_fine_tunes_end_to_end(task, tmp_path, monkeypatch):
    """docs/backbones.md's example file, through `segbook finetune` as a user runs it: from scratch, then
    fine-tuned from that run's checkpoint with its encoder frozen (so the encoder must come out unchanged)."""
    paths = use_planned_task(task, tmp_path, monkeypatch)
    _finetune(task, "--backbone-file", str(EXAMPLE), "--model", "my-unet", "--scratch")
    scratch = paths.results / task.entry.nnunet_name / "SegbookTrainer_my-unet_scratch__nnUNetPlans__3d_fullres"
    recorded = RunManifest.load(scratch / "fold_all")
    assert recorded.status == "finished" and recorded.data["backbone"]["source"] == {
        "kind": "file", "path": str(EXAMPLE.resolve()), "sha256": file_sha256(EXAMPLE)}
    # a new shell, no --backbone-file: evaluation finds the backbone its run recorded
    monkeypatch.delenv(backbones.FILES_VARIABLE, raising=False)
    run_segbook("evaluate", "--registry", str(task.registry_file), "--task", task.entry.key, "--model", "my-unet",
                "--scratch", "--device", "cpu")
    assert (scratch / "fold_all" / "evaluation" / "summary.json").is_file()
    final = scratch / "fold_all" / "checkpoint_final.pth"
    _finetune(task, "--backbone-file", str(EXAMPLE), "--model", "my-unet", "--pretrained", "--weights", str(final),
              "--recipe", "frozen-encoder")
    tuned = paths.results / task.entry.nnunet_name / \
        "SegbookTrainer_my-unet_pretrained_frozen-encoder__nnUNetPlans__3d_fullres" / "fold_all"
    manifest = RunManifest.load(tuned)
    assert manifest.status == "finished"
    assert any(event["event"] == "pretrained_weights_loaded" for event in manifest.data["events"])
    before = read_run_checkpoint(final)["network_weights"]
    after = read_run_checkpoint(tuned / "checkpoint_final.pth")["network_weights"]
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("stem.", "down.")))
    assert not torch.equal(before["fuse.0.weight"], after["fuse.0.weight"])  # the decoder trained
    listing = json.loads(run_segbook("models", "--backbone-file", str(EXAMPLE), "--format", "json").stdout)
    mine = next(row for row in listing if row["model"] == "my-unet")
    network = runpy.run_path(str(EXAMPLE))["MyUNet"](1, 105)  # the listing's default channels and classes
    assert mine["parameters"] == sum(p.numel() for p in network.parameters())
    assert {row["model"] for row in listing} >= {"large", "nnunet", "resenc-m", "resenc-l", "my-unet"}


@pytest.mark.slow
def test_resenc_trains_on_its_own_plans_and_fine_tunes_from_weights(task, tmp_path, monkeypatch):
    """`finetune --model resenc-l` from scratch on nnUNetResEncUNetLPlans, then `--pretrained --weights` from that
    run's nnU-Net checkpoint with the encoder frozen: the encoder comes out as the checkpoint has it."""
    paths = use_planned_task(task, tmp_path, monkeypatch)
    _finetune(task, "--model", "resenc-l", "--scratch")
    folder = paths.results / task.entry.nnunet_name / "SegbookTrainer_resenc-l_scratch__nnUNetResEncUNetLPlans__" \
        "3d_fullres" / "fold_all"
    manifest = RunManifest.load(folder)
    assert manifest.status == "finished" and manifest.data["run"]["plans"] == "nnUNetResEncUNetLPlans"
    weights = read_run_checkpoint(folder / "checkpoint_final.pth")["network_weights"]
    expected = create_model("resenc-l", num_classes=len(task.entry.labels), device="meta",
                            configuration=_configuration(task.resenc_plan)).state_dict()
    assert {k: v.shape for k, v in weights.items()} == {k: v.shape for k, v in expected.items()}

    _finetune(task, "--model", "resenc-l", "--pretrained", "--weights", str(folder / "checkpoint_final.pth"),
              "--recipe", "frozen-encoder")
    tuned = paths.results / task.entry.nnunet_name / "SegbookTrainer_resenc-l_pretrained_frozen-encoder__" \
        "nnUNetResEncUNetLPlans__3d_fullres" / "fold_all"
    tuned_record = RunManifest.load(tuned)
    assert tuned_record.status == "finished"
    pretraining = tuned_record.data["normalization"]["pretraining"]  # as the nnU-Net file's init_args say
    assert pretraining["source"] == "init_args" and pretraining["schemes"] == task.resenc_plan.normalization
    assert pretraining["spacing_mm"] == pytest.approx(task.resenc_plan.spacing)
    after = read_run_checkpoint(tuned / "checkpoint_final.pth")["network_weights"]
    assert all(torch.equal(weights[k], after[k]) for k in weights if k.startswith("encoder."))
    assert not all(torch.equal(weights[k], after[k]) for k in weights if k.startswith("decoder.stages."))

    openmind = write_nnssl_checkpoint(weights, tmp_path / "openmind.pth")  # the same weights in nnssl's format
    _finetune(task, "--model", "resenc-l", "--pretrained", "--weights", str(openmind), "--recipe", "frozen-encoder",
              "--seeds", "1")
    from_nnssl = tuned.parent.parent / "SegbookTrainer_resenc-l_pretrained_frozen-encoder_seed1__" \
        "nnUNetResEncUNetLPlans__3d_fullres" / "fold_all"
    assert RunManifest.load(from_nnssl).status == "finished"
    after = read_run_checkpoint(from_nnssl / "checkpoint_final.pth")["network_weights"]
    assert all(torch.equal(weights[k], after[k]) for k in weights if k.startswith("encoder."))


@pytest.mark.slow
def test_batch_estimates_count_each_backbone_on_its_own_plans(task, tmp_path, monkeypatch):
    from segbook.batch.estimate import ForwardFlops, task_geometry
    from stunet import count_forward_macs

    paths = use_planned_task(task, tmp_path, monkeypatch)
    resenc = task_geometry(task.entry, paths, "resenc-l")
    default = task_geometry(task.entry, paths)
    assert resenc.plans_file.endswith("nnUNetResEncUNetLPlans.json") and default.plans_file.endswith("nnUNetPlans.json")
    flops = ForwardFlops()
    network = create_model("resenc-l", num_classes=4, device="meta", configuration=_configuration(task.resenc_plan))
    assert flops("resenc-l", resenc, 1, 4) == 2 * count_forward_macs(network, (1, 1, *resenc.patch))
    assert flops("large", default, 1, 4) != flops("resenc-l", resenc, 1, 4)


@pytest.mark.slow
def test_a_matrix_mixes_backbones_each_on_its_plans(task, tmp_path, monkeypatch):
    from segbook.batch.matrix import build_matrix, weights_problem
    from segbook.batch.preparation import planners_of, unprepared
    from segbook.registry import load_registry

    paths = use_planned_task(task, tmp_path, monkeypatch)
    registry = load_registry([task.registry_file])
    jobs = build_matrix(registry, task.entry.key, models="large,resenc-l,nnunet")
    assert {(j.spec.model, j.spec.init, j.spec.plans) for j in jobs} == {
        ("large", "pretrained", "nnUNetPlans"), ("large", "scratch", "nnUNetPlans"),
        ("resenc-l", "pretrained", "nnUNetResEncUNetLPlans"), ("resenc-l", "scratch", "nnUNetResEncUNetLPlans"),
        ("nnunet", "scratch", "nnUNetPlans")}
    assert planners_of(jobs) == ("default", "resenc-l")
    assert unprepared(task.entry, paths, ["all"], planners=planners_of(jobs)) is None  # the fixture planned both
    assert "not planned with the resenc-m planner" in unprepared(task.entry, paths, ["all"], planners=("resenc-m",))
    resenc = next(j for j in jobs if j.spec.model == "resenc-l" and j.spec.init == "pretrained")
    assert weights_problem(resenc, paths, None) == ("weights missing: nnU-Net ResEnc-L has no official checkpoint; "
                                                    "pass --weights FILE")
    with pytest.raises(RecipeError, match="recipe 'llrd' decays the rate over 6 encoder stages"):
        build_matrix(registry, task.entry.key, models="large,resenc-l", recipes="llrd")


@pytest.mark.slow
def test_a_batch_mixing_backbones_checks_each_models_weights_before_anything_runs(task, tmp_path, monkeypatch):
    """`--weights tiny=FILE --weights resenc-l=FILE`: each pretrained job is checked against its own file (ResEnc-L
    against the task's ResEnc plans), and a file given to the wrong model is refused naming both networks."""
    from segbook.batch.execute import ExecutionOptions
    from segbook.batch.matrix import build_matrix
    from segbook.batch.weights import WeightsProblem, check_weights
    from segbook.registry import load_registry

    paths = use_planned_task(task, tmp_path, monkeypatch)
    jobs = build_matrix(load_registry([task.registry_file]), task.entry.key, models="tiny,resenc-l",
                        inits="pretrained")
    network = create_model("resenc-l", num_classes=len(task.entry.labels),
                           configuration=_configuration(task.resenc_plan))
    openmind = write_nnssl_checkpoint(network, tmp_path / "openmind.pth")
    mixed = ExecutionOptions.create(weights=[f"tiny={task.weights}", f"resenc-l={openmind}"])
    check_weights(jobs, mixed.weights_for, paths, say=lambda line: None)
    swapped = ExecutionOptions.create(weights=[f"tiny={openmind}", f"resenc-l={task.weights}"])
    with pytest.raises(WeightsProblem, match="STU-Net tiny"):
        check_weights(jobs, swapped.weights_for, paths, say=lambda line: None)
    with pytest.raises(WeightsProblem, match="STU-Net tiny has no official pretrained checkpoint"):
        check_weights(jobs, ExecutionOptions.create(weights=[f"resenc-l={openmind}"]).weights_for, paths,
                      say=lambda line: None)  # tiny's job has no file: the others' are not lent to it
    deeper = write_nnssl_checkpoint(create_model("resenc-l", num_classes=3), tmp_path / "reference.pth")
    resenc = [job for job in jobs if job.spec.model == "resenc-l"]
    with pytest.raises(WeightsProblem, match="holds"):  # the reference ResEnc-L: not the tiny task's stages
        check_weights(resenc, ExecutionOptions.create(weights=[f"resenc-l={deeper}"]).weights_for, paths,
                      say=lambda line: None)


#: A user's backbone that declares what the built-in ones do: its own default recipe for fine-tuning, parts with six
#: encoder stages (so layer-wise decay fits it), a table position and a colour.
LAB_NET = """
from torch import nn

from segbook.backbones import Backbone, Parts


class LabNet(nn.Module):
    def __init__(self, channels, classes):
        super().__init__()
        self.encoder = nn.ModuleList([nn.Conv3d(channels if stage == 0 else 4, 4, 3, padding=1) for stage in range(6)])
        self.decoder = nn.Conv3d(4, 4, 1)
        self.head = nn.Conv3d(4, classes, 1)

    def forward(self, x):
        for stage in self.encoder:
            x = stage(x)
        return self.head(self.decoder(x))


def build(model, configuration, input_channels, num_classes, deep_supervision):
    return LabNet(input_channels, num_classes)


BACKBONES = [Backbone(name="lab-net", family="My lab", title="Lab-Net", build=build, deep_supervision=False,
                      default_recipes=(("pretrained", "frozen-encoder"), ("scratch", "scratch")),
                      parts=Parts(("encoder.",), ("decoder.",), ("head.",), encoder_stages=6),
                      first_conv=("encoder.0.weight",), classifier="head", checkpoint_formats=("state_dict",),
                      table_order=-1, colour="#123456")]
"""


@pytest.fixture
def lab_net(tmp_path, monkeypatch):
    """LAB_NET's file, loaded into a copy of the registry that the test's end restores."""
    monkeypatch.setattr(backbones, "_registry", backbones._Registry(dict(backbones._registry.backbones)))
    monkeypatch.delenv(backbones.FILES_VARIABLE, raising=False)
    path = tmp_path / "lab_net.py"
    path.write_text(LAB_NET)
    backbones.load_backbone_file(path)
    return path


def test_a_user_backbone_is_a_full_citizen(lab_net, segbook_home, tmp_path, capsys):
    """Its own default recipe names its runs the same in `finetune` and in a batch, its estimate is counted from its
    network, its parts give recipes their stages, and the results tables show it where and as it says."""
    import warnings

    from store_helpers import write_evaluated_run
    from results_helpers import A, write_registry

    from segbook.batch.estimate import estimate_jobs
    from segbook.batch.execute import ExecutionOptions
    from segbook.batch.matrix import build_matrix
    from segbook.cli.main import main
    from segbook.paths import Paths
    from segbook.registry import load_registry
    from segbook.results import collect_results, scale_table
    from segbook.results.collect import ResultsWarning
    from segbook.runs import RunSpec

    registry = load_registry()
    entry = registry.get("613")
    jobs = build_matrix(registry, "613", models="lab-net")
    assert [(j.spec.init, j.spec.recipe, j.spec.trainer) for j in jobs] == [
        ("pretrained", "frozen-encoder", "SegbookTrainer_lab-net_pretrained"),
        ("scratch", "scratch", "SegbookTrainer_lab-net_scratch")]
    assert [j.spec.trainer for j in jobs] == [RunSpec.of(entry, "lab-net", init).trainer  # what finetune names
                                              for init in ("pretrained", "scratch")]
    (segbook,) = build_matrix(registry, "613", models="lab-net", inits="pretrained", recipes="segbook")
    assert segbook.spec.trainer == "SegbookTrainer_lab-net_pretrained_segbook"
    assert main(["batch", "plan", "--backbone-file", str(lab_net), "--tasks", "613", "--models", "lab-net",
                 "--format", "json"]) == 0
    planned = json.loads(capsys.readouterr().out)["jobs"]
    assert [row["job"] for row in planned] == [j.id for j in jobs] and all(row["gpu_hours"] for row in planned)
    estimates = estimate_jobs(jobs, ExecutionOptions().settings_for, Paths.from_env())
    assert all(e is not None and e.forward_flops > 0 for e in estimates.values())

    parts = backbones.get("lab-net").parts
    assert parts.part_of("encoder.3.weight") == ("encoder", 3) and parts.part_of("head.bias") == ("heads", None)
    get_recipe("llrd", "pretrained").check_fits("lab-net", "pretrained")

    store = Paths.from_env(), load_registry([write_registry(tmp_path / "registry.yaml")])
    for model, init, dice in (("lab-net", "scratch", 0.6), ("lab-net", "pretrained", 0.7), ("base", "scratch", 0.5)):
        write_evaluated_run(store[0].results, store[1], A, model, init, dice)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResultsWarning)  # its default recipe's runs are the ones shown, unasked
        table = scale_table(collect_results(*store))
    assert [tuple(row[:2]) for row in table.rows] == [("lab-net", "scratch"), ("lab-net", "pretrained"),
                                                      ("lab-net", "Delta(PT)"), ("base", "scratch")]
    assert table.display["model"]["lab-net"] == "Lab-Net" and backbones.colour("lab-net") == "#123456"


@pytest.mark.slow
def test_an_installed_package_adds_backbones_through_the_entry_point_group(tmp_path, monkeypatch):
    """A package declaring `[segbook.backbones] my = my_backbone:BACKBONES` (here: its installed metadata on the
    path) shows up in `segbook models`, in a fresh process as a user would run it."""
    site = tmp_path / "site"
    (site / "labnet-1.0.dist-info").mkdir(parents=True)
    (site / "labnet-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: labnet\nVersion: 1.0\n")
    (site / "labnet-1.0.dist-info" / "entry_points.txt").write_text(
        "[segbook.backbones]\nmy = labnet_backbone:BACKBONES\n")
    (site / "labnet_backbone.py").write_text(EXAMPLE.read_text().replace('name="my-unet"', 'name="lab-unet"'))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    listing = json.loads(run_segbook("models", "--format", "json").stdout)
    row = next(row for row in listing if row["model"] == "lab-unet")
    assert row["source"] == "entry point labnet_backbone:BACKBONES" and row["family"] == "My lab"


def test_a_backbone_file_that_defines_none_or_a_taken_name_is_a_clear_error(tmp_path, capsys):
    from segbook.cli.main import main

    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert main(["models", "--backbone-file", str(empty)]) == 2
    assert f"backbone file {empty} defines no BACKBONES" in capsys.readouterr().err
    clash = tmp_path / "clash.py"
    clash.write_text(EXAMPLE.read_text().replace('name="my-unet"', 'name="large"'))
    assert main(["models", "--backbone-file", str(clash)]) == 2
    assert "defines backbone 'large', which is already defined (built in)" in capsys.readouterr().err


# --- a user's backbone found again from what its runs recorded -----------------------------------------------


@pytest.fixture
def lab_net_runs(tmp_path, monkeypatch, segbook_home):
    """Evaluated runs of LAB_NET (scratch and pretrained) and of `base` scratch, whose run.json records where lab-net
    came from as training does; then a new shell: a fresh registry and no SEGBOOK_BACKBONE_FILES."""
    from store_helpers import write_evaluated_run
    from results_helpers import A, write_registry

    from segbook.backbones import recorded
    from segbook.paths import Paths
    from segbook.registry import load_registry

    fresh = backbones._Registry({b.name: b for b in backbones.BUILTIN})
    monkeypatch.setattr(backbones, "_registry", fresh)
    monkeypatch.delenv(backbones.FILES_VARIABLE, raising=False)
    path = tmp_path / "lab_net.py"
    path.write_text(LAB_NET)
    backbones.load_backbone_file(path)
    paths, registry = Paths.from_env(), load_registry([write_registry(tmp_path / "registry.yaml")])
    folders = [write_evaluated_run(paths.results, registry, A, model, init, dice)
               for model, init, dice in (("lab-net", "scratch", 0.6), ("lab-net", "pretrained", 0.7),
                                         ("base", "scratch", 0.5))]
    for folder in folders[:2]:
        manifest = json.loads((folder / "run.json").read_text())
        (folder / "run.json").write_text(json.dumps({**manifest, recorded.KEY: recorded.record_of("lab-net")}))
    monkeypatch.setattr(backbones, "_registry", backbones._Registry({b.name: b for b in backbones.BUILTIN}))
    monkeypatch.delenv(backbones.FILES_VARIABLE)
    return path, folders, paths, registry


def _collected(paths, registry):
    """The rows and the ResultsWarnings of `segbook results`' collection."""
    import warnings

    from segbook.results import collect_results
    from segbook.results.collect import ResultsWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResultsWarning)
        df = collect_results(paths, registry)
    return df, [str(w.message) for w in caught if issubclass(w.category, ResultsWarning)]


def test_a_record_names_the_backbone_file_so_results_show_its_runs_without_flags(lab_net_runs):
    path, folders, paths, registry = lab_net_runs
    before = {folder: (folder / "run.json").stat().st_mtime_ns for folder in folders}
    df, warned = _collected(paths, registry)
    assert {folder: (folder / "run.json").stat().st_mtime_ns for folder in folders} == before  # reads only
    assert sorted(zip(df["model"], df["init"])) == [("base", "scratch"), ("lab-net", "pretrained"),
                                                     ("lab-net", "scratch")] and not warned
    assert backbones.get("lab-net").source == str(path)  # the recorded file itself, loaded


def test_a_recorded_file_gone_or_changed_is_a_warning_naming_run_and_file(lab_net_runs, monkeypatch):
    path, folders, paths, registry = lab_net_runs
    path.write_text(LAB_NET + "\n# changed\n")
    df, warned = _collected(paths, registry)
    assert sorted(df["model"]) == ["base", "lab-net", "lab-net"]  # tables only read numbers: still shown
    assert len(warned) == 2 and all(f"{path} changed since the run recorded it" in w for w in warned)
    assert {str(f) for f in folders[:2]} == {w.split(":")[0] for w in warned}
    assert backbones.get("lab-net").source.startswith(backbones.STAND_IN)  # the changed file never ran
    monkeypatch.setattr(backbones, "_registry", backbones._Registry({b.name: b for b in backbones.BUILTIN}))
    path.unlink()
    df, warned = _collected(paths, registry)
    assert len(df) == 3 and len(warned) == 2 and all(f"{path} is gone" in w for w in warned)


def test_evaluation_refuses_a_changed_backbone_file(lab_net_runs, capsys):
    from segbook.cli.main import main

    path, folders, paths, registry = lab_net_runs
    path.write_text(LAB_NET.replace("4, 3, padding=1", "8, 3, padding=1"))
    assert main(["evaluate", "--run", str(folders[0])]) == 2
    error = capsys.readouterr().err
    assert error.startswith("segbook: error: ") and f"{path} changed since the run recorded it" in error
    backbones.load_backbone_file(path)  # named again by hand: still not the network the run trained
    assert main(["evaluate", "--run", str(folders[0])]) == 2
    assert "differs from the recorded" in capsys.readouterr().err


def test_a_malformed_backbone_record_is_skipped_with_a_named_message(lab_net_runs):
    path, folders, paths, registry = lab_net_runs
    for folder, source in zip(folders[:2], ({"kind": "file", "path": "relative.py", "sha256": "0" * 64}, "x")):
        manifest = json.loads((folder / "run.json").read_text())
        manifest["backbone"]["source"] = source
        (folder / "run.json").write_text(json.dumps(manifest))
    df, warned = _collected(paths, registry)
    assert list(df["model"]) == ["base"] and len(warned) == 2
    assert all("backbone record is malformed" in w for w in warned)
    assert not backbones.is_known("lab-net")


def test_a_bundle_of_plug_in_runs_lists_them_on_import_without_the_file(lab_net_runs, tmp_path, monkeypatch):
    from results_helpers import home

    from segbook.results.bundles import BACKBONES, export_bundle, import_bundle

    path, folders, paths, registry = lab_net_runs
    report = export_bundle(tmp_path / "lab-bundle", registry=registry, paths=paths)
    assert report.runs == 3
    bundle = json.loads((report.folder / "bundle.json").read_text())
    assert bundle[BACKBONES]["lab-net"]["source"] == {"kind": "file", "path": None,
                                                       "sha256": file_sha256(path)}
    path.unlink()
    monkeypatch.setattr(backbones, "_registry", backbones._Registry({b.name: b for b in backbones.BUILTIN}))
    ours = home(tmp_path, monkeypatch, "our_home")
    import_bundle(report.folder, registry, ours)
    monkeypatch.setattr(backbones, "_registry", backbones._Registry({b.name: b for b in backbones.BUILTIN}))
    df, warned = _collected(ours, registry)
    assert sorted(zip(df["model"], df["source"])) == [("base", "bundle:lab-bundle"), ("lab-net", "bundle:lab-bundle"),
                                                      ("lab-net", "bundle:lab-bundle")] and not warned
    assert df.loc[df["model"] == "lab-net", "evaluated"].all()


def _install_lab_net(site: Path, version: str) -> None:
    """LAB_NET as an installed package `labnet` (its metadata on the path) declaring the entry point
    `[segbook.backbones] lab = labnet_backbone:BACKBONES`; another version replaces the earlier one."""
    for old in site.glob("labnet-*.dist-info"):
        for file in old.iterdir():
            file.unlink()
        old.rmdir()
    info = site / f"labnet-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: labnet\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[segbook.backbones]\nlab = labnet_backbone:BACKBONES\n")
    (site / "labnet_backbone.py").write_text(LAB_NET)


@pytest.mark.slow
def test_runs_of_an_entry_point_backbone_are_found_in_a_fresh_process_and_a_missing_one_is_named(
        tmp_path, monkeypatch, segbook_home):
    """Issue 24: a run records the entry point its backbone came from (name, object, distribution, version);
    `segbook results` and `--export` in a fresh process, no flags, find its runs through it; uninstalled or of
    another version, the runs still show (a stand-in) with a warning naming the entry point, and evaluation
    refuses to rebuild the network."""
    import subprocess
    import sys

    from results_helpers import A, write_registry
    from store_helpers import write_evaluated_run

    from segbook.backbones import recorded
    from segbook.paths import Paths
    from segbook.registry import load_registry

    site, uninstalled = tmp_path / "site", os.environ.get("PYTHONPATH", "")
    _install_lab_net(site, "1.0")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), uninstalled]))
    written = subprocess.run([sys.executable, "-c", "import json; from segbook.backbones import recorded; "
                              "print(json.dumps(recorded.record_of('lab-net')))"],
                             capture_output=True, text=True, check=True)
    record = json.loads(written.stdout)  # what training writes into run.json, where the package is installed
    assert record["source"] == {"kind": "entry point", "name": "lab", "value": "labnet_backbone:BACKBONES",
                                "distribution": "labnet", "version": "1.0"}
    assert recorded.adopt(record, run_code=False) is None  # known here only to write its runs
    registry_file = write_registry(tmp_path / "registry.yaml")
    paths, registry = Paths.from_env(), load_registry([registry_file])
    folders = [write_evaluated_run(paths.results, registry, A, "lab-net", init, dice)
               for init, dice in (("scratch", 0.6), ("pretrained", 0.7))]
    for folder in folders:
        manifest = json.loads((folder / "run.json").read_text())
        (folder / "run.json").write_text(json.dumps({**manifest, recorded.KEY: record}))

    def lab_net_rows(shown: str) -> list[str]:
        return [line for line in shown.splitlines() if line.startswith("lab-net,")]

    table = ["results", "--registry", str(registry_file), "--table", "scale", "--format", "csv"]
    found = run_segbook(*table)
    assert len(lab_net_rows(found.stdout)) == 3 and "warning" not in found.stderr.lower(), found.stdout + found.stderr
    exported = run_segbook("results", "--registry", str(registry_file), "--export", str(tmp_path / "bundle"))
    assert "exported 2 run(s)" in exported.stdout and "warning" not in exported.stderr.lower(), exported.stderr
    bundle = json.loads((tmp_path / "bundle" / "bundle.json").read_text())
    assert bundle["backbones"]["lab-net"]["source"] == record["source"]

    why = {"1.0": "of labnet 1.0, which is not installed", "2.0": "comes from labnet 2.0, not the recorded labnet 1.0"}
    for version in ("1.0", "2.0"):
        if version == "1.0":
            monkeypatch.setenv("PYTHONPATH", uninstalled)
        else:
            _install_lab_net(site, version)
            monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), uninstalled]))
        shown = run_segbook(*table)
        assert len(lab_net_rows(shown.stdout)) == 3, shown.stdout + shown.stderr  # tables only read numbers
        warned = [line for line in shown.stderr.splitlines() if why[version] in line]
        assert {str(folder) for folder in folders} == {line.split(": ")[2] for line in warned}, shown.stderr
        refused = run_segbook("evaluate", "--run", str(folders[0]), check=False)
        assert refused.returncode == 2 and refused.stderr.startswith("segbook: error: ")
        assert why[version] in refused.stderr and "Traceback" not in refused.stderr


def test_every_checkpoint_format_has_a_stem_rule():
    assert set(backbones.FORMAT_STEM_TILINGS) == set(backbones.FORMAT_READERS)
    assert backbones.FORMAT_STEM_TILINGS["nnssl"] == "mean" and backbones.FORMAT_STEM_TILINGS["stunet"] == "repeat"


@pytest.mark.parametrize("tiling, scale", [(None, 1.0), ("mean", 0.5)])
def test_create_model_repeats_an_official_stunet_stem_unless_told(tmp_path, tiling, scale):
    """STU-Net's official loader repeats the first block over the channels without dividing: the API does too."""
    torch.manual_seed(0)
    official = create_stunet("tiny", 1, 105).state_dict()
    path = write_official_checkpoint(official, tmp_path / "tiny_ep4k.model")
    network = create_model("tiny", path, input_channels=2, num_classes=3, tiling=tiling)
    for key in ("conv_blocks_context.0.0.conv1.weight", "conv_blocks_context.0.0.conv3.weight"):
        assert torch.equal(network.state_dict()[key], official[key].repeat(1, 2, 1, 1, 1) * scale), key


def test_a_catalogued_stunet_file_says_its_rule_and_the_catalogues_normalisation(tmp_path):
    from segbook.backbones.models import checkpoint_facts

    path = write_official_checkpoint(create_stunet("small", 1, 105).state_dict(), tmp_path / "small_ep4k.model")
    facts = checkpoint_facts(backbones.get("small"), path)
    assert (facts.format, facts.stem_tiling) == ("stunet", "repeat")
    assert facts.pretraining == {"schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                                 "scheme": "per-image z-score", "spacing_mm": [1.5, 1.5, 1.5], "source": "catalogue",
                                 "checkpoint": "small_ep4k.model"}
    assert checkpoint_facts(backbones.get("tiny"), path).pretraining is None  # tiny has no catalogue entry


@pytest.fixture(scope="module")
def two_channel_task(tmp_path_factory):
    """A tiny two-channel (T1 + T2) task planned for ResEnc-L: a single-channel checkpoint's stem is tiled on it."""
    from segbook.plan import plan_task

    spec = tiny_spec(modality="MRI", channels=("T1", "T2"))
    with planned_tiny_task(tmp_path_factory.mktemp("two_channels"), spec, seed=5) as task:
        task.resenc_plan = plan_task(task.entry, planner="resenc-l", progress=False, fingerprint_samples=1000)
        yield task


@pytest.mark.slow
def test_an_nnssl_stem_is_tiled_by_its_rule_through_finetune_and_batch(two_channel_task, tmp_path, monkeypatch):
    """One nnssl file on a 2-channel task: `segbook finetune` and `segbook batch run` (at a rate of 1e-30, so the
    final weights are the initial ones) start from the stem repeated and divided by 2, as `create_model` does, and
    record the rule and the pretraining's normalisation in run.json."""
    task = two_channel_task
    paths = use_planned_task(task, tmp_path, monkeypatch)
    configuration = _configuration(task.resenc_plan)
    torch.manual_seed(3)
    pretrained = create_model("resenc-l", input_channels=1, num_classes=1, configuration=configuration)
    openmind = write_nnssl_checkpoint(pretrained, tmp_path / "openmind.pth")
    stem_key = "encoder.stem.convs.0.conv.weight"
    expected = pretrained.state_dict()[stem_key].repeat(1, 2, 1, 1, 1) / 2
    through_api = create_model("resenc-l", openmind, input_channels=2, num_classes=len(task.entry.labels),
                               configuration=configuration)
    torch.testing.assert_close(through_api.state_dict()[stem_key], expected, rtol=0, atol=0)
    frozen = ("--lr", "1e-30", "--weight-decay", "0")

    _finetune(task, "--model", "resenc-l", "--pretrained", "--weights", str(openmind), *frozen)
    run_segbook("batch", "run", "--registry", str(task.registry_file), "--tasks", task.entry.key, "--models",
                "resenc-l", "--init", "pretrained", "--weights", str(openmind), "--seeds", "1", "--device", "cpu",
                "--workers", "1", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1", *frozen)
    trainers = ("SegbookTrainer_resenc-l_pretrained", "SegbookTrainer_resenc-l_pretrained_seed1")
    for trainer in trainers:
        folder = paths.results / task.entry.nnunet_name / f"{trainer}__nnUNetResEncUNetLPlans__3d_fullres" / "fold_all"
        manifest = RunManifest.load(folder)
        assert manifest.status == "finished" and manifest.data["settings"]["stem_tiling"] == "mean", trainer
        assert fingerprint.training_values(manifest.data)["stem_tiling"] == "mean"
        assert manifest.data["fingerprint"] == fingerprint.record(manifest.data)
        assert manifest.data["normalization"]["pretraining"] == {
            "schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False], "spacing_mm": [1.0, 1.0, 1.0],
            "source": "nnssl_adaptation_plan", "checkpoint": "openmind.pth"}
        trained = read_run_checkpoint(folder / "checkpoint_final.pth")["network_weights"]
        torch.testing.assert_close(trained[stem_key], expected, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def ct_pet_task(tmp_path_factory):
    """A tiny CT&PET task (`segbook data synth --modality CT&PET`), planned by the default and ResEnc-L planners."""
    from segbook.plan import plan_task

    with planned_tiny_task(tmp_path_factory.mktemp("ct_pet"), tiny_spec(modality="CT&PET"), seed=6) as task:
        task.resenc_plan = plan_task(task.entry, planner="resenc-l", progress=False, fingerprint_samples=1000)
        yield task


@pytest.mark.slow
def test_a_ct_and_pet_task_fine_tunes_single_channel_checkpoints_by_their_formats_rules(ct_pet_task, tmp_path,
                                                                                        monkeypatch):
    """Two channels normalised differently (CT: CTNormalization, PET: z-score): an nnssl file's stem is divided, an
    STU-Net file's repeated, and the CT channel's normalisation against the z-score pretraining is warned about."""
    from segbook.training.finetune import finetune
    from segbook.training.settings import TrainingSettings

    task = ct_pet_task
    use_planned_task(task, tmp_path, monkeypatch)
    assert task.resenc_plan.normalization == ["CTNormalization", "ZScoreNormalization"]
    torch.manual_seed(4)
    pretrained = create_model("resenc-l", input_channels=1, num_classes=1,
                              configuration=_configuration(task.resenc_plan))
    openmind = write_nnssl_checkpoint(pretrained, tmp_path / "openmind.pth")
    settings = TrainingSettings(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, lr=1e-30,
                                weight_decay=0.0)
    said: list[str] = []
    nnssl_run = finetune(task.entry, "resenc-l", pretrained=True, settings=settings, weights=openmind, device="cpu",
                         say=said.append)
    stunet_run = finetune(task.entry, "tiny", pretrained=True, settings=settings, weights=task.weights,
                          device="cpu")
    warnings = [line for line in said if line.startswith("segbook: warning:")]
    assert warnings == [f"segbook: warning: {task.entry.key} is normalised per its plans (CT CTNormalization), but "
                        "openmind.pth was pretrained on ZScoreNormalization; fine-tuning keeps the task's (run.json: "
                        "normalization): pass --normalization checkpoint to preprocess the task as it was pretrained"]
    stems = [(nnssl_run, "encoder.stem.convs.0.conv.weight", pretrained.state_dict(), "mean", 0.5),
             (stunet_run, "conv_blocks_context.0.0.conv1.weight", read_state_dict(task.weights), "repeat", 1.0)]
    for run, key, source, rule, scale in stems:
        assert run.status == "finished" and run.manifest.settings.stem_tiling == rule
        trained = read_run_checkpoint(run.folder / "checkpoint_final.pth")["network_weights"]
        torch.testing.assert_close(trained[key], source[key].repeat(1, 2, 1, 1, 1) * scale, rtol=0, atol=1e-6)
    assert nnssl_run.manifest.data["normalization"]["fine_tuning"]["schemes"] == ["CTNormalization",
                                                                                  "ZScoreNormalization"]
    assert nnssl_run.manifest.data["normalization"]["pretraining"]["schemes"] == ["ZScoreNormalization"]
    assert stunet_run.manifest.data["normalization"]["pretraining"] is None  # tiny: no catalogued pretraining
