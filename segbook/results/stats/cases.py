"""Per dataset over its test cases: pretrained vs scratch (Wilcoxon signed-rank on the per-case foreground mean,
seeds averaged per case), Holm and Benjamini-Hochberg corrected across datasets.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Sequence

import numpy as np
import pandas as pd

from segbook.results.collect import case_scores, run_folders
from segbook.results.configs import configurations, delta_pairs, variant_profiles
from segbook.results.scores import (CONFIG_KEYS, counted_runs, delta_unit, metric_factor, metric_label, metric_sign,
                                    score_lookup, whole_split)
from segbook.results.selection import Selection
from segbook.results.stats.paired import (ALPHA, CASE_TEST_COLUMNS, VERDICTS, frame_table, named_columns, sign_note,
                                          wilcoxon_p)
from segbook.results.tables.table import ResultTable


def case_tests(df: pd.DataFrame, selection: Selection | str = "dice", alpha: float = ALPHA,
               **choices: Any) -> pd.DataFrame:
    """Per dataset and pretrained configuration with a scratch baseline: pretrained vs scratch over the test cases
    both scored (see CASE_TEST_COLUMNS), on the runs on the whole train split.

    Each case's score is the mean over foreground labels of its per-label metric, averaged over the seeds (and
    folds) that scored it (`collect.case_scores`, which reads `metrics.csv`). `delta` is the mean per-case difference
    (points; mm reversed for HD95), `p_value` the two-sided Wilcoxon signed-rank test, `p_holm` and `p_bh` it
    corrected across the datasets of the same configuration (Holm; Benjamini-Hochberg). The verdict is `better` or
    `worse` where `p_holm` < `alpha` (the direction: which of the positive and negative differences have the larger
    rank sum), else `not different`. Only runs with a folder (local, bundled) have cases; numbers imported from CSV are
    left out. The selection's `inits` do not apply."""
    selection = replace(Selection.of(selection, **choices), inits=None)
    metric, df = selection.metric, whole_split(df)
    configs = configurations(df, selection)
    pairs = delta_pairs(configs, variant_profiles(df))
    wanted = {c for pair in pairs for c in pair}
    keys = pd.MultiIndex.from_arrays([df[key] for key in CONFIG_KEYS])
    runs = counted_runs(df[keys.isin(list(wanted)) & df["evaluated"] & run_folders(df)])
    scores = case_scores(runs, metric)
    basis = score_lookup(df, metric, ()).basis
    by_config = {config: frame.set_index(["task", "case"])["score"]
                 for config, frame in scores.groupby(CONFIG_KEYS, sort=False)}
    rows = []
    for config, baseline in pairs:
        if config not in by_config or baseline not in by_config:
            continue
        both = pd.concat([by_config[config], by_config[baseline]], axis=1, keys=["mine", "base"],
                         join="inner").dropna()
        family = [_case_test(task, frame, metric) for task, frame in both.groupby(level="task", sort=True)
                  if basis.get((task, *config)) == basis.get((task, *baseline))]
        rows += [{"model": config[0], "recipe": config[2], "variant": config[3], **row}
                 for row in _corrected(family, alpha)]
    return pd.DataFrame(rows, columns=list(CASE_TEST_COLUMNS))


def _case_test(task: str, frame: pd.DataFrame, metric: str) -> dict[str, object]:
    differences = metric_sign(metric) * (frame["mine"].to_numpy() - frame["base"].to_numpy())
    return {"task": task, "cases": len(differences), "delta": metric_factor(metric) * differences.mean(),
            "p_value": wilcoxon_p(differences), "direction": _rank_direction(differences)}


def _rank_direction(differences: np.ndarray) -> int:
    """+1 when the positive differences have the larger rank sum (what the signed-rank test weighs), -1 when the
    negative ones, 0 when equal."""
    from scipy.stats import rankdata

    nonzero = differences[differences != 0]
    ranks = rankdata(np.abs(nonzero))
    return int(np.sign(ranks[nonzero > 0].sum() - ranks[nonzero < 0].sum()))


def corrected_p(p_values: Sequence[float], method: str, alpha: float = ALPHA) -> np.ndarray:
    """statsmodels' `multipletests` corrected p-values (`holm`, `fdr_bh`). Its Holm branch calls `gc.collect()`,
    which walks every object alive (a large results frame: a fifth of a second a call); the objects that exist
    before the call are frozen out of that walk, and thawed after."""
    import gc

    from statsmodels.stats.multitest import multipletests

    gc.freeze()
    try:
        return multipletests(p_values, alpha=alpha, method=method)[1]
    finally:
        gc.unfreeze()


def _corrected(family: list[dict[str, object]], alpha: float) -> list[dict[str, object]]:
    """Holm and Benjamini-Hochberg over the tests with a p-value; a test without one (all differences zero) is
    `not different`."""
    tested = [row for row in family if not math.isnan(row["p_value"])]
    if tested:
        p_values = [row["p_value"] for row in tested]
        holm = corrected_p(p_values, "holm", alpha)
        bh = corrected_p(p_values, "fdr_bh", alpha)
        for row, p_holm, p_bh in zip(tested, holm, bh):
            row.update(p_holm=float(p_holm), p_bh=float(p_bh))
    for row in family:
        direction = row.pop("direction")
        significant = row.get("p_holm", math.nan) < alpha
        row.setdefault("p_holm", math.nan)
        row.setdefault("p_bh", math.nan)
        row["verdict"] = VERDICTS[0] if significant and direction > 0 else (
            VERDICTS[2] if significant and direction < 0 else VERDICTS[1])
    return family


def case_tests_table(tests: pd.DataFrame, metric: str) -> ResultTable:
    """`case_tests` as a table (`segbook results --table case-tests`)."""
    columns = named_columns(tests)
    table = frame_table("case-tests", f"pretrained vs scratch per dataset over test cases, {metric_label(metric)}",
                         tests, columns)
    table.notes = [
        f"per dataset: the test cases scored by both (cases); a case's score is the mean over its foreground labels "
        f"(seeds and folds averaged per case); delta: mean per-case pretrained - scratch ({delta_unit(metric)}); "
        f"p_value: two-sided Wilcoxon signed-rank over the cases (scipy); p_holm, p_bh: corrected across the "
        f"datasets of each size (statsmodels multipletests, Holm and Benjamini-Hochberg); verdict at p_holm < "
        f"{ALPHA:g}", *sign_note(metric)]
    if tests.empty:
        table.notes = ["no per-case comparison: no dataset has evaluated pretrained and scratch runs of one size"]
    return table
