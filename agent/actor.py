"""The policy acting in a real vector env, from the same latent history it sees in imagination."""

from __future__ import annotations

import numpy as np
import torch

from agent.policy import ActorCritic
from worldmodel.world_model import WorldModel


class RealEnvActor:
    """Acts in the real vector env with the policy, from the same latent history it sees in imagination:
    the last frames of each copy (the first frame repeated at an episode start), freshly encoded."""

    def __init__(
        self,
        wm: WorldModel,
        policy: ActorCritic,
        num_envs: int,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> None:
        """``generator``: actions drawn from it (:func:`sample_actions`), not from torch's global one."""
        self.wm, self.policy, self.device, self.generator = wm, policy, device, generator
        self.history = np.zeros((num_envs, policy.cfg.history, 64, 64), dtype=np.uint8)

    def observe(self, obs: np.ndarray, is_first: np.ndarray) -> None:
        """Push the newest frames ``[N, H, W]``; copies that start an episode fill their history with it."""
        self.history[:, :-1] = self.history[:, 1:]
        self.history[:, -1] = obs
        self.history[is_first] = obs[is_first][:, None]

    @torch.no_grad()
    def act(self, greedy: bool = False) -> np.ndarray:
        self.wm.eval()
        self.policy.eval()
        window = self.wm.encode(torch.from_numpy(self.history).to(self.device))  # (N, h, E)
        return self.policy.act(window, greedy=greedy, generator=self.generator).cpu().numpy()
