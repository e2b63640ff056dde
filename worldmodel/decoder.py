"""Hybrid conv/transformer decoder: one latent -> one frame."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


@dataclass
class DecoderConfig:
    """Sizes of the ``HybridConvTransformerDecoder``."""

    embed_dim: int = 128
    """Width of the input latent and of the spatial tokens."""
    frame_size: int = 64
    """Height and width of the (square) output frame."""
    token_grid: int = 8
    """Side of the spatial-token grid the latent is expanded into (``token_grid**2`` tokens)."""
    channels: tuple[int, ...] = (64, 32, 16)
    """Feature-map channels: ``channels[0]`` at the token grid, then one upsampling block per entry,
    block ``i`` mapping ``channels[i] -> channels[i+1]`` (the last keeps ``channels[-1]``); there must be
    ``log2(frame_size / token_grid)`` entries."""
    attn_dim: int = 32
    """Inner width of the cross-attention in each upsampling block."""
    num_heads: int = 2
    """Cross-attention heads."""


class MultiHeadCrossAttention(nn.Module):
    """Multi-head attention from ``query_dim`` queries to ``kv_dim`` keys/values, computed at width
    ``attn_dim`` and projected back to ``query_dim``."""

    def __init__(self, query_dim: int, kv_dim: int, attn_dim: int, num_heads: int) -> None:
        super().__init__()
        if attn_dim % num_heads:
            raise ValueError(f"attn_dim {attn_dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(query_dim, attn_dim)
        self.kv = nn.Linear(kv_dim, 2 * attn_dim)
        self.proj = nn.Linear(attn_dim, query_dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x [B, N, query_dim]``, ``context [B, M, kv_dim]`` -> ``[B, N, query_dim]``."""
        q = rearrange(self.q(x), "b n (h d) -> b h n d", h=self.num_heads)
        k, v = rearrange(self.kv(context), "b m (two h d) -> two b h m d", two=2, h=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))


class UpsampleBlock(nn.Module):
    """Doubles a feature map's height and width (transposed conv, GroupNorm, GELU), then refines it
    with residual cross-attention from every feature-map position to the spatial tokens."""

    def __init__(self, in_ch: int, out_ch: int, kv_dim: int, attn_dim: int, num_heads: int) -> None:
        super().__init__()
        self.up = nn.ConvTranspose3d(in_ch, out_ch, kernel_size=(1, 4, 4), stride=(1, 2, 2), padding=(0, 1, 1))
        self.norm = nn.GroupNorm(math.gcd(8, out_ch), out_ch)
        self.act = nn.GELU()
        self.attn_norm = nn.LayerNorm(out_ch)
        self.cross_attn = MultiHeadCrossAttention(out_ch, kv_dim, attn_dim, num_heads)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x [B, in_ch, T, H, W]``, ``context [B, M, kv_dim]`` -> ``[B, out_ch, T, 2H, 2W]``."""
        x = self.act(self.norm(self.up(x)))  # (B, out_ch, T, 2H, 2W)
        B, C, T, H, W = x.shape
        queries = rearrange(x, "b c t h w -> b (t h w) c")
        queries = queries + self.cross_attn(self.attn_norm(queries), context)
        return rearrange(queries, "b (t h w) c -> b c t h w", t=T, h=H, w=W)


class HybridConvTransformerDecoder(nn.Module):
    """Decodes one latent into one frame: the latent is expanded into a grid of spatial tokens,
    projected to a low-resolution feature map, doubled in resolution by ``UpsampleBlock``s that
    cross-attend to the tokens, and collapsed to one channel. The output is unbounded logits-like
    pixels; the caller compares them with pixels in ``[0, 1]``."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        ratio = cfg.frame_size // cfg.token_grid
        if cfg.frame_size % cfg.token_grid or ratio & (ratio - 1):
            raise ValueError(f"frame_size / token_grid must be a power of two, got {cfg.frame_size} / {cfg.token_grid}")
        num_blocks = ratio.bit_length() - 1
        if num_blocks != len(cfg.channels):
            raise ValueError(
                f"{cfg.token_grid} -> {cfg.frame_size} takes {num_blocks} upsampling blocks, "
                f"but channels {cfg.channels} has {len(cfg.channels)} entries"
            )
        self.cfg = cfg
        E, G = cfg.embed_dim, cfg.token_grid
        self.token_decoder = nn.Linear(E, G * G * E)
        # Learned per-token position embedding: the spatial tokens carry their grid position,
        # the only positional signal the cross-attention keys get.
        self.token_pos = nn.Parameter(torch.randn(1, G * G, E) * 0.02)
        self.context_norm = nn.LayerNorm(E)
        self.init_proj = nn.Linear(E, cfg.channels[0])
        out_channels = (*cfg.channels[1:], cfg.channels[-1])
        self.blocks = nn.ModuleList(
            UpsampleBlock(c_in, c_out, E, cfg.attn_dim, cfg.num_heads)
            for c_in, c_out in zip(cfg.channels, out_channels, strict=True)
        )
        self.out_conv = nn.Conv3d(cfg.channels[-1], 1, kernel_size=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """``z [B, 1, E]`` -> frame ``[B, 1, 1, H, W]`` (channel, time, height, width)."""
        B, one, E = z.shape
        if one != 1:
            raise ValueError(f"decoder expects one latent per sample [B, 1, E], got {tuple(z.shape)}")
        G = self.cfg.token_grid
        tokens = rearrange(self.token_decoder(z), "b 1 (n e) -> b n e", e=E)  # (B, G*G, E)
        tokens = tokens + self.token_pos
        x = rearrange(self.init_proj(tokens), "b (t h w) c -> b c t h w", t=1, h=G, w=G)  # (B, C0, 1, G, G)
        context = self.context_norm(tokens)
        for block in self.blocks:
            x = block(x, context)
        return self.out_conv(x)  # (B, 1, 1, H, W)
