"""Faults a long run meets: kills, signals, broken or hostile checkpoints, full disks, NaN losses."""

from __future__ import annotations

import errno
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

from agent.checkpoint import (
    CheckpointError,
    checkpoint_dirs,
    load_latest,
    read_state,
    save_state,
    write_checkpoint,
    write_manifest,
)
from agent.config import preset
from agent.dyna import DynaTrainer, NonFiniteError, load_agent
from tests.helpers import train_quietly
from tests.test_cli import run
from tests.test_runs import TRAIN, metrics

ROOT = Path(__file__).resolve().parents[1]


def start_train(run_dir: Path, *args: str, capture: bool = True) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "agent.cli", *TRAIN, "--run-dir", str(run_dir), *args]
    pipe = subprocess.PIPE if capture else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, stdout=pipe, stderr=pipe, text=True)


def wait_for(cond, timeout: float = 300.0) -> None:
    t0 = time.time()
    while True:
        try:
            if cond():
                return
        except (OSError, ValueError):  # a file caught mid-write
            pass
        if time.time() - t0 > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


def steps_of(run_dir: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in checkpoint_dirs(run_dir)]


def test_kill_9_then_resume_loses_only_steps_since_checkpoint(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, "--steps", "100000", "--checkpoint-every", "100", capture=False)
    wait_for(lambda: any(s >= 200 for s in steps_of(run_dir)))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    last = max(steps_of(run_dir))
    logged = max(r["step"] for r in metrics(run_dir))
    assert logged - last <= 100  # at most the steps since the last checkpoint are lost
    res = run("train", "--resume", str(run_dir), "--steps", str(last + 100))
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumed at step {last}" in res.stdout
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == last + 100


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_writes_checkpoint_and_exits_0(tmp_path: Path, sig: signal.Signals) -> None:
    run_dir = tmp_path / "run"
    proc = start_train(run_dir, "--steps", "100000", "--checkpoint-every", "0")
    wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(metrics(run_dir)) >= 2)
    proc.send_signal(sig)
    t0 = time.time()
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    assert time.time() - t0 < 30
    assert f"wm-agent train --resume {run_dir}" in stdout
    stopped = json.loads((run_dir / "summary.json").read_text())["env_steps"]
    assert steps_of(run_dir) == [stopped] and 0 < stopped < 100000


def test_broken_checkpoints_fall_back_and_are_kept(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run(*TRAIN, "--run-dir", str(run_dir), "--steps", "300", "--checkpoint-every", "100")
    assert out.returncode == 0, out.stderr[-2000:]
    newest = run_dir / "checkpoints" / "step_0000000300"
    state = newest / "state.pt"
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])  # truncated, as by a crash of the disk or a bad copy

    direct = run("eval", str(newest), "--episodes", "2")
    assert direct.returncode == 2 and "Traceback" not in direct.stderr
    assert "state.pt" in direct.stderr and "truncated" in direct.stderr

    ev = run("eval", str(run_dir), "--episodes", "2", "--out", str(tmp_path / "e.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert "falling back" in ev.stderr
    assert json.loads((tmp_path / "e.json").read_text())["env_steps_trained"] == 200

    res = run("train", "--resume", str(run_dir), "--steps", "300")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "unusable" in res.stderr and "step_0000000300.broken" in res.stderr
    assert "resumed at step 200" in res.stdout
    broken = run_dir / "checkpoints" / "step_0000000300.broken" / "state.pt"
    assert broken.read_bytes() == data[: len(data) // 2]  # kept as it was, never overwritten
    assert steps_of(run_dir) == [200, 300]  # a fresh step-300 checkpoint beside the broken one

    # A flipped byte in the replay (same size) is caught by the manifest's hash.
    frames = run_dir / "checkpoints" / "step_0000000300" / "replay" / "frames.npy"
    raw = bytearray(frames.read_bytes())
    raw[-10] ^= 0xFF
    frames.write_bytes(bytes(raw))
    warnings: list[str] = []
    _, _, used = load_latest(run_dir, with_replay=True, warn=warnings.append, quarantine_broken=False)
    assert used.name == "step_0000000200"
    assert len(warnings) == 1 and "frames.npy: corrupted" in warnings[0]
    for p in checkpoint_dirs(run_dir):
        shutil.rmtree(p)
    bad = run("train", "--resume", str(run_dir))
    assert bad.returncode == 2 and "no checkpoint" in bad.stderr and "Traceback" not in bad.stderr


def test_kill_while_writing_keeps_previous_checkpoint(tmp_path: Path) -> None:
    state = {"world_model": {"w": torch.ones(3)}, "policy": {}, "config": "{}", "num_actions": 3, "counters": {}}
    write_checkpoint(tmp_path, 100, state, None)

    def dies_midway(obj: dict, path: Path) -> None:
        path.write_bytes(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # stands in for SIGKILL: nothing after this line runs

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 200, state, None, save=dies_midway)
    assert (tmp_path / "checkpoints" / "step_0000000200.tmp").exists()  # the half-written one
    loaded, _, path = load_latest(tmp_path, with_replay=False, warn=print)
    assert path.name == "step_0000000100" and torch.equal(loaded["world_model"]["w"], torch.ones(3))


def test_disk_full_is_a_clear_error_and_keeps_previous(tmp_path: Path) -> None:
    state = {"world_model": {"w": torch.ones(3)}, "policy": {}, "config": "{}", "num_actions": 3, "counters": {}}
    write_checkpoint(tmp_path, 100, state, None)

    def full(obj: dict, path: Path) -> None:
        path.write_bytes(b"partial")
        if Path("/dev/full").exists():  # a device on which every write fails with ENOSPC
            save_state(obj, Path("/dev/full"))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointError, match="disk full.*step_0000000100 is intact"):
        write_checkpoint(tmp_path, 200, state, None, save=full)
    assert steps_of(tmp_path) == [100]
    assert not (tmp_path / "checkpoints" / "step_0000000200.tmp").exists()
    load_latest(tmp_path, with_replay=False, warn=print)


class Payload:
    """Unpickling this runs ``open(marker, 'w')``: what a hostile checkpoint would do."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_pickle_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "checkpoints" / "step_0000000100"
    ckpt.mkdir(parents=True)
    evil = {"world_model": Payload(str(marker)), "policy": {}, "config": "{}", "num_actions": 3, "counters": {}}
    torch.save(evil, ckpt / "state.pt")
    write_manifest(ckpt)  # a consistent manifest: the refusal comes from weights_only, not from the hash
    with pytest.raises(CheckpointError, match="refused"):
        read_state(ckpt / "state.pt")
    out = run("eval", str(ckpt / "state.pt"), "--episodes", "1")
    assert out.returncode == 2 and "refused" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists()


def test_persistent_nan_stops_run_with_last_checkpoint_intact(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.threads, cfg.checkpoint_every, cfg.max_nonfinite_updates = "wm/Catch-v0", 2000, 1, 200, 5
    tmp_path.mkdir(exist_ok=True)
    trainer = DynaTrainer(cfg, tmp_path)
    real_loss = trainer.wm_trainer.loss_and_latents

    def poisoned(batch, head_batch=None, dynamics_batch=None):
        loss, m, z = real_loss(batch, head_batch, dynamics_batch)
        return (loss * float("nan") if trainer.counters.env_steps > 200 else loss), m, z

    trainer.wm_trainer.loss_and_latents = poisoned
    with pytest.raises(NonFiniteError, match="NaN or inf for 5 updates in a row.*step_0000000200 is intact"):
        train_quietly(trainer)
    assert trainer.wm_trainer.skipped == 5
    assert steps_of(tmp_path) == [200]
    load_latest(tmp_path, with_replay=True, warn=print)
    assert all(torch.isfinite(p).all() for p in trainer.wm.parameters())  # skipped, never applied


def test_inf_gradient_with_finite_loss_is_skipped() -> None:
    from tests.helpers import random_replay
    from worldmodel.trainer import OptimConfig, WorldModelTrainer
    from worldmodel.world_model import WorldModel

    cfg = preset("debug").world_model
    wm = WorldModel(cfg, 3)
    trainer = WorldModelTrainer(wm, OptimConfig(), torch.device("cpu"))
    batch = random_replay("wm/Catch-v0", steps=60, num_envs=2).sample(4, cfg.seq_len, np.random.default_rng(0))
    before = [p.detach().clone() for p in wm.parameters()]
    hook = next(wm.decoder.parameters()).register_hook(lambda g: g * float("inf"))
    trainer.update(batch)
    hook.remove()
    assert trainer.skipped == 1 and trainer.updates == 0
    assert all(torch.equal(a, b) for a, b in zip(before, wm.parameters(), strict=True))


def test_resume_restores_optimizer_rng_and_episodes(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.threads = "wm/Catch-v0", 300, 1
    a = DynaTrainer(cfg, tmp_path)
    train_quietly(a)
    a_next_numpy, a_next_torch = a.rng.integers(1 << 30), torch.rand(3)
    b = DynaTrainer(cfg, tmp_path, resume=True)
    for x, y in ((a.wm_trainer.optimizer, b.wm_trainer.optimizer), (a.ppo.optimizer, b.ppo.optimizer)):
        sx, sy = x.state_dict()["state"], y.state_dict()["state"]
        assert sx.keys() == sy.keys() and all(torch.equal(sx[k]["exp_avg"], sy[k]["exp_avg"]) for k in sx)
    assert a.counters == b.counters and a.episode_returns == b.episode_returns
    assert a.episode_end_steps == b.episode_end_steps and len(a.replay) == len(b.replay)
    assert b.rng.integers(1 << 30) == a_next_numpy  # the RNG streams go on where the checkpoint left them
    assert torch.equal(torch.rand(3), a_next_torch)


def test_training_time_from_before_it_was_counted_stays_unknown(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.threads = "wm/Catch-v0", 200, 1
    a = DynaTrainer(cfg, tmp_path)
    assert train_quietly(a)["train_seconds_total"] >= a.counters.train_seconds > 0
    del a.counters.train_seconds  # the counters of a checkpoint written before the field existed
    a.save_checkpoint()
    cfg.steps = 300
    b = DynaTrainer(cfg, tmp_path, resume=True)
    summary = train_quietly(b)
    assert summary["env_steps"] == 300 and summary["train_seconds_total"] is None and b.counters.train_seconds is None
    assert load_agent(tmp_path, torch.device("cpu")).train_seconds is None  # not the time since the resume


@pytest.mark.parametrize("cmd", ["eval", "watch"])
def test_not_a_run_dir(tmp_path: Path, cmd: str) -> None:
    out = run(cmd, str(tmp_path))
    assert out.returncode == 2 and "neither a wm-agent run directory" in out.stderr
    res = run("train", "--resume", str(tmp_path))
    assert res.returncode == 2 and "not a wm-agent run directory" in res.stderr


def test_a_run_in_use_is_not_resumed_twice(tmp_path: Path) -> None:
    import fcntl

    run_dir = tmp_path / "run"
    out = run(*TRAIN, "--run-dir", str(run_dir), "--steps", "100")
    assert out.returncode == 0, out.stderr[-2000:]
    with open(run_dir / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a still-running process would
        res = run("train", "--resume", str(run_dir), "--steps", "200")
    assert res.returncode == 2 and "in use by another wm-agent process" in res.stderr
