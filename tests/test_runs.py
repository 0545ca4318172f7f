"""The identity of a run: trainer names, folders and job ids format and parse back for every axis, and the runs
made before recipes, seeds and fractions keep their names."""

from __future__ import annotations

import itertools
import json

import pytest
import yaml

from segbook.registry import load_registry
from segbook.runs import MODELS, FolderParts, Identity, RunIdentityError, RunSpec, valid_combinations
from segbook.training.manifest import HISTORY, RunManifest, failure, read_history, record_failure
from segbook.training.settings import TrainingSettings
from segbook.training.trainers import trainer_class

RECIPES = ("", "segbook", "scratch", "llrd", "heads-only", "stunet-official", "my-recipe2")
SEEDS = (0, 1, 17)
FRACTIONS = (1.0, 0.5, 0.25, 0.1, 0.125, 0.0125)


def _identities():
    for (model, init), recipe, seed, fraction in itertools.product(valid_combinations(), RECIPES, SEEDS, FRACTIONS):
        yield Identity(model, init, recipe, seed, fraction)


def test_every_axis_formats_and_parses_back():
    names = set()
    for identity in _identities():
        name = identity.trainer
        assert "__" not in name and " " not in name
        assert Identity.from_trainer(name) == identity, name
        names.add(name)
    # distinct identities never share a name (so never a folder)
    assert len(names) == len({(i.model, i.init, i.recipe, i.seed, i.fraction) for i in _identities()})


def test_the_default_runs_keep_the_names_they_always_had():
    for model, init in valid_combinations():
        assert Identity(model, init).trainer == f"SegbookTrainer_{model}_{init}"
    assert Identity("large", "pretrained", "segbook").trainer == "SegbookTrainer_large_pretrained"
    assert Identity("large", "scratch", "scratch").trainer == "SegbookTrainer_large_scratch"
    assert (Identity("large", "pretrained", "llrd", 1, 0.25).trainer
            == "SegbookTrainer_large_pretrained_llrd_seed1_frac25")
    assert Identity("base", "scratch", fraction=0.125).trainer == "SegbookTrainer_base_scratch_frac12p5"


@pytest.mark.parametrize("name", ["nnUNetTrainer", "SegbookTrainer_large", "SegbookTrainer_giant_scratch",
                                  "SegbookTrainer_nnunet_pretrained", "SegbookTrainer_large_pretrained_segbook",
                                  "SegbookTrainer_large_pretrained_seed0", "SegbookTrainer_large_pretrained_frac100",
                                  "SegbookTrainer_large_pretrained_seed1_llrd", "SegbookTrainer_large_pretrained_a_b",
                                  "SegbookTrainer_large_pretrained_Llrd", "SegbookTrainer_large_pretrained__x"])
def test_names_that_are_no_segbook_trainer_do_not_parse(name):
    """A name parses only if formatting its identity gives it back: one folder per run, never two spellings."""
    assert Identity.from_trainer(name) is None


@pytest.mark.parametrize("kwargs,message", [(dict(model="giant"), "unknown model"),
                                            (dict(init="frozen"), "unknown initialisation"),
                                            (dict(model="nnunet"), "no pretrained weights"),
                                            (dict(recipe="LLRD"), "recipe name"), (dict(recipe="a_b"), "recipe name"),
                                            (dict(recipe="seed3"), "recipe name"), (dict(seed=-1), "seed"),
                                            (dict(fraction=0.0), "fraction"), (dict(fraction=1.5), "fraction"),
                                            (dict(fraction=0.12345), "fraction")])
def test_impossible_identities_are_errors(kwargs, message):
    with pytest.raises(RunIdentityError, match=message):
        Identity(**{"model": "large", "init": "pretrained", **kwargs})


@pytest.fixture
def registry(tmp_path):
    entry = {"key": "Task901_Tiny", "name": "Tiny", "dataset_id": 901, "modality": "CT", "channels": ["CT"],
             "target": "Seen Structure", "cases": 10, "train_cases": 8, "test_cases": 2, "region": "Abdominal",
             "bone": False, "vessel": False,
             "labels": [{"index": 0, "name": "background", "kind": "background"},
                        {"index": 1, "name": "liver", "kind": "structure", "seen": True,
                         "totalseg_classes": ["liver"]}]}
    path = tmp_path / "registry.yaml"
    path.write_text(yaml.safe_dump({"datasets": [entry]}))
    return load_registry([path])


#: The backbones planned by a planner of their own (every other by nnU-Net's default planner).
OWN_PLANS = {"resenc-l": "nnUNetResEncUNetLPlans", "resenc-m": "nnUNetResEncUNetMPlans",
             **{f"primus-{size}": "SegbookPrimusPlans" for size in "sbml"}}


def test_job_ids_and_folders_round_trip(registry, tmp_path):
    entry = registry.get("Task901_Tiny")
    for identity, fold in itertools.product(list(_identities())[::7], ("all", "0", "4")):
        spec = RunSpec(entry.key, entry.nnunet_name, identity, fold)
        assert RunSpec.from_job_id(spec.job_id, registry) == spec
        assert RunSpec.from_folder(spec.folder(tmp_path), registry) == spec
        parts = FolderParts.parse(spec.folder(tmp_path))
        plans = OWN_PLANS.get(identity.model, "nnUNetPlans")
        assert (parts.dataset_id, parts.identity, parts.fold, parts.plans) == (901, identity, fold, plans)
    resenc = RunSpec.of(entry, "resenc-l", True)
    assert resenc.job_id == "Task901_Tiny__resenc-l__pretrained__fold_all"
    assert resenc.folder(tmp_path) == (tmp_path / "Dataset901_Tiny" / "SegbookTrainer_resenc-l_pretrained__"
                                       "nnUNetResEncUNetLPlans__3d_fullres" / "fold_all")
    assert RunSpec.from_job_id(resenc.job_id, registry) == resenc
    assert RunSpec.from_folder(resenc.folder(tmp_path), registry) == resenc
    default = RunSpec.of(entry, "large", True)
    assert default.job_id == "Task901_Tiny__large__pretrained__fold_all"
    assert default.folder(tmp_path) == (tmp_path / "Dataset901_Tiny" /
                                        "SegbookTrainer_large_pretrained__nnUNetPlans__3d_fullres" / "fold_all")
    assert RunSpec.of(entry, "large", True, recipe="llrd", seed=2).job_id == \
        "Task901_Tiny__large__pretrained__llrd__seed2__fold_all"
    with pytest.raises(RunIdentityError, match="not a job id"):
        RunSpec.from_job_id("Task901_Tiny__large", registry)


def test_records_name_their_run_and_old_records_name_the_defaults():
    old = {"task": "Task901_Tiny", "dataset": "Dataset901_Tiny", "model": "base", "init": "scratch", "fold": "all",
           "trainer": "SegbookTrainer_base_scratch", "plans": "nnUNetPlans"}
    spec = RunSpec.from_record(old)
    assert spec.identity == Identity("base", "scratch") and spec.recipe == "scratch" and spec.seed == 0


def test_every_identity_has_its_nnunet_trainer_class():
    for identity in list(_identities())[::11]:
        cls = trainer_class(identity.trainer)
        assert cls.__name__ == identity.trainer and cls.identity == identity
        assert trainer_class(identity.trainer) is cls  # one class per name
    with pytest.raises(KeyError):
        trainer_class("SegbookTrainer_giant_scratch")
    assert set(MODELS) == {i.model for i in _identities()}


def test_failures_are_recorded_once_with_their_stage(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    RunManifest.create(folder, {"task": "x"}, TrainingSettings(), {}).save()
    record_failure(folder, RuntimeError("out of memory"), "train")
    manifest = RunManifest.load(folder)
    assert failure(manifest) == "RuntimeError: out of memory" and manifest.data["error"]["stage"] == "train"
    record_failure(folder, KeyboardInterrupt())
    assert RunManifest.load(folder).status == "interrupted"
    manifest = RunManifest.load(folder)
    manifest.set_status("finished")
    manifest.save()
    record_failure(folder, ValueError("no test cases"), "evaluate")
    manifest = RunManifest.load(folder)
    assert manifest.status == "finished" and failure(manifest) == "evaluation: ValueError: no test cases"
    record_failure(tmp_path / "nothing", RuntimeError("x"))  # no run there: nothing to record
    assert not (tmp_path / "nothing").exists()


# --- run.json and its history -------------------------------------------------------------------------------------

def _run_folder(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    manifest = RunManifest.create(folder, {"task": "x"}, TrainingSettings(epochs=1000), {})
    manifest.save()
    return manifest


def _epoch(epoch: int, loss: float = 0.5) -> dict:
    return {"epoch": epoch, "train_loss": loss, "pseudo_dice": [0.5] * 20, "learning_rates": {"body": 1e-3}}


def test_run_json_stays_small_and_the_history_is_an_append_only_log(tmp_path):
    manifest = _run_folder(tmp_path)
    sizes, logs = [], []
    for epoch in range(300):
        manifest.record_epoch(_epoch(epoch))
        manifest.save()
        sizes.append(manifest.path.stat().st_size)
        logs.append((manifest.folder / HISTORY).read_bytes())
    assert max(sizes) - min(sizes) <= 4  # the count's digits: run.json does not grow with the epochs
    assert all(later.startswith(earlier) for earlier, later in zip(logs, logs[1:]))  # appended, never rewritten
    assert len(logs[-1].splitlines()) == 300 and len(logs[-1]) > 50 * max(sizes)

    compact = RunManifest.load(manifest.folder, history=False)
    assert "epochs" not in compact.data and compact.epochs_done == 300
    assert "epochs" not in json.loads(manifest.path.read_text())
    assert RunManifest.load(manifest.folder).data["epochs"] == [_epoch(e) for e in range(300)]

    compact.set_status("interrupted")  # a survey's change of the record leaves the history alone
    compact.save()
    assert (manifest.folder / HISTORY).read_bytes() == logs[-1]
    assert RunManifest.load(manifest.folder).epochs_done == 300


def test_the_log_replays_a_torn_line_an_uncounted_record_and_retrained_epochs(tmp_path):
    manifest = _run_folder(tmp_path)
    for epoch in range(4):
        manifest.record_epoch(_epoch(epoch))
        manifest.save()
    log = manifest.folder / HISTORY
    with log.open("ab") as f:  # killed while appending epoch 4
        f.write(json.dumps(_epoch(4)).encode()[:25])
    manifest = RunManifest.load(manifest.folder)
    assert [e["epoch"] for e in manifest.data["epochs"]] == [0, 1, 2, 3]
    manifest.record_epoch(_epoch(4, loss=0.4))
    manifest.save()
    assert [e["train_loss"] for e in RunManifest.load(manifest.folder).data["epochs"]] == [0.5] * 4 + [0.4]

    # Killed between the log and run.json: a record run.json does not count yet, then trained again on resume.
    with log.open("ab") as f:
        f.write((json.dumps(_epoch(5, loss=9.0)) + "\n").encode())
    manifest = RunManifest.load(manifest.folder)
    assert manifest.epochs_done == 5 and [e["epoch"] for e in manifest.data["epochs"]] == [0, 1, 2, 3, 4]
    manifest.record_epoch(_epoch(5, loss=0.3))
    manifest.save()
    assert [e["train_loss"] for e in RunManifest.load(manifest.folder).data["epochs"]][-1] == 0.3

    # Resumed from an earlier checkpoint (epoch 2): epochs 2-5 are trained again and replace the old records.
    manifest = RunManifest.load(manifest.folder)
    manifest.truncate_epochs(2)
    for epoch in range(2, 6):
        manifest.record_epoch(_epoch(epoch, loss=0.1))
        manifest.save()
    epochs = RunManifest.load(manifest.folder).data["epochs"]
    assert [(e["epoch"], e["train_loss"]) for e in epochs] == [(0, 0.5), (1, 0.5)] + [(e, 0.1) for e in range(2, 6)]
    assert read_history(manifest.folder) == epochs


def test_a_manifest_with_its_history_inside_reads_as_before_and_is_split_on_its_next_save(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    old = {"schema": 1, "status": "running", "settings": {"epochs": 5}, "events": [],
           "epochs": [_epoch(e) for e in range(3)]}
    (folder / "run.json").write_text(json.dumps(old))
    assert RunManifest.load(folder, history=False).epochs_done == 3
    manifest = RunManifest.load(folder)
    assert manifest.data["epochs"] == old["epochs"]
    manifest.record_epoch(_epoch(3))
    manifest.save()
    record = json.loads((folder / "run.json").read_text())
    assert "epochs" not in record and (record["schema"], record["epochs_done"]) == (2, 4)
    assert RunManifest.load(folder).data["epochs"] == [_epoch(e) for e in range(4)]
