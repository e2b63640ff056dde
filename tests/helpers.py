"""Shared test helpers: fill a replay buffer from a real env with random actions; run a Dyna loop quietly."""

from __future__ import annotations

from rich.console import Console

from agent import replay
from agent.dyna import DynaTrainer
from agent.logger import RunLogger
from agent.replay import ReplayBuffer


def random_replay(env_id: str, steps: int, num_envs: int = 4, seed: int = 0) -> ReplayBuffer:
    """``steps`` random-action steps of each of ``num_envs`` copies."""
    return replay.random_replay(env_id, steps * num_envs, num_envs, seed)


def train_quietly(trainer: DynaTrainer) -> dict[str, float]:
    """``trainer.train`` with a silent logger (metrics.jsonl only) in the trainer's run directory."""
    logger = RunLogger(trainer.run_dir, trainer.cfg.steps, console=Console(quiet=True), tensorboard=False)
    try:
        return trainer.train(logger)
    finally:
        logger.close()
