"""Per-copy bookkeeping shared by the vector envs: autoreset flags, life losses, episode stats."""

from __future__ import annotations

import numpy as np


class EpisodeTracker:
    """Turns raw per-step signals of ``num_envs`` copies into the ``info`` of the env contract.

    It assumes NEXT_STEP autoreset: a copy that ended on one step shows the first frame of a new
    episode on the next, so ``is_first`` is the previous step's ``terminated | truncated``.
    """

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self._return = np.zeros(num_envs, dtype=np.float64)
        self._length = np.zeros(num_envs, dtype=np.int64)
        self._lives = np.zeros(num_envs, dtype=np.int64)
        self._ended = np.zeros(num_envs, dtype=bool)

    def on_reset(self, lives: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Starts every copy afresh; returns the reset ``info``."""
        self._return[:] = 0.0
        self._length[:] = 0
        self._ended[:] = False
        if lives is not None:
            self._lives[:] = lives
        n = self.num_envs
        return {
            "is_first": np.ones(n, dtype=bool),
            "life_loss": np.zeros(n, dtype=bool),
            "episode_return": np.full(n, np.nan),
            "episode_length": np.zeros(n, dtype=np.int64),
        }

    def pending_reset(self) -> np.ndarray:
        """Copies whose next step is an autoreset (they ended on the last step)."""
        return self._ended.copy()

    def on_step(
        self,
        reward: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        lives: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Records one step of every copy; returns the step ``info``."""
        is_first = self._ended
        self._return[is_first] = 0.0
        self._length[is_first] = 0
        stepped = ~is_first
        self._return[stepped] += reward[stepped]
        self._length[stepped] += 1

        if lives is None:
            life_loss = np.zeros(self.num_envs, dtype=bool)
        else:
            lives = np.asarray(lives, dtype=np.int64)
            life_loss = (lives < self._lives) & stepped
            self._lives[:] = lives

        ended = terminated | truncated
        info = {
            "is_first": is_first,
            "life_loss": life_loss,
            "episode_return": np.where(ended, self._return, np.nan),
            "episode_length": np.where(ended, self._length, 0),
        }
        self._ended = ended.copy()
        return info
