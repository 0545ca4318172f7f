"""Backbones: every network a run can train, as a registry (timm's way), and the one place that says how each is
planned, built, split into parts for recipes and initialised from a checkpoint.

A `Backbone` is data: its model name (the one in trainer names and job ids), its family and table row, the nnU-Net
planner and plans identifier it trains on, its builder, its deep-supervision outputs, its default recipes, the
parts recipes address, the layers fine-tuning adapts (`first_conv`) and replaces (`classifier`), the checkpoint
formats it reads and its catalogued pretrained file. This module needs no torch (run identity, tables and
`segbook --help` ask it for names); building and loading are in `segbook.backbones.models`.

Built in: STU-Net tiny..huge (TotalSegmentator checkpoints), nnU-Net's default network (`nnunet`, scratch only) and
nnU-Net's residual-encoder U-Nets `resenc-m` and `resenc-l` (planned by nnUNetPlannerResEncM/L, built by nnU-Net's
own `get_network_from_plans`, pretrained weights through --weights). User backbones come from the entry-point group
`segbook.backbones` and from Python files named by `--backbone-file` (kept in `SEGBOOK_BACKBONE_FILES`, so the
trainer processes nnU-Net starts find them too): each such module or entry point gives a `Backbone` or a list of
them (a file: its module-level `BACKBONES`). Loading a user's Python file is the user's explicit consent to run it,
which a checkpoint never is.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    "nnunet": "stunet.loading:read_state_dict",  # an nnU-Net v2 training checkpoint (`network_weights`)
    "state_dict": "stunet.loading:read_state_dict",  # torch.save(network.state_dict(), path), or the above
    "nnssl": "segbook.backbones.nnssl:read_nnssl_checkpoint",
}
#: Formats that say themselves what transfers, adapted by their own function ("module:function", called as
#: `(network_state, content, tiling=, network_name=) -> (state_dict to load, stunet.LoadReport)`). nnssl's
#: checkpoints hold the whole pretraining network, of which only the stem and encoder transfer (nnssl's reference
#: fine-tuning); every other format is adapted by the catalogued conventions (`first_conv`, `classifier`, aliases).
FORMAT_ADAPTERS: dict[str, str] = {
    "nnssl": "segbook.backbones.nnssl:adapt_for_fine_tuning",
}


class BackboneError(SegbookError):
    """An unknown backbone, a user backbone file that does not load, or a backbone that cannot do what is asked."""


@dataclass(frozen=True)
class Parts:
    """The parameter-name prefixes of the parts recipes address. `encoder_stages` is the number of encoder stages
    when it is fixed (layer-wise rate decay needs it), None when the plans decide it."""

    encoder: tuple[str, ...]
    decoder: tuple[str, ...]
    heads: tuple[str, ...]
    encoder_stages: int | None = None

    def part_of(self, name: str) -> str:
        for part, prefixes in ((HEADS, self.heads), (ENCODER, self.encoder), (DECODER, self.decoder)):
            if name.startswith(prefixes):
                return part
        raise BackboneError(f"parameter {name} belongs to no part (encoder {self.encoder}, decoder "
                            f"{self.decoder}, heads {self.heads})")


@dataclass(frozen=True)
class Backbone:
    """One network a run can train (one size of a family).

    `build` is "module:function" or a callable `(model, configuration, input_channels, num_classes,
    deep_supervision) -> nn.Module`, `configuration` being nnU-Net's `ConfigurationManager` of the task's plans, or
    None for the backbone's reference architecture (what its checkpoints were pretrained as); None as `build` means
    nnU-Net's own builder from the plans (`get_network_from_plans`). `checkpoint_formats` are keys of
    `FORMAT_READERS`; empty means the backbone trains from scratch only. `aliases` map key prefixes that name the same
    tensors twice in a state_dict (dynamic_network_architectures' decoder holds the encoder) to their canonical
    prefix, so a checkpoint need not repeat them.
    """

    name: str
    family: str
    title: str
    planner: str = "default"
    plans: str = "nnUNetPlans"
    build: str | Callable[..., Any] | None = None
    deep_supervision: bool = True
    default_recipes: tuple[tuple[str, str], ...] = (("pretrained", "segbook"), ("scratch", "scratch"))
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
    #: Whether the plans change the shapes of the weights (ResEnc's stages follow the patch; STU-Net's five stages
    #: do not): then a checkpoint can be checked against a task's network only once the task is planned.
    shapes_from_plans: bool = False
    description: str = ""
    source: str = "built in"
    #: The backbone in a sentence ("STU-Net large", "nnU-Net's default network"); default: its title.
    label: str = ""

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

    @property
    def pretrainable(self) -> bool:
        return bool(self.checkpoint_formats)

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
        build="segbook.backbones.models:build_stunet",
        parts=Parts(("conv_blocks_context.",), ("upsample_layers.", "conv_blocks_localization."), ("seg_outputs.",),
                    encoder_stages=6),
        first_conv=cfg.first_conv if cfg else FIRST_CONV_KEYS,
        classifier=cfg.classifier if cfg else HEAD_PREFIX.rstrip("."), checkpoint_formats=("stunet",),
        pretrained=cfg, cost=_STUNET_COST[preset], label=f"STU-Net {preset}",
        description=f"STU-Net {preset} (base width {PRESETS[preset].base_width}, "
                    f"{PRESETS[preset].blocks_per_stage} block(s) per stage); five stages, strides from the plans")


_STUNET_COST = {"tiny": (3_665_069, 33_925_431_296), "small": (14_596_941, 130_069_168_128),
                "base": (58_262_669, 509_011_558_400), "large": (440_302_605, 3_825_455_333_376),
                "huge": (1_457_326_221, 12_667_240_316_928)}
_RESENC_PARTS = Parts(("encoder.",), ("decoder.stages.", "decoder.transpconvs."), ("decoder.seg_layers.",))
_RESENC_FIRST_CONV = ("encoder.stem.convs.0.conv.weight", "encoder.stem.convs.0.all_modules.0.weight")
_RESENC_COST = (102_432_685, 724_315_406_336)


def _resenc(size: str) -> Backbone:
    return Backbone(
        name=f"resenc-{size.lower()}", family="nnU-Net ResEnc", title=f"nnU-Net ResEnc-{size}",
        planner=f"resenc-{size.lower()}", plans=f"nnUNetResEncUNet{size}Plans",
        build="segbook.backbones.models:build_resenc", parts=_RESENC_PARTS, first_conv=_RESENC_FIRST_CONV,
        classifier="decoder.seg_layers", checkpoint_formats=("nnssl", "nnunet"),
        aliases=(("decoder.encoder.", "encoder."),), cost=_RESENC_COST, shapes_from_plans=True,
        description=f"nnU-Net's residual-encoder U-Net, planned by nnUNetPlannerResEnc{size} "
                    f"(nnUNetResEncUNet{size}Plans) and built by nnU-Net from them")


BUILTIN: tuple[Backbone, ...] = (
    *(_stunet(preset) for preset in PRESETS),
    Backbone(name="nnunet", family="nnU-Net", title="nnU-Net", label="nnU-Net's default network",
             description="nnU-Net's default U-Net (PlainConvUNet from nnUNetPlans), the paper's scratch baseline"),
    _resenc("M"),
    _resenc("L"),
)


@dataclass
class _Registry:
    backbones: dict[str, Backbone] = field(default_factory=dict)
    loaded_files: set[str] = field(default_factory=set)


_registry = _Registry({b.name: b for b in BUILTIN})


def _add(backbones: Iterable[Backbone], origin: str) -> None:
    for backbone in backbones:
        if not isinstance(backbone, Backbone):
            raise BackboneError(f"{origin} gives {backbone!r}, not a segbook.backbones.Backbone")
        known = _registry.backbones.get(backbone.name)
        if known is not None and known != backbone:
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
        items = found if isinstance(found, (list, tuple)) else [found]
        _add([_with_source(b, f"entry point {point.value}") for b in items], f"entry point {point.value}")


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
    """The planner (`segbook.plan.PLANNERS` key) a run of `model` trains on: `default` means the backbone's own;
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
