"""Transition head: (latents before, latents after) -> reward (or any per-transition output)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import repeat
from torch import nn


@dataclass
class RewardConfig:
    """Sizes of a ``RewardPredictor``."""

    embed_dim: int = 128
    """Width of the input latents."""
    hidden_dim: int = 128
    """Width of the projected tokens, the attention and the MLP head."""
    num_heads: int = 4
    """Attention heads of the CLS token's attention."""
    out_dim: int = 1
    """Outputs per transition: 1 for a scalar (reward or a continue logit), more for e.g. two-hot
    reward-bin logits."""
    window: int = 1
    """Latents per input sequence (``T``). Above 1 each of the ``T`` positions gets a learned embedding,
    so the head can tell when in the window something happened (ARCHITECTURE.md allows sequences but
    gives them no order)."""
    reader: Literal["attention", "mlp"] = "attention"
    """How the head reads its latents: ``"attention"`` is ARCHITECTURE.md's ``RewardPredictor`` (a CLS token
    attending over them); ``"mlp"`` concatenates them into a 2-layer MLP of width ``hidden_dim``
    (:class:`MLPTransitionHead`), which read more of a reward's timing out of imagined latents
    (docs/breakout_world_model.md, 2026-12-07)."""


class RewardPredictor(nn.Module):
    """Predicts a per-transition output from the latents before and after it: both are projected,
    concatenated into one sequence behind a learnable CLS token, the CLS token attends to the whole
    sequence (itself included), and an MLP head reads its output."""

    def __init__(self, cfg: RewardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H = cfg.hidden_dim
        self.proj = nn.Linear(cfg.embed_dim, H)
        # Shared projection for both inputs; this 2-entry embedding (0 = before, 1 = after) lets the
        # head tell z_t's tokens from z_next's.
        self.which_input = nn.Embedding(2, H)
        self.time_embed = nn.Embedding(cfg.window, H) if cfg.window > 1 else None
        self.cls_token = nn.Parameter(torch.randn(1, 1, H) * 0.02)
        self.attn = nn.MultiheadAttention(H, cfg.num_heads, batch_first=True)
        self.norm = nn.LayerNorm(H)
        self.head = nn.Sequential(nn.Linear(H, H), nn.GELU(), nn.Linear(H, cfg.out_dim))

    def forward(self, z_t: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """``z_t [B, T, E]``, ``z_next [B, T, E]`` (``T`` = 1, or ``window``: the latents up to ``t`` and up
        to ``t + 1``) -> ``[B, 1, out_dim]``."""
        B, T, E = z_t.shape
        before = self.proj(z_t) + self.which_input.weight[0]  # (B, T, H)
        after = self.proj(z_next) + self.which_input.weight[1]  # (B, T, H)
        if self.time_embed is not None:
            if T != self.cfg.window:
                raise ValueError(f"head of window {self.cfg.window} got sequences of {T} latents")
            before, after = before + self.time_embed.weight, after + self.time_embed.weight
        cls = repeat(self.cls_token, "1 1 h -> b 1 h", b=B)
        seq = torch.cat([cls, before, after], dim=1)  # (B, 2T+1, H)
        out, _ = self.attn(cls, seq, seq, need_weights=False)  # (B, 1, H)
        return self.head(self.norm(out))


class MLPTransitionHead(nn.Module):
    """The same inputs and output as :class:`RewardPredictor`, read by an MLP: the ``T`` latents before and the
    ``T`` after a transition, concatenated in order (so every position keeps its own weights), through two
    GELU layers of width ``hidden_dim``."""

    def __init__(self, cfg: RewardConfig) -> None:
        super().__init__()
        self.cfg = cfg
        H, n_in = cfg.hidden_dim, 2 * cfg.window * cfg.embed_dim
        self.net = nn.Sequential(nn.Linear(n_in, H), nn.GELU(), nn.Linear(H, H), nn.GELU(), nn.Linear(H, cfg.out_dim))

    def forward(self, z_t: torch.Tensor, z_next: torch.Tensor) -> torch.Tensor:
        """``z_t [B, T, E]``, ``z_next [B, T, E]`` (``T`` = ``window``) -> ``[B, 1, out_dim]``."""
        if z_t.shape[1] != self.cfg.window:
            raise ValueError(f"head of window {self.cfg.window} got sequences of {z_t.shape[1]} latents")
        return self.net(torch.cat([z_t, z_next], dim=1).flatten(1)).unsqueeze(1)


def transition_head(cfg: RewardConfig) -> RewardPredictor | MLPTransitionHead:
    """The head ``cfg.reader`` names."""
    if cfg.reader == "attention":
        return RewardPredictor(cfg)
    if cfg.reader == "mlp":
        return MLPTransitionHead(cfg)
    raise ValueError(f"reward.reader must be 'attention' or 'mlp', got {cfg.reader!r}")
