"""The Dyna loop in process: determinism on CPU, checkpoint round trip."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from agent.config import preset
from agent.dyna import DynaTrainer, calibrate_on_replay, load_agent, stratum_weights
from agent.policy import ActorCritic
from agent.ppo import PPO
from agent.replay import random_replay
from tests.helpers import train_quietly
from worldmodel.twohot import symlog
from worldmodel.world_model import WorldModel


def short_run(run_dir: Path, seed: int) -> tuple[DynaTrainer, list[dict]]:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.seed, cfg.threads = "wm/Catch-v0", 200, seed, 1
    run_dir.mkdir(parents=True)
    trainer = DynaTrainer(cfg, run_dir)
    train_quietly(trainer)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer, rows


def test_same_seed_same_losses(tmp_path: Path) -> None:
    _, a = short_run(tmp_path / "a", seed=3)
    _, b = short_run(tmp_path / "b", seed=3)
    _, c = short_run(tmp_path / "c", seed=4)
    key = "world_model/loss"
    la, lb, lc = ([r[key] for r in rows if key in r] for rows in (a, b, c))
    assert la and la == lb
    assert la != lc


def test_checkpoint_round_trip_restores_outputs(tmp_path: Path) -> None:
    trainer, _ = short_run(tmp_path / "run", seed=0)
    loaded = load_agent(tmp_path / "run", torch.device("cpu"))
    frames = torch.randint(0, 256, (3, trainer.cfg.world_model.context, 64, 64), dtype=torch.uint8)
    trainer.wm.eval()
    with torch.no_grad():
        z1, z2 = trainer.wm.encode(frames), loaded.wm.encode(frames)
        torch.testing.assert_close(z1, z2, rtol=0, atol=0)
        torch.testing.assert_close(trainer.policy(z1)[0], loaded.policy(z2)[0], rtol=0, atol=0)
        a = torch.zeros(3, dtype=torch.long)
        torch.testing.assert_close(trainer.wm.imagine_step(z1, a).latent, loaded.wm.imagine_step(z2, a).latent)
    assert loaded.env_steps == 200


def test_imagination_never_starts_at_a_sequences_last_frame(tmp_path: Path) -> None:
    # A rewarded sequence ends at the frame where its episode ended; imagining past it paid phantom rewards.
    cfg = preset("debug")
    cfg.env, cfg.threads = "wm/Catch-v0", 1
    trainer = DynaTrainer(cfg, tmp_path)
    K, L, B, E = cfg.world_model.context, cfg.world_model.seq_len, 64, cfg.world_model.encoder.embed_dim
    time_index = torch.arange(L, dtype=torch.float32)[None, :, None].expand(B, L, E)
    trainer.remember_starts(time_index.clone())
    starts = trainer.starts
    assert starts is not None and starts.shape == (cfg.ppo.num_starts, K, E)
    last = starts[:, -1, 0]
    assert last.max() == L - 2 and last.min() == K - 1
    trainer.starts = None
    trainer.replay = random_replay(cfg.env, 200, cfg.num_envs, seed=0)
    frames = trainer.imagination_starts()  # before any batch: real frames from replay, K of them
    assert frames.dtype == torch.uint8 and frames.shape[1] == K


def test_head_batch_takes_head_rewarded_fraction_of_rewarded_transitions(tmp_path: Path) -> None:
    seen: dict[float, list[float]] = {}
    for fraction in (1.0, 0.5):
        cfg = preset("debug")
        cfg.env, cfg.steps, cfg.threads, cfg.head_rewarded_fraction = "wm/Catch-v0", 200, 1, fraction
        run_dir = tmp_path / str(fraction)
        run_dir.mkdir()
        trainer = DynaTrainer(cfg, run_dir)
        update, shares = trainer.wm_trainer.update, seen.setdefault(fraction, [])

        def spy(batch, head_batch=None, dynamics_batch=None, update=update, shares=shares):
            shares.append(float((head_batch.rewards != 0).float().mean()))
            return update(batch, head_batch, dynamics_batch)

        trainer.wm_trainer.update = spy
        train_quietly(trainer)
    assert seen[1.0] and min(seen[1.0]) == 1.0
    assert seen[0.5] and max(seen[0.5]) == 0.5


def test_stratum_weights_average_like_the_replay() -> None:
    """Uniform windows that miss the event share 1 - rate, the event's own stratum shares rate, and
    uniform windows that caught the event count for nothing; with no event windows the misses share all."""
    hit = torch.tensor([False, True, False, False])
    w = stratum_weights(hit, 2, 0.1)
    torch.testing.assert_close(w, torch.tensor([0.3, 0.0, 0.3, 0.3, 0.05, 0.05]))
    torch.testing.assert_close(stratum_weights(hit, 0, 0.1), torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))
    # The weighted mean of a per-window quantity is the stratified estimate of its replay mean.
    values = torch.tensor([0.0, 5.0, 1.0, 2.0, 10.0, 20.0])
    assert float((w * values).sum()) == pytest.approx(0.9 * 1.0 + 0.1 * 15.0)


def test_stratified_fit_without_rewards_is_the_uniform_fit() -> None:
    """A replay with no reward has no reward stratum: the reward shift is fitted on the uniform windows
    alone, as without stratification (the same draw comes first), while the ends still get theirs."""
    cfg = preset("debug")
    torch.manual_seed(0)
    replay = random_replay("wm/Catch-v0", 800, cfg.num_envs, seed=0)
    replay.rewards[:] = 0.0
    wm = WorldModel(cfg.world_model, num_actions=3)
    plain = calibrate_on_replay(wm, replay, np.random.default_rng(0), stratified=False)
    strat = calibrate_on_replay(wm, replay, np.random.default_rng(0))
    assert float(strat["reward_shift"]) == pytest.approx(float(plain["reward_shift"]), abs=1e-4)
    assert torch.isfinite(strat["cont_shift"])


def test_self_imitation_raises_the_actions_whose_real_return_beat_the_critic() -> None:
    """``ppo.self_imitation``: on real windows, the action whose return beat the critic's value becomes
    more likely; without it the actor's weights do not move (the critic's step alone)."""
    torch.manual_seed(0)
    cfg = preset("debug")
    policy = ActorCritic(cfg.policy, embed_dim=8, num_actions=3)
    nn.init.constant_(policy.critic[-1].bias, float(symlog(torch.tensor(3.0))))  # every value 3, in symlog space
    windows = torch.randn(2, cfg.policy.history, 8)
    actions, returns = torch.tensor([1, 2]), torch.tensor([5.0, -5.0])
    for weight in (0.0, 1.0):
        ppo = PPO(copy.deepcopy(policy), dataclasses.replace(cfg.ppo, critic_targets="real", self_imitation=weight))
        before = torch.softmax(ppo.policy(windows)[0], -1)
        actor = [p.detach().clone() for p in ppo.policy.actor.parameters()]
        metrics = ppo.real_update(windows, actions, returns)
        after = torch.softmax(ppo.policy(windows)[0], -1)
        if weight == 0:
            assert all(torch.equal(b, p) for b, p in zip(actor, ppo.policy.actor.parameters(), strict=True))
            assert "policy/self_imitation_advantage" not in metrics
        else:
            assert after[0, 1] > before[0, 1] + 1e-3  # return 5 beat the value: action 1 more likely
            # max(5 - 3, 0) and max(-5 - 3, 0), averaged: the value read back in the returns' scale
            assert float(metrics["policy/self_imitation_advantage"]) == pytest.approx(1.0, abs=1e-4)


def test_critic_learns_from_real_returns_when_asked(tmp_path: Path) -> None:
    """With ``ppo.critic_targets real`` the critic's steps on real windows move its values toward their
    real returns and leave the actor alone; PPO's own update then leaves the critic alone."""
    cfg = preset("debug")
    cfg.env, cfg.threads, cfg.ppo.critic_targets = "wm/Catch-v0", 1, "real"
    trainer = DynaTrainer(cfg, tmp_path / "real")
    trainer.replay = random_replay(cfg.env, 800, cfg.num_envs, seed=0)
    returns = trainer.replay.returns(cfg.ppo.gamma)
    actor = [p.detach().clone() for p in trainer.policy.actor.parameters()]
    losses = [float(trainer.real_update(returns)["policy/real_value_loss"]) for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])  # 0.54 measured; ~1 if nothing learned
    for before, p in zip(actor, trainer.policy.actor.parameters(), strict=True):
        assert torch.equal(before, p)
    critic = [p.detach().clone() for p in trainer.policy.critic.parameters()]
    trainer.ppo.update(trainer.ppo.rollout(trainer.imagined, trainer.imagination_starts()))
    for before, p in zip(critic, trainer.policy.critic.parameters(), strict=True):
        assert torch.equal(before, p)


def test_policy_phase_fits_the_heads_shifts_or_keeps_bayes(tmp_path: Path) -> None:
    """Before imagining, the loop fits the acting model's shifts to the replay's rates (logged), and
    copies them to the trained model; with ``fit_head_shifts`` off both take the rates' log-odds."""
    cfg = preset("debug")
    cfg.env, cfg.threads = "wm/Catch-v0", 1
    trainer = DynaTrainer(cfg, tmp_path / "fit")
    trainer.replay = random_replay(cfg.env, 400, cfg.num_envs, seed=0)
    rewarded, ended = trainer.replay.base_rates()
    metrics = trainer.calibrate_heads()
    bayes = torch.log(torch.tensor([(1 - rewarded) / rewarded, (1 - ended) / ended]))
    fitted = torch.stack([metrics["imagination/reward_shift"], metrics["imagination/cont_shift"]])
    assert not torch.allclose(fitted, bayes, atol=1e-2)
    torch.testing.assert_close(trainer.wm.head_shifts, trainer.wm_act.head_shifts)
    cfg.fit_head_shifts = False
    plain = DynaTrainer(cfg, tmp_path / "bayes")
    plain.replay = trainer.replay
    assert plain.calibrate_heads() == {}
    for model in (plain.wm, plain.wm_act):
        torch.testing.assert_close(model.head_shifts, bayes)
