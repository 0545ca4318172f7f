"""Building a backbone and initialising it from a checkpoint: `create_model`, the builders of the built-in
families, and the strict loader every family shares (`load_into`, `check_fits`).

A family's builder gets nnU-Net's `ConfigurationManager` of the task's plans, or None for the family's reference
architecture (what its checkpoints were pretrained as). A checkpoint is read by the reader of one of the formats the
backbone declares (`segbook.backbones.FORMAT_READERS`), which hands back the network's key names; then the
catalogued conventions (`first_conv`, `classifier`, aliases) adapt it: fresh classifier, input-channel tiling, and
every other key equal in name and shape, or an error listing them and naming both networks.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from segbook.backbones import (FORMAT_ADAPTERS, FORMAT_READERS, FORMAT_STEM_TILINGS, PRIMUS_SIZES, Backbone,
                               BackboneError, get, normalization_problem, resolve)
from stunet.checkpoints import PRETRAINING_STRIDES
from stunet.flops import count_forward_macs, count_parameters
from stunet.loading import DESCRIBERS, CheckpointError, Conventions, LoadReport, adapt_state_dict
from stunet.presets import create_stunet, strides_from_plans

RESENC_CLASS = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
#: The residual-encoder U-Net the OpenMind/nnssl ResEnc-L checkpoints were pretrained as (6 stages, widths
#: 32..320, encoder blocks 1-3-4-6-6-6, 160^3 patches): what `create_model("resenc-l")` builds without plans.
RESENC_REFERENCE: dict[str, Any] = {
    "n_stages": 6, "features_per_stage": [32, 64, 128, 256, 320, 320], "conv_op": "torch.nn.modules.conv.Conv3d",
    "kernel_sizes": [[3, 3, 3]] * 6, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 5,
    "n_blocks_per_stage": [1, 3, 4, 6, 6, 6], "n_conv_per_stage_decoder": [1] * 5, "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}
_REQUIRES_IMPORT = ["conv_op", "norm_op", "dropout_op", "nonlin"]
#: The patch and channels tables' cost figures are counted at (`Backbone.cost`).
COST_PATCH = (128, 128, 128)
COST_CLASSES = 105


def build_stunet(model: str, configuration: Any, input_channels: int, num_classes: int,
                 deep_supervision: bool) -> nn.Module:
    """STU-Net: five stages whose strides come from the plans (the pretraining strides without plans)."""
    strides = PRETRAINING_STRIDES if configuration is None else strides_from_plans(configuration.pool_op_kernel_sizes)
    return create_stunet(model, input_channels, num_classes, strides, deep_supervision)


def build_resenc(model: str, configuration: Any, input_channels: int, num_classes: int,
                 deep_supervision: bool) -> nn.Module:
    """nnU-Net's residual-encoder U-Net, built by nnU-Net's own `get_network_from_plans` from the task's ResEnc
    plans (the reference architecture without plans); plans of another network are refused."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    if configuration is None:
        class_name, kwargs, requires_import = RESENC_CLASS, RESENC_REFERENCE, _REQUIRES_IMPORT
    else:
        class_name = configuration.network_arch_class_name
        kwargs = configuration.network_arch_init_kwargs
        requires_import = configuration.network_arch_init_kwargs_req_import
        if class_name != RESENC_CLASS:
            raise BackboneError(f"{model} needs ResEnc plans ({get(model).plans}), and these plans build {class_name}")
    return get_network_from_plans(class_name, kwargs, requires_import, input_channels, num_classes,
                                  allow_init=True, deep_supervision=deep_supervision)


#: Primus' patch embedding (OpenMind/nnssl always use 8^3: nnssl get_network_by_name.py L34-62) and the patch its
#: checkpoints were pretrained at (nnssl BaseEvaMAETrainer L37): the reference architecture's fixed input.
PRIMUS_PATCH_EMBED = (8, 8, 8)
PRIMUS_REFERENCE_PATCH = (160, 160, 160)


def build_primus(model: str, configuration: Any, input_channels: int, num_classes: int,
                 deep_supervision: bool, drop_path_rate: float = 0.0) -> nn.Module:
    """dna's `Primus` for its fixed input, the plans' patch (the pretraining's 160^3 without plans). No deep
    supervision: Primus has one output."""
    patch = PRIMUS_REFERENCE_PATCH if configuration is None else tuple(configuration.patch_size)
    return primus_network(model, patch, input_channels, num_classes, drop_path_rate)


def primus_network(model: str, patch: Sequence[int], input_channels: int, num_classes: int,
                   drop_path_rate: float = 0.0) -> nn.Module:
    """Primus of `model`'s size with OpenMind's `init_values=0.1` and `scale_attn_inner=True` (dna `PrimusS/B/M/L`,
    primus.py L441-578; nnssl BaseEvaMAETrainer L57-58: its checkpoints hold the `gamma_*` and `attn.norm` these
    add). `input_shape` is recorded on the network: positional-embedding interpolation needs its token grid.
    `drop_path_rate`: dna's stochastic depth, rising linearly over the EVA blocks to it (eva.py L107, L122); it adds
    no parameters, so a network built with any rate loads the same weights."""
    from dynamic_network_architectures.architectures.primus import Primus

    patch = tuple(int(p) for p in patch)
    if len(patch) != 3 or any(p % e or p < e for p, e in zip(patch, PRIMUS_PATCH_EMBED)):
        raise BackboneError(f"{model} takes a fixed 3-D input whose every axis is a multiple of its patch embedding "
                            f"{PRIMUS_PATCH_EMBED[0]}, and the patch is {list(patch)}: plan the task with the Primus "
                            "planner (its own plans, SegbookPrimusPlans)")
    embed_dim, depth, heads = PRIMUS_SIZES[model]
    network = Primus(input_channels, embed_dim, PRIMUS_PATCH_EMBED, num_classes, depth, heads, input_shape=patch,
                     init_values=0.1, scale_attn_inner=True, drop_path_rate=drop_path_rate)
    network.input_shape = patch
    return network


def primus_cost_network(model: str, patch: Sequence[int], strides: Sequence[Sequence[int]], input_channels: int,
                        num_classes: int) -> nn.Module:
    """Primus at the patch rounded down to its patch embedding, as its planner fixes it (strides do not apply)."""
    rounded = [max(e, int(p) // e * e) for p, e in zip(patch, PRIMUS_PATCH_EMBED)]
    return primus_network(model, rounded, input_channels, num_classes)


def stunet_cost_network(model: str, patch: Sequence[int], strides: Sequence[Sequence[int]], input_channels: int,
                        num_classes: int) -> nn.Module:
    """STU-Net at the five strides it takes from nnU-Net's."""
    return create_stunet(model, input_channels, num_classes, strides_from_plans(strides))


def plain_unet_cost_network(model: str, patch: Sequence[int], strides: Sequence[Sequence[int]], input_channels: int,
                            num_classes: int) -> nn.Module:
    """nnU-Net's default 3-D U-Net (PlainConvUNet: two 3x3x3 convolutions per stage, 32 to 320 features) at the
    strides, as its default plans build it."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    stages = len(strides)
    return PlainConvUNet(input_channels, stages, _widths(stages), nn.Conv3d, 3, strides, [2] * stages, num_classes,
                         [2] * (stages - 1), deep_supervision=True, **_NNUNET_LAYERS)


def resenc_cost_network(model: str, patch: Sequence[int], strides: Sequence[Sequence[int]], input_channels: int,
                        num_classes: int) -> nn.Module:
    """nnU-Net's residual-encoder U-Net (encoder blocks 1-3-4-6-6-6..., nnU-Net's widths) at the strides."""
    from dynamic_network_architectures.architectures.unet import ResidualEncoderUNet

    stages = len(strides)
    return ResidualEncoderUNet(input_channels, stages, _widths(stages), nn.Conv3d, 3, strides,
                               [1, 3, 4, 6, 6, 6, 6, 6][:stages], num_classes, [1] * (stages - 1),
                               deep_supervision=True, **_NNUNET_LAYERS)


#: nnU-Net's layers around each convolution in its 3-D plans.
_NNUNET_LAYERS: dict[str, Any] = {"conv_bias": True, "norm_op": nn.InstanceNorm3d,
                                  "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "nonlin": nn.LeakyReLU,
                                  "nonlin_kwargs": {"inplace": True}}


def _widths(stages: int) -> list[int]:
    return [min(32 * 2 ** i, 320) for i in range(stages)]


def cost_network(backbone: Backbone, patch: Sequence[int], strides: Sequence[Sequence[int]], input_channels: int,
                 num_classes: int) -> nn.Module:
    """The network whose FLOPs estimate a job's GPU-hours, at a patch and nnU-Net's strides (`Backbone.cost_network`;
    the reference architecture for a backbone without one). Build it under `torch.device("meta")` to count."""
    strides = [list(s) for s in strides]
    if backbone.cost_network is None:
        return build(backbone, None, input_channels, num_classes)
    return resolve(backbone.cost_network)(backbone.name, tuple(patch), strides, input_channels, num_classes)


def build(backbone: Backbone, configuration: Any, input_channels: int, num_classes: int,
          deep_supervision: bool = True, drop_path_rate: float | None = None) -> nn.Module:
    """The backbone's network for a task's plans (`configuration`, nnU-Net's ConfigurationManager) or, None, for its
    reference architecture. Backbones without a builder are nnU-Net's own network of the plans. `drop_path_rate`
    (a recipe's; None: the backbone's own) goes to builders that take one (`Backbone.drop_path`), and is refused for
    the others."""
    extra = {}
    if drop_path_rate is not None:
        if not backbone.drop_path:
            raise BackboneError(f"{backbone.label} ({backbone.name}) takes no drop-path rate")
        extra["drop_path_rate"] = drop_path_rate
    if backbone.build is not None:
        return resolve(backbone.build)(backbone.name, configuration, input_channels, num_classes,
                                       deep_supervision and backbone.deep_supervision, **extra)
    if configuration is None:
        raise BackboneError(f"{backbone.label} is the network of a task's nnU-Net plans: build it from them")
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    return get_network_from_plans(configuration.network_arch_class_name, configuration.network_arch_init_kwargs,
                                  configuration.network_arch_init_kwargs_req_import, input_channels, num_classes,
                                  allow_init=True, deep_supervision=deep_supervision)


def conventions(backbone: Backbone) -> Conventions:
    """The catalogued names loading reads: the layers adapted and replaced, and repeated key prefixes."""
    return Conventions(first_conv=backbone.first_conv, classifier=backbone.classifier, aliases=backbone.aliases,
                       describe=lambda state_dict: describe_network_weights(backbone, state_dict))


def read_checkpoint(backbone: Backbone, path: str | os.PathLike) -> tuple[str, Any]:
    """(format, content) of `path`, read by the first of the backbone's formats whose reader accepts the file;
    `CheckpointError` saying what each reader found otherwise. Files are never unpickled (`stunet.safe_load`)."""
    if not backbone.pretrainable:
        raise BackboneError(f"{backbone.label} trains from scratch only: it reads no checkpoints")
    refusals = []
    for name in backbone.checkpoint_formats:
        try:
            reader = resolve(FORMAT_READERS[name])
        except BackboneError as error:
            refusals.append(f"{name}: {error}")
            continue
        try:
            return name, reader(path)
        except CheckpointError as error:
            refusals.append(f"{name}: {error}")
    raise CheckpointError(f"{path} is in none of the formats {backbone.label} reads ({'; '.join(refusals)})")


#: The catalogue's words for a pretraining normalisation, as nnU-Net's scheme: STU-Net's published plans say
#: `nonCT`, which nnU-Net v1 normalises per image with z-score and no mask (uni-medical/STU-Net
#: `nnUNet-1.7.1/nnunet/preprocessing/preprocessing.py` L273-310).
CATALOGUE_SCHEMES = {"per-image z-score": "ZScoreNormalization"}


class NnunetCheckpoint(dict):
    """An nnU-Net v2 training checkpoint as read: its network weights (a state dict, as the other formats' readers
    give) and how the run that wrote it normalised its images, as its `init_args` say (nnU-Net 2.8.1 saves the
    trainer's constructor arguments, plans and configuration included: nnUNetTrainer.py L115-117, L1212). `warnings`:
    what of that record was malformed and ignored (loading needs none of it)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], normalization: dict[str, Any] | None,
                 warnings: tuple[str, ...] = ()):
        super().__init__(weights)
        self.normalization = normalization
        self.warnings = warnings

    def pretraining_normalization(self) -> dict[str, Any] | None:
        return self.normalization


def read_nnunet_checkpoint(path: str | os.PathLike) -> NnunetCheckpoint:
    """The weights of an nnU-Net v2 checkpoint (or any file `stunet.read_state_dict` reads), read safely, with its
    training normalisation where its `init_args` record one: `plans.configurations[configuration]`
    (`inherits_from` followed, as nnU-Net's PlansManager does) `.normalization_schemes` and `.use_mask_for_norm`,
    with its `spacing`; `source: init_args`. A file without `init_args.plans` (a state dict, a v1 file) says
    nothing; a malformed record is ignored with a warning, as nnssl's plan is (`segbook.backbones.nnssl`)."""
    from stunet.loading import safe_load, state_dict_of

    content = safe_load(path)
    weights = state_dict_of(content, path)
    init_args = content.get("init_args") if isinstance(content, Mapping) else None
    if not isinstance(init_args, Mapping) or "plans" not in init_args:
        return NnunetCheckpoint(weights, None)
    try:
        normalization = _init_args_normalization(init_args, path)
    except ValueError as problem:
        return NnunetCheckpoint(weights, None, (f"{path}: its training normalisation is not recorded: {problem}",))
    return NnunetCheckpoint(weights, normalization)


def _init_args_normalization(init_args: Mapping, path: str | os.PathLike) -> dict[str, Any]:
    """The normalisation record of an nnU-Net checkpoint's `init_args`; ValueError saying what is malformed."""
    name = init_args.get("configuration")
    plans = init_args.get("plans")
    configurations = plans.get("configurations") if isinstance(plans, Mapping) else None
    if not isinstance(name, str):
        raise ValueError(f"init_args names configuration {name!r}, not a configuration's name")
    if not isinstance(configurations, Mapping):
        raise ValueError("the plans in init_args hold no 'configurations' mapping")
    configuration = _resolved_configuration(configurations, name)
    schemes, masks = configuration.get("normalization_schemes"), configuration.get("use_mask_for_norm")
    problem = normalization_problem(schemes, masks)
    if problem:
        raise ValueError(f"configuration {name!r}: {problem}")
    spacing = configuration.get("spacing")
    numbers = isinstance(spacing, (list, tuple)) and len(spacing) == 3 and \
        all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in spacing)
    return {"schemes": [str(v) for v in schemes],
            "use_mask_for_norm": None if masks is None else [bool(v) for v in masks],
            "spacing_mm": [float(v) for v in spacing] if numbers else None, "source": "init_args",
            "configuration": name, "checkpoint": os.path.basename(os.fspath(path))}


def _resolved_configuration(configurations: Mapping, name: str) -> Mapping:
    """A configuration with what it inherits beneath it (`inherits_from`, as nnU-Net 2.8.1 resolves it,
    plans_handler.py L231-254); ValueError for a missing one or a cycle."""
    chain: list[Mapping] = []
    while name is not None:
        configuration = configurations.get(name)
        if not isinstance(configuration, Mapping) or any(configuration is seen for seen in chain):
            raise ValueError(f"its plans hold no configuration {name!r}" if not isinstance(configuration, Mapping)
                             else f"the inheritance of configuration {name!r} is circular")
        chain.append(configuration)
        name = configuration.get("inherits_from")
    resolved: dict[str, Any] = {}
    for configuration in reversed(chain):
        resolved.update(configuration)
    return resolved


@dataclass(frozen=True)
class CheckpointFacts:
    """What a checkpoint file says of itself beyond its weights: its format, the rule its stem is tiled by over a
    task's channels (`FORMAT_STEM_TILINGS`), how its pretraining normalised images (None: not said), and what of
    it was malformed and ignored (one line each)."""

    format: str
    stem_tiling: str
    pretraining: dict[str, Any] | None
    warnings: tuple[str, ...] = field(default=())


def checkpoint_facts(backbone: Backbone, path: str | os.PathLike) -> CheckpointFacts:
    """The facts of the checkpoint at `path` as `backbone` reads it (read safely; `CheckpointError` otherwise)."""
    name, content = read_checkpoint(backbone, path)
    return _facts(backbone, name, content, path)


def _facts(backbone: Backbone, name: str, content: Any, path: str | os.PathLike) -> CheckpointFacts:
    """A format whose files say how they were normalised (`content.pretraining_normalization()`) is believed;
    otherwise the catalogued checkpoint of the backbone says it, taken to describe any file of its format."""
    said = getattr(content, "pretraining_normalization", None)
    if said is not None:
        return CheckpointFacts(name, FORMAT_STEM_TILINGS[name], said(), tuple(getattr(content, "warnings", ())))
    return CheckpointFacts(name, FORMAT_STEM_TILINGS[name], _catalogued_normalization(backbone, name))


def _catalogued_normalization(backbone: Backbone, name: str) -> dict[str, Any] | None:
    official = backbone.pretrained
    if official is None or official.format != name:
        return None
    scheme = CATALOGUE_SCHEMES.get(official.normalization)
    return {"schemes": [scheme] if scheme else None, "use_mask_for_norm": [False] if scheme else None,
            "scheme": official.normalization, "spacing_mm": list(official.spacing_mm), "source": "catalogue",
            "checkpoint": official.filename}


def adapted_weights(network_state: Mapping[str, torch.Tensor], backbone: Backbone, path: str | os.PathLike,
                    tiling: str | None = None, input_shape: Sequence[int] | None = None
                    ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The complete state dict that initialises the network whose state is `network_state` from the checkpoint at
    `path` (strictly: a `CheckpointError` lists what does not fit), and what was done. `tiling` None tiles a
    single-channel stem by the rule of the checkpoint's format (`FORMAT_STEM_TILINGS`). `input_shape`: a
    fixed-input network's patch (Primus' `input_shape`), for formats that adapt to it."""
    name, content = read_checkpoint(backbone, path)
    return _adapt(network_state, backbone, name, content, path, tiling, input_shape)


def _adapt(network_state: Mapping[str, torch.Tensor], backbone: Backbone, name: str, content: Any,
           path: str | os.PathLike, tiling: str | None, input_shape: Sequence[int] | None = None
           ) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """A format with its own rules (`FORMAT_ADAPTERS`) applies them; any other is adapted by the backbone's
    catalogued conventions."""
    tiling = tiling or FORMAT_STEM_TILINGS[name]
    if name in FORMAT_ADAPTERS:
        return resolve(FORMAT_ADAPTERS[name])(network_state, content, network_name=backbone.label, tiling=tiling,
                                              input_shape=input_shape)
    adapted, report = adapt_state_dict(network_state, content, source=str(path), tiling=tiling,
                                       conventions=conventions(backbone))
    return {**network_state, **adapted}, report


def load_into(network: nn.Module, backbone: Backbone, path: str | os.PathLike,
              tiling: str | None = None) -> LoadReport:
    """Initialise `network` for fine-tuning from the checkpoint at `path`: everything but the classifier, strictly."""
    state, report = adapted_weights(network.state_dict(), backbone, path, tiling, getattr(network, "input_shape", None))
    network.load_state_dict(state, strict=True)
    return report


def check_fits(backbone: Backbone, path: str | os.PathLike, input_channels: int, num_classes: int,
               configuration: Any = None) -> CheckpointFacts:
    """`CheckpointError` unless the checkpoint loads into the backbone's network (built on the meta device, so
    nothing is allocated): before anything is planned or written. Its facts otherwise, from the same reading."""
    with torch.device("meta"):
        network = build(backbone, configuration, input_channels, num_classes)
    name, content = read_checkpoint(backbone, path)
    _adapt(network.state_dict(), backbone, name, content, path, None, getattr(network, "input_shape", None))
    return _facts(backbone, name, content, path)


def create_model(name: str, pretrained: bool | str | os.PathLike = False, *, input_channels: int = 1,
                 num_classes: int = 2, configuration: Any = None, deep_supervision: bool = True,
                 device: str | torch.device | None = None, tiling: str | None = None) -> nn.Module:
    """The network `name` (a model of `segbook models`), timm's way: `pretrained=True` starts from its catalogued
    checkpoint (from the weight cache), a path from that file, False from scratch. `configuration` is nnU-Net's
    ConfigurationManager of a task's plans (None: the family's reference architecture); `device="meta"` allocates
    nothing. `tiling` None tiles a single-channel stem over `input_channels` by the checkpoint format's rule, as
    `segbook finetune` and `segbook batch` do (`FORMAT_STEM_TILINGS`)."""
    backbone = get(name)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        network = build(backbone, configuration, input_channels, num_classes, deep_supervision)
    if pretrained is False or pretrained is None:
        return network
    load_into(network, backbone, _pretrained_file(backbone, pretrained), tiling)
    return network


def _pretrained_file(backbone: Backbone, pretrained: bool | str | os.PathLike) -> str:
    if pretrained is not True:
        return os.fspath(pretrained)
    if backbone.pretrained is None:
        raise BackboneError(f"{backbone.label} has no catalogued checkpoint: pass the file, pretrained=PATH")
    from segbook.paths import Paths
    from stunet.checkpoints import WeightCache, WeightsError

    try:
        return str(WeightCache(Paths.from_env().weights).resolve(backbone.pretrained))
    except WeightsError as error:
        raise BackboneError(str(error)) from None


def describe_network_weights(backbone: Backbone, state_dict: Mapping[str, torch.Tensor]) -> str:
    """`backbone`'s network as its weights show it (for "holds X, but the network is Y" errors)."""
    from stunet.loading import describe_stunet

    if backbone.family == "STU-Net":
        return describe_stunet(state_dict)
    return f"{backbone.label}: {describe_resenc(state_dict) or _key_summary(state_dict)}"


def describe_resenc(state_dict: Mapping[str, torch.Tensor]) -> str | None:
    """A residual-encoder U-Net's stages, widths, blocks and input channels; None for other weights."""
    stem = state_dict.get("encoder.stem.convs.0.conv.weight")
    if stem is None:
        return None
    stages = sorted({int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.stages.")})
    blocks = [len({k.split(".")[4] for k in state_dict if k.startswith(f"encoder.stages.{s}.blocks.")})
              for s in stages]
    widths = [int(state_dict[f"encoder.stages.{s}.blocks.0.conv1.conv.weight"].shape[0]) for s in stages
              if f"encoder.stages.{s}.blocks.0.conv1.conv.weight" in state_dict]
    width_text = f"widths {widths[0]}..{widths[-1]}, " if widths else ""
    return (f"a ResEnc U-Net ({len(stages)} stages, {width_text}encoder blocks {'-'.join(map(str, blocks))}, "
            f"{int(stem.shape[1])} input channel(s))")


def _key_summary(state_dict: Mapping[str, torch.Tensor]) -> str:
    return f"{len(state_dict)} tensors, first {next(iter(state_dict), 'none')}"


DESCRIBERS.append(describe_resenc)


def count_cost(backbone: Backbone, patch: tuple[int, int, int] = COST_PATCH, input_channels: int = 1,
               num_classes: int = COST_CLASSES, configuration: Any = None) -> tuple[int, int]:
    """(parameters, forward multiply-accumulates of one patch), counted on the meta device."""
    with torch.device("meta"):
        network = build(backbone, configuration, input_channels, num_classes, deep_supervision=False)
        if tuple(getattr(network, "input_shape", patch)) != tuple(patch):  # a fixed input (Primus): built for it
            network = cost_network(backbone, patch, [], input_channels, num_classes)
    return count_parameters(network), count_forward_macs(network, (1, input_channels, *patch))
