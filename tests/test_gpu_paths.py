"""The code paths only a GPU normally takes, exercised on the CPU (issue 17; `scripts/gpu_check.sh` runs them on a
GPU): bf16 autocast without a scaler, the fp16 grad scaler and its checkpointed state, torch.compile of the tiny
preset, channels-last 3D through a training step, and the predictor's device options.

Every test trains or predicts with segbook's own trainer (`SegbookTrainer` through nnU-Net's `get_trainer_from_args`,
its run.json written first, as `finetune` does) on a tiny planned task; where the decision is CUDA's alone the device
is mocked, never the computation.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import planned_tiny_task, tiny_spec, use_planned_task
from torch import nn
from torch._dynamo import OptimizedModule

from segbook.evaluation.evaluate import _predictor, evaluate_run
from segbook.evaluation.settings import EvaluationSettings
from segbook.recipes import get_recipe
from segbook.runs import RunSpec, identity_fields
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.finetune import finetune
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings
from segbook.training.trainers import register_with_nnunet, unwrap

TINY_BUDGET = dict(epochs=1, iterations_per_epoch=2, val_iterations_per_epoch=1, checkpoint_every=1)
#: nnU-Net gives the lowest-resolution deep-supervision output zero loss weight: its 1x1 head never moves.
IDLE_HEAD = ["seg_outputs.0.weight", "seg_outputs.0.bias"]


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    with planned_tiny_task(tmp_path_factory.mktemp("gpu_paths"), tiny_spec(), seed=3) as task:
        yield task


@pytest.fixture
def paths(task, tmp_path, monkeypatch):
    return use_planned_task(task, tmp_path, monkeypatch)


@pytest.fixture
def cuda_autocast_dtype():
    """The process's CUDA autocast dtype (which the trainer sets), as it was before the test."""
    dtype = torch.get_autocast_dtype("cuda")
    yield dtype
    torch.set_autocast_dtype("cuda", dtype)


def _trainer(task, paths, device: str = "cpu", **settings):
    """The tiny scratch run's trainer (fold 0) as nnU-Net builds it, after its run.json is written with `settings`."""
    from nnunetv2.run.run_training import get_trainer_from_args

    spec = RunSpec.of(task.entry, "tiny", False, 0)
    resolved, recipe = TrainingSettings(**{**TINY_BUDGET, **settings}).validate().resolve(
        get_recipe(spec.recipe, spec.init))
    folder = spec.folder(paths.results)
    folder.mkdir(parents=True, exist_ok=True)
    RunManifest.create(folder, identity_fields(spec), resolved, {"via": "test"}, recipe).save()
    paths.export()
    register_with_nnunet()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*CUDA is not available.*")  # the mocked CUDA device's scaler
        trainer = get_trainer_from_args(str(task.entry.dataset_id), "3d_fullres", 0, spec.trainer,
                                        device=torch.device(device))
    assert trainer.settings.mixed_precision == resolved.mixed_precision  # read back from run.json
    return trainer


def _output_dtypes(network: nn.Module) -> list[torch.dtype]:
    """The dtype of every forward's first convolution output, from now on."""
    seen: list[torch.dtype] = []
    conv = next(m for m in network.modules() if isinstance(m, nn.Conv3d))
    conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    return seen


def _spatial_convs(network: nn.Module) -> list[nn.Conv3d]:
    """The 3x3x3 convolutions with several input channels: those whose memory formats differ."""
    return [m for m in network.modules()
            if isinstance(m, nn.Conv3d) and m.kernel_size == (3, 3, 3) and m.in_channels > 1]


def _weights(network: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in unwrap(network).named_parameters()}


def _unchanged(before: dict[str, torch.Tensor], network: nn.Module) -> list[str]:
    return [name for name, p in unwrap(network).named_parameters() if torch.equal(before[name], p.detach())]


@pytest.mark.slow
@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("auto", torch.float32),
                                              ("fp16", torch.float32)])
def test_cpu_training_autocasts_in_bf16_only_when_asked_and_never_scales(task, paths, precision, dtype):
    """`--precision bf16` on the CPU: forward and loss in bf16 autocast, fp32 master weights, no grad scaler; the
    loss is within bf16's rounding of the fp32 loss and falls over steps on one batch. `auto` and `fp16` train in
    fp32 on the CPU, as nnU-Net does (their loss is the fp32 loss exactly)."""
    trainer = _trainer(task, paths, mixed_precision=precision)
    trainer.initialize()
    assert trainer.grad_scaler is None
    network = unwrap(trainer.network)
    assert all(m.weight.is_contiguous() and not m.weight.is_contiguous(memory_format=torch.channels_last_3d)
               for m in _spatial_convs(network))
    loader, val_loader = trainer.get_dataloaders()
    batch = next(loader)
    trainer.network.train()
    with torch.no_grad():
        fp32_loss = float(trainer.loss(trainer.network(batch["data"]), batch["target"]))
    dtypes = _output_dtypes(network)
    before = _weights(trainer.network)
    losses = [float(trainer.train_step(batch)["loss"]) for _ in range(3)]
    assert dtypes == [dtype] * 3
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    if dtype == torch.bfloat16:
        assert losses[0] != fp32_loss and losses[0] == pytest.approx(fp32_loss, rel=0.02)
    else:
        assert losses[0] == pytest.approx(fp32_loss, rel=1e-5)
    assert all(p.dtype == torch.float32 for p in network.parameters())
    assert _unchanged(before, trainer.network) == IDLE_HEAD  # every other weight trained
    assert trainer.optimizer.state_dict()["state"]  # momentum buffers: the optimiser stepped

    trainer.network.eval()
    validation = trainer.validation_step(next(val_loader))
    assert dtypes[-1] == dtype and np.isfinite(validation["loss"])
    assert trainer.boundary.losses == losses  # segbook's epoch record saw every step


@pytest.mark.slow
@pytest.mark.parametrize("precision, bf16_gpu, scaled", [("fp16", True, True), ("auto", False, True),
                                                         ("bf16", False, False), ("auto", True, False)])
def test_cuda_precision_decides_scaler_and_autocast_dtype(task, paths, monkeypatch, cuda_autocast_dtype,
                                                          precision, bf16_gpu, scaled):
    """On CUDA (mocked: nothing is moved to it) fp16 keeps nnU-Net's GradScaler and autocasts in fp16; bf16 drops the
    scaler and autocasts in bf16; `auto` picks by the GPU. The dtype is set either way: an earlier bf16 run in the
    same process must not leave an fp16 run autocasting in bf16 with a scaler."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
    torch.set_autocast_dtype("cuda", torch.bfloat16 if scaled else torch.float16)  # the other run's, left behind
    trainer = _trainer(task, paths, device="cuda", mixed_precision=precision)
    assert trainer.device == torch.device("cuda", 0)
    assert isinstance(trainer.grad_scaler, torch.amp.GradScaler) is scaled
    assert torch.get_autocast_dtype("cuda") == (torch.float16 if scaled else torch.bfloat16)


@pytest.mark.slow
def test_grad_scaler_state_is_checkpointed_and_restored(task, paths):
    """nnU-Net's fp16 path (scale, unscale, clip, step, update) with a real scaler on the CPU: its scale grows as it
    should, goes into segbook's atomic checkpoint, is read back by the safe reader and restored on resume; a run
    without a scaler (bf16) checkpoints none and resumes from a scaled run's checkpoint."""
    trainer = _trainer(task, paths)
    trainer.initialize()
    # What nnU-Net creates on CUDA for fp16, on the device it can run on here: the scale doubles after every
    # finite step.
    trainer.grad_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    loader, _ = trainer.get_dataloaders()
    trainer.network.train()
    before = _weights(trainer.network)
    for _ in range(3):
        assert np.isfinite(trainer.train_step(next(loader))["loss"])
    assert trainer.grad_scaler.get_scale() == 2.0 ** 11
    assert _unchanged(before, trainer.network) == IDLE_HEAD  # the scaler's steps reached the optimiser
    checkpoint = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(checkpoint))
    saved = read_run_checkpoint(checkpoint)
    assert saved["grad_scaler_state"]["scale"] == 2.0 ** 11
    assert saved["grad_scaler_state"]["growth_interval"] == 1

    from nnunetv2.run.run_training import get_trainer_from_args

    def resumed_trainer():
        return get_trainer_from_args(str(task.entry.dataset_id), "3d_fullres", 0, trainer.__class__.__name__,
                                     device=torch.device("cpu"))

    resumed = resumed_trainer()
    resumed.grad_scaler = torch.amp.GradScaler("cpu")  # a fresh one: scale 2**16
    resumed.load_checkpoint(str(checkpoint))
    assert resumed.grad_scaler.get_scale() == 2.0 ** 11 and resumed.grad_scaler.state_dict() == \
        trainer.grad_scaler.state_dict()
    for name, p in unwrap(resumed.network).named_parameters():
        assert torch.equal(p, unwrap(trainer.network).get_parameter(name)), name
    resumed.train_step(next(resumed.get_dataloaders()[0]))
    assert resumed.grad_scaler.get_scale() == 2.0 ** 12  # it goes on from the restored state

    unscaled = resumed_trainer()  # no scaler: what a bf16 (or CPU) run has
    unscaled.load_checkpoint(str(checkpoint))
    assert unscaled.grad_scaler is None
    unscaled.save_checkpoint(str(checkpoint))
    assert read_run_checkpoint(checkpoint)["grad_scaler_state"] is None


def _compile_unavailable(error: Exception) -> str | None:
    """Why torch.compile cannot run on this machine's CPU toolchain (no C++ compiler, ...), None for a real error."""
    text = f"{type(error).__name__}: {error}"  # inductor's wrapper names the error it caught
    if any(sign in text for sign in ("InvalidCxxCompiler", "CppCompileError", "Python.h")):
        return " ".join(text.split())[:300]
    return None


@pytest.mark.slow
def test_compiled_tiny_network_trains_and_checkpoints_plain_weights(task, paths, monkeypatch):
    """`--compile` as on CUDA (nnU-Net's `_do_i_compile` refuses the CPU; told yes here): nnU-Net compiles the
    network before segbook's optimiser groups are made, and the loss's Dice term; a few steps train, the compiled
    step's loss is the eager network's, and the checkpoint holds the plain network's keys. About 15 s with inductor's
    cache warm; the first run on a machine compiles for 1.5 to 3 minutes on 2 cores."""
    trainer = _trainer(task, paths)
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: True)
    trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule)
    assert isinstance(trainer.loss.loss.dc, OptimizedModule)
    network = unwrap(trainer.network)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == len(list(network.parameters()))
    loader, _ = trainer.get_dataloaders()
    trainer.network.train()
    batch = next(loader)
    monkeypatch.setattr(trainer, "_do_i_compile", lambda: False)
    eager_loss = trainer._build_loss()
    with torch.no_grad():
        reference = float(eager_loss(network(batch["data"]), batch["target"]))
    before = _weights(trainer.network)
    try:
        losses = [float(trainer.train_step(batch)["loss"])]
    except Exception as error:  # only a missing toolchain is a skip
        reason = _compile_unavailable(error)
        if reason is None:
            raise
        pytest.skip(f"torch.compile cannot run on this CPU toolchain: {reason}")
    losses += [float(trainer.train_step(batch)["loss"]) for _ in range(2)]
    assert losses[0] == pytest.approx(reference, rel=1e-4)
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    # The compiled graph hands the idle head a zero gradient rather than none, so weight decay moves its weight.
    assert set(_unchanged(before, trainer.network)) <= set(IDLE_HEAD)

    checkpoint = Path(trainer.output_folder) / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(checkpoint))
    weights = read_run_checkpoint(checkpoint)["network_weights"]
    assert set(weights) == set(network.state_dict())  # no `_orig_mod.` prefixes
    plain = copy.deepcopy(network)
    plain.load_state_dict(weights)


@pytest.mark.slow
def test_channels_last_3d_through_a_training_step_on_the_cpu(task, paths):
    """`--channels-last` on the CPU: the network's 3D convolutions and each batch go channels-last, the loss is the
    one the contiguous network computes, and the weights train and stay channels-last."""
    trainer = _trainer(task, paths, channels_last=True)
    trainer.initialize()
    network = unwrap(trainer.network)
    convs = _spatial_convs(network)
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last_3d)
                         and not m.weight.is_contiguous() for m in convs)
    loader, _ = trainer.get_dataloaders()
    batch = next(loader)
    assert batch["data"].is_contiguous()  # as nnU-Net's loader delivers it
    contiguous = copy.deepcopy(network).to(memory_format=torch.contiguous_format)
    contiguous.train()
    with torch.no_grad():
        reference = float(trainer.loss(contiguous(batch["data"]), batch["target"]))
    inputs: list[torch.Tensor] = []
    network.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    activations: list[torch.Tensor] = []
    convs[0].register_forward_hook(lambda module, args, output: activations.append(output))
    trainer.network.train()
    before = _weights(trainer.network)
    loss = float(trainer.train_step(batch)["loss"])
    # The input's single channel makes both formats one layout: its strides say which it was given.
    assert len(inputs) == 1 and torch.equal(inputs[0], batch["data"])
    assert inputs[0].stride() == batch["data"].to(memory_format=torch.channels_last_3d).stride()
    assert inputs[0].stride() != batch["data"].stride()
    assert activations[0].is_contiguous(memory_format=torch.channels_last_3d) and not activations[0].is_contiguous()
    assert loss == pytest.approx(reference, rel=1e-4)
    assert _unchanged(before, trainer.network) == IDLE_HEAD
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last_3d) for m in convs)


@pytest.mark.slow
def test_bf16_channels_last_run_finishes_and_predicts_with_the_cpus_options(task, paths, monkeypatch):
    """A run asked for bf16 and channels-last trains end to end on the CPU (as `segbook finetune --precision bf16
    --channels-last --device cpu`); its predictor is set up for the device (CPU: nothing kept on the device,
    no compile; CUDA, mocked: everything on it) and a tiny prediction of the test split is scored."""
    settings = TrainingSettings(mixed_precision="bf16", channels_last=True, **TINY_BUDGET)
    result = finetune(task.entry, "tiny", pretrained=False, settings=settings, device="cpu")
    manifest = result.manifest
    assert manifest.status == "finished" and manifest.data["device"] == "cpu"
    assert manifest.settings.mixed_precision == "bf16" and manifest.settings.channels_last
    assert np.isfinite(manifest.data["epochs"][0]["train_loss"])
    assert read_run_checkpoint(result.folder / "checkpoint_final.pth")["grad_scaler_state"] is None

    monkeypatch.setenv("nnUNet_compile", "1")  # as `--compile` leaves it for an evaluation in the same process
    predictor = _predictor(result.spec, EvaluationSettings(), torch.device("cpu"), result.folder)
    assert predictor.device == torch.device("cpu") and predictor.perform_everything_on_device is False
    assert not isinstance(predictor.network, OptimizedModule)  # the trainer's rule: no compile off CUDA
    assert predictor.list_of_parameters[0].keys() == predictor.network.state_dict().keys()
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # nnU-Net's CUDA predictor turns it on
    on_gpu = _predictor(result.spec, EvaluationSettings(), torch.device("cuda"), result.folder)
    assert on_gpu.device == torch.device("cuda") and on_gpu.perform_everything_on_device is True
    assert torch.backends.cudnn.benchmark is True and isinstance(on_gpu.network, OptimizedModule)
    monkeypatch.delenv("nnUNet_compile")

    # A bf16 training run leaves the process's CUDA autocast dtype at bf16 (a batch worker then evaluates in the
    # same process): nnU-Net's predictor, which autocasts in that dtype, must still predict in its fp16.
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    seen: list[torch.dtype] = []
    sliding_window = nnUNetPredictor.predict_sliding_window_return_logits

    def recording(self, *args, **kwargs):
        seen.append(torch.get_autocast_dtype("cuda"))
        return sliding_window(self, *args, **kwargs)

    monkeypatch.setattr(nnUNetPredictor, "predict_sliding_window_return_logits", recording)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        evaluation = evaluate_run(task.entry, result.spec, device="cpu")
        assert torch.get_autocast_dtype("cuda") == torch.bfloat16  # the process's own setting, restored
    finally:
        torch.set_autocast_dtype("cuda", torch.float16)
    assert seen and set(seen) == {torch.float16}
    summary = json.loads((evaluation.folder / "summary.json").read_text())
    assert summary["num_cases"] == task.entry.test_cases == 2
    metrics = (evaluation.folder / "metrics.csv").read_text().splitlines()
    assert len(metrics) == 1 + task.entry.test_cases * 3
