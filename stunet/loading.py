"""Reading any STU-Net checkpoint safely and adapting it to the network being fine-tuned.

Formats: nnU-Net v1 `.model` files (the official release: a dict with `state_dict`), nnU-Net v2 `.pth` files
(`network_weights`) and plain state_dicts. Nothing in a file is ever executed: files are read with
`torch.load(weights_only=True)` and only the plain numpy types that v1 checkpoints contain are allowed in addition.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from stunet.checkpoints import FIRST_CONV_KEYS, HEAD_PREFIX, PRESETS

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
#: How a single-channel first block is tiled across the input channels of a multi-channel task: `repeat` copies the
#: weights to every channel, as both official fine-tuning loaders (uni-medical/STU-Net, nnU-Net v1 and v2 variants)
#: do; `mean` also divides them by the channel count, so that channels that agree give the single-channel network's
#: features (segbook's earlier default, kept as an option).
TILINGS = ("repeat", "mean")
DEFAULT_TILING = "repeat"

# nnU-Net v1 checkpoints carry training curves as numpy scalars, pickled under numpy 1's module path.
_NUMPY_SAFE_GLOBALS = [
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    np._core.multiarray.scalar,
    np.dtype,
    *(getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "BoolDType")),
]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or does not fit the network it is loaded into."""


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """The content of a checkpoint file, read without running any code it holds.

    `torch.load(weights_only=True)` with the numpy scalar types nnU-Net's checkpoints contain allowed in addition.
    Anything else (a pickled function, class or module) is refused with a `CheckpointError` that says why; the file
    is never read the unsafe way.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): not a checkpoint; was it cut off while being written?")
    try:
        with torch.serialization.safe_globals(_NUMPY_SAFE_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises UnpicklingError, RuntimeError, EOFError, IndexError... for bad files
        raise CheckpointError(f"{path} was refused: {_refusal_reason(error)}") from None


def _refusal_reason(error: Exception) -> str:
    """Why torch's safe reader refused a file, without torch's advice to read it the unsafe way."""
    code = re.search(r"GLOBAL ([\w.]+)", str(error))
    if code:
        return (f"reading it would import and run `{code[1]}`, and segbook never runs code from a checkpoint. Only "
                "plain weights are read (tensors, numbers, strings, lists, dicts). If you made this file, save the "
                "network's weights alone: torch.save(network.state_dict(), path)")
    detail = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return (f"it is not a PyTorch checkpoint, or it is damaged or truncated ({type(error).__name__}"
            f"{': ' + detail[:300] if detail else ''})")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network weights in `path`, on the CPU, with DDP/compile prefixes removed."""
    return state_dict_of(safe_load(path), path)


def state_dict_of(content: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network weights in a checkpoint's content (`safe_load`'s), with DDP/compile prefixes removed: for readers
    that read more of the file than its weights."""
    return _strip_prefixes(_extract_weights(content, path))


def _extract_weights(content: object, path: str | os.PathLike) -> Mapping[str, torch.Tensor]:
    if isinstance(content, Mapping):
        for key in ("state_dict", "network_weights", "model"):
            if isinstance(content.get(key), Mapping):
                return content[key]
        if content and all(isinstance(v, torch.Tensor) for v in content.values()):
            return content
    raise CheckpointError(f"{path} holds no network weights: expected an nnU-Net v1 checkpoint ('state_dict'), "
                          f"an nnU-Net v2 checkpoint ('network_weights') or a plain state_dict")


def _strip_prefixes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    stripped = {}
    for key, value in state_dict.items():
        changed = True
        while changed:
            changed = False
            for prefix in _WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix):], True
        stripped[key] = value
    return stripped


def describe_stunet(state_dict: Mapping[str, torch.Tensor]) -> str:
    """A human description of the STU-Net a state_dict belongs to, for error messages."""
    stem = state_dict.get(FIRST_CONV_KEYS[0])
    if stem is None:
        return "a network that is not an STU-Net (no conv_blocks_context.0.0.conv1)"
    width = int(stem.shape[0])
    blocks = sum(1 for k in state_dict if k.startswith("conv_blocks_context.0.") and k.endswith(".conv1.weight"))
    deepest = int(state_dict["conv_blocks_context.5.0.conv1.weight"].shape[0]) \
        if "conv_blocks_context.5.0.conv1.weight" in state_dict else None
    name = next((p.name for p in PRESETS.values() if p.base_width == width and p.blocks_per_stage == blocks), None)
    label = f"STU-Net {name}" if name else "an STU-Net of non-standard size"
    return f"{label} (widths {width}..{deepest}, {blocks} block(s) per stage, {int(stem.shape[1])} input channel(s))"


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)
    skipped_heads: list[str] = field(default_factory=list)
    tiled: list[str] = field(default_factory=list)
    #: tensors reshaped to the network's (a transformer's positional embedding interpolated to another patch)
    adapted: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Conventions:
    """What loading needs to know of an architecture, read from its catalogue entry (`segbook.backbones`): the
    input-side layers tiled across channels (`first_conv`), the prefix of the layers replaced (`classifier`),
    prefixes that name the same tensors twice (`aliases`: alias -> canonical) and how to describe a state_dict
    in errors. The defaults are STU-Net's."""

    first_conv: tuple[str, ...] = FIRST_CONV_KEYS
    classifier: str = HEAD_PREFIX.rstrip(".")
    aliases: tuple[tuple[str, str], ...] = ()
    describe: Callable[[Mapping[str, torch.Tensor]], str] | None = None

    @property
    def head_prefix(self) -> str:
        return self.classifier + "."

    def description(self, state_dict: Mapping[str, torch.Tensor]) -> str:
        return (self.describe or describe_stunet)(state_dict)

    def canonical(self, key: str) -> str | None:
        """The key an aliased key repeats; None for a key that is no alias."""
        return next((canonical + key[len(alias):] for alias, canonical in self.aliases if key.startswith(alias)),
                    None)


STUNET_CONVENTIONS = Conventions()


def load_pretrained(network: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "checkpoint",
                    drop_heads: bool = True, tiling: str = DEFAULT_TILING,
                    conventions: Conventions = STUNET_CONVENTIONS) -> LoadReport:
    """Copy pretrained weights into `network` for fine-tuning (see `adapt_state_dict` for what must match, and
    `TILINGS` for `tiling`)."""
    target = network.state_dict()
    adapted, report = adapt_state_dict(target, state_dict, source=source, drop_heads=drop_heads, tiling=tiling,
                                       conventions=conventions)
    network.load_state_dict({**target, **adapted}, strict=True)
    return report


def adapt_state_dict(target: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], *,
                     source: str = "checkpoint", drop_heads: bool = True, tiling: str = DEFAULT_TILING,
                     conventions: Conventions = STUNET_CONVENTIONS) -> tuple[dict[str, torch.Tensor], LoadReport]:
    """The checkpoint's weights as the network with state_dict `target` takes them, and what was done to them.

    The segmentation heads (`conventions.classifier`) are left as initialised (`drop_heads`), the first block's
    input-side convolutions (`conventions.first_conv`) are tiled across input channels when the checkpoint has one
    and the network more (`tiling`: `repeat`, the official loaders' way, or `mean`), keys that only repeat others
    (`conventions.aliases`) are taken from those, and every other key must match by name and shape; anything else
    is a `CheckpointError` naming the checkpoint and both architectures. `target` may live on the meta device: this
    checks that a checkpoint fits a network before anything is built or written.
    """
    if tiling not in TILINGS:
        raise ValueError(f"unknown stem tiling {tiling!r}; choose one of {', '.join(TILINGS)}")
    head_prefix = conventions.head_prefix
    report = LoadReport()
    adapted: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    source_dict = state_dict
    state_dict = {k: v for k, v in state_dict.items() if conventions.canonical(k) is None}
    for key, value in state_dict.items():
        if drop_heads and key.startswith(head_prefix):
            report.skipped_heads.append(key)
            continue
        if key not in target:
            problems.append(f"unexpected key {key}")
            continue
        if key in conventions.first_conv and _differs_only_in_input_channels(value.shape, target[key].shape):
            value = _tile_input_channels(value, target[key].shape, key, source, tiling)
            report.tiled.append(key)
        if value.shape != target[key].shape:
            problems.append(f"{key}: checkpoint {tuple(value.shape)} vs network {tuple(target[key].shape)}")
            continue
        adapted[key] = value
    _fill_aliases(target, adapted, conventions)
    missing = [k for k in target if k not in adapted and not (drop_heads and k.startswith(head_prefix))]
    problems += [f"missing key {k}" for k in missing]
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise CheckpointError(f"{source} holds {describe_state_dict(source_dict)}, but the network is "
                              f"{conventions.description(target)}: {shown}")
    report.loaded = list(adapted)
    return adapted, report


def _fill_aliases(target: Mapping[str, torch.Tensor], adapted: dict[str, torch.Tensor],
                  conventions: Conventions) -> None:
    """Give the network's aliased keys the adapted tensors of the keys they repeat (the checkpoint's own copies,
    if any, are the same tensors saved twice: they were set aside, so the two can never disagree)."""
    for key in target:
        canonical = conventions.canonical(key)
        if canonical is not None and canonical in adapted:
            adapted[key] = adapted[canonical]


#: Describers of other architectures' state_dicts, tried in order by `describe_state_dict` (registered by
#: `segbook.backbones.models`, which knows them): each returns a description, or None for a state_dict not its own.
DESCRIBERS: list[Callable[[Mapping[str, torch.Tensor]], str | None]] = []


def describe_state_dict(state_dict: Mapping[str, torch.Tensor]) -> str:
    """What network a checkpoint's weights belong to, whichever architecture it is, for error messages."""
    for describe in DESCRIBERS:
        found = describe(state_dict)
        if found is not None:
            return found
    return describe_stunet(state_dict)


def _differs_only_in_input_channels(source: torch.Size, target: torch.Size) -> bool:
    return source[1] != target[1] and source[0] == target[0] and source[2:] == target[2:]


def _tile_input_channels(weight: torch.Tensor, shape: torch.Size, key: str, source: str,
                         tiling: str) -> torch.Tensor:
    """Repeat single-channel input weights over n channels; `mean` scales them by 1/n as well.

    The scale matters: instance norm cancels it after `conv1`, but the `conv3` shortcut is added unnormalised, so
    the two tilings start fine-tuning from different networks."""
    channels = shape[1]
    if weight.shape[1] != 1:
        raise CheckpointError(f"{source}: cannot adapt {key} from {weight.shape[1]} to {channels} input channels; "
                              f"only single-channel checkpoints are tiled across input channels")
    repeated = weight.repeat(1, channels, 1, 1, 1)
    return repeated / channels if tiling == "mean" else repeated
