"""Which runs go into one table cell: variants, test splits, agreement within a dataset, complete folds.

Collection (`segbook.results.collect`) gives each run its fingerprint (`segbook.fingerprint`): `fingerprint` and
`settings`, the training part (a short digest and the readable values), and `basis` and `basis_settings`, what must
agree within one dataset (the data part, the evaluation part and the test split). `settle` then decides, on the
collected frame, what the tables may average and compare (docs/results.md, "Which runs go into one cell"):

- **test splits and sources**: a dataset's current split is what its imported data says now; a local run scored on
  another one is left out. A bundle's runs scored on another split than the dataset's (or, for a dataset not
  imported here, than its local runs') are kept apart, as are two bundles' runs of one configuration and numbers
  imported from CSV: their own rows (`apart`), named by their source, never averaged or compared with the others;
- **variants**: the runs of one (model, init, recipe) with different training fingerprints are different
  configurations, each a `variant` labelled by the settings that tell them apart (`12x3 it`, `lr 0.001`); one
  fingerprint, variant "": the tables look as they always did;
- **agreement**: the evaluated runs of one variant on one dataset (from one source) whose `basis` differs (a
  re-planned patch size, a seed evaluated on checkpoint_best) are left out: the cell names the setting;
- **folds**: with folds 0-4, a seed's runs count only when all five folds are evaluated.

A run left out stays in the frame, not evaluated, its status saying why and `left_out` its kind, so that cells show
the reason and every table's notes name the runs (`left_out_notes`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from segbook import fingerprint

LOCAL = "local"
IMPORTED_PREFIX = "imported:"
#: Runs imported at case level: source `bundle:NAME` (segbook.results.bundles).
BUNDLE_PREFIX = "bundle:"
EVALUATED = "evaluated"
#: Columns collection adds for each run (see the module docstring); `apart`: the source a row is kept apart by;
#: `left_out`: why an evaluated run is not counted (a key of LEFT_OUT).
FINGERPRINT_COLUMNS = ("fingerprint", "data_fingerprint", "evaluation_fingerprint", "basis", "settings",
                       "basis_settings", "apart", "left_out")
#: Why evaluated runs are left out: what they are, and what brings them back.
LEFT_OUT = {
    "split": ("scored on a test split other than their dataset's current one (or than the one they trained "
              "beside)", "evaluate them again (segbook evaluate --force) if they trained beside the current split; "
                         "otherwise train them again"),
    "invalid": ("whose evaluation files failed segbook's checks (a warning names each file and its first problem)",
                "evaluate them again (segbook evaluate --force)"),
    "identity": ("whose run.json or summary.json names another run than its folder (or training cases not of its "
                 "fraction, or epochs not of its budget)",
                 "move the files back where they belong, or train the run again"),
    "tampered": ("whose run.json settings no longer give the fingerprint recorded when they started training "
                 "(edited since?)", "train them again"),
    "differs": ("of one configuration and dataset that differ in data or evaluation settings, so not averaged",
                "evaluate them alike (segbook evaluate --force), or train them again on the same plans"),
    "folds": ("of seeds without all five folds 0-4 evaluated", "evaluate the missing folds"),
}
#: Runs named per kind of LEFT_OUT in notes and warnings.
LISTED = 3
#: Variant labels of the runs kept apart by their test split.
OTHER_SPLIT = "other split"


def run_folders(df: pd.DataFrame) -> pd.Series:
    """Which rows are runs with a folder (local, or of an imported bundle), as opposed to numbers imported from CSV:
    the rows whose plans and test splits are known and checked."""
    return (df["source"] == LOCAL) | df["source"].str.startswith(BUNDLE_PREFIX)


def _short(text: str) -> str:
    return fingerprint.digest({"v": text})[:fingerprint.SHORT]


def training_columns(reading: fingerprint.Reading) -> dict[str, Any]:
    """A run's training fingerprint from what its `run.json` gives, and what evaluation adds to it later."""
    return {"fingerprint": reading.training_digest[:fingerprint.SHORT], "settings": reading.training,
            "data_fingerprint": reading.data_digest[:fingerprint.SHORT], "evaluation_fingerprint": None,
            "basis": None, "basis_settings": None, "apart": "", "left_out": None}


def evaluation_columns(reading: fingerprint.Reading, summary: Mapping[str, Any], split: str | None) -> dict[str, Any]:
    """An evaluated run's evaluation fingerprint and its basis: its data and evaluation fingerprints and test split."""
    evaluation = fingerprint.evaluation_values(summary)
    key = fingerprint.digest(evaluation)[:fingerprint.SHORT]
    return {"evaluation_fingerprint": key, "basis": f"{reading.data_digest[:fingerprint.SHORT]}:{key}:{split}",
            "basis_settings": {**reading.data, **evaluation, "split": split or fingerprint.UNKNOWN}}


def imported_columns(source: str) -> dict[str, Any]:
    """Numbers imported from CSV: no settings known, kept apart by their source."""
    key = _short("")
    return {"fingerprint": key, "settings": {}, "data_fingerprint": None, "evaluation_fingerprint": None,
            "basis": key, "basis_settings": {}, "apart": source, "left_out": None}


def trained_only(settings: dict[str, Any], trained: str) -> dict[str, Any]:
    """The training columns of a run counted although it trained only part of its budget: `trained` sets it apart
    from the runs that trained all of it."""
    values = {**settings, "trained": trained}
    return {"fingerprint": fingerprint.digest(values)[:fingerprint.SHORT], "settings": values}


def settle(frame: pd.DataFrame, folds: Sequence[str], current: Mapping[str, str]) -> pd.DataFrame:
    """The collected frame with its test splits checked against `current` (task -> the SHA-256 of its current
    split), its variants named, runs that disagree within a dataset left out and, where `folds` are several,
    seeds without all of them left out (module docstring)."""
    frame = _sources(_splits(frame.copy(), current))
    frame = _variants(frame)
    frame = _agreement(frame)
    return _complete_folds(frame, folds) if len(folds) > 1 else frame


def _leave_out(frame: pd.DataFrame, rows: Any, kind: str, status: Any) -> None:
    frame.loc[rows, "evaluated"] = False
    frame.loc[rows, "left_out"] = kind
    frame.loc[rows, "status"] = status


def _splits(frame: pd.DataFrame, current: Mapping[str, str]) -> pd.DataFrame:
    """Local runs scored on another split than their dataset's current one are left out; bundles' runs on another
    split than the dataset's reference one are kept apart (`apart`), as are every local run's when the dataset has
    no current split and its local runs disagree (none is the reference)."""
    runs = frame[run_folders(frame) & frame["evaluated"] & frame["split"].notna()]
    references = {task: _reference(group, current.get(task)) for task, group in runs.groupby("task", sort=False)}
    stale, apart = [], {}
    for index, task, split, source in zip(runs.index, runs["task"], runs["split"], runs["source"]):
        reference = references[task]
        if split == reference:
            continue
        if source == LOCAL and reference is not None:
            stale.append((index, f"old test split {split[:12]} (current: {reference[:12]})"))
        else:
            apart[index] = f"{source}, {OTHER_SPLIT}" if source != LOCAL else f"split {split[:8]}"
    if stale:
        _leave_out(frame, [index for index, _ in stale], "split", [status for _, status in stale])
    for index, label in apart.items():
        frame.at[index, "apart"] = label
    return frame


def _sources(frame: pd.DataFrame) -> pd.DataFrame:
    """Bundles that give the same configuration of a dataset (same training fingerprint and fraction) are each kept
    apart by their name: two labs' runs are never pooled as if one had run them."""
    bundled = frame[frame["evaluated"] & frame["source"].str.startswith(BUNDLE_PREFIX) & (frame["apart"] == "")]
    keys = ["task", "model", "init", "recipe", "fraction", "budget", "fingerprint"]
    shared = bundled.groupby(keys, sort=False)["source"].transform("nunique") > 1
    frame.loc[bundled.index[shared], "apart"] = bundled.loc[shared, "source"]
    return frame


def _reference(runs: pd.DataFrame, current: str | None) -> str | None:
    """The split a dataset's runs are compared on: its current one, else the one its local runs (or, without local
    runs, its bundles' runs) were all scored on; None when they disagree."""
    if current is not None:
        return current
    local = runs[runs["source"] == LOCAL]
    splits = set((local if len(local) else runs)["split"])
    return splits.pop() if len(splits) == 1 else None


def _variants(frame: pd.DataFrame) -> pd.DataFrame:
    """`variant` per row: "" where a (model, init, recipe) has one training fingerprint among its evaluated runs;
    otherwise each fingerprint's label (`fingerprint.distinct_labels`); rows kept apart lead with their source."""
    variants = pd.Series("", index=frame.index, dtype=object)
    for _, members in frame.groupby(["model", "init", "recipe", "apart"], sort=False):
        evaluated = members[members["evaluated"]]
        labels: dict[str, str] = {}
        if evaluated["fingerprint"].nunique() > 1:
            labels = fingerprint.distinct_labels(dict(zip(members["fingerprint"], members["settings"])))
        apart = members["apart"].iloc[0]
        variants[members.index] = [", ".join(part for part in (apart, labels.get(key, "")) if part)
                                   for key in members["fingerprint"]]
    frame["variant"] = variants
    return frame


#: What identifies the runs of one cell of one dataset: its configuration and variant, training fraction, budget
#: (epochs trained: two budgets differ in their training fingerprint, so in their variant, too) and source.
CELL_KEYS = ["task", "model", "init", "recipe", "variant", "fraction", "budget", "source"]


def _agreement(frame: pd.DataFrame) -> pd.DataFrame:
    """The evaluated runs of one cell (CELL_KEYS) whose bases differ are left out, the status naming how."""
    evaluated = frame[frame["evaluated"]]
    if evaluated.empty:
        return frame
    counts = evaluated.groupby(CELL_KEYS, sort=False)["basis"].transform("nunique")
    for _, group in evaluated[counts > 1].groupby(CELL_KEYS, sort=False):
        settings = list({key: values for key, values in zip(group["basis"], group["basis_settings"])}.values())
        how = "; ".join(fingerprint.differences(settings[0], settings[1]))
        _leave_out(frame, group.index, "differs", f"not averaged: its runs differ ({how})")
    return frame


def _complete_folds(frame: pd.DataFrame, folds: Sequence[str]) -> pd.DataFrame:
    """A seed's runs of one cell count only with every one of `folds` evaluated; otherwise all of them read how many
    were, and why the others were not."""
    runs = frame[run_folders(frame)]
    for _, group in runs.groupby([*CELL_KEYS, "seed"], sort=False):
        done = set(group.loc[group["evaluated"], "fold"])
        if not done or done >= set(folds):
            continue
        why = dict(zip(group["fold"], group["status"]))
        missing = "; ".join(f"fold {fold}: {why.get(fold, 'no run')}" for fold in folds if fold not in done)
        status = f"{len(done)} of {len(folds)} folds evaluated ({missing})"
        frame.loc[group.index, "status"] = status
        _leave_out(frame, group.index[group["evaluated"]], "folds", status)
    return frame


def left_out_notes(frame: pd.DataFrame) -> list[str]:
    """A line per kind of LEFT_OUT: how many evaluated runs, the first few by path, and the fix."""
    notes = []
    if "left_out" not in frame:
        return notes
    for kind, (what, fix) in LEFT_OUT.items():
        rows = frame[frame["left_out"] == kind]
        if len(rows):
            named = [path if source == LOCAL else f"{source} {path}"
                     for source, path in zip(rows["source"][:LISTED], rows["path"][:LISTED])]
            more = f" and {len(rows) - LISTED} more" if len(rows) > LISTED else ""
            notes.append(f"left out: {len(rows)} evaluated run(s) {what}: {', '.join(named)}{more}; {fix}")
    return notes
