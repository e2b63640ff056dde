"""Transformer building blocks shared by the world-model components: rotary position embeddings
(1-D over sequence positions, 2-D over patch rows and columns), self-attention and pre-norm blocks.

Rotary tables follow the "rotate half" convention: channel ``i`` of a head is rotated together with
channel ``i + D/2`` by the angle ``angles[..., i]``, so ``cos``/``sin`` tables are ``[L, D]`` with the
``D/2`` angles repeated twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

RopeTables = tuple[torch.Tensor, torch.Tensor]


def _inverse_frequencies(dim: int, theta: float) -> torch.Tensor:
    """``dim // 2`` frequencies ``theta ** (-2i / dim)``, the standard RoPE spectrum for ``dim`` channels."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _tables_from_angles(angles: torch.Tensor) -> RopeTables:
    """``angles [L, D/2]`` -> ``(cos, sin)``, each ``[L, D]``."""
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


class RotaryEmbedding1D(nn.Module):
    """RoPE over sequence positions for heads of ``head_dim`` channels; returns ``(cos, sin)`` tables."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"1-D RoPE needs an even head_dim, got {head_dim}")
        self.head_dim = head_dim
        self.register_buffer("inv_freq", _inverse_frequencies(head_dim, theta), persistent=False)

    def at_positions(self, positions: torch.Tensor) -> RopeTables:
        """Tables for arbitrary positions ``[L]`` -> ``(cos, sin)``, each ``[L, head_dim]``."""
        angles = positions.to(self.inv_freq).unsqueeze(-1) * self.inv_freq  # (L, D/2)
        return _tables_from_angles(angles)

    def forward(self, seq_len: int) -> RopeTables:
        """Tables for positions ``0 .. seq_len-1``, each ``[seq_len, head_dim]``."""
        return self.at_positions(torch.arange(seq_len, device=self.inv_freq.device))


class RotaryEmbedding2D(nn.Module):
    """2-D RoPE over a patch grid: half of each head's channels rotate with the patch's row index and
    half with its column index (each half uses the standard spectrum for ``head_dim / 2`` channels).
    Returns ``(cos, sin)`` tables."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        self.head_dim = head_dim
        self.register_buffer("inv_freq", _inverse_frequencies(head_dim // 2, theta), persistent=False)

    def at_positions(self, rows: torch.Tensor, cols: torch.Tensor) -> RopeTables:
        """Tables for arbitrary patch positions ``rows [L]``, ``cols [L]`` -> ``(cos, sin)``, each
        ``[L, head_dim]``."""
        row_angles = rows.to(self.inv_freq).unsqueeze(-1) * self.inv_freq  # (L, D/4)
        col_angles = cols.to(self.inv_freq).unsqueeze(-1) * self.inv_freq  # (L, D/4)
        return _tables_from_angles(torch.cat([row_angles, col_angles], dim=-1))

    def forward(self, grid_h: int, grid_w: int) -> RopeTables:
        """Tables for a ``grid_h x grid_w`` grid flattened row-major (``(h w)``), each ``[h*w, head_dim]``."""
        device = self.inv_freq.device
        rows, cols = torch.meshgrid(
            torch.arange(grid_h, device=device), torch.arange(grid_w, device=device), indexing="ij"
        )
        return self.at_positions(rows.flatten(), cols.flatten())


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(q_or_k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``[..., L, D]`` by the tables ``cos``/``sin`` ``[L, D]``."""
    return q_or_k * cos.to(q_or_k.dtype) + _rotate_half(q_or_k) * sin.to(q_or_k.dtype)


class MultiHeadSelfAttention(nn.Module):
    """Multi-head self-attention; RoPE (when tables are given) rotates queries and keys only."""

    def __init__(self, dim: int, num_heads: int, causal: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.causal = causal
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _queries_keys_values(
        self, x: torch.Tensor, rope: RopeTables | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return q, k, v  # each (B, heads, N, D)

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        """``x [B, N, E]``, ``rope`` tables ``[N, head_dim]`` -> ``[B, N, E]``."""
        q, k, v = self._queries_keys_values(x, rope)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, N, D)
        return self.proj(rearrange(out, "b h n d -> b n (h d)"))

    def attention_scores(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        """Pre-softmax scores ``q·k / sqrt(head_dim)`` with RoPE applied and no causal mask,
        ``x [B, N, E]`` -> ``[B, heads, N, N]`` (for tests and inspection)."""
        q, k, _ = self._queries_keys_values(x, rope)
        return q @ k.transpose(-2, -1) * self.head_dim**-0.5


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))`` then ``x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, causal: bool = False) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadSelfAttention(dim, num_heads, causal=causal)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, rope: RopeTables | None = None) -> torch.Tensor:
        """``x [B, N, E]``, ``rope`` tables ``[N, head_dim]`` or ``None`` -> ``[B, N, E]``."""
        x = x + self.attn(self.norm1(x), rope)
        return x + self.mlp(self.norm2(x))


class RunningStandardizer(nn.Module):
    """Standardizes each feature with a running (EMA) mean and variance of what ``update`` saw.

    The heads read positions of small objects from latents whose informative directions have
    small variance next to a large common offset; standardized, a head learned catch vs miss on
    Catch in ~1.2k steps at 0.99 accuracy on rewarded steps, vs 0.73 raw (frozen latents, same head)."""

    def __init__(self, dim: int, momentum: float = 0.01, eps: float = 1e-4) -> None:
        super().__init__()
        self.momentum = momentum
        self.eps = eps
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("var", torch.ones(dim))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Moves the statistics toward those of ``x`` ``[..., dim]`` (the first call copies them)."""
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        # torch.where rather than an if on the flag: no host sync, one graph under torch.compile.
        weight = torch.where(self.initialized, self.momentum, 1.0)
        self.mean.lerp_(flat.mean(0), weight)
        self.var.lerp_(flat.var(0, unbiased=False), weight)
        self.initialized.fill_(True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., dim]`` -> the same shape, standardized."""
        return (x - self.mean) * torch.rsqrt(self.var + self.eps)
