"""Imagination as an environment: the world model stepped in latent space like a real vector env."""

from __future__ import annotations

import torch

from worldmodel.world_model import WorldModel


class ImaginedEnv:
    """A batch of imagined episodes, all on the model's device (no host copies).

    The observation is the latent window ``[B, K, E]`` the predictor sees; ``step`` returns
    ``(obs, reward [B], cont [B], truncated [B], info)`` where ``cont`` is the predicted
    probability that the episode goes on (1 - termination), the soft counterpart of the real env's
    ``terminated``; ``truncated`` becomes True on the last step of the horizon.
    """

    def __init__(self, world_model: WorldModel, horizon: int) -> None:
        if horizon < 1:
            raise ValueError(f"imagination horizon must be at least 1, got {horizon}")
        self.wm = world_model
        self.horizon = horizon
        self.window: torch.Tensor | None = None
        self.t = 0

    @torch.no_grad()
    def reset(self, start: torch.Tensor) -> torch.Tensor:
        """Start from real context: uint8 frames ``[B, K, H, W]`` (encoded here) or latent windows
        ``[B, K, E]`` already encoded; returns the latent window ``[B, K, E]``."""
        self.wm.eval()
        self.window = self.wm.encode(start) if start.dtype == torch.uint8 else start
        self.t = 0
        return self.window

    @torch.no_grad()
    def step(
        self, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Actions ``[B]`` (int64) -> next window ``[B, K, E]``, reward, continue probability, truncated."""
        if self.window is None:
            raise RuntimeError("call reset() before step()")
        pred = self.wm.imagine_step(self.window, action)
        self.window = torch.cat([self.window[:, 1:], pred.latent], dim=1)
        self.t += 1
        truncated = torch.full_like(pred.cont, float(self.t >= self.horizon)).bool()
        return self.window, pred.reward, pred.cont, truncated, {}
