"""The ``wm-agent`` command line: ``train``, ``eval``, ``watch``, ``play`` and ``bench``."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from agent import distributed
from agent.checkpoint import CheckpointError
from agent.config import PRESETS, TrainConfig, UsageError, parse_config, preset, to_dict, validate_config
from agent.dyna import (
    DeviceError,
    DynaTrainer,
    LoadedAgent,
    NonFiniteError,
    load_agent,
    load_run_config,
    resolve_device,
)
from agent.evaluate import evaluate, human_normalised
from agent.logger import RunLogger
from agent.replay import ReplayError
from envs import EnvSpecError

USAGE = """usage: wm-agent <command> [options]

A model-based RL agent for Atari: a video-ViT world model trained online, PPO in imagination.

commands:
  train   train an agent:  wm-agent train --env ALE/Breakout-v5 [--preset cpu] [--steps N] ...
  eval    score a trained agent over full episodes:  wm-agent eval RUN_DIR [--episodes 100]
  watch   real vs imagined video of a trained agent:  wm-agent watch RUN_DIR [--steps 64] [--out FILE.gif|.mp4]
  play    play inside the world model in a browser, beside the real game:  wm-agent play RUN_DIR [--port 8000]
  bench   speed against the machine's limits (bench speed), world-model quality (bench world-model),
          wm-agent vs stable-baselines3 PPO on one budget (bench learn), CUDA graphs vs eager (bench graphs)

Run 'wm-agent <command> --help' for a command's options.
"""


def _fail(msg: str, code: int = 2) -> int:
    Console(stderr=True).print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    return code


def _warn(msg: str) -> None:
    Console(stderr=True).print(f"[bold yellow]warning:[/] {msg}", highlight=False, soft_wrap=True)


def _quiet(msg: str) -> None:
    """Warnings of ranks other than 0, which repeat rank 0's."""


def default_run_dir(cfg: TrainConfig, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.env.replace('/', '_')}__{name}__{cfg.seed}__{stamp}"


class RunDirBusy(RuntimeError):
    """Another wm-agent process holds the run directory."""


def _lock(run_dir: Path):  # noqa: ANN202 - an open file whose close() releases the lock
    """An exclusive lock on ``RUN_DIR/.lock`` so two processes never write one run's checkpoints."""
    import fcntl

    f = open(run_dir / ".lock", "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RunDirBusy(f"{run_dir} is in use by another wm-agent process (it holds {run_dir / '.lock'})") from None
    return f


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


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
        try:
            cfg = load_run_config(run_dir)
        except (OSError, ValueError, KeyError, TypeError) as e:
            return _fail(f"cannot read {run_dir / 'config.json'}: {str(e).splitlines()[0]}")
        more = argparse.ArgumentParser(add_help=False)
        more.add_argument("--steps", type=int, default=None)
        more.add_argument("--threads", type=int, default=None)
        extra, rest = more.parse_known_args(rest)
        if rest:
            return _fail(
                "--resume takes no options but --steps (a new total) and --threads (this machine's): "
                "the run continues with its saved config"
            )
        if extra.steps is not None:
            if extra.steps <= 0:
                return _fail(f"--steps must be positive, got {extra.steps}")
            cfg.steps = extra.steps
        if extra.threads is not None:
            if extra.threads < 0:
                return _fail(f"--threads must be >= 0 (0 = one per core), got {extra.threads}")
            cfg.threads = extra.threads
    else:
        name = known.preset or ("atari100k" if torch.cuda.is_available() else "cpu")
        if name not in PRESETS:
            return _fail(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        description = (
            f"Train wm-agent. Preset: {name} (--preset {{{','.join(PRESETS)}}}). "
            "Also: --run-dir DIR, --name NAME, --resume RUN_DIR [--steps NEW_TOTAL] [--threads N]."
        )
        try:
            cfg = parse_config(rest, preset(name), description)
        except UsageError as e:
            return _fail(str(e))
        run_dir = Path(known.run_dir) if known.run_dir else default_run_dir(cfg, known.name)
        if (run_dir / "config.json").exists():
            return _fail(
                f"{run_dir} already holds a run; pass --resume {run_dir} to continue it, or choose another --run-dir"
            )
    try:
        validate_config(cfg)
    except UsageError as e:
        return _fail(str(e))
    try:
        ctx = distributed.from_environment(cfg.device)
    except (RuntimeError, ValueError, KeyError) as e:
        return _fail(f"cannot join the torchrun process group: {str(e).splitlines()[0]}")
    try:
        return _train(cfg, run_dir, known.resume, ctx)
    finally:
        if ctx is not None:
            ctx.close()


def _train(cfg: TrainConfig, run_dir: Path, resume: str | None, ctx: distributed.Distributed | None) -> int:
    """``wm-agent train`` once the config and run directory are known; ``ctx`` when this process is one
    of several ranks (only rank 0 writes the run directory and prints)."""
    main = ctx is None or ctx.is_main
    if ctx is not None:
        run_dir = Path(ctx.broadcast(str(run_dir)))  # default names hold a time stamp
        per_rank = cfg.replay_capacity // ctx.world_size // cfg.num_envs
        if per_rank < cfg.world_model.seq_len:
            msg = f"--replay-capacity {cfg.replay_capacity} over {ctx.world_size} ranks of {cfg.num_envs} envs"
            need = cfg.world_model.seq_len
            return _fail(f"{msg} leaves {per_rank} frames per stream, less than one sequence of {need}") if main else 2
        if cfg.cuda_graphs:  # the graphed step decides its skips on the device, where ranks cannot agree
            cfg.cuda_graphs = False
            if main:
                print("wm-agent train: --cuda-graphs is for one process; under torchrun the updates run eagerly")
        if cfg.overlap_collection:  # the ranks stop together through collectives the thread cannot join
            cfg.overlap_collection = False
            if main:
                print("wm-agent train: --overlap-collection is for one process; under torchrun ranks collect in turn")
    holder: dict[str, DynaTrainer | None] = {"trainer": None}
    early_stop = []

    def on_signal(signum: int, _frame: object) -> None:
        trainer = holder["trainer"]
        if trainer is None:  # still building or loading: stop before training starts
            early_stop.append(signum)
        elif not trainer.stop_requested:
            trainer.request_stop()
        elif ctx is None:  # a second signal: stop at once, without a checkpoint
            raise KeyboardInterrupt
        # Under torchrun a Ctrl-C reaches each rank twice (from the terminal and from the launcher):
        # the ranks keep stopping together; the launcher kills them if they take too long.

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def agreed(error: str | None) -> str | None:
        """In a multi-rank run, the first error of any rank (rank 0 prints it; the others exit quietly)."""
        return error if ctx is None else ctx.first_error(error)

    lock = None
    try:
        error = None
        if resume and main:
            try:
                lock = _lock(run_dir)
            except RunDirBusy as e:
                error = str(e)
        if error := agreed(error):
            return _fail(error) if main else 2
        try:
            trainer = DynaTrainer(cfg, run_dir, resume=bool(resume), warn=_warn if main else _quiet, dist=ctx)
        except (EnvSpecError, DeviceError, ReplayError, UsageError, CheckpointError, ValueError) as e:
            error = str(e)
        except (RuntimeError, KeyError, TypeError, OSError) as e:
            what = f"resume {run_dir}" if resume else "start the run"
            error = f"cannot {what}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if error := agreed(error):
            return _fail(error) if main else 2
        if ctx.any(bool(early_stop)) if ctx is not None else early_stop:
            if main:
                Console(soft_wrap=True).print("interrupted before training started; nothing was written")
            return 0
        holder["trainer"] = trainer
        console = Console(soft_wrap=True, quiet=not main)
        if main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = lock or _lock(run_dir)
                _write_atomic(run_dir / "config.json", json.dumps(to_dict(cfg), indent=2))
            except (RunDirBusy, OSError) as e:
                error = str(e)
        if error := agreed(error):  # also: the run directory exists before any rank writes into it
            return _fail(error) if main else 2
        resumed = f", resumed at step {trainer.counters.env_steps} from {trainer.last_checkpoint}" if resume else ""
        ranks = f", {ctx.world_size} ranks x {cfg.num_envs} envs" if ctx is not None else ""
        console.print(
            f"wm-agent train: {cfg.env} ({trainer.env.num_actions} actions, sticky actions "
            f"{cfg.sticky_actions}), {cfg.steps} env steps, device {trainer.device}{ranks}, run dir {run_dir}{resumed}",
            highlight=False,
        )
        logger = RunLogger(run_dir, cfg.steps, start_step=trainer.counters.env_steps, console=console, dist=ctx)
        try:
            summary = trainer.train(logger)
        except KeyboardInterrupt:
            last = trainer.last_checkpoint or "none written"
            return _fail(f"aborted without a new checkpoint (last checkpoint: {last})", code=130)
        except ReplayError as e:  # e.g. episodes shorter than the world model's sequences (one rank's own)
            return _fail(str(e) if ctx is None else f"rank {ctx.rank}: {e}")
        except (NonFiniteError, CheckpointError) as e:  # every rank raises these together
            resume_hint = f". Resume with: wm-agent train --resume {run_dir}" if trainer.last_checkpoint else ""
            return _fail(f"{e}{resume_hint}", 1) if main else 1
        except RuntimeError as e:
            if ctx is None or not distributed.peer_failure(e) or not (lost := ctx.lost_ranks()):
                raise
            last = trainer.last_checkpoint or "none written"
            return _fail(
                f"rank {ctx.rank}: lost rank {', '.join(map(str, lost))} (it died or stopped answering) near env "
                f"step {trainer.counters.env_steps}; stopped, the last checkpoint ({last}) is intact",
                1,
            )
        finally:
            logger.close()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if lock is not None:
            lock.close()
    if not main:
        return 0
    _write_atomic(run_dir / "summary.json", json.dumps(summary, indent=2))
    if summary["stopped_early"]:
        console.print(
            f"stopped at env step {summary['env_steps']} of {cfg.steps}; checkpoint written to "
            f"{trainer.last_checkpoint}. Resume with: wm-agent train --resume {run_dir}",
            highlight=False,
        )
        return 0
    console.print(
        f"done: {summary['env_steps']} env steps, {summary['episodes']} episodes, "
        f"mean return of the last 100 episodes {summary['return_last100']:.3f}; "
        f"checkpoint in {trainer.last_checkpoint}",
        highlight=False,
    )
    return 0


def _load(run: str, checkpoint: str | None, device_name: str) -> LoadedAgent | int:
    """A trained agent from ``--checkpoint`` or ``run``, or the exit code of a one-line error."""
    try:
        device = resolve_device(device_name)
        return load_agent(Path(checkpoint or run), device, warn=_warn)
    except (DeviceError, CheckpointError) as e:
        return _fail(str(e))
    except (RuntimeError, KeyError, ValueError, OSError) as e:
        return _fail(f"cannot load a checkpoint from {checkpoint or run}: {str(e).splitlines()[0]}")


def _output_dir(run: str, loaded: LoadedAgent) -> Path:
    """Where results go by default: the run directory the checkpoint belongs to."""
    p = Path(run)
    if p.is_dir() and (p / "config.json").is_file():
        return p
    return loaded.checkpoint.parent.parent.parent  # RUN_DIR/checkpoints/step_N/state.pt


def _set_threads(threads: int) -> int | None:
    """Applies ``--threads`` (0 leaves torch's default); the exit code of a one-line error if negative."""
    if threads < 0:
        return _fail(f"--threads must be >= 0, got {threads}")
    if threads:
        torch.set_num_threads(threads)
    return None


def eval_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="wm-agent eval",
        description="Score a trained agent over full episodes (life loss is not an end; unclipped scores).",
    )
    p.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint directory or file")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory or state.pt instead of the latest")
    p.add_argument("--episodes", type=int, default=100, help="full episodes to play (default 100)")
    p.add_argument("--seed", type=int, default=10_000, help="env seed (default 10000, apart from training seeds)")
    p.add_argument("--num-envs", type=int, default=8, help="env copies played in parallel")
    p.add_argument("--greedy", action="store_true", help="take the most likely action instead of sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--out", default=None, help="results JSON (default RUN_DIR/eval.json)")
    args = p.parse_args(argv)
    if args.episodes <= 0 or args.num_envs <= 0:
        return _fail("--episodes and --num-envs must be positive")
    if (bad := _set_threads(args.threads)) is not None:
        return bad
    loaded = _load(args.run, args.checkpoint, args.device)
    if isinstance(loaded, int):
        return loaded
    device = next(loaded.wm.parameters()).device
    cfg = loaded.cfg
    console = Console(soft_wrap=True)
    console.print(
        f"evaluating {loaded.checkpoint} ({loaded.env_steps} env steps trained) on {cfg.env}, "
        f"{args.episodes} episodes, sticky actions {cfg.sticky_actions}",
        highlight=False,
    )
    try:
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
    except EnvSpecError as e:
        return _fail(f"cannot make {cfg.env} for evaluation: {e}")
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
    out = Path(args.out) if args.out else _output_dir(args.run, loaded) / "eval.json"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(out, json.dumps(result, indent=2))
    except OSError as e:
        return _fail(f"cannot write {out}: {e.strerror or e}", 1)
    console.print(f"results written to {out}", highlight=False)
    return 0


def watch_main(argv: list[str]) -> int:
    from agent.watch import open_loop, plot_error, render_frames, write_video

    p = argparse.ArgumentParser(
        prog="wm-agent watch",
        description="Play the policy in the real env and, open loop from real context, in the world model; "
        "write a side-by-side video (real | imagined | difference) and a PNG of the per-step error.",
    )
    p.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint directory or file")
    p.add_argument("--checkpoint", default=None, help="a checkpoint directory or state.pt instead of the latest")
    p.add_argument("--steps", type=int, default=64, help="open-loop steps, one video frame each (default 64)")
    p.add_argument("--out", default=None, help="video file, .gif or .mp4 (default RUN_DIR/videos/watch_<step>.gif)")
    p.add_argument("--seed", type=int, default=0, help="env seed")
    p.add_argument("--scale", type=int, default=4, help="upscaling of each 64x64 panel (default 4)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if (bad := _set_threads(args.threads)) is not None:
        return bad
    if args.steps <= 0 or args.scale <= 0 or args.fps <= 0:
        return _fail("--steps, --scale and --fps must be positive")
    if args.out and Path(args.out).suffix.lower() not in (".gif", ".mp4"):
        return _fail(f"--out must end in .gif or .mp4, got {args.out}")
    loaded = _load(args.run, args.checkpoint, args.device)
    if isinstance(loaded, int):
        return loaded
    device = next(loaded.wm.parameters()).device
    out = Path(args.out) if args.out else _output_dir(args.run, loaded) / "videos" / f"watch_{loaded.env_steps}.gif"
    console = Console(soft_wrap=True)
    console.print(
        f"watching {loaded.checkpoint} ({loaded.env_steps} env steps trained) on {loaded.cfg.env}: "
        f"{args.steps} open-loop steps from {loaded.cfg.world_model.context} real frames of context",
        highlight=False,
    )
    png = out.with_suffix(".png")
    try:
        ol = open_loop(loaded, args.steps, args.seed, device)
        write_video(render_frames(ol, args.scale), out, args.fps)
        plot_error(ol, png, f"{loaded.cfg.env}, {loaded.env_steps} env steps: open-loop error")
    except EnvSpecError as e:
        return _fail(f"cannot make {loaded.cfg.env}: {e}")
    except (OSError, RuntimeError) as e:
        return _fail(f"watch failed: {str(e).splitlines()[0]}", 1)
    mse, base = ol.mse(), ol.copy_last_mse()
    table = Table(title="open-loop error (MSE per pixel, [0, 1] scale), by steps after the real context")
    for col in ("steps after context", "imagined", "last context frame held", "frames"):
        table.add_column(col, justify="right")
    t = ol.step_in_segment
    for lo, hi in ((1, 1), (2, 5), (6, 15), (16, 50), (51, 10**9)):
        m = (t >= lo) & (t <= hi)
        if m.any():
            label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi < 10**9 else f"{lo}+")
            table.add_row(label, f"{mse[m].mean():.5f}", f"{base[m].mean():.5f}", str(int(m.sum())))
    console.print(table)
    console.print(
        f"rewards over the {args.steps} steps: real {ol.real_reward.sum():+.2f}, predicted "
        f"{ol.predicted_reward.sum():+.2f}; {len(ol.segment_starts)} context segment(s)",
        highlight=False,
    )
    console.print(f"video written to {out}, error plot to {png}", highlight=False)
    return 0


def play_main(argv: list[str]) -> int:
    import errno

    from agent.play import PlayServer, measure_step_ms

    p = argparse.ArgumentParser(
        prog="wm-agent play",
        description="Serve a page where you (or the agent) play the real game and, beside it, the world "
        "model's imagination of it, started from the same real frames and driven by the same keys.",
    )
    p.add_argument("run", help="a run directory (its latest checkpoint) or a checkpoint directory or file")
    p.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port")
    p.add_argument("--host", default="127.0.0.1", help="default 127.0.0.1 (this machine only)")
    p.add_argument("--seed", type=int, default=0, help="real env seed of the first tab (the next tabs add 1 each)")
    p.add_argument("--fps", type=int, default=15, help="steps per second the page asks for (default 15)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if (bad := _set_threads(args.threads)) is not None:
        return bad
    if not 1 <= args.fps <= 60:
        return _fail(f"--fps must be in 1..60, got {args.fps}")
    if not 0 <= args.port <= 65535:
        return _fail(f"--port must be in 0..65535, got {args.port}")
    loaded = _load(args.run, None, args.device)
    if isinstance(loaded, int):
        return loaded
    device = next(loaded.wm.parameters()).device
    try:
        server = PlayServer(loaded, args.host, args.port, args.fps, args.seed, device)
    except EnvSpecError as e:
        return _fail(f"cannot make {loaded.cfg.env}: {e}")
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            return _fail(f"port {args.port} on {args.host} is in use; choose another with --port")
        return _fail(f"cannot serve on {args.host}:{args.port}: {e.strerror or e}")
    console = Console(soft_wrap=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        _warn(f"serving on {args.host}: anyone who can reach this machine on port {server.server_port} can play")
    step_ms = measure_step_ms(loaded, args.seed, device)
    pace = (
        f"{args.fps} fps as asked"
        if 1000 / step_ms >= args.fps
        else f"as fast as it can, about {1000 / step_ms:.0f} fps (below the {args.fps} asked)"
    )
    console.print(
        f"{loaded.cfg.env}, {loaded.checkpoint} ({loaded.env_steps} env steps trained) on {device}: "
        f"one step takes {step_ms:.1f} ms here, so the game runs at {pace}",
        highlight=False,
    )
    host = f"[{args.host}]" if ":" in args.host else args.host
    console.print(f"play at http://{host}:{server.server_port}/  (Ctrl-C stops)", highlight=False)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("stopped", highlight=False)
    finally:
        server.server_close()
        server.close_all()
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
    if cmd == "watch":
        return watch_main(rest)
    if cmd == "play":
        return play_main(rest)
    if cmd == "bench":
        from agent.bench import bench_main

        try:
            return bench_main(rest, resolve_device)
        except (DeviceError, EnvSpecError, UsageError, CheckpointError) as e:
            return _fail(str(e))
    return _fail(f"unknown command {cmd!r}; run 'wm-agent --help'")


if __name__ == "__main__":
    sys.exit(main())
