"""The held-out world-model measures of ``wm-agent bench world-model``: RAM-labelled rollouts, probes,
open-loop windows and the report's fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from agent.config import preset
from agent.wm_report import REWARD_AND_END_KEYS, MLPProbe, episode_windows, open_loop, r2, replay_of, world_model_report
from envs.annotations import POSITION_NAMES, annotated_rollout, has_annotations
from worldmodel.world_model import WorldModel


@pytest.fixture(scope="module")
def breakout_rollout():
    return annotated_rollout("ALE/Breakout-v5", steps=600, num_envs=2, seed=0)


def test_r2_and_a_probe_that_can_read_the_target() -> None:
    y = np.linspace(0, 1, 50)
    assert r2(y, y) == 1.0
    assert abs(r2(np.full_like(y, y.mean()), y)) < 1e-12
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 8))
    target = 3 * x[:, 2] - x[:, 5]
    probe = MLPProbe(x[:1600], target[:1600], steps=500)
    assert r2(probe(x[1600:]), target[1600:]) > 0.95
    noise = MLPProbe(rng.normal(size=(1600, 8)), target[:1600], steps=200)
    assert r2(noise(rng.normal(size=(400, 8))), target[1600:]) < 0.2


def test_windows_stay_inside_one_episode() -> None:
    is_first = np.zeros((10, 2), bool)
    is_first[0] = True
    is_first[6, 1] = True  # copy 1 starts a new episode at slot 6
    starts, envs = episode_windows(is_first, 3, 0, 10)
    assert len(starts) == 8 + 6  # copy 0: starts 0..7; copy 1: 0..3 and 6..7
    for s, n in zip(starts, envs, strict=True):
        assert not is_first[s + 1 : s + 3, n].any()
    starts, envs = episode_windows(is_first, 3, 5, 10)
    assert sorted(zip(starts.tolist(), envs.tolist(), strict=True)) == [(5, 0), (6, 0), (6, 1), (7, 0), (7, 1)]


def test_rollout_labels_positions_from_ram(breakout_rollout) -> None:
    r = breakout_rollout
    assert has_annotations("ALE/Breakout-v5") and has_annotations("ALE/Pong-v5")
    assert not has_annotations("ALE/Seaquest-v5") and not has_annotations("wm/Catch-v0")
    assert r.frames.shape == (300, 2, 64, 64) and r.positions.shape == (300, 2, len(POSITION_NAMES))
    assert r.is_first[0].all()
    assert 0.3 < r.ball_in_play.mean() < 1.0
    # The paddle moves under random actions and the ball's coordinates are on screen while in play.
    assert r.positions[..., 0].std() > 5
    assert (r.positions[..., 1:][r.ball_in_play] > 0).all()
    # A ball past the paddle (RAM y >= 188) is not drawn: no frame shows it, so it is not in play, and
    # the frame from which a life is lost is such a frame.
    assert (r.positions[..., 2][r.ball_in_play] < 188).all()
    assert r.life_loss.any() and not r.ball_in_play[r.life_loss].any()
    with pytest.raises(ValueError, match="no RAM position annotations"):
        annotated_rollout("wm/Catch-v0", 10)


def test_report_fields_present_and_finite(breakout_rollout) -> None:
    torch.manual_seed(0)
    cfg = preset("debug").world_model
    wm = WorldModel(cfg, num_actions=4)
    wm.set_base_rates(0.01, 0.02)
    data = replay_of(breakout_rollout)
    depths = (1, 4)
    r = breakout_rollout
    rep = world_model_report(wm, data, r.positions, r.ball_in_play, depths=depths, probe_steps=50, max_windows=64)
    assert set(rep["probe"]) == {f"{n}_r2" for n in POSITION_NAMES}
    for name in POSITION_NAMES:
        for key in (f"{name}_r2", f"hold_last_{name}_r2"):
            assert set(rep["open_loop"][key]) == {"1", "4"}
    for key in REWARD_AND_END_KEYS:
        assert set(rep[key]) == {"1", "4"}
    flat = [*rep["probe"].values(), *(v for k in rep["open_loop"].values() for v in k.values())]
    quiet = ("reward_paid_unrewarded", "reward_paid_unrewarded_within_1", "false_end_rate")
    flat += [rep[k][d] for k in quiet for d in ("1", "4")]
    assert all(math.isfinite(v) for v in flat)
    assert rep["windows"]["4"]["probe"] <= 64 and rep["windows"]["1"]["ended"] > 0


def test_open_loop_depth_zero_context_matches_imagine_step() -> None:
    torch.manual_seed(0)
    cfg = preset("debug").world_model
    wm = WorldModel(cfg, num_actions=3).eval()
    K = cfg.context
    z = torch.randn(K + 2, 1, cfg.encoder.latent_dim)
    actions = np.array([[0], [1], [2], [1], [0]])[: K + 2]
    out = open_loop(wm, z, actions, np.array([0]), np.array([0]), d=2)
    window = z[:K, 0][None]
    for j in range(2):
        pred = wm.imagine_step(window, torch.tensor([actions[K - 1 + j, 0]]))
        window = torch.cat([window[:, 1:], pred.latent], dim=1)
    assert torch.allclose(out.latent, window[:, -1], atol=1e-6)
    assert torch.allclose(out.reward, pred.reward, atol=1e-6)


def test_breakout_tracker_meets_the_ball_and_its_mirror_runs() -> None:
    from envs.ram_players import FIRE, LEFT, NOOP, RIGHT, TRACKER_AIM, breakout_tracker, has_tracker

    # paddle x, ball x, ball y (RAM): ball far right, far left, right above the aim, not in play, past the paddle.
    pos = np.array([[50, 100, 150], [50, 20, 150], [50, 50 + TRACKER_AIM, 150], [50, 0, 0], [50, 100, 190]], np.float32)
    assert breakout_tracker(pos).tolist() == [RIGHT, LEFT, NOOP, FIRE, FIRE]
    assert breakout_tracker(pos, mirror=True).tolist() == [LEFT, RIGHT, NOOP, FIRE, FIRE]
    assert has_tracker("ALE/Breakout-v5") and not has_tracker("ALE/Pong-v5") and not has_tracker("wm/Catch-v0")


def test_paddle_saves_real_and_imagined_life_losses() -> None:
    from agent.wm_report import imagined_life_lost, paddle_saves, tracker_runs

    torch.manual_seed(0)
    cfg = preset("debug").world_model
    K = cfg.context
    runs = tracker_runs("ALE/Breakout-v5", n=24, horizon=18, K=K, seed=7)
    assert runs.starts.context.shape == (24, K, 64, 64) and runs.tracker.seen.shape == (24, 18, 64, 64)
    wm = WorldModel(cfg, num_actions=4)
    wm.set_base_rates(0.01, 0.02)
    ps = paddle_saves(wm, runs, depths=(10, 18))
    # In the real game the paddle that runs from a falling ball loses its life far more often.
    assert ps["real_lost_mirror"]["18"] >= ps["real_lost_tracker"]["18"] + 0.25
    assert ps["pairs"]["18"] > 0 and math.isfinite(ps["pair_gap"]["18"])
    for who, played in (("tracker", runs.tracker), ("mirror", runs.mirror)):
        for d in (10, 18):  # depth d reads the d-th step: life lost at step d counts, at d + 1 does not
            assert ps[f"real_lost_{who}"][str(d)] == (played.lost_at <= d).mean()
            lost = imagined_life_lost(wm, runs.starts.context, played.seen, played.actions)
            assert ps[f"imagined_lost_{who}"][str(d)] == pytest.approx(lost[:, d - 1].mean())
    # A continue head that keeps every life imagines none lost, whatever the paddle does.
    with torch.no_grad():
        wm.head_shifts[1] = 50.0
    hopeful = paddle_saves(wm, runs, depths=(10, 18))
    assert hopeful["imagined_lost_tracker"]["10"] < 1e-6 and hopeful["pair_gap"]["18"] == pytest.approx(0, abs=1e-6)
    # A continue head that ends every step imagines every life lost, the paddle's moves changing nothing.
    with torch.no_grad():
        wm.head_shifts[1] = -50.0
    doomed = paddle_saves(wm, runs, depths=(10, 18))
    assert doomed["imagined_lost_tracker"]["10"] == doomed["imagined_lost_mirror"]["10"] == 1.0
    assert doomed["pair_gap"]["18"] == 0.0
    acts, _, seen = runs.tracker
    for mode in ("one_step", "real_pairs"):
        lost = imagined_life_lost(wm, runs.starts.context, seen, acts, mode)
        assert lost.shape == (24, 18) and np.allclose(lost, 1.0)
    with pytest.raises(ValueError, match="mode must be"):
        imagined_life_lost(wm, runs.starts.context, seen, acts, "closed_loop")


def test_paddle_table_shows_each_depth() -> None:
    from agent.bench import paddle_table

    ps = {"starts": 8, "pairs": {"10": 0, "18": 3}, "pair_gap": {"10": None, "18": 0.25}}
    for who in ("tracker", "mirror"):
        ps[f"real_lost_{who}"] = {"10": 0.0, "18": 0.5}
        ps[f"imagined_lost_{who}"] = {"10": 0.1, "18": 0.2}
    table = paddle_table(ps)
    assert [c.header for c in table.columns] == ["life lost within", "10 steps", "18 steps"]
    assert list(table.columns[2].cells) == ["0.50 / 0.20", "0.50 / 0.20", "0.25 (3)"]
    assert list(table.columns[1].cells)[2] == "-"


def test_subtract_background_is_the_identity_on_breakout_and_clears_pongs_field(breakout_rollout) -> None:
    with_it = preset("cpu").world_model
    without = preset("cpu").world_model
    without.subtract_background = False
    frames = torch.from_numpy(breakout_rollout.frames)  # (S, N, 64, 64), a black field
    assert torch.equal(WorldModel(with_it, num_actions=4).to_float(frames), WorldModel(without, 4).to_float(frames))
    pong = torch.from_numpy(annotated_rollout("ALE/Pong-v5", steps=40, num_envs=2, seed=0).frames)
    plain = WorldModel(without, num_actions=6).to_float(pong)
    assert float((plain == 1.0).float().mean()) > 0.99  # gain 3 saturates the grey field and what is on it
    x = WorldModel(with_it, num_actions=6).to_float(pong)
    field = (x == 0).float().mean(dim=(-2, -1))
    assert float(field.min()) > 0.7 and float((x > 0.5).float().mean()) > 0.05  # objects stand out


@pytest.mark.parametrize("lag", [-2, -1, 0, 1, 2])
def test_a_reward_paid_late_counts_within_one_step_and_no_further(lag: int) -> None:
    from types import SimpleNamespace

    from agent.wm_report import _paid_within_one_step
    from worldmodel.world_model import Prediction

    S, N, K = 60, 2, 3
    rewards = np.zeros((S, N), np.float32)
    rewards[[10, 25, 40], 0] = 1.0
    rewards[[17, 33], 1] = 2.0
    slots, copies = torch.meshgrid(torch.arange(S), torch.arange(N), indexing="ij")
    z = torch.stack([slots, copies], -1).float()  # (S, N, 2)

    class Late(torch.nn.Module):
        """Carries the slot forward and pays the true reward of the transition ``lag`` steps before (after)."""

        cfg = SimpleNamespace(context=K)

        def __init__(self) -> None:
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def imagine_step(self, window: torch.Tensor, action: torch.Tensor) -> Prediction:
            slot, copy = window[:, -1, 0].long(), window[:, -1, 1].long()
            paid = torch.as_tensor(rewards[(slot - lag).clamp(0, S - 1).numpy(), copy.numpy()])
            nxt = torch.stack([slot + 1, copy], -1).float()[:, None]
            return Prediction(nxt, paid, torch.ones(len(slot)))

    data = SimpleNamespace(
        filled=S, is_first=np.eye(S, N, dtype=bool)[:, :1].repeat(N, 1), actions=np.zeros((S, N), np.int64)
    )
    for d in (1, 4):
        got = _paid_within_one_step(Late(), z, data, rewards, d, cap=1000, rng=np.random.default_rng(0))
        # At depth 1 the step before the reward is real: a reward paid a step early is not imagined.
        within = abs(lag) <= 1 and not (d == 1 and lag == -1)
        assert got["reward_paid_share_within_1"] == pytest.approx(1.0 if within else 0.0)
        if lag == 0:
            assert got["reward_paid_unrewarded_within_1"] == 0.0
