"""Video ViT encoder: each frame of a clip -> one latent vector."""

from __future__ import annotations

from dataclasses import dataclass

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
    transformer blocks with 2-D RoPE over the patches of one frame, a final LayerNorm and a mean
    over patches."""

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` float ``[B, C, T, H, W]`` with pixel values already scaled to ``[0, 1]`` -> ``[B, T, E]``."""
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
        return tokens.mean(dim=2)
