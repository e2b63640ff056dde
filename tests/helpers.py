"""Shared test helpers: fill a replay buffer from a real env with random actions; run a Dyna loop quietly."""

from __future__ import annotations

import numpy as np
from rich.console import Console

from agent.dyna import DynaTrainer
from agent.logger import RunLogger
from agent.replay import ReplayBuffer
from envs import make_env


def random_replay(env_id: str, steps: int, num_envs: int = 4, seed: int = 0) -> ReplayBuffer:
    env = make_env(env_id, num_envs=num_envs, seed=seed)
    rng = np.random.default_rng(seed)
    buf = ReplayBuffer(steps * num_envs, num_envs)
    obs, info = env.reset(seed=seed)
    is_first = info["is_first"]
    for _ in range(steps):
        a = rng.integers(0, env.num_actions, size=num_envs)
        nxt, r, term, trunc, info = env.step(a)
        buf.add(obs, a, r, term, trunc, info["life_loss"], is_first)
        obs, is_first = nxt, info["is_first"]
    env.close()
    return buf


def train_quietly(trainer: DynaTrainer) -> dict[str, float]:
    """``trainer.train`` with a silent logger (metrics.jsonl only) in the trainer's run directory."""
    logger = RunLogger(trainer.run_dir, trainer.cfg.steps, console=Console(quiet=True), tensorboard=False)
    try:
        return trainer.train(logger)
    finally:
        logger.close()
