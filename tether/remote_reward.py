"""Rewards from a service: score a batch by POSTing it, as JSON, to a URL (docs/remote-rewards.md).

    reward = RemoteReward(RemoteRewardConfig(url="http://127.0.0.1:8000/score"))
    scores = reward.score(prompts, responses, finished)  # float32 (B,), in the input order

Request (one per `url_batch_size` samples, up to `url_concurrency` in flight at once):

    {"version": 1, "indices": [0, 1], "prompts": [...], "responses": [...], "finished": [...], ...}

`indices` are the samples' positions in the caller's batch; every other key besides `version`,
`prompts` and `responses` (so `finished` and any extra keyword argument) is passed on to the
scorer as a keyword argument. Response: {"scores": [float, ...]}, one finite number per sample.

Connection errors, timeouts, HTTP 5xx and 429 are retried with exponential backoff; anything
else (another HTTP error, a 200 with invalid JSON, the wrong number of scores, a value that is not
a finite number) fails at once. A failure is a RemoteRewardError naming the URL and the sample;
a score is never made up. Header values read secrets from the environment: "Bearer ${TOKEN}".
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from tether.config import ConfigError, RemoteRewardConfig
from tether.config.sections import ENV_REFERENCE
from tether.errors import TetherError

if TYPE_CHECKING:  # torch and httpx are imported when a client is made: the settings load without them
    import httpx
    from torch import Tensor

PROTOCOL_VERSION = 1
# Request keys that are not keyword arguments of the scorer.
RESERVED_KEYS = ("version", "indices", "prompts", "responses")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504}) | frozenset(range(505, 600))
FLOAT32_MAX = 3.4028234663852886e38
SHOWN_CHARS = 60  # of a sample's response text, in error messages
SHOWN_REPLY_CHARS = 300  # of a service's answer, in error messages


class RemoteRewardError(TetherError, RuntimeError):
    """A reward service that could not be reached or answered with something unusable.

    Exit code 1, a failed run, like NumericalError: the input was usable (the config was checked
    before the run started), and the run stopped because a service it depends on failed mid-run;
    it can continue with --resume from its last checkpoint once the service works. A mistake in the
    settings themselves (a bad URL, a missing environment variable) is a ConfigError, exit code 2,
    raised before the run starts.
    """

    exit_code = 1


def resolve_headers(headers: dict[str, str], key: str = "reward.url_headers") -> dict[str, str]:
    """The headers with every '${NAME}' replaced by the environment variable NAME.

    A variable that is not set (or empty) is a ConfigError naming it and the header; the values
    read are never put into a message."""
    resolved = {}
    for header, value in headers.items():

        def lookup(match: re.Match[str], header: str = header) -> str:
            name = match.group(1)
            secret = os.environ.get(name)
            if not secret:
                state = "is empty" if secret == "" else "is not set"
                raise ConfigError(f"{key}[{header!r}] reads the environment variable {name}, which {state}")
            return secret

        resolved[header] = ENV_REFERENCE.sub(lookup, value)
    return resolved


class _Retryable(Exception):
    """A failure of one attempt that another attempt may not repeat; `wait`: the server's
    Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, wait: float | None = None) -> None:
        super().__init__(message)
        self.wait = wait


class RemoteReward:
    """A reward service client: `score` splits a batch into requests, sends them (some in
    parallel), retries what is worth retrying, checks every score and returns them in order.

    Keeps one connection pool open; `close()` (or `with RemoteReward(...) as reward:`) ends it.
    """

    def __init__(self, config: RemoteRewardConfig, prefix: str = "reward.") -> None:
        config.validate(prefix)
        if config.url is None:
            raise ConfigError(f"{prefix}url is not set: there is no reward service to call")
        self.config = config
        self.url: str = config.url
        self.weight = config.url_weight
        headers = resolve_headers(config.url_headers, f"{prefix}url_headers")  # before any request
        import httpx

        concurrency = config.url_concurrency
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(config.url_timeout),
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        )

    def __repr__(self) -> str:  # never the resolved headers
        return f"RemoteReward(url={self.url!r})"

    def __enter__(self) -> RemoteReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def score(
        self,
        prompts: Sequence[str],
        responses: Sequence[str],
        finished: Sequence[bool] | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """One score per response: (B,) float32, in the input order. `finished` (and each extra
        keyword argument) is sent in the request; `finished` is split with the batch, the others
        are sent whole in every request. Raises RemoteRewardError naming the URL and the sample."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts for {len(responses)} responses")
        if finished is not None and len(finished) != len(responses):
            raise ValueError(f"{len(finished)} finished flags for {len(responses)} responses")
        clash = sorted(set(kwargs) & {*RESERVED_KEYS, "finished"})
        if clash:
            raise ConfigError(f"keyword arguments {clash} of the reward service clash with the request's own keys")
        import torch

        total = len(responses)
        if total == 0:
            return torch.zeros(0, dtype=torch.float32)
        size = self.config.url_batch_size
        starts = list(range(0, total, size))
        stop = threading.Event()  # set on the first failure: the other requests give up their retries

        def request(start: int) -> list[float]:
            end = min(start + size, total)
            body: dict[str, Any] = {
                "version": PROTOCOL_VERSION,
                "indices": list(range(start, end)),
                "prompts": list(prompts[start:end]),
                "responses": list(responses[start:end]),
            }
            if finished is not None:
                body["finished"] = [bool(f) for f in finished[start:end]]
            body.update(kwargs)
            return self._send(body, responses, start, end, stop)

        if len(starts) == 1:
            return torch.tensor(request(0), dtype=torch.float32)
        pool = ThreadPoolExecutor(max_workers=min(self.config.url_concurrency, len(starts)))
        try:
            futures: list[Future[list[float]]] = [pool.submit(request, start) for start in starts]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            for future in futures:  # the failure of the earliest samples, when several failed
                error = future.exception() if future in done else None
                if error is not None:
                    stop.set()
                    raise error
            return torch.tensor([value for f in futures for value in f.result()], dtype=torch.float32)
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------------------------

    def _where(self, responses: Sequence[str], start: int, end: int) -> str:
        first = f"sample {start} (response {responses[start][:SHOWN_CHARS]!r})"
        return first if end - start == 1 else f"samples {start}-{end - 1} (first: {first})"

    def _send(
        self, body: dict[str, Any], responses: Sequence[str], start: int, end: int, stop: threading.Event
    ) -> list[float]:
        """One request with its retries; the checked scores of samples start..end-1."""
        try:
            payload = json.dumps(body, allow_nan=False).encode()
        except (TypeError, ValueError) as err:
            where = self._where(responses, start, end)
            raise RemoteRewardError(f"cannot send {where} to {self.url} as JSON: {err}") from err
        if stop.is_set():  # another request of the batch failed before this one started
            raise RemoteRewardError(f"reward service {self.url}: {self._where(responses, start, end)} not sent")
        attempts = self.config.url_retries + 1
        failure, made = "", 0
        for attempt in range(attempts):
            made = attempt + 1
            try:
                return self._attempt(payload, responses, start, end)
            except _Retryable as err:
                failure, wait_hint = str(err), err.wait
            if made == attempts or stop.is_set():
                break
            delay = min(self.config.url_backoff * 2**attempt, self.config.url_backoff_max)
            if wait_hint is not None:  # a 429 / 503 Retry-After, within the same cap
                delay = min(max(delay, wait_hint), self.config.url_backoff_max)
            if stop.wait(delay):
                break  # another request of the batch failed: this one's result is not needed
        tries = f"{made} attempt" + ("s" if made > 1 else "")
        raise RemoteRewardError(
            f"reward service {self.url} failed for {self._where(responses, start, end)} after {tries}: {failure}"
        )

    def _attempt(self, payload: bytes, responses: Sequence[str], start: int, end: int) -> list[float]:
        """One try: the scores, a RemoteRewardError (not worth retrying) or _Retryable."""
        import httpx

        try:
            reply = self._client.post(self.url, content=payload, headers={"content-type": "application/json"})
        except httpx.TimeoutException as err:
            raise _Retryable(f"timed out after {self.config.url_timeout:g} s ({type(err).__name__})") from err
        except httpx.TransportError as err:
            raise _Retryable(f"could not connect or was cut off: {type(err).__name__}: {err}") from err
        text = reply.text
        if reply.status_code != 200:
            what = f"HTTP {reply.status_code} {reply.reason_phrase}, {_error_reply(text)}"
            if reply.status_code in RETRY_STATUS:
                raise _Retryable(what, _retry_after(reply))
            raise RemoteRewardError(
                f"reward service {self.url} refused {self._where(responses, start, end)}: {what} "
                "(not retried: only connection errors, timeouts, HTTP 5xx and 429 are)"
            )
        return self._checked_scores(text, responses, start, end)

    def _checked_scores(self, text: str, responses: Sequence[str], start: int, end: int) -> list[float]:
        where = self._where(responses, start, end)
        try:
            document = json.loads(text)
        except ValueError:
            message = f"reward service {self.url} sent invalid JSON for {where}: {_shown(text)}"
            raise RemoteRewardError(message) from None
        scores = document.get("scores") if isinstance(document, dict) else None
        if not isinstance(scores, list):
            raise RemoteRewardError(
                f'reward service {self.url} sent no "scores" list for {where}; expected {{"scores": [number, ...]}}, '
                f"got {_shown(text)}"
            )
        if len(scores) != end - start:
            raise RemoteRewardError(
                f"reward service {self.url} sent {len(scores)} scores for {end - start} samples, {where}: "
                f"{_shown(text)}"
            )
        checked = []
        for offset, value in enumerate(scores):
            i = start + offset
            number = _number(value)
            if number is None or not abs(number) <= FLOAT32_MAX:  # scores are float32: larger is inf
                problem = "rewards must be finite (in float32)" if number is not None else "expected a number"
                raise RemoteRewardError(
                    f"reward service {self.url} sent {value!r} for sample {i} "
                    f"(response {responses[i][:SHOWN_CHARS]!r}); {problem}"
                )
            checked.append(number)
        return checked


def _number(value: Any) -> float | None:
    """A JSON number as a float (a huge integer: inf); None for anything else (true, "1", null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value)
    except OverflowError:
        return math.inf


def _shown(text: str, chars: int = SHOWN_REPLY_CHARS) -> str:
    return repr(text[:chars] + ("..." if len(text) > chars else ""))


def _error_reply(text: str) -> str:
    """An error answer as a message shows it: its "error" text when it is {"error": "..."}."""
    try:
        document = json.loads(text)
    except ValueError:
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return f"error {_shown(document['error'])}"
    return f"reply {_shown(text)}"


def _retry_after(reply: httpx.Response) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is ignored)."""
    try:
        seconds = float(reply.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
