"""`segbook recipes`: list the fine-tuning recipes, or show one as it resolves."""

from __future__ import annotations

import argparse
import json

from segbook.cli.common import add_format_option, at_least

LIST_FORMATS = ("table", "md", "csv", "json")


def _add_recipe_files(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe-file", metavar="FILE", action="append", default=argparse.SUPPRESS,
                        help="your own recipes (YAML), added to the built-in ones (repeatable; also SEGBOOK_RECIPES)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "recipes", help="list the fine-tuning recipes (what trains, rates, schedule, source)",
        description="Fine-tuning recipes are YAML files validated on load: the built-in ones (docs/recipes.md says "
                    "where each comes from) and yours (--recipe-file or SEGBOOK_RECIPES). Use one with `segbook "
                    "finetune --recipe NAME` or `segbook batch ... --recipes A,B`.")
    add_format_option(parser, LIST_FORMATS)
    _add_recipe_files(parser)
    parser.set_defaults(handler=run_list)
    actions = parser.add_subparsers(dest="recipes_action", metavar="ACTION")
    show = actions.add_parser("show", help="one recipe with every value, and its rates over a budget")
    show.add_argument("name", help="the recipe's name")
    show.add_argument("--epochs", type=at_least(1), default=None, help="budget to show the rates over (default: the "
                                                                "recipe's)")
    add_format_option(show, ("text", "json"))
    _add_recipe_files(show)
    show.set_defaults(handler=run_show)


def run_list(args: argparse.Namespace) -> int:
    from segbook.cli.output import emit
    from segbook.recipes import load_recipes

    recipes = load_recipes(getattr(args, "recipe_file", None))
    rows = [recipe.summary() for recipe in recipes.values()]
    if args.format == "table":  # sources are long: `segbook recipes show NAME` and the other formats give them
        rows = [{k: v for k, v in row.items() if k != "source"} for row in rows]
    emit(rows, args.format, numparse=False)
    return 0


def run_show(args: argparse.Namespace) -> int:
    import yaml

    from segbook.recipes import get_recipe, load_recipes

    files = getattr(args, "recipe_file", None)
    recipes = load_recipes(files)
    recipe = get_recipe(args.name, recipes[args.name].init if args.name in recipes else "pretrained", files)
    if args.epochs is not None:
        recipe = recipe.with_overrides(epochs=args.epochs)
    if args.format == "json":
        print(json.dumps(recipe.model_dump(mode="json"), indent=2))
        return 0
    print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=110).rstrip())
    epochs = recipe.budget.epochs
    print(f"\nrates over {epochs} epochs (at the start of the epoch):")
    marks = sorted({0, epochs - 1, *(start for _, start, _ in recipe.phase_spans(epochs)),
                    *(end - 1 for _, _, end in recipe.phase_spans(epochs))})
    for epoch in marks:
        phase = recipe.phase_at(epoch, epochs)
        rates = ", ".join(f"{group} {rate:.3g}" for group, rate in recipe.rates(epoch, epochs).items())
        print(f"  epoch {epoch:>5}  {phase.rate:<13} trains {phase.train:<13} {rates}")
    return 0
