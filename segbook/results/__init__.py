"""Results: collect evaluated runs (and imported numbers), tabulate them, compare pretrained with scratch, report.

    from segbook.results import Selection, collect_results, scale_table, compare_pretrained, write_report
    df = collect_results()                        # a row per run, registry facts joined
    print(scale_table(df, "dice").records("md"))  # or modality_target_table, region_table, dataset_table
    chosen = Selection("hd95", models=["base", "large"], group_datasets=True)
    modality_target_table(df, chosen)             # every table and statistic takes (df, selection) ...
    compare_pretrained(df, "dice", group_by="modality-target")   # ... or a metric and the selection's fields
    build_table(df, "ranks", chosen)              # any table by name, as `segbook results --table NAME` prints it
    write_report(df, "report.html", chosen)
    df = collect_results(recipes=["segbook", "llrd"])   # fine-tuning recipes side by side
    recipe_table(df, "dice"); compare_recipes(df, "dice")
    fraction_table(df, "dice")                    # every training-data fraction; seeds are averaged everywhere
    case_tests(df, "dice")                        # per dataset over test cases (reads metrics.csv), Holm and BH
    significance_map(df, "dice", "scale"); rank_stability(df, "dice", "all")

Definitions are in docs/results.md. Names are imported from their modules when first used, so that the CLI can read
the table registry (`segbook.results.tables`) and `Selection` without pandas.
"""

from __future__ import annotations

import importlib
from typing import Any

#: The module of each name of the API.
_MODULES = {
    "segbook.results.collect": ("ALL_RECIPES", "ResultsError", "ResultsWarning", "collect_results", "import_results",
                                "read_import_csv", "resolve_recipes"),
    "segbook.results.report": ("write_report",),
    "segbook.results.scores": ("dataset_scores",),
    "segbook.results.selection": ("Selection", "TableError"),
    "segbook.results.stats": ("case_tests", "compare_pretrained", "compare_recipes", "paired_comparison",
                              "rank_stability", "recipe_stats_table", "significance_map", "stats_table"),
    "segbook.results.tables": ("build_table",),
    "segbook.results.tables.datasets": ("dataset_table",),
    "segbook.results.tables.fractions": ("fraction_table",),
    "segbook.results.tables.groups": ("modality_target_table", "region_table", "scale_table"),
    "segbook.results.tables.recipes": ("recipe_table",),
    "segbook.results.tables.table": ("Cell", "ResultTable"),
}
_HOME = {name: module for module, names in _MODULES.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
