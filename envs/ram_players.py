"""Scripted Breakout players that read the console RAM, on emulator copies whose state can be saved
and restored: the ground truth a world model's imagination is checked against (does a paddle that
meets the ball keep its life where one that runs away loses it?).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from envs.annotations import RAM_POSITIONS, ball_in_play
from envs.atari import _AtariPreprocessing, ale_game

NOOP, FIRE, RIGHT, LEFT = 0, 1, 2, 3
"""Breakout's minimal action set."""

TRACKER_AIM = 8.0
"""Ball x minus paddle x (RAM units) the tracker steers to: the RAM paddle x is its left edge, and of
aims -8 to 16 this one scored best over full episodes (``scripts/policy_ranking.py``)."""


def has_tracker(env_id: str) -> bool:
    """Whether ``env_id`` is a game with a scripted player here (Breakout)."""
    return env_id.startswith("ALE/") and ale_game(env_id) == "breakout"


def emulator_copy(env_id: str, seed: int) -> gym.Env:
    """One ALE game with the training envs' preprocessing (64x64 grayscale, frame skip 4, no-op starts,
    no sticky actions), reset with ``seed``; ``env.unwrapped.ale`` clones and restores its state."""
    env = gym.make(env_id, frameskip=1, obs_type="grayscale", repeat_action_probability=0.0, full_action_space=False)
    env = _AtariPreprocessing(env, noop_max=30)
    env.reset(seed=seed)
    return env


def ram_positions(env: gym.Env, env_id: str) -> np.ndarray:
    """``[3]``: the positions of :data:`envs.annotations.POSITION_NAMES` in ``env``'s RAM now."""
    return env.unwrapped.ale.getRAM()[list(RAM_POSITIONS[ale_game(env_id)])].astype(np.float32)


def breakout_tracker(
    positions: np.ndarray, mirror: bool = False, aim: float = TRACKER_AIM, dead_zone: float = 3.0
) -> np.ndarray:
    """Actions ``[...]`` from Breakout positions ``[..., 3]``: FIRE while no ball is in play, else move
    the paddle so that ball x - paddle x is ``aim`` (NOOP within ``dead_zone``). ``mirror`` swaps LEFT
    and RIGHT: the same player running away from the ball."""
    gap = positions[..., 1] - (positions[..., 0] + aim)
    toward, away = (LEFT, RIGHT) if mirror else (RIGHT, LEFT)
    act = np.where(gap > dead_zone, toward, np.where(gap < -dead_zone, away, NOOP))
    return np.where(ball_in_play(positions, "breakout"), act, FIRE)
