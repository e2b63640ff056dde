"""Data-parallel training with torchrun on the CPU (gloo): two ranks on the debug preset and Catch."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from agent.checkpoint import checkpoint_dirs, rank_replay_dir, read_rank_part, read_state
from agent.distributed import from_environment, tensor_digests
from agent.replay import ReplayBuffer, repartition

TRAIN = ["--env", "wm/Catch-v0", "--preset", "debug", "--threads", "1", "--device", "cpu"]


def torchrun(args: list[str], nproc: int = 2, timeout: float = 120) -> subprocess.CompletedProcess:
    # --standalone: a free rendezvous port, so runs side by side (pytest-xdist workers) do not share 29500.
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*run, "-m", "agent.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def plain(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=timeout, env=env
    )


def filled_buffer(num_envs: int, steps: int, start: int, capacity: int) -> ReplayBuffer:
    """A buffer whose frames carry their own (unique) number, episodes of 7 steps."""
    buf = ReplayBuffer(capacity, num_envs, frame_shape=(2, 2))
    for s in range(steps):
        ids = start + s * num_envs + np.arange(num_envs)
        frames = np.broadcast_to((ids % 251)[:, None, None], (num_envs, 2, 2)).astype(np.uint8)
        buf.add(
            frames,
            ids,
            ids.astype(np.float32),
            np.zeros(num_envs, bool),
            np.zeros(num_envs, bool),
            np.zeros(num_envs, bool),
            np.full(num_envs, s % 7 == 0),
        )
    return buf


@pytest.mark.parametrize(("sizes", "parts"), [((40, 40), 1), ((60,), 2), ((30, 30), 3), ((20, 20), 2)])
def test_repartition_keeps_every_transition_and_no_sequence_spans_two_streams(sizes, parts):
    bufs = [filled_buffer(2, n, 10_000 * i, capacity=1_000) for i, n in enumerate(sizes)]
    total = sum(len(b) for b in bufs)
    out = repartition(bufs, parts, capacity=1_000)
    assert len(out) == parts and all(b.num_envs == 2 and b.filled == out[0].filled for b in out)
    per_stream = total // (parts * 2)
    assert out[0].filled == per_stream
    kept = np.sort(np.concatenate([b.actions[: b.filled].ravel() for b in out]))
    before = np.sort(np.concatenate([b.actions[: b.filled].ravel() for b in bufs]))
    assert np.isin(kept, before).all() and len(np.unique(kept)) == len(kept) == parts * 2 * per_stream
    for b in out:
        for e in range(2):
            ids = b.actions[: b.filled, e]
            # Inside a stream the ids run in the order they were written unless an is_first cuts the run.
            jumps = np.flatnonzero(np.diff(ids) != 2) + 1
            assert b.is_first[jumps, e].all() and b.is_first[0, e]


def test_repartition_keeps_the_newest_frames_when_a_stream_is_full():
    bufs = [filled_buffer(2, 50, 0, 1_000), filled_buffer(2, 50, 10_000, 1_000)]
    (merged,) = repartition(bufs, 1, capacity=60)  # 30 slots per stream, pieces of 100
    assert merged.filled == 30
    assert merged.actions[-1, 1] == bufs[1].actions[49, 1]  # the newest frame of the last stream


def test_plain_process_joins_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert from_environment("cpu") is None
    assert not torch.distributed.is_initialized()


def synced_digests(state: dict) -> dict[str, str]:
    keys = ("world_model", "world_model_slow", "policy")
    return tensor_digests([state[k] for k in keys if k in state])


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("ddp") / "run"
    out = torchrun(["train", *TRAIN, "--steps", "400", "--run-dir", str(run)])
    assert out.returncode == 0, out.stderr[-3000:]
    return run


def test_two_ranks_train_one_agent_and_write_the_run_once(two_rank_run):
    run = two_rank_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["env_steps"] == 400 and not summary["stopped_early"]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 400  # one writer: no step logged twice
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == [
        "checkpoints",
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "tb",
    ]
    (ckpt,) = checkpoint_dirs(run)
    state = read_state(ckpt / "state.pt")
    assert state["world_size"] == 2
    # Both ranks hold the weights of the checkpoint, bit for bit.
    saved = synced_digests(state)
    assert json.loads(state["tensor_digests"]) == saved
    assert json.loads(read_rank_part(ckpt, 1)["tensor_digests"]) == saved
    # Each rank stepped its own envs: the steps add up to --steps, and the ranks saw different games.
    r0, r1 = (ReplayBuffer.load(rank_replay_dir(ckpt, r)) for r in (0, 1))
    assert len(r0) + len(r1) == 400 and len(r0) == len(r1)
    assert not np.array_equal(r0.frames[: r0.filled], r1.frames[: r1.filled])
    assert state["counters"]["episodes"] == len(state["episode_returns"]) > 0
    # The ranks' episodes are gathered in the order they ended.
    assert state["episode_end_steps"].tolist() == sorted(state["episode_end_steps"].tolist())


def test_eval_reads_a_two_rank_checkpoint(two_rank_run, tmp_path):
    out = plain(["eval", str(two_rank_run), "--episodes", "2", "--device", "cpu", "--out", str(tmp_path / "e.json")])
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(json.loads((tmp_path / "e.json").read_text())["returns"]) == 2


def test_a_two_rank_checkpoint_resumes_on_one_rank_and_on_two(two_rank_run, tmp_path):
    (ckpt,) = checkpoint_dirs(two_rank_run)
    rank1_before = ReplayBuffer.load(rank_replay_dir(ckpt, 1))
    one, two = tmp_path / "one", tmp_path / "two"
    shutil.copytree(two_rank_run, one)
    shutil.copytree(two_rank_run, two)

    out = plain(["train", "--resume", str(one), "--steps", "600"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "written by 2 rank(s), this run has 1" in out.stderr and "merged into one" in out.stderr
    state = read_state(checkpoint_dirs(one)[-1] / "state.pt")
    assert state["counters"]["env_steps"] == 600 and state.get("world_size", 1) == 1
    assert len(ReplayBuffer.load(rank_replay_dir(checkpoint_dirs(one)[-1], 0))) == 600

    out = torchrun(["train", "--resume", str(two), "--steps", "600"])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed at step 400" in out.stdout and "rank(s)" not in out.stderr  # same N: nothing dealt out
    last = checkpoint_dirs(two)[-1]
    state = read_state(last / "state.pt")
    assert state["counters"]["env_steps"] == 600 and state["world_size"] == 2
    rank1_after = ReplayBuffer.load(rank_replay_dir(last, 1))
    # Rank 1 took back its own replay and added its 100 new steps after it.
    assert len(rank1_after) == 300 and rank1_after.filled == rank1_before.filled + 50
    np.testing.assert_array_equal(rank1_after.frames[:100], rank1_before.frames[:100])


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks' processes through /proc")
def test_a_killed_rank_stops_the_other_with_one_line_naming_it(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "agent.cli",
        "train",
        *TRAIN,
        "--steps",
        "100000",
        "--run-dir",
        str(run),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    try:
        deadline = time.monotonic() + 90
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never started logging"
            time.sleep(0.2)
        victim = next(pid for pid in worker_pids(proc.pid) if rank_of(pid) == 1)
        os.kill(victim, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "lost rank 1" in lines[0] and "rank 0" in lines[0], err[-3000:]


def worker_pids(launcher: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(launcher)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def rank_of(pid: int) -> int | None:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    ranks = [int(e.split(b"=", 1)[1]) for e in env if e.startswith(b"RANK=")]
    return ranks[0] if ranks else None
