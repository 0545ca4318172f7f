"""The device check: every GPU-only path of segbook run once, with its figures, in one command.

    scripts/gpu_check.sh OUT [--install]          # on the GPU machine, from a clean checkout
    python scripts/gpu_check.py OUT --smoke        # the same steps at toy size on the CPU (checks the script)

Steps (each reported; a failing one does not stop the next; the exit status is 1 if any failed):
1. environment: GPU, memory, driver, CUDA, torch and nnunetv2 versions, the bf16 dense peak used for MFU;
2. training step of small, base, large (and huge when memory allows) and nnU-Net's network at 128^3, batch 2:
   segbook's path next to nnU-Net's stock step (scripts/bench_train.py), plain and with torch.compile and
   channels-last 3D;
3. augmentation throughput of nnU-Net's loader on a synthetic task planned at a 128^3 patch, with the workers a
   16-core node gets, next to what the fastest training step consumes;
4. end to end: `segbook finetune --model base --pretrained` from weights written in the official format, a few
   epochs with the GPU defaults, then `segbook evaluate` on the device: prediction time per case, peak memory;
5. with two GPUs or more: the same run on two GPUs (nnU-Net's DDP), interrupted and resumed;
6. a budget curve (issue 26): STU-Net base pretrained and from scratch at two budgets with three snapshots each,
   evaluated, and the budgets and curves tables that answer "does the shorter budget give the same answer?".
Every step writes `OUT/<step>.json`; `OUT/summary.txt` has one line per step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
TASK_ID = 985


class Check:
    """The steps' shared state: where results go, the run's size, and what each step found."""

    def __init__(self, out: Path, smoke: bool):
        self.out, self.smoke = out, smoke
        self.home = out / "home"
        self.results: dict[str, dict[str, Any]] = {}
        self.env = {**os.environ, "SEGBOOK_HOME": str(self.home), "PYTHONUNBUFFERED": "1"}
        for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            self.env.pop(variable, None)

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def step(self, name: str, function: Callable[["Check"], dict[str, Any]]) -> None:
        started = time.time()
        print(f"== {name}", flush=True)
        try:
            result = {"ok": True, **function(self)}
        except Exception as error:  # noqa: BLE001 - a failing step is reported and the next one still runs
            result = {"ok": False, "error": f"{type(error).__name__}: {error}",
                      "traceback": traceback.format_exc()[-4000:]}
            print(result["traceback"], flush=True)
        result["seconds"] = round(time.time() - started, 1)
        self.results[name] = result
        (self.out / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))

    def segbook(self, *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "segbook.cli.main", *args]
        print("$ segbook " + " ".join(args), flush=True)
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"segbook {' '.join(args)} exited {done.returncode}: {done.stderr[-2000:]}")
        return done


def environment(check: Check) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT / "scripts"))
    from bench_train import DENSE_BF16_TFLOPS

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "cpus": os.cpu_count()}
    from importlib.metadata import version
    info["nnunetv2"] = version("nnunetv2")
    if check.smoke:
        return {**info, "device": "cpu (smoke run)"}
    name = torch.cuda.get_device_name(0)
    entry = next((k for k in DENSE_BF16_TFLOPS if k in name), None)
    smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                         text=True)
    return {**info, "gpu": name, "gpus": torch.cuda.device_count(),
            "memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1),
            "driver": smi.stdout.strip() or smi.stderr.strip(), "bf16_supported": torch.cuda.is_bf16_supported(),
            "peak_table_entry": entry, "peak_bf16_dense_tflops": DENSE_BF16_TFLOPS.get(entry)}


def _bench(check: Check, extra: list[str], models: str | None = None) -> list[dict[str, Any]]:
    import torch

    if models is None:
        models = "small,base,large,nnunet"
        if not check.smoke and torch.cuda.get_device_properties(0).total_memory > 80 * 2 ** 30:
            models = "small,base,large,huge,nnunet"
    size = ["--patch", "32", "32", "32", "--iters", "2", "--warmup", "1", "--models", "tiny,nnunet"] if check.smoke \
        else ["--patch", "128", "128", "128", "--iters", "10", "--warmup", "3", "--models", models]
    report = check.out / f"bench{'_'.join(extra).replace('--', '_')}.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--batch", "2", "--device", check.device,
               "--json", str(report), *size, *extra]
    print("$ " + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, env=check.env, capture_output=True, text=True, timeout=1800)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_train exited {done.returncode}: {done.stderr[-2000:]}")
    return json.loads(report.read_text())["rows"]


def training_step(check: Check) -> dict[str, Any]:
    """Every size plain; compiled and channels-last only STU-Net-large (the target) and nnU-Net's network, as
    compiling takes about a minute a network."""
    return {"plain": _bench(check, []),
            "compiled_channels_last": _bench(check, ["--compile", "--channels-last"],
                                             None if check.smoke else "large,nnunet")}


def _task(check: Check) -> tuple[str, str]:
    """A synthetic CT task big enough for nnU-Net to plan a 128^3 patch (toy size in a smoke run), imported and
    planned; returns its registry file and key."""
    from segbook.data.synth import SynthSpec, numbered_targets, write_synthetic_task

    source = check.out / "task"
    registry = source / "registry.yaml"
    if not registry.is_file():
        size = (36, 36, 24) if check.smoke else (192, 192, 160)
        spec = SynthSpec(name="GpuCheck", cases=10, size=size, spacing=(1.0, 1.0, 1.0),
                         targets=numbered_targets(2, 1), seed=0)
        task = write_synthetic_task(spec, source, dataset_id=TASK_ID)
        check.segbook("data", "import", "--registry", str(task.registry), "--task", task.key, "--from",
                      str(task.dataset.path), "-np", str(min(8, os.cpu_count() or 1)))
    key = f"Task{TASK_ID}_GpuCheck"
    check.segbook("plan", "--registry", str(registry), "--task", key, "-np", str(min(8, os.cpu_count() or 1)))
    return str(registry), key


def augmentation(check: Check) -> dict[str, Any]:
    registry, key = _task(check)
    workers = str(max(1, min(12, (os.cpu_count() or 2) - 4)))
    report = check.out / "loader.json"
    command = [sys.executable, str(ROOT / "scripts" / "bench_train.py"), "--models", "tiny" if check.smoke else "base",
               "--device", check.device, "--iters", "2", "--warmup", "1", "--loader-task", key,
               "--loader-registry", registry, "--loader-seconds", "5" if check.smoke else "30", "--json", str(report),
               *(["--patch", "32", "32", "32"] if check.smoke else [])]
    print("$ " + " ".join(command[1:]), flush=True)
    done = subprocess.run(command, env={**check.env, "nnUNet_n_proc_DA": workers}, capture_output=True, text=True,
                          timeout=900)
    print(done.stdout, flush=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench_train exited {done.returncode}: {done.stderr[-2000:]}")
    fastest = max((row["samples_per_s"] for step in check.results.get("training_step", {}).values()
                   if isinstance(step, list) for row in step), default=None)
    loader = json.loads(report.read_text())["loader"]
    needed = fastest / 2 if fastest else None
    return {"workers": int(workers), "loader_batches_per_s": loader["batches_per_s"],
            "fastest_step_batches_per_s": needed, "keeps_up": None if needed is None else loader["batches_per_s"] >=
            needed}


def _weights(check: Check) -> Path:
    import torch

    from stunet import create_stunet, write_official_checkpoint

    torch.manual_seed(0)
    return write_official_checkpoint(create_stunet("tiny" if check.smoke else "base", 1, 105).state_dict(),
                                     check.out / "pretrained.model")


def end_to_end(check: Check) -> dict[str, Any]:
    registry, key = _task(check)
    model = "tiny" if check.smoke else "base"
    budget = ["--epochs", "2", "--iters-per-epoch", "2", "--val-iters-per-epoch", "1"] if check.smoke else \
        ["--epochs", "3", "--iters-per-epoch", "50", "--val-iters-per-epoch", "10"]
    started = time.time()
    check.segbook("finetune", "--registry", registry, "--task", key, "--model", model, "--pretrained", "--weights",
                  str(_weights(check)), "--device", check.device, *budget)
    trained = time.time() - started
    started = time.time()
    evaluated = check.segbook("evaluate", "--registry", registry, "--task", key, "--model", model, "--pretrained",
                              "--device", check.device)
    seconds = time.time() - started
    run = next((check.home / "nnUNet_results").glob(f"Dataset{TASK_ID}_*/SegbookTrainer_{model}_pretrained_*/fold_all"))
    manifest = _manifest(run)
    summary = json.loads((run / "evaluation" / "summary.json").read_text())
    return {"train_seconds": round(trained, 1), "evaluate_seconds": round(seconds, 1),
            "prediction_seconds_per_case": round(seconds / summary["num_cases"], 2),
            "status": manifest["status"], "epochs": len(manifest["epochs"]), "device": manifest.get("device"),
            "epoch_seconds": [e["seconds"] for e in manifest["epochs"]], "dice": summary["foreground_mean"]["dice"],
            "training_cost": manifest.get("cost"), "prediction_cost": (summary.get("cost") or {}).get("prediction"),
            "evaluate_output": evaluated.stdout[-1000:]}


def _manifest(run: Path) -> dict[str, Any]:
    """The run's record with its per-epoch history (run.json keeps a count; the history is in epochs.jsonl)."""
    from segbook.training.manifest import RunManifest

    return RunManifest.load(run).data


def two_gpus(check: Check) -> dict[str, Any]:
    import torch

    if check.smoke or torch.cuda.device_count() < 2:
        return {"skipped": "fewer than two GPUs"}
    registry, key = _task(check)
    command = [sys.executable, "-m", "segbook.cli.main", "finetune", "--registry", registry, "--task", key,
               "--model", "base", "--pretrained", "--weights", str(_weights(check)), "--device", "cuda",
               "--num-gpus", "2", "--recipe", "stunet-official", "--epochs", "4", "--iters-per-epoch", "30",
               "--val-iters-per-epoch", "5", "--checkpoint-every", "1"]
    process = subprocess.Popen(command, env=check.env, start_new_session=True)
    run = None
    deadline = time.time() + 600
    while time.time() < deadline and process.poll() is None:
        found = list((check.home / "nnUNet_results").glob(f"Dataset{TASK_ID}_*/*stunet-official*/fold_all"))
        run = found[0] if found else None
        if run and (run / "checkpoint_latest.pth").is_file():
            break
        time.sleep(2)
    os.killpg(process.pid, signal.SIGINT)
    process.wait(timeout=300)
    check.segbook(*command[3:], "--continue")
    manifest = _manifest(run)
    return {"status": manifest["status"], "epochs": [e["epoch"] for e in manifest["epochs"]],
            "events": [e["event"] for e in manifest["events"]]}


def budget_curve(check: Check) -> dict[str, Any]:
    """Dice against GPU-hours for STU-Net base on the check's task: budgets of 4 and 8 epochs (toy: 2 and 4), each
    pretrained and from scratch, snapshots at 25/50/75 % (toy: 50 %), then the tables that compare them."""
    registry, key = _task(check)
    model = "tiny" if check.smoke else "base"
    budgets, snapshots = (["2", "4"], ["50"]) if check.smoke else (["4", "8"], ["25", "50", "75"])
    iterations = ["--iters-per-epoch", "2", "--val-iters-per-epoch", "1"] if check.smoke else \
        ["--iters-per-epoch", "50", "--val-iters-per-epoch", "10"]
    selection = ["--registry", registry, "--task", key, "--model", model, "--budgets", *budgets]
    for init in ("--pretrained", "--scratch"):
        weights = ["--weights", str(_weights(check))] if init == "--pretrained" else []
        check.segbook("finetune", *selection, init, *weights, "--snapshots", *snapshots, "--device", check.device,
                      *iterations)
        check.segbook("evaluate", *selection, init, "--snapshots", "--device", check.device)
    tables = {}
    for table in ("budgets", "curves"):
        printed = check.segbook("results", "--registry", registry, "--no-imported", "--table", table, "--format",
                                "json").stdout
        tables[table] = json.loads(printed)
    return tables


STEPS = {"environment": environment, "training_step": training_step, "augmentation": augmentation,
         "end_to_end": end_to_end, "two_gpus": two_gpus, "budget_curve": budget_curve}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="folder for the figures (created)")
    parser.add_argument("--smoke", action="store_true", help="every step at toy size on the CPU")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated subset of the steps")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    check = Check(args.out.resolve(), args.smoke)
    for name in args.steps.split(","):
        check.step(name, STEPS[name])
    lines = [f"{name}: {'ok' if r['ok'] else 'FAILED ' + r['error']} ({r['seconds']} s)"
             for name, r in check.results.items()]
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(r["ok"] for r in check.results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
