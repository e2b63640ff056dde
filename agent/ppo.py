"""PPO on imagined rollouts, entirely in torch on the training device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from agent.policy import ActorCritic
from agent.returns import gae
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.twohot import symexp, symlog


@dataclass
class PPOConfig:
    """PPO settings for learning in imagination."""

    horizon: int = 15
    """Imagined steps per rollout."""
    num_starts: int = 256
    """Imagined episodes per rollout, each started from a real context sampled from replay."""
    gamma: float = 0.985
    """Discount per imagined step."""
    lam: float = 0.95
    """GAE lambda."""
    clip: float = 0.2
    """PPO ratio clipping."""
    epochs: int = 2
    """Passes over one rollout."""
    minibatches: int = 4
    """Minibatches per pass over a rollout."""
    entropy_coef: float = 3e-3
    """Weight of the entropy bonus."""
    value_coef: float = 0.5
    """Weight of the critic's loss."""
    lr: float = 3e-4
    """Adam learning rate of the actor-critic."""
    grad_clip: float = 0.5
    """Clip the actor-critic's global gradient norm to this value."""
    return_scale_decay: float = 0.99
    """EMA decay of the 5th-95th percentile range of returns that advantages are divided by."""
    critic_targets: str = "imagined"
    """What the critic learns from: ``imagined`` (the lambda-returns of the imagined rollouts) or ``real``
    (the discounted returns of real replay windows, :meth:`PPO.real_update`; the advantages of imagined
    steps are then bootstrapped by a critic that has seen how real lives end)."""
    self_imitation: float = 0.0
    """With ``critic_targets == "real"``: weight of self-imitation on the same real windows (Oh et al., 2018),
    raising the probability of the action taken there by how much its real return beat the critic,
    ``max(G - V, 0)``. Imagination does not tell a Breakout player that follows the ball from one that
    does not (docs/breakout_world_model.md); the real returns do. 0 = off."""


@dataclass
class Rollout:
    """``H`` imagined steps of ``B`` episodes, time-major."""

    windows: torch.Tensor  # (H+1, B, K, E)
    actions: torch.Tensor  # (H, B)
    logprobs: torch.Tensor  # (H, B)
    values: torch.Tensor  # (H+1, B) in the reward's scale
    rewards: torch.Tensor  # (H, B)
    continues: torch.Tensor  # (H, B) predicted probability of going on
    truncated: torch.Tensor  # (H, B)

    @property
    def weights(self) -> torch.Tensor:
        """``[H, B]``: probability that the imagined episode is still running at step ``t``."""
        alive = torch.cumprod(self.continues, dim=0)
        return torch.cat([torch.ones_like(alive[:1]), alive[:-1]], dim=0)

    def imagined_return(self) -> torch.Tensor:
        """Mean over episodes of the reward summed over the horizon (weighted by being alive)."""
        return (self.rewards * self.weights).sum(0).mean()


class PPO:
    """Owns the policy's optimizer and the running return scale."""

    def __init__(
        self,
        policy: ActorCritic,
        cfg: PPOConfig,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        agree: Callable[[bool], bool] | None = None,
    ) -> None:
        """``wrap`` (e.g. DistributedDataParallel) wraps the policy for its gradient steps only; ``agree``
        turns this rank's "the step is finite" into every rank's verdict."""
        self.policy = policy
        self.agree = agree
        self.train_policy = wrap(policy) if wrap is not None else policy
        self.cfg = cfg
        self.optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
        self.return_scale = torch.ones(())
        self.updates = 0
        self.skipped = 0
        self.consecutive_skipped = 0

    @torch.no_grad()
    def rollout(self, env: ImaginedEnv, start: torch.Tensor) -> Rollout:
        """Play the policy in ``env`` for its horizon from real frames ``[B, K, H, W]`` or latent
        windows ``[B, K, E]``."""
        window = env.reset(start)
        windows, actions, logprobs, rewards, conts, truncs = [window], [], [], [], [], []
        for _ in range(env.horizon):
            logits, _ = self.policy(window)
            dist = torch.distributions.Categorical(logits=logits)
            a = dist.sample()
            window, r, c, trunc, _ = env.step(a)
            windows.append(window)
            actions.append(a)
            logprobs.append(dist.log_prob(a))
            rewards.append(r)
            conts.append(c)
            truncs.append(trunc)
        ws = torch.stack(windows)
        H1, B = ws.shape[:2]
        values = self.policy.value(ws.flatten(0, 1)).view(H1, B)
        return Rollout(
            ws,
            torch.stack(actions),
            torch.stack(logprobs),
            values,
            torch.stack(rewards),
            torch.stack(conts),
            torch.stack(truncs),
        )

    def real_update(
        self, windows: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One gradient step on real replay windows ``[B, K, E]``, the actions taken at their last latent ``[B]``
        and the real discounted returns from there ``[B]`` (``critic_targets == "real"``): the critic toward
        the returns, and with ``self_imitation`` > 0 the actor toward the actions whose return beat the
        critic. Skipped, on every rank, if not finite."""
        self.policy.train()
        logits, v = self.train_policy(windows)
        value_loss = F.mse_loss(v, symlog(returns))
        loss = self.cfg.value_coef * value_loss
        metrics = {"policy/real_value_loss": value_loss.detach()}
        if self.cfg.self_imitation > 0:
            beat = (returns - symexp(v.detach())).clamp(min=0)
            logp = torch.distributions.Categorical(logits=logits).log_prob(actions)
            loss = loss - self.cfg.self_imitation * (logp * beat).mean()
            metrics["policy/self_imitation_advantage"] = beat.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if self.agree(finite) if self.agree is not None else finite:
            self.optimizer.step()
        return metrics

    def update(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """PPO epochs over one rollout; returns detached metrics."""
        cfg = self.cfg
        adv, ret = gae(ro.rewards, ro.values[:-1], ro.values[1:], ro.continues, ro.truncated, cfg.gamma, cfg.lam)
        # Divide by the spread of returns, never below 1: unlike per-batch std normalisation, this does
        # not blow up the noise advantages of a model that predicts no reward yet.
        lo, hi = torch.quantile(ret.flatten().float(), torch.tensor([0.05, 0.95], device=ret.device))
        self.return_scale = self.return_scale.to(ret.device)
        self.return_scale = cfg.return_scale_decay * self.return_scale + (1 - cfg.return_scale_decay) * (hi - lo)
        adv_n = adv / self.return_scale.clamp(min=1.0)

        H, B = ro.actions.shape
        flat = {
            "windows": ro.windows[:-1].flatten(0, 1),
            "actions": ro.actions.flatten(),
            "logprobs": ro.logprobs.flatten(),
            "adv": adv_n.flatten(),
            "ret": symlog(ret).flatten(),
            "w": ro.weights.flatten(),
        }
        n = H * B
        mb = max(1, n // cfg.minibatches)
        stats: dict[str, list[torch.Tensor]] = {"pg": [], "v": [], "ent": [], "kl": [], "clipfrac": []}
        self.policy.train()
        skipped = 0
        for _ in range(cfg.epochs):
            perm = torch.randperm(n, device=ro.actions.device)
            for i in range(0, n, mb):
                j = perm[i : i + mb]
                logits, v = self.train_policy(flat["windows"][j])
                dist = torch.distributions.Categorical(logits=logits)
                logp = dist.log_prob(flat["actions"][j])
                ratio = (logp - flat["logprobs"][j]).exp()
                a, w = flat["adv"][j], flat["w"][j]
                pg = -(torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a) * w).mean()
                vloss = (F.mse_loss(v, flat["ret"][j], reduction="none") * w).mean()
                ent = (dist.entropy() * w).mean()
                loss = pg - cfg.entropy_coef * ent
                if cfg.critic_targets == "imagined":  # else the critic learns in real_update only
                    loss = loss + cfg.value_coef * vloss
                # Backward even on a non-finite loss: under DDP every rank must join every gradient
                # average; the non-finite norm that follows skips the step on all of them.
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), cfg.grad_clip)
                finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
                if not (self.agree(finite) if self.agree is not None else finite):
                    skipped += 1
                    continue
                self.optimizer.step()
                with torch.no_grad():
                    stats["pg"].append(pg.detach())
                    stats["v"].append(vloss.detach())
                    # The bonus above is scaled by the alive weights; report the policy's own entropy
                    # on the states it is likely to reach, comparable to log(num_actions).
                    stats["ent"].append(((dist.entropy() * w).sum() / w.sum().clamp(min=1e-6)).detach())
                    stats["kl"].append((flat["logprobs"][j] - logp).mean().detach())
                    stats["clipfrac"].append(((ratio - 1).abs() > cfg.clip).float().mean())
        self.updates += 1
        if skipped:
            self.skipped += 1
            self.consecutive_skipped += 1
        else:
            self.consecutive_skipped = 0
        nan = torch.tensor(float("nan"))
        mean = {k: torch.stack(v).mean() if v else nan for k, v in stats.items()}
        return {
            "policy/skipped_updates": torch.tensor(float(self.skipped)),
            "policy/pg_loss": mean["pg"],
            "policy/value_loss": mean["v"],
            "policy/entropy": mean["ent"],
            "policy/approx_kl": mean["kl"],
            "policy/clipfrac": mean["clipfrac"],
            "policy/return_scale": self.return_scale.detach().clone(),
            "policy/advantage_abs": adv.abs().mean(),
            "imagination/return": ro.imagined_return(),
            "imagination/reward_mean": ro.rewards.mean(),
            "imagination/continue_mean": ro.continues.mean(),
        }
