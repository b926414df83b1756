"""`tether compare`: the HTML report, opened in headless Chromium as a person would open it.

The browser test needs Debian's chromium (`make test` installs it when it may). Without it the
test is skipped, unless TETHER_REQUIRE_BROWSER=1 (set by .ci/run) makes its absence a failure.
A screenshot of the rendered report is kept in test-artifacts/compare-report.png.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.test_ppo import PROMPTS, REWARD_FILE, tiny_config
from tether.cli import main
from tether.evaluation.report import _steps, alarms_seen
from tether.stages.ppo import PPOTrainer

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def two_runs(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    task = tmp_path_factory.mktemp("compare")
    (task / "reward.py").write_text(REWARD_FILE)
    (task / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    for name, lr in (("slow", "1e-4"), ("fast", "3e-3")):
        config = tiny_config(
            tiny_llama,
            task,
            "train.steps=6",
            f"train.lr={lr}",
            "eval.every=3",
            "eval.num_prompts=5",
            "train.lr_schedule=constant",
        )
        PPOTrainer(config, task / name).train()
    return task / "slow", task / "fast"


@pytest.fixture(scope="module")
def report(two_runs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("report")
    assert main(["compare", str(two_runs[0]), str(two_runs[1]), "--output", str(output)]) == 0
    return output / "report.html"


def test_report_files_are_self_contained(report: Path):
    page = report.read_text()
    images = sorted(report.parent.glob("curve-*.png"))
    assert len(images) >= 6  # score, KL, entropy, length, clip fraction, eval score / win rate
    for image in images:
        assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"src='{image.name}'" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    document = json.loads((report.parent / "eval.json").read_text())
    assert list(document["results"]) == ["start", "slow", "fast"]


def test_alarm_steps_are_listed_as_spans():
    rows = [
        {"step": 1},
        {"step": 2, "alarm/kl_runaway": 1.0},
        {"step": 3, "alarm/kl_runaway": 1.0},
        {"step": 4},
        {"step": 5, "alarm/kl_runaway": 1.0},
    ]
    assert alarms_seen(rows) == {"kl_runaway": [2, 3, 5]}
    assert _steps([2, 3, 5]) == "2-3, 5"


def test_report_renders_in_headless_chromium(report: Path):
    if CHROMIUM is None:
        if os.environ.get("TETHER_REQUIRE_BROWSER"):
            pytest.fail("chromium is required here (TETHER_REQUIRE_BROWSER) but not installed")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        page = browser.new_page(viewport={"width": 1300, "height": 900})
        page.goto(report.as_uri())
        page.wait_for_load_state("load")
        # Every plot decoded and laid out (a broken image has naturalWidth 0).
        widths = page.evaluate("Array.from(document.images).map(i => i.complete ? i.naturalWidth : 0)")
        assert len(widths) >= 6 and all(w > 0 for w in widths), widths
        # The side-by-side table: a header plus one row per eval prompt, a column per model.
        header = page.eval_on_selector_all("#side-by-side tr:first-child th", "cells => cells.map(c => c.textContent)")
        assert header == ["prompt", "start", "slow", "fast"]
        assert page.locator("#side-by-side tr").count() == 1 + 5
        assert page.locator("#side-by-side").is_visible()
        assert page.locator("#eval-table tr").count() == 1 + 3
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "compare-report.png"), full_page=True)
        browser.close()
    assert (ARTIFACTS / "compare-report.png").stat().st_size > 10_000
