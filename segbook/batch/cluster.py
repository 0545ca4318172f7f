"""What a SLURM cluster allows, read before anything is submitted, and sbatch's refusals as one line each.

- `ClusterLimits.read()`: `MaxArraySize` and `MaxJobCount` from `scontrol show config`, each partition's time limit,
  the most CPUs its nodes have and the default partition from `sinfo`, and each partition's `MaxCPUsPerNode` from
  `scontrol show partition`. A cluster that does not answer gets SLURM's defaults (1001 and 10000), said in
  `ClusterLimits.source`, and no CPU limit. `ClusterLimits.cpus` gives a task's CPUs: a default clipped to what a
  node of the partition allows, a value given refused (before sbatch) when it exceeds that.
- `submission_error(message, what)`: sbatch's error for a refused array, as one line naming the limit or the option
  to change (a partition that does not exist, a time limit above the partition's, more CPUs, memory or GPUs than a
  node has, an account, a QOS limit on submitted jobs, an array too large), the raw message kept at the end.
- `slurm_ending(job)`: how a SLURM job that is over ended (state and exit code), from scontrol while slurmctld
  still holds it (MinJobAge), else from sacct where the cluster has accounting; None when neither knows.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from dataclasses import dataclass, field

from segbook.errors import SegbookError

#: SLURM's own defaults, for a cluster whose configuration cannot be read.
DEFAULT_MAX_ARRAY_SIZE = 1001
DEFAULT_MAX_JOB_COUNT = 10000
COMMAND_TIMEOUT_S = 60
UNLIMITED = ("infinite", "unlimited", "")


class SubmissionError(SegbookError):
    """sbatch refused a submission, or the cluster's limits forbid it; the message says what to change."""


def time_minutes(text: str) -> int:
    """SLURM's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) in whole minutes."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise SegbookError(f"--time {text!r}: expected a SLURM time such as 48:00:00, 2-00:00:00 or 90 (minutes)")
    days, first, second, third = (int(g) if g else None for g in match.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = ((days * 24 + first) * 60 + (second or 0)) * 60 + (third or 0)
    elif third is not None:  # H:M:S
        seconds = (first * 60 + second) * 60 + third
    else:  # M or M:S
        seconds = first * 60 + (second or 0)
    if seconds <= 0:
        raise SegbookError(f"--time {text!r} must be positive")
    return math.ceil(seconds / 60)


def format_minutes(minutes: int) -> str:
    """Minutes as SLURM's D-HH:MM:SS."""
    days, rest = divmod(minutes, 24 * 60)
    return f"{days}-{rest // 60:02d}:{rest % 60:02d}:00" if days else f"{rest // 60:02d}:{rest % 60:02d}:00"


def _run(command: list[str]) -> str | None:
    """The command's output, None when it is missing or fails."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


@dataclass(frozen=True)
class ClusterLimits:
    """The limits a submission must fit: array size, jobs the controller holds, partitions' time limits."""

    max_array_size: int = DEFAULT_MAX_ARRAY_SIZE
    max_job_count: int = DEFAULT_MAX_JOB_COUNT
    partitions: dict[str, int | None] = field(default_factory=dict)  # name -> MaxTime in minutes (None: unlimited)
    default_partition: str | None = None
    source: str = "SLURM's defaults (scontrol did not answer)"
    node_cpus: dict[str, int] = field(default_factory=dict)  # name -> most CPUs a task may have on one of its nodes

    @classmethod
    def read(cls) -> "ClusterLimits":
        """The limits of the cluster this machine submits to."""
        return cls.parse(_run(["scontrol", "show", "config"]),
                         _run(["sinfo", "--noheader", "--exact", "--format=%P %l %c"]),
                         _run(["scontrol", "--oneliner", "show", "partition"]))

    @classmethod
    def parse(cls, config: str | None, partitions: str | None, partition_config: str | None = None) -> "ClusterLimits":
        """The limits from the output of `scontrol show config`, `sinfo --noheader --exact --format="%P %l %c"` (a
        line per partition and node size) and `scontrol --oneliner show partition` (None: the command did not
        answer)."""
        values = dict(re.findall(r"^(\w+)\s*=\s*(\S*)", config or "", re.MULTILINE))
        times, default, cpus = _partitions(partitions or "")
        for line in (partition_config or "").splitlines():
            name, most = re.search(r"PartitionName=(\S+)", line), re.search(r"MaxCPUsPerNode=(\d+)", line)
            if name and most and name[1] in cpus:
                cpus[name[1]] = min(cpus[name[1]], int(most[1]))
        return cls(max_array_size=_number(values.get("MaxArraySize"), DEFAULT_MAX_ARRAY_SIZE),
                   max_job_count=_number(values.get("MaxJobCount"), DEFAULT_MAX_JOB_COUNT),
                   partitions=times, default_partition=default,
                   source="scontrol show config" if config else cls.source, node_cpus=cpus)

    def partition_time(self, partition: str | None) -> int | None:
        """The partition's time limit in minutes (None: unlimited or unknown)."""
        return self.partitions.get(partition or self.default_partition or "")

    def cpus(self, given: int | None, default: int, partition: str | None, option: str) -> int:
        """A task's CPUs: `given` (refused when no node of the partition allows that many), else `default`, clipped
        to what a node allows: a default must never be what sbatch refuses."""
        name = partition or self.default_partition or ""
        most = self.node_cpus.get(name)
        if given is None:
            return default if most is None else max(1, min(default, most))
        if most is not None and given > most:
            raise SubmissionError(f"{option} {given} exceeds the CPUs a task may have on a node of partition {name} "
                                  f"({most}: sinfo, MaxCPUsPerNode); lower it, or leave it out for "
                                  f"{max(1, min(default, most))}")
        return given

    def check_partition(self, partition: str | None, option: str = "--partition") -> None:
        """A partition sinfo does not list is an error before anything is submitted."""
        if partition and self.partitions and partition not in self.partitions:
            raise SubmissionError(f"{option} {partition}: no such partition; sinfo lists "
                                  f"{', '.join(sorted(self.partitions))}")


def _number(value: str | None, default: int) -> int:
    return int(value) if value and value.isdigit() else default


def _partitions(listing: str) -> tuple[dict[str, int | None], str | None, dict[str, int]]:
    """{partition: time limit in minutes (None: unlimited)}, the default partition and {partition: the most CPUs
    of its nodes}, from sinfo's listing ("NAME[*] TIMELIMIT [CPUS]" lines; several per partition with --exact)."""
    partitions: dict[str, int | None] = {}
    default = None
    cpus: dict[str, int] = {}
    for line in filter(str.strip, listing.splitlines()):
        name, limit, *size = line.split() + [""]
        if name.endswith("*"):
            name = default = name.rstrip("*")
        partitions[name] = None if limit.lower() in UNLIMITED else _sinfo_minutes(limit)
        if size and size[0].rstrip("+").isdigit():
            cpus[name] = max(cpus.get(name, 0), int(size[0].rstrip("+")))
    return partitions, default, cpus


def _sinfo_minutes(text: str) -> int | None:
    try:
        return time_minutes(text)
    except SegbookError:
        return None


#: sbatch's refusals (a fragment of its message, matched without regard to case; the first that matches wins, so
#: the specific come before the general) -> what to change, for the one-line error, naming the refused array's own
#: options ({partition}, {time}, {cpus}, {mem}: `ARRAY_OPTIONS` or `PREPARE_OPTIONS`). The messages are Slurm's
#: (src/common/slurm_errno.c, and the reasons QOS and association limits print).
REFUSALS = (
    ("MaxSubmit", "your QOS or association limits the jobs you may have queued: pass --max-submitted below that "
                  "limit (and submit again as jobs end)"),
    ("MaxWallDuration", "your QOS limits the time of a job: lower {time}"),
    ("invalid partition", "the partition does not exist: check {partition} against `sinfo`"),
    ("invalid account", "the account is not yours (or not allowed on that partition): check --account"),
    ("invalid qos", "the QOS is not yours: check the qos of --extra-sbatch"),
    ("requested time limit", "the time limit exceeds the partition's: lower {time}, or leave it out to use the "
                             "partition's maximum"),
    ("invalid job array specification", "the array is larger than the cluster's MaxArraySize: pass "
                                        "--max-array-size"),
    ("more processors requested than permitted", "no node has that many CPUs: lower {cpus}"),
    ("memory specification can not be satisfied", "no node has that much memory: lower {mem}"),
    ("invalid generic resource", "the cluster has no such generic resource (GPUs): check --gpus-per-job (0 for CPU "
                                 "jobs) and --extra-sbatch"),
    ("requested node configuration is not available", "no node offers what a job asks (GPUs, CPUs, memory or a "
                                                      "constraint): check --gpus-per-job, {cpus}, {mem} and "
                                                      "--extra-sbatch"),
    ("maxjobcount", "the controller holds as many jobs as it can (MaxJobCount): pass --max-submitted, or submit "
                    "again when jobs have ended"),
    ("job violates accounting/qos policy", "a QOS or association limit refuses the job (jobs queued, GPUs, time): "
                                           "ask `sacctmgr show assoc user=$USER` and lower --max-submitted, "
                                           "--gpus-per-job or {time}"),
)
#: The options of a GPU array, and those of the CPU array that prepares tasks (`batch submit`'s names).
ARRAY_OPTIONS = {"partition": "--partition", "time": "--time", "cpus": "--cpus-per-job", "mem": "--mem"}
PREPARE_OPTIONS = {name: f"--prepare-{name}" for name in ARRAY_OPTIONS}


def submission_error(message: str, what: str, options: dict[str, str] = ARRAY_OPTIONS) -> SubmissionError:
    """sbatch's refusal of `what` as one line: the fix first (naming `options`, the refused array's), sbatch's own
    words after."""
    raw = " ".join(line.strip() for line in message.splitlines() if line.strip())
    raw = re.sub(r"^(sbatch: error: )+", "", raw).replace("sbatch: error: ", "")
    hint = next((fix for fragment, fix in REFUSALS if fragment.lower() in raw.lower()), "see sbatch's message")
    return SubmissionError(f"sbatch refused {what}: {hint.format(**options)} (sbatch: {raw or 'no message'})")


def slurm_ending(job: str) -> str | None:
    """"SLURM: FAILED, killed by signal 9 (SIGKILL)" for a SLURM job (or array task "12_3") that is over; None
    when neither scontrol (slurmctld forgets a job MinJobAge after it ended) nor sacct knows it."""
    shown = _run(["scontrol", "--oneliner", "show", "job", job])
    state = re.search(r"JobState=(\S+)", shown or "")
    code = re.search(r"\bExitCode=(\S+)", shown or "")
    if state:
        return f"SLURM: {state[1]}" + (f", {describe_exit_code(code[1])}" if code else "")
    accounted = _run(["sacct", "--noheader", "--parsable2", "--jobs", job, "--format=JobID,State,ExitCode"])
    for line in (accounted or "").splitlines():
        fields = line.split("|")
        if len(fields) >= 3 and fields[0] == job:
            return f"SLURM: {fields[1]}, {describe_exit_code(fields[2])}"
    return None


def describe_exit_code(code: str) -> str:
    """SLURM's "status:signal" (0:9, 1:0) in words. srun reports a task killed by a signal as the shell does, as
    exit status 128 + the signal (137: SIGKILL, which is how the out-of-memory killer and kill -9 end a process)."""
    status, _, signum = code.partition(":")
    if signum not in ("", "0"):
        return f"killed by signal {signum}{_signal_name(int(signum))}"
    if status.isdigit() and 128 < int(status) < 128 + 65:
        number = int(status) - 128
        return f"exit code {status}: killed by signal {number}{_signal_name(number)}" + \
            (" (the out-of-memory killer, or kill -9)" if number == 9 else "")
    return f"exit code {status}"


def _signal_name(number: int) -> str:
    import signal

    try:
        return f" ({signal.Signals(number).name})"
    except ValueError:
        return ""
