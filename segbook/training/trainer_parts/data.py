"""What a run trains on, guarded: nnU-Net's split written without a race, the run's fraction of its cases kept
across resumes, and the preprocessed data checked before the first epoch and after every one.

A run must never mix two training sets or two versions of the data: a resume on other cases (the split or the
folds changed since it started) or on data preprocessed again meanwhile is refused, naming what to do.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Callable

from segbook.errors import SegbookError
from segbook.io import atomic_write_json
from segbook.paths import Paths

if TYPE_CHECKING:
    from segbook.training.trainer_parts.record import RunRecorder

#: nnU-Net's cross-validation splits, in the dataset's preprocessed folder, and their number of folds.
SPLITS = "splits_final.json"
CROSSVAL_FOLDS = 5


class TooFewCasesForFolds(SegbookError):
    """A dataset with fewer training cases than folds: nnU-Net's split cannot be made, only fold `all` trains."""


def write_crossval_splits(preprocessed_folder: Path, data_folder: Path) -> bool:
    """nnU-Net's 5-fold split of the preprocessed cases (its own function and seed, over the case ids nnU-Net's
    trainer would use), written atomically unless the file exists; True when it wrote it. nnU-Net's trainer writes
    it on first use of a fold with a plain write, which folds starting together race on. `TooFewCasesForFolds`
    where the data has fewer cases than folds (sklearn's KFold would fail inside nnU-Net's trainer)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    path = Path(preprocessed_folder) / SPLITS
    if path.is_file():
        return False
    cases = sorted(infer_dataset_class(str(data_folder)).get_identifiers(str(data_folder)))
    if len(cases) < CROSSVAL_FOLDS:
        raise TooFewCasesForFolds(f"{len(cases)} training case(s): nnU-Net's {CROSSVAL_FOLDS}-fold cross-validation "
                                  f"needs at least {CROSSVAL_FOLDS}; train fold all")
    splits = generate_crossval_split(cases, seed=12345, n_splits=CROSSVAL_FOLDS)
    atomic_write_json(path, [{part: [str(c) for c in ids] for part, ids in split.items()} for split in splits])
    return True


class DataGuard:
    """The data of one run: `dataset` preprocessed for `plans`, a `fraction` of the cases of `fold`."""

    def __init__(self, record: RunRecorder, say: Callable[[str], None], *, dataset: str, plans: str, fold: int | str,
                 fraction: float, folder: str):
        self.record = record
        self.say = say
        self.dataset, self.plans, self.fold, self.fraction = dataset, plans, fold, fraction
        self.folder = folder  # the run's, for messages
        self._version: str | None = None

    def write_splits(self, preprocessed_folder: Path, data_folder: Path) -> None:
        """nnU-Net's split, which preparation writes (`segbook batch prepare`); a run started without it
        (`segbook finetune --fold 0`) writes it first, atomically."""
        if self.fold != "all" and write_crossval_splits(preprocessed_folder, data_folder):
            self.say(f"wrote {SPLITS} (nnU-Net's 5-fold split): the task was not prepared with `segbook batch "
                     "prepare`")

    def training_subset(self, train: list[str], validation: list[str]) -> tuple[list[str], list[str]]:
        """The run's fraction of the cases it would train on (`segbook.data.subsets`), recorded in run.json
        (`training_cases`); a run that started on other cases (the split or the folds changed since) is refused
        rather than resumed on a mix. Fold 'all' validates on what it trains on, as nnU-Net's does; a fold's
        validation cases stay as they are."""
        from segbook.data.subsets import training_subset

        subset = training_subset(train, self.fraction)
        chosen = set(subset.cases)
        cases = [case for case in train if case in chosen]  # nnU-Net's order: it samples by position
        recorded = (self.record.recorded("training_cases") or {}).get("cases")
        if recorded is not None and recorded != list(subset.cases):
            raise SegbookError(f"{self.folder} started training on {len(recorded)} case(s), and its "
                               f"{subset.fraction:g} of the training cases is now {len(cases)} case(s), not the same "
                               "ones (the split or the folds changed since): resuming would mix two training sets; "
                               "start it again with --overwrite")
        if subset.minimum_applied:
            self.say(f"training fraction {subset.fraction} of {subset.available} cases is below the minimum: "
                     f"training on {len(cases)} cases")
        if recorded is None:
            self.record.note("training_cases", subset.record())
        return cases, (cases if self.fold == "all" else validation)

    def check_preprocessed(self) -> None:
        """Refuse to train on preprocessed data that is not exactly the train split (a re-plan killed by an older
        segbook, files deleted by hand), or that changed since this run started; record what it trains on."""
        from segbook.plan import verify_preprocessed

        cases = verify_preprocessed(self.dataset, Paths.from_env(), self.plans)
        recorded = self.record.recorded("preprocessed") or {}
        if recorded.get("version") not in (None, cases.version) or \
                recorded.get("ids_sha256") not in (None, cases.ids_sha256):
            raise SegbookError(f"{self.dataset} was preprocessed again since this run started (its cases or their "
                               "preprocessing differ); resuming would mix two versions of the data: start the run "
                               "again with --overwrite")
        self._version = cases.version
        self.record.note("preprocessed", cases.as_dict())

    def check_unchanged(self) -> None:
        """After an epoch: stop rather than train on data preprocessed again meanwhile."""
        from segbook.plan import preprocessed_version

        if preprocessed_version(self.dataset, Paths.from_env(), self.plans) != self._version:
            raise SegbookError(f"{self.dataset} was preprocessed again while this run trained (`segbook plan "
                               "--force`?): it stops rather than mix two versions of the data; start it again "
                               "with --overwrite")
