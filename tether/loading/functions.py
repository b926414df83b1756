"""Loading user code that tether calls: reward functions, gold judges and eval judges.

A function is named "path/to/file.py:name" (a file, imported under a private module name) or
"package.module:name" (an importable module).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from tether.errors import RewardError
from tether.roles.reward import RewardFunction


def load_function(spec: str) -> RewardFunction:
    """'path/to/file.py:name' or 'package.module:name' -> the callable."""
    if ":" not in spec:
        raise RewardError(f"reward function {spec!r} must be 'path/to/file.py:name' or 'package.module:name'")
    source, name = spec.rsplit(":", 1)
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise RewardError(f"reward function file {source!r} does not exist")
        module_name = f"tether_reward_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        assert spec_obj is not None and spec_obj.loader is not None
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except (Exception, SystemExit, KeyboardInterrupt) as err:  # importing user code ends nothing either
            raise RewardError(f"importing reward function file {source!r} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(source)
        except (Exception, SystemExit, KeyboardInterrupt) as err:
            raise RewardError(f"cannot import module {source!r} for reward function {spec!r}: {err!r}") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"{source!r} has no callable named {name!r} (from reward function {spec!r})")
    return function
