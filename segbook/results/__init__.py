"""Results: collect evaluated runs (and imported numbers), tabulate them, compare pretrained with scratch, report.

    from segbook.results import collect_results, scale_table, compare_pretrained, write_report
    df = collect_results()                        # a row per run, registry facts joined
    print(scale_table(df, "dice").records("md"))  # or modality_target_table, region_table, dataset_table
    compare_pretrained(df, "dice", group_by="modality-target")
    write_report(df, "report.html")
    df = collect_results(recipes=["segbook", "llrd"])   # fine-tuning recipes side by side
    recipe_table(df, "dice"); compare_recipes(df, "dice")
    fraction_table(df, "dice")                    # every training-data fraction; seeds are averaged everywhere
    case_tests(df, "dice")                        # per dataset over test cases (reads metrics.csv), Holm and BH
    significance_map(df, "dice", "scale"); rank_stability(df, "dice", "all")

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
    case_tests,
    compare_pretrained,
    compare_recipes,
    paired_comparison,
    rank_stability,
    recipe_stats_table,
    significance_map,
    stats_table,
)
from segbook.results.tables import (
    Cell,
    ResultTable,
    TableError,
    build_table,
    dataset_scores,
    dataset_table,
    fraction_table,
    modality_target_table,
    recipe_table,
    region_table,
    scale_table,
)


__all__ = [
    "ALL_RECIPES", "Cell", "ResultTable", "ResultsError", "ResultsWarning", "TableError", "build_table",
    "case_tests", "collect_results", "compare_pretrained", "compare_recipes", "dataset_scores", "dataset_table",
    "fraction_table", "import_results", "modality_target_table", "paired_comparison", "rank_stability",
    "read_import_csv", "recipe_stats_table", "recipe_table", "region_table", "resolve_recipes", "scale_table",
    "significance_map", "stats_table", "write_report",
]
