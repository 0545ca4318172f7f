"""The study planner (`segbook batch plan --gpu-hours N`, issue 26): the sub-study fits N and covers every stratum
it can, pretrained and scratch stay paired, its expected precision is a bootstrap over the store's Delta(PT), a
budget too small is refused naming the cheapest feasible figure, and its job file runs through `batch run --jobs`
(a rehearsal: nothing trains) while a bad job file is refused before anything starts."""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import segbook.cli.batch
from segbook.batch.execute import ExecutionOptions
from segbook.batch.forecast import forecast
from segbook.batch.matrix import MatrixError, build_matrix, read_job_file, write_job_file
from segbook.batch.planner import PRECISION_SEED, REPLICATES, PlanError, choose, plan_study, stratum_of
from segbook.batch.rehearsal import REHEARSAL
from segbook.cli.main import main
from segbook.data.folders import raw_folder
from segbook.data.importer import dataset_json
from segbook.io import atomic_write_json
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.results.collect import import_results
from segbook.runs import summary_path


def _paths(folder: Path) -> Paths:
    return Paths(home=folder / "home", raw=folder / "raw", preprocessed=folder / "pre", results=folder / "results")


@pytest.fixture(scope="module")
def mri(tmp_path_factory):
    """The MRI datasets x (base pretrained and scratch, nnU-Net scratch), costed in an empty store."""
    registry = load_registry()
    paths = _paths(tmp_path_factory.mktemp("planner"))
    jobs = build_matrix(registry, "all", modality="MRI", models="base,nnunet")
    return registry, paths, forecast(jobs, ExecutionOptions(), paths)


def _dataset_costs(plan) -> dict[str, float]:
    """Each dataset's GPU-hours left, summed by hand from the forecast."""
    costs: dict[str, list[float]] = {}
    for cost in plan.jobs:
        costs.setdefault(cost.status.job.entry.key, []).append(cost.left_gpu_hours)
    return {key: math.fsum(hours) for key, hours in costs.items()}


@pytest.mark.parametrize("share", [0.02, 0.1, 0.3, 1.0])
def test_the_chosen_study_fits_covers_every_stratum_it_can_and_keeps_pairs(mri, share):
    registry, _, plan = mri
    costs = _dataset_costs(plan)
    budget = share * math.fsum(costs.values())
    study = choose(plan, budget)
    chosen = {job.entry.key for job in study.jobs}
    assert sum(costs[key] for key in chosen) == pytest.approx(study.gpu_hours) and study.gpu_hours <= budget

    # As many strata as any choice could cover: the cheapest datasets of the cheapest strata, counted by hand.
    cheapest: dict[tuple, float] = {}
    for key, hours in costs.items():
        stratum = stratum_of(registry.get(key))
        cheapest[stratum] = min(hours, cheapest.get(stratum, math.inf))
    coverable = max(k for k in range(len(cheapest) + 1) if sum(sorted(cheapest.values())[:k]) <= budget)
    assert len({stratum_of(registry.get(key)) for key in chosen}) == coverable > 0
    assert coverable == len(cheapest) or share < 1.0
    # Nothing left out still fits, and a chosen dataset brings every one of its jobs, so each pretrained job has
    # its network's scratch job.
    assert all(hours > budget - study.gpu_hours for key, hours in costs.items() if key not in chosen)
    assert {j.id for j in study.jobs} == {c.status.job.id for c in plan.jobs if c.status.job.entry.key in chosen}
    specs = {(j.entry.key, j.spec.model, j.spec.init) for j in study.jobs}
    assert all((task, model, "scratch") in specs for task, model, init in specs if init == "pretrained")
    rows = {(s.stratum, s.row()["datasets"]) for s in study.strata}
    assert len(rows) == len(cheapest) and sum(len(s.chosen) for s in study.strata) == len(chosen)
    if share == 1.0:
        assert chosen == set(costs) and f"covering {len(cheapest)} of {len(cheapest)} strata" in study.summary()[0]


def test_a_budget_that_fits_no_stratum_is_refused_naming_the_cheapest_feasible_figure(mri, monkeypatch, capsys,
                                                                                      tmp_path):
    registry, paths, plan = mri
    least = min(_dataset_costs(plan).values())
    with pytest.raises(PlanError, match="cheapest feasible figure is") as refused:
        choose(plan, least * 0.99)
    figure = float(str(refused.value).split("figure is ")[1].split()[0])
    assert least <= figure < least + 0.01 and len(choose(plan, figure).jobs) == 3

    for name, value in (("SEGBOOK_HOME", paths.home), ("nnUNet_raw", paths.raw),
                        ("nnUNet_preprocessed", paths.preprocessed), ("nnUNet_results", paths.results)):
        monkeypatch.setenv(name, str(value))
    written = tmp_path / "jobs.txt"
    code = main(["batch", "plan", "--tasks", "004", "--models", "base", "--gpu-hours", "0.0001",
                 "--write-jobs", str(written)])
    err = capsys.readouterr().err
    assert code == 2 and "segbook: error: --gpu-hours 0.0001 fits no stratum: the cheapest feasible figure is" in err
    assert not written.exists()
    for options, said in ((["--write-jobs", str(written)], "give --gpu-hours N"),
                          (["--gpu-hours", "5", "--write-jobs", str(tmp_path / "no" / "jobs.txt")],
                           "its folder does not exist")):
        assert main(["batch", "plan", "--tasks", "004", *options]) == 2 and said in capsys.readouterr().err
    assert not written.exists()


def test_the_expected_precision_is_a_bootstrap_of_the_stores_delta_over_the_datasets_chosen(mri, tmp_path):
    registry, paths, plan = mri
    small = [e.key for e in registry.select(modality="MRI", scale="small")]
    scores = {task: (0.70 + 0.01 * i, 0.70 + 0.01 * i - 0.02 * (i % 4) + 0.005) for i, task in enumerate(small)}
    published = tmp_path / "published.csv"
    published.write_text("task,model,init,dice\n" + "".join(
        f"{task},base,pretrained,{pt}\n{task},base,scratch,{sc}\n" for task, (pt, sc) in scores.items()))
    import_results(published, registry, paths)

    budget = 0.3 * sum(_dataset_costs(plan).values())
    study = plan_study(plan, budget, paths, registry)
    chosen = study.chosen_per_scale()
    (precision,) = [p for p in study.precision if p.scale == "small"]
    assert precision.datasets == chosen["small"] > 1 and precision.observed == len(small)

    # Independently: the observed Delta(PT) in points, n of them resampled REPLICATES times with the seeded
    # generator, the 2.5th and 97.5th percentiles of the means (numpy's linear = statistics' inclusive).
    deltas = [100 * (pt - sc) for pt, sc in scores.values()]
    draws = np.random.default_rng(PRECISION_SEED).integers(0, len(deltas), size=(REPLICATES, chosen["small"]))
    means = [sum(deltas[i] for i in row) / len(row) for row in draws]
    cuts = statistics.quantiles(means, n=40, method="inclusive")
    assert precision.half_width == pytest.approx((cuts[-1] - cuts[0]) / 2, rel=1e-9)
    assert 0 < precision.half_width < max(deltas) - min(deltas)
    # Fewer datasets, a wider interval; groups the store has nothing on are unknown.
    fewer = plan_study(plan, 0.1 * sum(_dataset_costs(plan).values()), paths, registry)
    (narrow,) = [p for p in fewer.precision if p.scale == "small"]
    assert narrow.datasets < precision.datasets and narrow.half_width > precision.half_width
    others = [p for p in study.precision if p.scale != "small"]
    assert others and all(p.half_width is None and p.why.startswith("unknown") for p in others)


def _home(tmp_path: Path, monkeypatch) -> Paths:
    paths = _paths(tmp_path)
    for name, value in (("SEGBOOK_HOME", paths.home), ("nnUNet_raw", paths.raw),
                        ("nnUNet_preprocessed", paths.preprocessed), ("nnUNet_results", paths.results)):
        monkeypatch.setenv(name, str(value))
    return paths


def test_a_bad_job_file_is_refused_line_by_line_before_anything_starts(tmp_path, monkeypatch, capsys):
    paths = _home(tmp_path, monkeypatch)
    registry = load_registry()
    jobs = build_matrix(registry, "004", models="base")
    good = tmp_path / "good.txt"
    write_job_file(good, jobs, ["a header"])
    assert good.read_text().startswith("# a header\n") and [j.id for j in read_job_file(registry, good)] == \
        [j.id for j in jobs]
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{jobs[0].id}\nnot a job\nTask004_Hippocampus__nnunet__pretrained__fold_all\n"
                   f"Task999999_Nowhere__base__scratch__fold_all\n\n{jobs[0].id}\n")
    with pytest.raises(MatrixError) as refused:
        read_job_file(registry, bad)
    message = str(refused.value)
    assert "4 bad line(s)" in message and all(f"line {n}:" in message for n in (2, 3, 4, 6))
    (tmp_path / "empty.txt").write_text("# nothing\n")
    for file in (bad, tmp_path / "empty.txt", tmp_path / "missing.txt"):
        assert main(["batch", "run", "--jobs", str(file), "--device", "cpu"]) == 2
        assert capsys.readouterr().err.startswith("segbook: error:")
    assert main(["batch", "status", "--jobs", str(good), "--models", "base", "--seeds", "1"]) == 2
    assert "lists the jobs: leave out --models, --seeds, which pick jobs" in capsys.readouterr().err
    assert main(["batch", "status", "--jobs", str(good), "--format", "json"]) == 0
    assert "Task004_Hippocampus__base__scratch__fold_all" in capsys.readouterr().out
    assert not paths.results.exists() and not (paths.home / "batch").exists()


def test_the_written_job_list_runs_through_batch_run_jobs(tmp_path, monkeypatch, capsys):
    """The planner's job file, run as a rehearsal (`segbook.batch.rehearsal`: nothing trains): exactly its jobs
    end done, the other dataset's jobs are untouched. Scratch jobs only: a pretrained one would need a real
    checkpoint, which `batch run` checks before it starts anything."""
    paths = _home(tmp_path, monkeypatch)
    registry = load_registry()
    tasks = ["004", "720"]
    for task in tasks:
        entry = registry.get(task)
        atomic_write_json(raw_folder(entry, paths) / "dataset.json",
                          dataset_json(entry, entry.train_cases, entry.test_cases))
    selection = {"models": "base,nnunet", "inits": "scratch"}
    plan = forecast(build_matrix(registry, ",".join(tasks), **selection), ExecutionOptions(), paths)
    cheaper = min(_dataset_costs(plan).values())
    file = tmp_path / "chosen.txt"
    assert main(["batch", "plan", "--tasks", ",".join(tasks), "--models", "base,nnunet", "--init", "scratch",
                 "--gpu-hours",
                 f"{cheaper * 1.01}", "--write-jobs", str(file)]) == 0
    out = capsys.readouterr().out
    assert "chose 1 of 2 datasets (2 jobs" in out and f"wrote 2 jobs to {file}" in out
    listed = read_job_file(registry, file)
    assert {j.spec.model for j in listed} == {"base", "nnunet"} and len({j.entry.key for j in listed}) == 1

    options = segbook.cli.batch._options
    monkeypatch.setattr(segbook.cli.batch, "_options", lambda args, backend: replace(options(args, backend),
                                                                                     body=REHEARSAL))
    assert main(["batch", "run", "--jobs", str(file), "--device", "cpu"]) == 0
    for job in build_matrix(registry, ",".join(tasks), **selection):
        evaluated = summary_path(job.folder(paths)).is_file()
        assert evaluated == (job.id in {j.id for j in listed}), job.id
