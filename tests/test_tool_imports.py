"""The benchmarks and scripts import only tether names that exist.

Nothing else runs them in CI (a benchmark takes minutes to hours), so a rename inside tether would
otherwise leave them broken until someone next measures: on 2026-12-02 four of them still imported
`tether.models`, `tether.rollout` and `tether.stages.online`, which had moved to
`tether.loading.models`, `tether.sampling` and `tether.run.log`.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
TOOLS = sorted([*REPO.glob("benchmarks/*.py"), *REPO.glob("scripts/*.py")])


def tether_imports(path: Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name) of every `import tether...` / `from tether... import name` in the file."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "tether":
            found += [(node.lineno, str(node.module), alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "tether"]
    return found


def unresolved(path: Path) -> list[str]:
    """The file's tether imports that fail: a module that does not exist, or a name it lacks."""
    missing = []
    for line, module_name, name in tether_imports(path):
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            missing.append(f"line {line}: {module_name} ({err})")
            continue
        if name is not None and not hasattr(module, name):
            try:
                importlib.import_module(f"{module_name}.{name}")
            except ImportError:
                missing.append(f"line {line}: {module_name}.{name}")
    return missing


def test_the_check_sees_imports(tmp_path: Path) -> None:
    tool = tmp_path / "tool.py"
    tool.write_text("import os\nimport tether.cli\n\ndef f():\n    from tether.sampling import generate, nothing\n")
    expected = [(2, "tether.cli", None), (5, "tether.sampling", "generate"), (5, "tether.sampling", "nothing")]
    assert tether_imports(tool) == expected
    tool.write_text("from tether.sampling import generate, nothing\nfrom tether.models import load_tokenizer\n")
    problems = unresolved(tool)
    assert len(problems) == 2 and "tether.sampling.nothing" in problems[0] and "tether.models" in problems[1]


@pytest.mark.parametrize("path", TOOLS, ids=lambda p: str(p.relative_to(REPO)))
def test_tool_imports_resolve(path: Path) -> None:
    missing = unresolved(path)
    assert not missing, f"{path.relative_to(REPO)} imports what tether does not have: {missing}"
