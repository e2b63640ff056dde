"""How far into imagination does the world model still tell a catch from a miss? (issue 4 diagnostics)

Trains the ``cpu``-preset world model (any config flag of ``wm-agent train`` overrides it) on
random-policy data as the Dyna loop does (rewarded sequences oversampled, the head batch), and
every ``--eval-every`` updates imagines held-out episodes open loop with their real actions: from
the K real context frames of a window that ends where a reward was paid, the predictor runs
``d`` steps on its own outputs and the calibrated reward head judges the last one. Reported per
depth ``d``: the share of rewarded steps judged right (|predicted - real| < 0.5, the training
metric), split into the episode's positive and negative rewards, the mean predicted reward on
each (what the policy's returns are made of), and the mean predicted continue probability on
that terminal step. Depth 1 is what the training metric measures; on Catch an
imagined episode that starts at the first frame lands at depth 11.

    python scripts/imagination_fidelity.py --updates 1200 --eval-every 400
    python scripts/imagination_fidelity.py --updates 1200 --world-model.pred-steps 8
    python scripts/imagination_fidelity.py --checkpoint runs/RUN   # a trained run's world model

Also reported: imagination from windows that end at an episode's last frame (``past_end_*``), where
the truth is that nothing follows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.cli import parse_config  # noqa: E402
from agent.config import TrainConfig, preset  # noqa: E402
from agent.dyna import load_agent  # noqa: E402
from agent.replay import ReplayBuffer, random_replay  # noqa: E402
from worldmodel.trainer import WorldModelTrainer  # noqa: E402
from worldmodel.twohot import twohot_decode  # noqa: E402
from worldmodel.world_model import Prediction, WorldModel  # noqa: E402


def open_loop(wm: WorldModel, window: torch.Tensor, actions: torch.Tensor, d: int) -> tuple[Prediction, torch.Tensor]:
    """``d`` imagined steps from the latent ``window [n, K, E]`` under ``actions [n, >=d]``: the last
    step's prediction and the window that ends with it."""
    for i in range(d):
        pred = wm.imagine_step(window, actions[:, i])
        window = torch.cat([window[:, 1:], pred.latent], dim=1)
    return pred, window


@torch.no_grad()
def fidelity(
    wm: WorldModel, buf: ReplayBuffer, depths: list[int], n: int, rng: np.random.Generator
) -> dict[str, float]:
    """Per depth ``d``: accuracy on rewarded steps (all / positive / negative), mean predicted reward on
    positive and negative ones and mean continue probability there, after ``d`` open-loop steps from
    real context; the same accuracy and mean on unrewarded steps (``_zero``); ``real_pairs_acc`` is
    the heads' accuracy on real latents."""
    wm.eval()
    K = wm.cfg.context
    out: dict[str, float] = {}
    for d in depths:
        batch = buf.sample(n, K + d, rng, rewarded_fraction=1.0)
        r = batch.rewards[:, -1]
        keep = r != 0  # a rewarded window ends at its reward (the next frame starts a new episode)
        z = wm.encode(batch.frames)  # (n, K+d, E)
        if d == depths[0]:
            rew_logits, cont_logit = wm.calibrated_heads(z[:, -2], z[:, -1])
            hat = twohot_decode(rew_logits, wm.reward_bins)
            ok = (hat - r).abs() < 0.5
            out["real_pairs_acc"] = float(ok[keep].float().mean())
        pred, window = open_loop(wm, z[:, :K], batch.actions[:, K - 1 :], d)
        ok = (pred.reward - r).abs() < 0.5
        out[f"d{d}_acc"] = float(ok[keep].float().mean())
        # The same depth from windows that end on an unrewarded step: a reward head that calls
        # everything rewarded would score well above and tell the policy nothing.
        plain = buf.sample(n, K + d, rng, rewarded_fraction=0.0)
        quiet = plain.rewards[:, -1] == 0
        p0, _ = open_loop(wm, wm.encode(plain.frames[:, :K]), plain.actions[:, K - 1 :], d)
        out[f"d{d}_acc_zero"] = float((p0.reward[quiet].abs() < 0.5).float().mean())
        out[f"d{d}_mean_zero"] = float(p0.reward[quiet].mean())
        out[f"d{d}_acc_pos"] = float(ok[keep & (r > 0)].float().mean())
        out[f"d{d}_acc_neg"] = float(ok[keep & (r < 0)].float().mean())
        out[f"d{d}_mean_pos"] = float(pred.reward[keep & (r > 0)].mean())
        out[f"d{d}_mean_neg"] = float(pred.reward[keep & (r < 0)].mean())
        out[f"d{d}_cont"] = float(pred.cont[keep].mean())
        out[f"d{d}_latent_mse"] = float((window[:, -1] - z[:, -1]).square().mean())
    wm.train()
    return out


@torch.no_grad()
def past_the_end(wm: WorldModel, buf: ReplayBuffer, n: int, horizon: int, rng: np.random.Generator) -> dict[str, float]:
    """Imagination from windows that end at an episode's last frame, under random actions: the
    continue probability of the first step and the imagined return (the truth is 0: nothing follows)."""
    wm.eval()
    K = wm.cfg.context
    batch = buf.sample(n, K + 1, rng, rewarded_fraction=1.0)
    ends = (batch.rewards[:, -1] != 0) | (batch.continues[:, -1] < 0.5)
    window = wm.encode(batch.frames[:, 1:][ends])
    alive, ret, first_cont = torch.ones(len(window)), torch.zeros(len(window)), None
    for _ in range(horizon):
        pred = wm.imagine_step(window, torch.as_tensor(rng.integers(0, wm.num_actions, len(window))))
        first_cont = pred.cont.mean() if first_cont is None else first_cont
        ret += alive * pred.reward
        alive = alive * pred.cont
        window = torch.cat([window[:, 1:], pred.latent], dim=1)
    wm.train()
    return {
        "past_end_windows": float(len(window)),
        "past_end_first_cont": float(first_cont),
        "past_end_return": float(ret.mean()),
        "past_end_abs_return": float(ret.abs().mean()),
    }


def measure(wm: WorldModel, held_out: ReplayBuffer, depths: list[int], windows: int, horizon: int, seed: int) -> dict:
    """:func:`fidelity` and :func:`past_the_end` on ``held_out``, each with its own fixed RNG."""
    return {
        **fidelity(wm, held_out, depths, windows, np.random.default_rng(seed + 1)),
        **past_the_end(wm, held_out, 256, horizon, np.random.default_rng(seed + 2)),
    }


def print_row(row: dict) -> None:
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--env", default="wm/Catch-v0")
    p.add_argument("--updates", type=int, default=1200)
    p.add_argument("--eval-every", type=int, default=400)
    p.add_argument("--data-steps", type=int, default=20_000)
    p.add_argument("--eval-steps", type=int, default=8_000)
    p.add_argument("--depths", default="1,2,4,7,11")
    p.add_argument("--eval-windows", type=int, default=200, help="windows per depth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None, help="JSON lines of the results")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="measure a trained run's world model instead of training one"
    )
    args, overrides = p.parse_known_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    depths = [int(x) for x in args.depths.split(",")]
    t0 = time.time()
    held_out = random_replay(args.env, args.eval_steps, 8, args.seed + 1000)
    if args.checkpoint is not None:
        agent = load_agent(args.checkpoint, torch.device("cpu"))
        agent.wm.set_base_rates(*held_out.base_rates())
        scores = measure(agent.wm, held_out, depths, args.eval_windows, agent.cfg.ppo.horizon, args.seed)
        print_row({"checkpoint": str(agent.checkpoint), "env_steps": agent.env_steps, **scores})
        return
    cfg: TrainConfig = parse_config(overrides, preset("cpu"), "config overrides, as for wm-agent train")
    print("overrides:", " ".join(overrides) or "none", flush=True)
    train = random_replay(args.env, args.data_steps, 8, args.seed)
    wm = WorldModel(cfg.world_model, num_actions=3 if args.env == "wm/Catch-v0" else 4)
    wm.set_base_rates(*train.base_rates())
    trainer = WorldModelTrainer(wm, cfg.optim, torch.device("cpu"), amp=False)
    rng = np.random.default_rng(args.seed)
    L = cfg.world_model.seq_len
    t_train, rows = 0.0, []
    for i in range(args.updates + 1):
        if i % args.eval_every == 0 and i > 0:
            scores = measure(wm, held_out, depths, args.eval_windows, cfg.ppo.horizon, args.seed)
            rows.append({"updates": i, "train_s": round(t_train, 1), **scores})
            print_row(rows[-1])
        if i == args.updates:
            break
        t1 = time.time()
        batch = train.sample(cfg.batch_size, L, rng, "cpu", rewarded_fraction=cfg.rewarded_fraction)
        head = None
        if cfg.head_batch_size > 0:
            head = train.sample(cfg.head_batch_size, 2, rng, "cpu", rewarded_fraction=cfg.head_rewarded_fraction)
        trainer.update(batch, head)
        t_train += time.time() - t1
    if args.out:
        args.out.write_text("".join(json.dumps({"overrides": overrides, **r}) + "\n" for r in rows))
    print(f"done in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
