"""Nothing a user made is lost, and nothing fails silently: run directories, pre-flight checks of
every input, resume, damaged checkpoints, user code that tries to end the process. Table-driven:
each case is a situation and the one clear outcome it must have, run through the command line, for
every stage it applies to. The run directory must be exactly as it was after every refusal.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.tiny_models import save_tiny_model
from tether.cli import main

ALL = ("sft", "rm", "dpo", "ppo", "grpo")
ROLLOUT = ("ppo", "grpo")
OFFLINE = ("sft", "rm", "dpo")
USER_CODE = """
def good_share(prompts, responses, **kw):
    return [sum(w == "good" for w in r.split()) / max(len(r.split()), 1) for r in responses]

def strings(prompts, responses, **kw):
    return ["good" for _ in responses]

def exits(prompts, responses, **kw):
    import sys
    sys.exit(0)

def interrupts(prompts, responses, **kw):
    raise KeyboardInterrupt

def judge_nonsense(prompts, responses, **kw):
    return [None] * len(responses)
"""


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("safety")
    save_tiny_model(folder / "model", "llama")
    (folder / "code.py").write_text(USER_CODE)
    words = ["hello world", "tell me about the cat", "why is the sun red", "what is one and two"]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": w}) + "\n" for w in words))
    sft = [{"prompt": w, "response": "the cat is good"} for w in words]
    (folder / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    pairs = [{"prompt": w, "chosen": "yes the cat is good", "rejected": "no"} for w in words]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return folder


def stage_args(stage: str, task: Path) -> list[str]:
    """A short valid run of `stage` on the tiny model."""
    common = [f"model.name={task / 'model'}", "train.steps=2", "train.batch_size=2", "train.save_every=1"]
    if stage in ROLLOUT:
        return [
            *common,
            f"reward.function={task / 'code.py'}:good_share",
            f"data.prompts={task / 'prompts.jsonl'}",
            f"data.eval={task / 'prompts.jsonl'}",
            "eval.num_prompts=2",
            "rollout.max_new_tokens=4",
            "train.sample_every=0",
            *(
                ["ppo.minibatch_size=2"]
                if stage == "ppo"
                else ["rollout.samples_per_prompt=2", "grpo.minibatch_size=4"]
            ),
        ]
    data = task / ("sft.jsonl" if stage == "sft" else "pairs.jsonl")
    return [*common, f"data.train={data}", f"data.eval={data}"]


def tether(stage: str, task: Path, run: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """Exit code and what it printed (stdout then stderr)."""
    capsys.readouterr()
    code = main([stage, *stage_args(stage, task), *extra, "--output", str(run)])
    printed = capsys.readouterr()
    return code, printed.out + printed.err


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its bytes: a refusal must leave it unchanged."""
    if not folder.exists():
        return {}
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".tether.lock"
    }


# --------------------------------------------------------------------------------------------
# The table: a situation, the exit code, what the one-paragraph message must say
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    name: str
    stages: tuple[str, ...]
    # (task, run folder, stage) -> the extra command-line words, after preparing the folder.
    setup: Callable[[Path, Path, str], list[str]]
    expected: str  # in stderr
    code: int = 2
    # Whether the folder must come out byte for byte as it went in (True for every refusal).
    untouched: bool = True
    follow_up: Callable[[Path], None] | None = field(default=None)


def _finished_without_step_checkpoint(task: Path, run: Path, stage: str) -> list[str]:
    assert main([stage, *stage_args(stage, task), "train.save_every=0", "--output", str(run)]) == 0
    return ["--resume"]


def _finished(task: Path, run: Path, stage: str) -> None:
    assert main([stage, *stage_args(stage, task), "--output", str(run)]) == 0


def _data_key(stage: str) -> str:
    return "data.prompts" if stage in ROLLOUT else "data.train"


def _user_folder(run: Path) -> None:
    for name in ("eval", "tb"):
        (run / name).mkdir(parents=True)
        (run / name / "mine.txt").write_text("my notes")
    (run / "report.md").write_text("# my report\n")
    (run / "config.yaml").write_text("# my commented config\nmodel: {name: mine}\n")


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return str(path)


def _two_label_model(task: Path) -> str:
    from transformers import AutoModelForSequenceClassification

    folder = task / "two-labels"
    if not folder.is_dir():
        model = AutoModelForSequenceClassification.from_pretrained(task / "model", num_labels=2)
        model.save_pretrained(folder)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (task / "model" / name).is_file():
                (folder / name).write_bytes((task / "model" / name).read_bytes())
    return str(folder)


def _truncated_model(task: Path) -> str:
    folder = task / "truncated"
    if not folder.is_dir():
        save_tiny_model(folder, "llama")
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return str(folder)


CASES = [
    # --- run directories ---------------------------------------------------------------------
    Case(
        "resume of a run finished without a step checkpoint",
        ALL,
        _finished_without_step_checkpoint,
        "with no step checkpoint to continue from",
    ),
    Case("resume of a folder that does not exist", ALL, lambda task, run, stage: ["--resume"], "does not exist"),
    Case(
        "a folder of the user's files, without --overwrite",
        ALL,
        lambda task, run, stage: _user_folder(run) or [],
        "is not a tether run: config.yaml, eval, report.md, tb",
    ),
    Case(
        "a folder of the user's files, with --overwrite",
        ALL,
        lambda task, run, stage: _user_folder(run) or ["--overwrite"],
        "tether deletes only what it wrote",
    ),
    Case(
        "--output names a file",
        ALL,
        lambda task, run, stage: _write(run, "a file, not a folder") and [],
        "is a file, not a folder",
    ),
    # --- inputs found before anything is changed ---------------------------------------------
    Case(
        "a config file that is not UTF-8",
        ALL,
        lambda task, run, stage: ["--config", _write(task / "latin1.yaml", "# caf\xe9\n".encode("latin-1"))],
        "is not UTF-8 text",
    ),
    Case(
        "a device that is not one",
        ALL,
        lambda task, run, stage: ["train.device=banana"],
        "train.device='banana' is not",
    ),
    Case("a device this machine lacks", ALL, lambda task, run, stage: ["train.device=cuda:7"], "train.device='cuda:7'"),
    Case(
        "LoRA targets that match no module",
        ALL,
        lambda task, run, stage: ["model.lora={r: 4, target_modules: [no_such_proj]}"],
        "model.lora.target_modules=['no_such_proj'] cannot be adapted",
    ),
    Case(
        "a LoRA dropout of 1.5",
        ALL,
        lambda task, run, stage: ["model.lora={r: 4, dropout: 1.5}"],
        "dropout must be in [0, 1)",
    ),
    Case(
        "a truncated model.safetensors",
        ALL,
        lambda task, run, stage: [f"model.name={_truncated_model(task)}"],
        "cannot load model folder",
    ),
    Case(
        "a .gguf file that is no GGUF",
        ALL,
        lambda task, run, stage: [f"model.name={_write(task / 'fake.gguf', 'not a model')}"],
        "is not a GGUF file",
    ),
    Case(
        "a data file with a bad UTF-8 byte",
        ALL,
        lambda task, run, stage: [
            f"{_data_key(stage)}=" + _write(task / "bad-utf8.jsonl", b'{"prompt": "ok"}\n{"prompt": "\xff"}\n')
        ],
        "line 2: byte 0xff is not UTF-8",
    ),
    Case(
        "a message with an unknown role",
        ALL,
        lambda task, run, stage: [
            f"{_data_key(stage)}="
            + _write(
                task / "roles.jsonl",
                json.dumps(
                    {
                        "messages": [{"role": "narrator", "content": "once"}, {"role": "user", "content": "hi"}],
                        "response": "x",
                        "chosen": "a",
                        "rejected": "b",
                    }
                ),
            )
        ],
        "has the role 'narrator'",
    ),
    # --- reward sources and judges, each probed before the first step -----------------------
    Case(
        "a reward function that returns strings (with --overwrite of an old run)",
        ROLLOUT,
        lambda task, run, stage: (
            _finished(task, run, stage) or [f"reward.function={task / 'code.py'}:strings", "--overwrite"]
        ),
        "returned 'good' for sample 0; expected a number",
    ),
    Case(
        "a reward function that calls sys.exit(0)",
        ROLLOUT,
        lambda task, run, stage: ["reward.function=" + str(task / "code.py") + ":exits"],
        "raised SystemExit(0)",
    ),
    Case(
        "a reward function that raises KeyboardInterrupt",
        ROLLOUT,
        lambda task, run, stage: ["reward.function=" + str(task / "code.py") + ":interrupts"],
        "raised KeyboardInterrupt()",
    ),
    Case(
        "a gold judge that calls sys.exit(0)",
        ROLLOUT,
        lambda task, run, stage: ["reward.gold=" + str(task / "code.py") + ":exits"],
        "raised SystemExit(0)",
    ),
    Case(
        "an eval judge that returns nonsense",
        ROLLOUT,
        lambda task, run, stage: ["eval.judge=" + str(task / "code.py") + ":judge_nonsense"],
        "returned None for sample 0",
    ),
    Case(
        "a causal LM given as reward.model",
        ROLLOUT,
        lambda task, run, stage: [f"reward.model={task / 'model'}"],
        "is not a reward model",
    ),
    Case(
        "a reward model with two labels",
        ROLLOUT,
        lambda task, run, stage: [f"reward.model={_two_label_model(task)}"],
        "is a sequence classifier with 2 outputs",
    ),
]


def _case_id(case: Case, stage: str) -> str:
    return f"{stage}: {case.name}"


PARAMS = [(case, stage) for case in CASES for stage in case.stages]


@pytest.mark.parametrize(("case", "stage"), PARAMS, ids=[_case_id(c, s) for c, s in PARAMS])
def test_each_situation_has_its_one_clear_outcome(case: Case, stage: str, task: Path, tmp_path: Path, capsys):
    run = tmp_path / "run"
    extra = case.setup(task, run, stage)
    before = snapshot(run)
    code, err = tether(stage, task, run, *extra, capsys=capsys)
    assert code == case.code, err[-1500:]
    assert case.expected in err, err[-1500:]
    assert "Traceback" not in err
    assert code != 2 or err.count("error:") == 1, "one paragraph, one error"
    if case.untouched:
        assert snapshot(run) == before, "a refused run changed the folder"
        if not before:
            assert not run.exists() or run.is_file(), "a refused run left a folder behind"


# --------------------------------------------------------------------------------------------
# Situations with more to them than one command
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ALL)
def test_a_resume_that_changes_what_is_trained_is_refused_and_one_that_changes_how_long_is_recorded(
    stage: str, task: Path, tmp_path: Path, capsys
):
    run = tmp_path / "run"
    assert main([stage, *stage_args(stage, task), "--output", str(run)]) == 0
    before = snapshot(run)
    other_model = save_tiny_model(tmp_path / "other", "llama", seed=1)
    code, err = tether(stage, task, run, "--resume", f"model.name={other_model}", "train.lr=0.5", capsys=capsys)
    assert code == 2 and "changes what" in err and "model.name" in err and "train.lr" in err, err[-1500:]
    assert snapshot(run) == before
    code, err = tether(stage, task, run, "--resume", "train.steps=3", capsys=capsys)
    assert code == 0, err[-1500:]
    manifest = json.loads((run / ".tether-run.json").read_text())
    assert manifest["resumes"][-1]["changed"] == {"train.steps": [2, 3]}
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("damaged", ["trainer_state.pt", "model.safetensors"])
def test_a_damaged_newest_checkpoint_is_reported_and_the_one_before_it_used(damaged, task, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["ppo", *stage_args("ppo", task), "train.keep_last=2", "--output", str(run)]) == 0
    newest = run / "checkpoints" / "step-000002" / damaged
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    code, printed = tether("ppo", task, run, "--resume", "train.steps=3", capsys=capsys)
    assert code == 0, printed[-1500:]
    assert "passing over a damaged checkpoint" in printed and "step-000002" in printed
    assert "resuming from" in printed and "step-000001" in printed
    rows = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]  # step 2 redone from the step-1 checkpoint


def test_a_checkpoint_whose_bytes_changed_is_not_resumed_from(task, tmp_path, capsys):
    """Same size, other contents: only the checksum can tell."""
    run = tmp_path / "run"
    assert main(["ppo", *stage_args("ppo", task), "train.keep_last=1", "--output", str(run)]) == 0
    weights = run / "checkpoints" / "step-000002" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    code, err = tether("ppo", task, run, "--resume", capsys=capsys)
    assert code == 2 and "does not match its checksum" in err, err[-1500:]


def test_a_dpo_resume_without_its_reference_logprobs_is_refused(task, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["dpo", *stage_args("dpo", task), "train.steps=3", "--output", str(run)]) == 0
    (run / "reference_logprobs.pt").unlink()
    before = snapshot(run)
    code, err = tether("dpo", task, run, "--resume", "train.steps=4", capsys=capsys)
    assert code == 2 and "reference_logprobs.pt" in err and "--overwrite" in err, err[-1500:]
    assert snapshot(run) == before


def test_identical_preference_pairs_are_left_out_with_a_count(task, tmp_path, capsys, caplog):
    pairs = task / "with-ties.jsonl"
    rows = [
        {"prompt": "hi", "chosen": "same", "rejected": "same"},
        {"prompt": "hi", "chosen": "good", "rejected": "no"},
    ]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    args = [f"data.train={pairs}", f"data.eval={pairs}"]
    code, err = tether("rm", task, tmp_path / "run", *args, capsys=capsys)
    assert code == 0, err[-1500:]
    assert "2 pair(s) whose chosen and rejected responses are the same are left out (lines 1, 3)" in caplog.text
    only_ties = task / "only-ties.jsonl"
    only_ties.write_text(json.dumps(rows[0]) + "\n")
    code, err = tether(
        "dpo", task, tmp_path / "run2", f"data.train={only_ties}", f"data.eval={only_ties}", capsys=capsys
    )
    assert code == 2 and "no preference pair is left" in err


def test_a_second_run_on_a_live_runs_folder_refuses_at_once(task, tmp_path, capsys):
    """The live run holds the folder's lock (here a process that took it, as a run does)."""
    run = tmp_path / "run"
    assert main(["ppo", *stage_args("ppo", task), "--output", str(run)]) == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from tether.run.directory import RunLock;"
            " lock = RunLock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(600)",
            str(run),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        started = time.monotonic()
        code, err = tether("ppo", task, run, "--resume", "train.steps=3", capsys=capsys)
        assert code == 2 and "is in use by another tether run" in err and f"pid {holder.pid}" in err, err[-1500:]
        assert time.monotonic() - started < 30  # at once: before any model is loaded
        assert snapshot(run) == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a run killed outright: its lock goes with it
        holder.wait(timeout=30)
    code, err = tether("ppo", task, run, "--resume", "train.steps=3", capsys=capsys)
    assert code == 0, err[-1500:]


def test_overwrite_removes_exactly_what_tether_wrote(task, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["ppo", *stage_args("ppo", task), "--output", str(run)]) == 0
    (run / "eval" / "step-000009.json").write_text("{}")  # inside tether's own folder: its to manage
    code, err = tether("ppo", task, run, "--overwrite", "train.steps=1", capsys=capsys)
    assert code == 0, err[-1500:]
    assert not (run / "eval" / "step-000009.json").exists()
    (run / "notes.txt").write_text("mine")
    code, err = tether("ppo", task, run, "--overwrite", capsys=capsys)
    assert code == 2 and "holds files tether did not write: notes.txt" in err
    assert (run / "notes.txt").read_text() == "mine" and (run / "metrics.jsonl").is_file()


def _tmpfs(folder: Path, size: str, read_only: bool = False) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_while_writing_a_checkpoint_says_so_and_where(task, tmp_path, capsys):
    disk = tmp_path / "small-disk"
    if os.geteuid() != 0 or not _tmpfs(disk, "600k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        code, err = tether("ppo", task, disk / "run", capsys=capsys)
        assert code == 1 and "the disk is full: writing" in err and str(disk) in err, err[-1500:]
        assert "Traceback" not in err
        leftovers = (
            [p.name for p in (disk / "run" / "checkpoints").iterdir()]
            if (disk / "run" / "checkpoints").is_dir()
            else []
        )
        assert not [name for name in leftovers if name.startswith(".")], "a partial checkpoint was left behind"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_an_unwritable_output_is_refused_before_anything_loads(task, tmp_path, capsys):
    disk = tmp_path / "read-only"
    if os.geteuid() != 0 or not _tmpfs(disk, "64k", read_only=True):
        pytest.skip("needs root to mount a read-only tmpfs")
    try:
        code, err = tether("sft", task, disk / "run", capsys=capsys)
        assert code == 2 and "is not a folder this process may write into" in err, err[-1500:]
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


def test_eval_refuses_a_file_as_output_before_evaluating_and_names_a_missing_target(task, tmp_path, capsys):
    config = ["--config", str(task / "eval.yaml")]
    (task / "eval.yaml").write_text(
        f"model: {{name: {task / 'model'}}}\nreward: {{function: '{task / 'code.py'}:good_share'}}\n"
        f"data: {{eval: {task / 'prompts.jsonl'}}}\neval: {{num_prompts: 2}}\n"
    )
    out_file = tmp_path / "results"
    out_file.write_text("not a folder")
    capsys.readouterr()
    assert main(["eval", str(task / "model"), *config, "--output", str(out_file)]) == 2
    assert "is a file; name a folder" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "no-such-run")]) == 2
    assert str(tmp_path / "no-such-run") in capsys.readouterr().err


def test_a_reward_function_that_exits_mid_run_fails_the_run(task, tmp_path, capsys):
    """Past the probe too: sys.exit inside user code at step 2 is that function's error, not exit 0."""
    code_file = task / "exits_later.py"
    code_file.write_text(
        "calls = 0\n"
        "def later(prompts, responses, **kw):\n"
        "    global calls\n"
        "    calls += 1\n"
        "    if calls > 2:\n"
        "        import sys; sys.exit(0)\n"
        "    return [0.0] * len(responses)\n"
    )
    code, err = tether("ppo", task, tmp_path / "run", f"reward.function={code_file}:later", capsys=capsys)
    assert code == 2 and "raised SystemExit(0)" in err and "exits_later.py" in err, err[-1500:]
    # Step 2 failed before its update: the state after step 1 was written to resume from.
    assert (
        "before its update" in err and (tmp_path / "run" / "checkpoints" / "step-000001" / "checkpoint.json").is_file()
    )


def test_the_probe_does_not_change_what_a_run_draws(task, tmp_path, monkeypatch):
    """The pre-flight probe samples greedily in a forked random stream: a run's metrics are those of
    the same run without it."""
    import tether.stages.ppo as ppo

    assert main(["ppo", *stage_args("ppo", task), "--output", str(tmp_path / "with")]) == 0
    monkeypatch.setattr(ppo, "probe_scorers", lambda *args, **kwargs: None)
    assert main(["ppo", *stage_args("ppo", task), "--output", str(tmp_path / "without")]) == 0
    runs = []
    for name in ("with", "without"):
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        runs.append(
            [{k: v for k, v in r.items() if not k.startswith(("time/", "throughput/", "memory/"))} for r in rows]
        )
    assert runs[0] == runs[1]
