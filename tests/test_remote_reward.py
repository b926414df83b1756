"""Rewards from a service: the HTTP client (tether.remote_reward) against real servers on
127.0.0.1, some failing on purpose, and the reference server (tether.serve_reward).

Every server is uvicorn in a background thread on a port the system picks, waited for with a
bounded poll and always stopped (serve_reward.running_server); nothing is mocked.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tether.config import ConfigError
from tether.remote_reward import RemoteReward, RemoteRewardConfig, RemoteRewardError
from tether.serve_reward import build_app, function_scorer, main, model_scorer, running_server

FAST = {"url_timeout": 5.0, "url_retries": 2, "url_backoff": 0.01, "url_backoff_max": 0.02}
PROMPTS = ["tell me about the cat", "why is the sun red", "what is two"]
RESPONSES = ["the cat is very good and small", "no", "two is one more than one"]

Reply = tuple[int, Any]  # (HTTP status, a JSON-able body or the raw text)


class Script:
    """A scoring service that answers its n-th request with replies[n] (the last one from then on)
    and records every request: its JSON body and headers. A reply may be a function of the body,
    sync or async."""

    def __init__(self, *replies: Reply | Callable[[dict[str, Any]], Any]) -> None:
        self.replies = replies
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []

    async def endpoint(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(body)
        self.headers.append(dict(request.headers))
        reply = self.replies[min(len(self.requests), len(self.replies)) - 1]
        if callable(reply):
            reply = reply(body)
            if inspect.isawaitable(reply):
                reply = await reply
        status, content = reply
        text = content if isinstance(content, str) else json.dumps(content)
        return Response(text, status_code=status, media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/score", self.endpoint, methods=["POST"])])


def by_index(body: dict[str, Any]) -> Reply:
    """Score = 10 x the sample's index, read from its response text 'r<index>' (not from `indices`)."""
    return 200, {"scores": [10.0 * int(r[1:]) for r in body["responses"]]}


@contextmanager
def serving(script: Script, **settings: Any) -> Iterator[RemoteReward]:
    with running_server(script.app()) as base, RemoteReward(remote(base + "/score", **settings)) as reward:
        yield reward


def remote(url: str, **settings: Any) -> RemoteRewardConfig:
    return RemoteRewardConfig(url=url, **{**FAST, **settings})


# --------------------------------------------------------------------------------------------
# The client against services that work
# --------------------------------------------------------------------------------------------


def test_a_batch_is_split_into_requests_sent_in_parallel_and_scored_in_input_order() -> None:
    count, size, concurrency = 10, 3, 2
    in_flight, peak, both = 0, 0, asyncio.Event()

    async def concurrent(body: dict[str, Any]) -> Reply:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        if in_flight == concurrency:
            both.set()
        # The first requests wait (boundedly) until `concurrency` are in flight at once; the first
        # batch answers last, so the replies come back out of order.
        await asyncio.wait_for(both.wait(), timeout=5)
        await asyncio.sleep(0.2 if 0 in body["indices"] else 0.0)
        in_flight -= 1
        return by_index(body)

    script = Script(concurrent)
    responses = [f"r{i}" for i in range(count)]
    finished = [i % 3 != 0 for i in range(count)]
    with serving(script, url_batch_size=size, url_concurrency=concurrency) as reward:
        scores = reward.score([f"p{i}" for i in range(count)], responses, finished, bonus=0.5)

    assert scores.dtype == torch.float32 and scores.shape == (count,)
    assert scores.tolist() == [10.0 * i for i in range(count)]
    assert sorted(len(r["responses"]) for r in script.requests) == [1, 3, 3, 3]
    assert peak == concurrency  # requests in flight at once, never more
    for request in script.requests:
        indices = request["indices"]
        assert request["version"] == 1 and request["bonus"] == 0.5  # extra kwargs: whole, in every request
        assert request["responses"] == [responses[i] for i in indices]
        assert request["prompts"] == [f"p{i}" for i in indices]
        assert request["finished"] == [finished[i] for i in indices]
    assert sorted(i for r in script.requests for i in r["indices"]) == list(range(count))


def test_an_empty_batch_sends_nothing() -> None:
    script = Script(by_index)
    with serving(script) as reward:
        assert reward.score([], []).shape == (0,)
    assert script.requests == []


def test_http_5xx_and_429_are_retried_until_the_service_answers() -> None:
    script = Script((500, {"error": "warming up"}), (429, "slow down"), (503, "busy"), by_index)
    with serving(script, url_retries=3) as reward:
        scores = reward.score(["a", "b"], ["r0", "r1"])
    assert scores.tolist() == [0.0, 10.0]
    assert len(script.requests) == 4


# --------------------------------------------------------------------------------------------
# The client against services that fail
# --------------------------------------------------------------------------------------------


def test_http_5xx_forever_fails_after_the_retries_naming_the_url_and_the_sample() -> None:
    script = Script((503, {"error": "model not loaded"}))
    with serving(script, url_retries=2) as reward, pytest.raises(RemoteRewardError) as caught:
        reward.score(PROMPTS, RESPONSES)
    message = str(caught.value)
    assert reward.url in message
    assert "samples 0-2" in message and "sample 0 (response 'the cat is very good" in message
    assert "HTTP 503 Service Unavailable, error 'model not loaded'" in message and "after 3 attempts" in message
    assert len(script.requests) == 3
    assert caught.value.exit_code == 1  # a failed run, not bad input


def test_a_service_that_is_down_fails_after_the_retries() -> None:
    # Bound but not listening: connections are refused, and no other process can take the port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/score"
        with RemoteReward(remote(url, url_retries=1)) as reward, pytest.raises(RemoteRewardError) as caught:
            reward.score(PROMPTS[:1], RESPONSES[:1])
    message = str(caught.value)
    assert url in message and "sample 0 (response 'the cat" in message
    assert "could not connect" in message and "after 2 attempts" in message


def test_a_slow_service_times_out_and_each_attempt_is_retried() -> None:
    async def slow(body: dict[str, Any]) -> Reply:
        await asyncio.sleep(1.0)
        return by_index(body)

    script = Script(slow)
    with serving(script, url_timeout=0.2, url_retries=1) as reward, pytest.raises(RemoteRewardError) as caught:
        reward.score(["a"], ["r0"])
    message = str(caught.value)
    assert reward.url in message and "timed out after 0.2 s" in message and "after 2 attempts" in message
    assert len(script.requests) == 2


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"scores": [1.0, 2.0]}, "sent 2 scores for 3 samples, samples 0-2 (first: sample 0 (response 'the cat"),
        ({"scores": [1.0, "high", 2.0]}, "sent 'high' for sample 1 (response 'no'); expected a number"),
        ({"scores": [1.0, None, 2.0]}, "sent None for sample 1"),
        ({"scores": [True, 1.0, 2.0]}, "sent True for sample 0"),
        ('{"scores": [1.0, 2.0, NaN]}', "sent nan for sample 2 (response 'two is one"),
        ('{"scores": [1.0, Infinity, 2.0]}', "sent inf for sample 1"),
        ('{"scores": [1e999, 1.0, 2.0]}', "sent inf for sample 0"),
        ('{"scores": [1.0, 1.0, 1e39]}', "sent 1e+39 for sample 2"),  # finite, but inf in float32
        ("<html>Bad Gateway</html>", "sent invalid JSON for samples 0-2 (first: sample 0 (response 'the cat"),
        ({"score": [1.0, 2.0, 3.0]}, 'no "scores" list'),
    ],
    ids=["count", "string", "null", "bool", "nan", "infinity", "overflow", "float32", "invalid-json", "no-scores"],
)
def test_a_malformed_answer_is_an_error_naming_the_sample_and_is_not_retried(body: Any, expected: str) -> None:
    script = Script((200, body))
    with serving(script) as reward, pytest.raises(RemoteRewardError) as caught:
        reward.score(PROMPTS, RESPONSES)
    assert expected in str(caught.value) and reward.url in str(caught.value)
    assert len(script.requests) == 1


def test_a_bad_score_is_named_by_its_index_in_the_whole_batch() -> None:
    def second_batch_bad(body: dict[str, Any]) -> Reply:
        status, scores = by_index(body)
        if body["indices"] == [2, 3]:
            scores["scores"][1] = "oops"
        return status, scores

    script = Script(second_batch_bad)
    with serving(script, url_batch_size=2, url_concurrency=1) as reward, pytest.raises(RemoteRewardError) as caught:
        reward.score(["p"] * 4, ["r0", "r1", "r2", "r3"])
    assert "'oops' for sample 3 (response 'r3')" in str(caught.value)


def test_one_failing_request_fails_the_batch_naming_its_samples() -> None:
    def one_bad(body: dict[str, Any]) -> Reply:
        return (500, {"error": "judge crashed"}) if body["indices"] == [1] else by_index(body)

    script = Script(one_bad)
    settings = {"url_batch_size": 1, "url_concurrency": 2, "url_retries": 2}
    with serving(script, **settings) as reward, pytest.raises(RemoteRewardError) as caught:
        reward.score(["p"] * 4, ["r0", "r1", "r2", "r3"])
    assert "failed for sample 1 (response 'r1') after 3 attempts" in str(caught.value)
    assert "judge crashed" in str(caught.value)


# --------------------------------------------------------------------------------------------
# Headers and settings
# --------------------------------------------------------------------------------------------


def test_header_secrets_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    secret = "s3cret-t0ken"

    def authorized(body: dict[str, Any]) -> Reply:
        if script.headers[-1].get("authorization") != f"Bearer {secret}":
            return 401, {"error": "unauthorized"}
        return by_index(body)

    script = Script(authorized)
    headers = {"Authorization": "Bearer ${REWARD_TOKEN}", "X-Client": "tether"}
    monkeypatch.setenv("REWARD_TOKEN", secret)
    with running_server(script.app()) as base:
        config = remote(base + "/score", url_headers=headers)
        with RemoteReward(config) as reward:
            assert reward.score(["a"], ["r1"]).tolist() == [10.0]
            assert secret not in repr(reward)
        assert script.headers[0]["x-client"] == "tether"
        # What is saved with the run holds the variable's name, never its value.
        saved = yaml.safe_dump(dataclasses.asdict(config))
        assert "${REWARD_TOKEN}" in saved and secret not in saved

        monkeypatch.setenv("REWARD_TOKEN", "wrong")
        with RemoteReward(config) as reward, pytest.raises(RemoteRewardError) as caught:
            reward.score(["a"], ["r1"])
        assert "HTTP 401" in str(caught.value) and "not retried" in str(caught.value)
        assert len(script.requests) == 2  # a 4xx is not retried

        monkeypatch.delenv("REWARD_TOKEN")
        with pytest.raises(ConfigError, match=r"reward.url_headers\['Authorization'\].*REWARD_TOKEN.*not set"):
            RemoteReward(config)
        assert len(script.requests) == 2


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({"url": "ftp://host/score"}, "reward.url must be an http:// or https:// URL"),
        ({"url": "http://user:pw@host/score"}, "reward.url must not hold credentials"),
        ({"url_batch_size": 0}, "reward.url_batch_size must be a finite number > 0"),
        ({"url_concurrency": 2.5}, "reward.url_concurrency must be a whole number"),
        ({"url_retries": -1}, "reward.url_retries must be a finite number >= 0"),
        ({"url_timeout": 0}, "reward.url_timeout must be a finite number > 0"),
        ({"url_backoff": 2.0, "url_backoff_max": 1.0}, "reward.url_backoff_max=1.0 must be at least"),
        ({"url_headers": {"Authorization": "Bearer abc123"}}, r"looks like a credential .* environment variable"),
        ({"url_headers": {"X-Api-Key": "abc123"}}, "X-Api-Key"),
    ],
)
def test_unusable_settings_are_config_errors_naming_the_key(settings: dict[str, Any], expected: str) -> None:
    config = dataclasses.replace(RemoteRewardConfig(url="http://127.0.0.1:1/score"), **settings)
    with pytest.raises(ConfigError, match=expected) as caught:
        RemoteReward(config)
    assert caught.value.exit_code == 2


def test_settings_read_from_a_config_section_of_the_same_names() -> None:
    @dataclasses.dataclass
    class Section:  # a reward config section with the url keys among its own
        model: str | None = None
        url: str | None = "http://127.0.0.1:1/score"
        url_batch_size: int = 8
        url_weight: float = 0.25

    config = RemoteRewardConfig.from_section(Section())
    assert (config.url, config.url_batch_size, config.url_weight, config.url_retries) == (
        "http://127.0.0.1:1/score",
        8,
        0.25,
        RemoteRewardConfig().url_retries,
    )
    assert RemoteReward(config).weight == 0.25


# --------------------------------------------------------------------------------------------
# The reference server
# --------------------------------------------------------------------------------------------

REWARD_FILE = """
def score(prompts, responses, finished, bonus=0.0):
    return [len(r.split()) + (bonus if f else 0.0) for r, f in zip(responses, finished)]

def broken(prompts, responses):
    return [1.0, float("nan")] + [0.0] * (len(responses) - 2)
"""


def test_the_function_server_scores_as_the_in_process_function(tmp_path: Path) -> None:
    from tether.loading.functions import load_function
    from tether.roles.reward import call_function

    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    spec = f"{tmp_path / 'rewards.py'}:score"
    finished = [True, False, True]
    with running_server(build_app(function_scorer(spec), spec)) as base:
        assert httpx.get(base + "/health").json() == {"status": "ok", "version": 1, "scorer": spec}
        with RemoteReward(remote(base + "/score", url_batch_size=2)) as reward:
            scores = reward.score(PROMPTS, RESPONSES, finished, bonus=0.5)
    expected = call_function(load_function(spec), spec, PROMPTS, RESPONSES, finished=finished, bonus=0.5)
    assert torch.equal(scores, expected)


def test_the_function_server_applies_the_in_process_checks(tmp_path: Path) -> None:
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    spec = f"{tmp_path / 'rewards.py'}:broken"
    with running_server(build_app(function_scorer(spec), spec)) as base:
        with RemoteReward(remote(base + "/score", url_retries=1)) as reward, pytest.raises(RemoteRewardError) as caught:
            reward.score(PROMPTS, RESPONSES)
        # The server's 500 carries call_function's RewardError; a 5xx is retried, then reported.
        message = str(caught.value)
        assert "HTTP 500" in message and "returned nan for sample 1" in message and "after 2 attempts" in message

        # A request that breaks the protocol is a 400, which the client does not retry.
        for bad in ({"prompts": ["a"], "responses": ["b", "c"]}, {"version": 2, "prompts": [], "responses": []}):
            reply = httpx.post(base + "/score", json=bad)
            assert reply.status_code == 400 and "error" in reply.json()


def test_the_model_server_scores_as_sequence_scores_in_process(tmp_path: Path, tiny_llama: Path) -> None:
    from tether.config import SpeedConfig
    from tether.data import Prompt, encode_prompt, encode_response
    from tether.loading.models import eos_token_ids, load_scalar_model, load_tokenizer
    from tether.roles.reward import NORMALIZATION_KEY, sequence_scores

    folder = tmp_path / "rm"
    tokenizer = load_tokenizer(str(tiny_llama))
    classifier = load_scalar_model(str(tiny_llama), tokenizer, new_head="reward")
    setattr(classifier.config, NORMALIZATION_KEY, {"gain": 2.0, "bias": 0.5})  # as `tether rm` saves it
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    prompts = ["tell me about the cat", "why is the sun red", "what is two"]
    responses = ["the cat is very good", "no", "two is one more than one"]
    finished = [True, False, True]
    app = build_app(model_scorer(str(folder), device="cpu"), "model")
    with running_server(app) as base, RemoteReward(remote(base + "/score", url_batch_size=2)) as reward:
        remote_scores = reward.score(prompts, responses, finished)

    # In process: the rollout layout PPO scores, [left-padded prompt | right-padded response].
    model = load_scalar_model(str(folder), tokenizer)
    eos, pad = eos_token_ids(tokenizer)[0], tokenizer.pad_token_id
    prompt_ids = [encode_prompt(tokenizer, Prompt(({"role": "user", "content": p},), p), True, 256) for p in prompts]
    response_ids = [
        encode_response(tokenizer, r, eos)[: None if f else -1] for r, f in zip(responses, finished, strict=True)
    ]
    width_p, width_r = max(map(len, prompt_ids)), max(map(len, response_ids))
    rows, mask = [], []
    for p, r in zip(prompt_ids, response_ids, strict=True):
        rows.append([pad] * (width_p - len(p)) + p + r + [pad] * (width_r - len(r)))
        mask.append([0] * (width_p - len(p)) + [1] * (len(p) + len(r)) + [0] * (width_r - len(r)))
    in_process = sequence_scores(model, torch.tensor(rows), torch.tensor(mask, dtype=torch.bool), SpeedConfig())
    assert torch.allclose(remote_scores, in_process, atol=1e-5), (remote_scores, in_process)
    assert remote_scores.unique().numel() == 3  # three different sequences, three different scores


def test_the_serve_reward_command(tmp_path: Path) -> None:
    (tmp_path / "rewards.py").write_text(REWARD_FILE)
    spec = f"{tmp_path / 'rewards.py'}:score"
    command = [sys.executable, "-m", "tether.serve_reward", "--function", spec, "--port", "0", "--log-level", "error"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout = process.stdout
        assert stdout is not None
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout=120)  # startup imports torch and transformers
        assert lines and " at http://" in lines[0], (lines, process.poll())
        url = lines[0].split(" at ")[1].split()[0]
        with RemoteReward(remote(url)) as reward:
            assert reward.score(PROMPTS, RESPONSES, [True] * 3).tolist() == [7.0, 1.0, 6.0]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert process.returncode in (0, -signal.SIGTERM)


def test_serve_reward_refuses_bad_input_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--function", f"{tmp_path / 'missing.py'}:score", "--port", "0"]) == 2
    assert "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Whole runs against a service: it trains as the function does, judges, and may fail mid-run
# --------------------------------------------------------------------------------------------


class GoodShareService:
    """tests/test_ppo.py's good_share as a service, which answers 503 from its `down_from`-th request
    on (counting from 1; None: never) and counts what it was asked."""

    def __init__(self) -> None:
        self.calls = 0
        self.down_from: int | None = None

    async def endpoint(self, request: Request) -> Response:
        body = await request.json()
        self.calls += 1
        if self.down_from is not None and self.calls >= self.down_from:
            return Response('{"error": "down for maintenance"}', status_code=503, media_type="application/json")
        scores = [sum(w == "good" for w in r.split()) / max(len(r.split()), 1) for r in body["responses"]]
        return Response(json.dumps({"scores": scores}), media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/score", self.endpoint, methods=["POST"])])


def run_args(tiny_llama: Path, folder: Path, *overrides: str) -> list[str]:
    from tests.test_ppo import PROMPTS as TASK_PROMPTS
    from tests.test_ppo import REWARD_FILE as TASK_REWARD

    (folder / "reward.py").write_text(TASK_REWARD)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TASK_PROMPTS))
    return [
        "ppo",
        f"model.name={tiny_llama}",
        f"data.prompts={folder / 'prompts.jsonl'}",
        f"data.eval={folder / 'prompts.jsonl'}",
        "model.critic=head",
        "train.batch_size=4",
        "ppo.minibatch_size=4",
        "rollout.max_new_tokens=8",
        "train.lr=1e-3",
        "train.sample_every=0",
        "train.device=cpu",
        *(f"reward.{key}={value}" for key, value in FAST.items()),
        *overrides,
    ]


def test_a_run_scored_by_a_service_is_the_run_scored_in_process_and_a_service_can_judge(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """reward.url in place of reward.function (the same scores) trains the same weights; the same
    service as reward.gold logs objective/gold_scores, and as eval.judge decides the win rate."""
    from tests.test_distributed import final_weights
    from tether.cli import main as tether
    from tether.run.log import read_jsonl

    service = GoodShareService()
    function = f"reward.function={tmp_path / 'reward.py'}:good_share"
    steps = ["train.steps=3", "eval.num_prompts=2"]
    assert tether([*run_args(tiny_llama, tmp_path, function, *steps), "--output", str(tmp_path / "local")]) == 0
    with running_server(service.app()) as base:
        url = base + "/score"
        served = [f"reward.url={url}", f"reward.gold={url}", f"eval.judge={url}", *steps]
        assert tether([*run_args(tiny_llama, tmp_path, *served), "--output", str(tmp_path / "served")]) == 0
    local, remote_rows = (
        read_jsonl(tmp_path / "local" / "metrics.jsonl"),
        read_jsonl(tmp_path / "served" / "metrics.jsonl"),
    )
    assert [r["objective/scores"] for r in remote_rows] == [r["objective/scores"] for r in local]
    assert [r["objective/gold_scores"] for r in remote_rows] == [r["objective/function_scores"] for r in local]
    la, lb = final_weights(tmp_path / "local"), final_weights(tmp_path / "served")
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    evaluation = json.loads((tmp_path / "served" / "eval" / "eval.json").read_text())
    assert url in json.dumps(evaluation)  # the judge is named
    # the probe, then per step the training reward and the gold (2 requests), the evaluations
    assert service.calls >= 1 + 2 * 3


def test_a_service_failing_mid_run_stops_it_untrained_with_a_checkpoint_and_resume_is_exact(
    tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The service goes down in step 3: after the retries the run stops with exit code 1 and the URL
    in the message, step 3 trained nothing and logged nothing, the state after step 2 is a
    checkpoint (save_every would not have written one), and --resume once the service is back ends
    with the weights and metrics of a run that never saw the failure."""
    from tests.test_distributed import final_weights
    from tether.cli import main as tether
    from tether.run.log import read_jsonl

    service = GoodShareService()
    with running_server(service.app()) as base:
        url = base + "/score"
        args = run_args(tiny_llama, tmp_path, f"reward.url={url}", "train.steps=4", "eval.num_prompts=0")
        assert tether([*args, "train.save_every=0", "--output", str(tmp_path / "whole")]) == 0
        capsys.readouterr()
        service.calls, service.down_from = 0, 4  # 1: the pre-flight probe; 2, 3: steps 1 and 2; 4: step 3
        assert tether([*args, "train.save_every=0", "--output", str(tmp_path / "run")]) == 1
        err = capsys.readouterr().err
        assert url in err and "503" in err and "before its update" in err, err[-2000:]
        assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
        checkpoints = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
        assert checkpoints == ["step-000002"]
        service.down_from = None
        assert tether([*args, "train.save_every=0", "--resume", "--output", str(tmp_path / "run")]) == 0
    whole, resumed = read_jsonl(tmp_path / "whole" / "metrics.jsonl"), read_jsonl(tmp_path / "run" / "metrics.jsonl")
    drop = ("time/", "throughput/", "memory/")
    assert [{k: v for k, v in r.items() if not k.startswith(drop)} for r in resumed] == [
        {k: v for k, v in r.items() if not k.startswith(drop)} for r in whole
    ]
    wa, wb = final_weights(tmp_path / "whole"), final_weights(tmp_path / "run")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
