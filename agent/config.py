"""The whole training configuration, and the named presets ``debug``, ``cpu`` and ``atari100k``."""

from __future__ import annotations

import dataclasses
import io
import re
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field

import tyro

from agent.policy import PolicyConfig
from agent.ppo import PPOConfig
from worldmodel.decoder import DecoderConfig
from worldmodel.encoder import EncoderConfig
from worldmodel.predictor import PredictorConfig
from worldmodel.reward_predictor import RewardConfig
from worldmodel.trainer import OptimConfig
from worldmodel.world_model import WorldModelConfig

PRESETS = ("debug", "cpu", "atari100k")


class UsageError(ValueError):
    """Bad input on the command line (defined here, not in ``agent.cli``, so that ``python -m agent.cli``
    and the modules it calls raise and catch one class)."""


@dataclass
class TrainConfig:
    """Everything one ``wm-agent train`` run needs. Env steps count agent steps summed over all env copies."""

    env: str = "ALE/Breakout-v5"
    """Environment id: any ``ALE/<Game>-v5`` or ``wm/Catch-v0``."""
    steps: int = 100_000
    """Total real env steps (agent steps, each 4 frames on ALE)."""
    seed: int = 0
    """Seeds Python, numpy, torch and the envs (each env copy gets its own seed derived from it)."""
    num_envs: int = 8
    """Env copies stepped in lockstep."""
    sticky_actions: float = 0.0
    """Repeat-action probability: 0.0 is the Atari 100k protocol, 0.25 the ALE v5 default."""
    device: str = "auto"
    """auto | cpu | cuda."""
    threads: int = 0
    """torch CPU threads; 0 = one per core."""
    amp: bool = True
    """bf16 autocast for the world model on CUDA (ignored on CPU)."""
    compile: bool = False
    """``torch.compile`` the world-model loss; the first updates wait for compilation. Measured: 1.9x
    faster updates on an H100; 1.16x on a 2-core CPU (``cpu`` preset) for 161 s of compiling per start."""
    cuda_graphs: bool = False
    """Replay each training step (world-model update, imagined rollout, PPO update, real-return critic
    step) as one CUDA graph, with fused optimizers and no host sync per step (``worldmodel/graphs.py``): on
    an H100 the eager world-model update spent 46-85 ms launching kernels for 0.3 ms of arithmetic. A
    skipped (non-finite) update still counts, and the non-finite stop is checked at each log line. Off
    CUDA the same steps run without capture; not with ``compile``; turned off under torchrun."""
    overlap_collection: bool = False
    """Collect each iteration's real steps in a background thread while the device learns from the
    replay, so it does not wait on the emulator. The thread acts with a CPU copy of the acting world model
    and policy taken when its steps start (one iteration staler than without) and random streams of its
    own, seeded from the seed and the env steps so far (a run from its start is reproducible; a resumed
    one seeds them afresh); its steps reach the replay at the next iteration, as they would. On a stop
    the steps in flight end early and are kept. Not under torchrun."""
    warmup_steps: int = 5_000
    """Random-action env steps before any learning."""
    collect_steps: int = 256
    """Env steps collected per Dyna iteration (all copies together)."""
    wm_train_ratio: float = 1 / 16
    """World-model gradient steps per env step."""
    policy_train_ratio: float = 1 / 16
    """Policy (imagination + PPO) updates per env step."""
    wm_pretrain_updates: int = 200
    """World-model updates right after warm-up, before the policy starts learning in imagination."""
    policy_start_updates: int = 0
    """World-model updates before the policy learns at all: PPO on an uninformed model collapses
    its entropy and exploits model errors (LESSONS.md)."""
    batch_size: int = 32
    """Sequences per world-model batch."""
    rewarded_fraction: float = 0.5
    """Share of each world-model batch drawn from sequences with a reward. At 0.25 the reward head saw
    ~12 rewarded pairs per Catch batch and stayed near 0.5 accuracy on rewarded steps; at 0.5 it
    reached 0.7-0.8 (cpu preset, 3 seeds to ~21k env steps)."""
    head_batch_size: int = 64
    """Extra real sequences (of 2W frames for heads reading ``W = world_model.reward.window`` latents: 2 for
    the pair; ``head_rewarded_fraction`` of them rewarded among their last W transitions) per world-model
    update for the reward and continue heads only: encoded without gradient, never decoded. 0 = none.
    On Catch (cpu preset, seeds 0 and 1) 64 raised the heads' early accuracy on rewarded steps and the
    last-100 return at 30k env steps from 0.18 / 0.82 to 0.86 / 0.88; a world-model update takes ~23% longer."""
    dynamics_batch_size: int = 0
    """Extra sequences of ``Kp + P`` frames (``Kp`` = ``world_model.predictor.context``, or ``K``) per
    world-model update for the predictor's latent and open-loop losses only: encoded without gradient,
    never decoded. 0 = none."""
    head_rewarded_fraction: float = 0.5
    """Share of the head batch drawn from rewarded transitions. The main batch already gives the heads
    ~100 unrewarded pairs per update, so rewarded ones are what the heads are short of."""
    head_ended_fraction: float = 0.0
    """Share of the head batch drawn from transitions where a life or the game ends (after the rewarded
    share), for the continue head; the main batch gives it ~3 such pairs per update on Breakout."""
    slow_world_model_decay: float = 0.0
    """When above 0, imagination and acting use a copy of the world model whose weights follow the
    trained one by an exponential moving average with this decay per world-model update (0.99: a time
    constant of ~100 updates), so the policy does not chase the trained model's short-lived errors.
    Checkpoints keep both; ``eval`` and ``watch`` use the copy. 0 = the trained model itself."""
    fit_head_shifts: bool = True
    """Before every policy phase, fit the reward and continue heads' logit shifts on real replay windows
    so that imagination predicts rewards and ends at the replay's rates (``WorldModel.calibrate_heads``;
    on Breakout the Bayes shift paid ~1/9 of the real reward). False: shift by the rates' prior
    log-odds (Bayes' rule), as before 2026-12-05."""
    replay_capacity: int = 100_000
    """Frames kept in replay (64x64 uint8: 100k frames ~ 410 MB)."""
    log_every: int = 1_000
    """Env steps between log lines."""
    checkpoint_every: int = 10_000
    """Env steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (older ones are deleted); resume falls back to an older one if the newest is broken."""
    image_every: int = 10_000
    """Env steps between TensorBoard images of real vs predicted next frames (0 = never)."""
    max_nonfinite_updates: int = 100
    """Consecutive updates with a NaN/inf loss (each skipped) after which the run stops."""
    world_model: WorldModelConfig = field(default_factory=WorldModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)


def _small_world_model(
    embed_dim: int, depth: int, heads: int, channels: tuple[int, ...], context: int, pred_steps: int
) -> WorldModelConfig:
    return WorldModelConfig(
        encoder=EncoderConfig(embed_dim=embed_dim, depth=depth, num_heads=heads),
        predictor=PredictorConfig(embed_dim=embed_dim, depth=depth, num_heads=heads),
        # One narrow cross-attention head: at 64x64 the decoder's 4096 queries dominate CPU time.
        decoder=DecoderConfig(embed_dim=embed_dim, channels=channels, attn_dim=16, num_heads=1),
        reward=RewardConfig(embed_dim=embed_dim, hidden_dim=embed_dim, num_heads=heads),
        context=context,
        pred_steps=pred_steps,
    )


def _cpu_world_model() -> WorldModelConfig:
    wm = _small_world_model(64, 2, 2, (32, 16, 8), context=4, pred_steps=3)
    # Breakout's ball (a faint ~3-pixel blob) stayed out of the latent under every pixel loss tried; with
    # the ball brightened and the motion map's per-object target, ball-position probes reached R^2
    # 0.43-0.57 after 3,000 updates (README, issue 3). On Catch (seeds 0-2, 30,720 env steps) the
    # last-100 return reached 0.9 at 10.8k / 12.0k / 15.1k env steps with both, 17.3k / 13.7k / 19.4k without.
    wm.pixel_gain = 3.0
    wm.loss.motion_map = 1.0
    # Gain 3 saturated Pong's grey field and erased it (docs/breakout_world_model.md); measured from the
    # frame's median colour, Breakout and Catch are unchanged and Pong's objects stand out.
    wm.subtract_background = True
    # The patch tokens flattened, not averaged, and a predictor that learns the change from the last
    # latent, trained on detached latents the heads do not pull on (docs/breakout_world_model.md: on
    # Breakout after 3,000 updates, ball x / y probes 0.77 / 0.93 against 0.57 / 0.44 for the mean, and
    # the predictor carries the ball where the mean-pooled one fell below holding the last latent).
    wm.encoder.pool, wm.encoder.flatten_dim = "flatten", 4
    for sub in (wm.predictor, wm.decoder, wm.reward):
        sub.embed_dim = wm.encoder.latent_dim
    wm.reward.hidden_dim = 64
    wm.predictor.residual = True
    wm.loss.heads_shape_predictor = False
    return wm


def preset(name: str) -> TrainConfig:
    """The named preset's configuration (a fresh copy)."""
    if name == "atari100k":
        # ARCHITECTURE.md's sizes, the Atari 100k protocol, a GPU-sized batch.
        return TrainConfig(
            steps=100_000,
            batch_size=64,
            world_model=WorldModelConfig(context=6, pred_steps=2),
            wm_train_ratio=1 / 4,
            policy_train_ratio=1 / 4,
            num_envs=8,
            warmup_steps=5_000,
            ppo=PPOConfig(num_starts=1024, horizon=5, critic_targets="real", self_imitation=1.0),  # as the cpu preset
            policy=PolicyConfig(hidden_dim=512),
            cuda_graphs=True,
            overlap_collection=True,
        )
    if name == "cpu":
        return TrainConfig(
            steps=100_000,
            batch_size=16,
            world_model=_cpu_world_model(),
            optim=OptimConfig(lr=1e-3),
            policy=PolicyConfig(history=3, hidden_dim=256),
            # Catch, seeds 0-2, 30,720 env steps: with the three settings marked (*) the last-100 return
            # reached 0.9 at 17k / 14k / 19k env steps and evaluated at 0.98 / 0.96 / 0.92; without the
            # slow copy, 26k / 21k / 27k and 0.94 / 0.58 / 0.86 (the policy followed the trained
            # model's short-lived errors); without any of them, 28k / 16k / never and 0.94 / 0.88 / 0.90.
            # The critic learns from real returns and imagination runs 5 steps (docs/breakout_world_model.md:
            # no world model here carries the ball to the paddle 10-18 steps open loop; a policy in the fixed
            # imagination of a 55k Breakout model scored 6.63 / 5.19 with it, 4.44 / 2.75 without; a learning
            # run branched at 55.6k evaluated at 10.85 at 80k, against 5.45 / 1.80 for the imagined critic).
            # Self-imitation on the same real returns: Breakout seeds 0-2 at 100k, 100 episodes each, scored
            # 13.09 / 13.77 / 14.14 against 8.07 / 11.84 / 8.09 without it (breakout_world_model.md, session 31;
            # before the fix to the final frame's real return, whose effect is not measured).
            ppo=PPOConfig(
                num_starts=128, entropy_coef=1e-2, epochs=4, horizon=5, critic_targets="real", self_imitation=1.0
            ),  # (*) epochs
            head_rewarded_fraction=1.0,  # (*)
            dynamics_batch_size=48,
            slow_world_model_decay=0.99,  # (*)
            warmup_steps=2_000,
            # The representation needs many hundreds of updates before it places ball and paddle
            # (measured on Catch); the policy waits for it (LESSONS.md: PPO exploits an uninformed model).
            wm_pretrain_updates=800,
            # On Catch the latent placed paddle and ball, and the reward head reached ~0.6 on rewarded
            # steps, after ~1.2k updates; a policy trained before that collapsed to near-zero entropy.
            policy_start_updates=1_200,
            wm_train_ratio=1 / 16,
            policy_train_ratio=1 / 16,
        )
    if name == "debug":
        return TrainConfig(
            steps=600,
            num_envs=2,
            batch_size=8,
            head_batch_size=8,
            warmup_steps=100,
            collect_steps=50,
            wm_train_ratio=1 / 10,
            policy_train_ratio=1 / 25,
            wm_pretrain_updates=10,
            replay_capacity=2_000,
            log_every=100,
            checkpoint_every=0,
            image_every=300,
            world_model=_small_world_model(32, 1, 2, (16, 8, 8), context=3, pred_steps=2),
            optim=OptimConfig(lr=1e-3, warmup_updates=5),
            policy=PolicyConfig(history=2, hidden_dim=64),
            ppo=PPOConfig(num_starts=32, horizon=5),
        )
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> TrainConfig:
    """Rebuild a TrainConfig from :func:`to_dict` output (tuples restored from JSON lists)."""
    wm = d["world_model"]
    dec = {**wm["decoder"], "channels": tuple(wm["decoder"]["channels"])}
    world_model = WorldModelConfig(
        encoder=EncoderConfig(**wm["encoder"]),
        predictor=PredictorConfig(**wm["predictor"]),
        decoder=DecoderConfig(**dec),
        reward=RewardConfig(**wm["reward"]),
        loss=type(WorldModelConfig().loss)(**wm["loss"]),
        **{k: v for k, v in wm.items() if k not in ("encoder", "predictor", "decoder", "reward", "loss")},
    )
    top = {k: v for k, v in d.items() if k not in ("world_model", "optim", "policy", "ppo")}
    return TrainConfig(
        **top,
        world_model=world_model,
        optim=OptimConfig(**d["optim"]),
        policy=PolicyConfig(**d["policy"]),
        ppo=PPOConfig(**d["ppo"]),
    )


def parse_config(args: list[str], default: TrainConfig, description: str) -> TrainConfig:
    """tyro's parse of the config fields; its boxed error becomes one :class:`UsageError` line."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            return tyro.cli(
                TrainConfig,
                default=default,
                args=args,
                prog="wm-agent train",
                description=description,
                config=(tyro.conf.FlagConversionOff,),
            )
    except SystemExit as e:
        if not e.code:  # --help
            sys.stdout.write(out.getvalue())
            raise
        lines = [ln.strip(" \t│╭╮╰╯") for ln in (err.getvalue() + out.getvalue()).splitlines()]
        lines = [ln for ln in lines if ln.strip("─-━ ")]  # drop rules and blank lines
        # lines[0] is the box title ("Value error"); the reason follows it.
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else "invalid arguments")
        raise UsageError(f"{detail} (see wm-agent train --help)") from None


def validate_config(cfg: TrainConfig) -> None:
    """Reject settings that would fail deep inside a run, naming the flag (raises :class:`UsageError`)."""
    if cfg.steps <= 0:
        raise UsageError(f"--steps must be positive, got {cfg.steps}")
    if cfg.num_envs <= 0:
        raise UsageError(f"--num-envs must be positive, got {cfg.num_envs}")
    if cfg.ppo.critic_targets not in ("imagined", "real"):
        raise UsageError(f"--ppo.critic-targets must be imagined or real, got {cfg.ppo.critic_targets!r}")
    if cfg.ppo.self_imitation < 0:
        raise UsageError(f"--ppo.self-imitation must be >= 0, got {cfg.ppo.self_imitation}")
    if cfg.ppo.self_imitation > 0 and cfg.ppo.critic_targets != "real":
        raise UsageError(
            f"--ppo.self-imitation {cfg.ppo.self_imitation} needs --ppo.critic-targets real "
            "(the cpu and atari100k presets use both; add --ppo.self-imitation 0 for imagined targets)"
        )
    if cfg.ppo.horizon <= 0:
        raise UsageError(f"--ppo.horizon must be positive, got {cfg.ppo.horizon}")
    if cfg.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {cfg.batch_size}")
    if not 0.0 <= cfg.sticky_actions < 1.0:
        raise UsageError(f"--sticky-actions must be in [0, 1), got {cfg.sticky_actions}")
    for name in ("rewarded_fraction", "head_rewarded_fraction", "head_ended_fraction"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise UsageError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(cfg, name)}")
    if cfg.head_rewarded_fraction + cfg.head_ended_fraction > 1.0:
        raise UsageError("--head-rewarded-fraction and --head-ended-fraction must add up to at most 1")
    if not 0.0 <= cfg.slow_world_model_decay < 1.0:
        raise UsageError(f"--slow-world-model-decay must be in [0, 1), got {cfg.slow_world_model_decay}")
    for name in ("log_every", "collect_steps", "keep_checkpoints", "max_nonfinite_updates"):
        if getattr(cfg, name) <= 0:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.checkpoint_every < 0 or cfg.image_every < 0 or cfg.warmup_steps < 0:
        raise UsageError("--checkpoint-every, --image-every and --warmup-steps must not be negative")
    if cfg.cuda_graphs and cfg.compile:
        raise UsageError("--cuda-graphs and --compile do not go together: choose one (--cuda-graphs False)")
    try:
        cfg.world_model.validate()
    except ValueError as e:
        flag = re.sub(r"`([\w.]+)`", lambda m: "--world-model." + m.group(1).replace("_", "-"), str(e))
        raise UsageError(flag) from None
    if cfg.replay_capacity // cfg.num_envs < cfg.world_model.seq_len:
        raise UsageError(
            f"--replay-capacity {cfg.replay_capacity} cannot hold sequences of "
            f"{cfg.world_model.seq_len} frames in each of {cfg.num_envs} envs"
        )
    if max(cfg.warmup_steps, cfg.collect_steps) // cfg.num_envs < cfg.world_model.seq_len:
        raise UsageError(
            f"the first world-model batch needs sequences of {cfg.world_model.seq_len} frames "
            f"(--world-model.context + --world-model.pred-steps), but warm-up gives each of the {cfg.num_envs} "
            f"envs only {max(cfg.warmup_steps, cfg.collect_steps) // cfg.num_envs}; raise --warmup-steps"
        )
