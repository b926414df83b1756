"""Nothing lost, nothing silently wrong: bad input, signals, killed processes, non-finite numbers.

Resume equivalence itself (metrics and weights bit-identical after a stop, at and away from an
epoch boundary, with the adaptive KL controller) is in test_ppo.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.test_ppo import NONDETERMINISTIC, PROMPTS, REWARD_FILE, tiny_config
from tests.tiny_models import save_tiny_model
from tether.cli import main
from tether.errors import NumericalError
from tether.run.log import read_jsonl
from tether.stages.ppo import PPOTrainer


@pytest.fixture
def task(tmp_path: Path, tiny_llama: Path) -> Path:
    (tmp_path / "reward.py").write_text(
        REWARD_FILE
        + "\ndef raises(prompts, responses, **kw):\n    raise ZeroDivisionError('no reward today')\n"
        + "\ndef too_few(prompts, responses, **kw):\n    return [0.0]\n"
        + "\ndef nan_on_third(prompts, responses, **kw):\n"
        + "    return [float('nan') if i == 2 else 0.0 for i in range(len(responses))]\n"
    )
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = {
        "model": {"name": str(tiny_llama)},
        "data": {"prompts": str(tmp_path / "prompts.jsonl"), "eval": str(tmp_path / "prompts.jsonl")},
        "reward": {"function": f"{tmp_path / 'reward.py'}:good_share"},
        "rollout": {"max_new_tokens": 6},
        "train": {"steps": 6, "batch_size": 4, "save_every": 2, "sample_every": 0, "lr": 1e-3},
        "ppo": {"epochs": 1, "minibatch_size": 4},
        "eval": {"num_prompts": 0},
    }
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


GOOD_LINE = json.dumps({"prompt": "hello"}) + "\n"


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _write_bytes(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def bad_inputs(task: Path) -> list[tuple[str, list[str], str]]:
    """(case, extra CLI arguments, text the error must contain). Every case exits with code 2."""
    no_template = save_tiny_model(task / "no-template", chat_template=False)
    fn = f"{task / 'reward.py'}"
    return [
        ("missing data file", ["data.prompts=/no/such/prompts.jsonl"], "/no/such/prompts.jsonl does not exist"),
        (
            "unreadable data file",
            [f"data.prompts={_write_bytes(task / 'bin.jsonl', bytes([0xFF, 0xFE, 0x00]))}"],
            "cannot read data file",
        ),
        ("a folder that is no dataset", [f"data.prompts={task}"], "not a dataset saved with save_to_disk"),
        (
            "malformed JSON line",
            [f"data.prompts={_write(task / 'm.jsonl', GOOD_LINE * 2 + '{bad' + chr(10))}"],
            "m.jsonl, line 3: not valid JSON",
        ),
        (
            "missing field",
            [f"data.prompts={_write(task / 'f.jsonl', json.dumps({'text': 'hi'}))}"],
            "f.jsonl, line 1: expected a field 'prompt'",
        ),
        (
            "wrong type",
            [f"data.prompts={_write(task / 't.jsonl', json.dumps({'prompt': 3}))}"],
            "t.jsonl, line 1: field 'prompt' must be a non-empty string, got 3",
        ),
        ("empty dataset", [f"data.prompts={_write(task / 'e.jsonl', chr(10))}"], "e.jsonl holds no records"),
        (
            "prompt over the maximum",
            ["data.max_prompt_length=3", "data.prompt_overflow=error"],
            "longer than data.max_prompt_length=3",
        ),
        ("model path that does not exist", ["model.name=/no/such/model"], "'/no/such/model' is not a folder"),
        (
            "no chat template where one is needed",
            [f"model.name={no_template}", "data.apply_chat_template=true"],
            "the tokenizer has no chat template",
        ),
        ("unknown config key", ["ppo.clip_coeff=0.1"], "did you mean 'ppo.clip_coef'"),
        ("wrong value type", ["train.steps=many"], "train.steps: expected an integer, got 'many'"),
        ("negative learning rate", ["train.lr=-0.001"], "train.lr must be a finite number > 0"),
        ("clip of 0", ["ppo.clip_coef=0"], "ppo.clip_coef must be a finite number > 0"),
        ("batch that does not divide", ["ppo.minibatch_size=3"], "ppo.minibatch_size=3 must divide"),
        ("an eval judge that is not one", ["eval.judge=rewards"], "eval.judge must be 'auto', 'reward', 'gold'"),
        (
            "reward function that cannot be imported",
            ["reward.function=no_such_module_xyz:f"],
            "cannot import module 'no_such_module_xyz'",
        ),
        (
            "reward function that raises",
            [f"reward.function={fn}:raises"],
            "raised ZeroDivisionError('no reward today')",
        ),
        ("wrong number of rewards", [f"reward.function={fn}:too_few"], "returned 1 values for 2 responses"),
        ("NaN reward", [f"reward.function={fn}:nan_on_third"], "returned nan for sample 2 (prompt"),
    ]


def test_every_bad_input_is_one_clear_error_with_exit_code_2(task: Path, capsys: pytest.CaptureFixture[str]):
    failures = []
    for case, extra, expected in bad_inputs(task):
        code = main(["ppo", "--config", str(task / "tiny.yaml"), *extra, "--output", str(task / "run" / case)])
        err = capsys.readouterr().err
        if code != 2 or expected not in err or "Traceback" in err:
            failures.append(f"{case}: exit {code}, stderr {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)


def test_a_run_directory_holding_another_run_is_refused(task: Path, capsys: pytest.CaptureFixture[str]):
    run = str(task / "run")
    assert main(["ppo", "--config", str(task / "tiny.yaml"), "train.steps=1", "--output", run]) == 0
    capsys.readouterr()
    assert main(["ppo", "--config", str(task / "tiny.yaml"), "--output", run]) == 2
    assert "already holds a run; pass --resume to continue it, --overwrite to replace it" in capsys.readouterr().err


def test_overwrite_with_bad_input_leaves_the_old_run_untouched(task: Path, capsys: pytest.CaptureFixture[str]):
    run = task / "run"
    assert main(["ppo", "--config", str(task / "tiny.yaml"), "train.steps=2", "--output", str(run)]) == 0
    before = (run / "metrics.jsonl").read_text()
    code = main(
        ["ppo", "--config", str(task / "tiny.yaml"), "data.prompts=/nope.jsonl", "--overwrite", "--output", str(run)]
    )
    assert code == 2 and (run / "metrics.jsonl").read_text() == before
    assert (run / "checkpoints" / "step-000002").is_dir()


def test_debug_shows_the_traceback(task: Path):
    with pytest.raises(Exception, match="did you mean"):
        main(["ppo", "--config", str(task / "tiny.yaml"), "ppo.clip_coeff=0.1", "--debug", "--output", str(task / "r")])


def test_same_config_and_seed_give_the_same_metrics(task: Path, tiny_llama: Path):
    for name in ("a", "b"):
        PPOTrainer(tiny_config(tiny_llama, task, "train.steps=3"), task / name).train()
    a, b = (read_jsonl(task / name / "metrics.jsonl") for name in ("a", "b"))
    strip = [{k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)} for r in a + b]
    assert strip[:3] == strip[3:]


# ------------------------------------------------------------------------------------------
# Non-finite numbers
# ------------------------------------------------------------------------------------------


def _poison_gradients(trainer: PPOTrainer) -> None:
    """Every backward pass leaves a NaN in one policy gradient."""
    param = next(p for p in trainer.policy.parameters() if p.requires_grad)
    param.register_hook(lambda grad: torch.full_like(grad, float("nan")))


def test_a_non_finite_gradient_never_reaches_the_weights(task: Path, tiny_llama: Path):
    trainer = PPOTrainer(tiny_config(tiny_llama, task, "train.steps=2", "train.max_nonfinite_in_a_row=10"), task / "r")
    before = {k: v.clone() for k, v in trainer.policy.state_dict().items()}
    value_before = {k: v.clone() for k, v in trainer.value_model.state_dict().items()}
    _poison_gradients(trainer)
    trainer.run.step = 1
    metrics, _ = trainer.iteration()
    assert metrics["train/skipped_updates"] == trainer.config.ppo.epochs  # one minibatch per epoch
    for name, tensor in trainer.policy.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name} changed by a NaN update"
    for name, tensor in trainer.value_model.state_dict().items():
        assert torch.equal(tensor, value_before[name]), f"value {name} changed although its step was skipped"
    assert all(torch.isfinite(state["exp_avg"]).all() for state in trainer.optimizer.state.values())


def test_non_finite_gradients_in_a_row_stop_the_run_with_a_checkpoint(task: Path, tiny_llama: Path):
    config = tiny_config(tiny_llama, task, "train.steps=10", "ppo.epochs=1", "train.max_nonfinite_in_a_row=2")
    trainer = PPOTrainer(config, task / "run")
    _poison_gradients(trainer)
    with pytest.raises(NumericalError) as raised:
        trainer.train()
    message = str(raised.value)
    assert "stopped at step 2" in message and "non-finite gradient in the policy" in message
    assert "--resume" in message and "train.lr" in message
    assert (task / "run" / "checkpoints" / "step-000002" / "trainer_state.pt").is_file()
    assert len(read_jsonl(task / "run" / "metrics.jsonl")) == 2


# ------------------------------------------------------------------------------------------
# Signals and killed processes (real subprocesses)
# ------------------------------------------------------------------------------------------

WRAPPER = """
import os, sys, time
import tether.run.checkpoints as online
import tether.stages.ppo as ppo

if os.environ.get("SLOW_ITERATIONS"):
    real_iteration = ppo.PPOTrainer.iteration
    def slow_iteration(self):
        time.sleep(float(os.environ["SLOW_ITERATIONS"]))
        return real_iteration(self)
    ppo.PPOTrainer.iteration = slow_iteration

if os.environ.get("HANG_AT_CHECKPOINT"):
    real_save = online.save_trainer_state
    def hanging_save(folder, state):
        real_save(folder, state)
        if state["step"] == int(os.environ["HANG_AT_CHECKPOINT"]):
            open(os.environ["MARKER"], "w").close()
            time.sleep(600)  # killed here, before the folder is renamed into place
    online.save_trainer_state = hanging_save

from tether.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(task: Path, run: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    (task / "wrapper.py").write_text(WRAPPER)
    return subprocess.Popen(
        [
            sys.executable,
            str(task / "wrapper.py"),
            "ppo",
            "--config",
            str(task / "tiny.yaml"),
            *extra,
            "--output",
            str(run),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(process: subprocess.Popen[str], condition, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(f"the run ended early (exit {process.returncode}): {process.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)


def _deterministic_rows(run: Path) -> list[dict]:
    return [
        {k: v for k, v in r.items() if not k.startswith(NONDETERMINISTIC)} for r in read_jsonl(run / "metrics.jsonl")
    ]


def _final_weights(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run / "checkpoints" / "final" / "model.safetensors")


@pytest.fixture
def straight_run(task: Path) -> Path:
    run = task / "straight"
    process = _start(task, run)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    return run


def test_sigterm_writes_a_checkpoint_and_the_resumed_run_matches(task: Path, straight_run: Path):
    run = task / "stopped"
    process = _start(task, run, "train.save_every=0", env={"SLOW_ITERATIONS": "0.5"})
    metrics = run / "metrics.jsonl"
    _wait_for(process, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM after step" in err and "Traceback" not in err
    stopped_at = len(read_jsonl(metrics))
    assert stopped_at < 6 and (run / "checkpoints" / f"step-{stopped_at:06d}" / "trainer_state.pt").is_file()

    resumed = _start(task, run, "--resume", "train.save_every=0")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert _deterministic_rows(run) == _deterministic_rows(straight_run)
    a, b = _final_weights(run), _final_weights(straight_run)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_sigkill_while_writing_a_checkpoint_leaves_the_previous_one_usable(task: Path, straight_run: Path):
    run = task / "killed"
    marker = task / "hanging"
    process = _start(task, run, env={"HANG_AT_CHECKPOINT": "4", "MARKER": str(marker)})
    _wait_for(process, marker.exists)
    process.kill()  # SIGKILL: no handler runs, the step-4 folder is half-way
    process.communicate(timeout=60)
    checkpoints = run / "checkpoints"
    assert any(p.name.startswith(".step-000004") for p in checkpoints.iterdir()), "expected a partial folder"
    assert sorted(p.name for p in checkpoints.iterdir() if not p.name.startswith(".")) == ["step-000002"]

    resumed = _start(task, run, "--resume")
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-2000:]
    assert "resuming from" in out and "step-000002" in out
    assert not [p for p in checkpoints.iterdir() if p.name.startswith(".")], "partial folder left behind"
    assert _deterministic_rows(run) == _deterministic_rows(straight_run)
    a, b = _final_weights(run), _final_weights(straight_run)
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_a_reward_model_giving_nan_is_named_with_the_sample(task: Path, tiny_llama: Path):
    from tests.test_ppo import _save_reward_model
    from tether.roles.reward import RewardError

    rm = _save_reward_model(task / "rm", tiny_llama)
    trainer = PPOTrainer(tiny_config(tiny_llama, task, f"reward.model={rm}"), task / "run")
    with torch.no_grad():
        trainer.roles.rewards.model.score.weight.fill_(float("nan"))
    trainer.run.step = 1
    with pytest.raises(RewardError, match=r"reward model .* gave nan for sample 0"):
        trainer.iteration()
