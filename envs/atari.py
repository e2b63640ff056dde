"""Atari through the ALE: 64x64 grayscale frames, frameskip 4 with max-pooling, NOOP/FIRE resets.

Two backends follow the same contract (see :mod:`envs.base`):

- :class:`AtariEnv`: ALE's C++ vector env (``ale_py.vector_env.AtariVectorEnv``), the fast default.
- :class:`AtariGymEnv`: gymnasium ``ALE/<Game>-v5`` envs at frameskip 1 with numpy preprocessing,
  stepped by a gymnasium vector env; slower, kept as a reference and fallback.
"""

from __future__ import annotations

import os
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from ale_py.vector_env import AtariVectorEnv
from gymnasium.spaces import Box, Discrete
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv

from envs.base import FRAME_SIZE, EnvSettings, EnvSpecError
from envs.episodes import EpisodeTracker

gym.register_envs(ale_py)

FRAMESKIP = 4
_ATARI_SCREEN = (210, 160)


def ale_game(env_id: str) -> str:
    """The ROM id (``"breakout"``) of a gymnasium ALE id (``"ALE/Breakout-v5"``)."""
    try:
        spec = gym.spec(env_id)
    except gym.error.Error as e:
        raise EnvSpecError(f"unknown env id {env_id!r}") from e
    game = spec.kwargs.get("game")
    if not isinstance(game, str) or not spec.id.startswith("ALE/"):
        raise EnvSpecError(f"{env_id} is not an ALE/<Game>-v5 id")
    return game


def copy_seeds(seed: int, num_envs: int) -> np.ndarray:
    """Independent per-copy seeds derived from one run seed (seeds 0 and 1 share no copy)."""
    state = np.random.SeedSequence(seed).generate_state(num_envs, dtype=np.uint32)
    return (state & 0x7FFF_FFFF).astype(np.int64)


def _check_actions(actions: np.ndarray | Any, num_envs: int, num_actions: int) -> np.ndarray:
    actions = np.asarray(actions, dtype=np.int64)
    if actions.shape != (num_envs,):
        raise ValueError(f"expected actions of shape ({num_envs},), got {actions.shape}")
    if actions.size and (actions.min() < 0 or actions.max() >= num_actions):
        raise ValueError(f"actions must lie in [0, {num_actions}), got {actions}")
    return actions


class AtariEnv:
    """``num_envs`` copies of one Atari game on ALE's threaded C++ vector env.

    Frames are 64x64 grayscale, max-pooled over the last two of 4 skipped frames; resets take
    up to ``noop_max`` NOOPs and then FIRE where the game has it. Episodes end on game over
    (``terminated``) or after 108,000 frames (``truncated``); life losses only show in
    ``info["life_loss"]``. Rewards are unclipped. Uses the game's minimal action set.
    """

    def __init__(self, settings: EnvSettings, num_threads: int | None = None) -> None:
        self.settings = settings
        self.num_envs = settings.num_envs
        if num_threads is None:
            num_threads = min(settings.num_envs, os.cpu_count() or 1)
        self._env = AtariVectorEnv(
            ale_game(settings.env_id),
            settings.num_envs,
            num_threads=num_threads,
            img_height=FRAME_SIZE,
            img_width=FRAME_SIZE,
            grayscale=True,
            stack_num=1,
            frameskip=FRAMESKIP,
            maxpool=True,
            noop_max=settings.noop_max,
            use_fire_reset=True,
            episodic_life=False,
            reward_clipping=False,
            repeat_action_probability=settings.sticky_actions,
            max_num_frames_per_episode=settings.max_episode_frames,
            full_action_space=False,
            autoreset_mode=AutoresetMode.NEXT_STEP,
        )
        self.action_meanings: list[str] = [a.name for a in self._env.ale.get_action_set()]
        self.num_actions = len(self.action_meanings)
        self.single_action_space = Discrete(self.num_actions)
        self.single_observation_space = Box(0, 255, (FRAME_SIZE, FRAME_SIZE), np.uint8)
        self._tracker = EpisodeTracker(self.num_envs)
        self._seeded = False

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Starts a new episode in every copy; the first reset uses ``settings.seed`` if no seed is given."""
        if seed is None and not self._seeded:
            seed = self.settings.seed
        self._seeded = True
        seeds = None if seed is None else copy_seeds(seed, self.num_envs)
        obs, info = self._env.reset(seed=seeds)
        return obs[:, 0], self._tracker.on_reset(info["lives"])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Steps every copy (see :mod:`envs.base` for the returned tuple)."""
        actions = _check_actions(actions, self.num_envs, self.num_actions)
        obs, reward, terminated, truncated, info = self._env.step(actions)
        reward = reward.astype(np.float32)
        terminated = terminated.astype(bool)
        truncated = truncated.astype(bool)
        out_info = self._tracker.on_step(reward, terminated, truncated, info["lives"])
        return obs[:, 0], reward, terminated, truncated, out_info

    def close(self) -> None:
        """Releases the ALE instances and their threads."""
        if self._env is not None:
            self._env.close()
            self._env = None


def _area_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """Box-filter taps for resizing ``src`` pixels to ``dst``: output i averages the input span
    [i*s, (i+1)*s), s = src/dst. Returns ``[dst, k]`` input indices and their weights."""
    scale = src / dst
    lo = np.arange(dst)[:, None] * scale
    pixel = np.arange(src)[None, :]
    overlap = np.clip(np.minimum(lo + scale, pixel + 1) - np.maximum(lo, pixel), 0.0, None)
    taps = int((overlap > 0).sum(axis=1).max())
    first = np.floor(lo[:, 0]).astype(np.int64)
    index = np.minimum(first[:, None] + np.arange(taps), src - 1)
    weight = np.take_along_axis(overlap, index, axis=1) / scale
    weight[first[:, None] + np.arange(taps) >= src] = 0.0
    return index, weight.astype(np.float32)


class AreaResize:
    """Area (box-filter) resize of uint8 frames, like OpenCV's ``INTER_AREA``, in plain numpy.

    It gathers a few taps per output pixel instead of using matmuls: small BLAS calls can stall
    for milliseconds when OpenBLAS threads compete for the cores.
    """

    def __init__(self, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> None:
        self._row_index, row_weight = _area_taps(src_hw[0], dst_hw[0])
        self._row_weight = row_weight[:, :, None]
        self._col_index, self._col_weight = _area_taps(src_hw[1], dst_hw[1])

    def __call__(self, frame: np.ndarray) -> np.ndarray:
        rows = (frame[self._row_index].astype(np.float32) * self._row_weight).sum(axis=1)
        out = (rows[:, self._col_index] * self._col_weight).sum(axis=2)
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)


class _AtariPreprocessing(gym.Wrapper):
    """Frameskip with max-pool of the last two frames, NOOP/FIRE resets and a 64x64 area resize,
    on a grayscale frameskip-1 ALE env."""

    def __init__(self, env: gym.Env, noop_max: int) -> None:
        super().__init__(env)
        self._noop_max = noop_max
        self._fire = "FIRE" in env.unwrapped.get_action_meanings()
        self._resize = AreaResize(_ATARI_SCREEN, (FRAME_SIZE, FRAME_SIZE))
        self.observation_space = Box(0, 255, (FRAME_SIZE, FRAME_SIZE), np.uint8)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        while True:
            frame, info = self.env.reset(seed=seed, options=options)
            seed = None
            ended = False
            for _ in range(int(self.np_random.integers(0, self._noop_max + 1))):
                frame, _, terminated, truncated, info = self.env.step(0)
                if terminated or truncated:
                    ended = True
                    break
            if not ended and self._fire:
                obs, _, terminated, truncated, info = self._skip(1, frame)
                ended = terminated or truncated
            else:
                obs = self._resize(frame)
            if not ended:
                return obs, info

    def step(self, action: int) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self._skip(action, None)

    def _skip(self, action: int, prev: np.ndarray | None) -> tuple[np.ndarray, float, bool, bool, dict]:
        total = 0.0
        frame = prev
        for _ in range(FRAMESKIP):
            prev = frame
            frame, reward, terminated, truncated, info = self.env.step(action)
            total += float(reward)
            if terminated or truncated:
                break
        pooled = frame if prev is None else np.maximum(prev, frame)
        return self._resize(pooled), total, terminated, truncated, info


class AtariGymEnv:
    """The same protocol as :class:`AtariEnv`, built from gymnasium ``ALE/<Game>-v5`` envs.

    Each copy is ``gym.make(env_id, frameskip=1, obs_type="grayscale")`` plus numpy preprocessing
    (no OpenCV); the copies run in a gymnasium Sync- or AsyncVectorEnv with NEXT_STEP autoreset.
    """

    def __init__(self, settings: EnvSettings, asynchronous: bool = False) -> None:
        ale_game(settings.env_id)
        self.settings = settings
        self.num_envs = settings.num_envs

        def make_copy() -> gym.Env:
            env = gym.make(
                settings.env_id,
                frameskip=1,
                obs_type="grayscale",
                repeat_action_probability=settings.sticky_actions,
                full_action_space=False,
                max_num_frames_per_episode=settings.max_episode_frames,
            )
            return _AtariPreprocessing(env, settings.noop_max)

        vector_cls = AsyncVectorEnv if asynchronous else SyncVectorEnv
        self._env = vector_cls([make_copy] * self.num_envs, autoreset_mode=AutoresetMode.NEXT_STEP)
        self.action_meanings: list[str] = list(self._env.call("get_action_meanings")[0])
        self.num_actions = len(self.action_meanings)
        self.single_action_space = Discrete(self.num_actions)
        self.single_observation_space = Box(0, 255, (FRAME_SIZE, FRAME_SIZE), np.uint8)
        self._tracker = EpisodeTracker(self.num_envs)
        self._seeded = False

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Starts a new episode in every copy; the first reset uses ``settings.seed`` if no seed is given."""
        if seed is None and not self._seeded:
            seed = self.settings.seed
        self._seeded = True
        seeds = None if seed is None else copy_seeds(seed, self.num_envs).tolist()
        obs, info = self._env.reset(seed=seeds)
        return np.asarray(obs, dtype=np.uint8), self._tracker.on_reset(info["lives"])

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Steps every copy (see :mod:`envs.base` for the returned tuple)."""
        actions = _check_actions(actions, self.num_envs, self.num_actions)
        obs, reward, terminated, truncated, info = self._env.step(actions)
        reward = np.asarray(reward, dtype=np.float32)
        terminated = np.asarray(terminated, dtype=bool)
        truncated = np.asarray(truncated, dtype=bool)
        out_info = self._tracker.on_step(reward, terminated, truncated, info["lives"])
        return np.asarray(obs, dtype=np.uint8), reward, terminated, truncated, out_info

    def ram(self) -> np.ndarray:
        """Each copy's console RAM now, uint8 ``[N, 128]`` (synchronous vector env only)."""
        if not isinstance(self._env, SyncVectorEnv):
            raise RuntimeError("ram() reads the copies in this process; build the env with asynchronous=False")
        return np.stack([copy.unwrapped.ale.getRAM() for copy in self._env.envs])

    def close(self) -> None:
        """Closes the gymnasium envs (and worker processes when asynchronous)."""
        if self._env is not None:
            self._env.close()
            self._env = None
