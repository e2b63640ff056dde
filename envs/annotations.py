"""Where the objects are: random-policy rollouts labelled with positions read from the console RAM.

The RAM addresses are AtariARI's published annotations (Anand et al., 2019, "Unsupervised State
Representation Learning in Atari"). A world model's latent is probed against them: does it know where
the paddle and the ball are, and does its predictor carry them forward?
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from envs.atari import AtariGymEnv, ale_game
from envs.base import EnvSettings

POSITION_NAMES = ("paddle_x", "ball_x", "ball_y")
"""The labelled positions, in column order (Pong's paddle moves vertically; its column is still
called ``paddle_x``: the paddle's one coordinate)."""

RAM_POSITIONS: dict[str, tuple[int, int, int]] = {
    "breakout": (72, 99, 101),  # player_x, ball_x, ball_y
    "pong": (51, 49, 54),  # player_y, ball_x, ball_y
}
"""RAM addresses of :data:`POSITION_NAMES` per ROM (AtariARI). The ball is in play where both of its
coordinates are non-zero and it is drawn (see :data:`BALL_HIDDEN_FROM`)."""

BALL_HIDDEN_FROM: dict[str, tuple[int, float]] = {"breakout": (2, 188)}
"""Per ROM, a column of :data:`POSITION_NAMES` and the RAM value from which the ball is no longer drawn
although the RAM still holds its coordinates. Breakout's ball at RAM y >= 188 has passed the paddle:
the screen shows no ball until the life is lost 1-5 steps later (``docs/breakout_world_model.md``), and
no single frame tells where it is. These steps were ~12% of the in-play labels of a random policy and
85% of a ball-x probe's squared error on them."""


@dataclass
class AnnotatedRollout:
    """``S`` lockstep steps of ``N`` env copies under uniformly random actions, laid out as the replay
    buffer lays them out: ``frames[s, n]`` is what copy ``n`` saw at step ``s``, ``actions[s, n]`` what it
    did there, and ``rewards`` / ``terminated`` / ``life_loss`` what that action led to; ``is_first``
    marks a frame that starts an episode. ``positions[s, n]`` are :data:`POSITION_NAMES` read from the
    RAM with ``frames[s, n]`` on screen, ``ball_in_play[s, n]`` whether the ball is on the field."""

    frames: np.ndarray  # uint8 (S, N, 64, 64)
    actions: np.ndarray  # int64 (S, N)
    rewards: np.ndarray  # float32 (S, N)
    terminated: np.ndarray  # bool (S, N)
    life_loss: np.ndarray  # bool (S, N)
    is_first: np.ndarray  # bool (S, N)
    positions: np.ndarray  # float32 (S, N, 3)
    ball_in_play: np.ndarray  # bool (S, N)


def has_annotations(env_id: str) -> bool:
    """Whether ``env_id`` is an ALE game with RAM positions in :data:`RAM_POSITIONS`."""
    return env_id.startswith("ALE/") and ale_game(env_id) in RAM_POSITIONS


def annotated_rollout(env_id: str, steps: int, num_envs: int = 8, seed: int = 0) -> AnnotatedRollout:
    """``steps`` env steps in all (``steps // num_envs`` per copy) of random play with RAM positions.

    Uses the gymnasium backend (the ALE vector env does not expose each copy's RAM), whose frames
    follow the same preprocessing as the default backend's.

    Raises:
        ValueError: ``env_id`` has no RAM annotations (see :func:`has_annotations`).
    """
    if not has_annotations(env_id):
        known = ", ".join(sorted(RAM_POSITIONS))
        raise ValueError(f"{env_id} has no RAM position annotations (annotated games: {known})")
    addresses = list(RAM_POSITIONS[ale_game(env_id)])
    env = AtariGymEnv(EnvSettings(env_id=env_id, num_envs=num_envs, seed=seed))
    rng = np.random.default_rng(seed)
    S = steps // num_envs
    frames = np.zeros((S, num_envs, 64, 64), np.uint8)
    actions = rng.integers(0, env.num_actions, size=(S, num_envs))
    rewards = np.zeros((S, num_envs), np.float32)
    terminated = np.zeros((S, num_envs), bool)
    life_loss = np.zeros((S, num_envs), bool)
    is_first = np.zeros((S, num_envs), bool)
    positions = np.zeros((S, num_envs, 3), np.float32)
    obs, info = env.reset(seed=seed)
    first = info["is_first"]
    for s in range(S):
        frames[s], is_first[s] = obs, first
        positions[s] = env.ram()[:, addresses]
        obs, rewards[s], terminated[s], _, info = env.step(actions[s])
        life_loss[s], first = info["life_loss"], info["is_first"]
    env.close()
    in_play = ball_in_play(positions, ale_game(env_id))
    return AnnotatedRollout(frames, actions, rewards, terminated, life_loss, is_first, positions, in_play)


def ball_in_play(positions: np.ndarray, game: str) -> np.ndarray:
    """``[...]``: whether the ball is on the field, from positions ``[..., 3]`` read from the RAM of ROM
    ``game`` (``"breakout"``, see :func:`envs.atari.ale_game`)."""
    in_play = (positions[..., 1] > 0) & (positions[..., 2] > 0)
    if game in BALL_HIDDEN_FROM:
        column, limit = BALL_HIDDEN_FROM[game]
        in_play &= positions[..., column] < limit
    return in_play
