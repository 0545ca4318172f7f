"""Reusable test helpers: tiny synthetic tasks registered, imported and planned in seconds.

Use them with the `segbook_home` fixture active (an isolated SEGBOOK_HOME, nnU-Net variables unset):

    from helpers import prepare_synthetic_task   # tests/ is on sys.path (pytest's prepend import mode)

    def test_training(tmp_path, segbook_home):
        registry_file, entry = prepare_synthetic_task(tmp_path)   # imported and preprocessed (3d_fullres)
        registry = load_registry([registry_file])                 # or pass --registry registry_file to the CLI
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import numpy as np
import pytest
import torch

from segbook.data.importer import import_dataset
from segbook.data.layouts import PlainSource
from segbook.data.synth import (SynthDataset, SynthSpec, TargetSpec, registry_entry, write_registry_file,
                                write_synthetic_dataset)
from segbook.paths import Paths
from segbook.registry import DatasetEntry, load_registry
from stunet import create_stunet, write_official_checkpoint

#: Cheap fingerprints: nnU-Net samples 1e8 foreground intensities per dataset, which dominates on tiny data.
FINGERPRINT_SAMPLES = 100_000

TINY_TARGETS = (TargetSpec("organ", prototype=0), TargetSpec("vessel", shape="tube", prototype=1),
                TargetSpec("tumour", kind="lesion", within="organ"))


def tiny_spec(name: str = "Tiny", modality: str = "CT", channels: tuple[str, ...] = (), cases: int = 8,
              size: tuple[int, int, int] = (40, 40, 24), seed: int = 0) -> SynthSpec:
    """A small CT-like (or MRI-like) task: an organ, a vessel and lesions inside the organ."""
    return SynthSpec(name=name, cases=cases, size=size, spacing=(1.5, 1.5, 2.5), modality=modality,
                     channels=channels, targets=TINY_TARGETS, seed=seed)


#: The SegBook authors' plans of a made-up dataset, for tiny tasks (40x40x24 voxels at 1.5 x 1.5 x 2.5 mm, which
#: nnU-Net plans with patch [24, 40, 40] at [2.5, 1.5, 1.5]): registry fields for `register_spec`'s `fields`.
REFERENCE_PLANS = {"reference_patch_size": [16, 32, 32], "reference_spacing": [3.0, 2.0, 2.0]}


def register_spec(folder: Path, spec: SynthSpec, dataset_id: int = 990, test_cases: int | None = None,
                  filename: str = "registry.yaml", fields: dict | None = None) -> tuple[Path, DatasetEntry]:
    """Write a user registry file for `spec` (with extra registry `fields`) and return it with its loaded entry."""
    entry = {**registry_entry(spec, dataset_id, test_cases=test_cases), **(fields or {})}
    path = write_registry_file(Path(folder) / filename, entry)
    return path, load_registry([path]).get(entry["key"])


def source_of(written: SynthDataset) -> Path | PlainSource:
    """What `import_dataset` takes for a synthetic dataset in any layout."""
    if written.layout != "plain":
        return written.path
    pattern = "{case}_{channel}.nii.gz" if written.channel_tokens else None
    return PlainSource(written.images, written.labels, pattern,
                       channel_tokens=tuple(written.channel_tokens) or None)


def prepare_synthetic_task(tmp_path: Path, spec: SynthSpec | None = None, dataset_id: int = 990,
                           layout: str = "v2", plan: bool = True, num_processes: int = 1,
                           fields: dict | None = None) -> tuple[Path, DatasetEntry]:
    """Write, register, import and (with `plan`) plan and preprocess a tiny synthetic task.

    Returns the user registry file (for `load_registry([file])` or `--registry file`) and the task's entry.
    Default: 8 CT-like cases of 40x40x24 voxels (6 train, 2 test), labels organ, vessel, tumour; about 10 s on
    2 cores, almost all of it nnU-Net's worker start-up. Needs SEGBOOK_HOME set (the `segbook_home` fixture) so
    nothing lands in the user's folders.
    """
    from segbook.plan import plan_task

    if "SEGBOOK_HOME" not in os.environ:
        raise RuntimeError("prepare_synthetic_task writes into SEGBOOK_HOME: use the segbook_home fixture")
    spec = spec or tiny_spec()
    written = write_synthetic_dataset(spec, tmp_path / "synthetic_source", layout=layout, dataset_id=dataset_id)
    registry_file, entry = register_spec(tmp_path, spec, dataset_id, fields=fields)
    import_dataset(entry, source_of(written), num_processes=num_processes, progress=False)
    if plan:
        plan_task(entry, num_processes=num_processes, progress=False, fingerprint_samples=FINGERPRINT_SAMPLES)
    return registry_file, entry


@contextlib.contextmanager
def planned_tiny_task(root: Path, spec: SynthSpec | None = None, dataset_id: int = 990, seed: int = 0,
                      fields: dict | None = None) -> Iterator[SimpleNamespace]:
    """For a module-scoped fixture: a tiny synthetic task imported and planned in its own SEGBOOK_HOME under
    `root`, and a tiny STU-Net "pretrained" on 105 classes, saved like the official checkpoints.

    Inside the block nnU-Net's folder variables are unset (nothing touches the user's folders) and its processes
    are few: augmentation in the training process (deterministic, light on 2 cores), one planning process.
    """
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SEGBOOK_HOME", str(root / "home"))
        for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "SEGBOOK_REGISTRY"):
            patch.setenv(variable, "unset")  # set then delete: restored even when segbook exports it meanwhile
            patch.delenv(variable)
        patch.setenv("nnUNet_n_proc_DA", "0")
        patch.setenv("nnUNet_def_n_proc", "1")
        registry_file, entry = prepare_synthetic_task(root, spec, dataset_id=dataset_id, fields=fields)
        torch.manual_seed(seed)
        weights = write_official_checkpoint(create_stunet("tiny", 1, 105).state_dict(),
                                            root / "tiny_pretrained.model", epoch=4000)
        paths = Paths.from_env()
        yield SimpleNamespace(root=root, home=root / "home", registry_file=registry_file, entry=entry,
                              weights=weights, raw=paths.raw, preprocessed=paths.preprocessed, patch=patch)


def use_planned_task(task: SimpleNamespace, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Paths:
    """For a per-test fixture: the module's planned task, with this test's own results and batch state."""
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("SEGBOOK_HOME", str(tmp_path / "home"))
    return Paths.from_env()


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (its children, theirs, ...), from /proc (Linux)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        below = [child for child, parent in parents.items() if parent in frontier]
        found += below
        frontier = below
    return found


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie has exited: nobody reaps an orphan's zombie in some containers)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait for the processes to end; those still alive after `timeout_s` seconds."""
    deadline = time.monotonic() + timeout_s
    while any(map(alive, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def run_segbook(*args: str, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """`segbook ARGS` in a fresh process, as a user types it; with `check`, a failure shows its output."""
    result = subprocess.run([sys.executable, "-m", "segbook.cli.main", *args], capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def real_ct_cases(shared: Path, out: Path, pieces: tuple[int, int] = (2, 3)) -> tuple[Path, Path]:
    """Cut the real TotalSegmentator example CT (and its segmentation) into pieces along x and z: a plain source
    (`images/`, `labels/`) whose cases keep the real headers (spacing, origin, direction)."""
    import SimpleITK as sitk

    folder = shared / "totalsegmentator_example"
    ct, seg = sitk.ReadImage(str(folder / "ct.nii.gz")), sitk.ReadImage(str(folder / "seg.nii.gz"))
    nx, nz = pieces
    size = ct.GetSize()
    xs, zs = np.linspace(0, size[0], nx + 1).astype(int), np.linspace(0, size[2], nz + 1).astype(int)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for i in range(nx):
        for k in range(nz):
            name = f"abdomen_{i}{k}"
            crop = (slice(int(xs[i]), int(xs[i + 1])), slice(None), slice(int(zs[k]), int(zs[k + 1])))
            sitk.WriteImage(ct[crop], str(out / "images" / f"{name}_0000.nii.gz"), useCompression=True)
            sitk.WriteImage(seg[crop], str(out / "labels" / f"{name}.nii.gz"), useCompression=True)
    return out / "images", out / "labels"


def real_ct_entry(shared: Path, cases: int, dataset_id: int = 980) -> dict:
    """A registry entry for the example's 117 TotalSegmentator v2 classes (seen where v1 has the same name)."""
    from segbook.registry import TOTALSEG_V1_CLASSES

    names = json.loads((shared / "totalsegmentator_example" / "labels.json").read_text())
    labels = [{"index": 0, "name": "background", "kind": "background"}]
    for index in sorted(map(int, names)):
        name = names[str(index)]
        seen = name in TOTALSEG_V1_CLASSES
        labels.append({"index": index, "name": name, "kind": "structure", "seen": seen,
                       "totalseg_classes": [name] if seen else []})
    test = max(1, round(cases * 0.2))
    return {"key": f"Task{dataset_id}_AbdomenExample", "name": "AbdomenExample", "dataset_id": dataset_id,
            "modality": "CT", "channels": ["CT"], "target": "Seen Structure", "cases": cases,
            "train_cases": cases - test, "test_cases": test, "region": "Abdominal", "bone": True, "vessel": True,
            "labels": labels}


class _Payload:
    """Unpickling this runs a shell command: what a crafted checkpoint on a shared file system could hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def write_payload_checkpoint(path: Path, marker: Path) -> Path:
    """An nnU-Net-shaped checkpoint at `path` whose unpickling creates `marker` (so a test sees whether it ran)."""
    import shlex

    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"network_weights": {}, "optimizer_state": {}, "logging": {}, "current_epoch": 1,
                "init_args": {}, "trainer_name": "x", "grad_scaler_state": None, "_best_ema": None,
                "inference_allowed_mirroring_axes": None, "payload": _Payload(f"touch {shlex.quote(str(marker))}")},
               path)
    return path
