"""Where did something arrive? An auxiliary head that asks each latent to place the objects that moved.

Pixel reconstruction weighs an object by its area and brightness: Breakout's ball, a faint ~3-pixel
blob at 64x64, stays out of the latent under any MSE weighting tried (README, issue 3). Here the
target is the set of coarse cells where a pixel brightened since the previous frame (the ball's and
the paddle's new positions), and the loss is a cross-entropy over cell positions: finding the ball's
cell is worth as much as finding the paddle's, however small or dim the ball.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def arrival_map(prev: torch.Tensor, now: torch.Tensor, threshold: float, cells: int) -> torch.Tensor:
    """Frames ``[N, H, W]`` in [0, 1] -> ``[N, cells * cells]`` float, 1 where some pixel of the cell
    grew brighter than in ``prev`` by more than ``threshold``."""
    arrived = ((now - prev) > threshold).float().unsqueeze(1)  # (N, 1, H, W)
    return F.adaptive_max_pool2d(arrived, cells).flatten(1)  # (N, cells*cells)


def spatial_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of a softmax over cells ``logits [N, C]`` against the uniform distribution over the
    target's cells ``[N, C]`` (0/1). Rows without a target cell (nothing moved) are left out.
    Returns the mean loss and the share of rows whose most likely cell is a target cell."""
    n_pos = target.sum(-1)  # (N,)
    has = (n_pos > 0).float()
    n_rows = has.sum().clamp(min=1)
    q = target / n_pos.clamp(min=1)[:, None]
    ce = -(q * logits.log_softmax(-1)).sum(-1)  # (N,), 0 where nothing moved
    hit = target.gather(1, logits.argmax(-1, keepdim=True))[:, 0] * has
    return ce.sum() / n_rows, (hit.sum() / n_rows).detach()


class MotionMapHead(nn.Module):
    """An MLP from a latent to logits over ``cells x cells`` positions of the frame."""

    def __init__(self, embed_dim: int, cells: int, hidden_dim: int = 256) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, cells * cells)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [N, E]`` -> logits ``[N, cells * cells]``."""
        return self.net(z)
