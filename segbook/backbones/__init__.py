"""Backbones: every network a run can train, as a registry (timm's way), and the one place that says how each is
planned, built, split into parts for recipes and initialised from a checkpoint.

A `Backbone` is data: its model name (the one in trainer names and job ids), its family and table row, the nnU-Net
planner it trains on (`PLANNERS` says the plans each writes), its builder, its deep-supervision outputs, its default
recipes, the parts recipes address and their stages, the layers fine-tuning adapts (`first_conv`) and replaces
(`classifier`), the checkpoint formats it reads and its catalogued pretrained file, the network its GPU-hours are
estimated from, its trainer class, and its place and colour in tables and figures. No other module branches on a
model's name or family: each asks its backbone, so a user's backbone is a full citizen everywhere. This module needs
no torch (run identity, tables and `segbook --help` ask it for names); building and loading are in
`segbook.backbones.models`.

Built in: STU-Net tiny..huge (TotalSegmentator checkpoints), nnU-Net's default network (`nnunet`, scratch only) and
nnU-Net's residual-encoder U-Nets `resenc-m` and `resenc-l` (planned by nnUNetPlannerResEncM/L, built by nnU-Net's
own `get_network_from_plans`, pretrained weights through --weights), and the transformers `primus-s/b/m/l`
(OpenMind's sizes, nnssl checkpoints through --weights). User backbones come from the entry-point group
`segbook.backbones` and from Python files named by `--backbone-file` (kept in `SEGBOOK_BACKBONE_FILES`, so the
trainer processes nnU-Net starts find them too): each such module or entry point gives a `Backbone` or a list of
them (a file: its module-level `BACKBONES`). Loading a user's Python file is the user's explicit consent to run it,
which a checkpoint never is.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Callable, Iterable

from segbook.errors import SegbookError
from stunet.checkpoints import CATALOGUE, FIRST_CONV_KEYS, HEAD_PREFIX, PRESETS, PretrainedCfg

#: Where `--backbone-file` puts the files it loads (os.pathsep-separated), for the processes a run starts.
FILES_VARIABLE = "SEGBOOK_BACKBONE_FILES"
ENTRY_POINT_GROUP = "segbook.backbones"
#: Model names: lower case, digits and hyphens (`_` separates a trainer name's parts, `__` a job id's).
MODEL_NAME = re.compile(r"^[a-z][a-z0-9-]*$")
ENCODER, DECODER, HEADS = "encoder", "decoder", "heads"
#: The readers of the checkpoint formats a backbone may declare: "module:function", each `(path) -> state_dict`
#: with the network's key names (raising `stunet.CheckpointError` for a file it cannot read). `nnssl` is MIC-DKFZ's
#: self-supervised pretraining framework's checkpoint (the OpenMind ResEnc-L release).
FORMAT_READERS: dict[str, str] = {
    "stunet": "stunet.loading:read_state_dict",  # nnU-Net v1 `.model`, nnU-Net v2 `.pth` or a plain state_dict
    "nnunet": "segbook.backbones.models:read_nnunet_checkpoint",  # an nnU-Net v2 training checkpoint
    "state_dict": "stunet.loading:read_state_dict",  # torch.save(network.state_dict(), path), or the above
    "nnssl": "segbook.backbones.nnssl:read_nnssl_checkpoint",
}
#: Formats that say themselves what transfers, adapted by their own function ("module:function", called as
#: `(network_state, content, tiling=, network_name=, input_shape=) -> (state_dict to load, stunet.LoadReport)`,
#: `input_shape` a fixed-input network's patch or None). nnssl's
#: checkpoints hold the whole pretraining network, of which only the stem and encoder transfer (nnssl's reference
#: fine-tuning); every other format is adapted by the catalogued conventions (`first_conv`, `classifier`, aliases).
FORMAT_ADAPTERS: dict[str, str] = {
    "nnssl": "segbook.backbones.nnssl:adapt_for_fine_tuning",
}
#: The source of a backbone known only from what its runs recorded (`segbook.backbones.recorded`): tables can show
#: its runs, nothing can build it, and its own file or entry point replaces it once loaded.
STAND_IN = "recorded by its runs"

#: How each format's single-channel stem is tiled over a task's input channels (`stunet.loading.TILINGS`) unless
#: a run says otherwise (`--stem-tiling`): the rule of the code that fine-tunes such files. STU-Net's official loader
#: repeats the first block's weights on every channel (uni-medical/STU-Net `nnUNet-2.2/nnunetv2/run/
#: run_finetuning_stunet.py` L30-35); nnssl's reference fine-tuning repeats and divides by the channel count (MIC-DKFZ
#: nnU-Net after 2.8.1, `pretrainedTrainer.py` `load_pretrained_weights` L280-287). nnU-Net's own `.pth` and plain
#: state dicts have no upstream rule (nnU-Net 2.8.1's `load_pretrained_weights.py` L38-46 demands equal shapes):
#: `repeat` is segbook's choice for them, the same as STU-Net's.
FORMAT_STEM_TILINGS: dict[str, str] = {
    "stunet": "repeat",
    "nnunet": "repeat",
    "state_dict": "repeat",
    "nnssl": "mean",
}
#: The backbone whose checkpoint `segbook plan --weights FILE` reads unless `--model` names another (for `--plans
#: checkpoint` and `--normalization checkpoint`): nnU-Net's ResEnc-L, the network of OpenMind's nnssl release
#: (docs/backbones-nnssl.md), the checkpoint those options were built for. A test keeps it a backbone reading nnssl.
CHECKPOINT_PLANS_MODEL = "resenc-l"
#: The normalisation schemes nnU-Net knows (2.8.1 `preprocessing/normalization/default_normalization_schemes.py`),
#: whose names nnssl's plans use too: a pretraining normalisation named otherwise is not recorded.
NORMALIZATION_SCHEMES = ("ZScoreNormalization", "CTNormalization", "NoNormalization", "RescaleTo01Normalization",
                         "RGBTo01Normalization")
def normalization_problem(schemes: object, masks: object) -> str | None:
    """What is wrong with a checkpoint's record of its normalisation (nnssl's plan, an nnU-Net checkpoint's
    `init_args`), or None: a list of nnU-Net's scheme names, and mask flags one boolean per scheme (or none). Files
    saved before nnssl converted numpy values hold numpy booleans: they count as booleans."""
    import numpy as np

    if not isinstance(schemes, (list, tuple)) or not schemes or not all(isinstance(v, str) for v in schemes):
        return f"'normalization_schemes' is {schemes!r}, not a list of scheme names"
    unknown = [v for v in schemes if v not in NORMALIZATION_SCHEMES]
    if unknown:
        return f"unknown scheme(s) {', '.join(map(repr, unknown))} (nnU-Net knows {', '.join(NORMALIZATION_SCHEMES)})"
    if masks is not None and not (isinstance(masks, (list, tuple)) and len(masks) == len(schemes)
                                  and all(isinstance(v, (bool, np.bool_)) for v in masks)):
        return f"'use_mask_for_norm' is {masks!r}, not one boolean per scheme"
    return None


#: The SegBook study's recipes: the paper's fine-tuning, and nnU-Net's schedule from scratch. What a backbone trains
#: when a run names no recipe unless it declares its own (`Backbone.default_recipes`; every built-in one takes
#: these); the recipes table compares other recipes with the study's.
STUDY_RECIPES: dict[str, str] = {"pretrained": "segbook", "scratch": "scratch"}


@dataclass(frozen=True)
class Planner:
    """An nnU-Net experiment planner (a `segbook plan --planner` name) and the plans identifier its plans are saved
    under. `nnunet_class` is nnU-Net's planner, "module:Class"; None for the SegBook authors' variants of nnU-Net's
    default planner, at their patch size and spacing (`segbook.reference_plans`; `zscore`: normalising CT per image
    too, as the pretraining did). `architecture`: a checkpoint's network (`segbook.backbones.nnssl.
    CheckpointArchitecture`) that `segbook.checkpoint_plans` plans the task around (`--plans checkpoint`); such
    planners are registered when a run names its checkpoint. `normalization`: the checkpoint's pretraining schemes
    and mask flags (`segbook.checkpoint_normalization`, `--normalization checkpoint`), which the planner's plans
    then normalise every channel by; registered likewise."""

    plans: str
    nnunet_class: str | None = None
    zscore: bool = False
    architecture: Any = None
    normalization: tuple[tuple[str, ...], tuple[bool, ...]] | None = None

    @property
    def is_reference(self) -> bool:
        """Whether it plans at the SegBook authors' patch size and spacing (`segbook.reference_plans`)."""
        return self.nnunet_class is None and self.architecture is None


_NNUNET_PLANNERS = "nnunetv2.experiment_planning.experiment_planners."
_RESENC_PLANNERS = f"{_NNUNET_PLANNERS}residual_unets.residual_encoder_unet_planners:nnUNetPlannerResEnc"
#: Every planner a task can be planned by, and so the plans a backbone trains on (`Backbone.planner`); `segbook.plan`
#: runs them.
PLANNERS: dict[str, Planner] = {
    "default": Planner("nnUNetPlans", f"{_NNUNET_PLANNERS}default_experiment_planner:ExperimentPlanner"),
    **{f"resenc-{size.lower()}": Planner(f"nnUNetResEncUNet{size}Plans", f"{_RESENC_PLANNERS}{size}")
       for size in ("M", "L", "XL")},
    "paper": Planner("SegbookPaperPlans"),
    #: Primus' fixed input: the default planner's patch clipped to multiples of the patch embedding (docs/backbones.md)
    "primus": Planner("SegbookPrimusPlans", "segbook.primus_plans:PrimusPlanner"),
    "paper-zscore": Planner("SegbookPaperZScorePlans", zscore=True),
}


class BackboneError(SegbookError):
    """An unknown backbone, a user backbone file that does not load, or a backbone that cannot do what is asked."""


@dataclass(frozen=True)
class Parts:
    """The parameter-name prefixes of the parts recipes address (what they freeze, or train at rates of their own).
    `encoder_stages` is the number of encoder stages when it is fixed (layer-wise rate decay needs it), None when
    the plans decide it; where it is fixed, an encoder parameter's name goes on from its prefix with its stage, from
    0 (the stem's resolution) to the deepest (`conv_blocks_context.3.0.conv1.weight`: stage 3)."""

    encoder: tuple[str, ...]
    decoder: tuple[str, ...]
    heads: tuple[str, ...]
    encoder_stages: int | None = None

    def part_of(self, name: str) -> tuple[str, int | None]:
        """(part, encoder stage or None) of a parameter. Names inside LoRA's wrappers
        (`...conv1.base_layer.weight`) belong where their layer does."""
        for part, prefixes in ((HEADS, self.heads), (ENCODER, self.encoder), (DECODER, self.decoder)):
            prefix = next((p for p in prefixes if name.startswith(p)), None)
            if prefix is not None:
                return part, self._stage(name, prefix) if part == ENCODER else None
        raise BackboneError(f"parameter {name} belongs to no part (encoder {self.encoder}, decoder "
                            f"{self.decoder}, heads {self.heads})")

    def _stage(self, name: str, prefix: str) -> int | None:
        if self.encoder_stages is None:
            return None
        stage = name[len(prefix):].split(".")[0]
        if not stage.isdigit() or int(stage) >= self.encoder_stages:
            raise BackboneError(f"encoder parameter {name} names no stage 0-{self.encoder_stages - 1} after {prefix}")
        return int(stage)


@dataclass(frozen=True)
class Backbone:
    """One network a run can train (one size of a family).

    `build` is "module:function" or a callable `(model, configuration, input_channels, num_classes,
    deep_supervision) -> nn.Module`, `configuration` being nnU-Net's `ConfigurationManager` of the task's plans, or
    None for the backbone's reference architecture (what its checkpoints were pretrained as); None as `build` means
    nnU-Net's own builder from the plans (`get_network_from_plans`). `planner` is a key of `PLANNERS`, which says the
    plans it writes. `checkpoint_formats` are keys of `FORMAT_READERS`; empty means the backbone trains from scratch
    only. `aliases` map key prefixes that name the same tensors twice in a state_dict (dynamic_network_architectures'
    decoder holds the encoder) to their canonical prefix, so a checkpoint need not repeat them.

    Every other module asks the backbone rather than its name or family: its default recipe of each initialisation
    (trainer names, batch jobs and the results' default runs follow it), its parts and their stages (recipes), its
    plans (runs, preparation), the network its GPU-hours are estimated from (`cost_network`), the trainer class that
    trains it (`trainer`), and its place and colour in tables and figures.
    """

    name: str
    family: str
    title: str
    planner: str = "default"
    build: str | Callable[..., Any] | None = None
    deep_supervision: bool = True
    #: The recipe of a run that names none, for each initialisation (`segbook.runs.Identity`): run names leave it
    #: out, batches train it unless given --recipes, and the results show its runs unless asked for others.
    default_recipes: tuple[tuple[str, str], ...] = tuple(STUDY_RECIPES.items())
    parts: Parts | None = None
    first_conv: tuple[str, ...] = ()
    classifier: str = ""
    checkpoint_formats: tuple[str, ...] = ()
    pretrained: PretrainedCfg | None = None
    aliases: tuple[tuple[str, str], ...] = ()
    #: Parameters and forward multiply-accumulates at one 128^3 patch, 1 input channel, 105 classes (reference
    #: architecture), counted by `segbook.backbones.models.count_cost`: data so tables and estimates need no torch;
    #: a test keeps the built-in ones equal to the count.
    cost: tuple[int, int] | None = None
    #: The GPU-hours its catalogued checkpoint's pretraining took, as its authors published them, with where
    #: (`pretraining_gpu_hours_source`: paper and section or table); None where no figure is published (or none
    #: was verified): `segbook results --table pareto --pretraining-cost amortise` then shows the cost unknown
    #: unless given --pretraining-gpu-hours MODEL=H, never zero.
    pretraining_gpu_hours: float | None = None
    pretraining_gpu_hours_source: str = ""
    #: Whether the plans change the shapes of the weights (ResEnc's stages follow the patch; STU-Net's five stages
    #: do not): then a checkpoint can be checked against a task's network only once the task is planned.
    shapes_from_plans: bool = False
    description: str = ""
    source: str = "built in"
    #: The backbone in a sentence ("STU-Net large", "nnU-Net's default network"); default: its title.
    label: str = ""
    #: "module:function" or a callable `(model, patch, strides, input_channels, num_classes) -> nn.Module`: the
    #: network whose FLOPs estimate a job's GPU-hours, at a patch and nnU-Net's strides (a task's plans, or its
    #: reference patch before planning); None: the reference architecture (`build` without plans).
    cost_network: str | Callable[..., Any] | None = None
    #: "module:Class" of the nnU-Net trainer its runs train with (a subclass of
    #: `segbook.training.trainers.BackboneTrainer`); None: that one.
    trainer: str | None = None
    #: Where its rows go in tables and figures: lower first, equal ones in registry order.
    table_order: int = 1
    #: Its colour in the report's figures ("#rrggbb"); empty: one of `OTHER_COLOURS`, chosen by its name.
    colour: str = ""
    #: Part of the SegBook study, the matrix `segbook batch` runs unless given --models.
    study: bool = False
    #: Whether `build` takes a keyword `drop_path_rate=` (stochastic depth), which a recipe's `drop_path_rate` then
    #: sets; a recipe setting it for a backbone without is refused (`Recipe.check_fits`).
    drop_path: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.title)
        if not MODEL_NAME.match(self.name):
            raise BackboneError(f"backbone name {self.name!r}: use lower-case letters, digits and hyphens, starting "
                                "with a letter")
        unknown = [f for f in self.checkpoint_formats if f not in FORMAT_READERS]
        if unknown:
            raise BackboneError(f"backbone {self.name}: unknown checkpoint format(s) {', '.join(unknown)}; known: "
                                f"{', '.join(FORMAT_READERS)}")
        if self.pretrained is not None and self.pretrained.format not in self.checkpoint_formats:
            raise BackboneError(f"backbone {self.name}: its catalogued checkpoint is in format "
                                f"{self.pretrained.format}, which it does not read "
                                f"({', '.join(self.checkpoint_formats)})")
        if self.checkpoint_formats and not self.classifier:
            raise BackboneError(f"backbone {self.name} reads checkpoints but names no classifier (the layer "
                                "fine-tuning replaces)")
        if self.planner not in PLANNERS:
            raise BackboneError(f"backbone {self.name}: unknown planner {self.planner!r}; known: {', '.join(PLANNERS)}")
        hours = self.pretraining_gpu_hours
        if hours is not None and (isinstance(hours, bool) or not isinstance(hours, (int, float))
                                  or not math.isfinite(hours) or hours <= 0 or not self.pretraining_gpu_hours_source):
            raise BackboneError(f"backbone {self.name}: pretraining_gpu_hours is a positive number with its "
                                f"pretraining_gpu_hours_source (where it is published), got {hours!r}")
        if set(dict(self.default_recipes)) != set(STUDY_RECIPES):
            raise BackboneError(f"backbone {self.name}: default_recipes names one recipe for each of "
                                f"{', '.join(STUDY_RECIPES)}, got {self.default_recipes!r}")

    @property
    def pretrainable(self) -> bool:
        return bool(self.checkpoint_formats)

    @property
    def plans(self) -> str:
        """The plans identifier its runs train on: its planner's."""
        return PLANNERS[self.planner].plans

    def default_recipe(self, init: str) -> str:
        return dict(self.default_recipes)[init]

    def fixed_plans(self) -> bool:
        """Whether this backbone is planned by nnU-Net's default planner (the one `--plans paper` varies)."""
        return self.planner == "default"


def _stunet(preset: str) -> Backbone:
    """An STU-Net size; the layers fine-tuning adapts and replaces are its catalogue entry's (the official
    checkpoints' convention, which `tiny`, never released, shares)."""
    cfg = CATALOGUE.get(preset)
    return Backbone(
        name=preset, family="STU-Net", title=f"STU-Net-{preset[0].upper()}",
        build="segbook.backbones.models:build_stunet", parts=_STUNET_PARTS,
        first_conv=cfg.first_conv if cfg else FIRST_CONV_KEYS,
        classifier=cfg.classifier if cfg else HEAD_PREFIX.rstrip("."), checkpoint_formats=("stunet",),
        pretrained=cfg, cost=_STUNET_COST[preset], label=f"STU-Net {preset}",
        cost_network="segbook.backbones.models:stunet_cost_network",
        trainer="segbook.training.trainers:STUNetTrainer", colour=_STUNET_COLOURS[preset],
        study=preset in ("base", "large", "huge"),
        description=f"STU-Net {preset} (base width {PRESETS[preset].base_width}, "
                    f"{PRESETS[preset].blocks_per_stage} block(s) per stage); five stages, strides from the plans")


#: STU-Net's parts by the official module names (what its checkpoints are keyed by): six encoder stages, 0 at the
#: stem's resolution, the decoder's upsamplings and blocks, a segmentation head at each of its five stages.
_STUNET_PARTS = Parts(("conv_blocks_context.",), ("upsample_layers.", "conv_blocks_localization."),
                      ("seg_outputs.",), encoder_stages=6)
_STUNET_COLOURS = {"tiny": "#937860", "small": "#8172b3", "base": "#4c72b0", "large": "#dd8452", "huge": "#55a868"}
_STUNET_COST = {"tiny": (3_665_069, 33_925_431_296), "small": (14_596_941, 130_069_168_128),
                "base": (58_262_669, 509_011_558_400), "large": (440_302_605, 3_825_455_333_376),
                "huge": (1_457_326_221, 12_667_240_316_928)}
_RESENC_PARTS = Parts(("encoder.",), ("decoder.stages.", "decoder.transpconvs."), ("decoder.seg_layers.",))
_RESENC_FIRST_CONV = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")
_RESENC_COST = (102_432_685, 724_315_406_336)


def _resenc(size: str) -> Backbone:
    return Backbone(
        name=f"resenc-{size.lower()}", family="nnU-Net ResEnc", title=f"nnU-Net ResEnc-{size}",
        planner=f"resenc-{size.lower()}",
        build="segbook.backbones.models:build_resenc", parts=_RESENC_PARTS, first_conv=_RESENC_FIRST_CONV,
        classifier="decoder.seg_layers", checkpoint_formats=("nnssl", "nnunet"),
        aliases=(("decoder.encoder.", "encoder."),), cost=_RESENC_COST, shapes_from_plans=True,
        cost_network="segbook.backbones.models:resenc_cost_network",
        description=f"nnU-Net's residual-encoder U-Net, planned by nnUNetPlannerResEnc{size} "
                    f"(nnUNetResEncUNet{size}Plans) and built by nnU-Net from them")


#: Primus sizes (embed dim, EVA depth, heads) as OpenMind defines them: dna 0.4.4 `_PRIMUS_CONFIGS` (primus.py
#: L22-43), nnU-Net 2.8.1 documentation/primus.md L35-40. `primus_backbone` adds a size (tests add a tiny one).
PRIMUS_SIZES: dict[str, tuple[int, int, int]] = {}
#: Primus' parts (dna primus.py L89-93): the patch embedding and the EVA transformer are the encoder nnssl pretrains;
#: the patch decoder's last transposed convolution is the only layer whose shape follows the classes.
_PRIMUS_PARTS = Parts(("down_projection.", "eva."), ("up_projection.decode.0.", "up_projection.decode.1."),
                      ("up_projection.decode.2.",))
_PRIMUS_COST = {"primus-s": (26_401_165, 334_773_616_640), "primus-b": (99_059_017, 820_074_512_384),
                "primus-m": (153_055_041, 1_189_110_349_824), "primus-l": (333_886_329, 2_326_806_921_216)}


def primus_backbone(name: str, embed_dim: int, depth: int, heads: int, **fields: Any) -> Backbone:
    """A Primus size (dna's `Primus` with OpenMind's `init_values=0.1`, `scale_attn_inner=True` and an 8^3 patch
    embedding), planned by the Primus planner, without deep supervision (nnU-Net's Primus trainers and HEAD's
    PretrainedTrainer_Primus train without it), with the Primus recipes and nnssl checkpoints."""
    PRIMUS_SIZES[name] = (embed_dim, depth, heads)
    defaults = dict(
        name=name, family="Primus", title=f"Primus-{name.rpartition('-')[2].upper()}", planner="primus",
        build="segbook.backbones.models:build_primus", deep_supervision=False,
        default_recipes=(("pretrained", "primus"), ("scratch", "primus-scratch")), parts=_PRIMUS_PARTS,
        first_conv=("down_projection.proj.weight",), classifier="up_projection.decode.2",
        checkpoint_formats=("nnssl",), cost_network="segbook.backbones.models:primus_cost_network", drop_path=True,
        description=f"Primus (EVA transformer, embed {embed_dim}, depth {depth}, {heads} heads, 8^3 patch "
                    "embedding): a fixed input, the Primus planner's patch (SegbookPrimusPlans)")
    return Backbone(**{**defaults, **fields})


BUILTIN: tuple[Backbone, ...] = (
    *(_stunet(preset) for preset in PRESETS),
    Backbone(name="nnunet", family="nnU-Net", title="nnU-Net", label="nnU-Net's default network",
             cost_network="segbook.backbones.models:plain_unet_cost_network", table_order=0, colour="#7f7f7f",
             study=True,
             description="nnU-Net's default U-Net (PlainConvUNet from nnUNetPlans), the paper's scratch baseline"),
    _resenc("M"),
    _resenc("L"),
    *(primus_backbone(f"primus-{size}", *sizes, cost=_PRIMUS_COST[f"primus-{size}"])
      for size, sizes in (("s", (396, 12, 6)), ("b", (792, 12, 12)), ("m", (864, 16, 12)), ("l", (1056, 24, 16)))),
)


@dataclass
class _Registry:
    backbones: dict[str, Backbone] = field(default_factory=dict)
    loaded_files: set[str] = field(default_factory=set)
    #: model name -> the entry point that gave it (`recorded.source_record` writes it into its runs' run.json).
    entry_points: dict[str, dict[str, str]] = field(default_factory=dict)


_registry = _Registry({b.name: b for b in BUILTIN})


def _add(backbones: Iterable[Backbone], origin: str) -> None:
    for backbone in backbones:
        if not isinstance(backbone, Backbone):
            raise BackboneError(f"{origin} gives {backbone!r}, not a segbook.backbones.Backbone")
        known = _registry.backbones.get(backbone.name)
        if known is not None and known != backbone and not known.source.startswith(STAND_IN):
            raise BackboneError(f"{origin} defines backbone {backbone.name!r}, which is already defined "
                                f"({known.source}); choose another name")
        _registry.backbones[backbone.name] = backbone


def load_backbone_file(path: str | os.PathLike) -> list[Backbone]:
    """Run a user's backbone file (explicit consent: it is Python the user wrote) and register its `BACKBONES`;
    the file is remembered in `SEGBOOK_BACKBONE_FILES` for the processes a run starts."""
    path = Path(path).expanduser().resolve()
    if str(path) in _registry.loaded_files:
        return [b for b in _registry.backbones.values() if b.source == str(path)]
    if not path.is_file():
        raise BackboneError(f"backbone file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"segbook_user_backbone_{len(_registry.loaded_files)}",
                                                         path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise BackboneError(f"backbone file {path} failed to load: {type(error).__name__}: {error}") from error
    found = getattr(module, "BACKBONES", None)
    if not isinstance(found, (list, tuple)) or not found:
        raise BackboneError(f"backbone file {path} defines no BACKBONES (a list of segbook.backbones.Backbone)")
    backbones = [_with_source(b, str(path)) for b in found]
    _add(backbones, f"backbone file {path}")
    _registry.loaded_files.add(str(path))
    files = [f for f in os.environ.get(FILES_VARIABLE, "").split(os.pathsep) if f]
    if str(path) not in files:
        os.environ[FILES_VARIABLE] = os.pathsep.join([*files, str(path)])
    return backbones


def _with_source(backbone: Any, source: str) -> Any:
    if not isinstance(backbone, Backbone):
        return backbone  # refused by _add, naming the file
    return backbone if backbone.source != "built in" else Backbone(**{**backbone.__dict__, "source": source})


@cache
def _load_entry_points() -> None:
    from importlib.metadata import entry_points

    for point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found = point.load()
        except Exception as error:
            raise BackboneError(f"entry point {point.name} ({point.value}) of group {ENTRY_POINT_GROUP} failed to "
                                f"load: {type(error).__name__}: {error}") from error
        found = found() if callable(found) and not isinstance(found, Backbone) else found
        items = [_with_source(b, f"entry point {point.value}")
                 for b in (found if isinstance(found, (list, tuple)) else [found])]
        _add(items, f"entry point {point.value}")
        origin = {"name": point.name, "value": point.value, "distribution": point.dist.name if point.dist else "",
                  "version": point.dist.version if point.dist else ""}
        _registry.entry_points.update({b.name: origin for b in items})


def _load_user_backbones() -> None:
    _load_entry_points()
    for file in os.environ.get(FILES_VARIABLE, "").split(os.pathsep):
        if file and str(Path(file).expanduser().resolve()) not in _registry.loaded_files:
            load_backbone_file(file)


def all_backbones() -> list[Backbone]:
    """Every backbone: the built-in ones, then the users' (entry points, backbone files)."""
    _load_user_backbones()
    return list(_registry.backbones.values())


def model_names() -> tuple[str, ...]:
    return tuple(b.name for b in all_backbones())


def builtin_names() -> tuple[str, ...]:
    """The built-in model names: what a command's `--help` can list without running a user's code."""
    return tuple(b.name for b in BUILTIN)


def get(name: str) -> Backbone:
    """The backbone of a model name; `BackboneError` naming the known ones otherwise."""
    backbone = _registry.backbones.get(name)
    if backbone is None:
        _load_user_backbones()
        backbone = _registry.backbones.get(name)
    if backbone is None:
        raise BackboneError(f"unknown model {name!r}; choose one of {', '.join(model_names())} (or add your own: "
                            "docs/backbones.md)")
    return backbone


def is_known(name: str) -> bool:
    try:
        get(name)
    except BackboneError:
        return False
    return True


def resolve(reference: str | Callable[..., Any]) -> Callable[..., Any]:
    """A callable given directly or as "module:function" (built-in references, imported on first use)."""
    if callable(reference):
        return reference
    module, _, attribute = reference.partition(":")
    try:
        return getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError) as error:
        raise BackboneError(f"{reference} is not available: {error}") from None


def planner_for(model: str, plans: str = "default") -> str:
    """The planner (`PLANNERS` key) a run of `model` trains on: `default` means the backbone's own;
    another choice (`paper`) only varies nnU-Net's default planner, so it fits only backbones planned by it."""
    backbone = get(model)
    if plans == "default":
        return backbone.planner
    if not backbone.fixed_plans() and plans != backbone.planner:
        raise BackboneError(f"--plans {plans} varies nnU-Net's default planner; {backbone.label} is planned by "
                            f"its own ({backbone.planner}, {backbone.plans}): leave --plans out")
    return plans


def default_plans(model: str) -> str:
    """The plans identifier a run of `model` trains on unless asked otherwise."""
    return get(model).plans


def table_name(model: str) -> str:
    """A model's row name in tables and reports (the model name itself for one no longer registered)."""
    return _registry.backbones[model].title if model in _registry.backbones else model


def cost(model: str) -> tuple[int, int] | None:
    """(parameters, forward MACs at 128^3) of a model as catalogued; None where unknown."""
    backbone = _registry.backbones.get(model)
    return backbone.cost if backbone is not None else None


def pretraining_cost(model: str) -> tuple[float, str] | None:
    """(GPU-hours, source) of a model's pretraining as catalogued; None where unknown."""
    backbone = _registry.backbones.get(model)
    if backbone is None or backbone.pretraining_gpu_hours is None:
        return None
    return backbone.pretraining_gpu_hours, backbone.pretraining_gpu_hours_source


def study_models() -> tuple[str, ...]:
    """The SegBook study's models (`Backbone.study`), in registry order: what `segbook batch` trains by default."""
    return tuple(b.name for b in BUILTIN if b.study)


def table_configurations() -> list[tuple[str, str]]:
    """Every (model, init) a table can show, in table order (`Backbone.table_order`, then registry order): each
    backbone from scratch, then pretrained where it reads checkpoints."""
    ordered = sorted(all_backbones(), key=lambda b: b.table_order)  # stable: registry order within an order
    return [(b.name, i) for b in ordered for i in ("scratch", "pretrained") if i == "scratch" or b.pretrainable]


#: Colours of the backbones that name none (ResEnc, users'), chosen by name: the same in every figure of a report.
OTHER_COLOURS = ("#c44e52", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#2f4f4f")


def colour(model: str) -> str:
    """A model's colour in figures: its backbone's own, else one of `OTHER_COLOURS` by its name (a model no longer
    registered too)."""
    try:
        own = get(model).colour
    except BackboneError:
        own = ""
    return own or OTHER_COLOURS[sum(map(ord, model)) % len(OTHER_COLOURS)]
