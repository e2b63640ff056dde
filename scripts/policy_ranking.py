"""Does imagination rank Breakout policies as the game does? (issue 22, items 3 and 5)

A policy can only learn to follow the ball in imagination if imagined rollouts of a policy that
follows it pay more (rewards, lives kept) than those of one that does not. This measures that
directly, with no policy learning in the way:

1. A *tracker* is cloned from a rule on the console RAM (FIRE while no ball is in play, else move the
   paddle under the ball): an MLP on one encoder latent ``[E]`` learns the rule's action from
   random-policy frames. It sees only the latent, so it acts the same way on real latents and on
   imagined ones. Its mirror (LEFT and RIGHT swapped) runs from the ball.
2. Start states: random-policy play, each copy's emulator state cloned every few steps with its last
   ``K`` frames.
3. From every start, each policy plays ``H`` steps twice: in the real game (the emulator state
   restored; the rollout stops at a lost life) and in imagination (the ``K`` frames encoded, the
   predictor stepped on the policy's actions, rewards weighted by the product of continue
   probabilities, as PPO sees them).

Printed per policy: the real and imagined ``H``-step return and the share of rollouts that lose a
life (imagined: one minus the product of continues), and the real score of full episodes.

    python -m scripts.policy_ranking runs/RUN --starts 512 --horizon 30 [--bayes]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from agent.checkpoint import load_latest
from agent.dyna import calibrate_on_replay, load_agent
from envs.annotations import annotated_rollout
from envs.ram_players import FIRE, LEFT, RIGHT, breakout_tracker, emulator_copy, ram_positions
from worldmodel.imagined_env import ImaginedEnv


def rule_score(env_id: str, offset: float, episodes: int, seed: int) -> float:
    """Mean return of full episodes of the RAM rule (how well a perfect tracker plays)."""
    scores = []
    for e in range(episodes):
        env = emulator_copy(env_id, seed + e)
        total, done = 0.0, False
        while not done:
            a = int(breakout_tracker(ram_positions(env, env_id), aim=offset))
            _, r, term, trunc, _ = env.step(a)
            total += r
            done = term or trunc
        scores.append(total)
        env.close()
    return float(np.mean(scores))


class Tracker(nn.Module):
    """Latent ``[B, E]`` -> action logits ``[B, 4]``, cloned from the RAM rule."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(dim), nn.Linear(dim, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 4)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--starts", type=int, default=256)
    p.add_argument("--horizon", type=int, default=15)
    p.add_argument(
        "--offset", type=float, default=None, help="ball x minus paddle x the rule aims at (default: searched)"
    )
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bayes", action="store_true", help="shift the heads by the base rates' log-odds, not fitted")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    t0 = time.time()
    loaded = load_agent(a.run, torch.device("cpu"))
    cfg, wm = loaded.cfg, loaded.wm
    env_id, K, H = cfg.env, cfg.world_model.context, a.horizon
    _, replay, _ = load_latest(a.run, with_replay=True, warn=print, quarantine_broken=False)
    wm.set_base_rates(*replay.base_rates())
    if not a.bayes:
        calibrate_on_replay(wm, replay, rng)
    print(json.dumps({"head_shifts": [round(x, 3) for x in wm.head_shifts.tolist()], "bayes": a.bayes}), flush=True)

    # 1. The rule's aim, then the tracker cloned from it.
    if a.offset is None:
        scores = {off: rule_score(env_id, off, 2, a.seed + 500) for off in (-8.0, -4.0, 0.0, 4.0, 8.0, 12.0, 16.0)}
        a.offset = max(scores, key=scores.get)
        print(
            json.dumps({"rule_offset_scores": scores, "offset": a.offset, "seconds": round(time.time() - t0)}),
            flush=True,
        )
    data = annotated_rollout(env_id, 20_000, num_envs=8, seed=a.seed + 100)
    S, N = data.actions.shape
    with torch.no_grad():
        z = torch.cat(
            [
                wm.encode(torch.from_numpy(data.frames.reshape(S * N, 1, 64, 64))[i : i + 512])[:, 0]
                for i in range(0, S * N, 512)
            ]
        )
    pos = data.positions.reshape(S * N, 3)
    labels = torch.as_tensor(breakout_tracker(pos, aim=a.offset))
    tracker = Tracker(z.shape[1])
    opt = torch.optim.Adam(tracker.parameters(), 1e-3)
    n_train = int(0.8 * len(z))
    for _ in range(3000):
        idx = torch.randint(0, n_train, (256,))
        loss = nn.functional.cross_entropy(tracker(z[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = float((tracker(z[n_train:]).argmax(-1) == labels[n_train:]).float().mean())
    print(
        json.dumps(
            {
                "tracker_heldout_acc": round(acc, 3),
                "label_shares": np.bincount(labels.numpy(), minlength=4).tolist(),
                "seconds": round(time.time() - t0),
            }
        ),
        flush=True,
    )

    def act(name: str, latent: torch.Tensor) -> np.ndarray:
        """Actions ``[B]`` of policy ``name`` from latents ``[B, E]``."""
        B = latent.shape[0]
        if name == "uniform":
            return rng.integers(0, 4, B)
        if name == "fire_or_left":
            return rng.choice([FIRE, LEFT], B)
        with torch.no_grad():
            out = tracker(latent).argmax(-1).numpy()
        if name == "mirror":
            out = np.where(out == LEFT, RIGHT, np.where(out == RIGHT, LEFT, out))
        return out

    policies = ("tracker", "mirror", "uniform", "fire_or_left")

    # 2. Start states from random play: emulator states and the last K frames.
    copies = [emulator_copy(env_id, a.seed + 200 + i) for i in range(8)]
    history: list[list[np.ndarray]] = [[] for _ in copies]
    starts: list[tuple[object, np.ndarray]] = []
    step = 0
    while len(starts) < a.starts:
        for i, env in enumerate(copies):
            obs, _, term, trunc, _ = env.step(int(rng.integers(0, 4)))
            if term or trunc:
                obs, _ = env.reset()
                history[i] = []
            history[i] = (history[i] + [obs])[-K:]
            if len(history[i]) == K and step % 7 == 3 and len(starts) < a.starts:
                starts.append((env.unwrapped.ale.cloneState(), np.stack(history[i])))
        step += 1
    frames = torch.from_numpy(np.stack([s[1] for s in starts]))  # (B, K, 64, 64)

    # 3. Each policy from every start: real, then imagined.
    real_env = copies[0]
    imagined = ImaginedEnv(wm, H)
    cuts = [h for h in (1, 4, 8, 15, 30, 45) if h <= H]
    for name in policies:
        real_r, real_alive = np.zeros((H, len(starts))), np.ones((H, len(starts)))
        for b, (state, ctx) in enumerate(starts):
            real_env.unwrapped.ale.restoreState(state)
            lives = real_env.unwrapped.ale.lives()
            with torch.no_grad():
                window = wm.encode(torch.from_numpy(ctx[None]))
            for t in range(H):
                obs, r, term, trunc, _ = real_env.step(int(act(name, window[:, -1])[0]))
                real_r[t, b] = r
                if term or real_env.unwrapped.ale.lives() < lives:
                    real_alive[t:, b] = 0
                    break
                with torch.no_grad():
                    window = torch.cat([window[:, 1:], wm.encode(torch.from_numpy(obs[None, None]))], 1)
        window = imagined.reset(frames)
        alive = torch.ones(len(starts))
        im_r, im_alive = np.zeros((H, len(starts))), np.ones((H, len(starts)))
        for t in range(H):
            window, r, c, _, _ = imagined.step(torch.as_tensor(act(name, window[:, -1])))
            im_r[t] = (alive * r).numpy()
            alive = alive * c
            im_alive[t] = alive.numpy()
        for h in cuts:
            rr, ir = real_r[:h].sum(0), im_r[:h].sum(0)
            row = {
                "policy": name,
                "depth": h,
                "real_return": round(float(rr.mean()), 4),
                "imagined_return": round(float(ir.mean()), 4),
                "real_life_lost": round(float(1 - real_alive[h - 1].mean()), 3),
                "imagined_life_lost": round(float(1 - im_alive[h - 1].mean()), 3),
                "corr_return": round(float(np.corrcoef(rr, ir)[0, 1]), 3) if rr.std() > 0 and ir.std() > 0 else None,
                "corr_alive": round(float(np.corrcoef(real_alive[h - 1], im_alive[h - 1])[0, 1]), 3)
                if real_alive[h - 1].std() > 0
                else None,
            }
            print(json.dumps({**row, "seconds": round(time.time() - t0)}), flush=True)

    # 4. Full real episodes (at most 4,000 steps each) of the tracker and the mirror.
    for name in ("tracker", "mirror"):
        scores = []
        for e in range(a.episodes):
            env = emulator_copy(env_id, a.seed + 300 + e)
            obs, total = env.reset(seed=a.seed + 300 + e)[0], 0.0
            for _ in range(4000):
                with torch.no_grad():
                    obs, r, term, trunc, _ = env.step(
                        int(act(name, wm.encode(torch.from_numpy(obs[None, None]))[:, 0])[0])
                    )
                total += r
                if term or trunc:
                    break
            scores.append(total)
        print(
            json.dumps(
                {
                    "policy": name,
                    "episode_scores": scores,
                    "mean": float(np.mean(scores)),
                    "seconds": round(time.time() - t0),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
