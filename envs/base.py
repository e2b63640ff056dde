"""The vector-env contract every env in wm-agent follows.

All envs returned by :func:`envs.make_env` step ``num_envs`` copies in lockstep and follow
gymnasium's NEXT_STEP autoreset: when a copy ends (terminated or truncated), the step returns
its final frame, and the *next* ``step`` call ignores that copy's action and returns the first
frame of a new episode with ``info["is_first"][i] = True``, reward 0, terminated/truncated False.

``step(actions)`` returns ``(obs, reward, terminated, truncated, info)``:

- ``obs``: uint8 ``[N, 64, 64]`` grayscale frames.
- ``reward``: float32 ``[N]``, unclipped game score.
- ``terminated``: bool ``[N]``, the real end of an episode (game over), never a life loss.
- ``truncated``: bool ``[N]``, the time limit (108,000 frames on ALE).
- ``info["life_loss"]``: bool ``[N]``, a life was lost on this step (a training-time terminal only).
- ``info["is_first"]``: bool ``[N]``, ``obs`` is the first frame of a new episode.
- ``info["episode_return"]``: float64 ``[N]``, the return of the episode that ended on this step,
  NaN where none ended; ``info["episode_length"]``: int64 ``[N]``, its length in agent steps (0 where none).

``reset(seed=None)`` returns ``(obs, info)`` with ``info["is_first"]`` all True.
"""

from __future__ import annotations

from dataclasses import dataclass

FRAME_SIZE = 64


class EnvSpecError(ValueError):
    """An env id or env that wm-agent cannot use; the message is one line meant for the user."""


@dataclass(frozen=True)
class EnvSettings:
    """How an env is built; saved with every run so results say which protocol they used."""

    env_id: str
    num_envs: int
    seed: int
    sticky_actions: float = 0.0
    """Probability of repeating the previous action (0.0 = Atari 100k protocol, 0.25 = the v5 default)."""
    noop_max: int = 30
    max_episode_frames: int = 108_000
