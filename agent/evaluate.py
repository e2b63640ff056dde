"""Evaluation by the protocol: full episodes (life loss is not an end), unclipped scores."""

from __future__ import annotations

import numpy as np
import torch

from agent.actor import RealEnvActor
from agent.policy import ActorCritic
from envs import make_env
from worldmodel.world_model import WorldModel

# Human and random scores (ANCHORS.md) for the human-normalised score.
HUMAN_RANDOM = {
    "ALE/Breakout-v5": (30.5, 1.7),
    "ALE/Pong-v5": (14.6, -20.7),
    "ALE/Boxing-v5": (12.1, 0.1),
    "ALE/Freeway-v5": (29.6, 0.0),
    "ALE/MsPacman-v5": (6951.6, 307.3),
}


def human_normalised(env_id: str, score: float) -> float | None:
    """(score - random) / (human - random), or None for games without reference scores."""
    if env_id not in HUMAN_RANDOM:
        return None
    human, rand = HUMAN_RANDOM[env_id]
    return (score - rand) / (human - rand)


def episode_shares(episodes: int, num_envs: int) -> list[int]:
    """How many of ``episodes`` each of ``num_envs`` copies plays: each copy a fixed share, so copies
    that happen to get short episodes cannot fill the total first."""
    return [episodes // num_envs + (1 if i < episodes % num_envs else 0) for i in range(num_envs)]


@torch.no_grad()
def evaluate(
    wm: WorldModel,
    policy: ActorCritic,
    env_id: str,
    episodes: int,
    seed: int,
    device: torch.device,
    num_envs: int = 8,
    sticky_actions: float = 0.0,
    greedy: bool = False,
    max_steps: int = 1_000_000,
) -> list[float]:
    """Returns of the first ``episodes`` full episodes played by ``policy`` (sampling actions unless
    ``greedy``); each env copy plays until the total is reached."""
    num_envs = min(num_envs, episodes)
    env = make_env(env_id, num_envs=num_envs, seed=seed, sticky_actions=sticky_actions)
    actor = RealEnvActor(wm, policy, num_envs, device)
    obs, info = env.reset(seed=seed)
    actor.observe(obs, info["is_first"])
    returns: list[float] = []
    started = np.ones(num_envs, dtype=int)  # episodes begun per copy; a copy stops once its share is started
    share = episode_shares(episodes, num_envs)
    active = np.ones(num_envs, dtype=bool)
    for _ in range(max_steps):
        obs, _, _, _, info = env.step(actor.act(greedy=greedy))
        actor.observe(obs, info["is_first"])
        ended = ~np.isnan(info["episode_return"]) & active
        for i in np.flatnonzero(ended):
            returns.append(float(info["episode_return"][i]))
            if started[i] >= share[i]:
                active[i] = False
            else:
                started[i] += 1
        if not active.any():
            break
    env.close()
    return returns
