"""Does a world-model variant keep the ball in its latent? (issue 3 diagnostics)

Trains the ``cpu``-preset world model (any config flag of ``wm-agent train`` overrides it) on
random-policy data of Breakout or Catch for ``--updates`` updates, and every ``--probe-every``
updates fits the probes of ``probe_breakout_latents.py`` (ball and paddle positions: Breakout's
from the console RAM, Catch's from the env state) on held-out frames, and measures how well the
current-frame reconstruction draws the moving pixels next to copying the previous frame. Much
cheaper than a ``wm-agent train`` run per variant (~10 min for 1,500 updates at 1 thread).

    python scripts/ball_experiment.py --updates 1500 --optim.encoder-hold-updates 500 --png grid.png
    python scripts/ball_experiment.py --env wm/Catch-v0 --updates 1200 --probe-every 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from probe_breakout_latents import collect, fit_probes  # noqa: E402

from agent.cli import parse_config  # noqa: E402
from agent.config import preset  # noqa: E402
from agent.replay import random_replay  # noqa: E402
from envs.catch import CatchEnv  # noqa: E402
from worldmodel.trainer import WorldModelTrainer  # noqa: E402
from worldmodel.world_model import WorldModel, moving_mask  # noqa: E402


def collect_catch(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random-policy Catch frames ``[N, 64, 64]`` and positions ``[N, 3]`` (paddle x, ball x, ball y)."""
    env = CatchEnv()
    rng = np.random.default_rng(seed)
    env.reset(seed=seed)
    frames, pos = [], []
    for _ in range(steps):
        obs, _, terminated, _, _ = env.step(int(rng.integers(0, 3)))
        st = env.state
        frames.append(obs)
        pos.append([st.paddle_x[0], st.ball_x[0], st.ball_y[0]])
        if terminated:
            env.reset()
    return np.stack(frames), np.asarray(pos, dtype=np.float64)


def evaluate(wm: WorldModel, frames: np.ndarray, pos: np.ndarray, in_play: np.ndarray) -> dict[str, float]:
    """Probe R^2 of paddle x (all frames) and ball x, y (``in_play`` frames), and the reconstruction's
    error on moving pixels next to copying the previous frame."""
    wm.eval()
    x = torch.as_tensor(frames)
    z, recon = [], []
    with torch.no_grad():
        for i in range(0, len(x), 256):
            zi = wm.encode(x[i : i + 256, None])[:, 0]
            z.append(zi)
            recon.append(wm.decode(zi).clamp(0, 1))
    latents, recon = torch.cat(z).numpy(), torch.cat(recon)
    real = wm.to_float(x)
    move = moving_mask(real[:-1], real[1:], 0.05) > 0
    n = move.sum().clamp(min=1)
    out = {
        "recon_mse_moving": float(((recon[1:] - real[1:]).square() * move).sum() / n),
        "copy_prev_mse_moving": float(((real[:-1] - real[1:]).square() * move).sum() / n),
    }
    for target, fits in fit_probes(latents, pos, in_play, mlp_steps=2000).items():
        for kind, score in fits.items():
            out[f"{target.replace(' ', '_')}_{kind}"] = score
    wm.train()
    return out


def save_grid(wm: WorldModel, frames: np.ndarray, in_play: np.ndarray, path: Path, rows: int = 6) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    idx = np.flatnonzero(in_play)[::97][:rows]
    with torch.no_grad():
        real = wm.to_float(torch.as_tensor(frames[idx]))
        recon = wm.decode(wm.encode(torch.as_tensor(frames[idx])[:, None])[:, 0]).clamp(0, 1)
    fig, axes = plt.subplots(len(idx), 3, figsize=(6, 2 * len(idx)))
    for i in range(len(idx)):
        for j, img in enumerate((real[i], recon[i], (recon[i] - real[i]).abs())):
            axes[i, j].imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
            axes[i, j].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="ALE/Breakout-v5", choices=["ALE/Breakout-v5", "wm/Catch-v0"])
    p.add_argument("--updates", type=int, default=1500)
    p.add_argument("--probe-every", type=int, default=500)
    p.add_argument("--data-steps", type=int, default=20_000)
    p.add_argument("--probe-steps", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON lines of the probe results")
    p.add_argument("--png", type=Path, default=None, help="real | reconstruction | |error| of frames with the ball")
    args, overrides = p.parse_known_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = parse_config(overrides, preset("cpu"), "config overrides, as for wm-agent train")
    print("overrides:", " ".join(overrides) or "none", flush=True)
    t0 = time.time()
    buf = random_replay(args.env, args.data_steps, 8, args.seed)
    probe_data = collect if args.env.startswith("ALE/") else collect_catch
    frames, pos = probe_data(args.probe_steps, args.seed + 1000)
    # Breakout's RAM holds 0 where no ball is in play; Catch always has one.
    in_play = (pos[:, 2] > 0) & (pos[:, 1] > 0) if args.env.startswith("ALE/") else np.ones(len(pos), bool)
    print(f"data: {args.data_steps} replay steps, {len(frames)} probe frames ({time.time() - t0:.0f} s)", flush=True)
    wm = WorldModel(cfg.world_model, num_actions=3 if args.env == "wm/Catch-v0" else 4)
    trainer = WorldModelTrainer(wm, cfg.optim, torch.device("cpu"), amp=False)
    rng = np.random.default_rng(args.seed)
    L = cfg.world_model.seq_len
    t_train = 0.0
    rows = []
    since_probe: dict[str, list[float]] = {}  # training metrics of the motion-map head since the last probe
    for i in range(args.updates + 1):
        if i % args.probe_every == 0:
            row = {"updates": i, "train_s": round(t_train, 1), **evaluate(wm, frames, pos, in_play)}
            row |= {f"train_{k.split('/')[-1]}": float(np.mean(v)) for k, v in since_probe.items()}
            since_probe = {}
            rows.append(row)
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
        if i == args.updates:
            break
        t1 = time.time()
        metrics, _ = trainer.update(buf.sample(cfg.batch_size, L, rng, "cpu", rewarded_fraction=cfg.rewarded_fraction))
        for k, v in metrics.items():
            if "motion_map" in k:
                since_probe.setdefault(k, []).append(float(v))
        t_train += time.time() - t1
    if args.png:
        save_grid(wm, frames, in_play, args.png)
    if args.out:
        args.out.write_text("".join(json.dumps({"overrides": overrides, **r}) + "\n" for r in rows))
    print(f"done in {time.time() - t0:.0f} s; {dataclasses.asdict(cfg.world_model.encoder)}")


if __name__ == "__main__":
    main()
