"""Video ViT encoder: each frame of a clip -> one latent vector."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from einops import rearrange
from torch import nn

from worldmodel.layers import RotaryEmbedding2D, TransformerBlock


@dataclass
class EncoderConfig:
    """Sizes of the ``VideoViT`` encoder."""

    frame_size: int = 64
    """Height and width of the (square) input frames, in pixels."""
    in_channels: int = 1
    """Channels per frame (1 for grayscale)."""
    patch_size: int = 8
    """Side of the square patches each frame is cut into."""
    embed_dim: int = 128
    """Width of the patch tokens and of the output latent."""
    depth: int = 4
    """Number of transformer blocks."""
    num_heads: int = 4
    """Attention heads per block (``embed_dim / num_heads`` must be divisible by 4 for 2-D RoPE)."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of ``embed_dim``."""
    pool: Literal["mean", "flatten"] = "mean"
    """How a frame's patch tokens become its latent. "mean": ARCHITECTURE.md's mean over patches (the
    latent is ``embed_dim`` wide). "flatten": each patch token is projected to ``flatten_dim`` channels
    and the patches are concatenated in grid order (``num_patches * flatten_dim`` wide), so where a
    feature sits stays in the latent, as DreamerV3 flattens its CNN map."""
    flatten_dim: int = 4
    """Channels each patch keeps with ``pool="flatten"``."""

    @property
    def num_patches(self) -> int:
        return (self.frame_size // self.patch_size) ** 2

    @property
    def latent_dim(self) -> int:
        """Width of one frame's latent, what the predictor, decoder and heads read."""
        return self.embed_dim if self.pool == "mean" else self.num_patches * self.flatten_dim


class FactorizedPatchEmbed(nn.Module):
    """Cuts every frame into ``patch_size x patch_size`` patches and embeds them: a 3-D convolution
    with a temporal kernel of 1, i.e. the same 2-D patch convolution applied to each frame."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv3d(
            in_channels,
            embed_dim,
            kernel_size=(1, patch_size, patch_size),
            stride=(1, patch_size, patch_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, T, H, W]`` -> ``[B, T, N, E]`` with ``N = (H/p) * (W/p)`` patches, row-major."""
        x = self.proj(x)  # (B, E, T, H/p, W/p)
        return rearrange(x, "b e t h w -> b t (h w) e")


class VideoViT(nn.Module):
    """Encodes each frame of a clip independently into a latent vector: patch embedding,
    transformer blocks with 2-D RoPE over the patches of one frame, a final LayerNorm and a pooling
    of the patches into one vector (ARCHITECTURE.md's mean, or a flatten that keeps their layout)."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        if cfg.frame_size % cfg.patch_size:
            raise ValueError(f"frame_size {cfg.frame_size} is not divisible by patch_size {cfg.patch_size}")
        if cfg.embed_dim % cfg.num_heads:
            raise ValueError(f"embed_dim {cfg.embed_dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        self.patch_embed = FactorizedPatchEmbed(cfg.in_channels, cfg.embed_dim, cfg.patch_size)
        self.rope = RotaryEmbedding2D(cfg.embed_dim // cfg.num_heads)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.embed_dim, cfg.num_heads, cfg.mlp_ratio, causal=False) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.embed_dim)
        if cfg.pool not in ("mean", "flatten"):
            raise ValueError(f"pool must be 'mean' or 'flatten', got {cfg.pool!r}")
        self.flatten_proj = nn.Linear(cfg.embed_dim, cfg.flatten_dim) if cfg.pool == "flatten" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float ``[B, C, T, H, W]`` with pixel values already scaled to ``[0, 1]`` -> ``[B, T, latent_dim]``."""
        B, C, T, H, W = x.shape
        p = self.cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"frame {H}x{W} is not divisible into {p}x{p} patches")
        tokens = self.patch_embed(x)  # (B, T, N, E)
        tokens = rearrange(tokens, "b t n e -> (b t) n e")
        rope = self.rope(H // p, W // p)
        for block in self.blocks:
            tokens = block(tokens, rope)
        tokens = rearrange(self.norm(tokens), "(b t) n e -> b t n e", b=B)
        if self.flatten_proj is None:
            return tokens.mean(dim=2)  # (B, T, E)
        return rearrange(self.flatten_proj(tokens), "b t n c -> b t (n c)")  # (B, T, N * flatten_dim)
