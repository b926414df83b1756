"""The documentation: README.md is the short front door, the site under docs/ documents everything
a user touches (every config key, every metric of the run-directory contract, every stage), it
builds with `mkdocs build --strict`, and what it claims about the code can be checked here is."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from tether.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, field_help

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text()
PAGES = {path.relative_to(DOCS).as_posix(): path.read_text() for path in sorted(DOCS.rglob("*.md"))}
SITE_TEXT = "\n".join(PAGES.values())
CONFIGS = (PPOConfig, RMConfig, SFTConfig, DPOConfig, GRPOConfig)
# The dated experiment log is history: what it says of an old version is not checked against the code.
HISTORY = {"LOG.md"}


def _config_table_script():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "scripts" / "config_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _contract_metrics() -> list[str]:
    """tests/test_cli.py's CONTRACT_METRICS, read without importing the training code."""
    tree = ast.parse((ROOT / "tests" / "test_cli.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "CONTRACT_METRICS" for t in node.targets):
            return list(ast.literal_eval(node.value))
    raise AssertionError("tests/test_cli.py defines no CONTRACT_METRICS")


# --------------------------------------------------------------------------------------------
# README.md: the short front door
# --------------------------------------------------------------------------------------------


def test_readme_starts_with_the_two_setup_commands():
    first_block = README.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block


def test_readme_is_short():
    assert len(README) < 12_000, f"README.md has {len(README)} characters; keep it under 12,000 (the rest: docs/)"


def test_readme_links_point_at_files_that_exist():
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README)
    missing = [t for t in targets if "://" not in t and not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


# --------------------------------------------------------------------------------------------
# The site builds, offline, with every link and anchor valid
# --------------------------------------------------------------------------------------------


def test_the_site_builds_strictly_and_fetches_nothing(tmp_path: Path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}"
    assert (site / "index.html").is_file() and (site / "concepts" / "details" / "index.html").is_file()
    # A page opened from the site loads nothing from elsewhere: no web fonts, scripts or styles.
    remote = re.compile(r"<(?:link|script|img)\b[^>]*(?:href|src)=\"(?:https?:)?//", re.IGNORECASE)
    offenders = [str(p.relative_to(site)) for p in site.rglob("*.html") if remote.search(p.read_text())]
    assert not offenders, f"pages load remote resources: {offenders}"


# --------------------------------------------------------------------------------------------
# The config reference is generated from the code
# --------------------------------------------------------------------------------------------


def test_the_config_reference_is_what_the_script_generates():
    generated = _config_table_script().render()
    committed = PAGES.get("reference/config.md")
    assert committed == generated, (
        "docs/reference/config.md differs from what the code generates: run `python scripts/config_table.py`"
    )


def test_the_config_reference_has_a_table_for_every_stage():
    from tether.cli import STAGES

    tables = _config_table_script().TABLES
    covered = {stage: cls for stages, cls in tables for stage in stages}
    for stage, cls in STAGES.items():
        if cls in CONFIGS:
            assert covered.get(stage) is cls, f"scripts/config_table.py TABLES has no {cls.__name__} table for {stage}"


def test_every_config_key_is_documented():
    for config in CONFIGS:
        missing = [key for key, _, _ in field_help(config) if f"`{key}`" not in SITE_TEXT]
        assert not missing, f"docs/ does not document {config.__name__}: {missing} (run scripts/config_table.py)"


def test_config_keys_named_in_the_docs_exist():
    """A `section.key` in backticks on a page (README included) is a key some stage reads, so a page
    cannot keep describing a key the code renamed or removed."""
    keys = {key for config in CONFIGS for key, _, _ in field_help(config)}
    sections = {key.split(".")[0] for key in keys}
    pattern = re.compile(r"`(" + "|".join(sorted(sections)) + r")\.([a-z_]+(?:\.[a-z_]+)*)(?=[`=: ])")
    files = {"README.md": README, **{f"docs/{name}": text for name, text in PAGES.items() if name not in HISTORY}}
    unknown = set()
    for name, text in files.items():
        for match in pattern.finditer(text):
            key = f"{match[1]}.{match[2]}"
            if re.search(r"\.(json|jsonl|md|py|yaml|pt|html|safetensors)$", key):
                continue  # a file name such as eval.json
            if key not in keys and not any(k.startswith(key + ".") for k in keys):
                unknown.add((name, key))
    assert not unknown, f"pages name config keys no stage has: {sorted(unknown)}"


# --------------------------------------------------------------------------------------------
# Metrics, stages and the details page
# --------------------------------------------------------------------------------------------


def test_every_contract_metric_is_explained():
    missing = [key for key in _contract_metrics() if f"`{key}`" not in SITE_TEXT]
    assert not missing, f"docs/ does not explain: {missing}"


def test_every_stage_has_its_page_or_section():
    from tether.cli import STAGES

    headings = [line for text in PAGES.values() for line in text.splitlines() if line.startswith("#")]
    for stage in STAGES:
        named = re.compile(rf"\btether {re.escape(stage)}\b")
        assert any(named.search(h) for h in headings), f"no page or section of docs/ is headed `tether {stage}`"


UNBUILT = ("not built", "not yet", "is missing", "are missing", "coming soon", "not implemented", "not available")


def test_no_page_calls_a_stage_missing():
    from tether.cli import STAGES

    stage = re.compile(r"\btether (" + "|".join(map(re.escape, STAGES)) + r")\b|`(" + "|".join(STAGES) + r")`")
    files = {"README.md": README, **{f"docs/{name}": text for name, text in PAGES.items()}}
    offenders = []
    for name, text in files.items():
        for sentence in re.split(r"(?<=[.!?])\s+|\n\s*\n", text):
            if stage.search(sentence) and any(phrase in sentence.lower() for phrase in UNBUILT):
                offenders.append((name, " ".join(sentence.split())[:160]))
    assert not offenders, f"pages call a stage missing or unbuilt: {offenders}"


def test_the_details_page_numbers_its_items_1_to_20():
    """Code comments cite "docs/concepts/details.md item N": the numbering must not move."""
    numbers = [int(n) for n in re.findall(r"^### (\d+)\. ", PAGES["concepts/details.md"], re.MULTILINE)]
    assert numbers == list(range(1, 21))


def test_tests_cited_in_the_docs_exist():
    cited = set(re.findall(r"(tests/test_\w+\.py)::(\w+)", SITE_TEXT))
    assert cited, "no page cites a test"
    missing = []
    for file, name in sorted(cited):
        path = ROOT / file
        if not path.is_file() or not re.search(rf"^\s*def {name}\(", path.read_text(), re.MULTILINE):
            missing.append(f"{file}::{name}")
    assert not missing, f"pages cite tests that do not exist: {missing}"
