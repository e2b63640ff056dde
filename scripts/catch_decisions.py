"""Where does a trained Catch agent go wrong: its reward head, its imagination or its policy? (issue 4)

Three readings of one checkpoint (``--threads`` torch threads, CPU):

1. **play**: ``--episodes`` real episodes with the policy (sampled actions). The landing offset is
   ball x - paddle x (a catch iff -4 < offset < 12); reported: the misses' offsets, and the reward
   head's judgement of every real landing (encoded frames, as in training) by offset bucket.
2. **decisions**: states 1, 2 and 3 steps before a landing, the paddle steered near the edges of the
   catch window (``--states`` of them, seeded). For every action sequence up to the landing: the true
   outcome, and the imagined one (the predictor run from the real latent window, the calibrated
   reward head on its last step). Where the first action decides whether the ball can still be
   caught: how often imagination's best first action catches, how often the policy's greedy action
   does, and the policy's probability of a catching action.
3. **ceiling** (``--ceiling``, needs the run's replay): a copy of the reward head fine-tuned on landings
   from the run's own replay, then read on edge-focused landings. If it reads them where the trained
   head did not, the latents hold the offset and the head's training is what falls short.

    python -m scripts.catch_decisions runs/RUN --ceiling
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from pathlib import Path

import numpy as np
import torch

from agent.actor import RealEnvActor
from agent.checkpoint import load_latest
from agent.dyna import LoadedAgent, load_agent
from envs import make_env
from envs.catch import BALL_VALUE, EPISODE_STEPS, PADDLE_H, PADDLE_VALUE, CatchState
from worldmodel.twohot import twohot, twohot_decode
from worldmodel.world_model import WorldModel

BUCKETS = [(-60, -8), (-8, -4), (-4, 0), (0, 8), (8, 12), (12, 16), (16, 60)]
"""Landing offsets: caught inside [-3, 11]; the buckets next to those edges are where a head can err."""


def by_bucket(ok: np.ndarray, offset: np.ndarray) -> str:
    cells = []
    for lo, hi in BUCKETS:
        m = (offset >= lo) & (offset < hi)
        cells.append(f"[{lo},{hi}) {ok[m].mean():.2f} (n={m.sum()})" if m.any() else f"[{lo},{hi}) -")
    return " | ".join(cells)


@torch.no_grad()
def judge(wm: WorldModel, before: torch.Tensor, landing: torch.Tensor) -> np.ndarray:
    """The calibrated reward head's reading of real transitions: uint8 frames ``[N, H, W]`` each."""
    z_t, z_next = wm.encode(before[:, None])[:, 0], wm.encode(landing[:, None])[:, 0]
    logits, _ = wm.calibrated_heads(z_t, z_next)
    return twohot_decode(logits, wm.reward_bins).numpy()


@torch.no_grad()
def play(agent: LoadedAgent, episodes: int, seed: int) -> None:
    n = 16
    env = make_env("wm/Catch-v0", num_envs=n, seed=seed)
    actor = RealEnvActor(agent.wm, agent.policy, n, torch.device("cpu"))
    obs, info = env.reset(seed=seed)
    actor.observe(obs, info["is_first"])
    offsets, rewards, judged = [], [], []
    while len(rewards) < episodes:
        before = torch.from_numpy(obs.copy())
        obs, rew, term, _, info = env.step(actor.act())
        if term.any():
            # A landed game is respawned on the next step, so its state still shows the landing.
            offsets += list(env.state.ball_x[term] - env.state.paddle_x[term])
            rewards += list(rew[term])
            judged += list(judge(agent.wm, before[term], torch.from_numpy(obs[term])))
        actor.observe(obs, info["is_first"])
    off, rew, hat = np.array(offsets), np.array(rewards), np.array(judged)
    values, counts = np.unique(off[rew < 0], return_counts=True)
    print(f"play: {len(rew)} episodes, mean return {rew.mean():+.3f}")
    print("  miss offsets: " + ", ".join(f"{v}: {c}" for v, c in zip(values, counts, strict=True)))
    print("  reward head right on real landings: " + by_bucket(np.sign(hat) == rew, off))


def steered_states(n: int, rng: np.random.Generator, steps: int, spread: tuple[int, int]) -> tuple[CatchState, list]:
    """``n`` games played ``steps`` steps by a paddle steered (30% random moves) to land at a random
    offset in ``spread`` from the ball; returns the state and the frames seen so far."""
    state = CatchState.empty(n)
    for i in range(n):
        state.spawn(i, rng)
    target = state.landing_x() - rng.integers(*spread, size=n)
    frames = [state.render()]
    for _ in range(steps):
        a = np.where(state.paddle_x < target - 2, 2, np.where(state.paddle_x > target + 2, 0, 1))
        state.advance(np.where(rng.random(n) < 0.3, rng.integers(0, 3, n), a))
        frames.append(state.render())
    return state, frames


def outcome(state: CatchState, actions: tuple[int, ...]) -> np.ndarray:
    s = CatchState(*(x.copy() for x in (state.ball_x, state.ball_y, state.ball_vx, state.paddle_x)))
    for a in actions:
        reward, _ = s.advance(np.full(len(s.ball_x), a))
    return reward


@torch.no_grad()
def decisions(agent: LoadedAgent, n: int, seed: int) -> None:
    wm, policy, K = agent.wm, agent.policy, agent.wm.cfg.context
    for d in (3, 2, 1):
        state, frames = steered_states(n, np.random.default_rng(seed), EPISODE_STEPS - d, (-12, 20))
        window = wm.encode(torch.from_numpy(np.stack(frames[-K:], 1)))  # (n, K, E)
        logits, _ = policy(window)
        greedy, probs = logits.argmax(-1).numpy(), logits.softmax(-1).numpy()
        seqs = list(itertools.product(range(3), repeat=d))
        truth = np.stack([outcome(state, s) for s in seqs], 1)  # (n, 3^d)
        imagined = np.zeros_like(truth)
        for k, seq in enumerate(seqs):
            w = window
            for a in seq:
                pred = wm.imagine_step(w, torch.full((n,), a))
                w = torch.cat([w[:, 1:], pred.latent], 1)
            imagined[:, k] = pred.reward.numpy()
        first = np.array([s[0] for s in seqs])
        best_true = np.stack([truth[:, first == a].max(1) for a in range(3)], 1) > 0  # (n, 3) can still catch
        best_imag = np.stack([imagined[:, first == a].max(1) for a in range(3)], 1)
        matters = best_true.any(1) & ~best_true.all(1)
        rows, sign_ok = np.arange(n), (np.sign(imagined) == truth).mean()
        print(
            f"decisions {d} step(s) before landing: imagined outcome's sign right {sign_ok:.3f}; "
            f"where the first action matters ({matters.sum()} of {n}): imagination's best first action catches "
            f"{best_true[rows, best_imag.argmax(1)][matters].mean():.3f}, the policy's greedy action "
            f"{best_true[rows, greedy][matters].mean():.3f}, its probability of a catching action "
            f"{(probs * best_true).sum(1)[matters].mean():.3f}"
        )


def landing_offsets(frames: torch.Tensor) -> np.ndarray:
    """Ball x - paddle x read off landing frames ``[N, H, W]`` (99 where either is not visible)."""
    out = []
    for f in frames.numpy():
        ball, paddle = np.flatnonzero((f == BALL_VALUE).any(0)), np.flatnonzero((f[-PADDLE_H:] == PADDLE_VALUE).any(0))
        out.append(ball.min() - paddle.min() if len(ball) and len(paddle) else 99)
    return np.array(out)


def ceiling(agent: LoadedAgent, run: Path, n: int, seed: int, steps: int) -> None:
    _, replay, _ = load_latest(run, with_replay=True, warn=lambda _: None, quarantine_broken=False)
    assert replay is not None
    rng = np.random.default_rng(seed)
    state, frames = steered_states(n, rng, EPISODE_STEPS - 1, (-20, 28))
    before = torch.from_numpy(frames[-1])
    reward, _ = state.advance(np.ones(n, dtype=np.int64))
    landing, off = torch.from_numpy(state.render()), state.ball_x - state.paddle_x
    print(
        f"ceiling: trained head on {n} steered landings: "
        + by_bucket(np.sign(judge(agent.wm, before, landing)) == reward, off)
    )
    batch = replay.sample(4000, 2, rng, "cpu", rewarded_fraction=1.0)
    replay_off = landing_offsets(batch.frames[:, 1])
    print(
        "  replay landings per bucket: "
        + ", ".join(str(((replay_off >= lo) & (replay_off < hi)).sum()) for lo, hi in BUCKETS)
    )
    wm = copy.deepcopy(agent.wm)
    with torch.no_grad():
        z = wm.encode(batch.frames)
    optimizer = torch.optim.AdamW(wm.reward_head.parameters(), 1e-3)
    for _ in range(steps):
        j = torch.randint(len(z), (64,))
        logits, _ = wm.heads(z[j, 0], z[j, 1])
        loss = -(twohot(batch.rewards[j, 0], wm.reward_bins) * logits.log_softmax(-1)).sum(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    hat = judge(wm, before, landing)
    print(f"  the head fine-tuned {steps} steps x 64 replay landings: " + by_bucket(np.sign(hat) == reward, off))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a Catch run directory or checkpoint")
    p.add_argument("--episodes", type=int, default=400)
    p.add_argument("--states", type=int, default=3000)
    p.add_argument("--seed", type=int, default=4242)
    p.add_argument("--ceiling", action="store_true", help="also fine-tune a copy of the reward head on replay landings")
    p.add_argument("--ceiling-steps", type=int, default=2000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    agent = load_agent(args.run, torch.device("cpu"), warn=lambda _: None)
    if agent.cfg.env != "wm/Catch-v0":
        sys.exit(f"{args.run}: a run of {agent.cfg.env}; this diagnostic reads Catch's positions")
    print(f"{agent.checkpoint} ({agent.env_steps} env steps)")
    play(agent, args.episodes, args.seed)
    decisions(agent, args.states, args.seed)
    if args.ceiling:
        ceiling(agent, args.run, 6000, args.seed, args.ceiling_steps)


if __name__ == "__main__":
    main()
