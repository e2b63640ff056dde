"""``wm-agent bench graphs``: the graphed training steps (``--cuda-graphs``) against the eager ones.

On one fixed batch, from the same weights: the world-model update's loss and gradients, the
real-return step's gradients, and the graphed imagination rollout read back by the eager model
(each imagined latent, logprob and value recomputed from the rollout's own inputs); then the time
per step of each path. Off CUDA the graphed path runs without capture (the same static buffers).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from agent.config import TrainConfig, parse_config, preset, validate_config
from agent.dyna import REAL_VALUE_WINDOWS, sample_world_model_batches
from agent.machine import machine_info
from agent.policy import ActorCritic
from agent.ppo import PPO, Rollout, categorical
from agent.replay import ReplayBuffer
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.trainer import WorldModelTrainer
from worldmodel.world_model import WorldModel

WARMUP = 5
"""Calls before timing: the graphed path runs 3 eagerly, captures on the 4th and replays from then on."""


def synthetic_replay(cfg: TrainConfig, rng: np.random.Generator) -> ReplayBuffer:
    """One stream of random frames, large enough for every batch ``cfg`` draws, with a reward every 9
    steps and a lost life every 50 (for the oversampled batches)."""
    B, L, W = cfg.batch_size, cfg.world_model.seq_len, cfg.world_model.reward.window
    buf = ReplayBuffer(max(B, cfg.head_batch_size, cfg.dynamics_batch_size) * 4 * max(L, 2 * W), 1)
    for t in range(buf.slots):
        buf.add(
            rng.integers(0, 255, size=(1, 64, 64), dtype=np.uint8),
            np.array([t % 4]),
            np.array([float(t % 9 == 0)], np.float32),
            np.zeros(1, bool),
            np.zeros(1, bool),
            np.array([t % 50 == 49]),
            np.array([t == 0]),
        )
    return buf


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``|a - b| / |b|`` over all elements (Frobenius norms), 0 when both are 0."""
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30)) if b.norm() > 0 else float((a - b).norm())


def _grads(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]


def _compare_grads(got: list[torch.Tensor], want: list[torch.Tensor]) -> dict[str, float]:
    return {
        "grad_rel_err": _rel(torch.cat([g.flatten() for g in got]), torch.cat([w.flatten() for w in want])),
        "grad_rel_err_max_param": max(_rel(g, w) for g, w in zip(got, want, strict=True) if w.norm() > 0),
    }


def _time(step, n: int, device: torch.device) -> float:
    """Seconds per call of ``step()`` over ``n`` calls."""
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    _sync(device)
    return (time.perf_counter() - t0) / n


def _params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().double() for p in module.parameters()])


def world_model_check(cfg: TrainConfig, device: torch.device, updates: int) -> dict[str, float]:
    """After the graph was captured, one graphed update against an eager one from the same weights,
    optimizer state and learning-rate step on the same batch: loss, gradients and the step each made;
    then a batch with NaN rewards, which the graph must skip on the device; ms per update of both paths."""
    rng = np.random.default_rng(0)
    batches = sample_world_model_batches(synthetic_replay(cfg, rng), cfg, rng, device)
    torch.manual_seed(0)
    wm = WorldModel(cfg.world_model, num_actions=4).to(device)
    eager_wm = copy.deepcopy(wm)
    graphed = WorldModelTrainer(wm, cfg.optim, device, amp=cfg.amp, graphs=True)
    eager = WorldModelTrainer(eager_wm, cfg.optim, device, amp=cfg.amp)
    for _ in range(WARMUP - 1):
        graphed.update(*batches)
    before, optimizer = copy.deepcopy(wm.state_dict()), copy.deepcopy(graphed.optimizer.state_dict())
    eager_wm.load_state_dict(before)
    eager.load_optimizer_state(optimizer)
    eager.updates = graphed.updates  # the same warm-up learning rate
    start = _params(wm)
    metrics, _ = graphed.update(*batches)
    metrics_eager, _ = eager.update(*batches)
    result = {
        "captured_world_model": float(graphed.graphed.captured),
        "loss_graphed": float(metrics["world_model/loss"]),
        "loss_eager": float(metrics_eager["world_model/loss"]),
        "loss_rel_err": _rel(metrics["world_model/loss"], metrics_eager["world_model/loss"]),
        **_compare_grads(_grads(wm), _grads(eager_wm)),
        "step_rel_err": _rel(_params(wm) - start, _params(eager_wm) - start),
    }
    main, *rest = batches
    poisoned = dataclasses.replace(main, rewards=torch.full_like(main.rewards, float("nan")))
    kept = _params(wm)
    graphed.update(poisoned, *rest)
    result["nan_batch_skipped"] = float(graphed.skipped == 1 and torch.equal(_params(wm), kept))
    for _ in range(2):
        eager.update(*batches)
    result["eager_ms"] = 1e3 * _time(lambda: eager.update(*batches), updates, device)
    result["graphed_ms"] = 1e3 * _time(lambda: graphed.update(*batches), updates, device)
    return result


def policy_check(cfg: TrainConfig, device: torch.device, updates: int) -> dict[str, float]:
    """The graphed real-return step's gradients against an eager backward of the same weights; the
    graphed rollout recomputed step by step by the eager model; ms per rollout and PPO update of both."""
    torch.manual_seed(0)
    E, K, A = cfg.world_model.encoder.latent_dim, cfg.world_model.context, 4
    wm = WorldModel(cfg.world_model, num_actions=A).to(device)
    policy = ActorCritic(cfg.policy, E, A).to(device)
    eager_policy = copy.deepcopy(policy)
    graphed, eager = PPO(policy, cfg.ppo, graphs=True), PPO(eager_policy, cfg.ppo)
    env = ImaginedEnv(wm, cfg.ppo.horizon)
    starts = torch.randn(cfg.ppo.num_starts, K, E, device=device)
    windows = torch.randn(REAL_VALUE_WINDOWS, cfg.policy.history, E, device=device)
    actions = torch.randint(0, A, (REAL_VALUE_WINDOWS,), device=device)
    returns = torch.rand(REAL_VALUE_WINDOWS, device=device) * 4
    for _ in range(WARMUP - 1):
        graphed.real_update(windows, actions, returns)
    eager_policy.load_state_dict(policy.state_dict())
    graphed.real_update(windows, actions, returns)
    eager_policy.zero_grad(set_to_none=True)
    eager._real_loss(windows, actions, returns)[0].backward()
    torch.nn.utils.clip_grad_norm_(eager_policy.parameters(), cfg.ppo.grad_clip)
    result = {"real_step_" + k: v for k, v in _compare_grads(_grads(policy), _grads(eager_policy)).items()}
    kept = _params(policy)
    graphed.real_update(windows, actions, torch.full_like(returns, float("nan")))
    result["nan_real_step_skipped"] = float(torch.equal(_params(policy), kept))

    for _ in range(WARMUP):
        ro = graphed.rollout(env, starts)
    with torch.no_grad():  # every imagined step again, eagerly, from the graphed rollout's own inputs
        latent_err, logp_err = [], []
        for t in range(cfg.ppo.horizon):
            pred = wm.imagine_step(ro.windows[t], ro.actions[t])
            latent_err.append(_rel(ro.windows[t + 1][:, -1:], pred.latent))
            logp_err.append(_rel(ro.logprobs[t], categorical(policy(ro.windows[t])[0]).log_prob(ro.actions[t])))
        values = policy.value(ro.windows.flatten(0, 1)).view(ro.values.shape)
    result.update(
        {
            "rollout_latent_rel_err": max(latent_err),
            "rollout_logprob_rel_err": max(logp_err),
            "rollout_value_rel_err": _rel(ro.values, values),
        }
    )
    result.update(_ppo_update_check(cfg, policy, ro))
    for _ in range(WARMUP):
        graphed.update(ro)
    eager_ro = eager.rollout(env, starts)
    eager.update(eager_ro)
    result["rollout_eager_ms"] = 1e3 * _time(lambda: eager.rollout(env, starts), updates, device)
    result["rollout_graphed_ms"] = 1e3 * _time(lambda: graphed.rollout(env, starts), updates, device)
    result["ppo_update_eager_ms"] = 1e3 * _time(lambda: eager.update(eager_ro), updates, device)
    result["ppo_update_graphed_ms"] = 1e3 * _time(lambda: graphed.update(ro), updates, device)
    result["real_step_eager_ms"] = 1e3 * _time(lambda: eager.real_update(windows, actions, returns), updates, device)
    result["real_step_graphed_ms"] = 1e3 * _time(
        lambda: graphed.real_update(windows, actions, returns), updates, device
    )
    result.update({f"captured_{name}": float(step.captured) for name, step in graphed._graphed.items()})
    result["imagined_steps_per_s_graphed"] = cfg.ppo.num_starts * cfg.ppo.horizon / (result["rollout_graphed_ms"] / 1e3)
    return result


def _ppo_update_check(cfg: TrainConfig, policy: ActorCritic, ro: Rollout) -> dict[str, float]:
    """A graphed PPO update of one epoch on one minibatch (its order then does not matter), after capture,
    against an eager one from the same weights, optimizer state and return scale: the step each made."""
    one = dataclasses.replace(cfg.ppo, epochs=1, minibatches=1)
    graphed_policy, eager_policy = copy.deepcopy(policy), copy.deepcopy(policy)
    graphed, eager = PPO(graphed_policy, one, graphs=True), PPO(eager_policy, one)
    for _ in range(WARMUP - 1):
        graphed.update(ro)
    eager_policy.load_state_dict(graphed_policy.state_dict())
    eager.load_state(copy.deepcopy(graphed.optimizer.state_dict()), graphed.return_scale.clone())
    start = _params(graphed_policy)
    m_g, m_e = graphed.update(ro), eager.update(ro)
    return {
        "ppo_step_rel_err": _rel(_params(graphed_policy) - start, _params(eager_policy) - start),
        "ppo_pg_loss_rel_err": _rel(m_g["policy/pg_loss"], m_e["policy/pg_loss"]),
        "captured_ppo_check": float(graphed._graphed["update"].captured),
    }


def tolerance(cfg: TrainConfig, device: torch.device) -> float:
    """Relative error allowed between the paths: bf16 autocast's on CUDA, else fp32 round-off."""
    return 2e-2 if cfg.amp and device.type == "cuda" else 1e-4


def graphs_main(args: argparse.Namespace, device: torch.device) -> int:
    console = Console()
    cfg = preset(args.preset)
    if args.overrides:
        cfg = parse_config(args.overrides, cfg, "config overrides, as for wm-agent train")
    validate_config(cfg)
    tol = tolerance(cfg, device)
    info = machine_info(device)
    wm = world_model_check(cfg, device, args.updates)
    pol = policy_check(cfg, device, args.updates)
    errors = {k: v for part in (wm, pol) for k, v in part.items() if "rel_err" in k}
    # A parameter with a tiny gradient can differ by more in relative terms: reported, not judged.
    failed = sorted(k for k, v in errors.items() if not v <= tol and not k.endswith("max_param"))  # NaN fails
    failed += [k for part in (wm, pol) for k, v in part.items() if k.startswith("nan_") and not v]
    result = {
        "machine": info,
        "preset": args.preset,
        "overrides": args.overrides,
        "date": time.strftime("%Y-%m-%d"),
        "tolerance": tol,
        "world_model": wm,
        "policy": pol,
        "failed": failed,
    }
    table = Table(title=f"wm-agent bench graphs ({args.preset}, {info['device']}, tolerance {tol:g})")
    table.add_column("what")
    table.add_column("eager", justify="right")
    table.add_column("graphed", justify="right")
    table.add_row("world-model update, ms", f"{wm['eager_ms']:.2f}", f"{wm['graphed_ms']:.2f}")
    table.add_row("imagination rollout, ms", f"{pol['rollout_eager_ms']:.2f}", f"{pol['rollout_graphed_ms']:.2f}")
    table.add_row("PPO update, ms", f"{pol['ppo_update_eager_ms']:.2f}", f"{pol['ppo_update_graphed_ms']:.2f}")
    table.add_row("real-return step, ms", f"{pol['real_step_eager_ms']:.2f}", f"{pol['real_step_graphed_ms']:.2f}")
    for k, v in errors.items():
        table.add_row(f"relative error: {k}", "", f"{v:.2e}" + (" FAIL" if k in failed else ""))
    for k, v in {**wm, **pol}.items():
        if k.startswith("nan_") or (k.startswith("captured") and device.type == "cuda"):
            table.add_row(k.replace("_", " "), "", "yes" if v else "NO")
    console.print(table)
    if device.type == "cuda":
        captured = {k: v for part in (wm, pol) for k, v in part.items() if k.startswith("captured")}
        failed += [f"{k} (not captured)" for k, v in captured.items() if not v]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        console.print(f"written to {args.out}")
    if failed:
        console.print(f"[red]graphed and eager paths differ beyond {tol:g}: {', '.join(failed)}[/red]")
        return 1
    console.print(f"graphed and eager paths agree within {tol:g}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("graphs", help="the --cuda-graphs training steps against the eager ones: numerics and speed")
    g.add_argument("--device", default="auto")
    g.add_argument("--preset", default="atari100k")
    g.add_argument("--updates", type=int, default=20, help="timed calls of each step")
    g.add_argument("--threads", type=int, default=0)
    g.add_argument("--out", default=None, help="JSON file for the figures")
    g.epilog = "Any config flag of 'wm-agent train' overrides the preset."
