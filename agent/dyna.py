"""The Dyna loop: collect real steps -> world-model updates -> imagination + policy updates.

This module only sequences; models, losses and returns live in ``worldmodel/`` and ``agent/``.
"""

from __future__ import annotations

import json
import random
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from agent.actor import RealEnvActor
from agent.checkpoint import (
    RANKS,
    REPLAY,
    STATE,
    CheckpointError,
    checkpoint_dirs,
    checkpoint_root,
    load_latest,
    rank_replay_dir,
    read_rank_part,
    read_state,
    resolve,
    save_state,
    write_checkpoint,
)
from agent.config import TrainConfig, from_dict, to_dict
from agent.distributed import Distributed, tensor_digests
from agent.logger import RunLogger
from agent.policy import ActorCritic
from agent.ppo import PPO
from agent.replay import ReplayBuffer, ReplayError, repartition
from envs import make_env
from worldmodel.batch import Batch
from worldmodel.ema import ema_update_, make_slow_copy
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.trainer import WorldModelTrainer
from worldmodel.world_model import WorldModel

CALIBRATION_SEQUENCES = 512
"""Uniformly drawn real windows behind each fit of the heads' shifts (before every policy phase)."""
REAL_VALUE_WINDOWS = 128
"""Real replay windows per critic step when the critic learns from real returns (``ppo.critic_targets``)."""
CALIBRATION_EVENTS = 128
"""Extra windows ending in a reward, and as many ending in a lost life or game, per fit."""


def stratum_weights(uniform_hit: torch.Tensor, events: int, rate: float) -> torch.Tensor:
    """Weights ``[U + events]`` that turn ``U`` uniformly drawn windows (``uniform_hit [U]``: whether each
    ends in the event) followed by ``events`` windows drawn among those ending in it into an average over
    the replay, where ``rate`` of the windows end in the event: the event's windows share ``rate``, the
    uniform ones that do not end in it share the rest, and the uniform ones that do get nothing (counting
    them would make the estimate hang on how many of them the draw caught)."""
    miss = (~uniform_hit).float()
    w_event = torch.full((events,), rate / events if events else 0.0, device=miss.device)
    w = torch.cat([miss * (1 - rate if events else 1.0) / miss.sum().clamp(min=1), w_event])
    return w / w.sum()


def calibration_weights(
    rewarded_last: torch.Tensor, ended_last: torch.Tensor, n_rew: int, n_end: int, rates: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward and end heads' weights ``[U + n_rew + n_end]`` over calibration sequences in order [``U``
    uniform, ``n_rew`` ending in a reward, ``n_end`` ending in an end], from whether each uniform one's last
    transition is rewarded / ends (``[U]``) and the replay's ``rates``: :func:`stratum_weights` for each head,
    which skips the other head's stratum."""
    U = len(rewarded_last)
    w_rew = stratum_weights(rewarded_last, n_rew, rates[0])
    w_end = stratum_weights(ended_last, n_end, rates[1])
    return torch.cat([w_rew, w_rew.new_zeros(n_end)]), torch.cat([w_end[:U], w_end.new_zeros(n_rew), w_end[U:]])


def calibrate_on_replay(
    wm: WorldModel,
    replay: ReplayBuffer,
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
    rates: tuple[float, float] | None = None,
    stratified: bool = True,
) -> dict[str, torch.Tensor]:
    """:meth:`WorldModel.calibrate_heads` to ``rates`` (default: the replay's own rewarded and ended
    fractions) on windows of ``context + 1`` frames: :data:`CALIBRATION_SEQUENCES` drawn uniformly and,
    when ``stratified``, :data:`CALIBRATION_EVENTS` ending in a reward and as many ending in a lost life or
    game, weighted back to the replay's rates (:func:`stratum_weights`). With rewards on <1% of Breakout's
    steps a uniform draw of 512 holds ~4, and the unstratified fit swung by several units between draws."""
    rewarded, ended = rates or replay.base_rates()
    L = wm.cfg.context + 1
    uniform = replay.sample(CALIBRATION_SEQUENCES, L, rng, device)
    if not stratified:
        return wm.calibrate_heads(uniform.frames, uniform.actions, rewarded, ended)
    with_reward = replay.sample_ending_with("rewarded", CALIBRATION_EVENTS, L, rng, device)
    with_end = replay.sample_ending_with("ended", CALIBRATION_EVENTS, L, rng, device)
    n_rew = 0 if with_reward is None else CALIBRATION_EVENTS
    n_end = 0 if with_end is None else CALIBRATION_EVENTS
    parts = [b for b in (uniform, with_reward, with_end) if b is not None]
    ended_last = uniform.terminated[:, -1] | uniform.life_loss[:, -1]
    w_rew, w_end = calibration_weights(uniform.rewards[:, -1] != 0, ended_last, n_rew, n_end, (rewarded, ended))
    frames = torch.cat([b.frames for b in parts])
    actions = torch.cat([b.actions for b in parts])
    return wm.calibrate_heads(frames, actions, rewarded, ended, w_rew, w_end)


def real_update(
    ppo: PPO,
    wm: WorldModel,
    replay: ReplayBuffer,
    returns: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """:meth:`PPO.real_update` (a critic step toward real discounted returns, and self-imitation where the
    config asks for it) on :data:`REAL_VALUE_WINDOWS` replay windows with their returns (``returns``, from
    :meth:`ReplayBuffer.returns`), encoded by ``wm`` as the policy sees them (``ppo.critic_targets ==
    "real"``); nothing when no window qualifies (under DDP: on any rank)."""
    real = replay.sample_with_returns(REAL_VALUE_WINDOWS, ppo.policy.cfg.history, returns, rng, device)
    if not (ppo.agree(real is not None) if ppo.agree is not None else real is not None):
        return {}
    frames, actions, targets = real
    with torch.no_grad():
        windows = wm.encode(frames)
    return ppo.real_update(windows, actions, targets)


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
    """World-model updates owed (kept across a stop, so a resumed run does the same number)."""
    policy_budget: float = 0.0
    pretrain_done: bool = False
    train_seconds: float | None = 0.0
    """Wall time spent in ``train`` up to the last checkpoint, summed over every stop and resume; None
    for a run resumed from a checkpoint written before it was counted."""


@dataclass
class Chunk:
    """Real lockstep steps of every env copy, collected and not yet in the replay."""

    transitions: list[tuple[np.ndarray, ...]] = field(default_factory=list)
    """``(frames, actions, rewards, terminated, truncated, life_loss, is_first)`` of each lockstep step,
    as :meth:`ReplayBuffer.add` takes them."""
    episodes: list[tuple[float, int]] = field(default_factory=list)
    """(return, env steps into the chunk when it ended) of each episode that ended."""
    lengths: list[float] = field(default_factory=list)
    env_steps: int = 0
    """Env steps of all copies (and ranks)."""


class NonFiniteError(RuntimeError):
    """Losses stayed NaN/inf for ``max_nonfinite_updates`` updates in a row."""


def sample_world_model_batches(
    replay: ReplayBuffer, cfg: TrainConfig, rng: np.random.Generator, device: torch.device
) -> tuple[Batch, Batch | None, Batch | None]:
    """One world-model update's batches, drawn in this order: the main ``K + P``-frame batch (rewarded
    sequences oversampled), the heads' extra real transitions (``2W`` frames: the last ``W`` transitions
    with the ``W = reward.window`` latents before each, a reward or end among them where oversampled)
    and the predictor's extra sequences (``Kp + P`` frames; each ``None`` when its size is 0). The Dyna loop and ``bench
    world-model`` both train from these."""
    L, W = cfg.world_model.seq_len, cfg.world_model.reward.window
    batch = replay.sample(cfg.batch_size, L, rng, device, rewarded_fraction=cfg.rewarded_fraction)
    head = None
    if cfg.head_batch_size > 0:
        head = replay.sample(
            cfg.head_batch_size,
            2 * W,
            rng,
            device,
            rewarded_fraction=cfg.head_rewarded_fraction,
            ended_fraction=cfg.head_ended_fraction,
            event_span=W,
        )
    dyn = None
    if cfg.dynamics_batch_size > 0:
        L_dyn = cfg.world_model.predictor_context + cfg.world_model.pred_steps
        dyn = replay.sample(cfg.dynamics_batch_size, L_dyn, rng, device, rewarded_fraction=cfg.rewarded_fraction)
    return batch, head, dyn


class DynaTrainer:
    """Builds the parts of one run and runs the Dyna loop over them.

    With ``dist`` this process is one rank of a data-parallel run (``agent/distributed.py``): it steps
    its own ``num_envs`` env copies (seeded apart from the other ranks') into its own replay of
    ``replay_capacity / N`` frames, and DDP averages the world model's and the policy's gradients. The
    counters (env steps, update budgets) count all ranks together, so ``steps`` is the run's total and
    the N ranks do as many updates per env step as one process, each on its own batch: the same
    learning per env step as one process with an N-times larger batch.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        run_dir: Path,
        resume: bool = False,
        warn: Callable[[str], None] = print,
        dist: Distributed | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        self.dist = dist
        self.world_size = dist.world_size if dist is not None else 1
        self.device = resolve_device(cfg.device)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        self.seed = dist.rank_seed(cfg.seed) if dist is not None else cfg.seed
        """This rank's seed for its envs and samplers (the run's seed on rank 0 and in a plain run)."""
        random.seed(self.seed)
        np.random.seed(self.seed)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.rng = np.random.default_rng(self.seed)
        self.env = make_env(cfg.env, num_envs=cfg.num_envs, seed=self.seed, sticky_actions=cfg.sticky_actions)
        A = self.env.num_actions
        E = cfg.world_model.encoder.latent_dim
        wrap = dist.wrap if dist is not None else None
        agree = dist.all_ok if dist is not None else None
        self.wm = WorldModel(cfg.world_model, A).to(self.device)
        self.wm_trainer = WorldModelTrainer(
            self.wm, cfg.optim, self.device, cfg.amp, cfg.compile, wrap, agree, graphs=cfg.cuda_graphs
        )
        if not 0.0 <= cfg.slow_world_model_decay < 1.0:
            raise ValueError(f"slow_world_model_decay must be in [0, 1), got {cfg.slow_world_model_decay}")
        self.wm_slow: WorldModel | None = make_slow_copy(self.wm) if cfg.slow_world_model_decay > 0 else None
        self.wm_act = self.wm_slow if self.wm_slow is not None else self.wm
        """The world model the policy imagines with and acts through: the slow copy when there is one."""
        self.policy = ActorCritic(cfg.policy, E, A).to(self.device)
        if cfg.policy.history > cfg.world_model.context:
            raise ValueError(
                f"policy.history {cfg.policy.history} exceeds world_model.context {cfg.world_model.context}"
            )
        self.ppo = PPO(self.policy, cfg.ppo, wrap=wrap, agree=agree, graphs=cfg.cuda_graphs)
        if self.seed != cfg.seed:
            torch.manual_seed(self.seed)  # the ranks imagine and sample apart
        self.imagined = ImaginedEnv(self.wm_act, cfg.ppo.horizon)
        self.replay = ReplayBuffer(cfg.replay_capacity // self.world_size, cfg.num_envs)
        if cfg.overlap_collection:  # the thread acts with CPU copies, refreshed before each of its chunks
            actor_wm, actor_policy = make_slow_copy(self.wm_act).cpu(), make_slow_copy(self.policy).cpu()
            actor_rng = torch.Generator().manual_seed(self.seed)
            self.actor = RealEnvActor(actor_wm, actor_policy, cfg.num_envs, torch.device("cpu"), actor_rng)
        else:
            self.actor = RealEnvActor(self.wm_act, self.policy, cfg.num_envs, self.device)
        self.obs: np.ndarray | None = None
        self.is_first: np.ndarray | None = None
        self.counters = Counters()
        self.episode_returns: list[float] = []
        self.episode_end_steps: list[int] = []
        """Env steps (all copies together) when each episode in ``episode_returns`` ended."""
        self.new_episodes: list[tuple[float, int]] = []
        """(return, end step) of this rank's episodes not yet in ``episode_returns``."""
        self.starts: torch.Tensor | None = None
        self.stop_requested = False
        self._stop_agreed = False
        self.last_checkpoint: Path | None = None
        if resume:
            self.load_checkpoint(warn)

    def request_stop(self) -> None:
        """Finish the current update, write a checkpoint and return from :meth:`train` (signal-safe)."""
        self.stop_requested = True

    def poll_stop(self) -> bool:
        """Whether to stop now: this process's request, or in a multi-rank run any rank's. There it is a
        collective, so every rank polls at the same points of the loop and they all stop together."""
        if self.dist is None:
            return self.stop_requested
        if not self._stop_agreed:
            self._stop_agreed = self.dist.any(self.stop_requested)
        return self._stop_agreed

    @property
    def stopping(self) -> bool:
        """The last answer of :meth:`poll_stop` (no collective)."""
        return self.stop_requested if self.dist is None else self._stop_agreed

    def sync_episodes(self) -> None:
        """Move the episodes ended since the last call into ``episode_returns`` (in a multi-rank run,
        every rank's, on every rank: a collective)."""
        new, self.new_episodes = self.new_episodes, []
        if self.dist is not None:
            new = sorted((episode for part in self.dist.gather(new) for episode in part), key=lambda e: e[1])
        for ret, step in new:
            self.episode_returns.append(ret)
            self.episode_end_steps.append(step)
        self.counters.episodes += len(new)

    def synced_modules(self) -> list[torch.nn.Module]:
        """The modules whose weights every rank holds identically."""
        return [m for m in (self.wm, self.wm_slow, self.policy) if m is not None]

    # --- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Models, optimizers, counters, config, RNG states and the replay buffer, as one atomic
        checkpoint directory (see ``agent/checkpoint.py``); in a multi-rank run a collective."""
        self.sync_episodes()
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
            "rng_python": json.dumps(random.getstate()),
            "episode_returns": torch.tensor(self.episode_returns, dtype=torch.float64),
            "episode_end_steps": torch.tensor(self.episode_end_steps, dtype=torch.int64),
        }
        if self.wm_slow is not None:
            state["world_model_slow"] = self.wm_slow.state_dict()
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        if self.dist is None:
            self.last_checkpoint = write_checkpoint(
                self.run_dir, self.counters.env_steps, state, self.replay, keep=self.cfg.keep_checkpoints
            )
        else:
            self.last_checkpoint = self._save_ranks(state)
        return self.last_checkpoint

    def _save_ranks(self, state: dict) -> Path:
        """A checkpoint of every rank (a collective): ranks 1..N-1 each write their RNG states, parameter
        digest and replay to a part directory; rank 0 checks that every rank's weights are the same,
        writes its own state and replay, moves the parts in under ``ranks/`` and renames the whole
        into place. A failure on any rank leaves the previous checkpoint as it was, on every rank."""
        d = self.dist
        assert d is not None
        step = self.counters.env_steps
        root = checkpoint_root(self.run_dir)
        digests = tensor_digests([m.state_dict() for m in self.synced_modules()])

        def part_dir(rank: int) -> Path:
            return root / f"rank{rank}.step_{step:010d}.part"

        part = part_dir(d.rank)
        error = None
        if not d.is_main:
            own = {k: state[k] for k in ("rng_torch", "rng_numpy", "rng_python", "rng_cuda") if k in state}
            try:
                for stale in root.glob(f"rank{d.rank}.step_*.part"):
                    shutil.rmtree(stale)
                part.mkdir(parents=True)
                save_state({**own, "tensor_digests": json.dumps(digests)}, part / STATE)
                self.replay.save(part / REPLAY)
            except OSError as e:
                error = f"cannot write its part of checkpoint step {step} in {root}: {e.strerror or e}"
        reports = d.gather((error, digests))
        failed = [f"rank {r}: {e}" for r, (e, _) in enumerate(reports) if e]
        differ = sorted({k for _, other in reports for k, v in other.items() if digests.get(k) != v})
        if differ:
            failed.append(f"the ranks' weights differ in {len(differ)} tensors ({', '.join(differ[:4])}, ...)")
        result: tuple[str | None, str | None] = (None, "; ".join(failed) or None)
        if d.is_main and not failed:

            def move_parts(tmp: Path) -> None:
                (tmp / RANKS).mkdir()
                for r in range(1, d.world_size):
                    part_dir(r).rename(tmp / RANKS / str(r))

            try:
                path = write_checkpoint(
                    self.run_dir,
                    step,
                    {**state, "world_size": d.world_size, "tensor_digests": json.dumps(digests)},
                    self.replay,
                    keep=self.cfg.keep_checkpoints,
                    parts=move_parts,
                )
                result = (str(path), None)
            except CheckpointError as e:
                result = (None, str(e))
        result = d.broadcast(result)
        shutil.rmtree(part, ignore_errors=True)
        if result[1] is not None:
            raise CheckpointError(result[1])
        assert result[0] is not None
        return Path(result[0])

    def _find_checkpoint(self, warn: Callable[[str], None]) -> tuple[dict, ReplayBuffer | None, Path]:
        """The newest usable checkpoint's state (and in a plain run its first replay); in a multi-rank
        run rank 0 chooses it (and sets broken ones aside) and every rank reads the one it chose."""
        if self.dist is None:
            return load_latest(self.run_dir, with_replay=True, warn=warn)
        found: tuple[str | None, str | None] = (None, None)
        if self.dist.is_main:
            try:
                found = (str(load_latest(self.run_dir, with_replay=False, warn=warn)[2]), None)
            except CheckpointError as e:
                found = (None, str(e))
        found = self.dist.broadcast(found)
        if found[1] is not None:
            raise CheckpointError(found[1])
        assert found[0] is not None
        path = Path(found[0])
        return read_state(path / STATE), None, path

    def _load_replay(
        self, state: dict, first: ReplayBuffer | None, path: Path, warn: Callable[[str], None]
    ) -> tuple[ReplayBuffer, dict | None]:
        """This rank's replay from checkpoint ``path`` and the state holding its RNG states (``None``
        when the checkpoint has no RNG state for it). Written by as many ranks as run now, each rank
        takes back its own; otherwise every rank's replay is merged or split among the ranks now.
        ``first``: rank 0's replay when it is already loaded."""
        saved = int(state.get("world_size", 1))
        rank = self.dist.rank if self.dist is not None else 0

        def load(r: int) -> ReplayBuffer:
            return first if r == 0 and first is not None else ReplayBuffer.load(rank_replay_dir(path, r))

        if saved == self.world_size:
            return load(rank), state if rank == 0 else read_rank_part(path, rank)
        buffers = [load(r) for r in range(saved)]
        total = sum(len(b) for b in buffers)
        replay = repartition(buffers, self.world_size, self.cfg.replay_capacity // self.world_size)[rank]
        if rank == 0:
            how = "merged into one" if self.world_size == 1 else f"dealt out to {self.world_size} ranks"
            rngs = "" if self.world_size == 1 else "; ranks other than 0 start their RNG states afresh"
            warn(
                f"{path.name} was written by {saved} rank(s), this run has {self.world_size}: their replays "
                f"({total} frames) are {how}, {len(replay)} frames here{rngs}"
            )
        return replay, state if rank == 0 else None

    def load_checkpoint(self, warn: Callable[[str], None] = print) -> None:
        state, first, path = self._find_checkpoint(warn)
        try:
            replay, own = self._load_replay(state, first, path, warn)
        except ReplayError as e:
            raise CheckpointError(f"{path}: {e}") from e
        self.wm.load_state_dict_compat(state["world_model"])
        if self.wm_slow is not None:  # a checkpoint from before the slow copy starts it at the trained model
            self.wm_slow.load_state_dict_compat(state.get("world_model_slow", state["world_model"]))
        self.wm_trainer.load_optimizer_state(state["wm_optimizer"])
        self.policy.load_state_dict(state["policy"])
        self.ppo.load_state(state["policy_optimizer"], state["return_scale"])
        self.counters = Counters(**{"train_seconds": None, **state["counters"]})
        self.wm_trainer.updates = state["wm_updates"]
        self.ppo.updates = state["policy_updates"]
        if own is not None:
            torch.set_rng_state(own["rng_torch"])
            if "rng_cuda" in own and self.device.type == "cuda":
                torch.cuda.set_rng_state(own["rng_cuda"], self.device)
            self.rng.bit_generator.state = json.loads(own["rng_numpy"])
            version, internal, gauss = json.loads(own["rng_python"])
            random.setstate((version, tuple(internal), gauss))
        else:
            fresh = self.seed + self.counters.env_steps
            torch.manual_seed(fresh)
            random.seed(fresh)
            self.rng = np.random.default_rng(fresh)
        self.episode_returns = state["episode_returns"].tolist()
        self.episode_end_steps = state["episode_end_steps"].tolist() if "episode_end_steps" in state else []
        if replay.num_envs != self.cfg.num_envs:
            raise CheckpointError(
                f"{path / 'replay'}: {replay.num_envs} env streams, the config has {self.cfg.num_envs}"
            )
        self.replay = replay
        self.last_checkpoint = path

    # --- imagination starts ------------------------------------------------------------------
    def remember_starts(self, latents: torch.Tensor) -> None:
        """Keep the newest ``ppo.num_starts`` latent windows of the world model's training batches
        ``[B, L, E]``: imagination starts from them, so real frames are encoded once per update, not twice.

        A window ending at a sequence's last frame is left out: that frame may end its episode (a
        rewarded sequence ends where the reward was paid), and the model never learned what follows an
        episode's last frame, so imagination from there paid phantom rewards. Every window kept has its
        real next step inside the sequence."""
        windows = WorldModel.windows(latents[:, :-1], self.cfg.world_model.context)
        self.starts = windows if self.starts is None else torch.cat([windows, self.starts])
        self.starts = self.starts[: self.cfg.ppo.num_starts]

    def world_model_update(
        self, batch: Batch, head_batch: Batch | None, dynamics_batch: Batch | None = None
    ) -> dict[str, torch.Tensor]:
        """One world-model gradient step, then the slow copy follows it and the batch's latents (in the
        latent space of the model the policy imagines with) become imagination starts."""
        metrics, latents = self.wm_trainer.update(batch, head_batch, dynamics_batch)
        if self.dist is not None:
            self.dist.average_buffers(self.wm)
        if self.wm_slow is not None:
            ema_update_(self.wm_slow, self.wm, self.cfg.slow_world_model_decay)
            # Encoding again costs a forward pass, so it starts only with the batches the policy will use.
            windows_per_batch = batch.frames.shape[0] * (batch.frames.shape[1] - self.cfg.world_model.context)
            needed = -(-self.cfg.ppo.num_starts // windows_per_batch)
            if self.wm_trainer.updates + needed > self.cfg.policy_start_updates:
                with torch.no_grad():
                    latents = self.wm_slow.encode(batch.frames)
        self.remember_starts(latents)
        return metrics

    def calibrate_heads(self) -> dict[str, torch.Tensor]:
        """Fit the acting model's reward and continue shifts (:meth:`WorldModel.calibrate_heads`) on uniformly
        drawn real windows, to the replay's rates of rewards and ends (or, without ``fit_head_shifts``,
        shift both models by the rates' log-odds); under DDP every rank keeps their mean."""
        rates = self.replay.base_rates()
        if self.dist is not None:
            rates = tuple(self.dist.mean(torch.tensor(rates, dtype=torch.float64)).tolist())
        if not self.cfg.fit_head_shifts:
            for model in {self.wm, self.wm_act}:
                model.set_base_rates(*rates)
            return {}
        calibrate_on_replay(self.wm_act, self.replay, self.rng, self.device, rates=rates)
        if self.dist is not None:
            self.wm_act.head_shifts.copy_(self.dist.mean(self.wm_act.head_shifts))
        # The slow copy imagines; the trained model's paid-reward metrics read the same shifts.
        self.wm.head_shifts.copy_(self.wm_act.head_shifts)
        shifts = self.wm_act.head_shifts
        return {"imagination/reward_shift": shifts[0].clone(), "imagination/cont_shift": shifts[1].clone()}

    def real_update(self, returns: tuple[np.ndarray, np.ndarray]) -> dict[str, torch.Tensor]:
        """:func:`real_update` on this run's replay, with the acting model's latents."""
        return real_update(self.ppo, self.wm_act, self.replay, returns, self.rng, self.device)

    def imagination_starts(self) -> torch.Tensor:
        """Latent windows ``[B, K, E]``, or real context frames when no batch has been encoded yet."""
        if self.starts is not None and len(self.starts) >= self.cfg.ppo.num_starts:
            return self.starts
        K = self.cfg.world_model.context
        return self.replay.sample(self.cfg.ppo.num_starts, K + 1, self.rng, self.device).frames[:, :K]

    @torch.no_grad()
    def prediction_image(self, count: int = 4) -> torch.Tensor:
        """``[1, 2H, count*W]`` in [0, 1]: real next frames (top) over the model's predictions from the
        real context before them (bottom). Sampled with its own RNG, so logging never changes training."""
        K = self.cfg.world_model.context
        batch = self.replay.sample(count, K + 1, np.random.default_rng(self.counters.env_steps), self.device)
        self.wm.eval()
        pred = self.wm.predict_next_frame(batch.frames[:, :K], batch.actions[:, K - 1])  # (count, H, W)
        real = self.wm.to_float(batch.frames[:, K])
        return torch.cat([torch.cat(list(real), dim=1), torch.cat(list(pred), dim=1)], dim=0)[None].cpu()

    def _check_finite(self, at_log: bool = False) -> None:
        """Stop on ``max_nonfinite_updates`` skipped updates in a row: after every update, or with
        ``cuda_graphs`` (whose skip counts stay on the device) at each log line."""
        if self.cfg.cuda_graphs and not at_log:
            return
        limit = self.cfg.max_nonfinite_updates
        for name, owner in (("world-model", self.wm_trainer), ("policy", self.ppo)):
            if owner.consecutive_skipped >= limit:
                kept = (
                    f"the last good checkpoint {self.last_checkpoint} is intact"
                    if self.last_checkpoint
                    else ("no checkpoint was written yet")
                )
                raise NonFiniteError(
                    f"the {name} loss was NaN or inf for {owner.consecutive_skipped} updates in a row (each skipped) "
                    f"at env step {self.counters.env_steps}; stopped without saving, {kept}. "
                    "Try a lower learning rate (--optim.lr / --ppo.lr) or check the env's observations and rewards"
                )

    # --- the loop ----------------------------------------------------------------------------
    def collect(self, steps: int, start: int, rng: np.random.Generator, stop: Callable[[], bool]) -> Chunk:
        """Step every env copy in lockstep until ``steps`` env steps (all copies and ranks) are collected or
        ``stop()``: random actions from ``rng`` while the run (``start`` env steps so far) is in its warm-up,
        the actor's after. Touches only the envs and the actor, so a thread may run it beside learning."""
        cfg, chunk = self.cfg, Chunk()
        step_all = cfg.num_envs * self.world_size
        while chunk.env_steps < steps and not stop():
            if start + chunk.env_steps < cfg.warmup_steps:
                action = rng.integers(0, self.env.num_actions, size=cfg.num_envs)
            else:
                action = self.actor.act()
            nxt, rew, term, trunc, info = self.env.step(action)
            step = (self.obs, action, rew, term, trunc, info["life_loss"], self.is_first)
            chunk.transitions.append(tuple(np.array(x, copy=True) for x in step))  # the env may reuse its arrays
            self.obs, self.is_first = nxt, info["is_first"]
            self.actor.observe(self.obs, self.is_first)
            done = ~np.isnan(info["episode_return"])
            chunk.episodes += [(float(r), chunk.env_steps + step_all) for r in info["episode_return"][done]]
            chunk.lengths += [float(n) for n in info["episode_length"][done]]
            chunk.env_steps += step_all
        return chunk

    def absorb(self, chunk: Chunk, logger: RunLogger) -> None:
        """Put a collected chunk into the replay, and count its env steps and episodes."""
        c = self.counters
        for transition in chunk.transitions:
            self.replay.add(*transition)
        for ret, end in chunk.episodes:
            self.new_episodes.append((ret, c.env_steps + end))
            logger.add({"charts/episode_return": ret})
        for n in chunk.lengths:
            logger.add({"charts/episode_length": n})
        if self.dist is None:
            self.sync_episodes()
        c.env_steps += chunk.env_steps

    def refresh_actor(self) -> None:
        """With ``overlap_collection``: the thread's CPU copies take the acting model's and policy's weights."""
        self.actor.wm.load_state_dict(self.wm_act.state_dict())
        self.actor.policy.load_state_dict(self.policy.state_dict())

    def train(self, logger: RunLogger, final_checkpoint: bool = True) -> dict[str, float]:
        """Run until ``cfg.steps`` env steps or :meth:`request_stop`; then write a checkpoint."""
        cfg, c = self.cfg, self.counters
        self.obs, info = self.env.reset(seed=self.seed + c.env_steps)
        self.is_first = info["is_first"]
        self.actor.observe(self.obs, self.is_first)
        overlap = cfg.overlap_collection
        # The thread's own random streams, seeded from the seed and the steps so far (not checkpointed).
        collect_rng = np.random.default_rng([self.seed, c.env_steps]) if overlap else self.rng
        if overlap:
            self.actor.generator.manual_seed(self.seed * 1_000_003 + c.env_steps)
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="collect") if overlap else None
        abort = threading.Event()
        pending: Future[Chunk] | None = None
        if overlap:
            self.refresh_actor()  # the copies were made before a checkpoint was loaded
        next_log = (c.env_steps // cfg.log_every + 1) * cfg.log_every
        next_ckpt = (c.env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every if cfg.checkpoint_every else None
        next_image = (c.env_steps // cfg.image_every + 1) * cfg.image_every if cfg.image_every else None
        timings = {"collect": 0.0, "world_model": 0.0, "imagination": 0.0, "policy": 0.0}
        t_start, seconds_before = time.perf_counter(), c.train_seconds

        def seconds_so_far() -> float | None:
            return None if seconds_before is None else seconds_before + time.perf_counter() - t_start

        try:
            while c.env_steps < cfg.steps and not self.poll_stop():
                t0 = time.perf_counter()
                if pending is not None:  # collected while the last iteration learned
                    chunk, pending = pending.result(), None
                else:
                    n = min(cfg.collect_steps, cfg.steps - c.env_steps)
                    chunk = self.collect(n, c.env_steps, collect_rng, self.poll_stop)
                self.absorb(chunk, logger)
                steps_this_iter = chunk.env_steps
                if pool is not None and c.env_steps < cfg.steps and not self.stop_requested:
                    self.refresh_actor()
                    n = min(cfg.collect_steps, cfg.steps - c.env_steps)
                    halt = lambda: self.stop_requested or abort.is_set()  # noqa: E731
                    pending = pool.submit(self.collect, n, c.env_steps, collect_rng, halt)
                timings["collect"] += time.perf_counter() - t0
                c.iterations += 1

                if c.env_steps >= cfg.warmup_steps:
                    t0 = time.perf_counter()
                    if not c.pretrain_done:
                        c.wm_budget += cfg.wm_pretrain_updates
                        c.pretrain_done = True
                    c.wm_budget += steps_this_iter * cfg.wm_train_ratio
                    block = int(c.wm_budget)
                    while c.wm_budget >= 1 and not self.poll_stop():
                        batch, head_batch, dynamics_batch = sample_world_model_batches(
                            self.replay, cfg, self.rng, self.device
                        )
                        metrics = self.world_model_update(batch, head_batch, dynamics_batch)
                        c.wm_budget -= 1
                        logger.add(metrics)
                        self._check_finite()
                        done_in_block = block - int(c.wm_budget)
                        if block > 100 and done_in_block % 100 == 0:
                            loss = float(metrics["world_model/loss"])
                            logger.phase(f"world-model pretraining: {done_in_block}/{block} updates, loss {loss:.3g}")
                    timings["world_model"] += time.perf_counter() - t0

                    if self.wm_trainer.updates >= cfg.policy_start_updates:
                        c.policy_budget += steps_this_iter * cfg.policy_train_ratio
                    if c.policy_budget >= 1:
                        t0 = time.perf_counter()
                        logger.add(self.calibrate_heads())
                        timings["imagination"] += time.perf_counter() - t0
                        real_returns = self.replay.returns(cfg.ppo.gamma) if cfg.ppo.critic_targets == "real" else None
                    while c.policy_budget >= 1 and not self.poll_stop():
                        t0 = time.perf_counter()
                        rollout = self.ppo.rollout(self.imagined, self.imagination_starts())
                        t1 = time.perf_counter()
                        if real_returns is not None:
                            logger.add(self.real_update(real_returns))
                        logger.add(self.ppo.update(rollout))
                        if self.dist is not None:  # each rank scaled by its own rollouts; they keep one scale
                            self.ppo.return_scale = self.dist.mean(self.ppo.return_scale)
                        c.policy_budget -= 1
                        self._check_finite()
                        timings["imagination"] += t1 - t0
                        timings["policy"] += time.perf_counter() - t1

                if next_image is not None and c.env_steps >= next_image and c.env_steps >= cfg.warmup_steps:
                    if self.dist is None or self.dist.is_main:
                        image = self.prediction_image()
                        logger.add_image("world_model/next_frame_real_vs_predicted", image, c.env_steps)
                    next_image = (c.env_steps // cfg.image_every + 1) * cfg.image_every
                if c.env_steps >= next_log or c.env_steps >= cfg.steps or self.stopping:
                    self.sync_episodes()
                    self._check_finite(at_log=True)
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
                    next_log = (c.env_steps // cfg.log_every + 1) * cfg.log_every
                due = next_ckpt is not None and c.env_steps >= next_ckpt and not self.stopping
                if due and self.wm_trainer.consecutive_skipped == 0 and self.ppo.consecutive_skipped == 0:
                    c.train_seconds = seconds_so_far()
                    self.save_checkpoint()
                    next_ckpt = (c.env_steps // cfg.checkpoint_every + 1) * cfg.checkpoint_every
            if pending is not None:  # a stop: the steps in flight end early and still count
                self.absorb(pending.result(), logger)
        finally:  # on an error too: the thread stops stepping the envs before they close
            abort.set()
            if pool is not None:
                pool.shutdown()
        self.sync_episodes()
        already = self.last_checkpoint is not None and self.last_checkpoint.name == f"step_{c.env_steps:010d}"
        if final_checkpoint and not already:
            c.train_seconds = seconds_so_far()
            self.save_checkpoint()
        self.env.close()
        return {
            "env_steps": c.env_steps,
            "episodes": c.episodes,
            "stopped_early": c.env_steps < cfg.steps,
            "return_last100": float(np.mean(self.episode_returns[-100:])) if self.episode_returns else float("nan"),
            **{f"time_{k}_s": v for k, v in timings.items()},
            "time_other_s": time.perf_counter() - t_start - sum(timings.values()),
            "train_seconds_total": seconds_so_far(),
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
    episode_returns: list[float] = field(default_factory=list)
    episode_end_steps: list[int] = field(default_factory=list)
    """Env steps when each training episode in ``episode_returns`` ended (empty in old checkpoints)."""
    train_seconds: float | None = None
    """Training wall time over every stretch of the run; None where the checkpoint predates it."""


def load_agent(path: Path, device: torch.device, warn: Callable[[str], None] = print) -> LoadedAgent:
    """Load from a run directory (its newest usable checkpoint), a checkpoint directory or a ``state.pt``.
    Never unpickles code; raises :class:`CheckpointError` with a one-line reason."""
    if path.is_dir() and checkpoint_dirs(path):
        state, _, ckpt_dir = load_latest(path, with_replay=False, warn=warn, quarantine_broken=False)
        ckpt = ckpt_dir / "state.pt"
    else:
        ckpt = resolve(path)
        state = read_state(ckpt)
    cfg = from_dict(json.loads(state["config"]))
    wm = WorldModel(cfg.world_model, state["num_actions"]).to(device)
    # The policy acted through the slow copy when the run kept one, so that is the model it is read with.
    wm.load_state_dict_compat(state.get("world_model_slow", state["world_model"]))
    policy = ActorCritic(cfg.policy, cfg.world_model.encoder.latent_dim, state["num_actions"]).to(device)
    policy.load_state_dict(state["policy"])
    wm.eval()
    policy.eval()
    counters = state["counters"]
    return LoadedAgent(
        cfg,
        wm,
        policy,
        env_steps=int(counters["env_steps"]),
        checkpoint=ckpt,
        episode_returns=state["episode_returns"].tolist(),
        episode_end_steps=state["episode_end_steps"].tolist() if "episode_end_steps" in state else [],
        train_seconds=counters.get("train_seconds"),
    )
