"""The HTML report: self-contained, and rendered by a real browser (headless Chromium) with its tables and figures."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from results_helpers import A, C, add_recipe_runs, build_store, write_registry, write_run

from segbook.cli.main import main
from segbook.paths import Paths
from segbook.registry import load_registry
from segbook.results import collect_results, write_report

CHROMIUM = next((path for name in ("chromium", "chromium-browser", "google-chrome") if (path := shutil.which(name))),
                None)
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
FIGURES = ("violin_per_dataset", "delta_scale", "delta_modality_target", "delta_region", "significance_scale")
#: The recipe store also has a run on half the train split: data-efficiency curves.
RECIPE_FIGURES = (*FIGURES, "delta_recipes", "fractions_scale")


@pytest.fixture
def df(segbook_home: Path, tmp_path: Path):
    """The hand-built store of test_results, collected."""
    return collect_results(*build_store(write_registry(tmp_path / "registry.yaml")))


@pytest.fixture
def report(df, tmp_path: Path) -> Path:
    return write_report(df, tmp_path / "report.html", figures=tmp_path / "figures", description="test store")


def test_report_is_self_contained_with_tables_and_figures(report: Path, tmp_path: Path) -> None:
    page = report.read_text()
    assert page.count("<img ") == len(FIGURES) and page.count("src='data:image/png;base64,") == len(FIGURES)
    assert not re.search(r"<(script|link)\b|src=['\"]https?:", page)
    for heading in ("Pretraining at a glance", "Dice (%) by dataset scale", "Dice (%) by modality and target",
                    "Dice (%) by region, with bone and vessel", "Dice (%) per dataset", "Definitions"):
        assert heading in page
    # three group tables, their three statistics tables, per-case tests, significance, ranks, the datasets table
    assert page.count("<table") == 10
    assert "90.00<sup>*</sup>" in page  # large pretrained lacks a small dataset
    for name in FIGURES:
        assert (tmp_path / "figures" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def recipe_report(segbook_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> Path:
    """The report of the hand-built store with runs of the llrd and heads-only recipes, through the CLI."""
    registry_file = write_registry(tmp_path / "registry.yaml")
    add_recipe_runs(*build_store(registry_file))
    out = tmp_path / "recipes.html"
    assert main(["report", "--registry", str(registry_file), "--out", str(out), "--figures", str(tmp_path / "figs"),
                 "--recipes", "segbook,heads-only,llrd"]) == 0
    assert "segbook: warning" not in capsys.readouterr().err  # every recipe present was asked for
    return out


def test_report_compares_recipes(recipe_report: Path, tmp_path: Path) -> None:
    page = recipe_report.read_text()
    assert page.count("<img ") == len(RECIPE_FIGURES) and "<figure id='delta_recipes'>" in page
    assert "<h2>4. Dice (%) by dataset scale per fine-tuning recipe</h2>" in page
    assert "<h2>5. Evidence: per-case tests, significance maps, rank stability</h2>" in page
    assert "<h2>6. Dice (%) per training-data fraction</h2>" in page
    assert "<h2>7. Dice (%) per dataset</h2>" in page
    assert "<h3>Recipes vs scratch and vs segbook by dataset scale</h3>" in page
    # and the recipes table with its statistics and the fractions table; no dataset has every recipe: no ranks
    assert page.count("<table") == 12
    table = page[page.index("<table class='recipes'>"):]
    table = table[:table.index("</table>")]
    assert "<td class='label'>&Delta; vs segbook</td><td>llrd</td>" in table
    assert "<span class='pos'>+5.83</span><sup>*</sup><span class='n'>n=3</span>" in table  # llrd - segbook
    assert "<b>STU-Net-B (llrd)</b>" in page  # the headline per recipe
    assert (tmp_path / "figs" / "delta_recipes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_figures_as_pdf(df, tmp_path: Path) -> None:
    write_report(df, tmp_path / "report.html", figures=tmp_path / "pdf", figure_format="pdf")
    assert sorted(p.name for p in (tmp_path / "pdf").iterdir()) == sorted(f"{name}.pdf" for name in FIGURES)
    assert (tmp_path / "pdf" / "delta_scale.pdf").read_bytes().startswith(b"%PDF")


def test_report_of_an_empty_store(segbook_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = write_report(collect_results(Paths.from_env(), load_registry()), tmp_path / "empty.html")
    assert "no datasets" in out.read_text()
    assert main(["report", "--out", str(tmp_path / "cli.html")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "cli.html").is_file()


@pytest.fixture
def chromium() -> None:
    """Skips the test where headless Chromium is missing; with SEGBOOK_REQUIRE_CHROMIUM=1 (CI) fails it instead."""
    if CHROMIUM is None:
        reason = "headless Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("SEGBOOK_REQUIRE_CHROMIUM") == "1":
            pytest.fail(f"SEGBOOK_REQUIRE_CHROMIUM=1 but {reason}", pytrace=False)
        pytest.skip(reason)


def run_chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *arguments],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.usefixtures("chromium")
def test_report_renders_in_headless_chromium(report: Path, tmp_path: Path) -> None:
    from PIL import Image

    screenshot = tmp_path / "report.png"
    run_chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2000", report.as_uri())
    pixels = np.asarray(Image.open(screenshot).convert("RGB"), dtype=int)
    assert pixels.shape[:2] == (2000, 1280)
    not_white = (pixels.min(axis=2) < 235).mean()
    colourful = ((pixels.max(axis=2) - pixels.min(axis=2)) > 80).mean()  # the figures' bars and violins
    assert not_white > 0.05, f"the page looks blank ({not_white:.1%} non-white pixels)"
    assert colourful > 0.01, f"no figure seems drawn ({colourful:.2%} saturated pixels)"

    dom = run_chromium(tmp_path, "--dump-dom", report.as_uri()).stdout
    assert dom.count("<table") == 10 and dom.count("<img") == len(FIGURES)
    assert "Dice (%) by dataset scale" in dom and "STU-Net-B" in dom


@pytest.mark.usefixtures("chromium")
def test_recipe_report_renders_in_headless_chromium(recipe_report: Path, tmp_path: Path) -> None:
    dom = run_chromium(tmp_path, "--dump-dom", recipe_report.as_uri()).stdout
    assert dom.count("<table") == 12 and dom.count("<img") == len(RECIPE_FIGURES)
    assert "per fine-tuning recipe" in dom and "Δ vs scratch" in dom


def test_report_counts_seed_noise_and_draws_fraction_curves(segbook_home: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    """Seeds 0-2 and half-split runs of base on two datasets, through `segbook report --metric hd95`."""
    registry_file = write_registry(tmp_path / "registry.yaml")
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    for task, dice in ((A, 0.80), (C, 0.60)):
        for init, gain in (("scratch", 0.0), ("pretrained", 0.05)):
            for seed, noise in enumerate((0.0, 0.06, -0.06) if task == A else (0.0, 0.001, -0.001)):
                for fraction, loss in ((0.5, 0.1), (1.0, 0.0)):
                    write_run(paths.results, registry, task, "base", init, "all", (dice + gain + noise - loss,) * (
                        2 if task == A else 1), seed=seed, fraction=fraction)
    out = tmp_path / "seeds.html"
    assert main(["report", "--registry", str(registry_file), "--out", str(out), "--figures", str(tmp_path / "f")]) == 0
    page = out.read_text()
    assert "&Delta;(PT) within seed noise on 1 of 2 datasets" in page  # A: 5 points, seed sd 6 points
    assert "70.00<span class='sd'> &plusmn;3.05</span>" in page  # average per seed 70.00, 73.05, 66.95
    assert "<figure id='fractions_scale'>" in page and "matches scratch@100%" in page
    assert (tmp_path / "f" / "fractions_scale.png").is_file()
    assert main(["report", "--registry", str(registry_file), "--out", str(out), "--metric", "hd95"]) == 0
    assert "HD95 (mm, lower is better)" in out.read_text()
    capsys.readouterr()
    assert main(["report", "--registry", str(registry_file), "--out", str(out), "--models", "large"]) == 0  # none
    assert "<figure id='fractions_scale'>" not in out.read_text() and "no runs of the shown" in out.read_text()


def test_report_without_per_case_metrics_says_why(df, tmp_path: Path) -> None:
    """A run evaluated before segbook computed IoU: the report is written, its per-case tests name the run."""
    page = write_report(df, tmp_path / "iou.html", metric="iou").read_text()
    assert ("<p class='empty'>no per-case tests: " in page
            and "not evaluated for iou (run segbook evaluate again)" in page)
    assert "IoU (%) by dataset scale" in page


def test_report_draws_other_backbones_in_colours_of_their_own(segbook_home: Path, tmp_path: Path) -> None:
    """ResEnc runs (on ResEnc's own plans) beside STU-Net's: every figure is drawn."""
    registry_file = write_registry(tmp_path / "registry.yaml")
    registry = load_registry([registry_file])
    paths = Paths.from_env()
    for task, dice in ((A, 0.80), (C, 0.60)):
        for model, plans in (("base", "nnUNetPlans"), ("resenc-l", "nnUNetResEncUNetLPlans")):
            for init, gain in (("scratch", 0.0), ("pretrained", 0.03)):
                write_run(paths.results, registry, task, model, init, "all", (dice + gain,) * (2 if task == A else 1),
                          plans=plans)
    page = write_report(collect_results(paths, registry), tmp_path / "resenc.html").read_text()
    assert page.count("<img ") == len(FIGURES) and "nnU-Net ResEnc-L" in page
