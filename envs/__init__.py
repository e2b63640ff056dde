"""Vector envs for wm-agent: Atari (``ALE/<Game>-v5``) and the ROM-free ``wm/Catch-v0``.

Everything here follows the contract in :mod:`envs.base`. This is the bottom layer: no torch.
"""

from __future__ import annotations

import difflib
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
from gymnasium.spaces import Box, Discrete, Space

from envs.atari import AtariEnv, AtariGymEnv
from envs.base import FRAME_SIZE, EnvSettings, EnvSpecError
from envs.catch import CATCH_ID, CatchEnv, CatchVecEnv, register

register()

BACKENDS = ("auto", "ale", "gym")
"""``ale``: ALE's C++ vector env (:class:`AtariEnv`); ``gym``: gymnasium envs + numpy preprocessing
(:class:`AtariGymEnv`); ``auto``: ``ale``, the faster one. Catch has a single implementation."""

__all__ = [
    "BACKENDS",
    "CATCH_ID",
    "FRAME_SIZE",
    "AtariEnv",
    "AtariGymEnv",
    "CatchEnv",
    "CatchVecEnv",
    "EnvSettings",
    "EnvSpecError",
    "VecEnv",
    "make_env",
]


class VecEnv(Protocol):
    """What every env from :func:`make_env` provides (semantics in :mod:`envs.base`)."""

    settings: EnvSettings
    num_envs: int
    num_actions: int
    single_action_space: Discrete
    action_meanings: list[str]

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]: ...

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]: ...

    def close(self) -> None: ...


def make_env(
    env_id: str,
    num_envs: int = 1,
    seed: int = 0,
    sticky_actions: float = 0.0,
    noop_max: int = 30,
    backend: str = "auto",
) -> VecEnv:
    """Builds ``num_envs`` copies of ``env_id`` (``wm/Catch-v0`` or any ``ALE/<Game>-v5``).

    Atari uses the game's minimal action set, 64x64 grayscale frames, frameskip 4, up to
    ``noop_max`` NOOPs at reset and ``sticky_actions`` repeat probability (0.0 = Atari 100k).
    The env is seeded from ``seed`` on its first ``reset()``.

    Raises:
        EnvSpecError: bad arguments, an unknown id, or an env wm-agent cannot run (non-discrete
            actions, non-image observations, non-v5 Atari ids); the message is one line.
    """
    if isinstance(num_envs, bool) or not isinstance(num_envs, int | np.integer) or num_envs < 1:
        raise EnvSpecError(f"num_envs must be an integer >= 1, got {num_envs!r}")
    if not 0.0 <= sticky_actions <= 1.0:
        raise EnvSpecError(f"sticky_actions is a probability in [0, 1], got {sticky_actions!r}")
    if noop_max < 0:
        raise EnvSpecError(f"noop_max must be >= 0, got {noop_max!r}")
    if backend not in BACKENDS:
        raise EnvSpecError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")

    settings = EnvSettings(env_id, int(num_envs), int(seed), float(sticky_actions), int(noop_max))
    if env_id == CATCH_ID:
        return CatchVecEnv(settings)
    _check_atari_id(env_id)
    if backend == "gym":
        return AtariGymEnv(settings)
    return AtariEnv(settings)


def _describe(space: Space[Any]) -> str:
    if isinstance(space, Box):
        return f"Box{space.shape}"
    if isinstance(space, Discrete):
        return f"Discrete({space.n})"
    return type(space).__name__


def _is_image(space: Space[Any]) -> bool:
    return isinstance(space, Box) and len(space.shape) in (2, 3)


def _is_supported_atari(spec: gym.envs.registration.EnvSpec) -> bool:
    return spec.id.startswith("ALE/") and spec.version == 5 and spec.kwargs.get("obs_type", "rgb") == "rgb"


def _v5_id_for(spec: gym.envs.registration.EnvSpec) -> str | None:
    """The image ``ALE/<Game>-v5`` id for the same game as ``spec``, if it is an Atari spec."""
    game = spec.kwargs.get("game")
    if game is None:
        return None
    for other in gym.registry.values():
        if _is_supported_atari(other) and other.kwargs.get("game") == game:
            return other.id
    return None


def _check_atari_id(env_id: str) -> None:
    """Returns if ``env_id`` is an image ``ALE/<Game>-v5`` id; raises a one-line EnvSpecError if not."""
    if env_id not in gym.registry:
        supported = [CATCH_ID] + [i for i in gym.registry if _is_supported_atari(gym.spec(i))]
        close = difflib.get_close_matches(env_id, supported, n=1, cutoff=0.6)
        close = close or difflib.get_close_matches(env_id, list(gym.registry), n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise EnvSpecError(f"unknown env id {env_id!r}{hint}")
    spec = gym.spec(env_id)
    if _is_supported_atari(spec):
        return

    try:
        env = gym.make(env_id)
    except Exception as e:  # noqa: BLE001 - any failure to build is reported the same way
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise EnvSpecError(f"cannot build {env_id}: {first_line}") from e
    try:
        action_space, observation_space = env.action_space, env.observation_space
    finally:
        env.close()
    if not isinstance(action_space, Discrete):
        raise EnvSpecError(f"wm-agent needs a discrete action space; {env_id} has {_describe(action_space)}")
    if not _is_image(observation_space):
        raise EnvSpecError(f"wm-agent needs image observations; {env_id} has {_describe(observation_space)}")
    v5 = _v5_id_for(spec)
    hint = f"; did you mean {v5}?" if v5 else ""
    raise EnvSpecError(f"wm-agent runs {CATCH_ID} and ALE/<Game>-v5 ids only; {env_id} is neither{hint}")
