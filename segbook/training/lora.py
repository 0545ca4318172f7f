"""LoRA adapters on STU-Net's body convolutions, through PEFT, and their merge back into a plain STU-Net.

A LoRA fine-tuning run trains only low-rank adapters on the body's spatial (3x3x3) `Conv3d` layers plus the
segmentation heads
(`seg_outputs.*`, which are new for every task anyway). nnU-Net's predictor then rebuilds a plain STU-Net and loads
the final checkpoint with `strict=True`, so before the checkpoint is written the adapters are merged into the
weights they adapt and every PEFT wrapper is swapped back for its base `Conv3d`: the state_dict then has exactly the
keys and shapes of a network built without LoRA.

PEFT is imported inside the functions: `import segbook` must not pay for (or require) it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Iterator, Sequence

from torch import nn

from segbook.errors import SegbookError
from segbook.options import Bound

if TYPE_CHECKING:
    from peft.tuners.lora import LoraLayer

#: STU-Net's segmentation heads: trained in full, never adapted.
HEAD_PREFIXES: tuple[str, ...] = ("seg_outputs.",)
#: The one adapter this module creates (PEFT's default name).
ADAPTER = "default"
_BOUNDS = {
    "rank": Bound("rank", int, low=1),
    "alpha": Bound("alpha", float, low=0, low_inclusive=False),
    "dropout": Bound("dropout", float, low=0, high=1, high_inclusive=False),
}


@dataclass(frozen=True)
class LoraReport:
    """What `add_lora` did: the adapted modules, and how many parameters train and how many are frozen."""

    adapted: tuple[str, ...]
    trainable_parameters: int
    frozen_parameters: int


def add_lora(network: nn.Module, *, rank: int, alpha: float, dropout: float = 0.0,
             exclude_prefixes: Sequence[str] = HEAD_PREFIXES) -> LoraReport:
    """Wrap every spatial `Conv3d` not under `exclude_prefixes` in a PEFT LoRA layer; train only the adapters and
    the excluded parts.

    The adapters start as a no-op (PEFT initialises LoRA's B to zero), so the network's outputs are unchanged until
    training moves them. Everything else (body convolutions, pointwise projections, norms) is frozen: LoRA's point
    is that the pretrained body stays as it is and only the low-rank updates learn. Pointwise (1x1x1) convolutions
    are not adapted: a rank-r update of a 1x1x1 kernel is no cheaper than the kernel, and PEFT (up to at least
    0.21.2) cannot merge into them (huggingface/peft#3768).
    """
    for name, value in (("rank", rank), ("alpha", alpha), ("dropout", dropout)):
        _BOUNDS[name].check(value)
    prefixes = (exclude_prefixes,) if isinstance(exclude_prefixes, str) else tuple(exclude_prefixes)
    if has_lora(network):
        raise SegbookError("the network already has LoRA adapters: merge them (merge_lora) before adding new ones")
    targets = _target_convs(network, prefixes)
    peft = _import_peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets),
                             bias="none")
    peft.inject_adapter_in_model(config, network, adapter_name=ADAPTER)
    adapted = tuple(name for name, _ in _lora_layers(network))
    if adapted != targets:
        # PEFT matches target names by suffix too; a name that is the tail of another would adapt more than asked.
        raise SegbookError(f"PEFT adapted {sorted(set(adapted) ^ set(targets))} differently from the requested "
                           "Conv3d layers; rename the modules so that no name is the tail of another")
    return _freeze_all_but_adapters(network, prefixes, adapted)


def merge_lora(network: nn.Module) -> None:
    """Merge every adapter into its base weight and put the plain `Conv3d` back in its place.

    Afterwards the network is indistinguishable from one built without LoRA: same modules, same state_dict keys,
    every parameter trainable again, and no `peft_config` attribute (PEFT adds one to the model it injects into).
    On a network without adapters it only makes every parameter trainable again.
    """
    for name, layer in list(_lora_layers(network)):
        _merge_layer(name, layer)
        parent_name, _, child = name.rpartition(".")
        setattr(network.get_submodule(parent_name), child, layer.get_base_layer())
    if hasattr(network, "peft_config"):
        del network.peft_config
    for parameter in network.parameters():
        parameter.requires_grad_(True)


def has_lora(network: nn.Module) -> bool:
    """Whether any PEFT layer is in the network (False without importing PEFT when nothing has imported it)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in network.modules())


def _import_peft() -> ModuleType:
    try:
        import peft
    except ImportError:
        raise SegbookError("LoRA fine-tuning needs the PEFT library: pip install 'peft>=0.14'") from None
    return peft


def _target_convs(network: nn.Module, prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The names of the `Conv3d` layers to adapt, after checking that PEFT can merge LoRA into each of them."""
    targets = []
    for name, module in network.named_modules():
        if not isinstance(module, nn.Conv3d) or name.startswith(prefixes) or set(module.kernel_size) == {1}:
            continue
        problem = _unmergeable(module)
        if problem:
            raise SegbookError(f"cannot add LoRA to {name}: {problem}")
        targets.append(name)
    if not targets:
        raise SegbookError(f"no Conv3d to adapt: every one is under {', '.join(prefixes)} or the network has none")
    return tuple(targets)


def _unmergeable(conv: nn.Conv3d) -> str | None:
    """Why PEFT's LoRA on `conv` would not merge into the same function (None when it would).

    Checked before training rather than found at the merge: PEFT refuses to merge grouped convolutions, and its
    `lora_A` copies kernel, stride and padding but not dilation or padding mode, so adapted and merged outputs would
    differ.
    """
    if conv.groups != 1:
        return f"groups={conv.groups} (PEFT cannot merge LoRA into grouped convolutions)"
    if any(d != 1 for d in conv.dilation):
        return f"dilation={conv.dilation} (PEFT's LoRA branch ignores dilation)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (PEFT's LoRA branch pads with zeros)"
    if tuple(conv.kernel_size[:2]) == (1, 1):
        return f"kernel {conv.kernel_size} (PEFT's merge mistakes it for a pointwise 2-D kernel, peft#3768)"
    return None


def _lora_layers(network: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    if "peft" not in sys.modules:
        return
    from peft.tuners.lora import LoraLayer

    for name, module in network.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _freeze_all_but_adapters(network: nn.Module, prefixes: tuple[str, ...], adapted: tuple[str, ...]) -> LoraReport:
    """Train the adapters and whatever is under `prefixes`, nothing else, whatever PEFT or the caller set before."""
    adapter_ids = {id(p) for _, layer in _lora_layers(network)
                   for p in (*layer.lora_A.parameters(), *layer.lora_B.parameters())}
    trainable = frozen = 0
    for name, parameter in network.named_parameters():
        train = id(parameter) in adapter_ids or name.startswith(prefixes)
        parameter.requires_grad_(train)
        if train:
            trainable += parameter.numel()
        else:
            frozen += parameter.numel()
    return LoraReport(adapted=adapted, trainable_parameters=trainable, frozen_parameters=frozen)


def _merge_layer(name: str, layer: LoraLayer) -> None:
    """Add the adapter's update to the base weight with PEFT's own merge (checked for NaNs and infinities)."""
    if ADAPTER not in layer.lora_A or layer.merged:
        raise SegbookError(f"{name} holds no unmerged LoRA adapter {ADAPTER!r} to merge")
    try:
        layer.merge(safe_merge=True, adapter_names=[ADAPTER])
    except ValueError as error:  # PEFT's safe_merge found NaNs or infinities
        raise SegbookError(f"cannot merge the LoRA adapter of {name}: {error}") from None
