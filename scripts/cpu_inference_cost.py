"""Is a fine-tuned network usable on a laptop's CPU? Seconds per case and peak resident memory of prediction.

On the demo's first target (`segbook demo`'s CT task of seen structures, synthesised at the demo's volume size,
imported and planned as the demo does: nnU-Net's default plans for STU-Net, nnUNetResEncUNetLPlans for ResEnc-L),
each network is built from its plans with random weights (the time and memory of prediction do not depend on the
weights' values) and predicts test cases with nnU-Net's predictor exactly as `segbook evaluate --device cpu
--threads N` sets it up (sliding window at step 0.5, Gaussian weighting, mirroring on all three axes, preprocessing
and export included), measured by the same record `segbook evaluate` writes (`measured_prediction`). Each (network,
threads) runs in a fresh process, so that one network's memory never counts against the next.

    python scripts/cpu_inference_cost.py                          # base, large, resenc-l; 1 and 2 threads; 1 case
    python scripts/cpu_inference_cost.py --models base --threads 4 --cases 3 --size 64 64 40

(from the repository root, with segbook installed or PYTHONPATH=.)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

DEFAULT_MODELS = ("base", "large", "resenc-l")
#: The demo's first target: the CT task of seen structures (nnU-Net dataset id 971).
TARGET = 971


def prepare(out: Path, size: tuple[int, int, int], cases: int) -> None:
    """The demo's first target at `size`, with `cases` test cases, imported and planned for every network."""
    from segbook import backbones
    from segbook.data.importer import import_dataset
    from segbook.data.synth import registry_entry, write_registry_file, write_synthetic_dataset
    from segbook.demo import DEFAULT, DEMO_SCALE_THRESHOLDS, demo_specs
    from segbook.paths import Paths
    from segbook.plan import plan_task
    from segbook.registry import load_registry

    spec = demo_specs(replace(DEFAULT, size=size))[TARGET]
    record = registry_entry(spec, TARGET, test_cases=cases)
    record.update(scale_thresholds=list(DEMO_SCALE_THRESHOLDS))
    entry = load_registry([write_registry_file(out / "registry.yaml", record)]).get(f"Dataset{TARGET}")
    paths = Paths.from_env()
    import_dataset(entry, write_synthetic_dataset(spec, out / "sources", layout="v1", dataset_id=TARGET).path, paths,
                   progress=False)
    for planner in sorted({backbones.get(model).planner for model in DEFAULT_MODELS}):
        plan_task(entry, paths, num_processes=1, progress=False, fingerprint_samples=100_000, planner=planner)


def measure(out: Path, model: str, threads: int, cases: int) -> dict:
    """Predict the first `cases` test cases with `model` on `threads` threads: `segbook evaluate`'s cost record."""
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from segbook import backbones
    from segbook.backbones.models import build
    from segbook.evaluation.evaluate import prediction_threads, test_cases, torch_threads
    from segbook.paths import Paths
    from segbook.plan import load_plan
    from segbook.registry import load_registry
    from segbook.runs import CONFIGURATION
    from segbook.training.cost import measured_prediction

    entry = load_registry([out / "registry.yaml"]).get(f"Dataset{TARGET}")
    paths = Paths.from_env()
    backbone = backbones.get(model)
    plan = load_plan(entry, paths, backbone.planner)
    plans = PlansManager(json.loads(plan.plans_file.read_text()))
    dataset_json = json.loads((plan.plans_file.parent / "dataset.json").read_text())
    configuration = plans.get_configuration(CONFIGURATION)
    label_manager = plans.get_label_manager(dataset_json)
    network = build(backbone, configuration, len(dataset_json["channel_names"]),
                    label_manager.num_segmentation_heads, deep_supervision=False)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                device=torch.device("cpu"), perform_everything_on_device=False, allow_tqdm=False)
    predictor.manual_initialization(network, plans, configuration, [network.state_dict()], dataset_json,
                                    "benchmark", (0, 1, 2))
    chosen = test_cases(entry, paths)[:cases]
    predictions = Path(tempfile.mkdtemp(dir=out))
    with torch_threads(threads), measured_prediction("cpu", len(chosen), prediction_threads()) as record:
        predictor.predict_from_files_sequential([[str(image) for image in case.images] for case in chosen],
                                                [str(predictions / case.case) for case in chosen])
    parameters = sum(p.numel() for p in network.parameters())
    return {"model": model, "patch": list(configuration.patch_size), "parameters_m": round(parameters / 1e6, 1),
            "image": list(json.loads(plan.plans_file.read_text())["original_median_shape_after_transp"]), **record}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--cases", type=int, default=1, help="test cases predicted per measurement")
    parser.add_argument("--size", nargs=3, type=int, default=None,
                        help="the synthetic volumes' size (default: the CPU demo's, 32 32 20)")
    parser.add_argument("--out", help="working folder (default: a temporary one, removed afterwards)")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(Path(args.out), args.worker[0], int(args.worker[1]), args.cases)))
        return 0
    from segbook.demo import DEFAULT

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(args.out or scratch).resolve()
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "SEGBOOK_HOME": str(out / "home"), "nnUNet_def_n_proc": str(max(args.threads))}
        for variable in ("SEGBOOK_REGISTRY", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
            env.pop(variable, None)
        os.environ.clear()
        os.environ.update(env)
        prepare(out, tuple(args.size or DEFAULT.size), args.cases)
        print("model      threads  patch          params (M)  s/case   peak RSS (GiB)")
        for model in args.models:
            for threads in args.threads:
                done = subprocess.run([sys.executable, __file__, "--out", str(out), "--cases", str(args.cases),
                                       "--worker", model, str(threads)], env=env, check=True, capture_output=True,
                                      text=True)
                record = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{model:<10} {record['threads']:>7}  {'x'.join(map(str, record['patch'])):<14} "
                      f"{record['parameters_m']:>10}  {record['seconds_per_case']:>6.2f}   "
                      f"{record['peak_rss_bytes'] / 2**30:>6.2f}  ({record['peak_rss_since']}; image "
                      f"{'x'.join(map(str, record['image']))})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
