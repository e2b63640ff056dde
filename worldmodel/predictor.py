"""Latent dynamics: (frame latents so far, action) -> next frame latent."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from worldmodel.layers import RotaryEmbedding1D, TransformerBlock


@dataclass
class PredictorConfig:
    """Sizes of the ``LatentDynamicsPredictor``."""

    embed_dim: int = 128
    """Width of the latents (must match the encoder's ``embed_dim``)."""
    depth: int = 4
    """Number of causal transformer blocks."""
    num_heads: int = 4
    """Attention heads per block."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of ``embed_dim``."""
    max_context: int = 32
    """Most frame latents ``T`` one call may see (the sequence is ``T + 1`` tokens with the action)."""
    context: int = 0
    """Read only the last ``context`` latents of the window given (0: all of it). Lets the reward and
    continue heads read a longer window (``reward.window``) than the predictor needs, at the predictor's
    cost of a short one."""
    residual: bool = False
    """Predict the change from the last latent: ``z_T = z_{T-1} + head(...)``, the head starting at zero
    (so an untrained predictor holds the last frame). Off: ARCHITECTURE.md's head predicts ``z_T`` itself."""


class LatentDynamicsPredictor(nn.Module):
    """Predicts the next frame latent from the latents so far and the action taken: the action
    token is prepended to ``z_0 .. z_{T-1}``, a causal transformer with 1-D RoPE runs over the
    sequence, and the last output token goes through LayerNorm and a Linear head."""

    def __init__(self, cfg: PredictorConfig, num_actions: int) -> None:
        super().__init__()
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.num_actions = num_actions
        self.action_embed = nn.Embedding(num_actions, cfg.embed_dim)
        self.rope = RotaryEmbedding1D(cfg.embed_dim // cfg.num_heads)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, causal=True) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        self.head = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        if cfg.residual:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def transformer_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The causal stack without the head: ``tokens [B, L, E]`` -> ``[B, L, E]``; output ``i``
        depends only on tokens ``0..i``."""
        B, L, E = tokens.shape
        rope = self.rope(L)
        for block in self.blocks:
            tokens = block(tokens, rope)
        return tokens

    def forward(self, z: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """``z [B, T, E]`` (``T <= max_context``), ``action`` int64 ``[B]`` -> predicted ``z_T [B, 1, E]``
        (from the last ``cfg.context`` latents of ``z`` when that is set)."""
        if self.cfg.context:
            z = z[:, -self.cfg.context :]
        B, T, E = z.shape
        if T + 1 > self.cfg.max_context + 1:
            raise ValueError(f"predictor got T={T} latents (+1 action token) but max_context is {self.cfg.max_context}")
        action_token = self.action_embed(action).unsqueeze(1)  # (B, 1, E)
        tokens = torch.cat([action_token, z], dim=1)  # (B, T+1, E)
        last = self.transformer_outputs(tokens)[:, -1:]  # (B, 1, E)
        out = self.head(self.norm(last))
        return z[:, -1:] + out if self.cfg.residual else out
