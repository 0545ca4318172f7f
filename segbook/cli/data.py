"""`segbook data`: import a downloaded dataset (validated, split), show every task's status, make synthetic data."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from segbook.cli.common import (POSITIVE_NUMBER, add_format_option, add_registry_option, add_task_option, at_least,
                                registry_from_args)
from segbook.errors import SegbookError

LAYOUT_CHOICES = ("auto", "v1", "v2", "msd")


def _default_processes() -> int:
    return max(1, int(os.environ.get("nnUNet_def_n_proc") or 1))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "data", help="import and validate datasets, show their status, write synthetic ones",
        description="Turn downloaded datasets into nnU-Net v2 raw datasets that match the registry, with SegBook's "
                    "fixed train/test split. See docs/data.md.")
    actions = parser.add_subparsers(dest="data_action", metavar="ACTION")
    actions.required = True
    _register_import(actions)
    _register_status(actions)
    _register_synth(actions)


def _register_import(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "import", help="validate a downloaded dataset and write it to nnUNet_raw with the test split",
        description="Validate every case (nothing is written if anything is wrong), then write "
                    "nnUNet_raw/DatasetNNN_Name: training cases in imagesTr/labelsTr, the held-out test split in "
                    "imagesTs/labelsTs, dataset.json from the registry. Accepts nnU-Net v1 task folders, Medical "
                    "Segmentation Decathlon folders, nnU-Net v2 dataset folders (--from), and plain folders "
                    "(--images/--labels).")
    add_task_option(parser)
    add_registry_option(parser)
    parser.add_argument("--from", dest="source", type=Path, metavar="PATH", help="the task folder to import")
    parser.add_argument("--layout", choices=LAYOUT_CHOICES, default="auto",
                        help="layout of --from (default: detected from names and dataset.json)")
    plain = parser.add_argument_group("plain folders (instead of --from)")
    plain.add_argument("--images", type=Path, metavar="DIR", help="folder with the image files")
    plain.add_argument("--labels", type=Path, metavar="DIR", help="folder with the label files (may equal --images)")
    plain.add_argument("--image-pattern", metavar="PATTERN",
                       help="image file names, relative to --images, with {case}, {channel} and {ext}, e.g. "
                            "'{case}_{channel}.nii.gz' or '{case}/{case}_{channel}.nii.gz' (default: "
                            "{case}_{channel}{ext} with channels 0000, 0001, ..., or {case}{ext} for one channel)")
    plain.add_argument("--label-pattern", default="{case}{ext}", metavar="PATTERN",
                       help="label file names relative to --labels (default: {case}{ext})")
    plain.add_argument("--channel-tokens", nargs="+", metavar="TOKEN",
                       help="what {channel} stands for, one per registry channel in its order (e.g. t1 t2)")
    parser.add_argument("--num-processes", "-np", type=at_least(1), default=_default_processes(), metavar="N",
                        help="processes for validation and writing (default: nnUNet_def_n_proc, else 1)")
    parser.add_argument("--seed", type=at_least(0), help="seed of the test split (default: the stored split's, else 0)")
    parser.add_argument("--resplit", action="store_true",
                        help="draw a new test split even if one is stored (needed when the cases changed)")
    parser.add_argument("--split", type=Path, metavar="FILE", dest="split_file",
                        help="use this test split instead of drawing one: a JSON list of test case ids (or an "
                             "object with 'test' and optionally 'train' lists, like segbook_split.json), or a CSV "
                             "of ids with an optional second column test/train; checked against the cases first")
    parser.add_argument("--keep-source-split", action="store_true",
                        help="keep the labelled test set the source ships (imagesTs/labelsTs) as the test split; "
                             "it must hold exactly the registry's test count")
    parser.add_argument("--force", action="store_true", help="import again even if the source is unchanged")
    parser.add_argument("--check-only", action="store_true", help="validate and report; write nothing")
    parser.add_argument("--tolerance", type=POSITIVE_NUMBER, default=None, metavar="T",
                        help="geometry tolerance: relative for spacing, in voxels for origin, absolute for "
                             "direction cosines (default: 1e-3)")
    parser.set_defaults(handler=run_import)


def _register_status(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser("status", help="one row per registered task: raw, validated, split, planned, "
                                               "preprocessed",
                                description="How far each task has come. Reads only metadata, so it is fast.")
    add_registry_option(parser)
    parser.add_argument("--present", action="store_true", help="only tasks whose raw data is present")
    add_format_option(parser, ("table", "md", "csv", "json"))
    parser.set_defaults(handler=run_status)


def _register_synth(actions: argparse._SubParsersAction) -> None:
    parser = actions.add_parser(
        "synth", help="write a synthetic dataset (and its registry entry) for demos and tests",
        description="A synthetic dataset in any layout `data import` accepts, plus OUT/registry.yaml with its "
                    "registry entry, so `segbook data import --registry OUT/registry.yaml --task ID --from ...` "
                    "works at once.")
    parser.add_argument("--out", type=Path, required=True, metavar="PATH", help="folder to write into")
    parser.add_argument("--layout", choices=("v1", "v2", "msd", "plain"), default="v2",
                        help="source layout (default: v2)")
    parser.add_argument("--name", default="Synthetic", help="dataset name (default: Synthetic)")
    parser.add_argument("--id", type=at_least(1), default=990, dest="dataset_id", help="dataset id (default: 990)")
    parser.add_argument("--cases", type=at_least(2), default=8, help="labelled cases (default: 8)")
    parser.add_argument("--size", type=at_least(8), nargs=3, default=[48, 48, 32], metavar=("X", "Y", "Z"),
                        help="voxels (default: 48 48 32)")
    parser.add_argument("--spacing", type=POSITIVE_NUMBER, nargs=3, default=[1.5, 1.5, 2.5], metavar=("X", "Y", "Z"),
                        help="mm (default: 1.5 1.5 2.5)")
    parser.add_argument("--modality", choices=("CT", "MRI", "CT&PET"), default="CT",
                        help="intensity model (default: CT); CT&PET: CT channels and PET uptake channels")
    parser.add_argument("--channels", nargs="+", help="channel names (default: CT; T2 for MRI; CT PET for CT&PET)")
    parser.add_argument("--structures", type=at_least(1), default=2, help="blob-like structures (default: 2)")
    parser.add_argument("--lesions", type=at_least(0), default=0,
                        help="small lesion labels, inside the first structure (default: 0)")
    parser.add_argument("--seed", type=at_least(0), default=0, help="random seed (default: 0)")
    parser.set_defaults(handler=run_synth)


def _source(args: argparse.Namespace):
    from segbook.data.layouts import PlainSource

    if args.images or args.labels:
        if not (args.images and args.labels) or args.source:
            raise SegbookError("plain folders need both --images and --labels, and no --from")
        tokens = tuple(args.channel_tokens) if args.channel_tokens else None
        return PlainSource(args.images, args.labels, args.image_pattern, args.label_pattern, tokens)
    if args.source is None:
        raise SegbookError("say what to import: --from PATH (a task folder) or --images DIR --labels DIR")
    return args.source


def run_import(args: argparse.Namespace) -> int:
    from segbook.data.importer import import_dataset
    from segbook.data.validate import DEFAULT_TOLERANCE

    entry = registry_from_args(args).get(args.task)
    report = import_dataset(entry, _source(args), layout=args.layout, num_processes=args.num_processes,
                            seed=args.seed, resplit=args.resplit, force=args.force, check_only=args.check_only,
                            tolerance=DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance,
                            split_file=args.split_file, keep_source_split=args.keep_source_split)
    if report.validation.problems:
        print(report.validation.format())
    print(report.summary())
    return 0


def run_status(args: argparse.Namespace) -> int:
    from segbook.cli.output import emit
    from segbook.data.status import dataset_status

    rows = dataset_status(registry_from_args(args), present_only=args.present)
    if not rows:
        print("no task has raw data yet; import one with `segbook data import --task TASK --from PATH`")
        return 0
    emit(rows, args.format)
    return 0


def run_synth(args: argparse.Namespace) -> int:
    from segbook.data.synth import SynthSpec, numbered_targets, write_synthetic_task

    spec = SynthSpec(name=args.name, cases=args.cases, size=tuple(args.size), spacing=tuple(args.spacing),
                     modality=args.modality, channels=tuple(args.channels or ()),
                     targets=numbered_targets(args.structures, args.lesions), seed=args.seed)
    task = write_synthetic_task(spec, args.out, layout=args.layout, dataset_id=args.dataset_id)
    print(f"{len(task.dataset.case_ids)} cases written to {task.dataset.path} ({args.layout} layout)\n"
          f"registry entry {task.key} written to {task.registry}\n"
          f"import with: {task.import_command()}")
    return 0
