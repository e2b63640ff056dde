"""The ``wm-agent`` command line: ``train`` (more subcommands come with later issues)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import tyro
from rich.console import Console

from agent.config import PRESETS, TrainConfig, preset, to_dict
from agent.dyna import DeviceError, DynaTrainer, load_run_config
from agent.logger import RunLogger
from agent.replay import ReplayError
from envs import EnvSpecError

USAGE = """usage: wm-agent <command> [options]

A model-based RL agent for Atari: a video-ViT world model trained online, PPO in imagination.

commands:
  train   train an agent:  wm-agent train --env ALE/Breakout-v5 [--preset cpu] [--steps N] ...

Run 'wm-agent <command> --help' for a command's options.
"""


class UsageError(ValueError):
    """Bad input on the command line."""


def _fail(msg: str) -> int:
    Console(stderr=True).print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return 2


def default_run_dir(cfg: TrainConfig, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.env.replace('/', '_')}__{name}__{cfg.seed}__{stamp}"


def _validate(cfg: TrainConfig) -> None:
    if cfg.steps <= 0:
        raise UsageError(f"--steps must be positive, got {cfg.steps}")
    if cfg.num_envs <= 0:
        raise UsageError(f"--num-envs must be positive, got {cfg.num_envs}")
    if cfg.ppo.horizon <= 0:
        raise UsageError(f"--ppo.horizon must be positive, got {cfg.ppo.horizon}")
    if cfg.batch_size <= 0:
        raise UsageError(f"--batch-size must be positive, got {cfg.batch_size}")
    if not 0.0 <= cfg.sticky_actions < 1.0:
        raise UsageError(f"--sticky-actions must be in [0, 1), got {cfg.sticky_actions}")
    if cfg.replay_capacity // cfg.num_envs < cfg.world_model.seq_len:
        raise UsageError(
            f"--replay-capacity {cfg.replay_capacity} cannot hold sequences of "
            f"{cfg.world_model.seq_len} frames in each of {cfg.num_envs} envs"
        )


def train_main(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    pre.add_argument("--run-dir", default=None)
    pre.add_argument("--resume", default=None)
    pre.add_argument("--name", default="wm-agent")
    known, rest = pre.parse_known_args(argv)
    if known.resume:
        run_dir = Path(known.resume)
        if not (run_dir / "config.json").is_file():
            return _fail(f"{run_dir} is not a wm-agent run directory (no config.json)")
        cfg = load_run_config(run_dir)
        if rest:
            return _fail("--resume takes no other options: the run continues with its saved config")
    else:
        name = known.preset or ("atari100k" if torch.cuda.is_available() else "cpu")
        if name not in PRESETS:
            return _fail(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        description = (
            f"Train wm-agent. Preset: {name} (--preset {{{','.join(PRESETS)}}}). "
            "Also: --run-dir DIR, --resume RUN_DIR, --name NAME."
        )
        cfg = tyro.cli(
            TrainConfig,
            default=preset(name),
            args=rest,
            prog="wm-agent train",
            description=description,
            config=(tyro.conf.FlagConversionOff,),
        )
        run_dir = Path(known.run_dir) if known.run_dir else default_run_dir(cfg, known.name)
        if (run_dir / "config.json").exists():
            return _fail(
                f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, or choose another --run-dir"
            )
    try:
        _validate(cfg)
        trainer = DynaTrainer(cfg, run_dir, resume=bool(known.resume))
    except (EnvSpecError, DeviceError, ReplayError, UsageError, ValueError) as e:
        return _fail(str(e))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    console = Console()
    console.print(
        f"wm-agent train: {cfg.env} ({trainer.env.num_actions} actions, sticky actions "
        f"{cfg.sticky_actions}), {cfg.steps} env steps, device {trainer.device}, run dir {run_dir}",
        highlight=False,
    )
    logger = RunLogger(run_dir, cfg.steps, start_step=trainer.counters.env_steps, console=console)
    try:
        summary = trainer.train(logger)
    finally:
        logger.close()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(
        f"done: {summary['env_steps']} env steps, {summary['episodes']} episodes, "
        f"mean return of the last 100 episodes {summary['return_last100']:.3f}; "
        f"checkpoint in {trainer.checkpoint_path()}",
        highlight=False,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    return _fail(f"unknown command {cmd!r}; run 'wm-agent --help'")


if __name__ == "__main__":
    sys.exit(main())
