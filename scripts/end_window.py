"""How many latents must a continue head read to time a lost life? On Breakout the ball is not drawn
on the 3-6 frames before a life is lost, so a head reading the transition pair cannot tell when.

A saved ``bench world-model`` model (``DIR/world_model.pt``, rebuilt from the preset and flags in
``DIR/world_model_check.json``) is frozen. For each window size W, a fresh MLP (2 x 256,
class-balanced) reads the W latents ending at a transition's next frame (W = 2 is the pair that heads
of ``reward.window`` 1 read; ``reward.window`` w reads w + 1 frames) and learns whether that
transition loses a life, from 20k random-policy steps (seed 0); its logit is then shifted so that its
mean probability on those steps equals their life-loss rate (as ``calibrate_heads`` does), and it is
read on 10k held-out steps (seed 1). At depth d the last d latents of each window are the predictor's,
run open loop under the real actions from real context (the heads of depth d learn on depth-d
windows). Printed per W and d: AUC, the share of life losses flagged (p > 0.5, item 3's
``life_loss_recall``) and of other steps flagged, and the mean probability on each; the same for a
head of "this transition is rewarded" (its mean probability on rewarded steps is what a calibrated
binary reward head pays of a reward).

``--heads`` picks the fitted head's form (``mlp``; ``cls``, the model's own ``RewardPredictor`` form;
its variants ``cls_wide``, ``cls_h8``, ``cls_tok``, ``cls_h8_tok``, see :func:`make_head`) or ``online``:
the model's own trained heads, read with their window (``--sizes`` = ``reward.window`` + 1), first
retrained on the frozen latents as a run trains them when ``--retrain-updates`` is given (the run's
batches, with ``--train-flags`` added to the bench's flags; a flag of ``--world-model.reward`` gives
the fresh heads another form, e.g. ``--world-model.reward.reader mlp``; ``--world-model.pred-steps`` trains
them on deeper open-loop windows).

    python -m scripts.end_window runs/cand/K8_W8 --sizes 2 3 5 7 9
    python -m scripts.end_window runs/cand/K8_W8 --sizes 9 --depths 1 4 --heads online --retrain-updates 3000 \
        --train-flags "--head-batch-size 16 --head-rewarded-fraction 0.5 --head-ended-fraction 0.5"
"""

import argparse
import dataclasses
import json
import shlex
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from agent.bench import load_world_model_check, world_model_check_config
from agent.config import TrainConfig
from agent.dyna import sample_world_model_batches
from agent.replay import ReplayBuffer
from agent.wm_report import encode_all, episode_windows, replay_of
from envs.annotations import annotated_rollout
from worldmodel.reward_predictor import RewardConfig, RewardPredictor
from worldmodel.world_model import WorldModel, fit_shift


@torch.no_grad()
def windows_at_depth(
    wm: WorldModel,
    z: torch.Tensor,
    actions: np.ndarray,
    ends: np.ndarray,
    envs: np.ndarray,
    W: int,
    d: int,
    chunk: int = 8192,
) -> torch.Tensor:
    """Standardized latents ``[M, W * E]`` of the W frames ending at frame ``ends`` of copy ``envs``, the last
    ``d`` of them predicted open loop from the ``K`` real frames before them; ``chunk`` windows at a time, so
    that the predictor's activations stay small."""
    if len(ends) > chunk:
        return torch.cat(
            [
                windows_at_depth(wm, z, actions, ends[i : i + chunk], envs[i : i + chunk], W, d, chunk)
                for i in range(0, len(ends), chunk)
            ]
        )
    K = wm.cfg.context
    real = z[ends[:, None] - W + 1 + np.arange(W), envs[:, None]]  # (M, W, E)
    if d > 0:
        first = ends - d + 1  # first predicted frame
        window = z[first[:, None] - K + np.arange(K), envs[:, None]]
        pred = []
        for j in range(d):
            a = torch.as_tensor(actions[first - 1 + j, envs])
            nz = wm.predictor(window, a)
            pred.append(nz[:, 0])
            window = torch.cat([window[:, 1:], nz], 1)
        real = torch.cat([real[:, : W - d] if W > d else real[:, :0], torch.stack(pred, 1)[:, -W:]], 1)
    return wm.head_input_norm(real).flatten(1)


def hidden_before_ends(ro) -> dict[int, int]:
    """How many frames up to the one a lost life (or the game) is played from show no ball in play
    (RAM), counted back to the last one that does: ``{frames: how many ends}``."""
    counts: dict[int, int] = {}
    for step, env in zip(*np.nonzero(ro.life_loss | ro.terminated), strict=True):
        k = 0
        while step - k >= 0 and not ro.ball_in_play[step - k, env] and not (k > 0 and ro.is_first[step - k + 1, env]):
            k += 1
        counts[k] = counts.get(k, 0) + 1
    return dict(sorted(counts.items()))


class WindowHead(nn.Module):
    """A ``RewardPredictor`` (one logit) on flattened windows ``[M, W * E]``: the first W - 1 latents are
    the ones up to the transition, the last W - 1 the ones up to its next latent (``reward.window`` W - 1)."""

    def __init__(self, cfg: RewardConfig, W: int) -> None:
        super().__init__()
        self.W, self.net = W, RewardPredictor(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.view(len(x), self.W, -1)
        return self.net(w[:, :-1], w[:, 1:])[:, 0]


def mlp(d_in: int) -> nn.Module:
    """2 x 256 GELU MLP with one logit."""
    return nn.Sequential(nn.Linear(d_in, 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 1))


def make_head(form: str, reward: RewardConfig, W: int, E: int) -> nn.Module:
    """``mlp``: 2 x 256 on the flattened window; ``cls``: the world model's own head form (``reward``);
    ``cls_wide``: ``cls`` at width E with 4 attention heads; ``cls_h8``: width 128, 8 heads; a ``_tok`` suffix
    passes each latent through a 2-layer MLP, not one Linear, before the attention."""
    if form == "mlp":
        return mlp(W * E)
    base = form.removesuffix("_tok")
    sizes = {
        "cls": {},
        "cls_wide": {"hidden_dim": E, "num_heads": 4},
        "cls_h8": {"hidden_dim": 128, "num_heads": 8},
    }[base]
    head = WindowHead(RewardConfig(**{**vars(reward), "out_dim": 1, "window": W - 1, **sizes}), W)
    if form.endswith("_tok"):
        H = head.net.cfg.hidden_dim
        head.net.proj = nn.Sequential(nn.Linear(E, H), nn.GELU(), nn.Linear(H, H))
    return head


def trained_head(wm: WorldModel, kind: str, W: int):
    """The world model's own head as a function from standardized windows ``[M, W * E]`` (W must be
    ``reward.window`` + 1) to the logit of an end, or of a non-zero reward, before any calibration shift."""
    if W != wm.cfg.reward.window + 1:
        raise SystemExit(f"--heads online reads the model's own window: --sizes {wm.cfg.reward.window + 1}")

    @torch.no_grad()
    def logits(x: torch.Tensor) -> torch.Tensor:
        out = []
        for c in x.split(4096):
            w = c.view(len(c), W, -1)
            if kind == "end":
                out.append(-wm.cont_head(w[:, :-1], w[:, 1:])[:, 0, 0])
            else:
                p_none = wm.reward_head(w[:, :-1], w[:, 1:])[:, 0].log_softmax(-1)[:, wm.zero_bin]
                out.append(torch.log1p(-p_none.exp().clamp(max=1 - 1e-6)) - p_none)
        return torch.cat(out)

    return logits


def retrain_heads(wm: WorldModel, cfg: TrainConfig, replay: ReplayBuffer, updates: int) -> float:
    """Fresh reward and continue heads of ``cfg.world_model.reward`` (its reader and window may differ from the
    saved model's, and so may ``pred_steps``, how deep the open-loop windows they learn on go), trained as a run
    trains them (its batches, its head losses, AdamW at its learning rate) for ``updates`` updates on the frozen
    encoder's and predictor's latents: what the heads learn when the latents stand still. Returns the seconds
    it took."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    kept = dataclasses.replace(cfg.world_model, reward=wm.cfg.reward, loss=wm.cfg.loss, pred_steps=wm.cfg.pred_steps)
    if kept != wm.cfg:
        raise SystemExit(
            "--train-flags may change only --world-model.reward.*, --world-model.loss.* and "
            "--world-model.pred-steps here"
        )
    fresh = WorldModel(cfg.world_model, wm.num_actions)
    wm.cfg, wm.reward_head, wm.cont_head = cfg.world_model, fresh.reward_head, fresh.cont_head
    wm.reward_bins, wm.zero_bin = fresh.reward_bins, fresh.zero_bin  # a loss flag may set other bins
    params = [*wm.reward_head.parameters(), *wm.cont_head.parameters()]
    o = cfg.optim
    opt = torch.optim.AdamW(params, o.lr, weight_decay=o.weight_decay, eps=o.eps)
    lc, t0 = wm.cfg.loss, time.time()
    for u in range(updates):
        batch, head_batch, _ = sample_world_model_batches(replay, cfg, rng, torch.device("cpu"))
        with torch.no_grad():
            z = wm.encode(batch.frames)
            dyn = wm._predict(z, batch.actions, None)
        terms = wm._head_losses(batch, z, dyn, head_batch)
        loss = lc.reward * terms["reward"][0] + lc.cont * terms["cont"][0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if u % 500 == 0:
            print(f"retrain {u}/{updates} loss {loss.item():.3f} {time.time() - t0:.0f}s", flush=True)
    return time.time() - t0


def fit(
    x: torch.Tensor,
    y: torch.Tensor,
    net: nn.Module | None = None,
    steps: int = 3000,
    positives: int = 128,
):
    """Class-balanced binary classifier ``net`` (default: :func:`mlp`) on standardized inputs ``x [N, D]``,
    labels ``y [N]``, ``positives`` and 128 negatives a step, drawn from torch's global generator; returns
    a function from inputs to logits (tensors)."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    if net is None:
        net = mlp(x.shape[1])
    opt = torch.optim.Adam(net.parameters(), 1e-3, weight_decay=1e-4)
    pos, neg = torch.nonzero(y > 0.5)[:, 0], torch.nonzero(y < 0.5)[:, 0]
    for _ in range(steps):
        idx = torch.cat([pos[torch.randint(len(pos), (positives,))], neg[torch.randint(len(neg), (128,))]])
        loss = F.binary_cross_entropy_with_logits(net((x[idx] - mu) / sd)[:, 0], y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()

    @torch.no_grad()
    def logits(q: torch.Tensor) -> torch.Tensor:
        return torch.cat([net((c - mu) / sd)[:, 0] for c in q.split(4096)])

    return logits


def auc(score: np.ndarray, y: np.ndarray) -> float:
    y = np.asarray(y, bool)
    ranks = np.empty(len(score))
    ranks[np.argsort(score)] = np.arange(1, len(score) + 1)
    npos, nneg = y.sum(), (~y).sum()
    return float((ranks[y].sum() - npos * (npos + 1) / 2) / max(npos * nneg, 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 3, 5, 7, 9])
    parser.add_argument("--depths", type=int, nargs="+", default=[0, 1, 4])
    parser.add_argument(
        "--heads",
        nargs="+",
        default=["mlp"],
        choices=["mlp", "cls", "cls_wide", "cls_h8", "cls_tok", "cls_h8_tok", "online"],
        help="online: the model's own heads as trained (no fit; calibrated the same way), or as retrained "
        "with --retrain-updates",
    )
    parser.add_argument("--kinds", nargs="+", default=["end", "reward"], choices=["end", "reward"])
    parser.add_argument("--positives", type=int, default=128, help="positive examples per step of a fitted head")
    parser.add_argument(
        "--retrain-updates", type=int, default=0, help="first retrain the model's heads this many updates"
    )
    parser.add_argument("--train-flags", default="", help="flags of the retraining run, e.g. '--head-batch-size 16'")
    parser.add_argument("--train-steps", type=int, default=20_000)
    parser.add_argument("--test-steps", type=int, default=10_000)
    parser.add_argument("--test-seed", type=int, default=1, help="seed of the held-out rollout (the fit's is 0)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    check = json.loads((args.model_dir / "world_model_check.json").read_text())
    wm, _ = load_world_model_check(args.model_dir, check)  # the saved heads' form, whatever the flags
    cfg = world_model_check_config(check, shlex.split(args.train_flags))
    K = cfg.world_model.context
    wm.eval()
    t0 = time.time()
    tr = annotated_rollout("ALE/Breakout-v5", args.train_steps, 8, 0)
    te = annotated_rollout("ALE/Breakout-v5", args.test_steps, 8, args.test_seed)
    z_tr, z_te = encode_all(wm, tr.frames), encode_all(wm, te.frames)
    print("data", round(time.time() - t0), flush=True)
    if args.retrain_updates:
        print("retrained heads", round(retrain_heads(wm, cfg, replay_of(tr), args.retrain_updates)), flush=True)
        wm.eval()
    print(json.dumps({"hidden_frames_before_an_end": hidden_before_ends(te)}), flush=True)
    span = max(max(args.sizes), K + max(args.depths))
    rows = []
    for W in args.sizes:
        for d in args.depths:
            data = {}
            for name, ro, z in (("train", tr, z_tr), ("test", te, z_te)):
                s, e = episode_windows(ro.is_first, span + 1, 0, ro.is_first.shape[0])
                ends = s + span  # the next frame of transition ends - 1
                x = windows_at_depth(wm, z, ro.actions, ends, e, W, d)
                labels = {
                    "end": ro.life_loss[ends - 1, e] | ro.terminated[ends - 1, e],
                    "reward": ro.rewards[ends - 1, e] != 0,
                }
                data[name] = x, {k: torch.as_tensor(v).float() for k, v in labels.items()}
            for kind, form in ((k, f) for k in args.kinds for f in args.heads):
                (x, ys), (xt, yts) = data["train"], data["test"]
                y, yt = ys[kind], yts[kind].numpy() > 0.5
                torch.manual_seed(0)
                if form == "online":
                    head = trained_head(wm, kind, W)
                else:
                    net = make_head(form, cfg.world_model.reward, W, x.shape[1] // W)
                    head = fit(x, y, net, positives=args.positives)
                logits = head(x)
                shift = fit_shift(lambda sh, lg=logits: torch.sigmoid(lg - sh).mean(), float(y.mean()), decreasing=True)
                p = torch.sigmoid(head(xt) - shift).numpy()
                out = {
                    "kind": kind,
                    "head": form,
                    "retrain_updates": args.retrain_updates,
                    "train_flags": args.train_flags,
                    "positives": args.positives,
                    "window": W,
                    "depth": d,
                    "train_pos": int(y.sum()),
                    "test_pos": int(yt.sum()),
                    "shift": round(float(shift), 2),
                    "auc": round(auc(p, yt), 3),
                    "flagged": round(float((p[yt] > 0.5).mean()), 3),
                    "flagged_else": round(float((p[~yt] > 0.5).mean()), 4),
                    "mean_p": round(float(p[yt].mean()), 3),
                    "mean_p_else": round(float(p[~yt].mean()), 4),
                }
                rows.append(out)
                print(json.dumps(out), round(time.time() - t0), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
