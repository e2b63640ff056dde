"""Benchmarks: speed against the machine's own limits, and the world model's quality on real data.

``wm-agent bench speed`` and ``wm-agent bench world-model``; see ``wm-agent bench --help``.
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
from torch.utils.flop_counter import FlopCounterMode

from agent.bench_graphs import add_parser as add_graphs_parser
from agent.bench_graphs import graphs_main, synthetic_replay
from agent.bench_learn import add_parser as add_learn_parser
from agent.bench_learn import learn_main
from agent.config import PRESETS, TrainConfig, UsageError, parse_config, preset, validate_config
from agent.dyna import calibrate_on_replay, sample_world_model_batches
from agent.machine import machine_info
from agent.policy import ActorCritic
from agent.ppo import PPO
from agent.replay import ReplayBuffer, random_replay
from agent.wm_report import PADDLE_DEPTHS, paddle_saves, replay_of, tracker_runs, world_model_report
from envs import make_env
from envs.annotations import annotated_rollout, has_annotations
from envs.ram_players import has_tracker
from worldmodel.ema import ema_update_, make_slow_copy
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.trainer import WorldModelTrainer
from worldmodel.world_model import WorldModel


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int | None = None, seconds: float = 2.0) -> float:
    """Achieved FLOP/s of a square matmul (fp32 2048^2 on CPU, bf16 8192^2 on CUDA: the size that fills an H100)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def env_speed(env_id: str, num_envs: int, seconds: float = 3.0, backend: str = "auto") -> dict[str, float]:
    """Random-action steps/s of raw ale-py's vector env and of ``make_env`` (same game, same copies)."""
    from ale_py.vector_env import AtariVectorEnv

    rng = np.random.default_rng(0)

    def run(step, n_actions: int) -> float:
        steps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            step(rng.integers(0, n_actions, size=num_envs))
            steps += num_envs
        return steps / (time.perf_counter() - t0)

    wrapped = make_env(env_id, num_envs=num_envs, seed=0, backend=backend)
    wrapped.reset(seed=0)
    ours = run(wrapped.step, wrapped.num_actions)
    n_actions = wrapped.num_actions
    wrapped.close()
    game = env_id.split("/")[1].split("-")[0]
    game = "".join("_" + ch.lower() if ch.isupper() and i else ch.lower() for i, ch in enumerate(game))
    raw = AtariVectorEnv(game, num_envs, img_height=64, img_width=64, stack_num=1, reward_clipping=False)
    raw.reset(seed=0)
    raw_sps = run(raw.step, n_actions)
    raw.close()
    return {"raw_steps_per_s": raw_sps, "make_env_steps_per_s": ours, "ratio": ours / raw_sps}


def replay_speed(batch_size: int = 64, seq_len: int = 7, seconds: float = 2.0) -> float:
    """Batches/s sampled from a 100k-frame buffer of random frames with 1k-step episodes."""
    buf = ReplayBuffer(100_000, 8)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, size=(8, 64, 64), dtype=np.uint8)
    for t in range(buf.slots):
        buf.add(
            frame,
            np.zeros(8, np.int64),
            np.zeros(8, np.float32),
            np.zeros(8, bool),
            np.zeros(8, bool),
            np.zeros(8, bool),
            np.full(8, t % 1000 == 0),
        )
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        buf.sample(batch_size, seq_len, rng)
        n += 1
    return n / (time.perf_counter() - t0)


def world_model_speed(
    cfg: TrainConfig, device: torch.device, updates: int = 10, amp: bool = True, compile: bool = False
) -> dict[str, float]:
    """Updates/s, samples/s and achieved FLOP/s of world-model updates at ``cfg``'s sizes, on the batches
    the Dyna loop draws (main, heads' and dynamics batch; bf16 autocast on CUDA when ``amp``;
    ``compile`` times after compilation, which is reported apart)."""
    wm = WorldModel(cfg.world_model, num_actions=4).to(device)
    graphs = cfg.cuda_graphs and not compile
    trainer = WorldModelTrainer(wm, cfg.optim, device, amp=amp, compile=compile, graphs=graphs)
    B, L = cfg.batch_size, cfg.world_model.seq_len
    rng = np.random.default_rng(0)
    batches = sample_world_model_batches(synthetic_replay(cfg, rng), cfg, rng, device)
    with FlopCounterMode(display=False) as counter:  # eager forward + backward: the FLOPs one update needs
        wm.loss_and_latents(*batches)[0].backward()
    flops = counter.get_total_flops()
    wm.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    for _ in range(5 if graphs else 3 if compile else 2):  # graphs: 3 eager, then capture and replay
        trainer.update(*batches)
    _sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(updates):
        trainer.update(*batches)
    _sync(device)
    dt = (time.perf_counter() - t0) / updates
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in wm.named_children()}
    params = {name: n for name, n in params.items() if n > 0}
    params["total"] = sum(p.numel() for p in wm.parameters())
    return {
        "updates_per_s": 1 / dt,
        "samples_per_s": B / dt,
        "frames_per_s": B * L / dt,
        "flop_per_update": float(flops),
        "flop_per_s": flops / dt,
        "batch_size": B,
        "seq_len": L,
        "head_batch_size": cfg.head_batch_size,
        "dynamics_batch_size": cfg.dynamics_batch_size,
        "amp_bf16": float(amp and device.type == "cuda"),
        "compiled": float(compile),
        "cuda_graphs": float(graphs and device.type == "cuda"),
        "first_updates_s": warmup_s,
        **{f"params_{k}": float(v) for k, v in params.items()},
    }


def imagination_speed(cfg: TrainConfig, device: torch.device, rollouts: int = 5) -> dict[str, float]:
    """Imagined latent steps/s (starts x horizon) and policy updates/s (one rollout + PPO epochs each)."""
    wm = WorldModel(cfg.world_model, num_actions=4).to(device)
    policy = ActorCritic(cfg.policy, cfg.world_model.encoder.latent_dim, 4).to(device)
    ppo = PPO(policy, cfg.ppo, graphs=cfg.cuda_graphs)
    env = ImaginedEnv(wm, cfg.ppo.horizon)
    starts = torch.randn(cfg.ppo.num_starts, cfg.world_model.context, cfg.world_model.encoder.latent_dim, device=device)
    for _ in range(5 if cfg.cuda_graphs else 1):  # graphs: 3 eager, then capture and replay
        ppo.update(ppo.rollout(env, starts))
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(rollouts):
        ro = ppo.rollout(env, starts)
    _sync(device)
    t_roll = (time.perf_counter() - t0) / rollouts
    t0 = time.perf_counter()
    for _ in range(rollouts):
        ppo.update(ro)
    _sync(device)
    t_upd = (time.perf_counter() - t0) / rollouts
    return {
        "imagined_steps_per_s": cfg.ppo.num_starts * cfg.ppo.horizon / t_roll,
        "policy_updates_per_s": 1 / (t_roll + t_upd),
        "rollout_s": t_roll,
        "ppo_update_s": t_upd,
    }


def dyna_split(
    cfg: TrainConfig, env_id: str, device: torch.device, iterations: int = 2, amp: bool = True
) -> dict[str, float]:
    """Seconds per Dyna iteration in each phase: a short run of ``cfg`` whose warm-up just fills the first
    batch, without pre-training, then ``iterations`` full iterations at its ratios."""
    import copy
    import tempfile

    from agent.dyna import DynaTrainer
    from agent.logger import RunLogger

    cfg = copy.deepcopy(cfg)
    cfg.env, cfg.device, cfg.threads, cfg.amp = env_id, str(device), 0, amp
    cfg.warmup_steps = max(cfg.collect_steps, 2 * cfg.world_model.seq_len * cfg.num_envs)
    cfg.wm_pretrain_updates = cfg.policy_start_updates = 0
    cfg.steps = cfg.warmup_steps + iterations * cfg.collect_steps
    cfg.checkpoint_every = cfg.image_every = 0
    with tempfile.TemporaryDirectory() as tmp:
        trainer = DynaTrainer(cfg, Path(tmp))
        logger = RunLogger(Path(tmp), cfg.steps, console=Console(quiet=True), tensorboard=False)
        summary = trainer.train(logger, final_checkpoint=False)
        logger.close()
    split = {k[5:-2]: v for k, v in summary.items() if k.startswith("time_")}
    n_iter = cfg.steps // cfg.collect_steps
    return {"per_iteration_s": {k: v / n_iter for k, v in split.items()}, "fraction": _fractions(split)}


def project_full_run(cfg: TrainConfig, wm: dict, im: dict, dyna: dict | None) -> dict[str, float]:
    """Hours a whole run of ``cfg`` would take at the measured rates: its world-model and policy
    updates at the measured update rates, its env steps (and the loop's other work) at the collect
    and other time per env step of the measured Dyna iterations (0 when those were skipped). Policy
    updates start once the world model has had ``policy_start_updates``, as in the Dyna loop."""
    learn_steps = max(0, cfg.steps - cfg.warmup_steps)
    wm_updates = cfg.wm_pretrain_updates + learn_steps * cfg.wm_train_ratio
    policy_wait_steps = max(0, cfg.policy_start_updates - cfg.wm_pretrain_updates) / cfg.wm_train_ratio
    policy_updates = max(0.0, learn_steps - policy_wait_steps) * cfg.policy_train_ratio
    per_env_step = 0.0
    if dyna is not None:
        per_iter = dyna["per_iteration_s"]
        per_env_step = (per_iter.get("collect", 0.0) + per_iter.get("other", 0.0)) / cfg.collect_steps
    seconds = cfg.steps * per_env_step + wm_updates / wm["updates_per_s"] + policy_updates / im["policy_updates_per_s"]
    return {
        "env_steps": float(cfg.steps),
        "world_model_updates": wm_updates,
        "policy_updates": policy_updates,
        "env_and_other_s_per_step": per_env_step,
        "hours": seconds / 3600,
    }


def _fractions(split: dict[str, float]) -> dict[str, float]:
    total = sum(split.values())
    return {k: v / total for k, v in split.items()}


def speed_main(args: argparse.Namespace, device: torch.device) -> int:
    console = Console()
    configs = {}  # train flags override the one preset named; parsed before any measurement
    for name in [args.preset] if args.preset else ["cpu", "atari100k"]:
        configs[name] = preset(name)
        if args.overrides:
            configs[name] = parse_config(args.overrides, configs[name], "config overrides, as for wm-agent train")
            validate_config(configs[name])
    info = machine_info(device)
    peak = matmul_peak(device)
    result: dict = {
        "machine": info,
        "preset": args.preset,
        "matmul_peak_flop_per_s": peak,
        "date": time.strftime("%Y-%m-%d"),
    }
    table = Table(
        title=f"wm-agent bench speed ({info['cpu']}, {info['cores']} cores, "
        f"{info['torch_threads']} torch threads, {info['device']})"
    )
    table.add_column("what")
    table.add_column("figure", justify="right")
    table.add_row("matmul peak (2048^2 fp32 on CPU / 8192^2 bf16 on GPU)", f"{peak / 1e9:.1f} GFLOP/s")
    if not args.skip_env:
        for n in (1, 8):
            e = env_speed(args.env, n)
            result[f"env_{n}"] = e
            table.add_row(
                f"{args.env} x{n}: raw ale-py / make_env",
                f"{e['raw_steps_per_s']:.0f} / {e['make_env_steps_per_s']:.0f} steps/s ({e['ratio']:.2f})",
            )
            if args.env.startswith("ALE/"):
                g = env_speed(args.env, n, backend="gym")
                result[f"env_{n}_gym_backend"] = g
                table.add_row(f"{args.env} x{n}: make_env(backend='gym')", f"{g['make_env_steps_per_s']:.0f} steps/s")
        r = replay_speed()
        result["replay_batches_per_s"] = r
        table.add_row("replay sample, B=64, T+1=7", f"{r:.0f} batches/s")
    mode = ("bf16 autocast" if args.amp and device.type == "cuda" else "fp32") + (", compiled" if args.compile else "")
    result["mode"] = mode
    result["overrides"] = args.overrides
    if args.overrides:
        table.add_row("train flags", " ".join(args.overrides))
    first = next(iter(configs))
    for name, cfg in configs.items():
        label = f"{name} + flags" if args.overrides else name
        w = world_model_speed(cfg, device, amp=args.amp, compile=args.compile)
        result[f"world_model_{name}"] = {**w, "fraction_of_peak": w["flop_per_s"] / peak}
        table.add_row(
            f"world model ({label}, {mode}) B={w['batch_size']} L={w['seq_len']} + heads' "
            f"{w['head_batch_size']} + dynamics {w['dynamics_batch_size']}",
            f"{w['updates_per_s']:.2f} updates/s, {w['samples_per_s']:.0f} seq/s, "
            f"{w['flop_per_s'] / 1e9:.1f} GFLOP/s = {w['flop_per_s'] / peak:.0%} of peak"
            + (f" (compiling + first 3 updates: {w['first_updates_s']:.0f} s)" if args.compile else ""),
        )
        table.add_row(
            f"parameters ({label})",
            ", ".join(f"{k.removeprefix('params_')} {v / 1e3:.1f}k" for k, v in w.items() if k.startswith("params_")),
        )
        im = imagination_speed(cfg, device)
        result[f"imagination_{name}"] = im
        table.add_row(
            f"imagination ({label})",
            f"{im['imagined_steps_per_s']:.0f} latent steps/s, {im['policy_updates_per_s']:.2f} policy updates/s",
        )
        if name == first and not args.skip_dyna:
            d = dyna_split(cfg, args.env, device, amp=args.amp)
            result[f"dyna_iteration_{name}"] = d
            table.add_row(
                f"one Dyna iteration ({label}, {args.env})",
                ", ".join(f"{k} {v:.0%}" for k, v in d["fraction"].items())
                + f" of {sum(d['per_iteration_s'].values()):.1f} s",
            )
        proj = project_full_run(cfg, w, im, result.get(f"dyna_iteration_{name}"))
        result[f"projected_full_run_{name}"] = proj
        table.add_row(
            f"projected whole {label} run ({proj['env_steps']:.0f} env steps)",
            f"{proj['hours']:.2f} h: {proj['world_model_updates']:.0f} world-model and "
            f"{proj['policy_updates']:.0f} policy updates at the rates above"
            + ("" if f"dyna_iteration_{name}" in result else ", env time not measured (--skip-dyna)"),
        )
    if device.type == "cuda":
        table.add_row(
            "for scale (ANCHORS.md, Atari 100k)", "STORM 4.3 h on one RTX 3090; DIAMOND 2.9 days on one RTX 4090"
        )
    console.print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        console.print(f"written to {args.out}")
    return 0


def world_model_check_config(check: dict, extra_flags: list[str] | None = None) -> TrainConfig:
    """The config of a ``bench world-model`` run from its parsed ``world_model_check.json``: its preset and
    flags, with ``extra_flags`` after them."""
    return parse_config(check["overrides"] + (extra_flags or []), preset(check["preset"] or "cpu"), "the bench's flags")


def load_world_model_check(out_dir: Path, check: dict) -> tuple[WorldModel, TrainConfig]:
    """The world model that ``bench world-model --out-dir OUT_DIR`` saved, rebuilt from the preset and flags
    in ``check`` (its parsed ``world_model_check.json``), and its config."""
    cfg = world_model_check_config(check)
    saved = torch.load(out_dir / "world_model.pt", weights_only=True)
    wm = WorldModel(cfg.world_model, saved["num_actions"])
    wm.load_state_dict_compat(saved["world_model"])
    return wm, cfg


def world_model_check(args: argparse.Namespace, device: torch.device) -> int:
    """Train a world model on random-policy data of a real game; compare its next-frame prediction
    with copying the last frame on held-out sequences, and save a picture of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    console = Console()
    rng = np.random.default_rng(args.seed)
    torch.manual_seed(args.seed)
    checkpoint_steps = None
    if args.checkpoint is not None:
        from agent.dyna import load_agent

        if args.overrides:
            raise UsageError(f"--checkpoint measures the run's own world model; drop {' '.join(args.overrides)}")
        loaded = load_agent(args.checkpoint, device, warn=lambda msg: console.print(msg, highlight=False))
        cfg, wm, checkpoint_steps = loaded.cfg, loaded.wm, loaded.env_steps
        args.env = args.env or cfg.env
        if args.env != cfg.env:
            raise UsageError(f"the checkpoint's world model was trained on {cfg.env}, not {args.env}")
        args.updates = 0
    else:
        cfg = parse_config(args.overrides, preset(args.preset), "config overrides, as for wm-agent train")
        validate_config(cfg)
        args.env = args.env or "ALE/Breakout-v5"
        wm = WorldModel(cfg.world_model, num_actions=make_env(args.env).num_actions).to(device)
    if has_annotations(args.env):
        rollout = annotated_rollout(args.env, args.test_steps, 8, args.seed + 1)
        test_buf, positions, in_play = replay_of(rollout), rollout.positions, rollout.ball_in_play
    else:
        test_buf, positions, in_play = random_replay(args.env, args.test_steps, 8, args.seed + 1, rng), None, None
    L = cfg.world_model.seq_len
    if args.updates > 0:
        train_buf = random_replay(args.env, args.data_steps, 8, args.seed, rng)
        # As the Dyna loop trains it: rewarded sequences oversampled, the heads' extra batch, and (below)
        # imagination's reward and continue heads calibrated to the data's rates.
        trainer = WorldModelTrainer(wm, cfg.optim, device, amp=cfg.amp)
    # Imagination reads the slow copy where the config keeps one (``slow_world_model_decay``): it is
    # the model measured, and the trained one is reported beside it under "trained_model".
    slow = make_slow_copy(wm) if args.updates > 0 and cfg.slow_world_model_decay > 0 else None
    t0 = time.time()
    for i in range(args.updates):
        batch, head, dyn = sample_world_model_batches(train_buf, cfg, rng, device)
        metrics, _ = trainer.update(batch, head, dyn)
        if slow is not None:
            ema_update_(slow, wm, cfg.slow_world_model_decay)
        if (i + 1) % max(1, args.updates // 10) == 0:
            console.print(
                f"update {i + 1}/{args.updates}: loss {metrics['world_model/loss'].item():.4f}, "
                f"{(i + 1) / (time.time() - t0):.2f} updates/s",
                highlight=False,
            )
    train_seconds = time.time() - t0
    trained, wm = wm, (slow if slow is not None else wm)
    wm.eval()
    if args.updates > 0:
        calibrate_on_replay(wm, train_buf, rng, device)
    test = test_buf.sample(256, L, rng, device, rewarded_fraction=0.0)
    with torch.no_grad():
        _, m = wm.compute_loss(test)
        K = cfg.world_model.context
        pred = wm.predict_next_frame(test.frames[:, :K], test.actions[:, K - 1])
    real = wm.to_float(test.frames[:, K])
    last = wm.to_float(test.frames[:, K - 1])
    changed = (real - last).abs() > cfg.world_model.loss.moving_threshold
    result = {k.split("/")[1]: float(v) for k, v in m.items()}
    result.update(
        {
            "env": args.env,
            "updates": args.updates,
            "preset": args.preset if args.checkpoint is None else None,
            "measured_model": "slow copy" if cfg.slow_world_model_decay > 0 else "trained",
            "overrides": args.overrides,
            "checkpoint": None if args.checkpoint is None else str(loaded.checkpoint),
            "checkpoint_env_steps": checkpoint_steps,
            "data_steps": args.data_steps,
            "train_seconds": train_seconds,
            "next_frame_mse": float((pred - real).square().mean()),
            "copy_last_mse": float((last - real).square().mean()),
            # The whole-frame MSE split into the pixels that change from the last frame and those that do
            # not (where copying the last frame is all but exact): the two parts sum to the whole.
            "next_frame_mse_changed_part": float(((pred - real).square() * changed).mean()),
            "next_frame_mse_unchanged_part": float(((pred - real).square() * ~changed).mean()),
            "copy_last_mse_changed_part": float(((last - real).square() * changed).mean()),
        }
    )
    t1 = time.time()
    result.update(world_model_report(wm, test_buf, positions, in_play, seed=args.seed))
    result["test_steps"] = args.test_steps
    result["report_seconds"] = time.time() - t1
    if slow is not None:
        trained.eval()
        calibrate_on_replay(trained, train_buf, rng, device)
        result["trained_model"] = world_model_report(trained, test_buf, positions, in_play, seed=args.seed)
    if args.paddle_starts > 0 and has_tracker(args.env):
        t1 = time.time()
        runs = tracker_runs(args.env, args.paddle_starts, max(PADDLE_DEPTHS), cfg.world_model.context, args.seed + 7)
        result["paddle_saves"] = paddle_saves(wm, runs)
        result["paddle_saves"]["seconds"] = time.time() - t1
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"world_model": wm.state_dict(), "num_actions": wm.num_actions}, out_dir / "world_model.pt")
    (out_dir / "world_model_check.json").write_text(json.dumps(result, indent=2))
    rows = 6
    fig, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows))
    for i in range(rows):
        for j, (img, title) in enumerate(
            ((real[i], "real next"), (pred[i], "predicted"), ((pred[i] - real[i]).abs(), "|error|"))
        ):
            axes[i, j].imshow(img.cpu().numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_axis_off()
            if i == 0:
                axes[i, j].set_title(title)
    fig.tight_layout()
    fig.savefig(out_dir / "world_model_check.png", dpi=100)
    source = f"after {args.updates} updates" if args.checkpoint is None else f"of {loaded.checkpoint}"
    if result["measured_model"] == "slow copy":
        source += " (its slow copy, which imagination reads)"
    table = Table(title=f"{args.env}: world model {source} (held-out random-policy data)")
    table.add_column("what")
    table.add_column("value", justify="right")
    for key in (
        "next_frame_mse",
        "copy_last_mse",
        "next_frame_mse_changed_part",
        "next_frame_mse_unchanged_part",
        "copy_last_mse_changed_part",
        "next_frame_mse_moving",
        "copy_last_mse_moving",
        "reward_acc_rewarded",
        "cont_acc_terminal",
    ):
        table.add_row(key, f"{result[key]:.5f}")
    console.print(table)
    console.print(report_table(result))
    if "trained_model" in result:
        console.print(report_table(result["trained_model"], title="the trained model (not the slow copy)"))
    if "paddle_saves" in result:
        console.print(paddle_table(result["paddle_saves"]))
    console.print(f"written to {out_dir / 'world_model_check.json'} and {out_dir / 'world_model_check.png'}")
    return 0


def paddle_table(ps: dict) -> Table:
    """Life lost from falling-ball starts, real and imagined, by a paddle that meets the ball and one
    that runs away (see :func:`agent.wm_report.paddle_saves`)."""
    table = Table(title=f"does imagination know the paddle saves the ball? ({ps['starts']} falling-ball starts)")
    table.add_column("life lost within")
    for d in ps["pair_gap"]:
        table.add_column(f"{d} steps", justify="right")
    for who in ("tracker", "mirror"):
        table.add_row(
            f"{who}: real / imagined",
            *(f"{ps[f'real_lost_{who}'][d]:.2f} / {ps[f'imagined_lost_{who}'][d]:.2f}" for d in ps["pair_gap"]),
        )
    table.add_row(
        "pair gap (1 = perfect, 0 = blind)",
        *("-" if g is None else f"{g:.2f} ({ps['pairs'][d]})" for d, g in ps["pair_gap"].items()),
    )
    return table


def report_table(
    result: dict, title: str = "held-out play: encoder, and the predictor run open loop from real context"
) -> Table:
    """Items 1-4 of issue 22 by open-loop depth: what the latent and the predictor hold, and what
    imagination pays (every depth 1-8 is in the JSON)."""
    shown = ("1", "4", "8")
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("encoder", justify="right")
    for d in shown:
        table.add_column(f"depth {d}", justify="right")
    if "probe" in result:
        ol = result["open_loop"]
        for name in ("paddle_x", "ball_x", "ball_y"):
            table.add_row(
                f"{name} R^2", f"{result['probe'][f'{name}_r2']:.3f}", *(f"{ol[f'{name}_r2'][d]:.3f}" for d in shown)
            )
            table.add_row("  last latent held", "", *(f"{ol[f'hold_last_{name}_r2'][d]:.3f}" for d in shown))
    for key, label in (
        ("reward_paid_share", "reward paid / true"),
        ("reward_paid_unrewarded", "paid when none"),
        ("reward_paid_share_within_1", "paid within 1 step / true"),
        ("reward_paid_unrewarded_within_1", "  paid when none within 1"),
        ("reward_sign_acc", "reward sign right"),
        ("life_loss_recall", "life loss flagged"),
        ("false_end_rate", "end flagged, none"),
    ):
        table.add_row(label, "", *(f"{result[key][d]:.3f}" for d in shown))
    windows = result["windows"]
    table.add_row("rewarded / ended", "", *(f"{windows[d]['rewarded']} / {windows[d]['ended']}" for d in shown))
    return table


def bench_main(argv: list[str], device_of) -> int:
    p = argparse.ArgumentParser(prog="wm-agent bench", description="Benchmarks of speed and world-model quality.")
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("speed", help="env, replay, world-model and imagination throughput vs the matmul peak")
    s.add_argument("--device", default="auto")
    s.add_argument("--preset", default=None, choices=PRESETS, help="default: cpu and atari100k")
    s.add_argument("--env", default="ALE/Breakout-v5")
    s.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = one per core)")
    s.add_argument("--skip-env", action="store_true", help="skip the env and replay figures")
    s.add_argument("--skip-dyna", action="store_true", help="skip the Dyna iteration time split")
    s.add_argument("--no-amp", dest="amp", action="store_false", help="fp32 world-model updates on CUDA too")
    s.add_argument("--compile", action="store_true", help="torch.compile the world-model loss before timing it")
    s.add_argument("--out", default=None, help="JSON file for the figures")
    s.epilog = "With --preset, any config flag of 'wm-agent train' (e.g. --world-model.context 8) overrides it."
    w = sub.add_parser(
        "world-model",
        help="train a world model on random-policy data (or read a run's), compare with copy-last-frame",
    )
    w.add_argument("--env", default=None, help="default: ALE/Breakout-v5, or the checkpoint's env")
    w.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="measure this run's world model (a run dir, checkpoint dir or state.pt) instead of training one",
    )
    w.add_argument("--preset", default="cpu", choices=PRESETS)
    w.add_argument("--updates", type=int, default=1000)
    w.add_argument(
        "--data-steps",
        type=int,
        default=100_000,
        help="random-policy env steps to train on (as many as a 100k-step run's replay holds; 20k, the default"
        " until 2026-12-08, holds ~130 rewarded Breakout steps, which the heads memorize)",
    )
    w.add_argument("--test-steps", type=int, default=10_000, help="held-out random-policy env steps the measures read")
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(
        "--paddle-starts", type=int, default=200, help="Breakout: falling-ball starts of paddle_saves (0 skips it)"
    )
    w.add_argument("--device", default="auto")
    w.add_argument("--threads", type=int, default=0)
    w.add_argument("--out-dir", default="runs/world_model_check")
    w.epilog = "Any config flag of 'wm-agent train' (e.g. --world-model.pixel-gain 3) overrides the preset."
    add_learn_parser(sub)
    add_graphs_parser(sub)
    args, overrides = p.parse_known_args(argv)
    if overrides and args.what not in ("world-model", "speed", "graphs"):
        p.error(f"unrecognized arguments: {' '.join(overrides)}")
    if overrides and args.what == "speed" and args.preset is None:
        flags = " ".join(overrides)
        p.error(f"unrecognized arguments: {flags} (train flags override one preset: name it with --preset)")
    args.overrides = overrides
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    device = device_of(args.device)
    if args.what == "learn":
        return learn_main(args)
    if args.what == "speed":
        return speed_main(args, device)
    if args.what == "graphs":
        return graphs_main(args, device)
    return world_model_check(args, device)
