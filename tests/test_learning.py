"""Learning, not just running: the Dyna loop on the ROM-free Catch (slow; ``python -m pytest -m slow``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.config import preset
from agent.dyna import DynaTrainer
from agent.evaluate import evaluate
from envs import make_env
from tests.helpers import train_quietly


def random_policy_mean(episodes: int = 400, seed: int = 5) -> float:
    env = make_env("wm/Catch-v0", num_envs=8, seed=seed)
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    returns: list[float] = []
    while len(returns) < episodes:
        _, _, _, _, info = env.step(rng.integers(0, env.num_actions, size=8))
        returns += [float(r) for r in info["episode_return"] if not np.isnan(r)]
    return float(np.mean(returns))


@pytest.mark.slow
def test_catch_policy_rises_clearly_above_random(tmp_path: Path) -> None:
    """The ``cpu`` preset for 20k env steps (roughly 15-20 minutes on 2 cores): 100 evaluation
    episodes score at least 0.5 above a random policy (which scores about -0.55)."""
    cfg = preset("cpu")
    cfg.env, cfg.steps, cfg.seed = "wm/Catch-v0", 20_000, 0
    trainer = DynaTrainer(cfg, tmp_path)
    train_quietly(trainer)
    scores = evaluate(trainer.wm_act, trainer.policy, cfg.env, 100, 10_000, trainer.device)
    random_mean = random_policy_mean()
    print(f"Catch after 20k steps: eval mean {np.mean(scores):.2f} over 100 episodes; random {random_mean:.2f}")
    assert np.mean(scores) > random_mean + 0.5
