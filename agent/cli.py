"""The ``wm-agent`` command line: ``train`` (more subcommands come with later issues)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tyro
from rich.console import Console
from rich.table import Table

from agent.config import PRESETS, TrainConfig, preset, to_dict
from agent.dyna import DeviceError, DynaTrainer, load_agent, load_run_config, resolve_device
from agent.evaluate import evaluate, human_normalised
from agent.logger import RunLogger
from agent.replay import ReplayError
from envs import EnvSpecError

USAGE = """usage: wm-agent <command> [options]

A model-based RL agent for Atari: a video-ViT world model trained online, PPO in imagination.

commands:
  train   train an agent:  wm-agent train --env ALE/Breakout-v5 [--preset cpu] [--steps N] ...
  eval    score a trained agent over full episodes:  wm-agent eval RUN_DIR [--episodes 100]
  bench   speed against the machine's limits (bench speed), world-model quality (bench world-model)

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


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="wm-agent eval",
        description="Score a trained agent over full episodes (life loss is not an end; unclipped scores).",
    )
    p.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint file")
    p.add_argument("--episodes", type=int, default=100, help="full episodes to play (default 100)")
    p.add_argument("--seed", type=int, default=10_000, help="env seed (default 10000, apart from training seeds)")
    p.add_argument("--num-envs", type=int, default=8, help="env copies played in parallel")
    p.add_argument("--greedy", action="store_true", help="take the most likely action instead of sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default=None, help="results JSON (default RUN_DIR/eval.json)")
    args = p.parse_args(argv)
    if args.episodes <= 0 or args.num_envs <= 0:
        return _fail("--episodes and --num-envs must be positive")
    try:
        device = resolve_device(args.device)
        loaded = load_agent(Path(args.run), device)
    except (DeviceError, FileNotFoundError) as e:
        return _fail(str(e))
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        return _fail(f"cannot load a checkpoint from {args.run}: {str(e).splitlines()[0]}")
    cfg = loaded.cfg
    console = Console()
    console.print(
        f"evaluating {loaded.checkpoint} ({loaded.env_steps} env steps trained) on {cfg.env}, "
        f"{args.episodes} episodes, sticky actions {cfg.sticky_actions}",
        highlight=False,
    )
    returns = evaluate(
        loaded.wm,
        loaded.policy,
        cfg.env,
        args.episodes,
        args.seed,
        device,
        num_envs=args.num_envs,
        sticky_actions=cfg.sticky_actions,
        greedy=args.greedy,
    )
    r = np.asarray(returns)
    hns = human_normalised(cfg.env, float(r.mean()))
    result = {
        "env_id": cfg.env,
        "env_steps_trained": loaded.env_steps,
        "episodes": len(returns),
        "returns": returns,
        "mean": float(r.mean()),
        "std": float(r.std()),
        "median": float(np.median(r)),
        "min": float(r.min()),
        "max": float(r.max()),
        "hns": hns,
        "seed": args.seed,
        "sticky_actions": cfg.sticky_actions,
        "greedy": args.greedy,
        "checkpoint": str(loaded.checkpoint),
    }
    table = Table(title=f"{cfg.env}: {len(returns)} full episodes")
    for col in ("mean +- std", "median", "min", "max", "HNS"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{r.mean():.2f} +- {r.std():.2f}",
        f"{np.median(r):.2f}",
        f"{r.min():.2f}",
        f"{r.max():.2f}",
        "-" if hns is None else f"{hns:.3f}",
    )
    console.print(table)
    run_dir = Path(args.run) if Path(args.run).is_dir() else loaded.checkpoint.parent.parent
    out = Path(args.out) if args.out else run_dir / "eval.json"
    out.write_text(json.dumps(result, indent=2))
    console.print(f"results written to {out}", highlight=False)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        return train_main(rest)
    if cmd == "eval":
        return eval_main(rest)
    if cmd == "bench":
        from agent.bench import bench_main

        try:
            return bench_main(rest, resolve_device)
        except (DeviceError, EnvSpecError) as e:
            return _fail(str(e))
    return _fail(f"unknown command {cmd!r}; run 'wm-agent --help'")


if __name__ == "__main__":
    sys.exit(main())
