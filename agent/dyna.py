"""The Dyna loop: collect real steps -> world-model updates -> imagination + policy updates.

This module only sequences; models, losses and returns live in ``worldmodel/`` and ``agent/``.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from agent.actor import RealEnvActor
from agent.config import TrainConfig, from_dict, to_dict
from agent.logger import RunLogger
from agent.policy import ActorCritic
from agent.ppo import PPO
from agent.replay import ReplayBuffer
from envs import make_env
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.trainer import WorldModelTrainer
from worldmodel.world_model import WorldModel


class DeviceError(ValueError):
    """The requested device is not available."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was given but torch sees no CUDA GPU; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise DeviceError(f"unknown device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


@dataclass
class Counters:
    env_steps: int = 0
    iterations: int = 0
    episodes: int = 0
    wm_budget: float = 0.0
    policy_budget: float = 0.0


class DynaTrainer:
    """Builds the parts of one run and runs the Dyna loop over them."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, resume: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = resolve_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)
        self.env = make_env(cfg.env, num_envs=cfg.num_envs, seed=cfg.seed, sticky_actions=cfg.sticky_actions)
        A = self.env.num_actions
        E = cfg.world_model.encoder.embed_dim
        self.wm = WorldModel(cfg.world_model, A).to(self.device)
        self.wm_trainer = WorldModelTrainer(self.wm, cfg.optim, self.device, amp=cfg.amp)
        self.policy = ActorCritic(cfg.policy, E, A).to(self.device)
        if cfg.policy.history > cfg.world_model.context:
            raise ValueError(
                f"policy.history {cfg.policy.history} exceeds world_model.context {cfg.world_model.context}"
            )
        self.ppo = PPO(self.policy, cfg.ppo)
        self.imagined = ImaginedEnv(self.wm, cfg.ppo.horizon)
        self.replay = ReplayBuffer(cfg.replay_capacity, cfg.num_envs)
        self.actor = RealEnvActor(self.wm, self.policy, cfg.num_envs, self.device)
        self.counters = Counters()
        self.episode_returns: list[float] = []
        self.starts: torch.Tensor | None = None
        if resume:
            self.load_checkpoint()

    # --- checkpoints -------------------------------------------------------------------------
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / "latest.pt"

    def save_checkpoint(self) -> Path:
        """One atomic write of models, optimizers, counters, config and RNG states; replay beside it."""
        path = self.checkpoint_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.replay.save(path.parent / "replay")
        state = {
            "world_model": self.wm.state_dict(),
            "wm_optimizer": self.wm_trainer.optimizer.state_dict(),
            "policy": self.policy.state_dict(),
            "policy_optimizer": self.ppo.optimizer.state_dict(),
            "return_scale": self.ppo.return_scale.cpu(),
            "counters": vars(self.counters).copy(),
            "wm_updates": self.wm_trainer.updates,
            "policy_updates": self.ppo.updates,
            "config": json.dumps(to_dict(self.cfg)),
            "num_actions": self.env.num_actions,
            "rng_torch": torch.get_rng_state(),
            "rng_numpy": json.dumps(self.rng.bit_generator.state),
            "episode_returns": torch.tensor(self.episode_returns[-1000:], dtype=torch.float64),
        }
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path()
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.wm.load_state_dict(state["world_model"])
        self.wm_trainer.optimizer.load_state_dict(state["wm_optimizer"])
        self.policy.load_state_dict(state["policy"])
        self.ppo.optimizer.load_state_dict(state["policy_optimizer"])
        self.ppo.return_scale = state["return_scale"]
        self.counters = Counters(**state["counters"])
        self.wm_trainer.updates = state["wm_updates"]
        self.ppo.updates = state["policy_updates"]
        torch.set_rng_state(state["rng_torch"])
        self.rng.bit_generator.state = json.loads(state["rng_numpy"])
        self.episode_returns = state["episode_returns"].tolist()
        self.replay = ReplayBuffer.load(path.parent / "replay")

    # --- imagination starts ------------------------------------------------------------------
    def remember_starts(self, latents: torch.Tensor) -> None:
        """Keep the newest ``ppo.num_starts`` latent windows of the world model's training batches:
        imagination starts from them, so real frames are encoded once per update, not twice."""
        windows = WorldModel.windows(latents, self.cfg.world_model.context)
        self.starts = windows if self.starts is None else torch.cat([windows, self.starts])
        self.starts = self.starts[: self.cfg.ppo.num_starts]

    def imagination_starts(self) -> torch.Tensor:
        """Latent windows ``[B, K, E]``, or real context frames when no batch has been encoded yet."""
        if self.starts is not None and len(self.starts) >= self.cfg.ppo.num_starts:
            return self.starts
        return self.replay.sample(self.cfg.ppo.num_starts, self.cfg.world_model.context, self.rng, self.device).frames

    # --- the loop ----------------------------------------------------------------------------
    def train(self, logger: RunLogger) -> dict[str, float]:
        cfg, c = self.cfg, self.counters
        N = cfg.num_envs
        obs, info = self.env.reset(seed=cfg.seed + c.env_steps)
        is_first = info["is_first"]
        self.actor.observe(obs, is_first)
        next_log = (c.env_steps // cfg.log_every + 1) * cfg.log_every
        next_ckpt = (c.env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every if cfg.checkpoint_every else None
        timings = {"collect": 0.0, "world_model": 0.0, "policy": 0.0}
        pretrained = c.env_steps > cfg.warmup_steps
        while c.env_steps < cfg.steps:
            t0 = time.perf_counter()
            steps_this_iter = 0
            while steps_this_iter < cfg.collect_steps and c.env_steps < cfg.steps:
                if c.env_steps < cfg.warmup_steps:
                    action = self.rng.integers(0, self.env.num_actions, size=N)
                else:
                    action = self.actor.act()
                nxt, rew, term, trunc, info = self.env.step(action)
                self.replay.add(obs, action, rew, term, trunc, info["life_loss"], is_first)
                obs, is_first = nxt, info["is_first"]
                self.actor.observe(obs, is_first)
                done = ~np.isnan(info["episode_return"])
                for r in info["episode_return"][done]:
                    self.episode_returns.append(float(r))
                    logger.add({"charts/episode_return": float(r)})
                for n in info["episode_length"][done]:
                    logger.add({"charts/episode_length": float(n)})
                c.episodes += int(done.sum())
                c.env_steps += N
                steps_this_iter += N
            timings["collect"] += time.perf_counter() - t0
            c.iterations += 1

            if c.env_steps >= cfg.warmup_steps:
                t0 = time.perf_counter()
                n_wm = 0
                if not pretrained:
                    n_wm = cfg.wm_pretrain_updates
                    pretrained = True
                c.wm_budget += steps_this_iter * cfg.wm_train_ratio
                n_wm += int(c.wm_budget)
                c.wm_budget -= int(c.wm_budget)
                for _ in range(n_wm):
                    batch = self.replay.sample(
                        cfg.batch_size,
                        cfg.world_model.seq_len,
                        self.rng,
                        self.device,
                        rewarded_fraction=cfg.rewarded_fraction,
                    )
                    metrics, latents = self.wm_trainer.update(batch)
                    logger.add(metrics)
                    self.remember_starts(latents)
                timings["world_model"] += time.perf_counter() - t0

                t0 = time.perf_counter()
                if self.wm_trainer.updates >= cfg.policy_start_updates:
                    c.policy_budget += steps_this_iter * cfg.policy_train_ratio
                n_pi = int(c.policy_budget)
                c.policy_budget -= n_pi
                for _ in range(n_pi):
                    rollout = self.ppo.rollout(self.imagined, self.imagination_starts())
                    logger.add(self.ppo.update(rollout))
                timings["policy"] += time.perf_counter() - t0

            if c.env_steps >= next_log or c.env_steps >= cfg.steps:
                total = sum(timings.values())
                logger.add({f"time/{k}_fraction": v / total for k, v in timings.items() if total > 0})
                logger.add(
                    {
                        "charts/episodes": float(c.episodes),
                        "charts/replay_size": float(len(self.replay)),
                        "world_model/updates": float(self.wm_trainer.updates),
                        "policy/updates": float(self.ppo.updates),
                    }
                )
                if self.episode_returns:
                    logger.add({"charts/return_last100": float(np.mean(self.episode_returns[-100:]))})
                logger.flush(c.env_steps)
                next_log += cfg.log_every
            if next_ckpt is not None and c.env_steps >= next_ckpt:
                self.save_checkpoint()
                next_ckpt += cfg.checkpoint_every
        self.save_checkpoint()
        self.env.close()
        return {
            "env_steps": c.env_steps,
            "episodes": c.episodes,
            "return_last100": float(np.mean(self.episode_returns[-100:])) if self.episode_returns else float("nan"),
            **{f"time_{k}_s": v for k, v in timings.items()},
        }


def load_run_config(run_dir: Path) -> TrainConfig:
    return from_dict(json.loads((run_dir / "config.json").read_text()))


@dataclass
class LoadedAgent:
    """A trained world model and policy read back from a checkpoint, ready to act."""

    cfg: TrainConfig
    wm: WorldModel
    policy: ActorCritic
    env_steps: int
    checkpoint: Path


def load_agent(path: Path, device: torch.device) -> LoadedAgent:
    """Load from a run directory (its latest checkpoint) or a checkpoint file. Never unpickles code."""
    ckpt = path / "checkpoints" / "latest.pt" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"{path} is neither a wm-agent run directory with a checkpoint nor a checkpoint file")
    state = torch.load(ckpt, map_location=device, weights_only=True)
    cfg = from_dict(json.loads(state["config"]))
    wm = WorldModel(cfg.world_model, state["num_actions"]).to(device)
    wm.load_state_dict(state["world_model"])
    policy = ActorCritic(cfg.policy, cfg.world_model.encoder.embed_dim, state["num_actions"]).to(device)
    policy.load_state_dict(state["policy"])
    wm.eval()
    policy.eval()
    return LoadedAgent(cfg, wm, policy, int(state["counters"]["env_steps"]), ckpt)
