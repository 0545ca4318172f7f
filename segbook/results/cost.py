"""Cost next to accuracy: what each configuration took to train and predict, and what its pretraining gained per
device-hour (`segbook results --table cost`, and the report's cost section).

Per configuration (model, initialisation, recipe, variant), over its evaluated runs (local and bundled; numbers
imported from CSV carry no cost): training device-hours per run from `run.json["cost"]` (GPU-hours where every run
trained on CUDA: the `device` column says where), the largest peak GPU memory, samples per second, prediction
seconds per test case from `summary.json["cost"]` (apart for the runs evaluated on a GPU and on the CPU, with the
CPU evaluations' threads and peak resident memory: `segbook evaluate --device cpu --threads N`), parameters and
forward TFLOPs of one 128^3 patch (the backbone registry's `Backbone.cost`), and the score: the mean over its
datasets of the dataset scores (`dataset_scores`).
Delta(PT) is the paired mean of pretrained minus scratch of the same network (the scratch variant with its shared
settings, `configs.comparable`) over the datasets that have both with agreeing data and evaluation settings, in
points; Delta(PT) per device-hour divides it by the pretrained configuration's mean training device-hours per run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from segbook import backbones
from segbook.results.collect import run_folders
from segbook.results.configs import DELTA, comparable, config_label, configurations, shows_recipes, variant_profiles
from segbook.results.scores import (CONFIG_KEYS, METRIC_NAMES, SCORE_KEYS, Config, dataset_scores, metric_factor,
                                    metric_label, metric_sign, protocol_note, whole_split)
from segbook.results.selection import Selection
from segbook.results.tables.table import ResultTable
from segbook.runs import MANIFEST, SUMMARY, default_recipe, evaluation_folder

COST_FIELDS = ("device", "device_hours", "gpu_hours", "peak_memory_bytes", "samples_per_second",
               "prediction_device", "prediction_seconds_per_case", "prediction_peak_rss_bytes", "prediction_threads")
#: Where a prediction ran, as the cost table splits it: on a GPU (CUDA, or Apple's MPS) or on the CPU.
ACCELERATORS = ("cuda", "mps")
GIB = 2**30


def run_costs(df: pd.DataFrame) -> pd.DataFrame:
    """Per evaluated run with a folder (local or bundled): its configuration and the cost its files record (NaN or
    None where they record none: runs trained before costs were recorded)."""
    runs = df[df["evaluated"] & run_folders(df)]
    records = [{**dict(zip(SCORE_KEYS, key)), **_recorded_cost(Path(path))}
               for key, path in zip(zip(*(runs[k] for k in SCORE_KEYS)), runs["path"])]
    return pd.DataFrame(records, columns=[*SCORE_KEYS, *COST_FIELDS])


def _recorded_cost(folder: Path) -> dict[str, Any]:
    training = _read_cost(folder / MANIFEST)
    prediction = (_read_cost(evaluation_folder(folder) / SUMMARY) or {}).get("prediction") or {}
    return {"device": training.get("device"), "device_hours": _number(training.get("device_hours")),
            "gpu_hours": _number(training.get("gpu_hours")),
            "peak_memory_bytes": _number(training.get("peak_memory_bytes")),
            "samples_per_second": _number(training.get("samples_per_second")),
            "prediction_device": prediction.get("device"),
            "prediction_seconds_per_case": _number(prediction.get("seconds_per_case")),
            "prediction_peak_rss_bytes": _number(prediction.get("peak_rss_bytes")),
            "prediction_threads": _number(prediction.get("threads"))}


def _read_cost(path: Path) -> dict[str, Any]:
    try:
        cost = json.loads(path.read_bytes()).get("cost")
    except (OSError, ValueError, AttributeError):
        return {}
    return cost if isinstance(cost, dict) else {}


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


def cost_summary(df: pd.DataFrame, selection: Selection | str = "dice", configs: list[Config] | None = None,
                 **choices: Any) -> pd.DataFrame:
    """One row per configuration (`configs`, else the selection's): its costs, parameters, TFLOPs, score, Delta(PT)
    and Delta(PT) per device-hour, of the runs on the whole train split (seeds averaged in the scores; HD95's Delta
    reversed, as in every table)."""
    selection = Selection.of(selection, **choices)
    metric, df = selection.metric, whole_split(df)
    configs = configs if configs is not None else configurations(df, selection)
    costs = run_costs(df)
    scores = dataset_scores(df, metric)
    by_config = {config: dict(zip(group["task"], zip(group["score"], group["basis"])))
                 for config, group in scores.groupby(CONFIG_KEYS)}
    profiles = variant_profiles(df)
    rows = []
    for config in configs:
        mine = costs[(costs[CONFIG_KEYS] == pd.Series(config, index=CONFIG_KEYS)).all(axis=1)]
        timed = mine[mine["device_hours"].notna()]
        dataset_values = {task: score for task, (score, _) in by_config.get(config, {}).items()}
        parameters, macs = backbones.cost(config[0]) or (math.nan, math.nan)
        delta = _delta(by_config, config, metric, profiles)
        hours = timed["device_hours"].mean() if len(timed) else math.nan
        rows.append({"model": config[0], "init": config[1], "recipe": config[2], "variant": config[3],
                     "runs": len(mine),
                     "costed_runs": len(timed), "device": "+".join(sorted(set(timed["device"].dropna()))) or None,
                     "device_hours_per_run": hours, "device_hours_total": timed["device_hours"].sum(),
                     "peak_memory_gib": mine["peak_memory_bytes"].max() / GIB,
                     "samples_per_second": timed["samples_per_second"].mean(),
                     **_prediction_costs(mine),
                     "params_m": parameters / 1e6, "forward_tflops": 2 * macs / 1e12,
                     "score": (metric_factor(metric) * sum(dataset_values.values()) / len(dataset_values)
                               if dataset_values else math.nan),
                     "datasets": len(dataset_values), "delta": delta,
                     "delta_per_device_hour": delta / hours if hours and hours > 0 else math.nan})
    return pd.DataFrame(rows)


def _prediction_costs(runs: pd.DataFrame) -> dict[str, Any]:
    """Prediction seconds per case of the runs evaluated on a GPU and, apart, of those evaluated on the CPU, with the
    CPU evaluations' threads (each number used, "+"-joined) and largest peak resident memory."""
    gpu = runs[runs["prediction_device"].isin(ACCELERATORS)]
    cpu = runs[runs["prediction_device"] == "cpu"]
    threads = sorted({int(n) for n in cpu["prediction_threads"].dropna()})
    return {"gpu_prediction_seconds_per_case": gpu["prediction_seconds_per_case"].mean(),
            "cpu_prediction_seconds_per_case": cpu["prediction_seconds_per_case"].mean(),
            "cpu_threads": "+".join(map(str, threads)) or None,
            "cpu_peak_rss_gib": cpu["prediction_peak_rss_bytes"].max() / GIB}


def _delta(by_config: dict[Config, dict[str, tuple[float, str]]], config: Config, metric: str,
           profiles: dict[Config, dict[str, Any]]) -> float:
    """The paired mean of `config` minus its network's comparable scratch variant, over the datasets where both
    have scores of agreeing bases."""
    if config[1] != "pretrained":
        return math.nan
    candidates = [c for c in by_config if c[:3] == (config[0], "scratch", default_recipe(config[0], "scratch"))]
    baseline = comparable(config, candidates, profiles)
    scratch = by_config.get(baseline, {}) if baseline else {}
    factor = metric_sign(metric) * metric_factor(metric)
    pairs = [factor * (score - scratch[task][0]) for task, (score, basis) in by_config.get(config, {}).items()
             if task in scratch and scratch[task][1] == basis]
    return sum(pairs) / len(pairs) if pairs else math.nan


def cost_table(df: pd.DataFrame, selection: Selection | str = "dice", configs: list[Config] | None = None,
               summary: pd.DataFrame | None = None, **choices: Any) -> ResultTable:
    """`segbook results --table cost`: the configurations asked for (`configs`, else the selection's);
    `summary`: their `cost_summary`, when already computed."""
    selection = Selection.of(selection, **choices)
    metric = selection.metric
    configs = configs if configs is not None else configurations(df, selection)
    summary = summary if summary is not None else cost_summary(df, selection, configs)
    named = shows_recipes(configs)
    name = METRIC_NAMES[metric]
    table = ResultTable("cost", f"Cost next to {name}: training, prediction and network size per configuration",
                        ["configuration", "runs", "device", "device-hours/run", "device-hours total",
                         "peak GPU memory (GiB)", "samples/s", "GPU prediction s/case", "CPU prediction s/case",
                         "CPU threads", "CPU peak RSS (GiB)", "params (M)", "forward TFLOPs", metric_label(metric),
                         "datasets", DELTA, f"{DELTA} per device-hour"])
    for row, config in zip(summary.itertuples(), configs):
        table.rows.append([config_label(config, named), f"{row.costed_runs}/{row.runs}",
                           row.device if isinstance(row.device, str) else "-",
                           *(_rounded(value, digits) for value, digits in (
                               (row.device_hours_per_run, 3), (row.device_hours_total, 3),
                               (row.peak_memory_gib, 2), (row.samples_per_second, 2),
                               (row.gpu_prediction_seconds_per_case, 2), (row.cpu_prediction_seconds_per_case, 2))),
                           row.cpu_threads if isinstance(row.cpu_threads, str) else "-",
                           *(_rounded(value, digits) for value, digits in (
                               (row.cpu_peak_rss_gib, 2), (row.params_m, 1), (row.forward_tflops, 2), (row.score, 2))),
                           row.datasets, _rounded(row.delta, 2), _rounded(row.delta_per_device_hour, 3)])
    table.notes = [
        "runs: evaluated runs with a cost record / all evaluated runs (local and bundled; CSV imports carry no "
        "cost); device-hours: the sum of the epochs' wall times x devices, over every attempt; they are GPU-hours "
        "where device is cuda, CPU hours where it is cpu",
        "peak GPU memory: the largest torch.cuda.max_memory_allocated of its runs ('-' off CUDA: never measured); "
        "prediction s/case: the test split's prediction time over its cases, the mean over the runs evaluated on a "
        "GPU (cuda or mps) and, apart, over those evaluated on the CPU (segbook evaluate --device cpu); CPU threads: "
        "the intra-op threads of those CPU evaluations (--threads N; each number used, + joined); CPU peak RSS: the "
        "largest peak resident memory of the evaluating process while it predicted (Linux VmHWM; worker processes "
        "of --num-processes > 1 not counted)",
        "params and forward TFLOPs (2 x multiply-accumulates) of one 128^3 patch; nnU-Net's network depends on each "
        "dataset's plans",
        f"{name}: mean over the configuration's datasets (seeds averaged; the runs on the whole train split); "
        f"{DELTA}: mean of (pretrained - scratch) over the datasets with both, in "
        f"{'mm, reversed (scratch - pretrained: lower is better)' if metric_sign(metric) < 0 else 'points'}; per "
        f"device-hour: {DELTA} / the pretrained runs' mean device-hours per run",
        *protocol_note(df)]
    return table


def _rounded(value: Any, digits: int) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else round(float(value), digits)


def cost_figure(summary: pd.DataFrame, metric: str = "dice"):
    """Score against training device-hours per run and against forward TFLOPs, one point per configuration of a
    `cost_summary` (the report's cost figure); None when no configuration has both."""
    from matplotlib.figure import Figure

    panels = [("device_hours_per_run", "training device-hours per run (log)"),
              ("forward_tflops", "forward TFLOPs, one 128^3 patch (log)")]
    if summary.empty or all(summary[[column, "score"]].dropna().empty for column, _ in panels):
        return None
    figure = Figure(figsize=(10, 4), layout="constrained")
    for axis, (column, label) in zip(figure.subplots(1, 2), panels):
        shown = summary.dropna(subset=[column, "score"])
        shown = shown[shown[column] > 0]
        for row in shown.itertuples():
            marker = "o" if row.init == "pretrained" else "s"
            axis.scatter(getattr(row, column), row.score, marker=marker, s=40)
            axis.annotate(config_label((row.model, row.init, row.recipe, row.variant),
                                       row.recipe != default_recipe(row.model, row.init)),
                          (getattr(row, column), row.score), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if len(shown):
            axis.set_xscale("log")
        axis.set_xlabel(label)
        axis.set_ylabel(f"mean {metric_label(metric)}")
        axis.grid(alpha=0.3)
    return figure
