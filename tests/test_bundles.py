"""Results bundles: export without local paths, import beside local runs (same tables, same per-case files), kept
apart when scored on another test split, and every malformed or malicious bundle refused before anything is
written."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from results_helpers import A, SPLIT, THEIR_RUNS, export_their_bundle, home, write_registry
from store_helpers import write_evaluated_run

from segbook.cli.main import main
from segbook.data.split import Split, write_split
from segbook.paths import Paths
from segbook.registry import Registry, load_registry
from segbook.results import build_table, collect_results, dataset_table
from segbook.results.bundles import BUNDLE_FILE, BundleError, export_bundle, import_bundle, read_bundle
from segbook.results.collect import bundles_dir

@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return load_registry([write_registry(tmp_path / "registry.yaml")])


@pytest.fixture
def bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, registry: Registry) -> Path:
    """Another group's evaluated runs, exported as the bundle `their-lab`."""
    return export_their_bundle(tmp_path, monkeypatch, registry)


def leaves(value) -> list:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in leaves(item)]
    return [value]


def test_export_strips_local_paths_and_records_versions_and_splits(bundle: Path, registry: Registry) -> None:
    manifest = json.loads((bundle / BUNDLE_FILE).read_text())
    assert manifest["format_version"] == 1 and manifest["name"] == "their-lab" and manifest["segbook_version"]
    assert manifest["created_at"] and len(manifest["runs"]) == len(THEIR_RUNS)
    assert manifest["datasets"][A]["splits"] == [SPLIT] and len(manifest["datasets"][A]["registry_sha256"]) == 64
    for run in manifest["runs"]:
        record = json.loads((bundle / "runs" / run["folder"] / "run.json").read_text())
        strings = [leaf for leaf in leaves(record) if isinstance(leaf, str)]
        assert not any(s.startswith(("/", "~")) or s[1:3] == ":\\" for s in strings)
        assert record["request"] == {"weights": None, "registry": None} and "traceback" not in record["error"]
        assert record["run"]["model"] == "base"  # everything else is kept
        assert (bundle / "runs" / run["folder"] / "evaluation" / "metrics.csv").is_file()


def test_export_then_import_gives_the_same_tables_and_case_files(bundle: Path, tmp_path: Path, registry: Registry,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    theirs = Paths.from_env()
    before = collect_results(theirs, registry)
    ours = home(tmp_path, monkeypatch, "our_home")
    report = import_bundle(bundle, registry, ours)
    assert (report.name, report.runs, report.already_imported) == ("their-lab", len(THEIR_RUNS), False)
    after = collect_results(ours, registry)
    assert set(after["source"]) == {"bundle:their-lab"} and after["split"].eq(SPLIT).all()
    for name in ("scale", "modality-target", "region"):
        assert build_table(after, name).records("json") == build_table(before, name).records("json")
    drop_source = lambda records: [{k: v for k, v in r.items() if k != "source"} for r in records]  # noqa: E731
    assert drop_source(dataset_table(after).records("json")) == drop_source(dataset_table(before).records("json"))
    assert dataset_table(after).records("json")[0]["split"] == SPLIT
    for path_before, path_after in zip(sorted(before["path"]), sorted(after["path"])):
        metrics = ("evaluation", "metrics.csv")
        assert Path(path_after, *metrics).read_bytes() == Path(path_before, *metrics).read_bytes()

    again = import_bundle(bundle, registry, ours)
    assert again.already_imported  # idempotent
    killed = bundles_dir(ours) / ".their-lab.x1.partial"  # what an import killed mid-copy leaves
    (killed / "runs").mkdir(parents=True)
    assert set(collect_results(ours, registry)["source"]) == {"bundle:their-lab"}  # never collected
    import_bundle(bundle, registry, ours)
    assert not killed.exists()  # swept by the next import
    changed = tmp_path / "changed" / "their-lab"
    shutil.copytree(bundle, changed)
    record = json.loads((changed / BUNDLE_FILE).read_text())
    record["created_at"] = "2030-01-01T00:00:00"
    (changed / BUNDLE_FILE).write_text(json.dumps(record))
    with pytest.raises(BundleError, match="another bundle named 'their-lab' is imported already"):
        import_bundle(changed, registry, ours)


def test_runs_of_hyphenated_recipes_and_models_travel_in_a_bundle(tmp_path: Path, registry: Registry,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Recipe and model names may hold hyphens (heads-only, resenc-l): their folders are run folders too."""
    theirs = home(tmp_path, monkeypatch, "their_home")
    write_evaluated_run(theirs.results, registry, A, "base", "pretrained", 0.8, split=SPLIT, recipe="heads-only")
    write_evaluated_run(theirs.results, registry, A, "resenc-l", "scratch", 0.7, split=SPLIT)
    report = export_bundle(tmp_path / "hyphens", registry=registry, paths=theirs)
    assert (report.runs, report.left_out) == (2, 0)
    ours = home(tmp_path, monkeypatch, "our_home")
    assert import_bundle(report.folder, registry, ours).runs == 2
    rows = collect_results(ours, registry, recipes=["heads-only"])
    assert set(zip(rows["model"], rows["recipe"])) == {("base", "heads-only"), ("resenc-l", "scratch")}


@pytest.mark.parametrize("known_from", ["dataset", "runs"])
def test_a_bundle_scored_on_another_split_is_kept_apart_and_named(known_from: str, bundle: Path, tmp_path: Path,
                                                                   registry: Registry, monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """The local split is the imported dataset's, or where the dataset is not imported here, its local runs'. The
    bundle's runs of that dataset are configurations of their own, named; every table still prints."""
    ours = home(tmp_path, monkeypatch, "our_home")
    local_split = Split(("case_a", "case_b"), tuple(f"case_{i:03d}" for i in range(6)), seed=0)  # the run's cases
    if known_from == "dataset":
        raw = ours.raw / registry.get(A).nnunet_name
        raw.mkdir(parents=True)
        write_split(raw, local_split)
    local = write_evaluated_run(ours.results, registry, A, "base", "scratch", 0.8, split=local_split.sha256)
    report = import_bundle(bundle, registry, ours)
    assert report.other_splits == {A: (SPLIT, local_split.sha256)}
    df = collect_results(ours, registry)
    for name in ("scale", "modality-target", "region", "datasets", "recipes", "fractions"):
        assert build_table(df, name).rows
    apart = "bundle:their-lab, other split"
    assert set(df.loc[df["task"] == A, "variant"]) == {"", apart}
    assert set(df.loc[df["task"] != A, "variant"]) == {""}  # B and C: no local split to differ from
    rows = {row["task"]: row for row in dataset_table(df).records("json")}
    summary = json.loads((local / "evaluation" / "summary.json").read_text())
    assert rows[A]["base scratch"] == pytest.approx(100 * summary["foreground_mean"]["dice"], abs=1e-4)
    theirs = {init: df[(df["task"] == A) & (df["init"] == init) & (df["variant"] == apart)]["dice"].iloc[0]
              for init in ("scratch", "pretrained")}
    assert rows[A][f"base scratch [{apart}]"] == pytest.approx(100 * theirs["scratch"], abs=1e-4)
    assert rows[A][f"base [{apart}] delta"] == pytest.approx(100 * (theirs["pretrained"] - theirs["scratch"]),
                                                              abs=1e-4)  # the bundle's own pair
    assert rows[A]["base pretrained"] is None and rows[A]["base delta"] is None  # never the bundle's run
    assert main(["results", "--table", "datasets", "--registry", str(tmp_path / "registry.yaml")]) == 0
    assert f"base scratch [{apart}]" in capsys.readouterr().out


def test_two_bundles_of_one_configuration_are_each_kept_apart(tmp_path: Path, registry: Registry,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Two labs' runs of one configuration are never pooled as one lab's seeds (the tables refused them before)."""
    theirs = home(tmp_path, monkeypatch, "their_home")
    write_evaluated_run(theirs.results, registry, A, "base", "scratch", 0.7, split=SPLIT)
    bundles = [export_bundle(tmp_path / name, registry=registry, paths=theirs).folder for name in ("lab-1", "lab-2")]
    ours = home(tmp_path, monkeypatch, "our_home")
    for folder in bundles:
        import_bundle(folder, registry, ours)
    df = collect_results(ours, registry)
    assert sorted(df["variant"]) == ["bundle:lab-1", "bundle:lab-2"]
    row = dataset_table(df).records("json")[0]
    assert row["base scratch [bundle:lab-1]"] == row["base scratch [bundle:lab-2]"] is not None
    assert row["base scratch [bundle:lab-1] folds"] == 1


def corrupt_folder_name(bundle: Path, new: str) -> None:
    record = json.loads((bundle / BUNDLE_FILE).read_text())
    record["runs"][0]["folder"] = new
    (bundle / BUNDLE_FILE).write_text(json.dumps(record))


def edit_first_run(bundle: Path, name: str, change) -> None:
    """Change a file of the first run and record its new hash, as a forger would."""
    import hashlib

    record = json.loads((bundle / BUNDLE_FILE).read_text())
    path = bundle / "runs" / record["runs"][0]["folder"] / name
    path.write_text(change(path.read_text()))
    record["runs"][0]["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (bundle / BUNDLE_FILE).write_text(json.dumps(record))


def json_edit(change):
    def edit(text: str) -> str:
        data = json.loads(text)
        change(data)
        return json.dumps(data)
    return edit


def link_metrics(bundle: Path) -> None:
    record = json.loads((bundle / BUNDLE_FILE).read_text())
    path = bundle / "runs" / record["runs"][0]["folder"] / "evaluation" / "metrics.csv"
    target = bundle.parent / "elsewhere.csv"
    shutil.move(path, target)
    os.symlink(target, path)


MALICIOUS = {
    "path traversal": (lambda b: corrupt_folder_name(b, "../../../etc/Dataset901_SeenCT/x/fold_all"),
                       "is not a run folder"),
    "absolute folder": (lambda b: corrupt_folder_name(
        b, "/tmp/Dataset901_SeenCT/SegbookTrainer_base_scratch__nnUNetPlans__3d_fullres/fold_all"),
                        "is not a run folder"),
    "a dataset unknown here": (lambda b: corrupt_folder_name(
        b, "Dataset999_Else/SegbookTrainer_base_scratch__nnUNetPlans__3d_fullres/fold_all"), "not in the registry"),
    "a missing case row": (lambda b: edit_first_run(b, "evaluation/metrics.csv", lambda t: "\n".join(
        line for line in t.splitlines() if not line.startswith("case_001,1,")) + "\n"), "one per test case"),
    "a short row": (lambda b: edit_first_run(b, "evaluation/metrics.csv", lambda t: "\n".join(
        line.rsplit(",", 12)[0] if line.startswith("case_002,1,") else line for line in t.splitlines()) + "\n"),
                    "number of cells differs"),
    "absolute path in run.json": (lambda b: edit_first_run(b, "run.json", json_edit(
        lambda d: d.update(note="/home/evil/.ssh/id_rsa"))), "holds an absolute path"),
    "text where a number goes": (lambda b: edit_first_run(b, "evaluation/metrics.csv", lambda t: t.replace(
        "\ncase_000,1,", "\n../evil,1,", 1)), "is not a case id"),
    "dice out of range": (lambda b: edit_first_run(b, "evaluation/summary.json", json_edit(
        lambda d: d["labels"]["1"].update(dice="0.9"))), "is not a valid dice"),
    "means not from the rows": (lambda b: edit_first_run(b, "evaluation/summary.json", json_edit(
        lambda d: d["labels"]["1"].update(dice=0.99))), "the rows' mean"),
    "a changed file": (lambda b: (b / "runs" / json.loads((b / BUNDLE_FILE).read_text())["runs"][0]["folder"]
                                  / "evaluation" / "metrics.csv").write_text("case,label\n"), "SHA-256 differs"),
    "a link": (link_metrics, "is a link"),
    "not a bundle": (lambda b: (b / BUNDLE_FILE).write_text("[1, 2]"), "not a JSON object"),
}


@pytest.mark.parametrize("attack", sorted(MALICIOUS))
def test_malicious_bundles_are_refused_before_anything_is_written(attack: str, bundle: Path, tmp_path: Path,
                                                                  registry: Registry,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    change, message = MALICIOUS[attack]
    change(bundle)
    ours = home(tmp_path, monkeypatch, "our_home")
    with pytest.raises(BundleError, match=message):
        import_bundle(bundle, registry, ours)
    assert not bundles_dir(ours).exists()


def test_cli_export_import_and_refusal(bundle: Path, tmp_path: Path, registry: Registry,
                                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    registry_file = str(tmp_path / "registry.yaml")
    out = tmp_path / "again"
    assert main(["results", "--registry", registry_file, "--export", str(out), "--bundle-name", "lab2"]) == 0
    assert json.loads((out / BUNDLE_FILE).read_text())["name"] == "lab2"
    assert "exported 6 run(s) as bundle lab2" in capsys.readouterr().out
    read_bundle(out, registry)  # what was exported passes the importer's checks
    home(tmp_path, monkeypatch, "our_home")
    capsys.readouterr()
    assert main(["results", "--registry", registry_file, "--import", str(out)]) == 0
    assert "imported 6 run(s) of bundle lab2" in capsys.readouterr().out
    assert main(["results", "--registry", registry_file, "--import", str(out)]) == 0
    assert "imported already" in capsys.readouterr().out
    assert main(["results", "--registry", registry_file, "--table", "datasets"]) == 0
    assert "bundle:lab2" in capsys.readouterr().out
    corrupt_folder_name(bundle, "../x")
    assert main(["results", "--registry", registry_file, "--import", str(bundle)]) == 2
    assert "segbook: error:" in capsys.readouterr().err


def test_an_import_while_another_process_imports_the_same_bundle_is_refused(bundle: Path, tmp_path: Path,
                                                                          registry: Registry,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Two imports of one bundle at once: the second finds the first's claim, says so, and writes nothing."""
    import subprocess
    import sys

    from segbook.claims import ClaimBusy

    ours = home(tmp_path, monkeypatch, "our_home")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from segbook.claims import exclusive\n"
         "with exclusive(__import__('pathlib').Path(sys.argv[1]), 'bundle__their-lab', 'an import'):\n"
         "    print('held', flush=True); time.sleep(60)", str(ours.claims)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ClaimBusy, match="bundle their-lab"):
            import_bundle(bundle, registry, ours)
        assert not (bundles_dir(ours) / "their-lab").exists()
    finally:
        holder.kill()
        holder.wait()
    assert import_bundle(bundle, registry, ours).runs == len(THEIR_RUNS)  # the holder is gone: its claim is taken over
