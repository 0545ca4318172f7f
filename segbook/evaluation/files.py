"""What a valid evaluation is: the one place that knows the files `segbook evaluate` writes into a run folder.

`evaluation/summary.json` and `evaluation/metrics.csv` become the cells of published tables, so they are untrusted
input wherever they come from: a run folder someone edited or copied, a bundle from another group. Bundle import
(`segbook.results.bundles`) refuses a bundle with a run that fails these checks; results collection
(`segbook.results.collect`) leaves such a run out of every table with a warning naming the file and its first
problem. A run's files are valid when:
- `summary.json` (under 8 MiB) is a JSON object whose `run` record names the run of its folder; its labels are the
  dataset's foreground labels; every mean is null or a finite number in range (fractions in [0, 1], HD95 >= 0 mm);
  counts are non-negative integers; `num_cases` is the size of the test split it records (the dataset's current
  split, when it is the one recorded: its very case ids); `training.complete` agrees with `run.json`; the
  prediction's cost record (`cost.prediction`: device, seconds, peak memory, peak resident memory, threads), which
  the cost table shows, has fields of their types and ranges;
- `metrics.csv` (under 256 MiB) has segbook's columns, one row per (test case, foreground label) and no other, every
  number in range, `reference_voxels` = TP + FN and `prediction_voxels` = TP + FP, TP + FP + FN + TN the same for
  every label of a case (the image size), Dice, IoU, precision, recall, NSD and HD95 as the confusion counts and the
  empty-mask convention below make them (to `TOLERANCE`), lesion counts for lesion labels only;
- together: `summary.json`'s per-label means, valid-case counts and lesion totals follow from `metrics.csv`'s rows
  (to `TOLERANCE`), and `metrics.csv` is the file `summary.json` records the SHA-256 of (summaries written since).

Empty masks (METRICS_VERSION 2, `segbook.evaluation.metrics`): where reference and prediction both lack a label,
every metric is NaN and the (case, label) pair is left out of that label's mean (with `--empty-dice one`: the
fractions and NSD are 1, HD95 0 mm); where exactly one lacks it, Dice, IoU, precision, recall and NSD are 0 and
HD95 is the worst case, the image's diagonal in mm. Version 1 (summaries without `settings.metrics_version`) wrote
NaN for HD95 whenever either mask was empty, which drops a missed or hallucinated structure from the mean: such
summaries still count for every other metric, and `outdated_metrics` names HD95 for them.

Checking `metrics.csv` costs milliseconds a run, so `Checker` remembers each run's verdict, keyed by the size,
modification time, change time and inode of its three files and by what the verdict depends on (the registry's
labels, the test split): an edited file is always checked again.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import stat
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from segbook.errors import SegbookError
from segbook.io import atomic_write_text
from segbook.runs import EVALUATION, MANIFEST, METRICS, SUMMARY, FolderParts, Identity

if TYPE_CHECKING:
    from segbook.data.split import Split
    from segbook.registry import DatasetEntry

#: The version of the metrics' conventions that `segbook evaluate` writes (`summary.json["settings"]`), and the
#: metrics each version changed: a summary of an older version is not averaged with newer ones for those.
METRICS_VERSION = 2
CHANGED_IN = {2: ("hd95",)}
METRIC_COLUMNS = ("dice", "iou", "precision", "recall", "nsd", "hd95")
FRACTIONS = ("dice", "iou", "precision", "recall", "nsd")
LESION_COLUMNS = ("lesions_reference", "lesions_detected", "lesions_false_positive")
#: metrics.csv's columns, in the order `segbook evaluate` writes them.
CSV_COLUMNS = ("case", "label", "label_name", *METRIC_COLUMNS, "tp", "fp", "fn", "tn", "reference_voxels",
               "prediction_voxels", "reference_volume_mm3", "prediction_volume_mm3", *LESION_COLUMNS)
#: Columns every metrics.csv has; evaluations before IoU, precision, recall and lesion counts lack the others.
REQUIRED_COLUMNS = ("case", "label", "label_name", "dice", "nsd", "hd95", "tp", "fp", "fn", "tn",
                    "reference_voxels", "prediction_voxels", "reference_volume_mm3", "prediction_volume_mm3")
COUNTS = ("tp", "fp", "fn", "tn", "reference_voxels", "prediction_voxels")
#: Two numbers that should be equal may differ by this much (floats printed with fewer digits, sums in another
#: order): far below the 0.01 points (1e-4) tables print.
TOLERANCE = 1e-6
#: Sizes a sane evaluation stays far below: summary.json and run.json are kilobytes, metrics.csv megabytes.
MAX_JSON_BYTES = 8 * 2**20
MAX_CSV_BYTES = 256 * 2**20
CASE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
SHA256_PATTERN = re.compile(r"[0-9a-f]{64}")
#: What metrics.csv writes for a missing number (pandas writes NaN as an empty cell).
MISSING = ("", "nan", "NaN")
#: Bump when a check changes, so that remembered verdicts are not trusted across it.
CHECKS_VERSION = 2  # 2: the prediction cost record is checked
CACHE_FORMAT = "segbook-evaluation-verdicts"


class EvaluationFileError(SegbookError):
    """An evaluation file that cannot be read at all (missing, too large, not JSON)."""


@dataclass(frozen=True)
class Exclusions:
    """What a run's means leave out: of its (case, label) pairs, those a metric is undefined on (reference and
    prediction both empty), and of its labels, those undefined on every test case (left out of the run's mean)."""

    pairs: int
    labels: int
    #: metric -> (pairs left out, labels left out)
    excluded: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A run's evaluation files: their problems (each naming its file; none: valid), the run its summary names when
    that is not the folder's, and what its means leave out."""

    problems: tuple[str, ...] = ()
    other_run: str | None = None
    exclusions: Exclusions | None = None

    @property
    def problem(self) -> str | None:
        return self.problems[0] if self.problems else None


# --- reading ---------------------------------------------------------------------------------------------------


def read_json(path: Path) -> Any:
    """A JSON file of a run folder: a plain file under MAX_JSON_BYTES (`EvaluationFileError` otherwise;
    FileNotFoundError when there is none). NaN and Infinity parse (Python's json does), and the checks refuse them."""
    try:
        with open(path, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JSON_BYTES:
                raise EvaluationFileError(f"{path}: not a plain JSON file under {MAX_JSON_BYTES // 2**20} MiB")
            return json.loads(file.read())
    except IsADirectoryError:
        raise EvaluationFileError(f"{path}: not a plain JSON file") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        raise EvaluationFileError(f"{path} is not JSON ({error})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def metrics_version(summary: dict[str, Any]) -> int:
    """The conventions a summary was computed under (1: written before they were recorded)."""
    version = (summary.get("settings") or {}).get("metrics_version", 1)
    return version if _is_count(version) else 1


def outdated_metrics(summary: dict[str, Any]) -> set[str]:
    """The metrics whose convention changed since the summary was written: not averaged with newer runs."""
    return {m for version, metrics in CHANGED_IN.items() if version > metrics_version(summary) for m in metrics}


# --- the run record --------------------------------------------------------------------------------------------


def other_run(record: Any, parts: FolderParts, entry: "DatasetEntry") -> str | None:
    """The run a `run` record (summary.json's, run.json's) names when it is not the run of its folder, described;
    None when it is, or when the record predates identities. A summary copied into another seed's, fraction's, budget's,
    fold's, plans' or dataset's folder would otherwise be averaged as that run. Fields a record lacks (written
    before they existed) are the defaults (recipe, seed, fraction, budget) or not compared (task, fold, plans)."""
    if not isinstance(record, dict) or "model" not in record:
        return None
    try:
        named = Identity.from_record(record)
    except (KeyError, TypeError, ValueError, SegbookError):
        return f"no run segbook knows ({_short(record)})"
    if named != parts.identity:
        return named.describe()
    folder = {"task": entry.key, "fold": parts.fold, "plans": parts.plans}
    wrong = [f"{key} {record[key]}" for key, value in folder.items() if key in record and str(record[key]) != value]
    return f"{named.describe()}, {', '.join(wrong)}" if wrong else None


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- summary.json ----------------------------------------------------------------------------------------------


def summary_problems(summary: Any, entry: "DatasetEntry") -> list[str]:
    """Structure, types and ranges of a summary (the problems, without the file's name)."""
    if not isinstance(summary, dict):
        return ["not a JSON object"]
    num_cases = summary.get("num_cases")
    if not _is_count(num_cases) or num_cases < 1:
        return [f"num_cases {_short(num_cases)} is not a positive integer"]
    problems = _optional_records(summary)
    labels = summary.get("labels")
    expected = {str(label.index) for label in entry.foreground_labels}
    if not isinstance(labels, dict) or set(labels) != expected:
        given = sorted(labels) if isinstance(labels, dict) else _short(labels)
        return [*problems, f"labels {given} are not the dataset's foreground labels {sorted(expected, key=int)}"]
    for index, metrics in labels.items():
        problems += [f"label {index} {problem}" for problem in _label_problems(metrics, num_cases)]
    foreground = summary.get("foreground_mean")
    if foreground is not None:
        problems += [f"foreground_mean {problem}" for problem in _means_problems(foreground)]
    lesions = summary.get("lesions")
    if lesions is not None:
        problems += [f"lesions {problem}" for problem in _lesion_problems(lesions)]
    return problems


def _optional_records(summary: dict[str, Any]) -> list[str]:
    """The records older summaries may lack: each, when present, of the type segbook writes."""
    problems = []
    for key in ("run", "settings", "training", "split"):
        if summary.get(key) is not None and not isinstance(summary[key], dict):
            problems.append(f"{key} {_short(summary[key])} is not an object")
    settings = summary.get("settings") or {}
    if isinstance(settings, dict):
        if settings.get("empty_dice", "nan") not in ("nan", "one"):
            problems.append(f"settings.empty_dice {_short(settings['empty_dice'])} is not 'nan' or 'one'")
        version = settings.get("metrics_version", 1)
        if not _is_count(version) or not 1 <= version <= METRICS_VERSION:
            problems.append(f"settings.metrics_version {_short(version)} is not one this segbook knows "
                            f"(1-{METRICS_VERSION})")
    split = summary.get("split") or {}
    if isinstance(split, dict):
        sha = split.get("sha256")
        if sha is not None and not (isinstance(sha, str) and SHA256_PATTERN.fullmatch(sha)):
            problems.append(f"split.sha256 {_short(sha)} is not a SHA-256")
        if "n_test" in split and not (_is_count(split["n_test"]) and split["n_test"] > 0):
            problems.append(f"split.n_test {_short(split['n_test'])} is not a positive integer")
    training = summary.get("training") or {}
    if isinstance(training, dict) and "complete" in training and not isinstance(training["complete"], bool):
        problems.append(f"training.complete {_short(training['complete'])} is not true or false")
    sha = summary.get("metrics_sha256")
    if sha is not None and not (isinstance(sha, str) and SHA256_PATTERN.fullmatch(sha)):
        problems.append(f"metrics_sha256 {_short(sha)} is not a SHA-256")
    return problems + _cost_problems(summary.get("cost"))


#: `cost.prediction`'s fields (`segbook.training.cost.measured_prediction`) and what each must be when not null.
PREDICTION_COST = {"device": ("one of cpu, cuda, mps", lambda v: v in ("cpu", "cuda", "mps")),
                   "cases": ("a count", lambda v: _is_count(v)),
                   "seconds": ("a number of seconds >= 0", lambda v: _is_number(v) and v >= 0),
                   "seconds_per_case": ("a number of seconds >= 0", lambda v: _is_number(v) and v >= 0),
                   "peak_memory_bytes": ("a count of bytes", lambda v: _is_count(v)),
                   "peak_rss_bytes": ("a positive count of bytes", lambda v: _is_count(v) and v > 0),
                   "peak_rss_since": ("'prediction' or 'process start'",
                                      lambda v: v in ("prediction", "process start")),
                   "threads": ("a positive integer", lambda v: _is_count(v) and v > 0)}


def _cost_problems(cost: Any) -> list[str]:
    """The prediction's cost record (the cost table shows it): each field, when present and not null, of its type
    and range."""
    if cost is None:
        return []
    prediction = cost.get("prediction") if isinstance(cost, dict) else None
    if not isinstance(cost, dict) or not isinstance(prediction, (dict, type(None))):
        return [f"cost {_short(cost)} is not an object with a prediction object"]
    return [f"cost.prediction.{key} {_short(prediction[key])} is not {what}"
            for key, (what, valid) in PREDICTION_COST.items()
            if (prediction or {}).get(key) is not None and not valid(prediction[key])]


def _label_problems(metrics: Any, num_cases: int) -> list[str]:
    if not isinstance(metrics, dict):
        return ["is not an object"]
    problems = _means_problems(metrics)
    valid = metrics.get("valid_cases")
    if valid is not None and not (_is_count(valid) and valid <= num_cases):
        problems.append(f"valid_cases {_short(valid)} is not a count of at most num_cases ({num_cases})")
    scored = metrics.get("scored_cases")
    if scored is not None and not (isinstance(scored, dict) and set(scored) <= set(METRIC_COLUMNS) and all(
            _is_count(n) and n <= num_cases for n in scored.values())):
        problems.append(f"scored_cases {_short(scored)} is not a count of at most num_cases ({num_cases}) per "
                        "metric")
    return problems + _lesion_problems(metrics, required=False)


def _means_problems(metrics: Any) -> list[str]:
    if not isinstance(metrics, dict):
        return ["is not an object"]
    return [f"{metric} {_short(metrics[metric])} is not a valid {metric} ({_range_text(metric)} or null)"
            for metric in METRIC_COLUMNS if metrics.get(metric) is not None and not _in_range(metrics[metric], metric)]


def _lesion_problems(record: Any, required: bool = True) -> list[str]:
    if not isinstance(record, dict):
        return ["is not an object"]
    problems = [f"{key} {_short(record[key])} is not a count" for key in LESION_COLUMNS
                if (required or key in record) and not _is_count(record.get(key))]
    for key, low_high in (("lesion_sensitivity", (0.0, 1.0)), ("false_positive_lesions_per_case", (0.0, math.inf))):
        value = record.get(key)
        if value is not None and not (_is_number(value) and low_high[0] <= value <= low_high[1]):
            problems.append(f"{key} {_short(value)} is out of range")
    return problems


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(value: Any, metric: str) -> bool:
    return _is_number(value) and (0.0 <= value <= 1.0 if metric in FRACTIONS else value >= 0.0)


def _range_text(metric: str) -> str:
    return "a fraction in [0, 1]" if metric in FRACTIONS else "a distance >= 0 mm"


# --- metrics.csv -----------------------------------------------------------------------------------------------


@dataclass
class Rows:
    """metrics.csv's rows as arrays, with the checks' findings: `problems` (each naming its line) and the facts
    the summary is compared with."""

    problems: list[str]
    sha256: str = ""
    cases: list[str] = field(default_factory=list)
    #: label -> {metric: (mean over the cases where it is defined, NaN if none; how many cases that is)}
    means: dict[int, dict[str, tuple[float, int]]] = field(default_factory=dict)
    #: label -> lesion counts summed over the cases (lesion labels, where the columns exist)
    lesions: dict[int, dict[str, int]] = field(default_factory=dict)


def read_rows(path: Path, entry: "DatasetEntry", empty_dice: str = "nan", version: int = METRICS_VERSION) -> Rows:
    """Every check of metrics.csv on its own, against the dataset's foreground labels and the conventions its
    summary records (`empty_dice`, metrics `version`)."""
    import pandas as pd

    try:
        size = os.stat(path).st_size
        if size > MAX_CSV_BYTES:
            return Rows([f"larger than {MAX_CSV_BYTES // 2**20} MiB"])
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return Rows(["missing: without it the summary cannot be checked (run segbook evaluate again)"])
    rows = Rows([], sha256=hashlib.sha256(data).hexdigest())
    table, rows.problems = _parse(data)
    if rows.problems:
        return rows
    labels = {label.index: label.kind == "lesion" for label in entry.foreground_labels}
    columns = {name: table[name].to_numpy(dtype=np.float64) for name in table.columns if name not in
               ("case", "label_name")}
    which, cases = pd.factorize(table["case"].fillna("").to_numpy(dtype=object))  # each row's case as a number
    rows.problems = (_cell_problems(which, cases, columns, labels) or _grid_problems(which, cases, columns, labels)
                     or _count_problems(which, cases, columns) or _convention_problems(columns, empty_dice, version)
                     or _lesion_row_problems(columns, labels))
    if not rows.problems:
        rows.cases = sorted(cases)
        rows.means, rows.lesions = _facts(columns, labels)
    return rows


def _parse(data: bytes) -> tuple[Any, list[str]]:
    """The table (numbers as floats, NaN where empty) or the problems that keep it from being one."""
    import pandas as pd

    try:
        header = next(csv.reader(io.StringIO(data[:65536].decode("utf-8", errors="replace"))), [])
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if missing or unknown or len(set(header)) != len(header):
            return None, [f"columns {', '.join(REQUIRED_COLUMNS)} are required and the others of "
                          f"{', '.join(CSV_COLUMNS)} allowed, each once (missing: {', '.join(missing) or '-'}; "
                          f"unknown: {', '.join(unknown) or '-'})"]
        short = _ragged_line(data, len(header))
        if short:
            return None, [f"line {short}: its number of cells differs from the header's"]
        numbers = {name: "float64" for name in header if name not in ("case", "label_name")}
        with warnings.catch_warnings():
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(io.BytesIO(data), index_col=False, encoding="utf-8", keep_default_na=False,
                                na_values=list(MISSING), dtype={"case": object, **numbers},
                                usecols=lambda name: name != "label_name")
    except (pd.errors.ParserWarning, pd.errors.ParserError) as error:
        line = re.search(r"line (\d+)", str(error))
        return None, [f"line {line[1] if line else 2}: its number of cells differs from the header's"]
    except (ValueError, UnicodeDecodeError, csv.Error):
        return None, _unparsable(data)
    return table, []


def _ragged_line(data: bytes, width: int) -> int | None:
    """The first line with another number of cells than the header (pandas fills a short row with NaN)."""
    lines = data.count(b"\n") + (not data.endswith(b"\n"))
    if b'"' not in data and data.count(b",") == (width - 1) * lines:
        return None  # every line as wide as the header (a longer one makes pandas fail, naming it)
    if b'"' in data:  # quoted cells may hold commas: let the csv module split them
        lengths = [len(record) for record in csv.reader(io.StringIO(data.decode("utf-8", errors="replace")))]
    else:
        lengths = [line.count(b",") + 1 for line in data.splitlines()]
    return next((line for line, length in enumerate(lengths, start=1) if length not in (0, 1, width)), None)


def _unparsable(data: bytes) -> list[str]:
    """Where a table that pandas would not read goes wrong (slow, only for broken files)."""
    try:
        reader = csv.reader(io.StringIO(data.decode("utf-8")))
        header = next(reader)
        for line, record in enumerate(reader, start=2):
            for name, text in zip(header, record):
                if name not in ("case", "label_name") and text not in MISSING:
                    try:
                        float(text)
                    except ValueError:
                        return [f"line {line}: {name} {text!r} is not a number"]
    except (UnicodeDecodeError, csv.Error) as error:
        return [f"not a UTF-8 CSV file ({error})"]
    return ["not a CSV file pandas can read"]


def _first(bad: np.ndarray, what: Callable[[int], str]) -> list[str]:
    """One problem for the rows where `bad` is set: the first, with its line, and how many more."""
    where = np.flatnonzero(bad)
    if not len(where):
        return []
    more = f" (and {len(where) - 1} more row(s))" if len(where) > 1 else ""
    return [f"line {where[0] + 2}: {what(int(where[0]))}{more}"]


def _cell_problems(which: np.ndarray, cases: np.ndarray, columns: dict[str, np.ndarray],
                   labels: dict[int, bool]) -> list[str]:
    bad_case = np.array([not CASE_PATTERN.fullmatch(case) for case in cases], dtype=bool)
    problems = _first(bad_case[which], lambda i: f"case {cases[which[i]]!r} is not a case id")
    label = columns["label"]
    known = sorted(labels)
    problems += _first(~np.isin(label, known),
                       lambda i: f"label {float(label[i])!r} is not one of the dataset's foreground labels {known}")
    for name, values in columns.items():
        if name in COUNTS:
            problems += _first(np.isnan(values), lambda i, n=name: f"{n} is empty")
        present = ~np.isnan(values)
        if name in (*COUNTS, *LESION_COLUMNS):
            bad = present & ((values < 0) | (values != np.round(values)) | ~np.isfinite(values))
        elif name in FRACTIONS:
            bad = present & ((values < 0) | (values > 1))
        elif name != "label":
            bad = present & ((values < 0) | ~np.isfinite(values))
        else:
            continue
        problems += _first(bad, lambda i, n=name, v=values: f"{n} {float(v[i])!r} is out of range")
    return problems


def _grid_problems(which: np.ndarray, cases: np.ndarray, columns: dict[str, np.ndarray],
                   labels: dict[int, bool]) -> list[str]:
    """Exactly one row per (test case, foreground label)."""
    label = columns["label"].astype(np.int64)
    keys = which.astype(np.int64) * (max(labels) + 1) + label
    order = np.argsort(keys, kind="stable")
    twice = np.zeros(len(keys), dtype=bool)
    twice[order[1:]] = keys[order[1:]] == keys[order[:-1]]  # every repetition after a key's first row
    problems = _first(twice, lambda i: f"case {cases[which[i]]} label {label[i]} is given twice")
    if not problems and len(keys) != len(cases) * len(labels):
        problems.append(f"{len(keys)} rows; one per test case ({len(cases)}) and label ({len(labels)}) is "
                        "required, each once")
    return problems


def _count_problems(which: np.ndarray, cases: np.ndarray, columns: dict[str, np.ndarray]) -> list[str]:
    """Voxel counts that add up: reference = TP + FN, prediction = TP + FP, and one image size per case."""
    tp, fp, fn, tn = (columns[name] for name in ("tp", "fp", "fn", "tn"))
    problems = _first(columns["reference_voxels"] != tp + fn,
                      lambda i: f"reference_voxels {columns['reference_voxels'][i]:.0f} is not tp + fn")
    problems += _first(columns["prediction_voxels"] != tp + fp,
                       lambda i: f"prediction_voxels {columns['prediction_voxels'][i]:.0f} is not tp + fp")
    total = tp + fp + fn + tn
    size = np.full(len(cases), np.nan)
    size[which[::-1]] = total[::-1]  # each case's first row's total
    return problems + _first(total != size[which], lambda i: f"tp + fp + fn + tn is {total[i]:.0f}, not the size "
                                                             f"of case {cases[which[i]]}'s image in its other rows")


def ratios_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, empty_dice: str = "nan") -> dict[str, Any]:
    """Dice, IoU, precision and recall as the confusion counts make them, with the empty-mask convention (one
    empty mask: 0; both empty: NaN, or 1 with empty_dice 'one')."""
    both_empty = math.nan if empty_dice == "nan" else 1.0
    any_voxel = tp + fp + fn > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = {"dice": 2 * tp / (2 * tp + fp + fn), "iou": tp / (tp + fp + fn),
                  "precision": np.where(tp + fp > 0, tp / (tp + fp), 0.0),
                  "recall": np.where(tp + fn > 0, tp / (tp + fn), 0.0)}
    return {name: np.where(any_voxel, value, both_empty) for name, value in ratios.items()}


def _convention_problems(columns: dict[str, np.ndarray], empty_dice: str, version: int) -> list[str]:
    """Every metric as the counts make it: the ratios exactly (to TOLERANCE); NSD and HD95 where the masks are
    empty or identical (elsewhere they depend on the surfaces, which the file does not hold), and HD95 defined
    exactly where the conventions define it."""
    tp, fp, fn = columns["tp"], columns["fp"], columns["fn"]
    problems = []
    for name, expected in ratios_from_counts(tp, fp, fn, empty_dice).items():
        if name in columns:
            problems += _mismatch(name, columns[name], expected, columns)
    reference, prediction = tp + fn > 0, tp + fp > 0
    both, one = ~reference & ~prediction, reference ^ prediction
    same = reference & prediction & (fp == 0) & (fn == 0)
    perfect = 1.0 if empty_dice == "one" else math.nan
    problems += _mismatch("nsd", columns["nsd"], np.select([both, one, same], [perfect, 0.0, 1.0], np.nan),
                          columns, where=both | one | same)
    worst_case = version >= 2  # HD95 of one empty mask: the image diagonal (version 1: NaN)
    empty_hd95 = 0.0 if worst_case and empty_dice == "one" else math.nan
    undefined = both | one if not worst_case else both
    hd95 = columns["hd95"]
    problems += _mismatch("hd95", hd95, np.select([undefined, same], [empty_hd95, 0.0], np.nan), columns,
                          where=undefined | same)
    return problems + _first(~undefined & np.isnan(hd95), lambda i: f"hd95 is empty with tp {tp[i]:.0f}, fp "
                                                                    f"{fp[i]:.0f}, fn {fn[i]:.0f}: a distance is "
                                                                    "required where either mask has the label")


def _mismatch(name: str, values: np.ndarray, expected: np.ndarray, columns: dict[str, np.ndarray],
              where: np.ndarray | None = None) -> list[str]:
    both_nan = np.isnan(values) & np.isnan(expected)
    with np.errstate(invalid="ignore"):
        bad = ~both_nan & ~(np.abs(values - expected) <= TOLERANCE)
    if where is not None:
        bad &= where
    tp, fp, fn = columns["tp"], columns["fp"], columns["fn"]
    return _first(bad, lambda i: f"{name} {float(values[i])!r} does not follow from tp {tp[i]:.0f}, fp {fp[i]:.0f}, "
                                 f"fn {fn[i]:.0f} (expected {float(expected[i])!r})")


def _lesion_row_problems(columns: dict[str, np.ndarray], labels: dict[int, bool]) -> list[str]:
    if not all(name in columns for name in LESION_COLUMNS):
        return []
    lesion = np.isin(columns["label"], [index for index, is_lesion in labels.items() if is_lesion])
    counted = ~np.isnan(columns["lesions_reference"])
    problems = _first(lesion != counted, lambda i: "lesion counts are given exactly for the lesion labels")
    return problems + _first(columns["lesions_detected"] > columns["lesions_reference"],
                             lambda i: "lesions_detected exceeds lesions_reference")


def _facts(columns: dict[str, np.ndarray], labels: dict[int, bool]) -> tuple[dict, dict]:
    """Per label: each metric's mean over the cases where it is defined (and how many), and lesion totals."""
    label = columns["label"].astype(np.int64)
    size = max(labels) + 1
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for metric in (m for m in METRIC_COLUMNS if m in columns):
        defined = ~np.isnan(columns[metric])
        counts[metric] = np.bincount(label, weights=defined, minlength=size)
        sums[metric] = np.bincount(label, weights=np.where(defined, columns[metric], 0.0), minlength=size)
    means = {index: {m: (float(sums[m][index] / counts[m][index]) if counts[m][index] else math.nan,
                         int(counts[m][index])) for m in sums} for index in labels}
    lesions = {}
    if all(name in columns for name in LESION_COLUMNS):
        totals = {name: np.bincount(label, weights=np.nan_to_num(columns[name]), minlength=size)
                  for name in LESION_COLUMNS}
        lesions = {index: {name: int(totals[name][index]) for name in LESION_COLUMNS}
                   for index, is_lesion in labels.items() if is_lesion}
    return means, lesions


# --- summary.json and metrics.csv together ---------------------------------------------------------------------


def agreement_problems(summary: dict[str, Any], rows: Rows) -> list[str]:
    """summary.json's numbers follow from metrics.csv's rows (problems without the files' names)."""
    recorded = summary.get("metrics_sha256")
    if recorded is not None and recorded != rows.sha256:
        return ["metrics.csv is not the file summary.json was written with (its SHA-256 differs from "
                "summary.json's metrics_sha256: changed since)"]
    problems = []
    if summary["num_cases"] != len(rows.cases):
        problems.append(f"num_cases {summary['num_cases']} is not metrics.csv's {len(rows.cases)} test cases")
    for index, metrics in summary["labels"].items():
        mine = rows.means[int(index)]
        for metric, (mean, count) in mine.items():
            stated = metrics.get(metric)
            if metric in metrics and not _same(mean, stated):
                problems.append(f"label {index} {metric}: the rows' mean {mean!r} is not summary.json's {stated!r}")
            scored = (metrics.get("scored_cases") or {}).get(metric, count)
            if scored != count:
                problems.append(f"label {index} scored_cases {metric} {scored} is not the rows' {count}")
        problems += [f"label {index} {metric}: summary.json gives it, metrics.csv has no such column"
                     for metric in METRIC_COLUMNS if metrics.get(metric) is not None and metric not in mine]
        if metrics.get("valid_cases", mine["dice"][1]) != mine["dice"][1]:
            problems.append(f"label {index} valid_cases {metrics['valid_cases']} is not the rows' {mine['dice'][1]} "
                            "cases with a Dice")
        problems += _lesion_agreement(metrics, rows.lesions.get(int(index)), summary["num_cases"], f"label {index}")
    return problems + _pooled_problems(summary, rows)


def _same(mean: float, stated: Any) -> bool:
    stated = math.nan if stated is None else stated
    return (math.isnan(mean) and math.isnan(stated)) or abs(mean - stated) <= TOLERANCE


def _lesion_agreement(record: dict[str, Any], totals: dict[str, int] | None, num_cases: int,
                      where: str) -> list[str]:
    if totals is None or "lesions_reference" not in record:
        return []
    problems = [f"{where} {key} {record[key]} is not the rows' {totals[key]}" for key in LESION_COLUMNS
                if record.get(key) != totals[key]]
    reference = totals["lesions_reference"]
    derived = {"lesion_sensitivity": totals["lesions_detected"] / reference if reference else math.nan,
               "false_positive_lesions_per_case": totals["lesions_false_positive"] / num_cases}
    return problems + [f"{where} {key} {record.get(key)!r} does not follow from the rows' lesion counts"
                       for key, value in derived.items() if not _same(value, record.get(key))]


def _pooled_problems(summary: dict[str, Any], rows: Rows) -> list[str]:
    """foreground_mean (the run's score in the file) and the pooled lesion counts follow from the labels."""
    problems = []
    foreground = summary.get("foreground_mean") or {}
    for metric, stated in foreground.items():
        if metric in METRIC_COLUMNS:
            means = [m.get(metric) for m in summary["labels"].values()]
            kept = [value for value in means if value is not None and not math.isnan(value)]
            mean = sum(kept) / len(kept) if kept else math.nan
            if not _same(mean, stated):
                problems.append(f"foreground_mean {metric} {stated!r} is not the mean of the labels' {mean!r}")
    pooled = summary.get("lesions")
    if isinstance(pooled, dict) and rows.lesions:
        totals = {key: sum(label[key] for label in rows.lesions.values()) for key in LESION_COLUMNS}
        problems += _lesion_agreement(pooled, totals, summary["num_cases"], "lesions")
    return problems


def split_problems(summary: dict[str, Any], rows: Rows, split: "Split | None") -> list[str]:
    """The cases are the test split's: the dataset's current split when the summary was scored on it (or
    predates recorded splits), else as many as the split the summary records."""
    recorded = summary.get("split") or {}
    sha, n_test = recorded.get("sha256"), recorded.get("n_test")
    if split is not None and sha in (None, split.sha256):
        if rows.cases != sorted(split.test):
            missing = sorted(set(split.test) - set(rows.cases))
            return [f"its {len(rows.cases)} test case(s) are not the {len(split.test)} of the dataset's test split "
                    f"{split.sha256[:12]} (missing: {', '.join(missing[:5]) or '-'})"]
        n_test = len(split.test) if n_test is None else n_test
        if n_test != len(split.test):
            return [f"split.n_test {n_test} is not the size of the dataset's test split {split.sha256[:12]} "
                    f"({len(split.test)})"]
    if n_test is not None and n_test != summary["num_cases"]:
        return [f"num_cases {summary['num_cases']} is not the size of the test split it records ({n_test})"]
    return []


def training_problems(summary: dict[str, Any], manifest: Any) -> list[str]:
    """A summary that says its run trained its whole budget while run.json says otherwise (the summary of an
    earlier training, or edited) would put an unfinished run in the tables."""
    training = summary.get("training")
    if not isinstance(training, dict) or training.get("complete") is not True or not isinstance(manifest, dict):
        return []
    status = manifest.get("status")
    epochs = manifest.get("epochs")
    done = len(epochs) if isinstance(epochs, list) else manifest.get("epochs_done")
    planned = (manifest.get("settings") or {}).get("epochs") if isinstance(manifest.get("settings"), dict) else None
    if status != "finished" or (_is_count(done) and _is_count(planned) and done < planned):
        return [f"training.complete is true, but run.json says the run is {status!r}"
                + (f" after {done}/{planned} epochs" if _is_count(planned) else "")]
    return []


# --- a run folder ----------------------------------------------------------------------------------------------


def check_run(folder: Path, summary: Any, entry: "DatasetEntry", parts: FolderParts,
              split: "Split | None" = None, evaluation: Path | None = None) -> Verdict:
    """Every check of a run folder's evaluation files (its summary.json already read); problems name the file.
    `evaluation`: another evaluation folder of the run than its own `evaluation/` (a snapshot's,
    `segbook.runs.snapshot_evaluation_folder`), checked the same way."""
    evaluation = evaluation or folder / EVALUATION
    summary_file, metrics_file = evaluation / SUMMARY, evaluation / METRICS
    problems = [f"{summary_file}: {p}" for p in summary_problems(summary, entry)]
    if problems:
        return Verdict(tuple(problems))
    other = other_run(summary.get("run"), parts, entry)
    if other:
        return Verdict((f"{summary_file} scores {other}, not the run of its folder",), other_run=other)
    settings = summary.get("settings") or {}
    rows = read_rows(metrics_file, entry, settings.get("empty_dice", "nan"), metrics_version(summary))
    if rows.problems:
        return Verdict(tuple(f"{metrics_file}: {p}" for p in rows.problems))
    problems = [f"{summary_file} does not follow from {metrics_file}: {p}" for p in agreement_problems(summary, rows)]
    problems += [f"{summary_file}: {p}" for p in split_problems(summary, rows, split)]
    problems += [f"{summary_file}: {p}" for p in training_problems(summary, _manifest(folder))]
    return Verdict(tuple(problems), exclusions=None if problems else _exclusions(rows))


def check_external(folder: Path, summary: Any, trained: "DatasetEntry", parts: FolderParts) -> tuple[Verdict, Rows]:
    """The checks of `check_run` for an external evaluation's folder (`segbook.runs.external_folder`): its summary
    names the run, its scored structures are labels `trained` has under the names it records, and its rows are one
    per recorded case and scored label, following the same conventions; plus the rows, for per-case tables."""
    from segbook.structures import scoring_entry

    summary_file, metrics_file = folder / SUMMARY, folder / METRICS
    problems, scoring = _external_record(summary, trained)
    if problems:
        return Verdict(tuple(f"{summary_file}: {p}" for p in problems)), Rows(problems)
    problems = [f"{summary_file}: {p}" for p in summary_problems(summary, scoring_entry(trained, scoring))]
    other = other_run(summary.get("run"), parts, trained)
    if other and not problems:
        problems = [f"{summary_file} scores {other}, not the run of its folder"]
    if problems:
        return Verdict(tuple(problems)), Rows(problems)
    settings = summary.get("settings") or {}
    rows = read_rows(metrics_file, scoring_entry(trained, scoring), settings.get("empty_dice", "nan"),
                     metrics_version(summary))
    if rows.problems:
        return Verdict(tuple(f"{metrics_file}: {p}" for p in rows.problems)), rows
    problems = [f"{summary_file} does not follow from {metrics_file}: {p}" for p in agreement_problems(summary, rows)]
    cases = summary["external"].get("case_ids")
    if not isinstance(cases, list) or sorted(map(str, cases)) != rows.cases:
        problems.append(f"{summary_file}: external.case_ids are not the cases of {metrics_file}")
    return Verdict(tuple(problems), exclusions=None if problems else _exclusions(rows)), rows


def _external_record(summary: Any, trained: "DatasetEntry") -> tuple[list[str], list[tuple[int, str, str]]]:
    """The scored (label, structure name, kind) an external summary records, checked against the trained dataset."""
    record = summary.get("external") if isinstance(summary, dict) else None
    structures = record.get("structures") if isinstance(record, dict) else None
    if not isinstance(structures, list) or not structures:
        return ["no external record naming the scored structures"], []
    scored = []
    for item in structures:
        try:
            index, name = int(item["label"]), str(item["name"])
            trained_labels = {int(k): str(v) for k, v in item["trained_labels"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            return [f"external structure {_short(item)} is not one segbook writes"], []
        known = {label.index: label.name for label in trained.foreground_labels}
        if index not in trained_labels or any(known.get(i) != n for i, n in trained_labels.items()):
            return [f"external structure {name!r}: labels {trained_labels} are not {trained.key}'s"], []
        scored.append((index, name, trained.labels[index].kind))
    if len({index for index, _, _ in scored}) != len(scored):
        return ["external structures score one label twice"], []
    return [], scored


def _manifest(folder: Path) -> Any:
    try:
        return read_json(folder / MANIFEST)
    except (OSError, EvaluationFileError):
        return None


def _exclusions(rows: Rows) -> Exclusions:
    labels = len(rows.means)
    excluded = {}
    for metric in METRIC_COLUMNS:
        counts = [means[metric][1] for means in rows.means.values() if metric in means]
        if counts:
            excluded[metric] = (len(rows.cases) * len(counts) - sum(counts), sum(1 for n in counts if n == 0))
    return Exclusions(len(rows.cases) * labels, labels, excluded)


# --- remembered verdicts ---------------------------------------------------------------------------------------


class Checker:
    """`check_run` for many runs, remembering verdicts in `cache_file` (a JSON file, written atomically by `save`;
    a damaged or unwritable one is ignored). A verdict is reused only while the run's summary.json, metrics.csv and
    run.json keep their size, modification and change times and inode, and the dataset's labels and current test
    split are those it was given with."""

    def __init__(self, cache_file: Path | None = None,
                 splits: Callable[["DatasetEntry"], "Split | None"] = lambda entry: None):
        self.cache_file = cache_file
        self.splits = splits
        self.verdicts: dict[str, list[Any]] = self._load()
        self.contexts: dict[str, str] = {}
        self.changed = False

    def check(self, folder: Path, entry: "DatasetEntry", parts: FolderParts) -> tuple[Any, Verdict]:
        """The run's summary.json (`read_json`; FileNotFoundError without one) and its verdict."""
        split = self.splits(entry)
        if entry.key not in self.contexts:
            self.contexts[entry.key] = _context(entry, split)
        key = f"{_stats(folder)}|{self.contexts[entry.key]}"  # taken before reading: a later change shows
        summary = read_json(folder / EVALUATION / SUMMARY)
        remembered = self.verdicts.get(str(folder))
        verdict = _verdict(remembered[1]) if remembered is not None and remembered[0] == key else None
        if verdict is None:
            verdict = check_run(folder, summary, entry, parts, split)
            self.verdicts[str(folder)] = [key, _record(verdict)]
            self.changed = True
        return summary, verdict

    def save(self) -> None:
        if self.cache_file is None or not self.changed:
            return
        kept = {folder: value for folder, value in self.verdicts.items() if os.path.isdir(folder)}
        try:
            atomic_write_text(self.cache_file, json.dumps({"format": CACHE_FORMAT, "verdicts": kept},
                                                          separators=(",", ":")))
        except OSError:
            pass  # a read-only home: verdicts are recomputed next time
        self.changed = False

    def _load(self) -> dict[str, list[Any]]:
        try:
            data = json.loads(Path(self.cache_file).read_bytes()) if self.cache_file else {}
            verdicts = data["verdicts"] if data.get("format") == CACHE_FORMAT else {}
            return {k: v for k, v in verdicts.items() if isinstance(v, list) and len(v) == 2}
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return {}


def _stats(folder: Path) -> str:
    """Size, modification and change times and inode of the run's three files: any write changes one."""
    stats = []
    base = str(folder)
    for name in (f"{EVALUATION}/{SUMMARY}", f"{EVALUATION}/{METRICS}", MANIFEST):
        try:
            info = os.stat(f"{base}/{name}")
            stats.append(f"{info.st_size}:{info.st_mtime_ns}:{info.st_ctime_ns}:{info.st_ino}")
        except OSError:
            stats.append("-")
    return "|".join(stats)


def _context(entry: "DatasetEntry", split: "Split | None") -> str:
    """What else a verdict depends on: the checks' version, the dataset's labels and its current test split."""
    labels = ",".join(f"{label.index}:{label.kind}" for label in entry.foreground_labels)
    text = f"{CHECKS_VERSION}|{entry.key}|{labels}|{split.sha256 if split else '-'}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _record(verdict: Verdict) -> list[Any]:
    exclusions = verdict.exclusions
    return [list(verdict.problems), verdict.other_run,
            None if exclusions is None else [exclusions.pairs, exclusions.labels, exclusions.excluded]]


def _verdict(record: Any) -> Verdict | None:
    """A remembered verdict; None when the record is not one (a damaged cache: the run is checked again)."""
    try:
        problems, other, exclusions = record
        if exclusions is not None:
            pairs, labels, excluded = exclusions
            exclusions = Exclusions(int(pairs), int(labels), {m: (int(p), int(n)) for m, (p, n) in excluded.items()})
        return Verdict(tuple(str(problem) for problem in problems), None if other is None else str(other), exclusions)
    except (TypeError, ValueError, AttributeError):
        return None
