"""Actor-critic over the world model's latent history."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from worldmodel.twohot import symexp


@dataclass
class PolicyConfig:
    """Sizes of the actor-critic."""

    history: int = 3
    """How many of the latest latents the policy sees (more than one, so it sees motion)."""
    hidden_dim: int = 256
    """Width of the actor's and the critic's hidden layers."""
    layers: int = 2
    """Hidden layers of each MLP."""


def _mlp(inp: int, hidden: int, out: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.SiLU()]
    mods.append(nn.Linear(hidden, out))
    return nn.Sequential(*mods)


def sample_actions(logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Actions ``[B]`` drawn from ``softmax(logits [B, A])`` by an exponential race (Gumbel-max): what a
    CUDA graph can replay (``torch.multinomial`` checks its input on the host), and from a ``generator``
    of its own where a thread acts beside the learner."""
    race = torch.empty_like(logits).exponential_(generator=generator)
    return (logits - race.log()).argmax(-1)


class ActorCritic(nn.Module):
    """Separate actor and critic MLPs on the flattened last ``history`` latents. The critic predicts
    values in symlog space, so one setting serves games whose returns differ by orders of magnitude."""

    def __init__(self, cfg: PolicyConfig, embed_dim: int, num_actions: int) -> None:
        super().__init__()
        self.cfg = cfg
        inp = cfg.history * embed_dim
        self.norm = nn.LayerNorm(inp)
        self.actor = _mlp(inp, cfg.hidden_dim, num_actions, cfg.layers)
        self.critic = _mlp(inp, cfg.hidden_dim, 1, cfg.layers)
        nn.init.zeros_(self.critic[-1].weight)
        nn.init.zeros_(self.critic[-1].bias)
        # A near-uniform initial policy: small last-layer weights.
        nn.init.normal_(self.actor[-1].weight, std=0.01)
        nn.init.zeros_(self.actor[-1].bias)

    def features(self, window: torch.Tensor) -> torch.Tensor:
        """Latent window ``[B, K, E]`` (K >= history) -> ``[B, history * E]``."""
        B, K, E = window.shape
        if K < self.cfg.history:
            raise ValueError(f"policy needs {self.cfg.history} latents of history, got a window of {K}")
        return self.norm(window[:, -self.cfg.history :].reshape(B, -1))

    def forward(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent window ``[B, K, E]`` -> action logits ``[B, A]`` and value in symlog space ``[B]``."""
        h = self.features(window)
        return self.actor(h), self.critic(h)[:, 0]

    def value(self, window: torch.Tensor) -> torch.Tensor:
        """Value estimate ``[B]`` in the reward's own scale."""
        return symexp(self.critic(self.features(window))[:, 0])

    @torch.no_grad()
    def act(self, window: torch.Tensor, greedy: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample (or take the most likely) actions ``[B]`` for windows ``[B, K, E]``; with ``generator``,
        drawn by :func:`sample_actions` from it."""
        logits, _ = self(window)
        if greedy:
            return logits.argmax(-1)
        if generator is not None:
            return sample_actions(logits, generator)
        return torch.distributions.Categorical(logits=logits).sample()
