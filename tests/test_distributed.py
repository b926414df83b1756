"""Data parallelism on torch.distributed (gloo, two CPU processes launched by torchrun): the same
global batch and seed give the same updates as one process, for every training stage, and a
checkpoint written by N processes resumes on M. Also the pieces, one process at a time: sharding,
re-padding the gathered rollouts, shared shuffles, per-rank random streams."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_ppo import PROMPTS, REWARD_FILE
from tests.test_rm import write_preferences
from tests.test_sft import write_sft_data
from tether import runtime
from tether.run.log import read_jsonl
from tether.trajectory import Trajectory, concat_trajectories

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("distributed_worker.py")
NONDETERMINISTIC = ("time/", "throughput/", "memory/")


def launch(jobs: list[list], folder: Path, processes: int) -> None:
    """Run the jobs in one plain process, or in `processes` under torchrun (gloo)."""
    jobs_file = folder / f"jobs-{processes}-{len(list(folder.glob('jobs-*')))}.json"
    jobs_file.write_text(json.dumps(jobs))
    if processes == 1:
        command = [sys.executable, str(WORKER), str(jobs_file)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            str(WORKER),
            str(jobs_file),
        ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    # Every process of the worker marks the end of all its jobs, after leaving the process group, then
    # exits without interpreter shutdown. A non-zero exit with every marker written is gloo aborting
    # at exit after a complete run (seen on 2-core machines); the tests then check the results themselves.
    finished = all(Path(f"{jobs_file}.done-rank{rank}").is_file() for rank in range(processes))
    assert done.returncode == 0 or finished, (
        f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    )


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """Every tensor the run's final checkpoint holds, keyed by file and name."""
    final = run / "checkpoints" / "final"
    weights = {}
    for file in sorted(final.rglob("*.safetensors")):
        for name, tensor in load_file(file).items():
            weights[f"{file.relative_to(final)}:{name}"] = tensor
    assert weights, f"no weights in {final}"
    return weights


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=2e-5, msg=lambda m, k=key: f"{k}: {m}")


def assert_same_metrics(a: Path, b: Path, rows: int) -> None:
    ma, mb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert len(ma) == len(mb) == rows  # one writer: no row twice
    for row_a, row_b in zip(ma, mb, strict=True):
        keys = {k for k in row_a if not k.startswith(NONDETERMINISTIC)}
        assert keys == {k for k in row_b if not k.startswith(NONDETERMINISTIC)}
        for key in keys:
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-5), (row_a["step"], key)


def write_task_files(folder: Path) -> tuple[tuple[Path, Path], tuple[Path, Path]]:
    """What every stage's runs read, in `folder`: reward.py, prompts.jsonl, preference pairs and SFT
    examples. Returns ((preferences train, held out), (sft train, held out))."""
    (folder / "reward.py").write_text(REWARD_FILE)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return write_preferences(folder / "prefs", train=24, held_out=8), write_sft_data(folder / "sft")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> Path:
    """Every stage in one process and in two (gloo), plus the cross-count resumes; returns the folder."""
    folder = tmp_path_factory.mktemp("distributed")
    prefs, sft = write_task_files(folder)
    common = [f"model.name={tiny_llama}", "train.lr_schedule=constant", "train.micro_batch_size=1"]
    online = [
        *common,
        f"reward.function={folder / 'reward.py'}:good_share",
        f"data.prompts={folder / 'prompts.jsonl'}",
        f"data.eval={folder / 'prompts.jsonl'}",
        "train.batch_size=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "eval.num_prompts=2",
        "eval.every=2",
        "train.save_every=1",
        "train.lr=1e-3",
    ]
    ppo = [*online, "ppo.minibatch_size=4", "ppo.epochs=2", "ppo.kl_target=1.0", "ppo.whiten_rewards=true"]
    grpo = [*online, "grpo.minibatch_size=4", "grpo.epochs=2", "model.lora={r: 4, alpha: 8}"]
    offline = [*common, "train.batch_size=6", "train.steps=2", "train.save_every=1", "train.lr=1e-3"]

    def jobs(tag: str) -> list[list]:
        return [
            ["ppo", str(folder / tag / "ppo"), [*ppo, "train.steps=3"], False],
            ["ppo", str(folder / tag / "ppo-resumed"), [*ppo, "train.steps=2"], False],
            ["ppo", str(folder / tag / "ppo-head"), [*ppo, "model.critic=head", "train.steps=2"], False],
            ["grpo", str(folder / tag / "grpo"), [*grpo, "train.steps=2"], False],
            ["sft", str(folder / tag / "sft"), [*offline, f"data.train={sft[0]}", f"data.eval={sft[1]}"], False],
            ["rm", str(folder / tag / "rm"), [*offline, f"data.train={prefs[0]}", f"data.eval={prefs[1]}"], False],
            ["dpo", str(folder / tag / "dpo"), [*offline, f"data.train={prefs[0]}", f"data.eval={prefs[1]}"], False],
        ]

    def resume(run: Path) -> list:
        return ["ppo", str(run), [*ppo, "train.steps=3"], True]

    launch(jobs("one"), folder, 1)
    launch([*jobs("two"), resume(folder / "one" / "ppo-resumed")], folder, 2)  # written by 1, resumed on 2
    launch([resume(folder / "two" / "ppo-resumed")], folder, 1)  # written by 2, resumed on 1
    return folder


@pytest.mark.parametrize("stage", ["ppo", "ppo-head", "grpo", "sft", "rm", "dpo"])
def test_two_processes_take_the_same_steps_as_one(runs: Path, stage: str):
    """Same global batch, same seed: the logged metrics of every step (losses, KL, advantages'
    statistics, grad norms, eval) and the final weights match the single process's. ppo-head:
    model.critic=head, whose values come with each process's policy pass and are gathered."""
    rows = {"ppo": 3}.get(stage, 2)
    assert_same_metrics(runs / "one" / stage, runs / "two" / stage, rows)
    assert_same_weights(runs / "one" / stage, runs / "two" / stage)


@pytest.mark.parametrize("written_by", ["one", "two"])
def test_a_checkpoint_resumes_on_another_process_count(runs: Path, written_by: str):
    """Two steps on N processes, the third on M: the same run as three steps on one."""
    resumed = runs / written_by / "ppo-resumed"
    assert_same_weights(runs / "one" / "ppo", resumed)
    assert_same_metrics(runs / "one" / "ppo", resumed, rows=3)


def test_checkpoints_hold_every_process_random_stream(runs: Path):
    """A two-process checkpoint saves both processes' generators, and they differ (each process
    samples its own responses); a one-process checkpoint saves one."""
    from tether.run.checkpoints import load_trainer_state

    two = load_trainer_state(runs / "two" / "ppo" / "checkpoints" / "step-000003")["rng"]
    one = load_trainer_state(runs / "one" / "ppo" / "checkpoints" / "step-000003")["rng"]
    assert len(two) == 2 and len(one) == 1
    assert not torch.equal(two[0]["torch"], two[1]["torch"])


# --------------------------------------------------------------------------------------------
# The pieces, in one process
# --------------------------------------------------------------------------------------------


def as_rank(monkeypatch: pytest.MonkeyPatch, rank: int, size: int) -> None:
    monkeypatch.setattr(runtime, "world", lambda: runtime.World(rank, size, rank))


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("count", [0, 1, 5, 8])
def test_shards_cover_the_rows_once_in_order(monkeypatch, size, count):
    rows = list(range(count))
    shares = []
    for rank in range(size):
        as_rank(monkeypatch, rank, size)
        shares.append(list(runtime.shard(rows)))
    assert [row for share in shares for row in share] == rows
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    as_rank(monkeypatch, 1 % size, size)
    assert runtime.shard(torch.arange(count)).tolist() == shares[1 % size]  # tensors split the same way


def test_uneven_prompt_batches_are_refused_by_name(monkeypatch):
    from tether.config import ConfigError

    as_rank(monkeypatch, 0, 4)
    runtime.require_divisible(8, "train.batch_size")
    with pytest.raises(ConfigError, match=r"train.batch_size=6 .* 4 processes .* multiple of 4"):
        runtime.require_divisible(6, "train.batch_size")


def _rollout(prompts: list[list[int]], responses: list[list[int]], finished: list[bool]) -> Trajectory:
    from tether.sampling import left_pad

    prompt_ids, prompt_mask = left_pad(prompts, 0)
    width = max(len(r) for r in responses)
    response_ids = torch.zeros((len(responses), width), dtype=torch.long)
    response_mask = torch.zeros((len(responses), width), dtype=torch.bool)
    for i, r in enumerate(responses):
        response_ids[i, : len(r)] = torch.tensor(r)
        response_mask[i, : len(r)] = True
    return Trajectory(
        prompt_ids, prompt_mask, response_ids, response_mask, torch.tensor(finished), torch.arange(len(prompts))
    )


def test_concatenated_rollouts_equal_the_rollout_of_all_rows():
    """Rows from processes with different prompt and response widths, re-padded, are exactly the
    rollout one process would have built; prompt indices stay apart."""
    prompts = [[5, 6], [7, 8, 9, 10], [11], [12, 13, 14]]
    responses = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 3, 2]]
    finished = [True, False, True, False]
    whole = _rollout(prompts, responses, finished)
    merged = concat_trajectories(
        [_rollout(prompts[:2], responses[:2], finished[:2]), _rollout(prompts[2:], responses[2:], finished[2:])], 0
    )
    for name in ("prompt_ids", "prompt_mask", "response_ids", "response_mask", "finished", "prompt_index"):
        assert torch.equal(getattr(merged, name), getattr(whole, name)), name
    assert merged.response_start == 4


def test_shared_shuffles_depend_only_on_seed_step_and_epoch():
    first = torch.randperm(16, generator=runtime.shared_generator(3, 7, 1))
    torch.manual_seed(123)  # the process's own stream does not matter
    assert torch.equal(first, torch.randperm(16, generator=runtime.shared_generator(3, 7, 1)))
    assert not torch.equal(first, torch.randperm(16, generator=runtime.shared_generator(3, 7, 2)))


def test_a_process_without_a_saved_stream_starts_a_fresh_one(monkeypatch):
    """Resumed on more processes than wrote the checkpoint: rank 1 of 2 gets a stream of its own,
    different from rank 0's restored one; an old single-dict state is still read."""
    runtime.seed_everything(0)
    saved = runtime.rng_state()
    as_rank(monkeypatch, 0, 2)
    runtime.restore_rng_states(saved, seed=0, step=5)  # the pre-rank format: one dict
    rank0 = torch.rand(4)
    as_rank(monkeypatch, 1, 2)
    runtime.restore_rng_states([saved], seed=0, step=5)
    rank1 = torch.rand(4)
    runtime.set_rng_state(saved)
    assert torch.equal(rank0, torch.rand(4))
    assert not torch.equal(rank0, rank1)


# --------------------------------------------------------------------------------------------
# The command line under torchrun, and what is refused
# --------------------------------------------------------------------------------------------


def online_overrides(model: Path, folder: Path) -> list[str]:
    (folder / "reward.py").write_text(REWARD_FILE)
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    return [
        f"model.name={model}",
        f"reward.function={folder / 'reward.py'}:good_share",
        f"data.prompts={folder / 'prompts.jsonl'}",
        f"data.eval={folder / 'prompts.jsonl'}",
        "train.batch_size=4",
        "rollout.samples_per_prompt=2",
        "rollout.max_new_tokens=6",
        "eval.num_prompts=2",
        "train.sample_every=1",
        "train.steps=2",
    ]


def test_torchrun_runs_the_command_line(tiny_llama: Path, tmp_path: Path):
    """`torchrun --nproc_per_node 2 -m tether grpo ...` with real sampling: one set of files, written
    once, holding the whole batch of both processes (4 prompts x 2 samples per step)."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tether",
        "grpo",
        *online_overrides(tiny_llama, tmp_path),
        "--output",
        str(run),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-6000:]
    assert [row["step"] for row in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    samples = read_jsonl(run / "samples.jsonl")
    assert [row["step"] for row in samples] == [1] * 8 + [2] * 8
    assert len({row["prompt"] for row in samples if row["step"] == 1}) == 4
    assert any((run / "checkpoints" / "final").glob("*.safetensors"))
    assert done.stdout.count("report: ") == 1  # only the main process prints


def test_vllm_is_refused_where_it_is_not_installed(tiny_llama, tmp_path, capsys, monkeypatch):
    """rollout.engine=vllm in an environment without vLLM (this one: tests/test_vllm.py runs in its own,
    `make test-vllm`): exit 2 with the way to install it, before anything is written."""
    import tether.engines.vllm
    from tether.cli import main

    monkeypatch.setattr(tether.engines.vllm, "vllm_available", lambda: False)
    for stage in ("grpo", "ppo"):
        args = [stage, *online_overrides(tiny_llama, tmp_path), "train.device=cpu", "rollout.engine=vllm"]
        assert main([*args, "--output", str(tmp_path / "run")]) == 2
        assert "rollout.engine=vllm needs vLLM in this environment" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()  # refused before anything was written
