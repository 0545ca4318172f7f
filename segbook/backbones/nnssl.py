"""Pretrained ResEnc-L checkpoints in the format of MIC-DKFZ's nnssl (the OpenMind study), read safely and adapted to
the residual-encoder U-Net (`dynamic_network_architectures`' `ResidualEncoderUNet`) that nnU-Net builds for a task.

The format (see docs/backbones-nnssl.md for the sources): a `torch.save`d dict whose `network_weights` is the state
dict of the whole *pretraining* network and whose `nnssl_adaptation_plan` says where the transferable part lives
(`key_to_stem`, `key_to_encoder`, `keys_to_in_proj`), what the weights expect (input channels, the pretraining
configuration's spacing, patch size and normalisation) and the architecture (`ResEncL`). Only the stem and the
encoder stages transfer, as in nnssl's reference fine-tuning: the pretraining network's other parts (an MAE's
reconstruction decoder, a contrastive method's projection head) are left behind, and the segmentation network's
decoder and heads start fresh. A full-network checkpoint's decoder can be taken as well (`decoder="pretrained"`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from segbook.backbones import normalization_problem

if TYPE_CHECKING:
    import torch
    from torch import nn

    from stunet.loading import LoadReport

WEIGHTS_KEY = "network_weights"
PLAN_KEY = "nnssl_adaptation_plan"
#: Where nnU-Net's ResidualEncoderUNet keeps its stem, its encoder stages and its first convolution (registered
#: twice: as `conv` and as `all_modules.0`), under the names nnssl's adaptation plans use for ResEnc-L.
RESENC_STEM = "encoder.stem"
RESENC_ENCODER = "encoder.stages"
RESENC_IN_PROJ = ("encoder.stem.convs.0.conv", "encoder.stem.convs.0.all_modules.0")
#: The decoder holds a reference to the encoder, so every encoder tensor appears a second time under this prefix.
DECODER_ENCODER_ALIAS = "decoder.encoder."
DECODER_PREFIX = "decoder."
#: The segmentation layers (one per deep-supervision output): always replaced for the task's classes.
HEAD_PREFIX = "decoder.seg_layers."
#: ResEnc-L as nnssl pretrains it (nnssl/architectures/architecture_registry.py, get_res_enc_l).
NNSSL_RESENC_L_WIDTHS = (32, 64, 128, 256, 320, 320)
NNSSL_RESENC_L_BLOCKS = (1, 3, 4, 6, 6, 6)
#: nnssl's reference fine-tuning (TaWald/nnUNet, PretrainedTrainer.load_pretrained_weights) repeats a single-channel
#: stem over the task's channels and divides by their number: stunet.loading's `mean` tiling.
DEFAULT_NNSSL_TILING = "mean"
#: `fresh`: the decoder starts from its initialisation (nnssl's reference fine-tuning); `pretrained`: a full-network
#: checkpoint's decoder is loaded too (strictly; refused for an encoder-only checkpoint).
DECODER_MODES = ("fresh", "pretrained")
#: Where dna's Primus keeps its patch embedding (the stem), its EVA encoder, its first convolution and its learned
#: positional embedding (primus.py L84-87), under the names nnssl's Primus plans use (BaseEvaMAETrainer L169-178).
PRIMUS_STEM = "down_projection"
PRIMUS_ENCODER = "eva"
PRIMUS_IN_PROJ = ("down_projection.proj",)
PRIMUS_LPE = "eva.pos_embed"
PRIMUS_PATCH_EMBED = 8
#: The way out when the task's plans build another network than the checkpoint's (other stage count, kernels).
CHECKPOINT_PLANS_HINT = ("To fine-tune on the checkpoint's own network, plan the task around it: `--plans checkpoint` "
                         "(docs/backbones-nnssl.md)")

_SHOWN = 5


@dataclass(frozen=True)
class NnsslCheckpoint:
    """An nnssl checkpoint as read: its weights (wrapper prefixes removed) and what its adaptation plan says."""

    path: str
    state_dict: dict[str, torch.Tensor]
    #: architecture, trainer, input_channels, patch_size, spacing, spacing_style, normalization,
    #: use_mask_for_norm, recommended_downstream_patchsize, pretrain_dataset, key_to_stem, key_to_encoder,
    #: keys_to_in_proj (None where the plan does not say).
    metadata: dict[str, Any]
    #: What was ignored in the plan (a normalisation record loading does not need, malformed): one line each.
    warnings: tuple[str, ...] = ()

    def pretraining_normalization(self) -> dict[str, Any] | None:
        """How the pretraining images were normalised, as its plan says (`pretrain_plan.configurations.<the one>`:
        nnssl `experiment_planners/plan.py` L23-34), for run.json; None where the plan does not say (or said it
        malformed, see `warnings`)."""
        schemes = self.metadata["normalization"]
        if schemes is None:
            return None
        return {"schemes": schemes, "use_mask_for_norm": self.metadata["use_mask_for_norm"],
                "spacing_mm": self.metadata["spacing"], "source": PLAN_KEY, "checkpoint": Path(self.path).name}

    @property
    def has_decoder(self) -> bool:
        """Whether the pretraining network had a U-Net decoder (MAE, Models Genesis) rather than only an encoder
        (contrastive methods: VoCo, SimCLR)."""
        return any(k.startswith(DECODER_PREFIX) and not k.startswith((DECODER_ENCODER_ALIAS, HEAD_PREFIX))
                   for k in self.state_dict)


@dataclass
class NnsslLoadReport:
    """What adapting a checkpoint did, in the network's key names (the decoder's aliases of encoder keys left out)."""

    loaded: list[str] = field(default_factory=list)
    tiled: list[str] = field(default_factory=list)
    fresh: list[str] = field(default_factory=list)
    #: the checkpoint's segmentation layers, replaced by the network's own
    dropped_heads: list[str] = field(default_factory=list)
    #: checkpoint keys outside what transfers: the pretraining method's own parts (decoder, projection head)
    not_transferred: list[str] = field(default_factory=list)
    #: tensors reshaped for the network: a Primus positional embedding interpolated to the planned patch's tokens
    interpolated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"loaded {len(self.loaded)} tensors, input channels adapted in {len(self.tiled)}, "
                f"{len(self.fresh)} left as initialised (decoder and heads), {len(self.not_transferred)} "
                f"pretraining-only tensors and {len(self.dropped_heads)} head tensors of the checkpoint not used")


def read_nnssl_checkpoint(path: str | os.PathLike) -> NnsslCheckpoint:
    """The weights and adaptation plan in an nnssl checkpoint, read without running anything in the file.

    Refused with a `CheckpointError` naming the file: files torch's safe reader refuses (pickled code), files that
    are not nnssl checkpoints (no adaptation plan), files without weights, weights that are not all tensors, plans
    missing what loading needs, and plans that contradict the weights (input channels).
    """
    import torch

    from stunet.loading import CheckpointError, _strip_prefixes, safe_load

    path = os.fspath(path)
    content = safe_load(path)
    if not isinstance(content, Mapping) or not isinstance(content.get(PLAN_KEY), Mapping):
        found = ", ".join(map(str, list(content)[:8])) if isinstance(content, Mapping) else type(content).__name__
        raise CheckpointError(f"{path} is not an nnssl checkpoint: it has no '{PLAN_KEY}' (it holds: {found})")
    weights = content.get(WEIGHTS_KEY)
    if not isinstance(weights, Mapping) or not weights:
        raise CheckpointError(f"{path} is an nnssl checkpoint without network weights ('{WEIGHTS_KEY}')")
    not_tensors = [repr(k) for k, v in weights.items() if not (isinstance(k, str) and isinstance(v, torch.Tensor))]
    if not_tensors:
        raise CheckpointError(f"{path}: '{WEIGHTS_KEY}' holds entries that are not named tensors: "
                              f"{_shown(not_tensors)}")
    state_dict = _strip_prefixes(weights)
    metadata = _metadata(content, path)
    _check_input_channels(state_dict, metadata, path)
    warnings = _read_normalization(_pretrain_configuration(content[PLAN_KEY], path), metadata, path)
    return NnsslCheckpoint(path=path, state_dict=state_dict, metadata=metadata, warnings=warnings)


def _metadata(content: Mapping, path: str) -> dict[str, Any]:
    """What the adaptation plan says, checked where loading depends on it."""
    plan = content[PLAN_KEY]
    architecture = _field(plan, "architecture_plans", Mapping, path)
    configuration = _pretrain_configuration(plan, path)
    keys_to_in_proj = _field(plan, "keys_to_in_proj", (list, tuple), path)
    if not keys_to_in_proj or not all(isinstance(k, str) for k in keys_to_in_proj):
        raise _plan_error(path, "keys_to_in_proj must be a non-empty list of key names")
    input_channels = _field(plan, "pretrain_num_input_channels", int, path)
    if input_channels < 1:
        raise _plan_error(path, f"pretrain_num_input_channels is {input_channels}")
    return {
        "architecture": _field(architecture, "arch_class_name", str, path),
        "arch_kwargs": architecture.get("arch_kwargs") if isinstance(architecture.get("arch_kwargs"), Mapping)
        else None,
        "trainer": content.get("trainer_name") if isinstance(content.get("trainer_name"), str) else None,
        "input_channels": input_channels,
        "patch_size": _sizes(plan.get("pretrain_patch_size", configuration.get("patch_size")), int, "patch_size",
                             path),
        "spacing": _sizes(configuration.get("spacing"), float, "spacing", path),
        "spacing_style": configuration.get("spacing_style"),
        "recommended_downstream_patchsize": _sizes(plan.get("recommended_downstream_patchsize"), int,
                                                   "recommended_downstream_patchsize", path),
        "pretrain_dataset": plan["pretrain_plan"].get("dataset_name"),
        "key_to_stem": _field(plan, "key_to_stem", str, path),
        "key_to_encoder": _field(plan, "key_to_encoder", str, path),
        "keys_to_in_proj": list(keys_to_in_proj),
        "key_to_lpe": plan.get("key_to_lpe") if isinstance(plan.get("key_to_lpe"), str) else None,
    }


def _plan_error(path: str, problem: str) -> Exception:
    from stunet.loading import CheckpointError

    return CheckpointError(f"{path}: its nnssl adaptation plan is not usable: {problem}")


def _field(mapping: Mapping, name: str, kind: type | tuple[type, ...], path: str) -> Any:
    value = mapping.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise _plan_error(path, f"'{name}' is {value!r}")
    return value


def _pretrain_configuration(plan: Mapping, path: str) -> Mapping:
    """The pretraining configuration (nnssl plans hold exactly one, e.g. `onemmiso`)."""
    configurations = _field(plan, "pretrain_plan", Mapping, path).get("configurations")
    if not isinstance(configurations, Mapping) or len(configurations) != 1:
        held = list(configurations) if isinstance(configurations, Mapping) else configurations
        raise _plan_error(path, f"pretrain_plan.configurations must hold exactly one configuration, not {held!r}")
    configuration = next(iter(configurations.values()))
    if not isinstance(configuration, Mapping):
        raise _plan_error(path, "its pretraining configuration is not a mapping")
    return configuration


def _sizes(value: object, kind: type, name: str, path: str) -> list | None:
    """Three positive numbers (patch size: whole), or None when the plan leaves them out."""
    if value is None:
        return None
    try:
        sizes = [kind(v) for v in value] if isinstance(value, (list, tuple)) else []
        exact = all(float(s) == float(v) for s, v in zip(sizes, value))
    except (TypeError, ValueError):
        sizes, exact = [], False
    if len(sizes) != 3 or not exact or any(v <= 0 for v in sizes):
        raise _plan_error(path, f"'{name}' is {value!r}: expected three positive {kind.__name__}s")
    return sizes


def _read_normalization(configuration: Mapping, metadata: dict[str, Any], path: str) -> tuple[str, ...]:
    """Fill `normalization` and `use_mask_for_norm` of `metadata` from the pretraining configuration. Loading
    needs neither, so a malformed record (not a list of nnU-Net's scheme names, mask flags that are not booleans
    one per scheme) is ignored, both None, with the warning returned rather than the file refused."""
    metadata["normalization"] = metadata["use_mask_for_norm"] = None
    schemes, masks = configuration.get("normalization_schemes"), configuration.get("use_mask_for_norm")
    if schemes is None:
        return ()
    problem = normalization_problem(schemes, masks)
    if problem:
        return (f"{path}: its pretraining normalisation is not recorded: {problem}",)
    metadata["normalization"] = [str(v) for v in schemes]
    metadata["use_mask_for_norm"] = None if masks is None else [bool(v) for v in masks]
    return ()


def _check_input_channels(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], path: str) -> None:
    from stunet.loading import CheckpointError

    stem_weight = state_dict.get(f"{metadata['keys_to_in_proj'][0]}.weight")
    if stem_weight is not None and stem_weight.ndim >= 2 and stem_weight.shape[1] != metadata["input_channels"]:
        raise CheckpointError(f"{path}: its adaptation plan says {metadata['input_channels']} input channel(s), but "
                              f"its first convolution takes {stem_weight.shape[1]}")


def adapt_nnssl_to_network(network_state: Mapping[str, torch.Tensor], checkpoint: NnsslCheckpoint, *,
                           tiling: str = DEFAULT_NNSSL_TILING, decoder: str = "fresh",
                           network_name: str | None = None) -> tuple[dict[str, torch.Tensor], NnsslLoadReport]:
    """The complete state dict to load into the ResEnc network whose state dict is `network_state` (strictly), and
    what was done.

    The checkpoint's stem and encoder stages are renamed from where its plan says they are to where nnU-Net's
    ResidualEncoderUNet keeps them, and must cover the network's stem and encoder exactly: a missing or unexpected
    key, or a shape that differs other than in the stem's input channels, is a `CheckpointError` listing them and
    naming what the checkpoint holds and what the network is (`network_name`, e.g. "ResEnc-M", says the latter in
    words). A single-channel stem is tiled over the network's input channels (`tiling`, see stunet.loading.TILINGS).
    The decoder starts fresh unless `decoder="pretrained"`; the segmentation heads always do. The decoder's aliases
    of encoder tensors are set too, so `load_state_dict` cannot overwrite the encoder with fresh values.
    `network_state` may live on the meta device: this checks a checkpoint before anything is built.
    """
    from stunet.loading import TILINGS, CheckpointError

    if tiling not in TILINGS:
        raise ValueError(f"unknown stem tiling {tiling!r}; choose one of {', '.join(TILINGS)}")
    if decoder not in DECODER_MODES:
        raise ValueError(f"unknown decoder mode {decoder!r}; choose one of {', '.join(DECODER_MODES)}")
    if decoder == "pretrained" and not checkpoint.has_decoder:
        trainer = checkpoint.metadata["trainer"]
        raise CheckpointError(f"{checkpoint.path} holds no decoder (encoder-only pretraining"
                              f"{', trainer ' + trainer if trainer else ''}): fine-tune it with a fresh decoder")
    report = NnsslLoadReport()
    renamed = _rename_to_network(checkpoint, decoder, report)
    adapted, problems = _match(renamed, network_state, checkpoint, tiling, report)
    transferable = _transferable(network_state, decoder)
    missing = [k for k in network_state if k in transferable and k not in adapted]
    if missing or problems["unexpected"] or problems["shape"]:
        raise CheckpointError(_mismatch_message(checkpoint, network_state, network_name, missing, problems))
    report.loaded = list(adapted)
    report.fresh = [k for k in network_state if k not in adapted and not k.startswith(DECODER_ENCODER_ALIAS)]
    return {**network_state, **adapted, **_aliases(adapted, network_state)}, report


def adapt_for_fine_tuning(network_state: Mapping[str, torch.Tensor], checkpoint: NnsslCheckpoint, *,
                          tiling: str = DEFAULT_NNSSL_TILING, network_name: str | None = None,
                          input_shape: tuple[int, ...] | None = None) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """`adapt_nnssl_to_network` (or `adapt_primus_to_network` for a network with Primus' positional embedding) as
    the backbone registry calls a format's adapter (`FORMAT_ADAPTERS`): the decoder fresh, as nnssl's reference
    fine-tuning has it, and the report in the shape every format reports. `input_shape`: a fixed-input network's
    patch (Primus), which its positional embedding is interpolated to."""
    from stunet.loading import CheckpointError, LoadReport

    if PRIMUS_LPE in network_state:
        state, report = adapt_primus_to_network(network_state, checkpoint, tiling=tiling, network_name=network_name,
                                                input_shape=input_shape)
        return state, LoadReport(loaded=report.loaded, skipped_heads=report.dropped_heads, tiled=report.tiled,
                                 adapted=report.interpolated)
    try:
        state, report = adapt_nnssl_to_network(network_state, checkpoint, tiling=tiling, network_name=network_name)
    except CheckpointError as error:
        raise CheckpointError(f"{error}. {CHECKPOINT_PLANS_HINT}") from None
    return state, LoadReport(loaded=report.loaded, skipped_heads=report.dropped_heads, tiled=report.tiled)


def adapt_primus_to_network(network_state: Mapping[str, torch.Tensor], checkpoint: NnsslCheckpoint, *,
                            tiling: str = DEFAULT_NNSSL_TILING, network_name: str | None = None,
                            input_shape: tuple[int, ...] | None = None
                            ) -> tuple[dict[str, torch.Tensor], NnsslLoadReport]:
    """The complete state dict to load into a Primus network, as nnU-Net HEAD's PretrainedTrainer loads nnssl
    Primus files (`load_pretrained_weights`, pretrainedTrainer.py L207-337): the plan's `key_to_stem` and
    `key_to_encoder` (`down_projection`/`eva`, or `encoder.down_projection`/`encoder.eva` for a wrapped encoder)
    become dna Primus' names and must cover its `down_projection.*` and `eva.*` exactly (strictly, shapes too: an
    other embed dim or depth is refused naming both); the pretraining-only `decoder.*`, `up_projection.*` and
    `mask_token` are dropped, the segmentation decoder starts fresh. When the planned patch differs from the
    pretraining patch, `eva.pos_embed` is interpolated trilinearly on the token grid (HEAD load_weights_utils.py
    L200-252, `interpolate_trilinear`) and reported. A single-channel stem is tiled (`tiling`; nnssl: `mean`)."""
    from stunet.loading import CheckpointError

    report = NnsslLoadReport()
    meta = checkpoint.metadata
    moves = ((meta["key_to_stem"] + ".", PRIMUS_STEM + "."), (meta["key_to_encoder"] + ".", PRIMUS_ENCODER + "."))
    renamed = {}
    for key, value in checkpoint.state_dict.items():
        target = next((new + key[len(old):] for old, new in moves if key.startswith(old)), None)
        if target is None:
            report.not_transferred.append(key)
        else:
            renamed[target] = value
    lpe, wanted = renamed.get(PRIMUS_LPE), network_state[PRIMUS_LPE]
    if lpe is not None and lpe.shape[-1] == wanted.shape[-1] and lpe.shape != wanted.shape:
        renamed[PRIMUS_LPE] = interpolate_pos_embed(lpe, _token_grid(meta["patch_size"], checkpoint.path),
                                                    _token_grid(input_shape, checkpoint.path))
        report.interpolated.append(PRIMUS_LPE)
    adapted, problems = _match(renamed, network_state, checkpoint, tiling, report, PRIMUS_IN_PROJ)
    body = (PRIMUS_STEM + ".", PRIMUS_ENCODER + ".")
    missing = [k for k in network_state if k.startswith(body) and k not in adapted]
    if missing or problems["unexpected"] or problems["shape"]:
        parts = [f"missing keys ({len(missing)}): {_shown(missing)}" if missing else "",
                 f"unexpected keys: {_shown(problems['unexpected'])}" if problems["unexpected"] else "",
                 f"shape mismatches: {_shown(problems['shape'])}" if problems["shape"] else ""]
        network = f"{network_name} ({describe_primus(network_state)})" if network_name else \
            describe_primus(network_state)
        raise CheckpointError(f"{checkpoint.path} holds {meta['architecture']} (nnssl; "
                              f"{describe_primus(renamed)}), but the network is {network}: "
                              + "; ".join(p for p in parts if p))
    report.loaded = list(adapted)
    report.fresh = [k for k in network_state if k not in adapted]
    return {**network_state, **adapted}, report


def _token_grid(patch: Any, path: str) -> tuple[int, ...]:
    """The patch's token grid (patch / 8 per axis); a patch not given or not a multiple of 8 is refused."""
    from stunet.loading import CheckpointError

    if patch is None or len(patch) != 3 or any(int(p) % PRIMUS_PATCH_EMBED for p in patch):
        raise CheckpointError(f"{path}: cannot interpolate Primus' positional embedding: patch {patch} is not three "
                              f"multiples of the patch embedding {PRIMUS_PATCH_EMBED}")
    return tuple(int(p) // PRIMUS_PATCH_EMBED for p in patch)


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, ...], new_grid: tuple[int, ...]) -> torch.Tensor:
    """A learned positional embedding `(1, tokens, dim)` on `grid` resized to `new_grid` trilinearly, tokens in
    row-major grid order (dna Primus flattens `b c w h d -> b (w h d) c`, primus.py L170; HEAD's
    `interpolate_patch_embed_3d` rearranges the same way, `align_corners=False`)."""
    import torch.nn.functional as F

    from stunet.loading import CheckpointError

    if pos_embed.shape[1] != math.prod(grid):
        raise CheckpointError(f"the positional embedding holds {pos_embed.shape[1]} tokens, but the pretraining "
                              f"patch's grid {list(grid)} has {math.prod(grid)}")
    volume = pos_embed.reshape(1, *grid, -1).permute(0, 4, 1, 2, 3)
    resized = F.interpolate(volume, size=list(new_grid), mode="trilinear", align_corners=False)
    return resized.permute(0, 2, 3, 4, 1).reshape(1, math.prod(new_grid), -1).contiguous()


def describe_primus(state_dict: Mapping[str, Any]) -> str:
    """A Primus encoder in words (embed dim, depth, tokens), for messages."""
    lpe = state_dict.get(PRIMUS_LPE)
    if lpe is None:
        return f"no Primus encoder (no {PRIMUS_LPE}; keys such as {_shown(list(state_dict))})"
    depth = len({k.split(".")[2] for k in state_dict if k.startswith(f"{PRIMUS_ENCODER}.blocks.")})
    return f"Primus encoder: embed dim {lpe.shape[-1]}, depth {depth}, {lpe.shape[1]} tokens"


def _rename_to_network(checkpoint: NnsslCheckpoint, decoder: str, report: NnsslLoadReport) -> dict[str, Any]:
    """The checkpoint's transferable tensors under the network's key names; the rest recorded in `report`."""
    plan = checkpoint.metadata
    moves = ((plan["key_to_stem"] + ".", RESENC_STEM + "."), (plan["key_to_encoder"] + ".", RESENC_ENCODER + "."))
    renamed = {}
    for key, value in checkpoint.state_dict.items():
        target = next((new + key[len(old):] for old, new in moves if key.startswith(old)), None)
        if target is None and decoder == "pretrained" and key.startswith(DECODER_PREFIX) \
                and not key.startswith(DECODER_ENCODER_ALIAS):
            target = key
        if target is not None and target.startswith(HEAD_PREFIX):
            report.dropped_heads.append(key)
        elif target is not None:
            renamed[target] = value
        elif key.startswith(HEAD_PREFIX):
            report.dropped_heads.append(key)
        else:
            report.not_transferred.append(key)
    return renamed


def _transferable(network_state: Mapping[str, Any], decoder: str) -> set[str]:
    """The network keys the checkpoint must provide: stem and encoder, and the decoder without its heads and its
    aliases of the encoder when the decoder is taken too."""
    body = (RESENC_STEM + ".", RESENC_ENCODER + ".")
    return {k for k in network_state if k.startswith(body) or (
        decoder == "pretrained" and k.startswith(DECODER_PREFIX)
        and not k.startswith((HEAD_PREFIX, DECODER_ENCODER_ALIAS)))}


def _match(renamed: Mapping[str, Any], network_state: Mapping[str, Any], checkpoint: NnsslCheckpoint, tiling: str,
           report: NnsslLoadReport, in_projections: tuple[str, ...] = RESENC_IN_PROJ
           ) -> tuple[dict[str, Any], dict[str, list[str]]]:
    from stunet.loading import _differs_only_in_input_channels, _tile_input_channels

    in_proj = {f"{k}.weight" for k in in_projections}
    adapted: dict[str, Any] = {}
    problems: dict[str, list[str]] = {"unexpected": [], "shape": []}
    for key, value in renamed.items():
        if key not in network_state:
            problems["unexpected"].append(key)
            continue
        wanted = network_state[key].shape
        if key in in_proj and value.shape != wanted and _differs_only_in_input_channels(value.shape, wanted):
            value = _tile_input_channels(value, wanted, key, checkpoint.path, tiling)
            report.tiled.append(key)
        if value.shape != wanted:
            problems["shape"].append(f"{key}: checkpoint {tuple(value.shape)} vs network {tuple(wanted)}")
            continue
        adapted[key] = value
    return adapted, problems


def _aliases(adapted: Mapping[str, Any], network_state: Mapping[str, Any]) -> dict[str, Any]:
    """The decoder's second names for the encoder tensors, given the loaded values (load_state_dict writes both
    names into the same parameter, the alias last)."""
    return {DECODER_PREFIX + k: v for k, v in adapted.items() if DECODER_PREFIX + k in network_state
            and (DECODER_PREFIX + k).startswith(DECODER_ENCODER_ALIAS)}


def _mismatch_message(checkpoint: NnsslCheckpoint, network_state: Mapping[str, Any], network_name: str | None,
                      missing: list[str], problems: Mapping[str, list[str]]) -> str:
    held = describe_checkpoint(checkpoint)
    network = describe_resenc(network_state)
    parts = [f"missing keys ({len(missing)}): {_shown(missing)}" if missing else "",
             f"unexpected keys ({len(problems['unexpected'])}): {_shown(problems['unexpected'])}"
             if problems["unexpected"] else "",
             f"shape mismatches ({len(problems['shape'])}): {_shown(problems['shape'])}" if problems["shape"] else ""]
    network = f"{network_name} ({network})" if network_name else network
    return f"{checkpoint.path} holds {held}, but the network is {network}: " + "; ".join(p for p in parts if p)


def _shown(items: list[str]) -> str:
    more = f", and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""
    return ", ".join(items[:_SHOWN]) + more


def describe_checkpoint(checkpoint: NnsslCheckpoint) -> str:
    """What an nnssl checkpoint holds, in words, for messages: its architecture and trainer as its plan names them,
    and the encoder its weights have."""
    meta = checkpoint.metadata
    encoder = {RESENC_STEM + k[len(meta["key_to_stem"]):]: v for k, v in checkpoint.state_dict.items()
               if k.startswith(meta["key_to_stem"] + ".")}
    encoder.update({RESENC_ENCODER + k[len(meta["key_to_encoder"]):]: v for k, v in checkpoint.state_dict.items()
                    if k.startswith(meta["key_to_encoder"] + ".")})
    trainer = f", trainer {meta['trainer']}" if meta["trainer"] else ""
    return f"{meta['architecture']} (nnssl{trainer}; {describe_resenc(encoder or checkpoint.state_dict)})"


def describe_resenc(state_dict: Mapping[str, Any]) -> str:
    """A residual-encoder U-Net's encoder in words (stages, widths, blocks, input channels), or what else the state
    dict is, for error messages. ResEnc M and L share their widths and blocks (nnU-Net's planners differ in the
    memory target, so in patch size, stage count and kernels): the stage count and kernels tell them apart."""
    from stunet.loading import describe_stunet

    stem = state_dict.get(f"{RESENC_IN_PROJ[0]}.weight")
    if stem is None:
        if "conv_blocks_context.0.0.conv1.weight" in state_dict:
            return describe_stunet(state_dict)
        return f"not a residual-encoder U-Net (no {RESENC_IN_PROJ[0]}.weight; keys such as {_shown(list(state_dict))})"
    stages = _encoder_stages(state_dict)
    widths = tuple(width for width, _, _ in stages)
    blocks = tuple(count for _, count, _ in stages)
    kernels = "x".join("-".join(map(str, kernel)) for _, _, kernel in stages)
    name = "ResEnc-L as nnssl pretrains it" if (widths, blocks) == (NNSSL_RESENC_L_WIDTHS, NNSSL_RESENC_L_BLOCKS) \
        else "a residual-encoder U-Net"
    return (f"{name}: {len(stages)} stages, widths {'-'.join(map(str, widths))}, blocks "
            f"{'-'.join(map(str, blocks))}, kernels {kernels}, {stem.shape[1]} input channel(s)")


def _encoder_stages(state_dict: Mapping[str, Any]) -> list[tuple[int, int, tuple[int, ...]]]:
    """(width, blocks, kernel) of each encoder stage, from the first convolution of each residual block."""
    stages = []
    while f"{RESENC_ENCODER}.{len(stages)}.blocks.0.conv1.conv.weight" in state_dict:
        index = len(stages)
        first = state_dict[f"{RESENC_ENCODER}.{index}.blocks.0.conv1.conv.weight"]
        blocks = 1
        while f"{RESENC_ENCODER}.{index}.blocks.{blocks}.conv1.conv.weight" in state_dict:
            blocks += 1
        stages.append((int(first.shape[0]), blocks, tuple(int(s) for s in first.shape[2:])))
    return stages


def write_nnssl_checkpoint(network_or_state_dict: nn.Module | Mapping[str, torch.Tensor], path: str | os.PathLike,
                           metadata: Mapping[str, Any] | None = None) -> Path:
    """Save weights as nnssl publishes its checkpoints (`network_weights` and a serialised `nnssl_adaptation_plan`,
    training state dropped), atomically. A test utility: segbook's tests write the checkpoints they load with it.

    `metadata` may set: architecture (default "ResEncL"), arch_kwargs (nnssl's dynamic "ResidualEncoderUNet"
    architecture's, with class paths as strings), trainer_name, input_channels (default: the stem's),
    patch_size, spacing, normalization, recommended_downstream_patchsize, dataset_name, key_to_stem,
    key_to_encoder, keys_to_in_proj, key_to_lpe (defaults: ResEnc-L's, as nnssl's trainers write them; Primus:
    `write_nnssl_primus_checkpoint`).
    """
    import torch

    from segbook.io import atomic_path

    state_dict = dict(network_or_state_dict.state_dict() if hasattr(network_or_state_dict, "state_dict")
                      else network_or_state_dict)
    given = dict(metadata or {})
    unknown = set(given) - set(_WRITER_DEFAULTS) - {"input_channels"}
    if unknown:
        raise ValueError(f"unknown nnssl metadata: {', '.join(sorted(unknown))}")
    meta = {**_WRITER_DEFAULTS, **given}
    if "input_channels" not in meta:
        stem = next((v for k, v in state_dict.items() if k.endswith(f"{meta['keys_to_in_proj'][0]}.weight")), None)
        meta["input_channels"] = int(stem.shape[1]) if stem is not None else 1
    content = {WEIGHTS_KEY: state_dict, "trainer_name": meta["trainer_name"], "init_args": {},
               PLAN_KEY: _adaptation_plan(meta)}
    with atomic_path(path) as partial:
        torch.save(content, partial)
    return Path(path)


_WRITER_DEFAULTS: dict[str, Any] = {
    "architecture": "ResEncL", "arch_kwargs": None, "trainer_name": "BaseMAETrainer", "patch_size": [160, 160, 160],
    "spacing": [1.0, 1.0, 1.0], "normalization": ["ZScoreNormalization"],
    "recommended_downstream_patchsize": [160, 160, 160], "dataset_name": "Dataset745_OpenNeuro_v2",
    "key_to_stem": RESENC_STEM, "key_to_encoder": RESENC_ENCODER, "keys_to_in_proj": list(RESENC_IN_PROJ),
    "key_to_lpe": None,
}
#: What nnssl's Primus-M MAE trainer writes into its plan (BaseEvaMAETrainer L169-178, patch L37).
PRIMUS_WRITER_METADATA: dict[str, Any] = {
    "architecture": "PrimusM", "trainer_name": "BaseEvaMAETrainer", "key_to_stem": PRIMUS_STEM,
    "key_to_encoder": PRIMUS_ENCODER, "keys_to_in_proj": list(PRIMUS_IN_PROJ), "key_to_lpe": PRIMUS_LPE,
}


def write_nnssl_primus_checkpoint(network_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
                                  path: str | os.PathLike, patch_size: tuple[int, int, int] = (160, 160, 160),
                                  wrapper: str = "", metadata: Mapping[str, Any] | None = None) -> Path:
    """A dna Primus' weights saved as nnssl's EvaMAE saves them, for tests: `down_projection.*`, `eva.*` (under
    `wrapper`, e.g. "encoder." as vocoEvaTrainer's plan names them, L130-139), the patch decoder
    `up_projection.*`, `mask_token`, and a pretraining-only `decoder.pos_embed` (EvaMAE's EVA decoder,
    evaMAE_module.py), with a Primus-M plan at `patch_size`."""
    import torch

    state = dict(network_or_state_dict.state_dict() if hasattr(network_or_state_dict, "state_dict")
                 else network_or_state_dict)
    body = (PRIMUS_STEM + ".", PRIMUS_ENCODER + ".")
    state = {(wrapper + k if k.startswith(body) else k): v for k, v in state.items()}
    lpe = state[wrapper + PRIMUS_LPE]
    state["decoder.pos_embed"] = torch.zeros(1, lpe.shape[1], 4)
    meta = {**PRIMUS_WRITER_METADATA, "patch_size": list(patch_size), "recommended_downstream_patchsize":
            list(patch_size), **{k: wrapper + PRIMUS_WRITER_METADATA[k] for k in ("key_to_stem", "key_to_encoder",
                                                                                "key_to_lpe")},
            "keys_to_in_proj": [wrapper + k for k in PRIMUS_IN_PROJ], **(metadata or {})}
    return write_nnssl_checkpoint(state, path, meta)


def _adaptation_plan(meta: Mapping[str, Any]) -> dict[str, Any]:
    """An adaptation plan laid out as nnssl's AdaptationPlan.serialize() lays it out (plain Python types only)."""
    configuration = {
        "data_identifier": "nnsslPlans_onemmiso", "preprocessor_name": "DefaultPreprocessor",
        "spacing_style": "onemmiso", "normalization_schemes": list(meta["normalization"]),
        "use_mask_for_norm": [False] * len(meta["normalization"]),
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_mask": "resample_data_or_seg_to_shape",
        "resampling_fn_mask_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "spacing": list(meta["spacing"]), "patch_size": list(meta["patch_size"]),
    }
    return {
        "architecture_plans": {"arch_class_name": meta["architecture"], "arch_kwargs": meta["arch_kwargs"],
                               "arch_kwargs_requiring_import": None},
        "pretrain_plan": {"dataset_name": meta["dataset_name"], "plans_name": "nnsslPlans",
                          "original_median_spacing_after_transp": list(meta["spacing"]),
                          "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2],
                          "transpose_backward": [0, 1, 2], "configurations": {"onemmiso": configuration},
                          "experiment_planner_used": "FixedResEncUNetPlanner"},
        "pretrain_num_input_channels": int(meta["input_channels"]),
        "recommended_downstream_patchsize": list(meta["recommended_downstream_patchsize"]),
        "key_to_encoder": meta["key_to_encoder"], "key_to_stem": meta["key_to_stem"],
        "keys_to_in_proj": list(meta["keys_to_in_proj"]), "key_to_lpe": meta["key_to_lpe"],
    }


#: nnssl's architecture names whose network segbook can build and plan a task around (`--plans checkpoint`): the
#: fixed ResEnc-L (`get_res_enc_l`) and the dynamic `ResidualEncoderUNet`, whose plan carries its `arch_kwargs`.
PLANNABLE_ARCHITECTURES = ("ResEncL", "ResidualEncoderUNet")
#: The patch nnssl's ResEnc-L was pretrained at and recommends downstream, where a plan does not say.
NNSSL_PATCH = (160, 160, 160)


@dataclass(frozen=True)
class CheckpointArchitecture:
    """The network an nnssl checkpoint was pretrained as, in the form nnU-Net plans describe a network (class path,
    keyword arguments with class paths as strings), and what planning a task around it needs: the total stride per
    axis (each patch axis must be a multiple of it) and the pretraining's recommended patch and spacing."""

    name: str
    class_name: str
    kwargs: dict[str, Any]
    requires_import: tuple[str, ...]
    recommended_patch: tuple[int, ...]
    pretraining_spacing: tuple[float, ...] | None
    input_channels: int

    @property
    def stages(self) -> int:
        return len(self.kwargs["strides"])

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Per axis, the product of the stage strides: the downsampling from the input to the bottleneck."""
        return tuple(math.prod(int(stride[axis]) for stride in self.kwargs["strides"]) for axis in range(3))

    def plans_entry(self) -> dict[str, Any]:
        """The `architecture` of a configuration in nnU-Net plans (what `get_network_from_plans` builds)."""
        return {"network_class_name": self.class_name, "arch_kwargs": dict(self.kwargs),
                "_kw_requires_import": list(self.requires_import)}

    def digest(self) -> str:
        """Eight hex digits of the network's description: equal networks share plans, different ones never do."""
        text = json.dumps(self.plans_entry(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:8]


def checkpoint_architecture(checkpoint: NnsslCheckpoint) -> CheckpointArchitecture:
    """The network `checkpoint` was pretrained as, checked against its own weights: a `CheckpointError` naming what
    does not fit for an architecture segbook cannot build (Primus, unknown names), a dynamic architecture without
    its `arch_kwargs`, kwargs that contradict themselves, or weights the described network does not hold."""
    from segbook.backbones.models import _REQUIRES_IMPORT, RESENC_CLASS, RESENC_REFERENCE

    meta = checkpoint.metadata
    name = meta["architecture"]
    if name not in PLANNABLE_ARCHITECTURES:
        raise _plan_error(checkpoint.path, f"its architecture {name!r} cannot be planned for a task: segbook plans "
                          f"around {' and '.join(PLANNABLE_ARCHITECTURES)} checkpoints (a Primus file fine-tunes "
                          "on the Primus planner's plans: --model primus-m without --plans checkpoint)")
    kwargs = dict(RESENC_REFERENCE) if name == "ResEncL" else meta.get("arch_kwargs")
    if not kwargs:
        raise _plan_error(checkpoint.path, f"architecture {name!r} without its arch_kwargs")
    patch = meta["recommended_downstream_patchsize"] or meta["patch_size"] or NNSSL_PATCH
    architecture = CheckpointArchitecture(
        name=name, class_name=RESENC_CLASS, kwargs=kwargs, requires_import=tuple(_REQUIRES_IMPORT),
        recommended_patch=tuple(patch), pretraining_spacing=tuple(meta["spacing"]) if meta["spacing"] else None,
        input_channels=meta["input_channels"])
    _check_consistent(checkpoint, architecture)
    return architecture


def _check_consistent(checkpoint: NnsslCheckpoint, architecture: CheckpointArchitecture) -> None:
    """Build the described network on the meta device (no memory, no initialisation) and match the checkpoint's
    stem and encoder against it, so a plan never fixes a network the file cannot fill."""
    import torch
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from stunet.loading import CheckpointError

    kwargs = architecture.kwargs
    lengths = {len(kwargs.get(k) or ()) for k in ("features_per_stage", "kernel_sizes", "strides",
                                                   "n_blocks_per_stage")}
    if lengths != {kwargs.get("n_stages")} or any(len(s) != 3 or min(s) < 1 for s in kwargs["strides"]):
        raise _plan_error(checkpoint.path, f"its architecture is inconsistent: n_stages {kwargs.get('n_stages')}, "
                          f"per-stage lists of lengths {sorted(lengths)}, strides {kwargs.get('strides')}")
    try:
        with torch.device("meta"):
            network = get_network_from_plans(architecture.class_name, kwargs, list(architecture.requires_import),
                                              architecture.input_channels, 2, allow_init=False)
    except Exception as error:  # dna asserts on kwargs it cannot build: say so, naming the file
        raise _plan_error(checkpoint.path, f"its architecture cannot be built: {type(error).__name__}: "
                          f"{error}") from None
    try:
        adapt_nnssl_to_network(network.state_dict(), checkpoint, network_name=f"its plan's {architecture.name}")
    except CheckpointError as error:
        raise CheckpointError(f"{checkpoint.path}: its weights do not fit the architecture its plan names: "
                              f"{error}") from None
