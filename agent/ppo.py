"""PPO on imagined rollouts, entirely in torch on the training device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from agent.policy import ActorCritic, sample_actions
from agent.returns import gae
from worldmodel.graphs import GraphedStep, SkipCounts, adapt_loaded_optimizer, step_unless_nonfinite
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


def categorical(logits: torch.Tensor) -> torch.distributions.Categorical:
    """The policy's action distribution, without argument checks: they read values on the host, which
    a CUDA graph cannot do (the logits come from a network; they are checked as the loss is)."""
    return torch.distributions.Categorical(logits=logits, validate_args=False)


class PPO:
    """Owns the policy's optimizer and the running return scale."""

    def __init__(
        self,
        policy: ActorCritic,
        cfg: PPOConfig,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        agree: Callable[[bool], bool] | None = None,
        graphs: bool = False,
    ) -> None:
        """``wrap`` (e.g. DistributedDataParallel) wraps the policy for its gradient steps only; ``agree``
        turns this rank's "the step is finite" into every rank's verdict. ``graphs``: the rollout, the
        update and the real-return step each replay as one CUDA graph (:class:`GraphedStep`; on the CPU
        the same steps without capture), with a fused Adam, skips decided on the device and minibatches
        drawn there; an update with a skipped minibatch reports that minibatch's figures too."""
        if graphs and (wrap is not None or agree is not None):
            raise ValueError("graphed PPO runs in one process")
        self.policy = policy
        self.agree = agree
        self.train_policy = wrap(policy) if wrap is not None else policy
        self.cfg = cfg
        self.graphs = graphs
        device = next(policy.parameters()).device
        if graphs:
            lr = torch.tensor(cfg.lr, device=device)
            self.optimizer = torch.optim.Adam(policy.parameters(), lr=lr, eps=1e-5, fused=True, capturable=True)
            self.optimizer.found_inf = torch.zeros((), device=device)
            self.return_scale = torch.ones((), device=device)
            self._graphed = {
                "rollout": GraphedStep(self._rollout_tensors),
                "update": GraphedStep(self._device_update),
                "real": GraphedStep(self._device_real_update),
            }
        else:
            self.optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
            self.return_scale = torch.ones(())
        self.quantiles = torch.tensor([0.05, 0.95], device=device)
        self._env: ImaginedEnv | None = None
        """The one env a graphed rollout plays in (its world model is in the graph)."""
        self.updates = 0
        self.skips = SkipCounts(device if graphs else None)

    @property
    def skipped(self) -> int:
        """Updates with a skipped (non-finite) minibatch (a host sync on the graphed path)."""
        return self.skips.total

    @property
    def consecutive_skipped(self) -> int:
        return self.skips.run

    def load_state(self, optimizer: dict, return_scale: torch.Tensor) -> None:
        """The optimizer's state and the return scale from a checkpoint of either path."""
        if self.graphs and any(g.captured for g in self._graphed.values()):
            raise RuntimeError("load PPO's state before the first graphed update")
        self.optimizer.load_state_dict(optimizer)
        adapt_loaded_optimizer(self.optimizer, self.graphs, self.quantiles.device)
        if self.graphs:
            self.return_scale.copy_(return_scale)
        else:
            self.return_scale = return_scale.to(self.quantiles.device)

    @torch.no_grad()
    def rollout(self, env: ImaginedEnv, start: torch.Tensor) -> Rollout:
        """Play the policy in ``env`` for its horizon from real frames ``[B, K, H, W]`` or latent
        windows ``[B, K, E]``."""
        if self.graphs:
            if self._graphed["rollout"].calls and env is not self._env:
                raise ValueError("a graphed PPO rolls out in the one ImaginedEnv it was first given")
            window = env.reset(start)  # frames are encoded here, outside the graph
            self._env = env
            return Rollout(*self._graphed["rollout"](window))
        return Rollout(*self._rollout_tensors(start, env))

    def _rollout_tensors(self, start: torch.Tensor, env: ImaginedEnv | None = None) -> tuple[torch.Tensor, ...]:
        """:class:`Rollout`'s fields, in order, of a rollout in ``env`` (default: the graphed one's)."""
        env = env if env is not None else self._env
        with torch.no_grad():
            window = env.reset(start)
            windows, actions, logprobs, rewards, conts, truncs = [window], [], [], [], [], []
            for _ in range(env.horizon):
                logits, _ = self.policy(window)
                dist = categorical(logits)
                a = sample_actions(logits) if self.graphs else dist.sample()
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
            return (
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
        if self.graphs:
            return self._graphed["real"](windows, actions, returns)
        loss, metrics = self._real_loss(windows, actions, returns)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.parameters(), self.cfg.grad_clip)
        finite = bool(torch.isfinite(loss) and torch.isfinite(grad_norm))
        if self.agree(finite) if self.agree is not None else finite:
            self.optimizer.step()
        return metrics

    def _real_loss(
        self, windows: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        self.policy.train()
        logits, v = self.train_policy(windows)
        value_loss = F.mse_loss(v, symlog(returns))
        loss = self.cfg.value_coef * value_loss
        metrics = {"policy/real_value_loss": value_loss.detach()}
        if self.cfg.self_imitation > 0:
            beat = (returns - symexp(v.detach())).clamp(min=0)
            logp = categorical(logits).log_prob(actions)
            loss = loss - self.cfg.self_imitation * (logp * beat).mean()
            metrics["policy/self_imitation_advantage"] = beat.mean()
        return loss, metrics

    def _device_real_update(
        self, windows: torch.Tensor, actions: torch.Tensor, returns: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        loss, metrics = self._real_loss(windows, actions, returns)
        step_unless_nonfinite(self.optimizer, loss, self.policy.parameters(), self.cfg.grad_clip)
        return metrics

    def _advantages(self, ro: Rollout) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GAE advantages ``[H, B]`` of a rollout, and its steps flattened for minibatches, the advantages
        divided by the running spread of returns (updated here)."""
        cfg = self.cfg
        adv, ret = gae(ro.rewards, ro.values[:-1], ro.values[1:], ro.continues, ro.truncated, cfg.gamma, cfg.lam)
        # Divide by the spread of returns, never below 1: unlike per-batch std normalisation, this does
        # not blow up the noise advantages of a model that predicts no reward yet.
        lo, hi = torch.quantile(ret.flatten().float(), self.quantiles.to(ret.device))
        scale = cfg.return_scale_decay * self.return_scale.to(ret.device) + (1 - cfg.return_scale_decay) * (hi - lo)
        if self.graphs:
            self.return_scale.copy_(scale)  # in place: the graph reads and writes one tensor
        else:
            self.return_scale = scale
        flat = {
            "windows": ro.windows[:-1].flatten(0, 1),
            "actions": ro.actions.flatten(),
            "logprobs": ro.logprobs.flatten(),
            "adv": (adv / self.return_scale.clamp(min=1.0)).flatten(),
            "ret": symlog(ret).flatten(),
            "w": ro.weights.flatten(),
        }
        return adv, flat

    def _minibatch_loss(
        self, flat: dict[str, torch.Tensor], j: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The clipped PPO loss on the flattened steps ``j``, and its figures (detached)."""
        cfg = self.cfg
        logits, v = self.train_policy(flat["windows"][j])
        dist = categorical(logits)
        logp = dist.log_prob(flat["actions"][j])
        ratio = (logp - flat["logprobs"][j]).exp()
        a, w = flat["adv"][j], flat["w"][j]
        pg = -(torch.min(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a) * w).mean()
        vloss = (F.mse_loss(v, flat["ret"][j], reduction="none") * w).mean()
        ent = (dist.entropy() * w).mean()
        loss = pg - cfg.entropy_coef * ent
        if cfg.critic_targets == "imagined":  # else the critic learns in real_update only
            loss = loss + cfg.value_coef * vloss
        with torch.no_grad():
            stats = {
                "pg": pg.detach(),
                "v": vloss.detach(),
                # The bonus above is scaled by the alive weights; report the policy's own entropy
                # on the states it is likely to reach, comparable to log(num_actions).
                "ent": ((dist.entropy() * w).sum() / w.sum().clamp(min=1e-6)).detach(),
                "kl": (flat["logprobs"][j] - logp).mean().detach(),
                "clipfrac": ((ratio - 1).abs() > cfg.clip).float().mean(),
            }
        return loss, stats

    def update(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """PPO epochs over one rollout; returns detached metrics."""
        self.updates += 1
        if self.graphs:
            return self._graphed["update"](*(getattr(ro, f.name) for f in fields(ro)))
        return self._epochs(ro)

    def _device_update(self, *ro_fields: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`update` with the minibatches drawn and the skips decided on the device."""
        return self._epochs(Rollout(*ro_fields))

    def _epochs(self, ro: Rollout) -> dict[str, torch.Tensor]:
        """The PPO epochs of :meth:`update`: on the graphed path minibatches are drawn and skips decided
        on the device (a skipped minibatch's figures are reported too), else on the host."""
        cfg, device = self.cfg, ro.actions.device
        adv, flat = self._advantages(ro)
        n = ro.actions.numel()
        mb = max(1, n // cfg.minibatches)
        stats: dict[str, list[torch.Tensor]] = {"pg": [], "v": [], "ent": [], "kl": [], "clipfrac": []}
        self.policy.train()
        skipped: int | torch.Tensor = torch.zeros((), device=device) if self.graphs else 0
        for _ in range(cfg.epochs):
            perm = torch.rand(n, device=device).argsort() if self.graphs else torch.randperm(n, device=device)
            for i in range(0, n, mb):
                loss, mb_stats = self._minibatch_loss(flat, perm[i : i + mb])
                if self.graphs:
                    step_unless_nonfinite(self.optimizer, loss, self.policy.parameters(), cfg.grad_clip)
                    skipped = torch.maximum(skipped, self.optimizer.found_inf)
                else:
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
                for k, v in mb_stats.items():
                    stats[k].append(v)
        self.skips.record(skipped if self.graphs else skipped > 0)
        # Empty only where every minibatch was skipped on the host.
        mean = {k: torch.stack(v).mean() if v else torch.tensor(float("nan")) for k, v in stats.items()}
        return self._update_metrics(ro, adv, mean, self.skips.total_tensor())

    def _update_metrics(
        self, ro: Rollout, adv: torch.Tensor, mean: dict[str, torch.Tensor], skipped: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        return {
            "policy/skipped_updates": skipped,
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
