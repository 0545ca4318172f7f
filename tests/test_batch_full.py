"""A matrix rehearsed through the real SLURM submission (issue 14, "Proof at full size"), at a size the CI affords.

`scripts/rehearse_matrix.py` submits a matrix with no-op job bodies (`segbook.batch.rehearsal`) to the one-node
test cluster and checks what the full-size run checks; here 4 tasks x 3 runs x 2 folds = 24 jobs in arrays of at
most 7 (so four GPU arrays after the preparation array). The test then looks at what the rehearsal left with its own
eyes, and makes sure the script's checks do catch what they look for. The full study (3,045 jobs) is run by hand:
docs/benchmarks.md has the command and figures.

The same no-op jobs then try what only a cluster can show cheaply: a refused array takes back the preparation array
it followed, and with --max-submitted a later submission waits for a preparation still queued instead of preparing
the task again.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
from slurm_support import ensure_slurm_cluster, idle_node, queue_states, wait_for

from segbook.batch.cluster import ClusterLimits, SubmissionError
from segbook.batch.execute import ExecutionOptions
from segbook.batch.matrix import build_matrix, counts, survey
from segbook.batch.slurm import PrepareSlurmOptions, SlurmOptions, submit_slurm
from segbook.claims import try_claim
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.runs import parse_weights, summary_path
from segbook.training.manifest import RunManifest

pytestmark = pytest.mark.slurm

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "rehearse_matrix.py"
SELECTION = ["--task-count", "4", "--models", "base,nnunet", "--folds", "0,1", "--max-array-size", "7"]


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rehearse_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> SimpleNamespace:
    """The rehearsal, run once as a user runs it: its output, summary, and work folder."""
    ensure_slurm_cluster()
    workdir = tmp_path_factory.mktemp("rehearsal")
    done = subprocess.run([sys.executable, str(SCRIPT), *SELECTION, "--workdir", str(workdir), "--timeout-s", "240",
                           "--json"], capture_output=True, text=True, timeout=400)
    paths = Paths(home=workdir / "home", raw=workdir / "nnUNet_raw", preprocessed=workdir / "nnUNet_preprocessed",
                  results=workdir / "nnUNet_results")
    module = _script()
    jobs = module.select_jobs(module.parse_args(SELECTION))
    summary = json.loads(done.stdout.splitlines()[-1]) if done.stdout.strip() else {}
    return SimpleNamespace(done=done, summary=summary, paths=paths, jobs=jobs, module=module)


def test_every_job_of_the_matrix_is_done_once_after_one_preparation_per_task(rehearsal):
    done, summary, paths = rehearsal.done, rehearsal.summary, rehearsal.paths
    assert done.returncode == 0 and summary.get("ok"), done.stdout[-4000:] + done.stderr[-4000:]
    assert (summary["jobs"], summary["tasks"], summary["arrays"]) == (24, 4, 5)
    assert "all checks passed" in done.stdout

    # What the rehearsal left, read directly: a finished manifest and a rehearsal's summary per job ...
    assert len(rehearsal.jobs) == 24
    for job in rehearsal.jobs:
        manifest = RunManifest.load(job.folder(paths))
        assert manifest.status == "finished" and manifest.epochs_done == manifest.settings.epochs > 0
        assert manifest.data["request"]["backend"] == "slurm" and manifest.data["request"]["attempt"] == 1
        assert json.loads(summary_path(job.folder(paths)).read_text())["rehearsal"] is True
    # ... one preparation record per task, and GPU arrays of at most 7 jobs waiting for the preparation array.
    records = sorted((paths.batch / "prepare").glob("*.json"))
    assert [json.loads(p.read_text())["status"] for p in records] == ["prepared"] * 4
    (prepare,) = [json.loads(p.read_text()) for p in (paths.batch / "slurm").glob("*/prepare.json")]
    arrays = [json.loads(p.read_text()) for p in sorted((paths.batch / "slurm").glob("*/submission.json"))]
    assert sorted(len(a["jobs"]) for a in arrays) == [3, 7, 7, 7]
    assert {a["parameters"]["additional_parameters"]["dependency"] for a in arrays} == {
        f"afterany:{prepare['array_job_id']}"}
    assert all(len({item["job"].split("__")[0] for item in a["jobs"]}) > 1 for a in arrays)


def test_the_rehearsals_checks_catch_what_they_look_for(rehearsal):
    module, paths, jobs = rehearsal.module, rehearsal.paths, rehearsal.jobs
    arrays = module.submitted_arrays(paths)
    assert module.check_arrays(jobs, arrays, 7) == []
    assert len(module.check_arrays(jobs, arrays, 5)) == 4  # 5 arrays expected; three hold 7 > 5 jobs

    job = jobs[0]
    claim = try_claim(paths.claims, job.id)  # a second start of a done job
    claim.release("done")
    assert [p for p in module.check_exactly_once(jobs, paths, arrays) if p.startswith(job.id)]

    summary_path(job.folder(paths)).unlink()  # its evaluation lost: no longer done
    (problem,) = module.check_done(jobs, paths, parse_weights(paths.home / "rehearsal-weights.model"))
    assert problem.startswith(f"{job.id} is pending")


@pytest.fixture
def noop_matrix(tmp_path, monkeypatch) -> SimpleNamespace:
    """2 tasks x (base, nnU-Net) from scratch x folds 0, 1 = 8 no-op jobs in a SEGBOOK_HOME of their own, each task
    with its dataset.json alone (what a rehearsal needs), none prepared yet."""
    ensure_slurm_cluster()
    for variable in ("SEGBOOK_HOME", "nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    paths = Paths.from_env()
    jobs = build_matrix(load_registry(), "004,005", models="base,nnunet", inits="scratch", folds="0,1")
    _script().write_datasets(list({job.entry.key: job.entry for job in jobs}.values()), paths)
    options = ExecutionOptions.create(device="cpu", body="noop")
    return SimpleNamespace(paths=paths, jobs=jobs, options=options)


def _slurm(**values) -> SlurmOptions:
    prepare = values.pop("prepare", PrepareSlurmOptions(time="5", cpus=1, mem="200M"))
    return SlurmOptions(**{"time": "5", "cpus_per_job": 1, "mem": "200M", "prepare": prepare, **values})


def test_a_refused_array_takes_back_the_preparation_array_it_followed(noop_matrix):
    said: list[str] = []
    with pytest.raises(SubmissionError, match=r"^sbatch refused array 1 of 1 \(8 jobs\): no node has that much "
                                              r"memory: lower --mem"):
        submit_slurm(noop_matrix.jobs, noop_matrix.options, _slurm(mem="900G"), paths=noop_matrix.paths,
                     say=said.append)
    (line,) = [line for line in said if line.startswith("submitted the preparation of 2 task(s)")]
    prepare_array = line.split()[-1]
    wait_for(lambda: set(queue_states(prepare_array).values()) == {"CANCELLED"}, 30, "the preparation's cancel")
    assert list((noop_matrix.paths.batch / "slurm").iterdir()) == []  # nothing recorded as submitted


def test_with_max_submitted_a_later_submission_waits_for_the_preparation_still_queued(noop_matrix):
    paths, jobs, options = noop_matrix.paths, noop_matrix.jobs, noop_matrix.options
    held = _slurm(max_submitted=4, prepare=PrepareSlurmOptions(time="5", cpus=1, mem="200M", extra_sbatch=("hold",)))
    first = submit_slurm(jobs, options, held, paths=paths, say=lambda line: None)  # 2 preparations + 2 jobs
    (prepare,) = [json.loads(p.read_text()) for p in (paths.batch / "slurm").glob("*/prepare.json")]
    array = prepare["array_job_id"]
    try:
        assert len(first) == 2 and sorted(item["job"] for item in prepare["jobs"]) == sorted(
            {job.entry.key for job in jobs})
        second = submit_slurm(jobs, options, held, paths=paths, say=lambda line: None)  # 4 jobs, no preparation
        assert len(second) == 4 and len(list((paths.batch / "slurm").glob("*/prepare.json"))) == 1
        records = [json.loads(p.read_text()) for p in sorted((paths.batch / "slurm").glob("*/submission.json"))]
        assert [r["parameters"]["additional_parameters"]["dependency"] for r in records] == [f"afterany:{array}"] * 2
    finally:
        subprocess.run(["scontrol", "release", array], check=True)
    wait_for(lambda: counts(survey(jobs, paths))["done"] == 6, 120, "the six jobs submitted to be done")
    third = submit_slurm(jobs, options, held, paths=paths, say=lambda line: None)  # prepared now: no dependency
    assert len(third) == 2 and len(list((paths.batch / "slurm").glob("*/prepare.json"))) == 1
    newest = json.loads(sorted((paths.batch / "slurm").glob("*/submission.json"))[-1].read_text())
    assert "dependency" not in newest["parameters"].get("additional_parameters", {})
    wait_for(lambda: counts(survey(jobs, paths))["done"] == 8, 120, "all eight jobs to be done")


def test_the_preparation_takes_the_cpus_a_node_has_by_default_and_more_is_refused_naming_its_option(noop_matrix):
    """Issue 22: the default --prepare-cpus (8) was refused on this 2-CPU node by sbatch, as "lower --cpus-per-job".
    By default a preparation task takes what a node of its partition allows; more is refused before anything is
    submitted, naming --prepare-cpus and the limit."""
    paths, jobs, options = noop_matrix.paths, noop_matrix.jobs, noop_matrix.options
    partition = ensure_slurm_cluster().partition
    listing = subprocess.run(["sinfo", "--noheader", "--format=%c", f"--partition={partition}"], capture_output=True,
                             text=True, timeout=30, check=True)
    cpus = int(listing.stdout.split()[0].rstrip("+"))
    with pytest.raises(SubmissionError, match=rf"^--prepare-cpus {cpus + 1} exceeds the CPUs a task may have on a "
                                              rf"node of partition {partition} \({cpus}: "):
        submit_slurm(jobs, options, _slurm(prepare=PrepareSlurmOptions(time="5", mem="200M", cpus=cpus + 1)),
                     paths=paths, say=lambda line: None)
    assert not (paths.batch / "slurm").exists()
    idle_node()  # the preparation takes every CPU of the node
    submit_slurm(jobs, options, _slurm(prepare=PrepareSlurmOptions(time="5", mem="200M")), paths=paths,
                 say=lambda line: None)
    (prepare,) = [json.loads(p.read_text()) for p in (paths.batch / "slurm").glob("*/prepare.json")]
    assert prepare["parameters"]["cpus_per_task"] == min(8, cpus)
    wait_for(lambda: counts(survey(jobs, paths))["done"] == 8, 180, "the jobs to be done after their preparation")


def test_the_limits_submissions_fit_are_the_clusters_own():
    cluster = ensure_slurm_cluster()
    conf = dict(line.split("=", 1) for line in (cluster.state_dir / "slurm.conf").read_text().splitlines()
                if "=" in line and not line.startswith("#") and " " not in line.split("=", 1)[0])
    limits = ClusterLimits.read()
    assert (limits.max_array_size, limits.max_job_count) == (int(conf["MaxArraySize"]), int(conf["MaxJobCount"]))
    assert limits.default_partition == cluster.partition and limits.partitions[cluster.partition] is None  # INFINITE
    assert limits.source == "scontrol show config"
