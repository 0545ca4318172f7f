"""Budgets as an axis: each budget (epochs) is a run of its own, named `_ep{E}` unless it is the recipe's, trained
at its budget, estimated per budget by `batch plan`, and never averaged with another budget in the results; bad
budgets are refused before anything is written."""

from __future__ import annotations

import json

import pytest
from helpers import planned_tiny_task, run_segbook, tiny_spec, use_planned_task
from results_helpers import A, write_registry
from store_helpers import write_evaluated_run

from segbook.batch.execute import ExecutionOptions
from segbook.batch.forecast import forecast
from segbook.batch.matrix import build_matrix, job_from_id, several_variants
from segbook.cli.main import main
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.results import collect_results
from segbook.results.collect import ResultsWarning
from segbook.results.scores import dataset_scores
from segbook.results.selection import TableError
from segbook.runs import Identity, RunIdentityError, RunSpec, named_budget, parse_budgets
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings

# --- names and parsing --------------------------------------------------------------------------------------------


def test_budgets_are_parsed_either_way_and_bad_or_repeated_ones_refused():
    assert parse_budgets(["50", "150,1000"]) == [50, 150, 1000] and parse_budgets([7]) == [7]
    for bad in (["0"], ["-5"], ["1.5"], ["x"], ["150", "150"], [], ["100001"], [True]):
        with pytest.raises(RunIdentityError, match="--budgets"):
            parse_budgets(bad)


def test_the_recipes_budget_keeps_the_name_and_another_is_spelled_and_parsed_back():
    assert named_budget(1000, 1000) is None and named_budget(None, 1000) is None and named_budget(150, 1000) == 150
    assert Identity("large", "pretrained").trainer == "SegbookTrainer_large_pretrained"
    identity = Identity("large", "pretrained", "llrd", 1, 0.25, 150)
    assert identity.trainer == "SegbookTrainer_large_pretrained_llrd_seed1_frac25_ep150"
    assert Identity.from_trainer(identity.trainer) == identity
    assert Identity.from_trainer("SegbookTrainer_large_scratch_ep50") == Identity("large", "scratch", budget=50)
    for name in ("SegbookTrainer_large_scratch_ep0", "SegbookTrainer_large_scratch_ep050",
                 "SegbookTrainer_large_scratch_ep50_seed1", "SegbookTrainer_large_scratch_ep50_ep60"):
        assert Identity.from_trainer(name) is None, name
    with pytest.raises(RunIdentityError, match="not seedN, fracN or epN"):
        Identity("large", "pretrained", "ep150")
    with pytest.raises(RunIdentityError, match="budget must be"):
        Identity("large", "pretrained", budget=0)
    record = {"model": "large", "init": "pretrained", "recipe": "segbook", "seed": 0, "fraction": 1.0}
    assert Identity.from_record(record).budget is None  # written before budgets existed: the recipe's
    assert Identity.from_record({**record, "budget": 150}).budget == 150


def test_the_matrix_expands_budgets_naming_the_recipes_own_as_before(segbook_home):
    registry = load_registry()
    jobs = build_matrix(registry, "613", models="large", inits="pretrained,scratch", budgets=["150", "1000"])
    assert len(jobs) == 4 and several_variants(jobs)
    ids = {j.id for j in jobs}
    assert ids == {"Task613_COVID-19-20__large__pretrained__ep150__fold_all",
                   "Task613_COVID-19-20__large__pretrained__fold_all",
                   "Task613_COVID-19-20__large__scratch__ep150__fold_all",
                   "Task613_COVID-19-20__large__scratch__fold_all"}
    for job in jobs:
        assert job_from_id(registry, job.id).spec == job.spec
    assert not several_variants(build_matrix(registry, "613", models="large", inits="scratch", budgets=["1000"]))
    spec = RunSpec.of(registry.get("613"), "large", True, budget=150)
    assert spec.folder(segbook_home).parent.name.startswith("SegbookTrainer_large_pretrained_ep150__")


@pytest.mark.parametrize("command", [["finetune", "--task", "613", "--model", "large", "--pretrained"],
                                     ["batch", "plan", "--tasks", "613"], ["batch", "run", "--tasks", "613"],
                                     ["batch", "status", "--tasks", "613"],
                                     ["evaluate", "--task", "613", "--model", "large", "--pretrained"]])
@pytest.mark.parametrize("values,message", [(["0"], "a budget is a whole number of epochs"),
                                            (["12.5"], "a budget is a whole number of epochs"),
                                            (["150", "150"], "150 given more than once")])
def test_bad_budgets_are_refused_before_anything_is_written(segbook_home, capsys, command, values, message):
    code = main([*command, "--budgets", *values])
    error = capsys.readouterr().err
    assert code == 2 and "segbook: error: --budgets: " in error and message in error and "Traceback" not in error
    assert not segbook_home.exists()


@pytest.mark.parametrize("command", [["finetune", "--task", "613", "--model", "large", "--pretrained"],
                                     ["batch", "run", "--tasks", "613"]])
def test_budgets_beside_epochs_are_refused(segbook_home, capsys, command):
    code = main([*command, "--budgets", "50", "--epochs", "20"])
    error = capsys.readouterr().err
    assert code == 2 and "--budgets and --epochs" in error and "Traceback" not in error
    assert not segbook_home.exists()


# --- results -----------------------------------------------------------------------------------------------------

@pytest.fixture
def store(segbook_home, tmp_path):
    return Paths.from_env(), load_registry([write_registry(tmp_path / "registry.yaml")])


def test_two_budgets_of_one_configuration_are_two_cells_and_a_frame_mixing_them_is_refused(store):
    paths, registry = store
    for init, dice in (("pretrained", 0.8), ("scratch", 0.7)):
        write_evaluated_run(paths.results, registry, A, "base", init, dice)
        write_evaluated_run(paths.results, registry, A, "base", init, dice - 0.3, budget=150)
    frame = collect_results(paths, registry)
    assert frame["evaluated"].all() and sorted(frame["budget"]) == [150, 150, 1000, 1000]
    scores = dataset_scores(frame).set_index(["init", "budget"])["score"]
    assert scores.to_dict() == pytest.approx({("pretrained", 1000): 0.8, ("pretrained", 150): 0.5,
                                              ("scratch", 1000): 0.7, ("scratch", 150): 0.4}, abs=0.02)
    assert frame.groupby("budget")["variant"].nunique().to_dict() == {150: 1, 1000: 1}
    assert frame.loc[frame["budget"] == 150, "variant"].iloc[0] != frame.loc[frame["budget"] == 1000, "variant"].iloc[0]
    mixed = frame.assign(variant="", fingerprint="same")  # put together by hand: one cell of two budgets
    with pytest.raises(TableError, match="runs with different budgets are never averaged"):
        dataset_scores(mixed)


def test_a_run_whose_record_trains_another_budget_than_its_name_is_left_out(store):
    paths, registry = store
    write_evaluated_run(paths.results, registry, A, "base", "scratch", 0.7, budget=150, settings={"epochs": 1000})
    with pytest.warns(ResultsWarning):
        (row,) = collect_results(paths, registry).to_dict("records")
    assert not row["evaluated"] and row["status"] == "run.json trains 1000 epochs, not the 150 its name says"


# --- training, estimates and results ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    with planned_tiny_task(tmp_path_factory.mktemp("budgets"), tiny_spec(cases=10), dataset_id=993) as task:
        yield task


@pytest.mark.slow
def test_two_budgets_are_two_runs_estimated_trained_and_kept_apart(task, tmp_path, monkeypatch):
    """`batch plan` costs each budget at its epochs; `batch run` trains each as its own run at its budget; the
    results give each budget its own cell (a different variant and `budget`), never one averaged over both."""
    paths = use_planned_task(task, tmp_path, monkeypatch)
    selection = ["--registry", str(task.registry_file), "--tasks", task.entry.key, "--models", "tiny", "--init",
                 "scratch", "--budgets", "1", "2"]
    plan = json.loads(run_segbook("batch", "plan", *selection, "--iters-per-epoch", "2", "--format",
                                  "json").stdout)
    assert sorted(row["budget"] for row in plan["jobs"]) == [1, 2]
    assert [(row["budget_epochs"], row["jobs"]) for row in plan["budgets"]] == [(1, 1), (2, 1)]
    registry = load_registry([task.registry_file])
    jobs = build_matrix(registry, task.entry.key, models="tiny", inits="scratch", budgets=[1, 2])
    options = ExecutionOptions.create(settings=TrainingSettings(iterations_per_epoch=2))
    estimates = {cost.estimate.epochs: cost.estimate for cost in forecast(jobs, options).jobs}
    assert estimates[2].training_flops == pytest.approx(2 * estimates[1].training_flops) and \
        estimates[1].training_flops > 0  # same network and patch: twice the epochs, twice the training
    run_segbook("batch", "run", *selection, "--device", "cpu", "--workers", "1", "--iters-per-epoch", "2",
                "--val-iters-per-epoch", "1")
    for job, epochs in zip(jobs, (1, 2)):
        manifest = RunManifest.load(job.folder(paths))
        assert manifest.status == "finished" and len(manifest.data["epochs"]) == epochs
        assert manifest.settings.epochs == epochs and manifest.data["run"]["budget"] == epochs
        assert job.spec.trainer.endswith(f"_ep{epochs}")
    evaluated = run_segbook("evaluate", "--registry", str(task.registry_file), "--task", task.entry.key, "--model",
                            "tiny", "--budgets", "1,2", "--device", "cpu").stdout  # finds both runs, evaluated
    assert [line.split()[3] for line in evaluated.splitlines() if line.startswith("up to date")] == \
        [str(job.folder(paths) / "evaluation") for job in jobs]
    frame = collect_results(registry=registry)
    runs = frame[frame["evaluated"]].set_index("budget")
    assert sorted(runs.index) == [1, 2]
    assert runs.loc[1, "variant"] != runs.loc[2, "variant"]  # two cells of one (model, init, recipe)
    scores = dataset_scores(frame).set_index("variant")["score"]
    assert len(scores) == 2
    for budget in (1, 2):
        assert scores[runs.loc[budget, "variant"]] == pytest.approx(runs.loc[budget, "dice"])


@pytest.mark.parametrize("arguments, says", [
    (["--budgets", "0"], "--budgets: a budget is a whole number of epochs"),
    (["--budgets", "5", "5"], "--budgets: 5 given more than once"),
    (["--budgets", "4", "8", "--snapshots", "50", "50"], "--snapshots: 50 given more than once"),
    (["--budgets", "2", "8", "--snapshots", "75"], "--snapshots 75: falls on the last epoch of a budget of 2"),
])
def test_the_demo_refuses_budgets_and_snapshots_it_cannot_run_before_writing_anything(tmp_path, arguments, says):
    out = tmp_path / "demo"
    result = run_segbook("demo", "--out", str(out), *arguments, check=False)
    assert result.returncode == 2 and f"segbook: error: {says}" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
