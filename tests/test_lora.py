"""LoRA through PEFT: what trains, what stays frozen, and a merge that nnU-Net's predictor can load as plain STU-Net."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from segbook.errors import SegbookError
from segbook.training.lora import add_lora, has_lora, merge_lora
from stunet import create_stunet

# 16^3 input: three halvings to 2^3, then two stages at that size, so a forward pass is cheap.
STRIDES = [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2


def _plain(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_stunet("tiny", input_channels=1, num_classes=3, strides=STRIDES,
                         enable_deep_supervision=False).double()


def _body_convs(network: nn.Module, kernel: tuple[int, ...] = (3, 3, 3)) -> list[str]:
    return [name for name, module in network.named_modules()
            if isinstance(module, nn.Conv3d) and not name.startswith("seg_outputs.") and module.kernel_size == kernel]


def _plain_name(key: str) -> str:
    """The key a LoRA-wrapped parameter has in the plain network (PEFT nests the original as `base_layer`)."""
    return key.replace(".base_layer.", ".")


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(1, 1, 16, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _train(network: nn.Module, image: torch.Tensor, steps: int = 2) -> None:
    """A few SGD steps on a random target: enough to move every adapter and head away from its start."""
    target = torch.randn(network(image).shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    optimiser = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        optimiser.zero_grad()
        nn.functional.mse_loss(network(image), target).backward()
        optimiser.step()


def test_adapts_every_spatial_body_conv_and_trains_only_adapters_and_heads(image):
    network = _plain()
    with torch.no_grad():
        plain_output = network(image)
    body, pointwise = _body_convs(network), _body_convs(network, (1, 1, 1))
    assert len(body) == 22 and len(pointwise) == 16  # two 3x3x3 per residual block; projections and upsamplings

    report = add_lora(network, rank=2, alpha=4.0)

    assert has_lora(network)
    assert report.adapted == tuple(body)
    for name in pointwise:
        assert type(network.get_submodule(name)).__module__.startswith("torch."), name  # left frozen, as it was
    for name in body:
        layer = network.get_submodule(name)
        assert type(layer).__name__ == "Conv3d" and type(layer).__module__.startswith("peft."), name
        assert layer.r["default"] == 2 and layer.scaling["default"] == 2.0
    for name, module in network.named_modules():
        if name.startswith("seg_outputs."):
            assert type(module).__module__.startswith("torch."), name

    trainable = {name for name, p in network.named_parameters() if p.requires_grad}
    expected = {name for name, _ in network.named_parameters()
                if name.startswith("seg_outputs.") or ".lora_A." in name or ".lora_B." in name}
    assert trainable == expected
    assert {name for name in trainable if ".lora_A." in name} == {f"{name}.lora_A.default.weight" for name in body}
    assert report.trainable_parameters == sum(p.numel() for p in network.parameters() if p.requires_grad)
    assert report.frozen_parameters == sum(p.numel() for p in network.parameters() if not p.requires_grad)
    assert report.frozen_parameters == sum(p.numel() for p in _plain().parameters()) - sum(
        p.numel() for name, p in network.named_parameters() if name.startswith("seg_outputs."))

    with torch.no_grad():
        assert torch.equal(network(image), plain_output)  # LoRA's B starts at zero: the adapters do nothing yet


@pytest.mark.slow
def test_training_moves_only_adapters_and_heads_and_merge_gives_plain_stunet_with_same_output(image):
    network = _plain()
    with torch.no_grad():
        plain_output = network(image)
    before = {key: value.clone() for key, value in network.state_dict().items()}
    add_lora(network, rank=2, alpha=4.0)

    _train(network, image)

    network.eval()
    with torch.no_grad():
        adapted_output = network(image)
    assert (adapted_output - plain_output).abs().max() > 1e-3
    for key, value in network.state_dict().items():
        if ".lora_" in key or key.startswith("seg_outputs."):
            continue
        assert torch.equal(value, before[_plain_name(key)]), key  # the frozen body is bit-identical
    # Without deep supervision only the full-resolution head (the last) is in the output, so only it learns.
    for key in ("seg_outputs.4.weight", "seg_outputs.4.bias"):
        assert not torch.equal(network.state_dict()[key], before[key]), key

    merge_lora(network)

    assert not has_lora(network)
    assert not hasattr(network, "peft_config")
    assert all(not type(m).__module__.startswith("peft") for m in network.modules())
    assert all(p.requires_grad for p in network.parameters())
    with torch.no_grad():
        merged_output = network(image)
    torch.testing.assert_close(merged_output, adapted_output, rtol=0, atol=1e-10)
    state = network.state_dict()
    fresh = _plain(seed=5)
    assert list(state) == list(fresh.state_dict())
    assert all(state[key].shape == value.shape for key, value in fresh.state_dict().items())
    for name in _body_convs(network):  # every adapter went into its weight
        assert not torch.equal(state[f"{name}.weight"], before[f"{name}.weight"]), name
    for name in _body_convs(network, (1, 1, 1)):
        assert torch.equal(state[f"{name}.weight"], before[f"{name}.weight"]), name

    # What nnU-Net's predictor does with the final checkpoint: build the plain network and load it strictly.
    fresh.load_state_dict(state, strict=True)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(image), adapted_output, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kernel", [(3, 1, 1), (1, 3, 3), (3, 3, 1), (3, 3, 3)])
def test_merge_is_exact_for_every_kernel_it_adapts(kernel):
    torch.manual_seed(3)
    padding = tuple(k // 2 for k in kernel)
    network = nn.Sequential(nn.Conv3d(3, 5, kernel, padding=padding), nn.LeakyReLU(),
                            nn.Conv3d(5, 4, kernel, stride=(1, 2, 1), padding=padding)).double()
    add_lora(network, rank=2, alpha=3.0, exclude_prefixes=())
    with torch.no_grad():
        for name in ("0", "2"):
            nn.init.normal_(network.get_submodule(name).lora_B["default"].weight, std=0.3)
    x = torch.randn(2, 3, 6, 7, 5, dtype=torch.float64)
    with torch.no_grad():
        adapted = network(x)
        merge_lora(network)
        torch.testing.assert_close(network(x), adapted, rtol=0, atol=1e-10)
    assert list(network.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


@pytest.mark.parametrize("options, named", [
    (dict(rank=0, alpha=1.0), "rank"), (dict(rank=1.5, alpha=1.0), "rank"), (dict(rank=True, alpha=1.0), "rank"),
    (dict(rank=4, alpha=0.0), "alpha"), (dict(rank=4, alpha=-2.0), "alpha"),
    (dict(rank=4, alpha=float("nan")), "alpha"),
    (dict(rank=4, alpha=8.0, dropout=1.0), "dropout"), (dict(rank=4, alpha=8.0, dropout=-0.1), "dropout"),
])
def test_invalid_options_are_refused_by_name_and_change_nothing(options, named):
    network = nn.Sequential(nn.Conv3d(1, 2, 3))
    with pytest.raises(SegbookError, match=rf"^{named} must be"):
        add_lora(network, **options)
    assert not has_lora(network)
    assert all(p.requires_grad for p in network.parameters())


def test_refuses_networks_it_could_not_merge_or_adapt():
    with pytest.raises(SegbookError, match=r"0: groups=2"):
        add_lora(nn.Sequential(nn.Conv3d(2, 4, 3, groups=2)), rank=2, alpha=2.0)
    with pytest.raises(SegbookError, match=r"0: dilation"):
        add_lora(nn.Sequential(nn.Conv3d(2, 4, 3, dilation=2)), rank=2, alpha=2.0)
    with pytest.raises(SegbookError, match=r"0: kernel \(1, 1, 3\) \(PEFT's merge mistakes it"):
        add_lora(nn.Sequential(nn.Conv3d(2, 4, (1, 1, 3))), rank=2, alpha=2.0)
    with pytest.raises(SegbookError, match=r"no Conv3d to adapt"):
        add_lora(nn.Sequential(nn.Conv3d(2, 4, 1)), rank=2, alpha=2.0)
    with pytest.raises(SegbookError, match=r"no Conv3d to adapt"):
        add_lora(nn.Sequential(nn.Conv3d(2, 4, 3)), rank=2, alpha=2.0, exclude_prefixes=("0",))
    network = nn.Sequential(nn.Conv3d(2, 4, 3))
    add_lora(network, rank=2, alpha=2.0, exclude_prefixes=())
    with pytest.raises(SegbookError, match=r"already has LoRA"):
        add_lora(network, rank=2, alpha=2.0, exclude_prefixes=())


def test_importing_segbook_does_not_import_peft():
    code = ("import sys, torch, segbook, segbook.training.lora as lora; "
            "assert not lora.has_lora(torch.nn.Conv3d(1, 1, 1)); assert 'peft' not in sys.modules, 'peft imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
