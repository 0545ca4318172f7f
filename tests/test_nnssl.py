"""nnssl (OpenMind) ResEnc-L checkpoints: written in nnssl's format, read safely, adapted strictly to nnU-Net's
residual-encoder U-Net (encoder loaded, decoder and heads fresh, stem tiled), wrong ones refused with the key lists."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet
from helpers import write_payload_checkpoint
from nnssl_helpers import RESENC_CLASS, resenc, resenc_kwargs
from torch import nn

from segbook import backbones
from segbook.backbones.models import CheckpointFacts, checkpoint_facts, create_model
from segbook.backbones.nnssl import (NNSSL_RESENC_L_BLOCKS, NNSSL_RESENC_L_WIDTHS, NnsslCheckpoint,
                                     adapt_nnssl_to_network, read_nnssl_checkpoint, write_nnssl_checkpoint)
from stunet import CheckpointError, STUNet

def mae_checkpoint(tmp_path: Path, **metadata) -> tuple[ResidualEncoderUNet, NnsslCheckpoint]:
    """A full-network (MAE-style) pretraining: one output channel (the reconstruction), DDP's `module.` prefix."""
    pretrained = resenc(num_classes=1, seed=7)
    weights = {f"module.{k}": v for k, v in pretrained.state_dict().items()}
    path = write_nnssl_checkpoint(weights, tmp_path / "checkpoint_final.pth", metadata)
    return pretrained, read_nnssl_checkpoint(path)


def load(network: nn.Module, checkpoint: NnsslCheckpoint, **options):
    """Adapt to a copy of the network's state (as from a second build of it), then load strictly."""
    state = {k: v.clone() for k, v in network.state_dict().items()}
    adapted, report = adapt_nnssl_to_network(state, checkpoint, **options)
    network.load_state_dict(adapted, strict=True)
    return report


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_the_format_reads_back_with_its_plan(tmp_path):
    pretrained, checkpoint = mae_checkpoint(tmp_path, patch_size=[192, 192, 64], spacing=[1, 1, 1.5],
                                            trainer_name="BaseMAETrainer_BS8")
    assert checkpoint.state_dict.keys() == pretrained.state_dict().keys()  # the `module.` prefix is gone
    assert checkpoint.metadata["architecture"] == "ResEncL"
    assert checkpoint.metadata["trainer"] == "BaseMAETrainer_BS8"
    assert checkpoint.metadata["patch_size"] == [192, 192, 64]
    assert checkpoint.metadata["spacing"] == [1.0, 1.0, 1.5]
    assert checkpoint.metadata["normalization"] == ["ZScoreNormalization"]
    assert checkpoint.metadata["input_channels"] == 1
    assert checkpoint.has_decoder


def test_encoder_loads_and_decoder_and_heads_stay_fresh(tmp_path):
    pretrained, checkpoint = mae_checkpoint(tmp_path)
    network = resenc(num_classes=3, seed=1)
    initial = {k: v.clone() for k, v in network.state_dict().items()}
    report = load(network, checkpoint)

    state = network.state_dict()
    for key, value in pretrained.state_dict().items():
        if key.startswith("encoder."):
            assert_same(state[key], value)
            assert_same(state["decoder." + key], value)  # the decoder's alias did not overwrite the encoder
    fresh = [k for k in state if k.startswith("decoder.") and not k.startswith("decoder.encoder.")]
    assert fresh and set(fresh) == set(report.fresh)
    for key in fresh:
        assert_same(state[key], initial[key])
    assert report.dropped_heads == [k for k in pretrained.state_dict() if k.startswith("decoder.seg_layers.")]
    assert "decoder.stages.0.convs.0.conv.weight" in report.not_transferred
    image = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        for ours, theirs in zip(network.encoder(image), pretrained.encoder(image)):
            assert_same(ours, theirs)


def test_a_full_checkpoints_decoder_can_be_taken_too(tmp_path):
    pretrained, checkpoint = mae_checkpoint(tmp_path)
    network = resenc(num_classes=3, seed=1)
    heads = {k: v.clone() for k, v in network.state_dict().items() if k.startswith("decoder.seg_layers.")}
    report = load(network, checkpoint, decoder="pretrained")
    state = network.state_dict()
    for key in ("decoder.stages.0.convs.0.conv.weight", "decoder.transpconvs.1.weight"):
        assert_same(state[key], pretrained.state_dict()[key])
    assert set(report.fresh) == set(heads)
    for key, value in heads.items():
        assert_same(state[key], value)


@pytest.mark.parametrize("tiling, scale", [(None, 0.5), ("mean", 0.5), ("repeat", 1.0)])
def test_a_two_channel_network_gets_the_stem_tiled(tmp_path, tiling, scale):
    """By default as nnssl's reference fine-tuning tiles it: repeated and divided by the channel count."""
    pretrained, checkpoint = mae_checkpoint(tmp_path)
    network = resenc(input_channels=2, seed=1)
    report = load(network, checkpoint, **({"tiling": tiling} if tiling else {}))
    stem = pretrained.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert sorted(report.tiled) == ["encoder.stem.convs.0.all_modules.0.weight", "encoder.stem.convs.0.conv.weight"]
    assert_same(network.state_dict()["encoder.stem.convs.0.conv.weight"], stem.repeat(1, 2, 1, 1, 1) * scale)
    if scale == 0.5:  # two copies of an image through the tiled stem give the pretrained features
        image = torch.randn(1, 1, 16, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(network.encoder(image.repeat(1, 2, 1, 1, 1))[-1], pretrained.encoder(image)[-1])


def test_an_encoder_only_checkpoint_loads_the_encoder_and_reports_the_decoder_fresh(tmp_path):
    """Contrastive pretraining (VoCo, SimCLR) saves the encoder next to a projection head, no decoder."""
    encoder = resenc(num_classes=1, seed=7).encoder
    weights = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    weights |= {"projector.layer1.0.weight": torch.randn(16, 20), "projector.layer1.0.bias": torch.randn(16)}
    path = write_nnssl_checkpoint(weights, tmp_path / "voco.pth", {"trainer_name": "VoCoTrainer"})
    checkpoint = read_nnssl_checkpoint(path)
    assert not checkpoint.has_decoder

    network = resenc(seed=1)
    report = load(network, checkpoint)
    for key, value in encoder.state_dict().items():
        assert_same(network.state_dict()[f"encoder.{key}"], value)
    assert "decoder.stages.0.convs.0.conv.weight" in report.fresh
    assert report.not_transferred == ["projector.layer1.0.weight", "projector.layer1.0.bias"]
    assert "2 pretraining-only tensors" in report.summary()
    with pytest.raises(CheckpointError, match=r"voco\.pth holds no decoder \(encoder-only pretraining, trainer VoCo"):
        adapt_nnssl_to_network(network.state_dict(), checkpoint, decoder="pretrained")


def test_an_encoder_saved_under_other_names_follows_its_plan(tmp_path):
    """The plan says where stem and encoder are: a bare encoder's `stem.`/`stages.` keys map to the network's."""
    encoder = resenc(num_classes=1, seed=7).encoder
    path = write_nnssl_checkpoint(encoder, tmp_path / "bare.pth", {
        "key_to_stem": "stem", "key_to_encoder": "stages",
        "keys_to_in_proj": ["stem.convs.0.conv", "stem.convs.0.all_modules.0"]})
    network = resenc(input_channels=2, seed=1)
    report = load(network, read_nnssl_checkpoint(path))
    assert_same(network.state_dict()["encoder.stages.2.blocks.0.conv2.conv.weight"],
                encoder.state_dict()["stages.2.blocks.0.conv2.conv.weight"])
    assert len(report.tiled) == 2


def test_a_stunet_state_dict_is_refused_naming_both(tmp_path):
    stunet = STUNet(1, 3, dims=[4, 6, 8, 8, 10, 10], depth=[1] * 6, strides=[[2, 2, 2]] * 5)
    path = write_nnssl_checkpoint(stunet, tmp_path / "stunet.pth")
    with pytest.raises(CheckpointError) as refused:
        adapt_nnssl_to_network(resenc().state_dict(), read_nnssl_checkpoint(path))
    message = str(refused.value)
    assert "stunet.pth holds ResEncL (nnssl" in message and "STU-Net" in message
    assert "but the network is a residual-encoder U-Net: 3 stages, widths 4-8-8" in message
    assert "missing keys (" in message and "encoder.stem.convs.0.conv.weight" in message


def test_a_deeper_resenc_is_refused_with_the_unexpected_keys(tmp_path):
    """ResEnc M and L have the same widths; a task planned with a smaller patch has fewer stages."""
    pretrained, checkpoint = mae_checkpoint(tmp_path)
    shallower = resenc(widths=(4, 8), blocks=(1, 2))
    with pytest.raises(CheckpointError) as refused:
        adapt_nnssl_to_network(shallower.state_dict(), checkpoint, network_name="ResEnc-M")
    message = str(refused.value)
    assert "3 stages, widths 4-8-8, blocks 1-2-1" in message
    assert "but the network is ResEnc-M (a residual-encoder U-Net: 2 stages, widths 4-8, blocks 1-2" in message
    assert "unexpected keys (" in message and "encoder.stages.2.blocks.0.conv1.conv.weight" in message
    assert "missing keys" not in message


def test_extra_and_missing_keys_are_both_listed(tmp_path):
    pretrained = resenc(num_classes=1, seed=7)
    weights = dict(pretrained.state_dict())
    del weights["encoder.stages.1.blocks.1.conv2.norm.weight"]
    weights["encoder.stages.0.blocks.0.extra.weight"] = torch.zeros(3)
    path = write_nnssl_checkpoint(weights, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError) as refused:
        adapt_nnssl_to_network(resenc().state_dict(), read_nnssl_checkpoint(path))
    message = str(refused.value)
    assert "missing keys (1): encoder.stages.1.blocks.1.conv2.norm.weight" in message
    assert "unexpected keys (1): encoder.stages.0.blocks.0.extra.weight" in message


def test_a_shape_mismatch_names_the_key_and_both_shapes(tmp_path):
    _, checkpoint = mae_checkpoint(tmp_path)
    anisotropic = resenc(kernels=[[1, 3, 3], [3, 3, 3], [3, 3, 3]])
    with pytest.raises(CheckpointError, match=r"shape mismatches \(\d+\): encoder\.stem\.convs\.0\.conv\.weight: "
                                              r"checkpoint \(4, 1, 3, 3, 3\) vs network \(4, 1, 1, 3, 3\)"):
        adapt_nnssl_to_network(anisotropic.state_dict(), checkpoint)


def test_long_key_lists_are_truncated(tmp_path):
    _, checkpoint = mae_checkpoint(tmp_path)
    wider = resenc(widths=(4, 8, 12))
    with pytest.raises(CheckpointError, match=r"shape mismatches \((\d+)\): .*, and \d+ more"):
        adapt_nnssl_to_network(wider.state_dict(), checkpoint)


def test_a_multi_channel_checkpoint_is_not_tiled_into_a_different_count(tmp_path):
    pretrained = resenc(input_channels=2, num_classes=1, seed=7)
    path = write_nnssl_checkpoint(pretrained, tmp_path / "two.pth")
    with pytest.raises(CheckpointError, match="only single-channel checkpoints are tiled"):
        adapt_nnssl_to_network(resenc(input_channels=3).state_dict(), read_nnssl_checkpoint(path))


def test_true_resenc_l_size_on_the_meta_device(tmp_path):
    """nnssl's ResEnc-L into ResEnc networks as nnU-Net plans them: an isotropic 6-stage plan with 4 input channels
    takes it; a 5-stage plan (a smaller patch, as ResEnc-M plans often are) is refused naming both."""
    _, small = mae_checkpoint(tmp_path)
    full = dict(widths=NNSSL_RESENC_L_WIDTHS, blocks=NNSSL_RESENC_L_BLOCKS)
    with torch.device("meta"):
        pretrained = resenc(num_classes=1, allow_init=False, **full).state_dict()
        network = resenc(input_channels=4, num_classes=5, allow_init=False, **full).state_dict()
        five_stage = resenc(allow_init=False, widths=NNSSL_RESENC_L_WIDTHS[:5], blocks=NNSSL_RESENC_L_BLOCKS[:5])
    checkpoint = dataclasses.replace(small, state_dict=pretrained)

    adapted, report = adapt_nnssl_to_network(network, checkpoint)
    assert adapted["encoder.stem.convs.0.conv.weight"].shape == (32, 4, 3, 3, 3)
    assert len(report.loaded) == sum(k.startswith(("encoder.stem.", "encoder.stages.")) for k in network)
    assert adapted.keys() == network.keys()
    deepest = "encoder.stages.5.blocks.5.conv2.conv.weight"
    assert adapted[f"decoder.{deepest}"] is adapted[deepest]  # the decoder's alias carries the loaded tensor
    with pytest.raises(CheckpointError) as refused:
        adapt_nnssl_to_network(five_stage.state_dict(), checkpoint, network_name="ResEnc-M")
    message = str(refused.value)
    assert ("holds ResEncL (nnssl, trainer BaseMAETrainer; ResEnc-L as nnssl pretrains it: 6 stages, widths "
            "32-64-128-256-320-320, blocks 1-3-4-6-6-6") in message
    assert "but the network is ResEnc-M (a residual-encoder U-Net: 5 stages, widths 32-64-128-256-320" in message
    assert "unexpected keys (" in message and "encoder.stages.5.blocks.0" in message


def test_a_checkpoint_carrying_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "ran"
    path = write_payload_checkpoint(tmp_path / "payload.pth", marker)
    with pytest.raises(CheckpointError, match=r"payload\.pth was refused: reading it would import and run"):
        read_nnssl_checkpoint(path)
    assert not marker.exists()


def test_numpy_scalars_in_the_plan_are_read(tmp_path):
    """Checkpoints saved before nnssl converted numpy values hold numpy scalars, which the safe reader allows."""
    pretrained = resenc(num_classes=1)
    path = write_nnssl_checkpoint(pretrained, tmp_path / "np.pth", {"spacing": [np.float64(0.8)] * 3})
    assert read_nnssl_checkpoint(path).metadata["spacing"] == [0.8, 0.8, 0.8]


def _plain_plan(tmp_path: Path) -> dict:
    write_nnssl_checkpoint(resenc(num_classes=1), tmp_path / "source.pth")
    return torch.load(tmp_path / "source.pth", weights_only=True)


@pytest.mark.parametrize("edit, refusal", [
    (lambda c: c.pop("nnssl_adaptation_plan"), r"is not an nnssl checkpoint: it has no 'nnssl_adaptation_plan' "
                                               r"\(it holds: network_weights, trainer_name, init_args\)"),
    (lambda c: c.pop("network_weights"), r"nnssl checkpoint without network weights"),
    (lambda c: c.update(network_weights={}), r"nnssl checkpoint without network weights"),
    (lambda c: c["network_weights"].update({"encoder.extra": [1.0, 2.0]}),
     r"holds entries that are not named tensors: 'encoder\.extra'"),
    (lambda c: c["network_weights"].update({3: torch.zeros(1)}), r"not named tensors: 3"),
    (lambda c: c["nnssl_adaptation_plan"].pop("key_to_encoder"), r"adaptation plan is not usable: 'key_to_encoder'"),
    (lambda c: c["nnssl_adaptation_plan"].update(pretrain_num_input_channels=3),
     r"plan says 3 input channel\(s\), but its first convolution takes 1"),
    (lambda c: c["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"].update(patch_size=[64, 64]),
     r"'patch_size' is \[64, 64\]: expected three positive ints"),
    (lambda c: c["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"].update(patch_size="160"),
     r"'patch_size' is '160'"),
    (lambda c: c["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"].update(
        patch_size=[96.5, 96, 96]), r"'patch_size' is \[96.5, 96, 96\]"),
])
def test_files_that_are_not_usable_nnssl_checkpoints_are_refused(tmp_path, edit, refusal):
    content = _plain_plan(tmp_path)
    edit(content)
    torch.save(content, tmp_path / "edited.pth")
    with pytest.raises(CheckpointError, match=rf"edited\.pth.*{refusal}"):
        read_nnssl_checkpoint(tmp_path / "edited.pth")


def _tiny_plans() -> SimpleNamespace:
    """What `create_model` reads of nnU-Net's ConfigurationManager, for the tiny ResEnc of `resenc_kwargs`."""
    return SimpleNamespace(network_arch_class_name=RESENC_CLASS, network_arch_init_kwargs=resenc_kwargs(),
                           network_arch_init_kwargs_req_import=["conv_op", "norm_op", "nonlin"])


@pytest.mark.parametrize("tiling, scale", [(None, 0.5), ("repeat", 1.0)])
def test_create_model_tiles_an_nnssl_stem_by_the_formats_rule_unless_told(tmp_path, tiling, scale):
    """The Python API applies nnssl's rule (repeat and divide) as finetune and batch do; `tiling` overrides it."""
    pretrained, checkpoint = mae_checkpoint(tmp_path)
    network = create_model("resenc-l", checkpoint.path, input_channels=2, num_classes=3, configuration=_tiny_plans(),
                           tiling=tiling)
    stem = pretrained.state_dict()["encoder.stem.convs.0.conv.weight"]
    assert_same(network.state_dict()["encoder.stem.convs.0.conv.weight"], stem.repeat(1, 2, 1, 1, 1) * scale)


def test_an_nnssl_file_says_its_stem_rule_and_pretraining_normalisation(tmp_path):
    _, checkpoint = mae_checkpoint(tmp_path, spacing=[0.8, 0.8, 1.0])
    facts = checkpoint_facts(backbones.get("resenc-l"), checkpoint.path)
    assert (facts.format, facts.stem_tiling, facts.warnings) == ("nnssl", "mean", ())
    assert facts.pretraining == {"schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False],
                                 "spacing_mm": [0.8, 0.8, 1.0], "source": "nnssl_adaptation_plan",
                                 "checkpoint": "checkpoint_final.pth"}
    plain = tmp_path / "nnunet.pth"  # an nnU-Net training checkpoint: segbook's rule, no normalisation said
    torch.save({"network_weights": resenc(num_classes=2).state_dict(), "trainer_name": "nnUNetTrainer"}, plain)
    assert checkpoint_facts(backbones.get("resenc-l"), plain) == CheckpointFacts("nnunet", "repeat", None)


def _configuration_of(content: dict) -> dict:
    return content["nnssl_adaptation_plan"]["pretrain_plan"]["configurations"]["onemmiso"]


@pytest.mark.parametrize("edit, problem", [
    (dict(normalization_schemes="ZScoreNormalization"), r"'normalization_schemes' is 'ZScoreNormalization', not a "
                                                        r"list of scheme names"),
    (dict(normalization_schemes=[3]), r"'normalization_schemes' is \[3\]"),
    (dict(normalization_schemes=[]), r"'normalization_schemes' is \[\]"),
    (dict(normalization_schemes=["FancyNorm"]), r"unknown scheme\(s\) 'FancyNorm' \(nnU-Net knows ZScoreNormalization"),
    (dict(use_mask_for_norm="no"), r"'use_mask_for_norm' is 'no', not one boolean per scheme"),
    (dict(use_mask_for_norm=[False, True]), r"'use_mask_for_norm' is \[False, True\]"),
])
def test_a_malformed_normalisation_record_is_ignored_with_a_warning_naming_it(tmp_path, edit, problem):
    """Loading needs no normalisation: the weights still load, the record is left out and the warning names the file
    and what was wrong."""
    content = _plain_plan(tmp_path)
    _configuration_of(content).update(edit)
    torch.save(content, tmp_path / "edited.pth")
    checkpoint = read_nnssl_checkpoint(tmp_path / "edited.pth")
    assert checkpoint.pretraining_normalization() is None and len(checkpoint.warnings) == 1
    assert re.search(rf"edited\.pth: its pretraining normalisation is not recorded: {problem}", checkpoint.warnings[0])
    facts = checkpoint_facts(backbones.get("resenc-l"), tmp_path / "edited.pth")
    assert facts.pretraining is None and facts.warnings == checkpoint.warnings and facts.stem_tiling == "mean"


def test_numpy_mask_flags_are_read_as_booleans(tmp_path):
    content = _plain_plan(tmp_path)
    _configuration_of(content).update(use_mask_for_norm=[np.bool_(True)])
    torch.save(content, tmp_path / "np_mask.pth")
    checkpoint = read_nnssl_checkpoint(tmp_path / "np_mask.pth")
    assert checkpoint.pretraining_normalization()["use_mask_for_norm"] == [True] and checkpoint.warnings == ()


def test_a_plan_without_a_normalisation_records_none_and_warns_nothing(tmp_path):
    content = _plain_plan(tmp_path)
    _configuration_of(content).pop("normalization_schemes")
    torch.save(content, tmp_path / "bare.pth")
    checkpoint = read_nnssl_checkpoint(tmp_path / "bare.pth")
    assert checkpoint.pretraining_normalization() is None and checkpoint.warnings == ()
