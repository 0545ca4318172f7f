"""Results: collect evaluated runs (and imported numbers), tabulate them, compare pretrained with scratch, report.

    from segbook.results import collect_results, scale_table, compare_pretrained, write_report
    df = collect_results()                        # a row per run, registry facts joined
    print(scale_table(df, "dice").records("md"))  # or modality_target_table, region_table, dataset_table
    compare_pretrained(df, "dice", group_by="modality-target")
    write_report(df, "report.html")

Definitions are in docs/results.md.
"""

from segbook.results.collect import (
    ResultsError,
    ResultsWarning,
    collect_results,
    import_results,
    read_import_csv,
)
from segbook.results.report import write_report
from segbook.results.stats import compare_pretrained, paired_comparison, stats_table
from segbook.results.tables import (
    Cell,
    ResultTable,
    TableError,
    build_table,
    dataset_scores,
    dataset_table,
    modality_target_table,
    region_table,
    scale_table,
)


__all__ = [
    "Cell", "ResultTable", "ResultsError", "ResultsWarning", "TableError", "build_table", "collect_results",
    "compare_pretrained", "dataset_scores", "dataset_table", "import_results", "modality_target_table",
    "paired_comparison", "read_import_csv", "region_table", "scale_table", "stats_table", "write_report",
]
