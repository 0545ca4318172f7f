"""Results: collect evaluated runs (and imported numbers), tabulate them, compare pretrained with scratch, report.

    from segbook.results import collect_results, scale_table, compare_pretrained, write_report
    df = collect_results()                        # a row per run, registry facts joined
    print(scale_table(df, "dice").records("md"))  # or modality_target_table, region_table, dataset_table
    compare_pretrained(df, "dice", group_by="modality-target")
    write_report(df, "report.html")
    df = collect_results(recipes=["segbook", "llrd"])   # fine-tuning recipes side by side
    recipe_table(df, "dice"); compare_recipes(df, "dice")

Definitions are in docs/results.md.
"""

from segbook.results.collect import (
    ALL_RECIPES,
    ResultsError,
    ResultsWarning,
    collect_results,
    import_results,
    read_import_csv,
    resolve_recipes,
)
from segbook.results.report import write_report
from segbook.results.stats import (
    compare_pretrained,
    compare_recipes,
    paired_comparison,
    recipe_stats_table,
    stats_table,
)
from segbook.results.tables import (
    Cell,
    ResultTable,
    TableError,
    build_table,
    dataset_scores,
    dataset_table,
    modality_target_table,
    recipe_table,
    region_table,
    scale_table,
)


__all__ = [
    "ALL_RECIPES", "Cell", "ResultTable", "ResultsError", "ResultsWarning", "TableError", "build_table",
    "collect_results", "compare_pretrained", "compare_recipes", "dataset_scores", "dataset_table", "import_results",
    "modality_target_table", "paired_comparison", "read_import_csv", "recipe_stats_table", "recipe_table",
    "region_table", "resolve_recipes", "scale_table", "stats_table", "write_report",
]
