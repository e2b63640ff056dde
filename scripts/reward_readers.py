"""Where does imagination lose a reward's step on Breakout: in the latents, or in the heads that read them?

One trained model (a run directory: the slow copy, as the policy used it) is frozen. On random-policy
Breakout (``--train-steps`` of seed 0 to fit, ``--test-steps`` of seed 1 to read, as ``bench
world-model``'s held-out data), for each depth d every window of K real frames up to step t (no episode
start inside) is labelled "transition t+d-1 -> t+d is rewarded". Fresh readers learn that label, all alike:
3,000 class-balanced BCE updates (32 rewarded, 96 not), on every rewarded window and ``--negatives``
others of the first 90% of the fit windows, their logit then shifted so that their predicted hits sum to
the true count on the last 10% (as ``calibrate_heads`` matches the real rate). The share printed is the
mean probability on rewarded test transitions (what a calibrated binary head pays of a reward) and on the
others. Readers:

- ``real``: an MLP (512, 256) on the K real latents up to t and the one-hot actions t .. t+d-1: what the
  encoder's latents hold about the reward d steps ahead, without imagination;
- on the window of K latents after d open-loop predictor steps from those K real latents under the real
  actions (what imagination's heads read): ``attn_W1``, the model's own head form and size reading the
  transition pair (the ``cpu`` preset's heads); ``attn_W{K-1}``, the same form reading K - 1 latents each
  side; ``mlp_2`` / ``mlp_K``: MLPs (512, 256) on the last 2 / all K latents.

Beside them, ``model_heads``: the model's own calibrated reward head on the same test windows (reward paid
over the true reward, as ``bench world-model``'s ``reward_paid_share``).

    python -m scripts.reward_readers runs/brk_sil_s2 --out readers.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agent.dyna import load_agent
from agent.wm_report import encode_all, episode_windows
from envs.annotations import AnnotatedRollout, annotated_rollout
from worldmodel.reward_predictor import RewardConfig, RewardPredictor
from worldmodel.world_model import WorldModel, fit_shift


def windows(ro: AnnotatedRollout, K: int, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Last context step ``t``, copy ``n`` and reward of transition ``t+d-1 -> t+d`` of every window of K + d
    frames inside one episode, in order of ``t``."""
    starts, ns = episode_windows(ro.is_first, K + d, 0, ro.is_first.shape[0])
    ts = starts + K - 1
    return ts, ns, ro.rewards[ts + d - 1, ns]


@torch.no_grad()
def inputs(
    wm: WorldModel, z: torch.Tensor, ro: AnnotatedRollout, ts: np.ndarray, ns: np.ndarray, d: int, imagine: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The real window ``[M, K, E]`` or, with ``imagine``, the window after ``d`` open-loop steps; the one-hot
    actions ``t .. t+d-1`` ``[M, d * A]``; the model's calibrated reward at the last step ``[M]``."""
    K = wm.cfg.context
    wins, paid = [], []
    for i in range(0, len(ts), 1024):
        s, n = ts[i : i + 1024], ns[i : i + 1024]
        w = z[s[:, None] + np.arange(-K + 1, 1), n[:, None]]
        if imagine:
            for j in range(d):
                pred = wm.imagine_step(w, torch.as_tensor(ro.actions[s + j, n]))
                w = torch.cat([w[:, 1:], pred.latent.to(w.dtype)], 1)
            paid.append(pred.reward.float())
        wins.append(w)
    actions = F.one_hot(torch.as_tensor(ro.actions[ts[:, None] + np.arange(d), ns[:, None]]), wm.num_actions)
    return torch.cat(wins), actions.flatten(1).float(), torch.cat(paid) if paid else torch.zeros(0)


class AttnReader(nn.Module):
    """The model's head form and size (``RewardPredictor``, one logit) on the last transition of a window,
    reading ``W`` latents each side."""

    def __init__(self, reward: RewardConfig, W: int) -> None:
        super().__init__()
        self.W, self.net = W, RewardPredictor(RewardConfig(**{**vars(reward), "out_dim": 1, "window": W}))

    def forward(self, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(w[:, -self.W - 1 : -1], w[:, -self.W :])[:, 0, 0]


class MLPReader(nn.Module):
    """An MLP (512, 256) on the last ``n`` latents of a window, and the actions when ``actions``."""

    def __init__(self, n: int, E: int, n_actions: int = 0) -> None:
        super().__init__()
        self.n, self.use_actions = n, n_actions > 0
        d_in = n * E + n_actions
        self.net = nn.Sequential(nn.Linear(d_in, 512), nn.SiLU(), nn.Linear(512, 256), nn.SiLU(), nn.Linear(256, 1))

    def forward(self, w: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        x = w[:, -self.n :].flatten(1)
        return self.net(torch.cat([x, a], 1) if self.use_actions else x)[:, 0]


def make_reader(name: str, wm: WorldModel, d: int) -> nn.Module:
    """``real``, ``attn_W<w>`` or ``mlp_<n>`` (see the module's doc) for depth ``d``."""
    K, E = wm.cfg.context, wm.cfg.encoder.latent_dim
    if name == "real":
        return MLPReader(K, E, d * wm.num_actions)
    if name.startswith("attn_W"):
        return AttnReader(wm.cfg.reward, int(name.removeprefix("attn_W")))
    return MLPReader(int(name.removeprefix("mlp_")), E)


def fit_and_read(
    net: nn.Module, fit: tuple, val: tuple, test: tuple, updates: int, rng: np.random.Generator
) -> np.ndarray:
    """Train ``net`` on ``fit`` = (windows, actions, labels), shift its logit so its hits sum to the true count
    on ``val``; its probabilities on ``test``."""
    (w, a, y), pos = fit, np.flatnonzero(fit[2])
    neg = np.flatnonzero(~fit[2])
    opt = torch.optim.AdamW(net.parameters(), 3e-4, weight_decay=1e-4)
    for _ in range(updates):
        b = np.concatenate([rng.choice(pos, 32), rng.choice(neg, 96)])
        loss = F.binary_cross_entropy_with_logits(net(w[b], a[b]), torch.as_tensor(y[b]).float())
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        logits = [
            torch.cat([net(w[i : i + 4096], a[i : i + 4096]) for i in range(0, len(w), 4096)])
            for w, a, _ in (val, test)
        ]
    shift = fit_shift(lambda sh: torch.sigmoid(logits[0] - sh).mean(), float(val[2].mean()), decreasing=True)
    return torch.sigmoid(logits[1] - shift.float()).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run directory (its newest checkpoint) or a checkpoint")
    p.add_argument("--train-steps", type=int, default=200_000)
    p.add_argument("--test-steps", type=int, default=40_000)
    p.add_argument("--negatives", type=int, default=30_000, help="unrewarded fit windows drawn per depth")
    p.add_argument("--depths", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--updates", type=int, default=3000)
    p.add_argument("--out", type=Path, default=None, help="write the table as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    wm = load_agent(args.run, torch.device("cpu")).wm
    K, E = wm.cfg.context, wm.cfg.encoder.latent_dim
    t0 = time.time()
    tr = annotated_rollout("ALE/Breakout-v5", args.train_steps, 8, 0)
    te = annotated_rollout("ALE/Breakout-v5", args.test_steps, 8, 1)
    z_tr, z_te = encode_all(wm, tr.frames), encode_all(wm, te.frames)
    print(f"data and latents {time.time() - t0:.0f} s; K = {K}, E = {E}", flush=True)
    result: dict = {"run": str(args.run), "K": K, "args": {k: str(v) for k, v in vars(args).items()}, "by_depth": {}}
    for d in args.depths:
        rng = np.random.default_rng(d)
        ts, ns, r = windows(tr, K, d)
        cut = int(0.9 * len(ts))
        pos = np.flatnonzero(r[:cut] != 0)
        chosen = np.concatenate([pos, rng.choice(np.flatnonzero(r[:cut] == 0), args.negatives, replace=False)])
        tts, tns, rt = windows(te, K, d)
        row: dict = {"rewarded_test": int((rt != 0).sum()), "rewarded_fit": len(pos)}
        for imagine in (False, True):
            fit_w, fit_a, _ = inputs(wm, z_tr, tr, ts[chosen], ns[chosen], d, imagine)
            val_w, val_a, _ = inputs(wm, z_tr, tr, ts[cut:], ns[cut:], d, imagine)
            test_w, test_a, paid = inputs(wm, z_te, te, tts, tns, d, imagine)
            mu, sd = fit_w.mean((0, 1)), fit_w.std((0, 1)) + 1e-5
            fit = ((fit_w - mu) / sd, fit_a, r[chosen] != 0)
            val, test = ((val_w - mu) / sd, val_a, r[cut:] != 0), ((test_w - mu) / sd, test_a, rt != 0)
            if imagine:
                names = ["attn_W1", f"attn_W{K - 1}", "mlp_2", f"mlp_{K}"]
                rewarded = rt != 0
                row["model_heads"] = {
                    "paid_share": float((paid[rewarded] / torch.as_tensor(rt[rewarded])).mean()),
                    "paid_unrewarded": float(paid[~rewarded].abs().mean()),
                }
            else:
                names = ["real"]
            for name in names:
                torch.manual_seed(0)
                prob = fit_and_read(make_reader(name, wm, d), fit, val, test, args.updates, rng)
                row[name] = {"paid_share": float(prob[rt != 0].mean()), "paid_unrewarded": float(prob[rt == 0].mean())}
        result["by_depth"][d] = row
        print(d, json.dumps(row), f"{time.time() - t0:.0f} s", flush=True)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
