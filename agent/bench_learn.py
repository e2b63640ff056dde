"""``wm-agent bench learn``: wm-agent and stable-baselines3 PPO on the same env, budget and protocol.

Per seed, both agents train for the same number of env steps on ``envs.make_env`` copies and are
then scored over the same number of full evaluation episodes. Reported: the mean score per seed and
its ratio, the env steps each needed for its last-100-episode mean to reach ``--threshold``, and a
PNG of both learning curves.

With ``--runs RUN_DIR ...`` the wm-agent side is runs already trained by ``wm-agent train`` (long runs,
stopped and resumed): each is scored from its newest checkpoint, and SB3 PPO trains on that run's env,
seed and env steps.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from agent.checkpoint import CheckpointError
from agent.config import PRESETS, TrainConfig, preset, to_dict
from agent.dyna import DynaTrainer, LoadedAgent, load_agent, resolve_device
from agent.evaluate import evaluate
from agent.logger import RunLogger
from agent.machine import machine_info
from agent.policy import ActorCritic
from worldmodel.world_model import WorldModel


def rolling_curve(end_steps: list[int], returns: list[float], window: int = 100) -> tuple[list[int], list[float]]:
    """Mean of the last ``window`` episode returns after each episode: ``(env steps, mean)``."""
    r = np.asarray(returns, dtype=np.float64)
    means = [float(r[max(0, i + 1 - window) : i + 1].mean()) for i in range(len(r))]
    return list(end_steps), means


def steps_to_threshold(steps: list[int], means: list[float], threshold: float, window: int = 100) -> int | None:
    """First env step at which a full ``window``-episode mean reaches ``threshold`` (None if never)."""
    for i, (s, m) in enumerate(zip(steps, means, strict=True)):
        if i + 1 >= window and m >= threshold:
            return int(s)
    return None


def run_wm_agent(args: argparse.Namespace, seed: int, out: Path, console: Console) -> dict:
    cfg = preset(args.preset)
    cfg.env, cfg.steps, cfg.seed, cfg.threads, cfg.device = args.env, args.steps, seed, args.threads, args.device
    run_dir = out / f"wm-agent_seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    trainer = DynaTrainer(cfg, run_dir)
    logger = RunLogger(run_dir, cfg.steps, console=console)
    t0 = time.time()
    try:
        summary = trainer.train(logger)
    finally:
        logger.close()
    seconds = time.time() - t0
    return {
        "run_dir": str(run_dir),
        "env_steps": summary["env_steps"],
        "train_seconds": seconds,
        **scored(
            trainer.wm_act, trainer.policy, cfg, args.episodes, trainer.episode_end_steps, trainer.episode_returns
        ),
        "time_split_s": {k[5:-2]: v for k, v in summary.items() if k.startswith("time_")},
    }


def scored(
    wm: WorldModel, policy: ActorCritic, cfg: TrainConfig, episodes: int, end_steps: list[int], returns: list[float]
) -> dict:
    """A trained wm-agent's evaluation (``episodes`` full episodes, seed 10000 + the run's seed) and its
    training curve (none where the episodes' end steps were not kept)."""
    device = next(wm.parameters()).device
    scores = evaluate(wm, policy, cfg.env, episodes, 10_000 + cfg.seed, device, sticky_actions=cfg.sticky_actions)
    steps, means = rolling_curve(end_steps, returns) if len(end_steps) == len(returns) else ([], [])
    return {"eval_returns": scores, "eval_mean": float(np.mean(scores)), "curve_steps": steps, "curve_last100": means}


def run_from_checkpoint(run_dir: Path, loaded: LoadedAgent, episodes: int) -> dict:
    """A run trained by ``wm-agent train``, scored like :func:`run_wm_agent` scores its own."""
    return {
        "run_dir": str(run_dir),
        "checkpoint": str(loaded.checkpoint),
        "env_steps": loaded.env_steps,
        "train_seconds": loaded.train_seconds,
        **scored(loaded.wm, loaded.policy, loaded.cfg, episodes, loaded.episode_end_steps, loaded.episode_returns),
    }


def run_sb3(args: argparse.Namespace, seed: int, steps: int, sticky_actions: float) -> dict:
    from agent.baseline import evaluate_ppo, train_ppo

    device = "cuda" if args.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    model, episodes, seconds = train_ppo(args.env, steps, seed, sticky_actions, device=device)
    scores = evaluate_ppo(model, args.env, args.episodes, 10_000 + seed, sticky_actions)
    steps, means = rolling_curve([s for s, _ in episodes], [r for _, r in episodes])
    return {
        "env_steps": int(model.num_timesteps),
        "train_seconds": seconds,
        "eval_returns": scores,
        "eval_mean": float(np.mean(scores)),
        "curve_steps": steps,
        "curve_last100": means,
    }


def plot_curves(
    results: list[dict], path: Path, title: str, threshold: float | None, random_level: float | None = None
) -> None:
    """Last-100 curves of each result's ``wm_agent`` and (when present) ``sb3_ppo`` entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for agent, color in (("wm_agent", "tab:blue"), ("sb3_ppo", "tab:orange")):
        for i, r in enumerate(results):
            if agent not in r:
                continue
            label = ("wm-agent" if agent == "wm_agent" else "SB3 PPO") if i == 0 else None
            first = 99 if len(r[agent]["curve_steps"]) > 100 else 0  # from the first full 100-episode window
            xs, ys = r[agent]["curve_steps"][first:], r[agent]["curve_last100"][first:]
            ax.plot(xs, ys, color=color, alpha=0.8, label=label)
    if threshold is not None:
        ax.axhline(threshold, color="k", ls="--", lw=0.8, label=f"threshold {threshold}")
    if random_level is not None:
        ax.axhline(random_level, color="gray", ls=":", lw=1.0, label=f"random play {random_level}")
    ax.set_xlabel("env steps")
    ax.set_ylabel("mean return, last 100 training episodes")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _round_to_rollouts(steps: int) -> int:
    """SB3's PPO collects whole rollouts of 8 envs x 128 steps: ``steps`` rounded up to them."""
    rollout = 8 * 128
    return -(-steps // rollout) * rollout


def _load_runs(paths: list[str], device_name: str, console: Console) -> list[tuple[Path, LoadedAgent]] | str:
    """The trained runs of ``--runs`` (one env), or a one-line reason they cannot be compared."""
    runs = []
    for p in paths:
        run_dir = Path(p)
        if not (run_dir / "config.json").is_file():
            return f"{run_dir} is not a wm-agent run directory (no config.json)"
        try:
            loaded = load_agent(run_dir, resolve_device(device_name), warn=console.print)
        except (CheckpointError, RuntimeError, KeyError, ValueError, OSError) as e:
            return f"cannot load {run_dir}: {str(e).splitlines()[0]}"
        runs.append((run_dir, loaded))
    envs = sorted({loaded.cfg.env for _, loaded in runs})
    if len(envs) > 1:
        return f"--runs must all be on one env, got {', '.join(envs)}"
    return runs


def learn_main(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    if args.episodes <= 0 or (not args.runs and (args.steps <= 0 or args.seeds <= 0)):
        console.print("[bold red]error:[/] --steps, --seeds and --episodes must be positive")
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    runs: list[tuple[Path, LoadedAgent]] = []
    if args.runs:
        loaded_runs = _load_runs(args.runs, args.device, console)
        if isinstance(loaded_runs, str):
            console.print(f"[bold red]error:[/] {loaded_runs}")
            return 2
        runs = loaded_runs
        args.env = runs[0][1].cfg.env
        lengths = {loaded.env_steps for _, loaded in runs}
        args.steps = lengths.pop() if len(lengths) == 1 else None  # per run in each seed's row otherwise
        args.preset = None
    elif args.steps != _round_to_rollouts(args.steps):
        args.steps = _round_to_rollouts(args.steps)
        console.print(f"budget rounded up to {args.steps} env steps (whole SB3 PPO rollouts of 8 x 128)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("runs") / f"bench_learn_{args.env.replace('/', '_')}_{stamp}"
    if (out / "learn.json").exists():
        console.print(f"[bold red]error:[/] {out} already holds results; choose another --out")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    if runs:
        jobs = [(loaded.cfg.seed, run_dir, loaded) for run_dir, loaded in runs]
    else:
        jobs = [(seed, None, None) for seed in range(args.seed, args.seed + args.seeds)]
    results = []
    sb3_done: dict[tuple[int, int, float], dict] = {}  # a run and its branch share their seed and budget
    for seed, run_dir, loaded in jobs:
        if loaded is None:
            console.print(f"seed {seed}: wm-agent ({args.preset} preset), {args.steps} env steps on {args.env}")
            wm = run_wm_agent(args, seed, out, console)
            sb3_steps, sticky = args.steps, preset(args.preset).sticky_actions
        else:
            stopped = "" if loaded.env_steps >= loaded.cfg.steps else f", stopped early of {loaded.cfg.steps}"
            console.print(
                f"seed {seed}: {run_dir} ({loaded.env_steps} env steps trained{stopped}): "
                f"{args.episodes} evaluation episodes",
                highlight=False,
            )
            wm = run_from_checkpoint(run_dir, loaded, args.episodes)
            sb3_steps, sticky = _round_to_rollouts(loaded.env_steps), loaded.cfg.sticky_actions
        if (seed, sb3_steps, sticky) not in sb3_done:
            console.print(f"seed {seed}: stable-baselines3 PPO, {sb3_steps} env steps, sticky actions {sticky}")
            sb3_done[seed, sb3_steps, sticky] = run_sb3(args, seed, sb3_steps, sticky)
        sb3 = dict(sb3_done[seed, sb3_steps, sticky])
        row = {"seed": seed, "wm_agent": wm, "sb3_ppo": sb3}
        if args.threshold is not None:
            for agent in (wm, sb3):
                agent["steps_to_threshold"] = steps_to_threshold(
                    agent["curve_steps"], agent["curve_last100"], args.threshold
                )
        results.append(row)
        (out / "learn.json").write_text(json.dumps(_summary(args, results), indent=2))
    summary = _summary(args, results)
    (out / "learn.json").write_text(json.dumps(summary, indent=2))
    budget = "runs of different lengths" if args.steps is None else f"{args.steps} env steps"
    plot_curves(results, out / "learn.png", f"{args.env}, {budget}, {len(results)} seed(s)", args.threshold)

    table = Table(title=f"bench learn: {args.env}, {budget}, {args.episodes} eval episodes per seed")
    cols = ["seed", "wm-agent score", "SB3 PPO score", "ratio", "wm-agent train min", "SB3 train min"]
    if args.threshold is not None:
        cols += [f"wm-agent steps to {args.threshold}", f"SB3 steps to {args.threshold}"]
    for col in cols:
        table.add_column(col, justify="right")
    for r in results:
        w, b = r["wm_agent"], r["sb3_ppo"]
        cells = [
            str(r["seed"]),
            f"{w['eval_mean']:.2f}",
            f"{b['eval_mean']:.2f}",
            _ratio(w["eval_mean"], b["eval_mean"]),
            "-" if w["train_seconds"] is None else f"{w['train_seconds'] / 60:.1f}",
            f"{b['train_seconds'] / 60:.1f}",
        ]
        if args.threshold is not None:
            cells += [str(w["steps_to_threshold"] or "not reached"), str(b["steps_to_threshold"] or "not reached")]
        table.add_row(*cells)
    console.print(table)
    console.print(f"written to {out / 'learn.json'} and {out / 'learn.png'}")
    return 0


def _ratio(a: float, b: float) -> str:
    """wm-agent's score over SB3's; only meaningful when both are positive."""
    return f"{a / b:.2f}" if a > 0 and b > 0 else "-"


def _summary(args: argparse.Namespace, results: list[dict]) -> dict:
    w = [r["wm_agent"]["eval_mean"] for r in results]
    b = [r["sb3_ppo"]["eval_mean"] for r in results]
    return {
        "env_id": args.env,
        "steps": args.steps,
        "preset": args.preset,
        "episodes": args.episodes,
        "threshold": args.threshold,
        "machine": machine_info(torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")),
        "date": time.strftime("%Y-%m-%d"),
        "wm_agent_mean": float(np.mean(w)),
        "sb3_ppo_mean": float(np.mean(b)),
        "ratio": float(np.mean(w) / np.mean(b)) if np.mean(w) > 0 and np.mean(b) > 0 else None,
        "seeds": results,
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("learn", help="wm-agent vs stable-baselines3 PPO: same env, budget and evaluation")
    p.add_argument("--env", default="wm/Catch-v0")
    p.add_argument("--steps", type=int, default=30_000, help="env steps per agent and seed")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0, help="first seed")
    p.add_argument("--preset", default="cpu", choices=PRESETS, help="wm-agent preset")
    p.add_argument("--episodes", type=int, default=20, help="full evaluation episodes per agent and seed")
    p.add_argument("--threshold", type=float, default=None, help="report env steps to this last-100 mean")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = one per core)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="output directory (default runs/bench_learn_<env>_<date>-<time>)")
    p.add_argument(
        "--runs",
        nargs="+",
        default=None,
        metavar="RUN_DIR",
        help="score these `wm-agent train` runs instead of training wm-agent; SB3 PPO trains on each run's "
        "env, seed, env steps and sticky actions (--env, --steps, --seeds, --seed and --preset are then unused); "
        "a run's training minutes are its own, over every stop and resume, on the machine it ran on",
    )
