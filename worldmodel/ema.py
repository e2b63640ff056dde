"""A slowly updated copy of a model: its weights follow the trained model's by an exponential moving average."""

from __future__ import annotations

import copy
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def make_slow_copy(model: M) -> M:
    """A frozen deep copy of ``model`` to be moved with :func:`ema_update_`."""
    slow = copy.deepcopy(model)
    slow.requires_grad_(False)
    return slow


@torch.no_grad()
def ema_update_(slow: nn.Module, fast: nn.Module, decay: float) -> None:
    """``slow <- decay * slow + (1 - decay) * fast`` for every parameter and floating-point buffer;
    other buffers (flags, counts) are copied. ``decay`` 0 makes ``slow`` an exact copy."""
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
    slow_params, fast_params = list(slow.parameters()), list(fast.parameters())
    if len(slow_params) != len(fast_params):
        raise ValueError("slow and fast models have different parameters")
    torch._foreach_lerp_(slow_params, fast_params, 1.0 - decay)
    for s, f in zip(slow.buffers(), fast.buffers(), strict=True):
        if s.is_floating_point():
            s.lerp_(f, 1.0 - decay)
        else:
            s.copy_(f)
