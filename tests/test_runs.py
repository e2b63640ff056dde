"""A run a person can follow: train -> checkpoint -> resume -> eval -> watch, through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.test_cli import run

TRAIN = ("train", "--env", "wm/Catch-v0", "--preset", "debug", "--threads", "1")


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_train_resume_eval_watch(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run(*TRAIN, "--run-dir", str(run_dir), "--steps", "300", "--checkpoint-every", "100")
    assert out.returncode == 0, out.stderr[-2000:]
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_0000000200", "step_0000000300"]  # the newest two are kept
    replay_at_300 = next(r["charts/replay_size"] for r in metrics(run_dir) if r["step"] == 300)

    # TensorBoard: namespaced scalars on the env-step axis, and real-vs-predicted images.
    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for tag in ("charts/episode_return", "world_model/loss", "policy/entropy", "time/steps_per_s"):
        assert tag in scalars
    assert "world_model/next_frame_real_vs_predicted" in acc.Tags()["images"]
    assert [e.step for e in acc.Scalars("charts/replay_size")][-1] == 300

    seconds_at_300 = json.loads((run_dir / "summary.json").read_text())["train_seconds_total"]
    bad = run("train", "--resume", str(run_dir), "--steps", "400", "--seed", "1")
    assert bad.returncode == 2 and "--threads" in bad.stderr  # a learning setting cannot change on resume
    res = run("train", "--resume", str(run_dir), "--steps", "400", "--threads", "2")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed at step 300" in res.stdout
    assert json.loads((run_dir / "config.json").read_text())["threads"] == 2  # this machine's setting, kept
    summary = json.loads((run_dir / "summary.json").read_text())
    stretch = sum(v for k, v in summary.items() if k.startswith("time_"))  # this stretch, end to end
    assert 0 < seconds_at_300 < summary["train_seconds_total"] <= seconds_at_300 + stretch  # summed over stretches
    rows = metrics(run_dir)
    after = [r for r in rows if r["step"] > 300]
    assert after and after[0]["step"] == 400  # the counter went on from 300, not from 0
    assert after[0]["charts/replay_size"] == replay_at_300 + 100  # replay intact, plus the new steps
    assert json.loads((run_dir / "summary.json").read_text())["env_steps"] == 400

    ev = run("eval", str(run_dir), "--episodes", "5", "--seed", "3")
    assert ev.returncode == 0, ev.stderr[-2000:]
    res_json = json.loads((run_dir / "eval.json").read_text())
    for key in ("env_id", "env_steps_trained", "episodes", "returns", "mean", "median", "hns", "seed"):
        assert key in res_json
    assert res_json["sticky_actions"] == 0.0 and res_json["checkpoint"].endswith("step_0000000400/state.pt")
    assert res_json["episodes"] == len(res_json["returns"]) == 5 and res_json["env_steps_trained"] == 400
    assert res_json["mean"] == np.mean(res_json["returns"]) and res_json["median"] == np.median(res_json["returns"])

    gif = tmp_path / "w.gif"
    w = run("watch", str(run_dir), "--steps", "20", "--scale", "2", "--out", str(gif))
    assert w.returncode == 0, w.stderr[-2000:]
    frames = np.stack(imageio.mimread(gif))
    assert frames.shape[0] == 20
    assert frames.shape[2] == 3 * 64 * 2  # real | imagined | difference, each 128 px wide
    assert gif.with_suffix(".png").is_file()

    mp4 = tmp_path / "w.mp4"
    w = run("watch", str(run_dir / "checkpoints" / "step_0000000300"), "--steps", "12", "--out", str(mp4))
    assert w.returncode == 0, w.stderr[-2000:]
    reader = imageio.get_reader(mp4)
    first = reader.get_data(0)
    assert reader.count_frames() == 12 and first.shape[1] == 3 * 64 * 4
    reader.close()


def test_watch_compares_each_prediction_with_the_frame_it_predicts() -> None:
    """Replaying the recorded actions in a fresh env: each real frame of the open loop is the frame
    that follows its step's context, and the copy-last baseline is the context's last frame."""
    import torch

    from agent.config import preset
    from agent.dyna import LoadedAgent
    from agent.policy import ActorCritic
    from agent.watch import open_loop
    from envs import make_env
    from worldmodel.world_model import WorldModel

    cfg = preset("debug")
    cfg.env = "wm/Catch-v0"
    torch.manual_seed(0)
    wm = WorldModel(cfg.world_model, 3)
    agent = LoadedAgent(cfg, wm, ActorCritic(cfg.policy, cfg.world_model.encoder.embed_dim, 3), 0, Path("-"))
    ol = open_loop(agent, steps=30, seed=4, device=torch.device("cpu"))  # 14-step episodes: 3 segments

    env = make_env("wm/Catch-v0", num_envs=1, seed=4)
    obs, info = env.reset(seed=4)
    frames, firsts = [obs[0]], [True]
    for a in ol.env_actions:
        obs, _, _, _, info = env.step(np.array([a]))
        frames.append(obs[0])
        firsts.append(bool(info["is_first"][0]))
    K, i, since_start = cfg.world_model.context, 0, 0
    for t in range(1, len(frames)):
        since_start = 0 if firsts[t] else since_start + 1
        if since_start >= K:  # a frame after a full context: the open loop predicted it
            assert np.array_equal(ol.real[i], frames[t]), i
            assert np.array_equal(ol.last_context[i], frames[t - ol.step_in_segment[i]]), i
            i += 1
    assert i == len(ol.real) == 30 and len(ol.segment_starts) == 3


def test_status_line_shows_the_last100_mean_and_the_paid_reward(tmp_path: Path) -> None:
    from rich.console import Console

    from agent.logger import RunLogger

    logger = RunLogger(tmp_path, 100, console=Console(quiet=True), tensorboard=False)
    logger.last = {
        "charts/episode_return": 3.0,
        "charts/return_last100": 1.25,
        "world_model/reward_acc_rewarded": 0.9,
        "world_model/reward_paid_share_rewarded": 0.16,
    }
    assert logger.status_line() == "return 3 last100 1.25 rew_acc 0.9 paid 0.16"
    logger.close()
