"""Seeds, training-data fractions, per-case statistics, significance maps, rank stability and the extra metrics, on
hand-made stores with known answers; statistics checked against scipy and statsmodels on the same inputs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import wilcoxon
from statsmodels.stats.multitest import multipletests
from results_helpers import (A, B, C, D, build_store, export_their_bundle, home, write_case_metrics, write_registry,
                             write_run)

from segbook.cli.main import main
from segbook.paths import Paths
from segbook.registry import Registry, load_registry
from segbook.results import (case_tests, collect_results, compare_pretrained, dataset_scores, dataset_table,
                             fraction_table, rank_stability, scale_table, significance_map)
from segbook.results.bundles import import_bundle
from segbook.results.collect import ResultsError, ResultsWarning
from segbook.results.stats import case_tests_table, significance_table
from segbook.results.tables.fractions import smallest_matching_fraction
from segbook.results.tables.table import NOISE_MARK
from segbook.runs import RunSpec

#: (task, init, seed) -> Dice of STU-Net base (one label for C, two equal labels for A): seed spread known.
SEEDED = {(A, "scratch", 0): 0.70, (A, "scratch", 1): 0.72, (A, "scratch", 2): 0.74,
          (A, "pretrained", 0): 0.80, (A, "pretrained", 1): 0.90, (A, "pretrained", 2): 0.70,
          (C, "scratch", 0): 0.50, (C, "scratch", 1): 0.52, (C, "scratch", 2): 0.54,
          (C, "pretrained", 0): 0.60, (C, "pretrained", 1): 0.61, (C, "pretrained", 2): 0.62}


@pytest.fixture
def registry_file(tmp_path: Path) -> Path:
    return write_registry(tmp_path / "registry.yaml")


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return load_registry([write_registry(tmp_path / "registry.yaml")])


@pytest.fixture
def bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Registry) -> Path:
    """Another group's evaluated runs, exported as the bundle `their-lab`."""
    return export_their_bundle(tmp_path, monkeypatch, registry)


@pytest.fixture
def seeded(segbook_home: Path, registry_file: Path):
    """Three seeds of base scratch and pretrained on A and C."""
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    for (task, init, seed), dice in SEEDED.items():
        labels = (dice, dice) if task == A else (dice,)
        write_run(paths.results, registry, task, "base", init, "all", labels, seed=seed)
    return paths, registry


def test_seeds_are_averaged_with_their_standard_deviation(seeded) -> None:
    df = collect_results(*seeded)
    assert sorted(set(df["seed"])) == [0, 1, 2]
    scores = dataset_scores(df).set_index(["task", "init"])
    for task in (A, C):
        for init in ("scratch", "pretrained"):
            values = [SEEDED[(task, init, seed)] for seed in range(3)]
            assert scores.loc[(task, init), "score"] == pytest.approx(np.mean(values))
            assert scores.loc[(task, init), "seed_sd"] == pytest.approx(np.std(values, ddof=1))
            assert scores.loc[(task, init), "seeds"] == 3

    table = scale_table(df)
    row = next(r for r in table.rows if r[:2] == ["base", "pretrained"])
    average = row[table.columns.index("average")]
    per_seed_means = [np.mean([SEEDED[(A, "pretrained", s)], SEEDED[(C, "pretrained", s)]]) for s in range(3)]
    assert average.value == pytest.approx(100 * np.mean(per_seed_means))
    assert average.spread == pytest.approx(100 * np.std(per_seed_means, ddof=1))
    assert average.text() == f"{average.value:.2f} \u00b1{average.spread:.2f} (n=2)"
    assert "average seed sd" in table.records("json")[0]
    # A: delta 0.08, noise max(0.1, 0.02) = 0.1 -> within noise; C: delta 0.09, noise 0.02 -> not
    assert any("Delta(PT) within seed noise on 1 of 2 datasets" in note for note in table.notes)

    datasets = dataset_table(df)
    rows = {r[0]: dict(zip(datasets.columns, r)) for r in datasets.rows}
    assert rows[A]["base delta"].marker == NOISE_MARK and rows[C]["base delta"].marker == ""
    assert rows[A]["base seed noise"] == pytest.approx(10.0) and rows[C]["base seed noise"] == pytest.approx(2.0)
    assert rows[A]["base pretrained"].spread == pytest.approx(10.0)

    overall = compare_pretrained(df, "dice", "all").iloc[0]
    assert overall["delta"] == pytest.approx(100 * np.mean([0.08, 0.09]))  # statistics on per-dataset seed means


def test_one_seed_tables_show_no_spread(segbook_home: Path, registry_file: Path) -> None:
    df = collect_results(*build_store(registry_file))
    table = scale_table(df)
    assert "\u00b1" not in str(table.records("table")) and "average seed sd" not in table.records("json")[0]
    assert not any("seed" in note for note in table.notes)


def test_runs_of_other_splits_among_seeds_are_never_averaged_with_them(seeded) -> None:
    paths, registry = seeded
    write_run(paths.results, registry, A, "base", "scratch", "all", (0.7, 0.7), seed=3, split="b" * 64)
    write_run(paths.results, registry, A, "base", "scratch", "all", (0.7, 0.7), seed=4, split="c" * 64)
    scores = dataset_scores(collect_results(paths, registry)).set_index(["task", "init", "variant"])
    assert scores.loc[(A, "scratch", ""), "seeds"] == 3  # seeds 0-2, recorded before splits were
    assert scores.loc[(A, "scratch", "split bbbbbbbb"), "seeds"] == scores.loc[(A, "scratch", "split cccccccc"),
                                                                              "seeds"] == 1


def test_a_summary_of_another_seed_is_not_averaged_in(seeded) -> None:
    paths, registry = seeded
    seed0 = RunSpec.of(registry.get(C), "base", "pretrained").folder(paths.results)
    seed1 = RunSpec.of(registry.get(C), "base", "pretrained", seed=1).folder(paths.results)
    (seed1 / "evaluation" / "summary.json").write_bytes((seed0 / "evaluation" / "summary.json").read_bytes())
    with pytest.warns(ResultsWarning, match="scores base pretrained \\(recipe segbook\\), not the run of its folder "
                                            "\\(base pretrained \\(recipe segbook, seed 1\\)\\)"):
        df = collect_results(paths, registry)
    row = df[(df["task"] == C) & (df["init"] == "pretrained") & (df["seed"] == 1)].iloc[0]
    assert (row["evaluated"], row["status"]) == (False, "summary.json of another run")
    assert dataset_scores(df).set_index(["task", "init"]).loc[(C, "pretrained"), "seeds"] == 2


# --- fractions -------------------------------------------------------------------------------------------------

#: (init, fraction) -> Dice of base on C, seeds 0 and 1 (pretrained at 0.5 and 1 match scratch at 1: 0.70).
FRACTIONS = {("scratch", 0.25): (0.40, 0.44), ("scratch", 0.5): (0.55, 0.57), ("scratch", 1.0): (0.70, 0.70),
             ("pretrained", 0.25): (0.60, 0.64), ("pretrained", 0.5): (0.70, 0.6996),
             ("pretrained", 1.0): (0.75, 0.77)}


def test_fraction_table_numbers_and_the_smallest_matching_fraction(segbook_home: Path, registry_file: Path) -> None:
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    for (init, fraction), dice in FRACTIONS.items():
        for seed, value in enumerate(dice):
            write_run(paths.results, registry, C, "base", init, "all", (value,), seed=seed, fraction=fraction)
    df = collect_results(paths, registry)
    table = fraction_table(df)
    assert table.columns == ["task", "train cases", "model", "init", "25%", "50%", "100%", "matches scratch@100%"]
    rows = {row[3]: dict(zip(table.columns, row)) for row in table.rows}
    for (init, fraction), dice in FRACTIONS.items():
        cell = rows[init][f"{100 * fraction:g}%"]
        assert (cell.value, cell.spread, cell.count) == (pytest.approx(100 * np.mean(dice)),
                                                          pytest.approx(100 * np.std(dice, ddof=1)), 2)
    assert rows["pretrained"]["train cases"] == 490
    # pretrained at 50%: 69.98, within 0.1 points of scratch's 70.00 at 100%; at 25%: 62.00, not
    assert rows["pretrained"]["matches scratch@100%"] == "50%" and rows["scratch"]["matches scratch@100%"] is None
    # the default tables show the whole train split only
    assert scale_table(df).rows[0][-1].value == pytest.approx(70.0)


def test_matching_must_hold_at_every_larger_fraction() -> None:
    assert smallest_matching_fraction({0.1: 0.80, 0.5: 0.60, 1.0: 0.75}, 0.70, "dice") == 1.0
    assert smallest_matching_fraction({0.1: 0.80, 0.5: 0.71, 1.0: 0.75}, 0.70, "dice") == 0.1
    assert smallest_matching_fraction({0.5: 0.60, 1.0: 0.65}, 0.70, "dice") is None
    # HD95: lower is better; 0.1 mm worse still matches
    assert smallest_matching_fraction({0.25: 5.09, 0.5: 6.0, 1.0: 4.0}, 5.0, "hd95") == 1.0
    assert smallest_matching_fraction({0.25: 5.09, 0.5: 5.0, 1.0: 4.0}, 5.0, "hd95") == 0.25


# --- per-case statistics ---------------------------------------------------------------------------------------


def per_case_store(registry_file: Path):
    """The test store with hand-made per-case Dice of base pretrained (seeds 0 and 1) and scratch (seed 0) on A, C
    and D: pretrained better on A's cases, worse on C's, equal on D's. B keeps the store's constant cases
    (pretrained better by 10 points on each)."""
    paths, registry = build_store(registry_file)
    rng = np.random.default_rng(7)
    cases = {}
    for task, labels, shift in ((A, 2, 0.05), (C, 1, -0.04), (D, 1, 0.0)):
        scratch = rng.uniform(0.5, 0.8, size=(12, labels))
        seeds = [scratch if task == D else scratch + shift + rng.normal(0, 0.01, scratch.shape) for _ in range(2)]
        cases[task] = (scratch, seeds)
        for init, runs in (("scratch", [scratch]), ("pretrained", seeds)):
            for seed, values in enumerate(runs):
                folder = (RunSpec.of(registry.get(task), "base", init).folder(paths.results) if seed == 0 else
                          write_run(paths.results, registry, task, "base", init, "all", tuple(values.mean(axis=0)),
                                    seed=seed))
                write_case_metrics(folder, {f"c{i:02d}": tuple(v) for i, v in enumerate(values)})
    return paths, registry, cases


def test_case_tests_match_scipy_and_statsmodels(segbook_home: Path, registry_file: Path) -> None:
    paths, registry, cases = per_case_store(registry_file)
    df = collect_results(paths, registry)
    tests = case_tests(df).set_index("task")
    expected = {}
    for task in (A, C):
        scratch, seeds = cases[task]
        differences = np.mean(seeds, axis=0).mean(axis=1) - scratch.mean(axis=1)  # seeds averaged per case
        expected[task] = wilcoxon(differences).pvalue
        assert tests.loc[task, "delta"] == pytest.approx(100 * differences.mean())
        assert tests.loc[task, "cases"] == 12
    expected[B] = wilcoxon(np.full(10, 0.1)).pvalue  # B: every case 10 points better
    assert tests.loc[B, "p_value"] == pytest.approx(expected[B])
    p_values = [expected[A], expected[B], expected[C]]  # D is not tested: every difference is zero
    for method, column in (("holm", "p_holm"), ("fdr_bh", "p_bh")):
        corrected = multipletests(p_values, method=method)[1]
        assert tests.loc[[A, B, C], column].tolist() == pytest.approx(list(corrected))
    assert math.isnan(tests.loc[D, "p_value"]) and math.isnan(tests.loc[D, "p_holm"])
    assert tests["verdict"].to_dict() == {A: "better", B: "better", C: "worse", D: "not different"}

    counts = compare_pretrained(df, "dice", "scale", cases=case_tests(df)).set_index(["model", "group"])
    assert counts.loc[("base", "average"), ["better", "not_different", "worse"]].tolist() == [2, 1, 1]
    assert counts.loc[("base", "large"), ["better", "not_different", "worse"]].tolist() == [0, 0, 1]  # C
    table = case_tests_table(case_tests(df), "dice")
    assert table.columns[:3] == ["task", "model", "cases"] and len(table.rows) == 4


def test_case_tests_refuse_runs_not_evaluated_for_the_metric(segbook_home: Path, registry_file: Path) -> None:
    paths, registry = build_store(registry_file)
    df = collect_results(paths, registry)
    with pytest.raises(ResultsError, match="not evaluated for iou \\(run segbook evaluate again\\)"):
        case_tests(df, "iou")


# --- significance maps and rank stability ---------------------------------------------------------------------


def test_significance_map_against_scipy_one_sided_and_holm(segbook_home: Path, registry_file: Path) -> None:
    df = collect_results(*build_store(registry_file))
    significance = significance_map(df, "dice", "all")
    configs = ["nnunet scratch", "base scratch", "base pretrained", "large pretrained"]
    assert len(significance) == len(configs) * (len(configs) - 1)
    scores = {c: dataset_scores(df).query(f"model == '{c.split()[0]}' and init == '{c.split()[1]}'")
              .set_index("task")["score"] for c in configs}
    raw = []
    for config in configs:
        for versus in configs:
            if config != versus:
                both = scores[config].index.intersection(scores[versus].index)
                d = (scores[config][both] - scores[versus][both]).to_numpy()
                raw.append(wilcoxon(d, alternative="greater").pvalue if np.any(d != 0) else math.nan)
    tested = [p for p in raw if not math.isnan(p)]
    corrected = iter(multipletests(tested, method="holm")[1])
    expected = [math.nan if math.isnan(p) else next(corrected) for p in raw]
    assert significance["p_holm"].tolist() == pytest.approx(expected, nan_ok=True)
    table = significance_table(significance)
    assert table.columns == ["group", "configuration", *configs] and len(table.rows) == 4
    assert table.rows[0][2] is None  # the diagonal


def test_rank_stability_is_seeded_and_finds_a_clear_winner(segbook_home: Path, registry_file: Path) -> None:
    df = collect_results(*build_store(registry_file))
    first = rank_stability(df, "dice", "all", models=["nnunet", "base"])
    assert first.equals(rank_stability(df, "dice", "all", models=["nnunet", "base"]))
    shares = first.set_index("config")["first"]
    assert shares.sum() == pytest.approx(1.0) and first["n"].iloc[0] == 4
    # base pretrained beats base scratch on every dataset: never ranks below it
    two = rank_stability(df, "dice", "all", models=["base"]).set_index("config")
    assert two.loc["base pretrained", "first"] == 1.0 and two.loc["base scratch", "mean_rank"] == 2.0


# --- metrics ---------------------------------------------------------------------------------------------------


def test_hd95_is_in_mm_and_its_delta_reversed(segbook_home: Path, registry_file: Path) -> None:
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    for init, hd95 in (("scratch", 8.0), ("pretrained", 5.0)):
        write_run(paths.results, registry, C, "base", init, "all", (0.7,), hd95=hd95)
    df = collect_results(paths, registry)
    table = scale_table(df, "hd95")
    assert table.title == "HD95 (mm, lower is better) by dataset scale"
    rows = {tuple(row[:2]): row[-1] for row in table.rows}
    assert rows[("base", "pretrained")].value == pytest.approx(5.0)
    assert rows[("base", "Delta(PT)")].value == pytest.approx(3.0)  # scratch 8 mm - pretrained 5 mm: helps
    assert any("positive means pretraining helps" in note for note in table.notes)
    overall = compare_pretrained(df, "hd95", "all").iloc[0]
    assert (overall["delta"], overall["wins"]) == (pytest.approx(3.0), 1)


def test_new_metrics_are_read_and_a_run_without_them_says_so(segbook_home: Path, registry_file: Path) -> None:
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    write_run(paths.results, registry, C, "base", "pretrained", "all", (0.7,), ratios=True)  # FP = FN
    write_run(paths.results, registry, C, "base", "scratch", "all", (0.6,))  # evaluated before IoU existed
    df = collect_results(paths, registry)
    rows = {row[0]: dict(zip(dataset_table(df, "iou").columns, row)) for row in dataset_table(df, "iou").rows}
    assert rows[C]["base pretrained"].value == pytest.approx(100 * 0.7 / 1.3)  # IoU = D / (2 - D)
    assert rows[C]["base scratch"].text() == "not evaluated for iou (run segbook evaluate again)"
    assert dataset_table(df, "recall").rows[0][5].value == pytest.approx(70.0)


def test_cli_metrics_fractions_and_statistics_tables(segbook_home: Path, registry_file: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    build_store(registry_file)
    base = ["results", "--registry", str(registry_file)]
    assert main([*base, "--metric", "hd95"]) == 0
    assert "HD95 (mm, lower is better) by dataset scale" in capsys.readouterr().out
    assert main([*base, "--table", "fractions", "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert {r["100%"] for r in records if r["task"] == C and r["init"] == "pretrained"} == {65.0, 70.0}
    assert main([*base, "--stats", "--format", "json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert {"better", "not_different", "worse"} <= set(stats[0])
    for table in ("case-tests", "significance", "ranks"):
        assert main([*base, "--table", table]) == 0
        assert capsys.readouterr().out.strip()
    assert main([*base, "--metric", "iou", "--table", "case-tests"]) == 2
    assert "not evaluated for iou" in capsys.readouterr().err


def test_statistics_on_an_imported_bundle_equal_the_exporters(bundle: Path, tmp_path: Path, registry,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Per-case tests, counts and significance maps work on another group's runs at case level, as on theirs."""
    before = collect_results(Paths.from_env(), registry)
    ours = home(tmp_path, monkeypatch, "our_home")
    import_bundle(bundle, registry, ours)
    after = collect_results(ours, registry)
    assert set(after["source"]) == {"bundle:their-lab"}
    tests = case_tests(after)
    assert len(tests) == 3 and tests["cases"].gt(0).all()
    pd.testing.assert_frame_equal(tests, case_tests(before))
    pd.testing.assert_frame_equal(compare_pretrained(after, cases=tests),
                                  compare_pretrained(before, cases=case_tests(before)))
    pd.testing.assert_frame_equal(significance_map(after), significance_map(before))
