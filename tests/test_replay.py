"""Replay buffer: alignment, episode boundaries, wrap-around, save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.replay import ReplayBuffer, ReplayError


def scripted_fill(buf: ReplayBuffer, steps: int, num_envs: int, episode_len: int) -> None:
    """Frames encode the step (mod 256) in pixel (0, 0) and the copy in pixel (0, 1); copy e ends an
    episode after episode_len + e steps (NEXT_STEP autoreset: the final frame is stored, then a first
    frame follows). Actions encode the step too, rewards are 1 exactly on terminal transitions."""
    t_in_ep = np.zeros(num_envs, dtype=int)
    is_first = np.ones(num_envs, dtype=bool)
    for step in range(steps):
        frames = np.zeros((num_envs, 64, 64), dtype=np.uint8)
        frames[:, 0, 0] = step % 256
        frames[:, 0, 1] = np.arange(num_envs)
        actions = np.full(num_envs, step % 7)
        ends = t_in_ep == episode_len + np.arange(num_envs)
        rewards = np.where(ends, 1.0, 0.0).astype(np.float32)
        buf.add(frames, actions, rewards, ends, np.zeros(num_envs, bool), np.zeros(num_envs, bool), is_first)
        is_first = t_in_ep > episode_len + np.arange(num_envs)  # the step after the final frame
        t_in_ep = np.where(is_first, 0, t_in_ep + 1)


def test_alignment_and_no_episode_crossing() -> None:
    buf = ReplayBuffer(capacity=4 * 250, num_envs=4)
    scripted_fill(buf, 250, 4, episode_len=10)
    b = buf.sample(64, 5, np.random.default_rng(0))
    assert b.frames.shape == (64, 5, 64, 64) and b.frames.dtype == torch.uint8
    assert b.actions.shape == (64, 4) and b.rewards.shape == (64, 4)
    step = b.frames[:, :, 0, 0].long()
    # consecutive frames are consecutive steps: no gap, no crossing
    assert torch.all(step[:, 1:] - step[:, :-1] == 1)
    # action t is the one taken at frame t, and its reward is the terminal's reward
    assert torch.equal(b.actions, step[:, :-1] % 7)
    assert torch.equal(b.rewards, b.terminated.float())
    # a terminal transition can only be the last one (after it comes the final frame, then a new episode)
    assert not b.terminated[:, :-1].any()
    env = b.frames[:, 0, 0, 1].long()
    for i in range(64):
        assert not buf.is_first[step[i, 1:].numpy(), env[i].item()].any()


def test_wraparound_keeps_only_recent_and_contiguous() -> None:
    buf = ReplayBuffer(capacity=2 * 50, num_envs=2)
    scripted_fill(buf, 130, 2, episode_len=1000)
    assert len(buf) == 100
    b = buf.sample(128, 8, np.random.default_rng(1))
    step = b.frames[:, :, 0, 0].long()
    assert step.min() >= 80  # only the last 50 steps remain
    assert torch.all(step[:, 1:] - step[:, :-1] == 1)


def test_rewarded_fraction_oversamples_rewards() -> None:
    buf = ReplayBuffer(capacity=4 * 400, num_envs=4)
    scripted_fill(buf, 400, 4, episode_len=20)
    rng = np.random.default_rng(0)
    plain = buf.sample(256, 4, rng)
    boosted = buf.sample(256, 4, rng, rewarded_fraction=0.5)
    has = lambda b: (b.rewards >= 1.0).any(dim=1).float().mean().item()  # noqa: E731
    assert has(boosted) >= 0.5 > has(plain)


def test_ended_fraction_oversamples_life_losses_apart_from_rewards() -> None:
    buf = ReplayBuffer(capacity=4 * 400, num_envs=4)
    scripted_fill(buf, 400, 4, episode_len=20)
    buf.life_loss[buf.filled // 2 :: 9] = True  # life losses on steps that pay nothing
    buf.rewards[buf.life_loss] = 0.0
    rng = np.random.default_rng(0)
    b = buf.sample(200, 2, rng, rewarded_fraction=0.5, ended_fraction=0.5)
    rewarded = (b.rewards != 0).any(dim=1)
    ended = (b.continues < 0.5).any(dim=1)
    assert rewarded.float().mean() >= 0.5 and ended.float().mean() >= 0.5
    with pytest.raises(ReplayError, match="must not exceed 1"):
        buf.sample(8, 2, rng, rewarded_fraction=0.6, ended_fraction=0.6)
    # Without ended_fraction the draws are those of before the option existed.
    a1 = buf.sample(32, 4, np.random.default_rng(3), rewarded_fraction=0.5)
    a2 = buf.sample(32, 4, np.random.default_rng(3), rewarded_fraction=0.5, ended_fraction=0.0)
    assert torch.equal(a1.frames, a2.frames)


def test_event_span_counts_only_rewards_among_the_last_transitions() -> None:
    """The heads' batch of a window-W head trains on its last W transitions: a reward earlier in the
    sequence must not count as an oversampled reward."""
    buf = ReplayBuffer(capacity=4 * 400, num_envs=4)
    scripted_fill(buf, 400, 4, episode_len=20)
    buf.rewards[:] = 0.0
    buf.rewards[::7] = 1.0  # rewards inside episodes, not only on their last transitions
    rng = np.random.default_rng(0)
    b = buf.sample(128, 6, rng, rewarded_fraction=1.0, event_span=3)
    assert torch.all((b.rewards[:, -3:] != 0).any(dim=1))
    anywhere = buf.sample(128, 6, rng, rewarded_fraction=1.0)
    assert (anywhere.rewards[:, :2] != 0).any(dim=1).float().mean() > 0.2  # without it, earlier ones count


def test_sample_ending_with_draws_windows_whose_last_transition_is_the_event() -> None:
    buf = ReplayBuffer(capacity=3 * 60, num_envs=3)
    scripted_fill(buf, 130, 3, episode_len=9)  # wrapped: only the last 60 steps remain
    rng = np.random.default_rng(0)
    b = buf.sample_ending_with("rewarded", 64, 4, rng)
    assert b.frames.shape == (64, 4, 64, 64)
    assert torch.all(b.rewards[:, -1] == 1.0) and not torch.any(b.rewards[:, :-1])
    step = b.frames[:, :, 0, 0].long()
    assert torch.all((step[:, 1:] - step[:, :-1]) % 256 == 1)  # contiguous, inside one episode
    ends = buf.sample_ending_with("ended", 16, 2, rng)
    assert torch.all(ends.terminated[:, -1])
    buf.life_loss[:] = False
    buf.terminated[:] = False
    assert buf.sample_ending_with("ended", 4, 2, rng) is None


def test_returns_discount_rewards_to_the_end_of_each_life() -> None:
    """Rewards sit on terminal transitions: the return k steps before one is gamma^k; an episode's final
    frame (its action ignored by the env) returns 0, not the next episode's return; a life lost on an
    unrewarded step cuts the sum; steps whose life has not ended yet are incomplete. Also after wrap-around."""
    gamma = 0.9
    for steps in (40, 132, 130):  # 132: the newest slot is a final frame, its next episode not begun
        buf = ReplayBuffer(capacity=2 * 60, num_envs=2)
        scripted_fill(buf, steps, 2, episode_len=9)  # copy 0 ends every 11 steps, copy 1 every 12
        G, complete = buf.returns(gamma)
        for slot in range(buf.filled):
            for e in range(2):
                ahead = [(slot - buf._oldest()) % buf.slots + k for k in range(buf.filled)]
                later = [(buf._oldest() + t) % buf.slots for t in ahead if t < buf.filled]
                firsts = [i for i, s in enumerate(later) if i > 0 and buf.is_first[s, e]]
                later = later[: firsts[0]] if firsts else later  # this episode's slots from `slot` on
                ends = [i for i, s in enumerate(later) if buf.terminated[s, e]]
                if ends:
                    assert complete[slot, e] and G[slot, e] == pytest.approx(gamma ** ends[0])
                elif firsts:
                    assert complete[slot, e] and G[slot, e] == 0.0  # the final frame
                else:
                    assert not complete[slot, e]
    buf.life_loss[buf.pos - 3, 0] = True  # a life lost two steps before the newest step
    G, complete = buf.returns(gamma)
    assert complete[buf.pos - 3, 0] and G[buf.pos - 3, 0] == 0.0 and not complete[buf.pos - 2, 0]


def test_sample_with_returns_pairs_each_window_with_its_last_frames_return() -> None:
    buf = ReplayBuffer(capacity=3 * 80, num_envs=3)
    scripted_fill(buf, 80, 3, episode_len=12)
    returns = buf.returns(0.9)
    frames, actions, G = buf.sample_with_returns(64, 3, returns, np.random.default_rng(0))
    assert frames.shape == (64, 3, 64, 64) and G.shape == (64,)
    step, env = frames[:, -1, 0, 0].long().numpy(), frames[:, -1, 0, 1].long().numpy()
    np.testing.assert_allclose(G.numpy(), returns[0][step, env])  # no wrap: slot == step
    np.testing.assert_array_equal(actions.numpy(), step % 7)  # the action taken at the last frame
    assert returns[1][step, env].all()
    assert ReplayBuffer(capacity=40, num_envs=2).sample_with_returns(4, 3, returns, np.random.default_rng(0)) is None


def test_save_load_round_trip(tmp_path) -> None:
    buf = ReplayBuffer(capacity=3 * 40, num_envs=3)
    scripted_fill(buf, 70, 3, episode_len=7)
    buf.save(tmp_path / "replay")
    loaded = ReplayBuffer.load(tmp_path / "replay")
    assert len(loaded) == len(buf)
    a = buf.sample(32, 4, np.random.default_rng(5))
    b = loaded.sample(32, 4, np.random.default_rng(5))
    for name in ("frames", "actions", "rewards", "terminated", "life_loss", "truncated"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_errors_are_clear() -> None:
    buf = ReplayBuffer(capacity=100, num_envs=2)
    scripted_fill(buf, 10, 2, episode_len=3)
    with pytest.raises(ReplayError, match="fewer than a sequence"):
        buf.sample(4, 20, np.random.default_rng(0))
    with pytest.raises(ReplayError, match="single episodes"):
        buf.sample(4, 8, np.random.default_rng(0))


def test_memory_of_100k_frames() -> None:
    buf = ReplayBuffer(capacity=100_000, num_envs=8)
    total = sum(
        getattr(buf, n).nbytes
        for n in ("frames", "actions", "rewards", "terminated", "truncated", "life_loss", "is_first")
    )
    assert total < 450e6
