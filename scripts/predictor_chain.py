"""Does the predictor carry the ball further when it learns longer open-loop chains? A saved ``bench
world-model`` model (``DIR/world_model.pt``, rebuilt from ``DIR/world_model_check.json``) is frozen and
its encoder's latents of 20k random-policy Breakout steps (seed 0) are computed once. For each chain
length P in ``--chains``, a fresh predictor of the model's form learns on those latents alone with the
world model's own predictor losses (``WorldModel._predict``: the one-step latent loss of P real
windows and a P-step open-loop chain, weighted as in the preset), the same seed, updates and batch
for every P. Each is then read, in place of the model's predictor, by ``bench world-model``'s report on
the held-out rollout (seed 1): the probes' R^2 on open-loop latents at depths 1 / 4 / 8. The model's
own predictor (trained online, P = ``pred_steps``) is read the same way first.

    python -m scripts.predictor_chain runs/cand/K8_W8 --chains 3 8 --updates 2000 --batch 32
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from agent.bench import load_world_model_check
from agent.wm_report import encode_all, episode_windows, replay_of, world_model_report
from envs.annotations import annotated_rollout
from worldmodel.predictor import LatentDynamicsPredictor
from worldmodel.world_model import WorldModel


def train_predictor(
    wm: WorldModel, z: torch.Tensor, actions: np.ndarray, is_first: np.ndarray, P: int, updates: int, batch: int
) -> LatentDynamicsPredictor:
    """A fresh predictor trained on frozen latents ``z [S, N, E]`` with ``P``-step chains."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    K = wm.cfg.context
    wm.predictor = LatentDynamicsPredictor(wm.cfg.predictor, wm.num_actions)
    wm.cfg.pred_steps = P
    starts, envs = episode_windows(is_first, K + P, 0, is_first.shape[0])
    opt = torch.optim.AdamW(wm.predictor.parameters(), 1e-3, weight_decay=0.0)
    lc, t0 = wm.cfg.loss, time.time()
    for u in range(updates):
        i = rng.integers(len(starts), size=batch)
        s, e = starts[i][:, None] + np.arange(K + P), envs[i][:, None]
        dyn = wm._predict(z[s, e], torch.as_tensor(actions[s, e]), None)
        loss = lc.latent * dyn.latent_loss + lc.open_loop * dyn.open_loop_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if u % 500 == 0 or u == updates - 1:
            print(f"P={P} update {u}/{updates} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    return wm.predictor


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--chains", type=int, nargs="+", default=[3, 8])
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--train-steps", type=int, default=20_000)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument(
        "--save-dir", type=Path, default=None, help="save each model, its predictor swapped, as SAVE_DIR/P<chain>"
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    check = json.loads((a.model_dir / "world_model_check.json").read_text())
    wm, cfg = load_world_model_check(a.model_dir, check)
    wm.eval()
    for q in wm.parameters():
        q.requires_grad_(False)
    tr = annotated_rollout(check["env"], a.train_steps, 8, 0)
    te = annotated_rollout(check["env"], check["test_steps"], 8, 1)
    z_tr = encode_all(wm, tr.frames)
    rows = []

    def measure(name: str, P: int, seconds: float) -> None:
        wm.eval()
        rep = world_model_report(wm, replay_of(te), te.positions, te.ball_in_play, depths=(1, 4, 8), seed=0)
        ol = rep["open_loop"]
        row = {
            "predictor": name,
            "chain": P,
            "train_seconds": round(seconds),
            **{k: {d: round(v, 3) for d, v in ol[k].items()} for k in ("ball_x_r2", "ball_y_r2", "paddle_x_r2")},
            "hold_last_ball_y_r2": {d: round(v, 3) for d, v in ol["hold_last_ball_y_r2"].items()},
            "reward_paid_share": {d: round(v, 3) for d, v in rep["reward_paid_share"].items()},
            "probe": {k: round(v, 3) for k, v in rep["probe"].items()},
        }
        rows.append(row)
        print(json.dumps(row), flush=True)

    measure("own", cfg.world_model.pred_steps, 0.0)
    for P in a.chains:
        t0 = time.time()
        train_predictor(wm, z_tr, tr.actions, tr.is_first, P, a.updates, a.batch)
        for q in wm.predictor.parameters():
            q.requires_grad_(False)
        measure("fresh", P, time.time() - t0)
        if a.save_dir:  # a model dir `end_window` and `remeasure_world_models` read
            d = a.save_dir / f"P{P}"
            d.mkdir(parents=True, exist_ok=True)
            torch.save({"world_model": wm.state_dict(), "num_actions": wm.num_actions}, d / "world_model.pt")
            (d / "world_model_check.json").write_text(json.dumps(check))
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
