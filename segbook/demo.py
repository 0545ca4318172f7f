"""`segbook demo`: the whole benchmark in miniature, on synthetic data, through the same code paths as a study.

1. A synthetic "source" task (six organ-like structures in CT-like volumes, a stand-in for TotalSegmentator) and
   three small targets that differ in what the benchmark groups by: a CT task of seen structures, an MRI task of
   unseen structures and a CT task of a seen organ with lesions, with a small, a medium and a large number of cases.
   All are registered in a demo registry file (the real schema, scale thresholds scaled down to toy size).
2. An STU-Net is "pretrained" on the source and saved in the official checkpoint format.
3. Every target is imported, validated, split and planned; the pretrained and the scratch runs of each target are
   trained with the same budget and evaluated on the held-out split through `segbook batch`'s local runner, and
   the first target is fine-tuned with one more recipe (a linear probe: the body frozen, only the heads train).
4. The results tables (by scale, by modality and target, by recipe) are printed and the HTML report is written.

Everything lives under one output folder; the user's nnU-Net folders are never touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

from segbook.data.synth import SynthSpec, TargetSpec, registry_entry, write_registry_file, write_synthetic_dataset
from segbook.paths import Paths

#: Intra-op threads of every demo process (training, prediction, export). The order of float sums in training
#: depends on the number of threads, so a fixed number makes the tables the same on every machine with the same CPU
#: and versions, whatever its core count (README: what is and is not reproducible).
DEMO_THREADS = 2
#: Demo datasets count as medium from 10 cases and large from 20 (the paper: 100 and 400).
DEMO_SCALE_THRESHOLDS = (10, 20)
SOURCE_ORGANS = ("liver", "spleen", "kidney_left", "stomach", "pancreas")


def _seen(name: str, prototype: int) -> TargetSpec:
    return TargetSpec(name, prototype=prototype, totalseg_classes=(name,))


@dataclass(frozen=True)
class DemoSettings:
    """Sizes and budgets; the default fits a 2-core CPU in under 10 minutes."""

    model: str = "tiny"
    size: tuple[int, int, int] = (32, 32, 20)
    source_cases: int = 24
    target_cases: tuple[int, int, int] = (8, 12, 20)  # small, medium, large (demo thresholds)
    pretrain_epochs: int = 100
    target_epochs: int = 15
    iterations_per_epoch: int = 10
    #: The body's fine-tuning rate. SegBook's 1e-3 is made for 250,000 iterations; at the demo's 150 it leaves the
    #: pretrained body almost frozen, so the demo fine-tunes at scratch's 1e-2 (heads still at 10x). See README.
    finetune_lr: float = 1e-2
    #: One more fine-tuning recipe, on the first (seen-CT) target: recipes are an axis of the benchmark too.
    extra_recipe: str = "heads-only"
    seed: int = 0
    #: The targets' budgets in epochs, each its own run (`--budgets`; empty: `target_epochs` only), and the
    #: percentages of each budget after which the network is kept and scored (`--snapshots`).
    budgets: tuple[int, ...] = ()
    snapshots: tuple[int, ...] = ()

    def target_budgets(self) -> tuple[int, ...]:
        return self.budgets or (self.target_epochs,)

    def check(self) -> None:
        """`OptionError`/`RunIdentityError` for budgets and snapshots that cannot be run, before anything is
        written: snapshots must fit every budget (`snapshot_epochs`)."""
        from segbook.runs import parse_budgets
        from segbook.training.settings import snapshot_epochs

        if self.budgets:
            parse_budgets(self.budgets)
        for budget in self.target_budgets():
            if self.snapshots:
                snapshot_epochs(list(self.snapshots), budget)


DEFAULT = DemoSettings()
QUICK = replace(DEFAULT, source_cases=10, pretrain_epochs=4, target_epochs=2, iterations_per_epoch=4)
GPU = replace(DEFAULT, model="small", size=(64, 64, 40), source_cases=40, pretrain_epochs=200, target_epochs=50,
              iterations_per_epoch=25)


def demo_specs(settings: DemoSettings) -> dict[int, SynthSpec]:
    """The source (id 970) and the three targets (971-973), keyed by nnU-Net dataset id."""
    size, (small, medium, large) = settings.size, settings.target_cases
    source_targets = tuple(_seen(name, i) for i, name in enumerate(SOURCE_ORGANS))
    source_targets += (TargetSpec("aorta", shape="tube", prototype=5, totalseg_classes=("aorta",)),)
    seed = settings.seed
    return {
        970: SynthSpec(name="DemoSource", cases=settings.source_cases, size=size, targets=source_targets,
                       seed=seed + 1),
        971: SynthSpec(name="DemoSeenCT", cases=small, size=size, targets=(_seen("liver", 0), _seen("kidney_left", 2)),
                       seed=seed + 2),
        972: SynthSpec(name="DemoUnseenMRI", cases=medium, size=size, modality="MRI",
                       targets=(TargetSpec("gland", prototype=11), TargetSpec("duct", shape="tube", prototype=12)),
                       seed=seed + 3),
        973: SynthSpec(name="DemoLesionCT", cases=large, size=size,
                       targets=(_seen("spleen", 1), TargetSpec("lesion", kind="lesion", within="spleen")),
                       seed=seed + 4),
    }


@dataclass
class DemoResult:
    out: Path
    report: Path
    tables: dict  # table name -> segbook.results.ResultTable
    seconds: float

    def closing_note(self) -> str:
        results = self.out / "home" / "nnUNet_results"
        return (f"Done in {self.seconds / 60:.1f} min. Report: {self.report}\n"
                "These are synthetic, toy-scale numbers: they show that every stage of the benchmark runs, not how "
                "much pretraining helps on real data.\n"
                f"The tables again, in any format: segbook results --results-dir {results} "
                f"--registry {self.out / 'demo_registry.yaml'} --no-imported [--table modality-target|recipes] "
                "[--stats] [--format md]\n"
                "The real study: download the checkpoints (`segbook weights download large`), import a dataset "
                "(`segbook data import --task 613 --from PATH`), run the matrix (`segbook batch run` or "
                "`segbook batch submit --backend slurm ...`), then `segbook results` and `segbook report` (see the "
                "README).")


def run_demo(out: str | os.PathLike | None = None, *, quick: bool = False, device: str = "cpu",
             seed: int = 0, budgets: Sequence[int] = (), snapshots: Sequence[int] = (),
             say: Callable[[str], None] = print) -> DemoResult:
    """Run every stage of the benchmark on synthetic data; returns where the report is and the printed tables.
    `budgets`: the targets' training budgets in epochs, each its own run (default: the demo's one); `snapshots`:
    percentages of each budget after which the network is kept and scored too."""
    from segbook.devices import resolve_device

    started = time.time()
    settings = replace(QUICK if quick else (GPU if device == "cuda" else DEFAULT), seed=seed,
                       budgets=tuple(budgets), snapshots=tuple(sorted(snapshots)))
    settings.check()
    with _demo_threads():
        resolve_device(device)
        out = Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="segbook-demo-"))
        with _isolated(out) as paths:
            say(f"segbook demo: synthetic data, {'quick ' if quick else ''}toy-scale budgets, on {device} "
                f"({DEMO_THREADS} CPU threads per process); output in {out}")
            with _stage(say, "[1/5] generating the synthetic source and target tasks"):
                registry_file, entries = _write_tasks(out, settings)
            with _stage(say, "[2/5] importing, validating, splitting and planning every task"):
                _import_and_plan(out, settings, entries, paths)
            with _stage(say, f"[3/5] pretraining STU-Net {settings.model} on the source task "
                             f"({settings.pretrain_epochs} epochs x {settings.iterations_per_epoch} iterations)"):
                checkpoint = _pretrain(out, settings, entries[970], paths, device)
            targets = [entries[i] for i in sorted(entries) if i != 970]
            with _stage(say, f"[4/5] fine-tuning from {checkpoint.name} and training from scratch on {len(targets)} "
                             f"targets ({'/'.join(map(str, settings.target_budgets()))} epochs x "
                             f"{settings.iterations_per_epoch} iterations each{_snapshots_said(settings)}), "
                             f"fine-tuning {targets[0].name} with recipe {settings.extra_recipe} too, then "
                             "evaluating on the held-out cases"):
                _run_targets(settings, targets, registry_file, checkpoint, device)
            with _stage(say, "[5/5] collecting the results and writing the report"):
                tables, report = _results(out, paths, registry_file, settings)
        return DemoResult(out, report, tables, time.time() - started)


def _snapshots_said(settings: DemoSettings) -> str:
    return f", kept after {'/'.join(map(str, settings.snapshots))} % of each" if settings.snapshots else ""


@contextlib.contextmanager
def _stage(say: Callable[[str], None], title: str) -> Iterator[None]:
    """Announce a stage, and when it ends, how long it took."""
    say(title)
    started = time.time()
    yield
    say(f"      done in {time.time() - started:.0f} s")


@contextlib.contextmanager
def _demo_threads() -> Iterator[None]:
    """Every demo process computes with `DEMO_THREADS` threads: this one sets them here, the batch workers
    themselves (`ExecutionOptions.threads`). The environment reaches the processes the demo starts, and this one's
    OpenMP where torch is not loaded yet (the command line). The environment and the thread count are restored
    afterwards."""
    saved = dict(os.environ)
    os.environ["OMP_NUM_THREADS"] = str(DEMO_THREADS)  # for processes that set none (nnU-Net's planning pools)
    os.environ["nnUNet_def_n_proc"] = str(DEMO_THREADS)  # nnU-Net's prediction and export threads (else up to 8)
    # A thread that reaches the end of a parallel region first sleeps rather than spins. A spinning thread (libgomp's
    # default) holds a core its partner needs: beside other work (load 4.5 on 2 cores) a training iteration of the
    # demo's network took 2.8 s instead of 0.5 s (docs/benchmarks.md). How threads wait does not change what they
    # compute. libgomp reads it once, when torch loads.
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(DEMO_THREADS)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
        torch.set_num_threads(threads)


@contextlib.contextmanager
def _isolated(out: Path) -> Iterator[Paths]:
    """Point segbook and nnU-Net at folders inside the demo's output, whatever the user has configured; the
    environment is restored afterwards."""
    saved = dict(os.environ)
    os.environ["SEGBOOK_HOME"] = str(out / "home")
    for variable in ("SEGBOOK_REGISTRY", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.environ.pop(variable, None)
    os.environ["nnUNet_n_proc_DA"] = "0"  # augmentation in the training process: deterministic, light on 2 cores
    paths = Paths.from_env()
    paths.export()
    try:
        yield paths
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _write_tasks(out: Path, settings: DemoSettings) -> tuple[Path, dict]:
    from segbook.registry import load_registry

    specs = demo_specs(settings)
    records = []
    for dataset_id, spec in specs.items():
        record = registry_entry(spec, dataset_id)
        record.update(scale_thresholds=list(DEMO_SCALE_THRESHOLDS), citation="segbook demo (synthetic)")
        records.append(record)
    registry_file = write_registry_file(out / "demo_registry.yaml", *records)
    registry = load_registry([registry_file])
    return registry_file, {dataset_id: registry.get(f"Dataset{dataset_id}") for dataset_id in specs}


def _import_and_plan(out: Path, settings: DemoSettings, entries: dict, paths: Paths) -> None:
    from segbook.data.importer import import_dataset
    from segbook.plan import plan_task

    specs = demo_specs(settings)
    for dataset_id, entry in entries.items():
        written = write_synthetic_dataset(specs[dataset_id], out / "sources", layout="v1", dataset_id=dataset_id)
        import_dataset(entry, written.path, paths, progress=False)
        # The demo's volumes are tiny: nnU-Net's default 1e8 intensity samples would dominate the planning time.
        plan_task(entry, paths, num_processes=1, progress=False, fingerprint_samples=100_000)


def _pretrain(out: Path, settings: DemoSettings, source, paths: Paths, device: str) -> Path:
    """Train the source task from scratch in its own results folder, then export it like the released weights."""
    from segbook.training.checkpoints import read_run_checkpoint
    from segbook.training.finetune import finetune
    from segbook.training.settings import TrainingSettings
    from stunet.checkpoints import write_official_checkpoint

    pretraining = replace(paths, results=out / "pretraining")
    budget = TrainingSettings(epochs=settings.pretrain_epochs, iterations_per_epoch=settings.iterations_per_epoch,
                              val_iterations_per_epoch=1, checkpoint_every=10)
    log = out / "pretraining.log"
    with open(log, "a") as stream, contextlib.redirect_stdout(_ProgressFilter(stream, sys.stdout)), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecations inside nnU-Net's trainer lookup: noise here
        run = finetune(source, settings.model, pretrained=False, settings=budget, device=device,
                       paths=pretraining, resume=True)
    paths.export()  # back to the demo's results folder
    weights = read_run_checkpoint(run.folder / "checkpoint_final.pth")  # the output folder is untrusted too
    return write_official_checkpoint(weights["network_weights"],
                                     out / "weights" / f"{settings.model}_demo_source.model",
                                     epoch=settings.pretrain_epochs)


class _ProgressFilter:
    """Sends nnU-Net's chatter to the log file and every `every`-th of segbook's epoch summaries to the console."""

    EPOCH = re.compile(r"^\[segbook\] epoch (\d+)/(\d+)")

    def __init__(self, log, console, every: int = 10):
        self.log, self.console, self.every = log, console, every

    def write(self, text: str) -> int:
        self.log.write(text)
        epoch = self.EPOCH.match(text)
        if epoch and (int(epoch[1]) % self.every == 0 or epoch[1] == epoch[2]):
            self.console.write(f"      {text}\n")
            self.console.flush()
        return len(text)

    def flush(self) -> None:
        self.log.flush()


def _run_targets(settings: DemoSettings, targets: list, registry_file: Path, checkpoint: Path, device: str) -> None:
    from segbook.batch.execute import ExecutionOptions
    from segbook.batch.local import LocalOptions, run_local
    from segbook.batch.matrix import build_matrix
    from segbook.registry import load_registry
    from segbook.training.settings import TrainingSettings

    registry = load_registry([registry_file])
    jobs = build_matrix(registry, tasks=[t.key for t in targets], models=[settings.model],
                        inits=["pretrained", "scratch"], folds=["all"], budgets=list(settings.budgets) or None)
    jobs += build_matrix(registry, tasks=[targets[0].key], models=[settings.model], inits=["pretrained"],
                         recipes=[settings.extra_recipe], folds=["all"])
    budget = TrainingSettings(epochs=settings.target_epochs, iterations_per_epoch=settings.iterations_per_epoch,
                              val_iterations_per_epoch=1, checkpoint_every=5, snapshots=list(settings.snapshots))
    finetuning = replace(budget, lr=settings.finetune_lr)
    # One process per job: on volumes this small, nnU-Net's prediction and export workers cost more than they save.
    options = ExecutionOptions.create(registry_files=[registry_file], weights=checkpoint, settings=budget,
                                      pretrained_settings=finetuning, device=device, processes=1, threads=DEMO_THREADS)
    run_local(jobs, options, LocalOptions(workers=1))


def _results(out: Path, paths: Paths, registry_file: Path, settings: DemoSettings) -> tuple[dict, Path]:
    from segbook.registry import load_registry
    from segbook.results import ALL_RECIPES, build_table, collect_results, write_report

    frame = collect_results(paths, load_registry([registry_file]), recipes=[ALL_RECIPES])
    tables = {name: build_table(frame, name, metric="dice", recipes=["segbook"])
              for name in ("scale", "modality-target")}
    tables["recipes"] = build_table(frame, "recipes", metric="dice")
    if len(settings.target_budgets()) > 1:  # does a shorter budget give the same answer?
        tables["budgets"] = build_table(frame, "budgets", metric="dice", recipes=["segbook"])
    if settings.snapshots:
        tables["curves"] = build_table(frame, "curves", metric="dice", recipes=["segbook"])
    report = write_report(frame, out / "report.html", title="segbook demo (synthetic data, toy scale)",
                          description="Synthetic tasks and toy budgets: these numbers demonstrate the machinery, "
                                      "not the benefit of pretraining on real data.")
    return tables, report
