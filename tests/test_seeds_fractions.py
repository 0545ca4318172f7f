"""Seeds and training fractions: a run's seed drives its training (same seed, same run on the CPU), its fraction
picks a fixed, nested subset of its training cases; both expand the batch matrix and are checked before anything is
written."""

from __future__ import annotations

import json
import random

import pytest
import torch
from helpers import planned_tiny_task, run_segbook, tiny_spec

from segbook.batch.matrix import build_matrix, job_from_id, several_variants
from segbook.cli.main import main
from segbook.data.subsets import MIN_TRAINING_CASES, SubsetError, subset_order, training_subset
from segbook.errors import SegbookError
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.runs import BASE_RNG_SEED, RunIdentityError, RunSpec, parse_fractions, parse_seeds
from segbook.training.checkpoints import read_run_checkpoint
from segbook.training.finetune import RunExistsError, finetune
from segbook.training.manifest import RunManifest
from segbook.training.settings import TrainingSettings

TINY = TrainingSettings(epochs=1, iterations_per_epoch=3, val_iterations_per_epoch=1, checkpoint_every=1)
FRACTIONS = (0.01, 0.05, 0.1, 0.125, 0.2, 0.25, 0.33, 0.5, 0.75, 0.9, 1.0)


# --- subsets ------------------------------------------------------------------------------------------------------

def test_subsets_are_nested_sized_as_stated_and_independent_of_the_input_order():
    """Over many made-up datasets (ids drawn by seeded generators) and sizes: each fraction's cases contain the
    smaller fractions', number ceil(f x N) but at least the minimum, and do not depend on how the ids are listed."""
    for draw in range(60):
        generator = random.Random(draw)
        size = generator.choice([MIN_TRAINING_CASES, 3, 5, 7, 10, 24, 30, 61, 100, 257])
        ids = [f"{generator.choice(['case', 'pat', 'BraTS'])}_{generator.randrange(10**6):06d}_{i}"
               for i in range(size)]
        previous: set[str] = set()
        for fraction in FRACTIONS:
            subset = training_subset(ids, fraction)
            cases = set(subset.cases)
            wanted = -(-round(fraction * 100 * size) // 100)  # ceil in integers
            assert len(cases) == min(size, max(MIN_TRAINING_CASES, wanted)), (size, fraction)
            assert subset.minimum_applied == (wanted < MIN_TRAINING_CASES and fraction < 1)
            assert previous <= cases <= set(ids)
            assert training_subset(generator.sample(ids, len(ids)), fraction) == subset
            previous = cases
        assert previous == set(ids)


def test_a_case_keeps_its_rank_when_others_come_or_go_and_rounding_is_on_the_percentage():
    ids = [f"case_{i:03d}" for i in range(40)]
    order = subset_order(ids)
    assert subset_order(ids[:25]) == [case for case in order if case in set(ids[:25])]
    assert len(training_subset([f"c{i}" for i in range(30)], 0.1).cases) == 3  # 0.1 * 30 is 3.0000000000000004
    assert len(training_subset([f"c{i}" for i in range(10)], 0.25).cases) == 3  # 2.5 rounds up


def test_too_few_cases_for_a_fraction_is_an_error_and_the_record_says_what_was_taken():
    with pytest.raises(SubsetError, match=f"at least {MIN_TRAINING_CASES} cases"):
        training_subset(["only_one"], 0.5)
    assert training_subset(["only_one"], 1.0).cases == ("only_one",)
    record = training_subset([f"c{i}" for i in range(12)], 0.05).record()  # 0.6 cases
    assert record["count"] == MIN_TRAINING_CASES and record["minimum_applied"] and record["available"] == 12
    assert record["cases"] == sorted(record["cases"]) and record["fraction"] == 0.05


# --- seeds, fractions and job ids ---------------------------------------------------------------------------------

def test_seeds_and_fractions_are_parsed_either_way_and_bad_or_repeated_ones_refused():
    assert parse_seeds(["0", "1,2"]) == [0, 1, 2] and parse_seeds([3]) == [3]
    assert parse_fractions(["0.1", "0.25,1"]) == [0.1, 0.25, 1.0]
    for bad in (["-1"], ["1.5"], ["x"], ["0", "0"], []):
        with pytest.raises(RunIdentityError, match="--seeds"):
            parse_seeds(bad)
    for bad in (["0"], ["1.5"], ["-0.5"], ["nan"], ["0.12345"], ["0.5", "0.50"]):
        with pytest.raises(RunIdentityError, match="--fractions"):
            parse_fractions(bad)


def test_the_matrix_expands_seeds_and_fractions_and_job_ids_name_them(segbook_home):
    registry = load_registry()
    jobs = build_matrix(registry, "613", models="large", inits="pretrained,scratch", seeds=["0", "1", "2"],
                        fractions=["0.1", "0.25", "1"])
    assert len(jobs) == 2 * 3 * 3 and several_variants(jobs)
    assert {(j.spec.init, j.spec.seed, j.spec.fraction) for j in jobs} == \
        {(i, s, f) for i in ("pretrained", "scratch") for s in (0, 1, 2) for f in (0.1, 0.25, 1.0)}
    ids = {j.id for j in jobs}
    assert "Task613_COVID-19-20__large__pretrained__seed1__frac25__fold_all" in ids
    assert "Task613_COVID-19-20__large__scratch__fold_all" in ids  # seed 0 and fraction 1 keep the old id
    for job in jobs:
        again = job_from_id(registry, job.id)
        assert again.spec == job.spec and again.spec.folder(segbook_home) == job.spec.folder(segbook_home)
    assert not several_variants(build_matrix(registry, "613", models="large", inits="scratch"))
    with pytest.raises(RunIdentityError, match="--fractions"):
        build_matrix(registry, "613", models="large", fractions=["0"])


def test_the_random_seed_of_seed_0_is_the_one_runs_had_before():
    spec = RunSpec.of(load_registry().get("613"), "large", True)
    assert spec.identity.rng_seed == BASE_RNG_SEED == 12345
    assert RunSpec.of(load_registry().get("613"), "large", True, seed=3).identity.rng_seed == 12348


@pytest.mark.parametrize("command", [["finetune", "--task", "613", "--model", "large", "--pretrained"],
                                     ["batch", "plan", "--tasks", "613"], ["batch", "run", "--tasks", "613"],
                                     ["batch", "status", "--tasks", "613"], ["batch", "submit", "--tasks", "613"],
                                     ["batch", "retry", "--failed", "--tasks", "613"],
                                     ["evaluate", "--task", "613", "--model", "large", "--pretrained"]])
@pytest.mark.parametrize("option,values,message", [
    ("--fractions", ["0"], "a training fraction is a number in (0, 1]"),
    ("--fractions", ["1.5"], "a training fraction is a number in (0, 1]"),
    ("--fractions", ["0.5", "0.5"], "0.5 given more than once"),
    ("--seeds", ["-1"], "a seed is an integer in [0, "),
    ("--seeds", ["1", "1"], "1 given more than once")])
def test_bad_seeds_and_fractions_are_refused_before_anything_is_written(segbook_home, capsys, command, option,
                                                                        values, message):
    code = main([*command, option, *values])
    error = capsys.readouterr().err
    assert code == 2 and f"segbook: error: {option}: " in error and message in error and "Traceback" not in error
    assert not segbook_home.exists()


def test_help_states_the_minimum_of_cases(capsys):
    with pytest.raises(SystemExit):
        main(["finetune", "--help"])
    assert f"at least {MIN_TRAINING_CASES} cases" in " ".join(capsys.readouterr().out.split())


# --- training -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """A planned tiny task of 12 cases (10 train); augmentation in the training process (nnUNet_n_proc_DA=0)."""
    with planned_tiny_task(tmp_path_factory.mktemp("seeds"), tiny_spec(cases=12), dataset_id=992) as task:
        yield task


def _train(task, results, monkeypatch, seed: int = 0, fraction: float = 1.0, **options):
    monkeypatch.setenv("nnUNet_results", str(results))
    return finetune(task.entry, "tiny", pretrained=True, weights=task.weights, settings=TINY, device="cpu",
                    seed=seed, fraction=fraction, **options)


def _weights(run) -> dict[str, torch.Tensor]:
    return read_run_checkpoint(run.folder / "checkpoint_final.pth")["network_weights"]


def _losses(run) -> list[tuple[float, float]]:
    lines = (run.folder / "epochs.jsonl").read_text().splitlines()
    return [(record["train_loss"], record["val_loss"]) for record in map(json.loads, lines)]


@pytest.mark.slow
def test_the_same_seed_trains_the_same_run_and_another_seed_another(task, tmp_path, monkeypatch):
    """Exact on the CPU with augmentation in the training process (what `nnUNet_n_proc_DA=0` asks nnU-Net for):
    the fresh heads, the sampled patches and their augmentation all follow the run's seed."""
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    first = _train(task, tmp_path / "a", monkeypatch)
    second = _train(task, tmp_path / "b", monkeypatch)
    other = _train(task, tmp_path / "c", monkeypatch, seed=1)
    assert first.status == second.status == other.status == "finished"
    assert first.manifest.data["rng_seed"] == 12345 and other.manifest.data["rng_seed"] == 12346
    assert other.folder.parent.name.startswith("SegbookTrainer_tiny_pretrained_seed1__")
    a, b, c = _weights(first), _weights(second), _weights(other)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(first) == _losses(second)
    assert any(not torch.equal(a[k], c[k]) for k in a) and _losses(first) != _losses(other)


@pytest.mark.slow
def test_one_augmentation_worker_is_seeded_by_the_run(task, tmp_path, monkeypatch):
    """nnU-Net starts its workers unseeded (numpy then seeds from the operating system); segbook seeds them from the
    run's seed, so with one worker, whose batches arrive in the order it makes them, a run is reproducible too."""
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    monkeypatch.setenv("nnUNet_n_proc_DA", "1")
    first = _train(task, tmp_path / "a", monkeypatch, seed=2)
    second = _train(task, tmp_path / "b", monkeypatch, seed=2)
    a, b = _weights(first), _weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a) and _losses(first) == _losses(second)


@pytest.mark.slow
def test_a_fraction_trains_on_its_recorded_subset_and_a_changed_subset_is_not_resumed(task, tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    run = _train(task, tmp_path / "r", monkeypatch, fraction=0.25)
    record = run.manifest.data["training_cases"]
    train = sorted(json.loads((task.raw / task.entry.nnunet_name / "segbook_split.json").read_text())["train"])
    assert run.folder.parent.name.startswith("SegbookTrainer_tiny_pretrained_frac25__")
    assert record["count"] == 3 and record["available"] == len(train) == 10 and record["fraction"] == 0.25
    assert record["cases"] == list(training_subset(train, 0.25).cases) and set(record["cases"]) <= set(train)
    assert main(["evaluate", "--registry", str(task.registry_file), "--task", task.entry.key, "--model", "tiny",
                 "--pretrained", "--fractions", "0.25", "--device", "cpu"]) == 0
    summary = json.loads((run.folder / "evaluation" / "summary.json").read_text())
    test = json.loads((task.raw / task.entry.nnunet_name / "segbook_split.json").read_text())["test"]
    assert summary["run"]["fraction"] == 0.25 and summary["num_cases"] == len(test)  # the whole test split
    whole = _train(task, tmp_path / "r", monkeypatch)
    assert whole.manifest.data["training_cases"]["cases"] == train

    # As if the run had started on other cases (a split changed since): resuming it is refused, before training.
    manifest = RunManifest.load(run.folder)
    manifest.data["training_cases"]["cases"] = train[:3]
    manifest.data["status"] = "interrupted"
    manifest.save()
    assert train[:3] != record["cases"]
    before = (run.folder / "run.json").read_text()
    with pytest.raises(RunExistsError, match="would now train on 3, not the same ones"):
        _train(task, tmp_path / "r", monkeypatch, fraction=0.25, resume=True)
    assert (run.folder / "run.json").read_text() == before


@pytest.mark.slow
def test_a_fold_trains_on_its_fraction_keeps_its_validation_and_a_changed_subset_stops_the_resume(task, tmp_path,
                                                                                                   monkeypatch):
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    run = _train(task, tmp_path / "f", monkeypatch, fraction=0.5, fold=0)
    splits = json.loads((task.preprocessed / task.entry.nnunet_name / "splits_final.json").read_text())
    record = run.manifest.data["training_cases"]
    assert record["available"] == len(splits[0]["train"]) == 8 and record["count"] == 4
    assert record["cases"] == list(training_subset(splits[0]["train"], 0.5).cases)
    validated = json.loads((run.folder / "validation" / "summary.json").read_text())["metric_per_case"]
    assert len(validated) == len(splits[0]["val"]) == 2  # nnU-Net validated on the fold's whole validation part

    # The trainer itself refuses a run whose recorded cases are not its fraction of the fold's training part.
    manifest = RunManifest.load(run.folder)
    manifest.data["training_cases"]["cases"] = sorted(splits[0]["train"])[:4]
    manifest.data["status"] = "interrupted"
    manifest.save()
    assert sorted(splits[0]["train"])[:4] != record["cases"]
    (run.folder / "checkpoint_final.pth").rename(run.folder / "checkpoint_latest.pth")
    with pytest.raises(SegbookError, match="not the same ones"):
        _train(task, tmp_path / "f", monkeypatch, fraction=0.5, fold=0, resume=True)


@pytest.mark.slow
def test_batch_runs_each_seed_and_fraction_as_its_own_job(task, tmp_path, monkeypatch):
    """The local runner's workers rebuild each job from its id: its seed and fraction reach the training."""
    monkeypatch.setenv("nnUNet_raw", str(task.raw))
    monkeypatch.setenv("nnUNet_preprocessed", str(task.preprocessed))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    selection = ["--registry", str(task.registry_file), "--tasks", task.entry.key, "--models", "tiny", "--init",
                 "scratch", "--seeds", "1", "--fractions", "0.5"]
    plan = run_segbook("batch", "plan", *selection, "--format", "json")
    rows = json.loads(plan.stdout)["jobs"]
    assert [(row["job"], row["seed"], row["fraction"], row["state"]) for row in rows] == \
        [(f"{task.entry.key}__tiny__scratch__seed1__frac50__fold_all", 1, 0.5, "pending")]
    run_segbook("batch", "run", *selection, "--device", "cpu", "--workers", "1", "--epochs", "1",
                "--iters-per-epoch", "2", "--val-iters-per-epoch", "1")
    jobs = build_matrix(load_registry([task.registry_file]), task.entry.key, models="tiny", inits="scratch",
                        seeds=[1], fractions=[0.5])
    manifest = RunManifest.load(jobs[0].folder(Paths.from_env()))
    assert manifest.status == "finished" and manifest.data["rng_seed"] == 12346
    assert manifest.data["training_cases"]["count"] == 5 and manifest.data["training_cases"]["available"] == 10
    assert (jobs[0].folder(Paths.from_env()) / "evaluation" / "summary.json").is_file()
