"""Advantage and return estimators: pure functions over time-major tensors."""

from __future__ import annotations

import torch


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    next_values: torch.Tensor,
    continues: torch.Tensor,
    truncated: torch.Tensor,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over ``T`` steps of ``B`` parallel episodes.

    All inputs are ``[T, B]``: ``rewards[t]`` follows the action at state ``t``; ``values[t]`` is
    V(s_t); ``next_values[t]`` is V(s_{t+1}) (for a truncated step, the value of the state where
    it was cut off); ``continues[t]`` is 1 - terminated (a probability in imagination), which stops
    bootstrapping; ``truncated[t]`` stops the advantage recursion but still bootstraps.
    Returns ``(advantages, returns)``, both ``[T, B]``, with ``returns = advantages + values``.
    """
    T = rewards.shape[0]
    for name, x in (
        ("values", values),
        ("next_values", next_values),
        ("continues", continues),
        ("truncated", truncated),
    ):
        assert x.shape == rewards.shape, f"{name} has shape {tuple(x.shape)}, rewards {tuple(rewards.shape)}"
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[0])
    not_trunc = 1.0 - truncated.float()
    for t in reversed(range(T)):
        delta = rewards[t] + gamma * continues[t] * next_values[t] - values[t]
        last = delta + gamma * lam * continues[t] * not_trunc[t] * last
        adv[t] = last
    return adv, adv + values


@torch.no_grad()
def discounted_returns(
    rewards: torch.Tensor, continues: torch.Tensor, bootstrap: torch.Tensor, gamma: float
) -> torch.Tensor:
    """Monte-Carlo returns ``[T, B]`` of rewards ``[T, B]`` with continue flags and a bootstrap ``[B]``."""
    out = torch.zeros_like(rewards)
    running = bootstrap
    for t in reversed(range(rewards.shape[0])):
        running = rewards[t] + gamma * continues[t] * running
        out[t] = running
    return out
