"""The network is the official STU-Net: same outputs, same state_dict schema, same parameter counts."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

import stunet
from stunet import PRESETS, STUNet, count_forward_macs, create_stunet, preset_summary, strides_from_plans

#: stunet's modules, each importing (at the top, or inside a function) only modules listed before it.
LAYERS = ("model", "checkpoints", "loading", "presets", "flops")


@pytest.fixture(scope="module")
def golden(shared):
    return torch.load(shared / "reference" / "stunet_golden_tiny.pt", weights_only=True)


def _golden_network(golden) -> STUNet:
    config = golden["config"]
    network = STUNet(config["input_channels"], config["num_classes"], config["dims"], config["depth"],
                     config["pool_op_kernel_sizes"]).double()
    network.load_state_dict(golden["state_dict"], strict=True)
    return network.eval()


def test_reproduces_official_deep_supervision_outputs(golden):
    network = _golden_network(golden)
    with torch.no_grad():
        outputs = network(golden["input"])
    assert len(outputs) == 5
    for ours, official in zip(outputs, golden["outputs_deep_supervision"]):
        assert ours.shape == official.shape
        torch.testing.assert_close(ours, official, rtol=0, atol=1e-10)


def test_reproduces_official_output_without_deep_supervision(golden):
    network = _golden_network(golden)
    network.decoder.deep_supervision = False
    with torch.no_grad():
        output = network(golden["input"])
    torch.testing.assert_close(output, golden["output"], rtol=0, atol=1e-10)


PAPER_PRESETS = ("small", "base", "large", "huge")


@pytest.mark.parametrize("preset", PAPER_PRESETS)
def test_presets_match_official_state_dict_schema(shared, preset):
    schema = json.loads((shared / "reference" / "stunet_state_dict_schema.json").read_text())[preset]
    network = create_stunet(preset, input_channels=1, num_classes=105, device="meta")
    ours = {key: list(value.shape) for key, value in network.state_dict().items()}
    assert ours == schema["state_dict"]
    assert sum(p.numel() for p in network.parameters()) == schema["num_parameters"]


def test_parameter_counts_of_the_paper():
    expected = {"small": 14_596_941, "base": 58_262_669, "large": 440_302_605, "huge": 1_457_326_221}
    assert {name: preset_summary(name, (32, 32, 32))["parameters"] for name in PAPER_PRESETS} == expected


def test_tiny_preset_is_a_narrower_small():
    assert PRESETS["tiny"].dims == [8, 16, 32, 64, 128, 128] and PRESETS["tiny"].depth == [1] * 6


def test_forward_macs_match_the_official_figures_at_128():
    # Measured on the official code (shared/README.md): 0.130 / 0.509 / 3.825 / 12.667 T multiply-accumulates.
    expected = {"small": 0.130, "base": 0.509, "large": 3.825, "huge": 12.667}
    for name, tera_macs in expected.items():
        assert preset_summary(name)["forward_macs"] / 1e12 == pytest.approx(tera_macs, abs=5e-4)


def test_macs_count_every_convolution_by_hand():
    network = STUNet(1, 2, [2] * 6, [1] * 6, [[1, 1, 1]] * 5, enable_deep_supervision=False)
    # 8^3 voxels everywhere (no downsampling). Per encoder stage: conv1 (in*2*27) + conv2 (2*2*27) + conv3 (in*2).
    voxels = 8 ** 3
    encoder = (1 * 2 * 27 + 2 * 2 * 27 + 1 * 2) + 5 * (2 * 2 * 27 + 2 * 2 * 27 + 2 * 2)
    decoder = 5 * (2 * 2 + (4 * 2 * 27 + 2 * 2 * 27 + 4 * 2) + 2 * 2)  # upsample 1x1, block, head
    assert count_forward_macs(network, (1, 1, 8, 8, 8)) == voxels * (encoder + decoder)


def test_deep_supervision_switch_is_not_in_the_state_dict():
    network = create_stunet("small", device="meta")
    assert not any(key.startswith("decoder") for key in network.state_dict())
    network.decoder.deep_supervision = False
    assert network.decoder.deep_supervision is False


@pytest.mark.parametrize("plans, expected", [
    ([[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]], [[2, 2, 2]] * 3 + [[1, 1, 1]] * 2),  # v2, 3 poolings
    ([[1, 1, 1]] + [[2, 2, 2]] * 5, [[2, 2, 2]] * 5),  # v2, 5 poolings
    ([[1, 1, 1], [1, 2, 2]] + [[2, 2, 2]] * 5, [[1, 2, 2]] + [[2, 2, 2]] * 4),  # v2, 6 poolings: truncated
    ([[2, 2, 2], [2, 2, 1]], [[2, 2, 2], [2, 2, 1], [1, 1, 1], [1, 1, 1], [1, 1, 1]]),  # v1 plans: no stem entry
])
def test_strides_from_plans(plans, expected):
    assert strides_from_plans(plans) == expected


@pytest.mark.parametrize("poolings", [3, 5, 6])
def test_network_from_plans_strides_runs_at_plans_patch(poolings):
    plans_strides = [[1, 1, 1]] + [[2, 2, 2]] * poolings
    patch = [2 * 2 ** poolings] * 3  # the bottleneck keeps 2 voxels per axis (instance norm needs > 1)
    network = STUNet(1, 3, [2, 2, 4, 4, 4, 4], [1] * 6, strides_from_plans(plans_strides))
    outputs = network(torch.randn(1, 1, *patch))
    assert outputs[0].shape == (1, 3, *patch)
    assert len(outputs) == 5


def _stunet_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stunet"):
            names.add(node.module.removeprefix("stunet").lstrip(".") or "__init__")
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("stunet.") for a in node.names if a.name.startswith("stunet")}
    return names


def test_modules_import_each_other_without_cycles():
    """Reading a checkpoint names its size (checkpoints' table) and building a network may load one: presets
    imports loading, never the other way round."""
    folder = Path(stunet.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} - {"__init__"} == set(LAYERS)
    for index, module in enumerate(LAYERS):
        assert _stunet_imports(folder / f"{module}.py") <= set(LAYERS[:index]), module
