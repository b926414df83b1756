"""The reference reward server: a reward function or a reward model behind the HTTP protocol of
`reward.url` (docs/remote-rewards.md), on Starlette and uvicorn.

    tether serve-reward --function rewards.py:score [--host 127.0.0.1] [--port 8000]
    tether serve-reward --model runs/rm/final [--device auto] [--dtype float32]

    POST /score   {"version": 1, "prompts": [...], "responses": [...], "finished": [...], ...}
                  -> 200 {"version": 1, "scores": [...]}
                  -> 400 {"error": "..."} for a request that breaks the protocol (not retried)
                  -> 500 {"error": "..."} when scoring fails (the client retries)
    GET  /health  -> 200 {"status": "ok", "version": 1, "scorer": "..."}

The scoring is the in-process code: a function is loaded with `load_function` and called with
`call_function` (so its result gets the same checks), a reward model is loaded with
`load_scalar_model` and scored with `sequence_scores` on the prompt (as a one-turn chat when the
tokenizer has a template) followed by the response and, when `finished`, EOS: the layout
`tether rm` trains on. Requests are scored one at a time, in the order they arrive.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tether.errors import RewardError, TetherError
from tether.loading.functions import load_function
from tether.remote_reward import PROTOCOL_VERSION, RESERVED_KEYS
from tether.roles.reward import call_function

log = logging.getLogger(__name__)

# score(prompts, responses, kwargs) -> one number per response; kwargs holds `finished` (when the
# request has it) and every other non-reserved key of the request.
ScoreFunction = Callable[[list[str], list[str], dict[str, Any]], Sequence[float]]


class ServeError(TetherError):
    """A server that cannot start as asked (a busy port, an unusable device): exit code 2."""


class ProtocolError(ValueError):
    """A request that breaks the protocol: answered with HTTP 400."""


def build_app(score: ScoreFunction, name: str = "score") -> Starlette:
    """An ASGI app serving POST /score with `score` and GET /health. `name` describes the
    scorer in /health and in error messages. Requests are scored one at a time (in a worker
    thread, so the server keeps answering /health), and every result is checked like an
    in-process reward function's: one finite number per response."""
    lock = threading.Lock()

    def run(prompts: list[str], responses: list[str], kwargs: dict[str, Any]) -> list[float]:
        with lock:
            values = score(prompts, responses, kwargs)
        # The checks of an in-process reward function's return (count, numbers, finite).
        return call_function(lambda _p, _r: values, name, prompts, responses).tolist()

    async def score_endpoint(request: Request) -> JSONResponse:
        try:
            prompts, responses, kwargs = parse_request(await request.body())
        except ProtocolError as err:
            return JSONResponse({"error": str(err)}, status_code=400)
        if not responses:
            return JSONResponse({"version": PROTOCOL_VERSION, "scores": []})
        try:
            scores = await run_in_threadpool(run, prompts, responses, kwargs)
        except RewardError as err:
            log.error("%s", err)
            return JSONResponse({"error": str(err)}, status_code=500)
        except Exception as err:  # a scorer's own failure: the client may retry
            log.exception("scoring with %s failed", name)
            return JSONResponse({"error": f"{name} raised {err!r}"}, status_code=500)
        return JSONResponse({"version": PROTOCOL_VERSION, "scores": scores})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok", "version": PROTOCOL_VERSION, "scorer": name})

    return Starlette(
        routes=[Route("/score", score_endpoint, methods=["POST"]), Route("/health", health, methods=["GET"])]
    )


def parse_request(body: bytes) -> tuple[list[str], list[str], dict[str, Any]]:
    """(prompts, responses, keyword arguments) of a request body, or ProtocolError saying why not."""
    try:
        request = json.loads(body)
    except ValueError as err:
        raise ProtocolError(f"the request body is not JSON: {err}") from None
    if not isinstance(request, dict):
        raise ProtocolError('the request must be a JSON object {"prompts": [...], "responses": [...], ...}')
    version = request.get("version", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {version!r} is not served here; this server speaks {PROTOCOL_VERSION}")
    texts = {}
    for key in ("prompts", "responses"):
        value = request.get(key)
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ProtocolError(f"{key!r} must be a list of strings")
        texts[key] = value
    count = len(texts["responses"])
    if len(texts["prompts"]) != count:
        raise ProtocolError(f"{len(texts['prompts'])} prompts for {count} responses")
    indices = request.get("indices")
    if indices is not None and (
        not isinstance(indices, list)
        or len(indices) != count
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in indices)
    ):
        raise ProtocolError(f"'indices' must be a list of {count} integers")
    finished = request.get("finished")
    if finished is not None and (
        not isinstance(finished, list) or len(finished) != count or not all(isinstance(f, bool) for f in finished)
    ):
        raise ProtocolError(f"'finished' must be a list of {count} booleans")
    kwargs = {k: v for k, v in request.items() if k not in RESERVED_KEYS}
    return texts["prompts"], texts["responses"], kwargs


# --------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------


def function_scorer(spec: str) -> ScoreFunction:
    """A reward function 'file.py:name' or 'package.module:name', called exactly as in-process."""
    function = load_function(spec)

    def score(prompts: list[str], responses: list[str], kwargs: dict[str, Any]) -> list[float]:
        return call_function(function, spec, prompts, responses, **kwargs).tolist()

    return score


def model_scorer(
    model_dir: str,
    device: str = "auto",
    dtype: str = "float32",
    micro_batch_size: int | None = None,
    max_prompt_length: int = 256,
    chat_template: bool | None = None,
    trust_remote_code: bool = False,
) -> ScoreFunction:
    """A reward model folder (a one-output sequence classifier), scored with `sequence_scores` on
    [prompt | response | EOS when finished]. `chat_template` None: when the tokenizer has one."""
    import torch

    from tether.config import SpeedConfig
    from tether.data import Prompt, encode_prompt, encode_response, uses_chat_template
    from tether.loading.models import eos_token_ids, load_scalar_model, load_tokenizer
    from tether.roles.forward import in_chunks
    from tether.roles.reward import sequence_scores
    from tether.runtime import autocast, pick_device
    from tether.sampling import left_pad

    where = pick_device(device)
    tokenizer = load_tokenizer(model_dir, trust_remote_code)
    model: Any = load_scalar_model(model_dir, tokenizer, trust_remote_code)
    model.to(where).requires_grad_(False).eval()
    chat = uses_chat_template(tokenizer, chat_template)
    eos_id = eos_token_ids(tokenizer)[0]
    speed = SpeedConfig()  # a run's defaults

    def score(prompts: list[str], responses: list[str], kwargs: dict[str, Any]) -> list[float]:
        finished = kwargs.get("finished") or [True] * len(responses)
        sequences = []
        for prompt, response, ended in zip(prompts, responses, finished, strict=True):
            one_turn = Prompt(({"role": "user", "content": prompt},), prompt)
            prompt_ids = encode_prompt(tokenizer, one_turn, chat, max_prompt_length)
            response_ids = encode_response(tokenizer, response, eos_id)
            sequences.append(prompt_ids + (response_ids if ended else response_ids[:-1]))
        ids, mask = left_pad(sequences, tokenizer.pad_token_id)
        with torch.no_grad(), autocast(where, dtype):
            (scores,) = in_chunks(
                lambda i, m: (sequence_scores(model, i, m, speed),), ids.to(where), mask.to(where), micro_batch_size
            )
        return scores.float().cpu().tolist()

    return score


# --------------------------------------------------------------------------------------------
# Serving
# --------------------------------------------------------------------------------------------


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound and listening on host:port (port 0: a free port the system picks)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family)


@contextmanager
def running_server(app: Any, host: str = "127.0.0.1", port: int = 0, ready_timeout: float = 10.0) -> Iterator[str]:
    """Serve `app` with uvicorn in a background thread; yields its base URL 'http://host:port' once it
    answers, and stops it on exit. For tests and notebooks; port 0 picks a free port."""
    sock = listening_socket(host, port)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="reward-server")
    thread.start()
    try:
        deadline = time.monotonic() + ready_timeout
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the reward server stopped while starting")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the reward server did not start within {ready_timeout} s")
            time.sleep(0.01)
        shown = f"[{host}]" if ":" in host else host
        yield f"http://{shown}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tether serve-reward",
        description="Serve a reward function or a reward model over HTTP for reward.url (docs/remote-rewards.md).",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--function", metavar="FILE.py:NAME", help="reward function, as reward.function takes it")
    source.add_argument("--model", metavar="DIR", help="reward model folder (a one-output sequence classifier)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port; default 8000)")
    model = parser.add_argument_group("--model options")
    model.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default auto)")
    model.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    model.add_argument("--micro-batch-size", type=int, help="sequences per forward pass (default: a request at once)")
    model.add_argument(
        "--max-prompt-length", type=int, default=256, help="longest prompt in tokens (cut from the left)"
    )
    model.add_argument(
        "--chat-template",
        choices=["auto", "yes", "no"],
        default="auto",
        help="format the prompt as a one-turn chat (auto: when the tokenizer has a template)",
    )
    model.add_argument("--trust-remote-code", action="store_true", help="passed to transformers")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    """`tether serve-reward`: serve until Ctrl-C or SIGTERM. Returns the exit code (2: bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.function is not None:
            score, name = function_scorer(args.function), args.function
        else:
            sizes = {"--micro-batch-size": args.micro_batch_size, "--max-prompt-length": args.max_prompt_length}
            for flag, value in sizes.items():
                if value is not None and value < 1:
                    raise ServeError(f"{flag} must be at least 1, got {value}")
            chat = {"auto": None, "yes": True, "no": False}[args.chat_template]
            try:
                score = model_scorer(
                    args.model,
                    args.device,
                    args.dtype,
                    args.micro_batch_size,
                    args.max_prompt_length,
                    chat,
                    args.trust_remote_code,
                )
            except ValueError as err:  # an unusable --device
                raise ServeError(str(err)) from err
            name = f"model {args.model}"
        try:
            sock = listening_socket(args.host, args.port)
        except OSError as err:
            raise ServeError(f"cannot listen on {args.host}:{args.port}: {err}") from err
    except TetherError as err:
        if args.debug:
            raise
        print(f"tether serve-reward: error: {err}", file=sys.stderr)
        return err.exit_code
    port = sock.getsockname()[1]
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"tether serve-reward: scoring with {name} at http://{shown}:{port}/score (GET /health)", flush=True)
    config = uvicorn.Config(build_app(score, name), log_level=args.log_level, lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])  # until Ctrl-C / SIGTERM, then a graceful shutdown
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
