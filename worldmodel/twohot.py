"""Scale-robust targets: symlog and two-hot encoding over symlog-spaced bins (as in DreamerV3)."""

from __future__ import annotations

import torch


def symlog(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.log1p(x.abs())


def symexp(x: torch.Tensor) -> torch.Tensor:
    return torch.sign(x) * torch.expm1(x.abs())


def make_bins(num_bins: int, limit: float) -> torch.Tensor:
    """``num_bins`` evenly spaced bin centres over ``[-limit, limit]`` in symlog space."""
    return torch.linspace(-limit, limit, num_bins)


def twohot(x: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Encode raw values ``x`` (any shape ``S``) as two-hot vectors ``[*S, num_bins]`` over ``bins``
    (symlog space): the weight is split between the two bins around ``symlog(x)``."""
    y = symlog(x).clamp(bins[0], bins[-1])
    hi = torch.searchsorted(bins, y.contiguous(), right=False).clamp(1, len(bins) - 1)
    lo = hi - 1
    w_hi = (y - bins[lo]) / (bins[hi] - bins[lo])
    out = torch.zeros(*x.shape, len(bins), device=x.device, dtype=torch.float32)
    out.scatter_(-1, lo.unsqueeze(-1), (1 - w_hi).unsqueeze(-1))
    out.scatter_add_(-1, hi.unsqueeze(-1), w_hi.unsqueeze(-1))
    return out


def twohot_decode(logits: torch.Tensor, bins: torch.Tensor) -> torch.Tensor:
    """Expected raw value of the distribution given by ``logits`` ``[*S, num_bins]`` -> ``[*S]``."""
    return symexp((logits.softmax(-1) * bins).sum(-1))
