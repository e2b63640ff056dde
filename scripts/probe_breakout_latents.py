"""Does a world model's latent know where Breakout's ball and paddle are? (issue 3 diagnostics)

Plays random actions in one Breakout copy (the preprocessing of ``make_env``'s gymnasium backend,
whose env exposes the RAM), reads the ball's and paddle's positions from the console RAM, encodes
every frame with the encoder of a checkpoint and with a freshly initialised encoder of the same
size, and fits ridge and MLP probes from each latent (and from the raw 64x64 pixels) to the
positions. Prints held-out R^2: if the trained latent reads the ball no better than the untrained
one, the encoder (not the decoder) loses it.

    python scripts/probe_breakout_latents.py RUN_DIR [--steps 8000] [--threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from agent.dyna import load_agent
from envs.atari import _AtariPreprocessing
from worldmodel.world_model import WorldModel

# Breakout RAM addresses (AtariARI annotations): paddle x, ball x, ball y.
PADDLE_X, BALL_X, BALL_Y = 72, 99, 101


def collect(steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``steps`` frames ``[N, 64, 64]`` uint8 and RAM positions ``[N, 3]`` (paddle x, ball x, ball y)."""
    env = _AtariPreprocessing(
        gym.make("ALE/Breakout-v5", frameskip=1, obs_type="grayscale", repeat_action_probability=0.0), noop_max=30
    )
    rng = np.random.default_rng(seed)
    obs, _ = env.reset(seed=seed)
    frames, pos = [], []
    for _ in range(steps):
        obs, _, terminated, truncated, _ = env.step(int(rng.integers(0, 4)))
        ram = env.unwrapped.ale.getRAM()
        frames.append(obs)
        pos.append([ram[PADDLE_X], ram[BALL_X], ram[BALL_Y]])
        if terminated or truncated:
            obs, _ = env.reset()
    env.close()
    return np.stack(frames), np.asarray(pos, dtype=np.float64)


@torch.no_grad()
def encode(wm: WorldModel, frames: np.ndarray) -> np.ndarray:
    out = []
    for i in range(0, len(frames), 256):
        out.append(wm.encode(torch.as_tensor(frames[i : i + 256])[:, None])[:, 0].numpy())  # (b, E)
    return np.concatenate(out)


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    return float(1 - ((pred - y) ** 2).sum() / ((y - y.mean()) ** 2).sum())


def ridge(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    a, b = (x_tr - mu) / sd, (x_te - mu) / sd
    a1, b1 = np.c_[a, np.ones(len(a))], np.c_[b, np.ones(len(b))]
    w = np.linalg.solve(a1.T @ a1 + alpha * np.eye(a1.shape[1]), a1.T @ y_tr)
    return b1 @ w


def mlp(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, steps: int = 3000) -> np.ndarray:
    torch.manual_seed(0)
    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    ym, ys = y_tr.mean(), y_tr.std() + 1e-6
    a = torch.as_tensor((x_tr - mu) / sd, dtype=torch.float32)
    t = torch.as_tensor((y_tr - ym) / ys, dtype=torch.float32)[:, None]
    net = torch.nn.Sequential(
        torch.nn.Linear(a.shape[1], 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 256),
        torch.nn.GELU(),
        torch.nn.Linear(256, 1),
    )
    opt = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
    for _ in range(steps):
        idx = torch.randint(0, len(a), (256,))
        loss = (net(a[idx]) - t[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(torch.as_tensor((x_te - mu) / sd, dtype=torch.float32))[:, 0].numpy() * ys + ym


TARGETS = ("paddle x", "ball x", "ball y")


def fit_probes(
    x: np.ndarray, pos: np.ndarray, in_play: np.ndarray, mlp_steps: int = 3000
) -> dict[str, dict[str, float]]:
    """Held-out R^2 of ridge and MLP probes from inputs ``x [N, D]`` to each of :data:`TARGETS`
    (columns of ``pos [N, 3]``), fitted on the first 80% of the frames; the ball only where ``in_play``."""
    split = int(0.8 * len(x))
    scores = {}
    for j, target in enumerate(TARGETS):
        keep = np.ones(len(x), bool) if j == 0 else in_play
        tr, te = keep[:split], keep[split:]
        x_tr, y_tr = x[:split][tr], pos[:split, j][tr]
        x_te, y_te = x[split:][te], pos[split:, j][te]
        scores[target] = {
            "ridge": r2(ridge(x_tr, y_tr, x_te), y_te),
            "mlp": r2(mlp(x_tr, y_tr, x_te, steps=mlp_steps), y_te),
        }
    return scores


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", help="a run directory or checkpoint of a Breakout world model")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    loaded = load_agent(Path(args.run), torch.device("cpu"))
    torch.manual_seed(args.seed)
    fresh = WorldModel(loaded.cfg.world_model, loaded.wm.num_actions).eval()
    frames, pos = collect(args.steps, args.seed)
    in_play = (pos[:, 2] > 0) & (pos[:, 1] > 0)
    print(
        f"{loaded.checkpoint} ({loaded.env_steps} env steps); {len(frames)} frames, "
        f"ball in play in {in_play.mean():.0%}"
    )
    inputs = {
        "trained latent": encode(loaded.wm, frames),
        "untrained latent": encode(fresh, frames),
        "raw pixels": frames.reshape(len(frames), -1).astype(np.float64) / 255,
    }
    for name, x in inputs.items():
        scores = fit_probes(x, pos, in_play)
        cells = [f"{t}: " + " / ".join(f"{k} {v:.2f}" for k, v in fits.items()) for t, fits in scores.items()]
        print(f"{name:17s} R^2 held out | " + " | ".join(cells))
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
