"""Loading user code that tether calls: reward functions, gold judges, eval judges and environments.

A function is named "path/to/file.py:name" (a file, imported under a private module name) or
"package.module:name" (an importable module). A gold or eval judge may also be the URL of a reward
service (`load_scorer`), asked as reward.url is (docs/remote-rewards.md).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from tether.config import RemoteRewardConfig
from tether.errors import RewardError
from tether.remote_reward import RemoteReward
from tether.roles.reward import RewardFunction


def load_function(spec: str) -> RewardFunction:
    """'path/to/file.py:name' or 'package.module:name' -> the callable."""
    return load_callable(spec, "reward function")


def load_callable(spec: str, what: str) -> Any:
    """The callable `spec` names, 'path/to/file.py:name' or 'package.module:name'; `what` it is
    (a reward function, an environment) names it in every error (a RewardError: user code)."""
    if ":" not in spec:
        raise RewardError(f"{what} {spec!r} must be 'path/to/file.py:name' or 'package.module:name'")
    source, name = spec.rsplit(":", 1)
    if source.endswith(".py"):
        path = Path(source).expanduser()
        if not path.is_file():
            raise RewardError(f"{what} file {source!r} does not exist")
        module_name = f"tether_reward_{abs(hash(str(path.resolve())))}"
        spec_obj = importlib.util.spec_from_file_location(module_name, path)
        assert spec_obj is not None and spec_obj.loader is not None
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[module_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except (Exception, SystemExit, KeyboardInterrupt) as err:  # importing user code ends nothing either
            raise RewardError(f"importing {what} file {source!r} failed: {err!r}") from err
    else:
        try:
            module = importlib.import_module(source)
        except (Exception, SystemExit, KeyboardInterrupt) as err:
            raise RewardError(f"cannot import module {source!r} for {what} {spec!r}: {err!r}") from err
    function = getattr(module, name, None)
    if not callable(function):
        raise RewardError(f"{source!r} has no callable named {name!r} (from {what} {spec!r})")
    return function


def is_service_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def load_scorer(spec: str, service: RemoteRewardConfig) -> RewardFunction:
    """reward.gold or eval.judge: a function (`load_function`), or the http(s) URL of a reward
    service, asked with the reward.url_* settings (timeout, retries, batch size, concurrency,
    headers) and checked as reward.url's answers are."""
    if not is_service_url(spec):
        return load_function(spec)
    remote = RemoteReward(dataclasses.replace(service, url=spec))

    def scored(prompts: list[str], responses: list[str], finished: Any = None, **kwargs: Any) -> Any:
        return remote.score(prompts, responses, finished, **kwargs)

    return scored
