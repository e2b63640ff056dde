"""GAE and discounted returns against explicit sums."""

from __future__ import annotations

import torch

from agent.returns import discounted_returns, gae


def explicit_gae(r, v, nv, c, tr, gamma, lam):
    """A_t = sum_l (gamma*lam)^l * prod(continue & not-truncated up to l) * delta_{t+l}, by brute force."""
    T, B = r.shape
    out = torch.zeros(T, B, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            total, factor = 0.0, 1.0
            for k in range(t, T):
                delta = r[k, b] + gamma * c[k, b] * nv[k, b] - v[k, b]
                total += factor * delta
                factor *= gamma * lam * c[k, b] * (1.0 - float(tr[k, b]))
            out[t, b] = total
    return out


def test_gae_matches_explicit_sum_with_terminals_and_truncations() -> None:
    g = torch.Generator().manual_seed(0)
    T, B = 12, 5
    r = torch.randn(T, B, generator=g, dtype=torch.float64)
    v = torch.randn(T, B, generator=g, dtype=torch.float64)
    nv = torch.randn(T, B, generator=g, dtype=torch.float64)
    c = (torch.rand(T, B, generator=g) > 0.2).double()
    c[3, 1] = 0.37  # a soft (imagined) continue probability
    tr = torch.rand(T, B, generator=g) > 0.85
    adv, ret = gae(r, v, nv, c, tr, 0.97, 0.9)
    torch.testing.assert_close(adv, explicit_gae(r, v, nv, c, tr, 0.97, 0.9))
    torch.testing.assert_close(ret, adv + v)


def test_terminated_and_truncated_differ() -> None:
    r = torch.zeros(1, 1)
    v = torch.zeros(1, 1)
    nv = torch.full((1, 1), 10.0)
    adv_term, _ = gae(r, v, nv, torch.zeros(1, 1), torch.zeros(1, 1, dtype=torch.bool), 0.9, 0.95)
    adv_trunc, _ = gae(r, v, nv, torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool), 0.9, 0.95)
    assert adv_term.item() == 0.0  # no bootstrap past a real end
    assert abs(adv_trunc.item() - 9.0) < 1e-6  # a cut-off episode still bootstraps


def test_lambda_one_gives_monte_carlo_returns() -> None:
    g = torch.Generator().manual_seed(1)
    T, B = 9, 3
    r = torch.randn(T, B, generator=g)
    v = torch.randn(T + 1, B, generator=g)
    c = (torch.rand(T, B, generator=g) > 0.3).float()
    tr = torch.zeros(T, B, dtype=torch.bool)
    _, ret = gae(r, v[:-1], v[1:], c, tr, 0.95, 1.0)
    torch.testing.assert_close(ret, discounted_returns(r, c, v[-1], 0.95), rtol=1e-5, atol=1e-5)
