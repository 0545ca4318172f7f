"""The report's HTML: tables (cells with their counts, spreads and marks; delta rows), notes, the definitions, the
page with its inline CSS. No scripts and no external files: the page opens offline as it is.
"""

from __future__ import annotations

import html
from typing import Any, Sequence

from segbook.results.configs import DELTA, MODEL_NAMES
from segbook.results.tables.recipes import DELTA_ROWS
from segbook.results.tables.table import Cell, ResultTable


def signed_span(value: float) -> str:
    kind = "pos" if value > 0 else "neg" if value < 0 else ""
    return f"<span class='{kind}'>{value + 0.0:+.2f}</span>"  # + 0.0: no -0.00


def definitions_html() -> str:
    return """<section><h2>Definitions</h2><ul>
<li>A configuration is a network, its initialisation and its fine-tuning recipe (the paper's: segbook; from
scratch: scratch), and its variant: runs of one recipe whose training settings differ (budget, learning rate,
precision, checkpoint, plans, ...: their fingerprint) are configurations of their own, named by what differs
(<i>base scratch [12x3 it]</i>), as are runs kept apart by their source (a bundle scored on another test split,
numbers imported from CSV). Two recipes or two variants are never averaged into one cell; tables name the recipe
when another is shown, and the variant when there is one.</li>
<li>A run's score is the mean over labels of the per-label mean over test cases (cases where a metric is undefined,
e.g. Dice with empty reference and prediction, are left out of that label's mean).</li>
<li>A dataset's score for a configuration is the mean over its seeds of each seed's mean over its evaluated folds
(SegBook's protocol trains fold "all"); with more than one seed, &plusmn; is the standard deviation across seeds (of
a group cell: of the group's mean, per seed every dataset of the cell ran). With folds 0-4 a seed counts only
with all five folds evaluated. The runs of one cell agree in data and evaluation settings (patch size, spacing,
normalisation, checkpoint, ...) and test split; runs scored on a split other than their dataset's current one, or
whose record contradicts its folder, are left out, and the notes name them. Imported results are dataset-level
numbers, kept apart as their own rows. Every table but the training-data fractions shows the runs trained on the
whole train split.</li>
<li>Seed noise of a dataset's &Delta;(PT): the larger of the pretrained and scratch standard deviations across
seeds; the &Delta;(PT) is within seed noise (~) when its magnitude is no larger.</li>
<li>HD95 is a distance in mm where lower is better: its &Delta; is scratch minus pretrained, so that a positive
&Delta; always means pretraining helps.</li>
<li>Per-case tests: per dataset, the two-sided Wilcoxon signed-rank test of pretrained against scratch over the
test cases, on each case's mean over foreground labels (seeds averaged per case), corrected across datasets with
Holm (the verdicts better / not different / worse, at 0.05) and Benjamini-Hochberg.</li>
<li>Significance maps: per dataset scale, for every ordered pair of configurations the one-sided Wilcoxon
signed-rank test over the group's datasets that the row is better than the column, Holm-corrected over the pairs of
the group. Rank stability: datasets resampled with replacement (seeded); how often each configuration has the best
mean.</li>
<li>A group's score is the mean over its datasets that have the configuration; n says how many. A dataset without
the configuration is listed as missing and marks the cell with *; it is never averaged in.</li>
<li>By modality and target, Structure&amp;Lesion datasets give their seen structures, unseen structures and lesions
to the three groups (their score there is the mean of those labels), unless grouped whole.</li>
<li>&Delta;(PT) is the mean over datasets with both initialisations of pretrained minus scratch, in points, the
scratch variant being the one with the same budget, precision and plans, over the datasets where the two agree in
data and evaluation settings and test split; its
95% interval is a seeded percentile bootstrap over datasets; p is the two-sided Wilcoxon signed-rank test. A recipe's
&Delta; vs scratch is the same for its runs, its &Delta; vs segbook the paired mean of it minus the segbook recipe of
the same network.</li>
</ul></section>"""


def notes_html(notes: Sequence[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li class='{'sub' if note.startswith('  ') else ''}'>{html.escape(note.strip())}</li>"
                    for note in notes)
    return f"<ul class='notes'>{items}</ul>"


# --- tables ----------------------------------------------------------------------------------------------------


HEADERS = {"ci_low": "95% CI low", "ci_high": "95% CI high", "p_value": "Wilcoxon p", "delta": "&Delta;(PT)",
           "params (M)": "params (M)", "TMACs": "TMACs", "TFLOPs": "TFLOPs"}


def table_html(table: ResultTable) -> str:
    if not table.rows:
        return "<p class='empty'>no datasets</p>"
    head = "".join(f"<th>{_header(column)}</th>" for column in table.columns)
    body = "".join(_row_html(table, row) for row in table.rows)
    return (f"<div class='scroll'><table class='{table.name}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody>"
            "</table></div>")


def _header(column: str) -> str:
    """`base pretrained` -> `STU-Net-B<br>pretrained`, `large delta` -> `STU-Net-L<br>Δ(PT)`, `large llrd delta`
    -> `STU-Net-L<br>llrd Δ(PT)`."""
    if column in HEADERS:
        return HEADERS[column]
    model, _, rest = column.partition(" ")
    if model in MODEL_NAMES and rest:
        recipe, delta = (rest.removesuffix("delta").strip(), True) if rest.endswith("delta") else (rest, False)
        return f"{MODEL_NAMES[model]}<br>{html.escape(recipe)}{' ' if recipe and delta else ''}" + (
            "&Delta;(PT)" if delta else "")
    return html.escape(column)


def _row_html(table: ResultTable, row: list[Any]) -> str:
    is_delta = len(row) > 1 and row[1] in DELTA_ROWS
    cells = []
    for column, value in zip(table.columns, row):
        if isinstance(value, Cell):
            cells.append(_cell_html(value, table.show_count))
        elif column == "model":
            cells.append(f"<td class='label'>{html.escape(MODEL_NAMES.get(value, value))}</td>")
        elif value in DELTA_ROWS:
            label = "&Delta;(PT)" if value == DELTA else html.escape(value).replace("Delta", "&Delta;")
            cells.append(f"<td class='label'>{label}</td>")
        else:
            cells.append(_plain_html(column, value, table.name == "significance"))
    return f"<tr class='{'delta' if is_delta else ''}'>{''.join(cells)}</tr>"


def _plain_html(column: str, value: Any, p_values: bool = False) -> str:
    """A value that is not a Cell; `p_values`: every number in the table is a p-value (the significance map)."""
    if value is None:
        return "<td class='num missing'>&ndash;</td>"
    if isinstance(value, float):
        if column == "delta":
            return f"<td class='num'>{signed_span(value)}</td>"
        text = (f"{value:.3g}" if p_values or column.startswith("p_") else f"{value:+.2f}" if column.startswith("ci_")
                else f"{value:.1f}" if column == "params (M)" else f"{value:.2f}")
        return f"<td class='num'>{text}</td>"
    if isinstance(value, int):
        return f"<td class='num'>{value}</td>"
    return f"<td>{html.escape(str(value))}</td>"


def _cell_html(cell: Cell, show_count: bool) -> str:
    if cell.value is None:
        return (f"<td class='num missing' title='{html.escape(cell.detail(), quote=True)}'>"
                f"{html.escape(cell.status or 'missing')}</td>")
    number = signed_span(cell.value) if cell.signed else f"{cell.value:.2f}"
    number += "" if cell.spread is None else f"<span class='sd'> &plusmn;{cell.spread:.2f}</span>"
    count = f"<span class='n'>n={cell.count}</span>" if show_count else ""
    marker = f"<sup>{html.escape(cell.marker)}</sup>" if cell.marker else ""
    detail = f"missing: {cell.detail()}" if cell.missing else cell.status
    title = f" title='{html.escape(detail, quote=True)}'" if detail else ""
    return f"<td class='num'{title}>{number}{marker}{count}</td>"



CSS = """
body{font-family:-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:#1d232a;margin:0;
background:#f6f7f9;line-height:1.45}
main{max-width:1320px;margin:0 auto;padding:28px 32px 60px;background:#fff;box-shadow:0 0 12px rgba(0,0,0,.06)}
h1{margin:0 0 4px;font-size:26px}h2{font-size:19px;margin:34px 0 10px;border-bottom:2px solid #e4e7eb;
padding-bottom:4px}h3{font-size:15px;margin:22px 0 8px;color:#39424e}
.subtitle{color:#5b6672;font-size:13.5px;margin-bottom:8px}
.lead{background:#f1f6fd;border-left:4px solid #4c72b0;padding:2px 16px 6px;margin-top:18px}
.lead h2{border:none;margin-top:12px}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:13px;margin:6px 0;font-variant-numeric:tabular-nums}
th{background:#eef1f5;font-weight:600;padding:6px 9px;text-align:center;border-bottom:2px solid #cfd5dc;
vertical-align:bottom}
td{padding:4px 9px;border-bottom:1px solid #e6e9ed;white-space:nowrap}
tbody tr:nth-child(even){background:#fafbfc}
td.num{text-align:right}td.label{font-weight:600}
tr.delta td{background:#fbf7ec;font-style:italic}
.n{display:block;font-size:10.5px;color:#7a8591;font-style:normal}
.missing{color:#9aa3ad;font-style:italic}
.sd{font-size:11px;color:#5b6672}
.pos{color:#1a7f37}.neg{color:#c2362b}
sup{color:#c2362b;font-weight:700}
ul.notes{font-size:12px;color:#5b6672;margin:4px 0 10px;padding-left:18px}
ul.notes li.sub{list-style:none;margin-left:10px}
figure{margin:16px 0}figure img{max-width:100%;height:auto;border:1px solid #e6e9ed}
figcaption{font-size:12px;color:#5b6672}
.empty{color:#7a8591;font-style:italic}
table.datasets{font-size:12px}table.datasets td{padding:3px 6px}
table.datasets td:first-child{white-space:normal;overflow-wrap:anywhere;min-width:150px;max-width:230px}
"""


def page_html(title: str, subtitle: str, sections: list[str]) -> str:
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'><style>{CSS}</style></head>"
            f"<body><main><h1>{html.escape(title)}</h1><div class='subtitle'>{subtitle}</div>"
            f"{''.join(sections)}</main></body></html>\n")
