"""How `segbook batch submit` cuts a matrix into SLURM arrays that fit the cluster (issue 14, item 2), without a
cluster: the limits read from `scontrol show config` and `sinfo`, the arrays, their order, what is held back for a
later submission, the dependencies on preparation, the requeues each array may take, and sbatch's refusals as one
line. The same code against the real test cluster: tests/test_batch_slurm.py and tests/test_batch_full.py.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import replace

import pytest

from segbook.batch.attempts import ending
from segbook.batch.cluster import (DEFAULT_MAX_ARRAY_SIZE, DEFAULT_MAX_JOB_COUNT, ClusterLimits, SubmissionError,
                                   describe_exit_code, submission_error)
from segbook.batch.estimate import Estimate
from segbook.batch.execute import ExecutionOptions
from segbook.batch.matrix import build_matrix
from segbook.batch.signals import Terminated
from segbook.batch.slurm import (REQUEUE_MARGIN, UNKNOWN_ESTIMATE_REQUEUES, PrepareSlurmOptions, SlurmOptions,
                                 _terminate_unless_requeued, interleave, plan_submission, share_parallelism)
from segbook.claims import ClaimRecord
from segbook.registry import load_registry

#: `scontrol show config` of the test cluster (Slurm 22.05.8), lines around the limits, with a site's values.
SCONTROL = """Configuration data as of 2026-11-30T17:36:29
AccountingStorageBackupHost = (null)
AccountingStorageEnforce = none
ClusterName             = segbook
MailProg                = /bin/true
MaxArraySize            = 1001
MaxDBDMsgs              = 0
MaxJobCount             = 10000
MaxJobId                = 67043328
MaxMemPerNode           = UNLIMITED
SLURM_VERSION           = 22.05.8
"""
#: `sinfo --noheader --format="%P %l"`: the default partition starred, time limits in SLURM's formats.
SINFO = "gpu* 2-00:00:00\ncpu 7-00:00:00\ndebug infinite\nshort 30:00\n"
STUDY = {"models": "base,large,huge,nnunet", "folds": "0,1,2,3,4"}


@pytest.fixture(scope="module")
def study():
    """The study's matrix: 87 tasks x 7 runs x 5 folds."""
    return build_matrix(load_registry(), "all", **STUDY)


def _plan(jobs, prepare=(), room=100_000, limits=ClusterLimits.parse(SCONTROL, SINFO), estimates=None,
          preparing=None, **slurm):
    return plan_submission(jobs, list(prepare), estimates or {}, {}, ExecutionOptions(), SlurmOptions(**slurm),
                           limits, room, preparing)


def test_limits_come_from_scontrol_and_sinfo_or_slurms_defaults():
    limits = ClusterLimits.parse(SCONTROL, SINFO)
    assert (limits.max_array_size, limits.max_job_count, limits.default_partition) == (1001, 10000, "gpu")
    assert limits.partitions == {"gpu": 2 * 24 * 60, "cpu": 7 * 24 * 60, "debug": None, "short": 30}
    assert SlurmOptions().time_limit(limits) == 2880  # the default partition's maximum
    assert SlurmOptions(partition="short").time_limit(limits) == 30
    assert SlurmOptions(partition="debug").time_limit(limits) == 48 * 60  # unlimited: 48 h
    silent = ClusterLimits.parse(None, None)
    assert (silent.max_array_size, silent.max_job_count) == (DEFAULT_MAX_ARRAY_SIZE, DEFAULT_MAX_JOB_COUNT)
    assert "defaults" in silent.source and silent.partitions == {}


def test_a_time_or_partition_the_cluster_refuses_is_one_line_naming_the_option():
    limits = ClusterLimits.parse(SCONTROL, SINFO)
    with pytest.raises(SubmissionError, match=r"^--time 3-00:00:00 exceeds the time limit of partition gpu "
                                              r"\(2-00:00:00\)"):
        SlurmOptions(time="3-00:00:00").time_limit(limits)
    with pytest.raises(SubmissionError, match="^--partition a100: no such partition; sinfo lists cpu, debug, gpu"):
        SlurmOptions(partition="a100").parameters(1, limits)


def test_the_study_is_cut_into_arrays_that_fit_and_every_array_mixes_tasks(study):
    assert len(study) == 3045
    by_cluster = _plan(study)  # MaxArraySize 1001: one array of 3,045 would be refused
    assert [len(a.jobs) for a in by_cluster.arrays] == [1001, 1001, 1001, 42]
    plan = _plan(study, max_array_size=100)
    assert [len(a.jobs) for a in plan.arrays] == [100] * 30 + [45]
    sent = [job.id for array in plan.arrays for job in array.jobs]
    assert sorted(sent) == sorted(job.id for job in study) and not plan.held_back
    for array in plan.arrays:
        tasks = [job.entry.key for job in array.jobs]
        assert len(set(tasks)) > 1 and all(a != b for a, b in zip(tasks, tasks[1:]))
    first_wave = [job.entry.key for job in plan.arrays[0].jobs[:87]]
    assert len(set(first_wave)) == 87  # every task once before any task twice


def test_each_tasks_longest_job_goes_first(study):
    jobs = [job for job in study if job.entry.key in {study[0].entry.key, study[-1].entry.key}]
    hours = {job.id: float(len(job.id) % 7) + (job.spec.model == "huge") * 10 for job in jobs}
    ordered = interleave(jobs, hours)
    for task in {job.entry.key for job in jobs}:
        mine = [hours[job.id] for job in ordered if job.entry.key == task]
        assert mine == sorted(mine, reverse=True)
    assert [job.entry.key for job in ordered[:2]] == [study[0].entry.key, study[-1].entry.key]


def test_max_submitted_sends_preparation_first_and_holds_back_the_rest(study):
    tasks = list({job.entry.key: job.entry for job in study}.values())[:3]
    jobs = [job for job in study if job.entry.key in {e.key for e in tasks}]  # 3 x 35
    plan = _plan(jobs, prepare=tasks, room=10, max_array_size=4)
    assert [e.key for e in plan.prepare] == [e.key for e in tasks]
    assert plan.jobs == 7 and [len(a.jobs) for a in plan.arrays] == [4, 3] and len(plan.held_back) == 98
    assert {j.id for a in plan.arrays for j in a.jobs} | {j.id for j in plan.held_back} == {j.id for j in jobs}
    assert plan.dependency("71") == {"dependency": "afterany:71"}

    starved = _plan(jobs, prepare=tasks, room=2)  # less room than tasks to prepare: preparations only
    assert [e.key for e in starved.prepare] == [e.key for e in tasks[:2]]
    assert starved.arrays == [] and len(starved.held_back) == len(jobs)

    # The next submission: two tasks still being prepared by an earlier array, the third prepared meanwhile.
    later = _plan(jobs, prepare=[], room=50, preparing={tasks[0].key: "71_0", tasks[1].key: "71_1"})
    assert later.prepare == [] and later.jobs == 50 and later.waits_for == ["71"]
    assert later.dependency(None) == {"dependency": "afterany:71"}
    assert later.dependency("80") == {"dependency": "afterany:71:80"}
    only_third = _plan([j for j in jobs if j.entry.key == tasks[2].key], preparing={tasks[0].key: "71_0"})
    assert only_third.waits_for == [] and only_third.dependency(None) == {}


def test_array_parallelism_is_shared_in_proportion_and_requeues_follow_the_estimates(study):
    assert share_parallelism(10, [100, 100, 45]) == [4, 4, 2]
    assert share_parallelism(2, [100, 100, 45]) == [1, 1, 1]  # at least one each: an array must run
    assert share_parallelism(None, [100, 45]) == [100, 45]
    plan = _plan(study, max_array_size=100, array_parallelism=256)
    assert sum(a.parallelism for a in plan.arrays) == 256

    jobs = study[:3]
    estimate = Estimate(jobs[0].id, None, 0, training_flops=100 * 3600 * 40e12, validation_flops=0.0,
                        prediction_flops=0.0, epochs=1000, assumed_tflops=40.0)  # 100 GPU-hours
    known = _plan(jobs, estimates={job.id: estimate for job in jobs})
    assert known.time_minutes == 2880 and known.requeues[jobs[0].id] == math.ceil(100 / 48) - 1
    assert known.arrays[0].max_timeouts == 2 + REQUEUE_MARGIN
    assert _plan(jobs).arrays[0].max_timeouts == UNKNOWN_ESTIMATE_REQUEUES
    assert _plan(jobs, max_timeouts=1).arrays[0].max_timeouts == 1


#: What sbatch (Slurm 22.05) prints when it refuses a submission; the first five captured on the test cluster.
REFUSED = {
    "sbatch: error: invalid partition specified: nosuch\n"
    "sbatch: error: Batch job submission failed: Invalid partition name specified": "--partition",
    "sbatch: error: Batch job submission failed: Invalid job array specification": "--max-array-size",
    "sbatch: error: Batch job submission failed: More processors requested than permitted": "--cpus-per-job",
    "sbatch: error: Memory specification can not be satisfied\n"
    "sbatch: error: Batch job submission failed: Requested node configuration is not available": "--mem",
    "sbatch: error: Invalid generic resource (gres) specification": "--gpus-per-job",
    "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)":
        "--time",
    "sbatch: error: QOSMaxSubmitJobPerUserLimit\nsbatch: error: Batch job submission failed: Job violates "
    "accounting/QOS policy (job submit limit, user's size and/or time limits)": "--max-submitted",
    "sbatch: error: AssocMaxSubmitJobLimit\nsbatch: error: Batch job submission failed: Job violates "
    "accounting/QOS policy (job submit limit, user's size and/or time limits)": "--max-submitted",
    "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified":
        "--account",
}


@pytest.mark.parametrize("message", list(REFUSED))
def test_sbatch_refusals_become_one_line_naming_what_to_change(message):
    error = str(submission_error(message, "array 2 of 31 (100 jobs)"))
    assert "\n" not in error and error.startswith("sbatch refused array 2 of 31 (100 jobs): ")
    hint, _, said = error.partition(" (sbatch: ")
    assert REFUSED[message] in hint and "sbatch: error" not in said
    assert message.splitlines()[-1].removeprefix("sbatch: error: ") in said


def test_how_a_slurm_task_ended_reads_in_words():
    assert describe_exit_code("0:9") == "killed by signal 9 (SIGKILL)"
    assert describe_exit_code("137:0").startswith("exit code 137: killed by signal 9 (SIGKILL) (the out-of-memory")
    assert describe_exit_code("143:0") == "exit code 143: killed by signal 15 (SIGTERM)"
    assert describe_exit_code("1:0") == "exit code 1"


def test_a_slurm_task_is_terminated_by_sigterm_unless_submitit_is_requeuing_it():
    """scontrol requeue (submitit's answer to SLURM's warning) sends the task SIGTERM on its way out: that must not
    count as a terminated attempt, while a plain SIGTERM (scancel) must."""
    requeued = []

    def submitits_requeue(signum, frame):  # checkpoint, `scontrol requeue`, then sys.exit(-1)
        requeued.append(signum)
        raise SystemExit(-1)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR2)}
    try:
        signal.signal(signal.SIGUSR2, submitits_requeue)
        _terminate_unless_requeued()
        with pytest.raises(Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(SystemExit):
            os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGTERM)  # SLURM's requeue: nothing raised
        assert requeued == [signal.SIGUSR2]
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


#: `sinfo --noheader --exact --format="%P %l %c"` and `scontrol --oneliner show partition` (shortened) of a site with
#: GPU nodes of 64 and 128 CPUs, at most 96 of them for one partition's jobs; the last lines as the one-node test
#: cluster prints them.
SINFO_CPUS = "gpu* 2-00:00:00 64\ngpu* 2-00:00:00 128\ncpu 7-00:00:00 4\ndebug infinite 2\n"
PARTITIONS = ("PartitionName=gpu AllowGroups=ALL Default=YES MaxNodes=UNLIMITED MaxTime=2-00:00:00 MinNodes=0 LLN=NO "
              "MaxCPUsPerNode=96 Nodes=g[01-08] State=UP TotalCPUs=768\n"
              "PartitionName=cpu AllowGroups=ALL Default=NO MaxTime=7-00:00:00 MaxCPUsPerNode=UNLIMITED Nodes=c01\n"
              "PartitionName=debug AllowGroups=ALL AllowAccounts=ALL AllowQos=ALL AllocNodes=ALL Default=YES QoS=N/A "
              "DefaultTime=NONE DisableRootJobs=NO ExclusiveUser=NO GraceTime=0 Hidden=NO MaxNodes=UNLIMITED "
              "MaxTime=UNLIMITED MinNodes=0 LLN=NO MaxCPUsPerNode=UNLIMITED Nodes=vm PriorityJobFactor=1 "
              "PriorityTier=1 RootOnly=NO ReqResv=NO OverSubscribe=NO OverTimeLimit=NONE PreemptMode=OFF State=UP "
              "TotalCPUs=2 TotalNodes=1\n")


def test_cpus_default_to_what_a_node_of_the_partition_allows_and_more_is_refused_naming_the_option():
    """Issue 22: the default --prepare-cpus 8 was refused on smaller nodes, by sbatch, naming --cpus-per-job first.
    Defaults now come from the partition (its nodes' CPUs, its MaxCPUsPerNode); a value given above that is refused
    before sbatch, naming the option given and the limit."""
    limits = ClusterLimits.parse(SCONTROL, SINFO_CPUS, PARTITIONS)
    assert limits.node_cpus == {"gpu": 96, "cpu": 4, "debug": 2}
    prepare = lambda **values: PrepareSlurmOptions(**values).parameters(limits)["cpus_per_task"]  # noqa: E731
    assert (prepare(partition="cpu"), prepare(partition="debug"), prepare(), prepare(partition="cpu", cpus=3)) == (
        4, 2, 8, 3)
    with pytest.raises(SubmissionError, match=r"^--prepare-cpus 8 exceeds the CPUs a task may have on a node of "
                                              r"partition cpu \(4: sinfo, MaxCPUsPerNode\); lower it, or leave it "
                                              r"out for 4$"):
        PrepareSlurmOptions(partition="cpu", cpus=8).parameters(limits)
    with pytest.raises(SubmissionError, match=r"^--cpus 8 exceeds"):  # `batch prepare --backend slurm --cpus 8`
        PrepareSlurmOptions(partition="cpu", cpus=8, prefix="--").parameters(limits)
    assert SlurmOptions(partition="debug").parameters(1, limits)["cpus_per_task"] == 2  # 8 per GPU, clipped
    assert SlurmOptions().parameters(2, limits)["cpus_per_task"] == 16
    with pytest.raises(SubmissionError, match=r"^--cpus-per-job 97 exceeds .* partition gpu \(96: "):
        SlurmOptions(cpus_per_job=97).parameters(1, limits)
    unknown = ClusterLimits.parse(None, None)  # no answer: the defaults, sbatch says the rest
    assert PrepareSlurmOptions(cpus=64).parameters(unknown)["cpus_per_task"] == 64
    refused = str(submission_error("sbatch: error: Batch job submission failed: More processors requested than "
                                   "permitted", "the preparation array (3 tasks)", PrepareSlurmOptions().options))
    assert "lower --prepare-cpus (sbatch:" in refused and "--cpus-per-job" not in refused


def test_an_attempt_slurm_requeued_itself_is_a_requeue_not_a_bad_ending(tmp_path):
    """Issue 22: a node marked down (scontrol update nodename=vm state=down) sends its jobs SIGTERM, then SIGKILL
    (KillWait), and SLURM requeues them: squeue shows the job PENDING (reason BeginTime), then RUNNING again with
    Restarts=1 (captured on the test cluster, which tests/test_batch_slurm.py also marks down). The attempt ended by
    SIGTERM (released) or was killed (not released), but it is a requeue; scancel leaves the job CANCELLED and stays
    a bad ending."""
    terminated = ClaimRecord(job="j", token="t", host="elsewhere", pid=1, pid_start=None, slurm_job="7_0",
                             slurm_restart=0, created_at="", heartbeat=0.0, released=True, outcome="Terminated")
    killed = replace(terminated, released=False, outcome=None)
    requeued = ("requeued by SLURM (a node failure, a preemption or `scontrol requeue`)", False)
    for record in (terminated, killed):
        assert ending(tmp_path, record, "gone", queue={"7_0": "PENDING"}) == requeued
        assert ending(tmp_path, record, "gone", own=("7_0", 1)) == requeued
        assert ending(tmp_path, record, "gone", queue={"7_0": "RUNNING"}, own=("8_0", 0))[1] is True
    assert ending(tmp_path, terminated, None, queue={"7_0": "CANCELLED"}) == (
        "terminated by SIGTERM (scancel, a time limit reached without warning, or kill)", True)
    assert ending(tmp_path, killed, "gone", queue={"7_0": "NODE_FAIL"}) == ("killed (SLURM: NODE_FAIL)", True)
    assert ending(tmp_path, replace(terminated, slurm_job=None), None, queue={"7_0": "PENDING"})[1] is True
