"""Options commands share: the registry files, the task, the output format and the training options.

The registry is imported lazily so that building the parser (`segbook --help`) stays instant.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Sequence

from segbook.options import Bound, OptionError

if TYPE_CHECKING:
    from segbook.registry import Registry
    from segbook.training.settings import TrainingSettings

TASK_HELP = ("the dataset: paper number (613, Task613), key (Task613_COVID-19-20), nnU-Net id (Dataset613) or name "
             "(COVID-19-20, any case)")


def add_registry_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS keeps a value given before a sub-command from being reset by the sub-command's default.
    parser.add_argument("--registry", metavar="FILE", action="append", default=argparse.SUPPRESS,
                        help="your own dataset registry YAML, added to the built-in one (repeatable; also "
                             "SEGBOOK_REGISTRY, os.pathsep-separated)")


def registry_from_args(args: argparse.Namespace) -> Registry:
    from segbook.registry import load_registry

    return load_registry(getattr(args, "registry", None))


def add_task_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("--task", required=required, metavar="TASK", help=TASK_HELP)


def add_format_option(parser: argparse.ArgumentParser, choices: Sequence[str]) -> None:
    parser.add_argument("--format", choices=list(choices), default=choices[0],
                        help=f"output format (default: {choices[0]})")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every option that takes a value; not of flags ("--no-gaussian (default: True)" would
    say the opposite of what the flag does), not when there is none, and not twice."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        """Texts written in lines (examples) keep them; the rest is wrapped."""
        if "\n" in text:
            return "".join(indent + line + "\n" for line in text.splitlines())
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.nargs == 0 or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


def bounded(bound: Bound):
    """An argparse `type` that refuses values outside `bound` at parse time, naming the allowed range."""

    def parse(text: str) -> int | float:
        try:
            return bound.parse(text)
        except OptionError as error:
            raise argparse.ArgumentTypeError(str(error).removeprefix(f"{bound.option} ")) from None

    parse.__name__ = "integer" if bound.kind is int else "number"
    return parse


def at_least(low: int):
    """An argparse `type` for counts: an integer >= `low`."""
    return bounded(Bound("value", int, low=low))


#: An argparse `type` for rates, sizes in mm and the like: a finite number > 0.
POSITIVE_NUMBER = bounded(Bound("value", float, low=0, low_inclusive=False))


def add_training_options(parser: argparse.ArgumentParser) -> None:
    """The weights, device, budget, optimiser and GPU-speed options of the batch commands."""
    add_batch_weights_option(parser)
    parser.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"], help=DEVICE_HELP)
    add_budget_options(parser)


def add_batch_weights_option(parser: argparse.ArgumentParser) -> None:
    """`--weights` of a batch: one file for every pretrained job, or one per model (a batch mixing backbones)."""
    parser.add_argument("--weights", metavar="[MODEL=]FILE", action="append", default=None,
                        help="checkpoint pretrained jobs start from: FILE for all of them, MODEL=FILE for one "
                             "model's (repeatable: --weights resenc-l=openmind.pth with STU-Net's cached ones); "
                             "default: each model's cached official checkpoint, see `segbook weights`")


DEVICE_HELP = "cuda, mps or cpu (default: the first available of these, said when the run starts)"


def add_weights_and_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", metavar="PATH", help="checkpoint file to fine-tune from (default: the cached "
                                                          "official one, see `segbook weights`)")
    parser.add_argument("--device", default=None, choices=["cuda", "cpu", "mps"], help=DEVICE_HELP)


def add_backbone_file_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone-file", metavar="FILE", action="append", default=[],
                        help="a Python file defining your own backbones (BACKBONES = [...], docs/backbones.md); "
                             "segbook runs it, so give only files you trust (repeatable; also "
                             "SEGBOOK_BACKBONE_FILES, os.pathsep-separated)")


def load_backbone_files(args: argparse.Namespace) -> None:
    """Register the backbones of the files `--backbone-file` names (the processes a run starts see them too)."""
    from segbook.backbones import load_backbone_file

    for file in getattr(args, "backbone_file", None) or []:
        load_backbone_file(file)


def model_help(what: str) -> str:
    """Help for a --model/--models option: the built-in names (users' backbones add theirs)."""
    from segbook.backbones import builtin_names

    return f"{what}: {', '.join(builtin_names())}, or a backbone of --backbone-file (`segbook models` lists them)"


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    """The recipe, budget, optimiser and GPU-speed groups; `training_settings_from_args` reads them."""
    from segbook.training.settings import BOUNDS, FORMAT_RULE, PRECISIONS, STEM_TILINGS, TrainingSettings

    defaults = TrainingSettings()
    hyper = parser.add_argument_group("recipe, budget and optimiser (the recipe's values unless given)")
    hyper.add_argument("--recipe-file", metavar="FILE", action="append", default=[],
                       help="your own recipes (YAML, see docs/recipes.md), added to the built-in ones (repeatable; "
                            "also SEGBOOK_RECIPES, os.pathsep-separated)")
    hyper.add_argument("--epochs", type=bounded(BOUNDS["epochs"]), default=None,
                       help="epochs of training (default: the recipe's; 1000 in the built-in ones)")
    hyper.add_argument("--iters-per-epoch", type=bounded(BOUNDS["iterations_per_epoch"]), default=None,
                       help="training iterations per epoch (default: the recipe's; 250 in the built-in ones)")
    hyper.add_argument("--val-iters-per-epoch", type=bounded(BOUNDS["val_iterations_per_epoch"]),
                       default=defaults.val_iterations_per_epoch,
                       help="validation iterations per epoch (the pseudo-Dice in the log)")
    hyper.add_argument("--lr", type=bounded(BOUNDS["lr"]), default=None,
                       help="initial learning rate of the body (default: the recipe's: 1e-3 for segbook, 1e-2 "
                            "for scratch)")
    hyper.add_argument("--head-lr-multiplier", type=bounded(BOUNDS["head_lr_multiplier"]), default=None,
                       help="heads' rate / body's rate (default: the recipe's: 10 for segbook)")
    hyper.add_argument("--weight-decay", type=bounded(BOUNDS["weight_decay"]), default=None,
                       help="weight decay (default: the recipe's: 3e-5, nnU-Net's)")
    hyper.add_argument("--snapshots", nargs="+", default=[], metavar="P",
                       help="keep the network after these percentages of the budget (whole numbers in [1, 99], "
                            "space- or comma-separated; each at the first epoch at or past it) in the run's "
                            "snapshots/ folder, for `segbook evaluate --snapshots`: a point on the learning curve of "
                            "this schedule, whose learning rate has not decayed yet, not a shorter run (default: "
                            "none)")
    hyper.add_argument("--checkpoint-every", type=bounded(BOUNDS["checkpoint_every"]),
                       default=defaults.checkpoint_every, help="epochs between resumable checkpoints")
    hyper.add_argument("--stem-tiling", choices=STEM_TILINGS, default=defaults.stem_tiling,
                       help="fine-tuning a multi-channel task: repeat the checkpoint's single-channel first block "
                            "on every channel (repeat: STU-Net's official code) or also divide it by the channel "
                            f"count (mean: nnssl's reference fine-tuning) (default: {FORMAT_RULE}, recorded in "
                            "run.json; see docs/backbones.md)")
    gpu = parser.add_argument_group("GPU speed")
    gpu.add_argument("--precision", default=defaults.mixed_precision, choices=PRECISIONS,
                     help="mixed precision: on CUDA auto uses bf16 where the GPU supports it, else fp16; on the "
                          "CPU only bf16 autocasts (auto and fp16 train in fp32 there)")
    gpu.add_argument("--channels-last", action="store_true", help="channels-last 3D memory format")
    gpu.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                     help="torch.compile the network (default: nnU-Net's choice, on for CUDA)")


def training_settings_from_args(args: argparse.Namespace) -> "TrainingSettings":
    from segbook.training.settings import TrainingSettings

    return TrainingSettings(epochs=args.epochs, iterations_per_epoch=args.iters_per_epoch,
                            val_iterations_per_epoch=args.val_iters_per_epoch, lr=args.lr,
                            head_lr_multiplier=args.head_lr_multiplier, weight_decay=args.weight_decay,
                            checkpoint_every=args.checkpoint_every,
                            mixed_precision=args.precision, channels_last=args.channels_last,
                            stem_tiling=args.stem_tiling, snapshots=args.snapshots).validate()


def add_seed_and_fraction_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--seeds and --fractions: one run per combination (checked by `seeds_and_fractions_from_args`)."""
    parser.add_argument("--seeds", nargs="+", default=["0"], metavar="N",
                        help="seeds to train, one run each (space- or comma-separated integers >= 0). The seed is "
                             "part of the run's name and drives the fresh weights' initialisation, nnU-Net's "
                             "sampling and augmentation (random seed 12345 + N; default: 0)")
    parser.add_argument("--fractions", nargs="+", default=["1"], metavar="F",
                        help="fractions of the training cases to train on, one run each (in (0, 1]; space- or "
                             "comma-separated): a fixed, nested subset per dataset, at least 2 cases; the test "
                             "split is always whole (default: 1, every training case)")
    parser.add_argument("--budgets", nargs="+", default=None, metavar="E",
                        help="training budgets in epochs, one run each (space- or comma-separated integers >= 1; "
                             "iterations per epoch stay the recipe's or --iters-per-epoch). The recipe's own budget "
                             "keeps the run's name; another adds _ep{E} to it (default: the recipe's budget, or "
                             "--epochs)")


def seeds_and_fractions_from_args(args: argparse.Namespace) -> tuple[list[int], list[float]]:
    """The checked seeds and fractions; `RunIdentityError` (`segbook: error: --seeds: ...`) for a bad one."""
    from segbook.runs import parse_fractions, parse_seeds

    return parse_seeds(args.seeds), parse_fractions(args.fractions)


def budgets_from_args(args: argparse.Namespace) -> list[int | None]:
    """The checked budgets in epochs ([None]: the recipe's, or --epochs); `RunIdentityError` for a bad one, and
    `OptionError` for --budgets beside --epochs (a run would be named after one and train the other)."""
    from segbook.options import OptionError
    from segbook.runs import parse_budgets

    if args.budgets is None:
        return [None]
    budgets = parse_budgets(args.budgets)
    if getattr(args, "epochs", None) is not None:
        raise OptionError("--budgets and --epochs both set the epochs: give the budgets with --budgets alone")
    return list(budgets)


class NameList(argparse.Action):
    """A list option written either way users type it: `--recipes segbook llrd` or `--recipes segbook,llrd`."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs):
        super().__init__(option_strings, dest, nargs="+", **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Sequence[str],
                 option_string: str | None = None) -> None:
        items = [item.strip() for value in values for item in value.split(",") if item.strip()]
        problem = self.problem(items)
        if problem:
            parser.error(f"{option_string}: {problem}")
        setattr(namespace, self.dest, list(dict.fromkeys(items)))

    def problem(self, items: list[str]) -> str | None:
        """Why the names are not allowed (None when they are); names checked later against files need no check."""
        return None if items else "no name given"


class ChoiceList(NameList):
    """A `NameList` of fixed choices: `--models base large` or `--models base,large`."""

    def __init__(self, option_strings: Sequence[str], dest: str, choices: Sequence[str], **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.allowed = tuple(choices)

    def problem(self, items: list[str]) -> str | None:
        unknown = [item for item in items if item not in self.allowed]
        if unknown or not items:
            return f"unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(self.allowed)}"
        return None
