"""Catch: a tiny ROM-free pixel game for fast, deterministic tests of the whole agent.

A 4x4 ball (255) falls from the top, 4 px/step down and 6 px/step sideways, bouncing off the
side walls. A 12x3 paddle (200) on the bottom rows moves 4 px/step (0 left, 1 stay, 2 right).
When the ball reaches the paddle (after 14 steps) the episode ends with +1 if they overlap
horizontally, else -1. The sideways direction is random and not visible in a single frame, and
chasing the ball's current x fails often (it is faster than the paddle); a policy that infers
the direction from two frames can catch every ball, since the paddle reaches any landing point
from its central start within 7 steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box, Discrete

from envs.base import FRAME_SIZE, EnvSettings
from envs.episodes import EpisodeTracker

CATCH_ID = "wm/Catch-v0"

BALL = 4
BALL_VALUE = 255
BALL_DX = 6
BALL_DY = 4
BALL_START_Y = 1
PADDLE_W = 12
PADDLE_H = 3
PADDLE_VALUE = 200
PADDLE_DX = 4
PADDLE_Y = FRAME_SIZE - PADDLE_H
PADDLE_START_X = (FRAME_SIZE - PADDLE_W) // 2
MAX_BALL_X = FRAME_SIZE - BALL
MAX_PADDLE_X = FRAME_SIZE - PADDLE_W
LANDING_Y = PADDLE_Y - BALL
EPISODE_STEPS = -(-(LANDING_Y - BALL_START_Y) // BALL_DY)

_BALL_OFFSETS = np.arange(BALL)
_PADDLE_ROWS = np.arange(PADDLE_Y, PADDLE_Y + PADDLE_H)
_PADDLE_OFFSETS = np.arange(PADDLE_W)


@dataclass
class CatchState:
    """Positions (top-left corners, pixels) and ball direction of N games; int64 arrays of [N]."""

    ball_x: np.ndarray
    ball_y: np.ndarray
    ball_vx: np.ndarray
    paddle_x: np.ndarray

    @classmethod
    def empty(cls, n: int) -> CatchState:
        return cls(*(np.zeros(n, dtype=np.int64) for _ in range(4)))

    def spawn(self, index: int, rng: np.random.Generator) -> None:
        """Starts a new ball in game ``index``: random x and sideways direction; paddle centred."""
        self.ball_x[index] = rng.integers(0, MAX_BALL_X + 1)
        self.ball_vx[index] = BALL_DX if rng.random() < 0.5 else -BALL_DX
        self.ball_y[index] = BALL_START_Y
        self.paddle_x[index] = PADDLE_START_X

    def advance(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Moves paddles then balls one step; returns (reward float32 [N], landed bool [N])."""
        self.paddle_x += (actions - 1) * PADDLE_DX
        np.maximum(self.paddle_x, 0, out=self.paddle_x)
        np.minimum(self.paddle_x, MAX_PADDLE_X, out=self.paddle_x)

        x = self.ball_x + self.ball_vx
        bounce = (x < 0) | (x > MAX_BALL_X)
        self.ball_x[:] = MAX_BALL_X - np.abs(MAX_BALL_X - np.abs(x))  # reflect off either wall
        np.negative(self.ball_vx, out=self.ball_vx, where=bounce)
        self.ball_y += BALL_DY
        np.minimum(self.ball_y, LANDING_Y, out=self.ball_y)

        landed = self.ball_y >= LANDING_Y
        caught = (self.ball_x + BALL > self.paddle_x) & (self.ball_x < self.paddle_x + PADDLE_W)
        reward = np.where(landed, np.where(caught, 1.0, -1.0), 0.0).astype(np.float32)
        return reward, landed

    def landing_x(self) -> np.ndarray:
        """Where each ball will land: its x when it reaches the paddle row (walls fold the path)."""
        steps_left = -(-(LANDING_Y - self.ball_y) // BALL_DY)
        folded = np.mod(self.ball_x + self.ball_vx * steps_left, 2 * MAX_BALL_X)
        return np.where(folded > MAX_BALL_X, 2 * MAX_BALL_X - folded, folded)

    def render(self) -> np.ndarray:
        """uint8 frames [N, 64, 64]."""
        n = len(self.ball_x)
        obs = np.zeros((n, FRAME_SIZE, FRAME_SIZE), dtype=np.uint8)
        games = np.arange(n)[:, None, None]
        paddle_cols = (self.paddle_x[:, None] + _PADDLE_OFFSETS)[:, None, :]
        obs[games, _PADDLE_ROWS[None, :, None], paddle_cols] = PADDLE_VALUE
        ball_rows = (self.ball_y[:, None] + _BALL_OFFSETS)[:, :, None]
        ball_cols = (self.ball_x[:, None] + _BALL_OFFSETS)[:, None, :]
        obs[games, ball_rows, ball_cols] = BALL_VALUE
        return obs


class CatchEnv(gym.Env):
    """Single-copy gymnasium Catch (``wm/Catch-v0``): obs uint8 [64, 64], Discrete(3) actions."""

    metadata = {"render_modes": []}

    def __init__(self) -> None:
        self.observation_space = Box(0, 255, (FRAME_SIZE, FRAME_SIZE), np.uint8)
        self.action_space = Discrete(3)
        self.state = CatchState.empty(1)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.state.spawn(0, self.np_random)
        return self.state.render()[0], {}

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        reward, landed = self.state.advance(np.array([int(action)], dtype=np.int64))
        return self.state.render()[0], float(reward[0]), bool(landed[0]), False, {}


class CatchVecEnv:
    """``num_envs`` Catch games stepped together in numpy, following the :mod:`envs.base` contract.

    Each copy draws its balls from its own ``np.random.Generator`` seeded from the run seed, so
    results do not depend on how many copies run. ``life_loss`` is always False.
    """

    def __init__(self, settings: EnvSettings) -> None:
        self.settings = settings
        self.num_envs = settings.num_envs
        self.num_actions = 3
        self.action_meanings = ["LEFT", "NOOP", "RIGHT"]
        self.single_action_space = Discrete(3)
        self.single_observation_space = Box(0, 255, (FRAME_SIZE, FRAME_SIZE), np.uint8)
        self.state = CatchState.empty(self.num_envs)
        self._tracker = EpisodeTracker(self.num_envs)
        self._rngs: list[np.random.Generator] = []

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Starts a new ball in every copy; the first reset uses ``settings.seed`` if no seed is given."""
        if seed is not None or not self._rngs:
            seed = self.settings.seed if seed is None else seed
            streams = np.random.SeedSequence(seed).spawn(self.num_envs)
            self._rngs = [np.random.default_rng(s) for s in streams]
        for i, rng in enumerate(self._rngs):
            self.state.spawn(i, rng)
        return self.state.render(), self._tracker.on_reset()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Steps every copy (see :mod:`envs.base` for the returned tuple)."""
        actions = np.asarray(actions, dtype=np.int64)
        if actions.shape != (self.num_envs,):
            raise ValueError(f"expected actions of shape ({self.num_envs},), got {actions.shape}")
        if actions.min() < 0 or actions.max() > 2:
            raise ValueError(f"Catch actions must lie in [0, 3), got {actions}")
        restart = self._tracker.pending_reset()
        reward, terminated = self.state.advance(actions)
        for i in np.flatnonzero(restart):
            self.state.spawn(i, self._rngs[i])
        reward[restart] = 0.0
        terminated[restart] = False
        truncated = np.zeros(self.num_envs, dtype=bool)
        info = self._tracker.on_step(reward, terminated, truncated)
        return self.state.render(), reward, terminated, truncated, info

    def close(self) -> None:
        """Nothing to release; here for the common env interface."""


def register() -> None:
    """Registers ``wm/Catch-v0`` with gymnasium (idempotent)."""
    if CATCH_ID not in gym.registry:
        gym.register(id=CATCH_ID, entry_point="envs.catch:CatchEnv")
