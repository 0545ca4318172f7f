"""Ranking configurations both ways, aggregate-then-rank and rank-then-aggregate (the challenge convention: rank per
case, average the ranks per dataset, then over datasets), on a store whose numbers can be checked by hand and where
the two methods (and ranking on dataset scores alone) crown different configurations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import rankdata

from results_helpers import A, C, D, write_case_metrics, write_registry, write_run

from segbook.cli.main import main
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.results import build_table, collect_results, rank_stability

X, Y, Z = "nnunet scratch", "base scratch", "base pretrained"
CONFIGS = {X: ("nnunet", "scratch"), Y: ("base", "scratch"), Z: ("base", "pretrained")}
#: Dice of every test case on C and D (their one label); Y and Z tie on C.
UNIFORM = {(C, X): 0.61, (C, Y): 0.60, (C, Z): 0.60, (D, X): 0.40, (D, Y): 0.60, (D, Z): 0.59}
#: A (two labels, scored alike): X wins nine of its ten cases and loses the last badly, so it ranks last on A's
#: dataset scores (X 0.63, Y 0.66, Z 0.65) but first on average over the cases.
PER_CASE = {X: [0.70] * 9 + [0.00], Y: [0.66] * 10, Z: [0.65] * 10}


@pytest.fixture
def ranked_store(segbook_home: Path, tmp_path: Path) -> tuple[Path, pd.DataFrame]:
    registry_file = write_registry(tmp_path / "registry.yaml")
    registry, paths = load_registry([registry_file]), Paths.from_env()
    for (task, name), dice in UNIFORM.items():
        write_run(paths.results, registry, task, *CONFIGS[name], "all", (dice,))
    for name, cases in PER_CASE.items():
        folder = write_run(paths.results, registry, A, *CONFIGS[name], "all", (0.5, 0.5))
        write_case_metrics(folder, {f"case_{i}": (dice, dice) for i, dice in enumerate(cases)})
    return registry_file, collect_results(paths, registry)


def _case_ranks_of_a(results: Path) -> np.ndarray:
    """A's per-case ranks of X, Y, Z, averaged over its cases, computed from the metrics.csv files directly."""
    per_case = []
    for name in (X, Y, Z):
        model, init = CONFIGS[name]
        files = list(results.glob(f"*{A.split('_', 1)[0][4:]}*/*_{model}_{init}_*/fold_all/evaluation/metrics.csv"))
        assert len(files) == 1
        per_case.append(pd.read_csv(files[0]).groupby("case")["dice"].mean())
    scores = pd.concat(per_case, axis=1).to_numpy()
    return rankdata(-scores, axis=1).mean(axis=0)


def test_the_two_methods_disagree_as_computed_by_hand(ranked_store) -> None:
    _, df = ranked_store
    case_ranks = _case_ranks_of_a(Paths.from_env().results)
    assert case_ranks == pytest.approx([1.2, 1.9, 2.9])  # cases 0-8: X Y Z; case 9: Y Z X
    ranks = rank_stability(df, "dice", "all", rank_method="rank-then-aggregate").set_index("config")
    assert ranks.attrs["method"] == "rank-then-aggregate"
    # C: X 1, Y and Z tie at 2.5; D: Y 1, Z 2, X 3; A per case as above
    expected = {X: (1 + 3 + case_ranks[0]) / 3, Y: (2.5 + 1 + case_ranks[1]) / 3, Z: (2.5 + 2 + case_ranks[2]) / 3}
    assert ranks["average_rank"].to_dict() == pytest.approx(expected)
    assert expected[X] == pytest.approx(26 / 15)
    assert set(ranks["n"]) == {3} and set(ranks["per_case"]) == {3}
    assert ranks["first"].sum() == pytest.approx(1.0) and ranks["first"].idxmax() == X
    assert ranks["mean_rank"].sum() == pytest.approx(6.0)  # places 1, 2, 3 in every resample, ties averaged

    means = rank_stability(df, "dice", "all").set_index("config")
    assert means.attrs["method"] == "aggregate-then-rank" and "average_rank" not in means
    # means over datasets: Y (0.60 + 0.60 + 0.66) / 3 = 0.62 > Z 0.6133 > X 0.5467
    assert means["first"].idxmax() == Y and means["mean_rank"].idxmax() == X
    again = rank_stability(df, "dice", "all", rank_method="rank-then-aggregate")
    assert again.equals(rank_stability(df, "dice", "all", rank_method="rank-then-aggregate"))


def test_ranks_table_and_cli_method(ranked_store, capsys: pytest.CaptureFixture) -> None:
    registry_file, df = ranked_store
    table = build_table(df, "ranks", "dice", rank_method="rank-then-aggregate")
    assert table.columns == ["group", "configuration", "n", "ranked per case", "average rank", "first (%)",
                             "mean rank"]
    assert "rank-then-aggregate" in table.title and any("challenge convention" in note for note in table.notes)
    assert main(["results", "--registry", str(registry_file), "--table", "ranks", "--method", "rank-then-aggregate",
                 "--format", "csv"]) == 0
    rows = pd.read_csv(__import__("io").StringIO(capsys.readouterr().out))
    average = rows[rows["group"] == "average"].set_index("configuration")
    assert average["average rank"].to_dict() == pytest.approx({X: 1.73, Y: 1.8, Z: 2.47}, abs=0.005)
    assert main(["results", "--registry", str(registry_file), "--table", "ranks"]) == 0
    assert "aggregate-then-rank" in capsys.readouterr().out
    assert main(["results", "--registry", str(registry_file), "--table", "scale", "--method",
                 "rank-then-aggregate"]) == 2
    assert "does not apply to --table scale" in capsys.readouterr().err


def test_datasets_without_cases_are_ranked_on_their_dataset_scores(segbook_home: Path, tmp_path: Path) -> None:
    """Numbers imported from CSV have no cases: rank-then-aggregate ranks them per dataset, and says so."""
    from segbook.results import import_results

    registry = load_registry([write_registry(tmp_path / "registry.yaml")])
    dataset_scores = {**UNIFORM, **{(A, name): float(np.mean(cases)) for name, cases in PER_CASE.items()}}
    published = tmp_path / "published.csv"
    published.write_text("task,model,init,dice\n" + "".join(
        f"{task},{CONFIGS[name][0]},{CONFIGS[name][1]},{dice}\n" for (task, name), dice in dataset_scores.items()))
    import_results(published, registry)
    ranks = rank_stability(collect_results(Paths.from_env(), registry), "dice", "all",
                           rank_method="rank-then-aggregate")
    assert set(ranks["per_case"]) == {0} and set(ranks["n"]) == {3}
    # A on its dataset scores (X 0.63, Y 0.66, Z 0.65): Y 1, Z 2, X 3
    by_model = {config.split(" [")[0]: rank for config, rank in zip(ranks["config"], ranks["average_rank"])}
    assert by_model == pytest.approx({X: (1 + 3 + 3) / 3, Y: (2.5 + 1 + 1) / 3, Z: (2.5 + 2 + 2) / 3})
