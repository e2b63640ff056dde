"""How much of item 3 is the calibration's draw? Imagination's reward and continue heads are shifted so
that, on windows drawn from the replay (``calibrate_on_replay``: 512 uniform, 128 ending in a reward,
128 ending in a lost life, one step deep), they predict rewards and ends at the replay's rates.

A saved ``bench world-model`` model (``DIR/world_model.pt``, rebuilt from ``DIR/world_model_check.json``)
runs open loop once from every window of three random-policy sets, at depths 1-8, and keeps its heads'
raw logits: its training data (seed ``--seed``, as the bench drew it), its held-out set (seed + 1) and
a set it never saw (``--unseen-seed``). Any shift is then scored on the held-out set without running
the model again (item 3's figures, computed as ``bench world-model`` computes them, on every held-out
window rather than its subsample of the unrewarded ones):

- ``saved``: the bench's own draw; ``population``: the shifts fitted on every training window (depth 1,
  depths 1-5, depths 1-8) to the training replay's rates, as ``calibrate_on_replay`` targets them (windows inside
  episodes hold a few percent more rewards and ends than the whole replay, and where the heads are near certain
  that gap alone moves the fitted shift by logits); ``drawn``: ``--draws`` simulated draws of today's
  calibration (and of 8x as many windows, and over depths 1-5): the mean and spread of their shifts and of
  the figures;
- ``unseen``: the shifts fitted on every window of the unseen set at depths 1-5, and on each half
  (first and last half of its steps) to see how stable that fit is;
- ``log_ratio``: log of the held-out predicted over true rate of rewards and of ends, by depth.

    python -m scripts.calibration_spread runs/cand38/A_s0 --seed 0 --out runs/cand39/spread_A_s0.json
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agent.bench import load_world_model_check
from agent.dyna import CALIBRATION_EVENTS, CALIBRATION_SEQUENCES, calibration_weights
from agent.replay import ReplayBuffer, random_replay
from agent.wm_report import SIGN_SHARE, encode_all, episode_windows, replay_of
from envs.annotations import annotated_rollout
from worldmodel.twohot import twohot_decode
from worldmodel.world_model import WorldModel

DEPTHS = tuple(range(1, 9))
HORIZON = tuple(range(1, 6))  # the presets' imagination horizon
FIGURES = ("paid", "unrewarded", "sign", "lives", "false_end")


@torch.no_grad()
def raw_logits(wm: WorldModel, data: ReplayBuffer, chunk: int = 1024) -> dict[int, dict[str, torch.Tensor]]:
    """Per depth d: the heads' unshifted reward logits ``[M, bins]`` and continue logit ``[M]`` after d
    open-loop steps from every window of ``data`` inside one episode, with that step's true reward and
    end ``[M]``."""
    S, K = data.filled, wm.cfg.context
    z = encode_all(wm, data.frames[:S])
    rewards, ends = data.rewards[:S], data.terminated[:S] | data.life_loss[:S]
    out = {}
    for d in DEPTHS:
        starts, envs = episode_windows(data.is_first[:S], K + d, 0, S)
        rew, cont = [], []
        for i in range(0, len(starts), chunk):
            s, n = starts[i : i + chunk], envs[i : i + chunk]
            window = z[s[:, None] + np.arange(K), n[:, None]]
            for j in range(d):
                z_next = wm.predictor(window, torch.as_tensor(data.actions[s + K - 1 + j, n]))
                r, c = wm.heads(*wm.head_inputs(window, z_next[:, 0]))
                window = torch.cat([window[:, 1:], z_next.to(window.dtype)], dim=1)
            rew.append(r.float())
            cont.append(c.float())
        last = starts + K + d - 2
        out[d] = {
            "rew": torch.cat(rew),
            "cont": torch.cat(cont),
            "reward": torch.as_tensor(rewards[last, envs]).float(),
            "ended": torch.as_tensor(ends[last, envs]),
        }
    return out


class Scorer:
    """Fits and scores shifts on stored logits (see :func:`raw_logits`); ``rates``: the training replay's
    rewarded and ended fractions, the targets of every fit."""

    def __init__(self, wm: WorldModel, rates: tuple[float, float]) -> None:
        self.wm, self.zb, self.bins, self.rates = wm, wm.zero_bin, wm.reward_bins.cpu(), rates
        self.zero = F.one_hot(torch.tensor(self.zb), len(self.bins)).float()

    def p_reward(self, rew: torch.Tensor, shift: float | torch.Tensor) -> torch.Tensor:
        return 1 - (rew + shift * self.zero).softmax(-1)[:, self.zb]

    def fit(self, rew: torch.Tensor, cont: torch.Tensor, w_rew: torch.Tensor, w_end: torch.Tensor) -> list[float]:
        """The shifts at which the ``w``-weighted mean predicted rates meet :attr:`rates`."""
        return self.wm.fit_head_shifts(rew, cont, w_rew, w_end, *self.rates).tolist()

    def fit_all(self, sets: dict, depths: tuple[int, ...], half: int | None = None) -> list[float]:
        """Every window of ``sets`` at ``depths`` (or the first / second ``half`` of each depth's, in start
        order), equal weights."""
        rew, cont, w = [], [], []
        for d in depths:
            n = len(sets[d]["reward"])
            part = slice(None) if half is None else slice(0, n // 2) if half == 0 else slice(n // 2, n)
            m = len(sets[d]["reward"][part])
            rew.append(sets[d]["rew"][part])
            cont.append(sets[d]["cont"][part])
            w.append(torch.full((m,), 1 / (m * len(depths))))
        return self.fit(torch.cat(rew), torch.cat(cont), torch.cat(w), torch.cat(w))

    def fit_drawn(
        self, sets: dict, depths: tuple[int, ...], rng: np.random.Generator, n_uniform: int, n_events: int
    ) -> list[float]:
        """One draw of ``calibrate_on_replay``'s windows from ``sets`` at each of ``depths``."""
        rew, cont, w_rew, w_end = [], [], [], []
        for d in depths:
            t = sets[d]
            u = rng.integers(0, len(t["reward"]), n_uniform)
            r_ = rng.choice(np.flatnonzero(t["reward"].numpy() != 0), n_events)
            e_ = rng.choice(np.flatnonzero(t["ended"].numpy()), n_events)
            idx = np.concatenate([u, r_, e_])
            wr, we = calibration_weights(t["reward"][u] != 0, t["ended"][u], n_events, n_events, self.rates)
            rew.append(t["rew"][idx])
            cont.append(t["cont"][idx])
            w_rew.append(wr / len(depths))
            w_end.append(we / len(depths))
        return self.fit(torch.cat(rew), torch.cat(cont), torch.cat(w_rew), torch.cat(w_end))

    def score(self, test: dict, shifts: list[float]) -> dict[str, dict[int, float]]:
        """Item 3's figures on the held-out logits under ``shifts``, by depth, and the log ratios of the
        predicted to the true rate of rewards and of ends."""
        out: dict[str, dict[int, float]] = {k: {} for k in FIGURES}
        out.update(log_ratio_reward={}, log_ratio_end={})
        for d in DEPTHS:
            t = test[d]
            r, rewarded, ended = t["reward"], t["reward"] != 0, t["ended"]
            paid = twohot_decode(t["rew"] + shifts[0] * self.zero, self.bins)
            cont = torch.sigmoid(t["cont"] + shifts[1])
            out["paid"][d] = float((paid[rewarded] / r[rewarded]).mean())
            out["unrewarded"][d] = float(paid[~rewarded].abs().mean())
            out["sign"][d] = float(
                (paid[rewarded] * r[rewarded].sign() >= SIGN_SHARE * r[rewarded].abs()).float().mean()
            )
            out["lives"][d] = float((cont[ended] < 0.5).float().mean())
            out["false_end"][d] = float((cont[~ended] < 0.5).float().mean())
            p_rew = self.p_reward(t["rew"], shifts[0]).mean()
            out["log_ratio_reward"][d] = float(torch.log(p_rew / rewarded.float().mean()))
            out["log_ratio_end"][d] = float(torch.log((1 - cont).mean() / ended.float().mean()))
        return out


def spread(scores: list[dict]) -> dict[str, dict[int, list[float]]]:
    """Mean and standard deviation over draws of each figure, by depth."""
    return {
        k: {d: [float(np.mean([s[k][d] for s in scores])), float(np.std([s[k][d] for s in scores]))] for d in DEPTHS}
        for k in scores[0]
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a bench world-model --out-dir")
    parser.add_argument("--seed", type=int, required=True, help="the bench's --seed (its data and held-out draws)")
    parser.add_argument("--unseen-seed", type=int, default=5)
    parser.add_argument("--unseen-steps", type=int, default=20000)
    parser.add_argument("--draws", type=int, default=100)
    parser.add_argument("--data-steps", type=int, help="default: the bench's")
    parser.add_argument("--test-steps", type=int, help="default: the bench's")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    check = json.loads((args.run / "world_model_check.json").read_text())
    wm, _ = load_world_model_check(args.run, check)
    wm.eval()
    t0 = time.time()
    env = check["env"]
    train = random_replay(env, args.data_steps or check["data_steps"], 8, args.seed, np.random.default_rng(args.seed))
    sets = {
        "train": raw_logits(wm, train),
        "test": raw_logits(
            wm, replay_of(annotated_rollout(env, args.test_steps or check["test_steps"], 8, args.seed + 1))
        ),
        "unseen": raw_logits(
            wm, random_replay(env, args.unseen_steps, 8, args.unseen_seed, np.random.default_rng(args.unseen_seed))
        ),
    }
    print(f"logits of three sets in {time.time() - t0:.0f} s", flush=True)
    scorer = Scorer(wm, train.base_rates())
    fits: dict[str, list[float]] = {"saved": wm.head_shifts.tolist()}
    for name, depths in (("population d1", (1,)), ("population d1-5", HORIZON), ("population d1-8", DEPTHS)):
        fits[name] = scorer.fit_all(sets["train"], depths)
    fits["unseen d1-5"] = scorer.fit_all(sets["unseen"], HORIZON)
    fits["unseen d1-5, first half"] = scorer.fit_all(sets["unseen"], HORIZON, half=0)
    fits["unseen d1-5, second half"] = scorer.fit_all(sets["unseen"], HORIZON, half=1)
    result = {"run": str(args.run), "seed": args.seed, "rates": scorer.rates, "fits": {}, "drawn": {}}
    for name, shifts in fits.items():
        result["fits"][name] = {"shifts": shifts, **scorer.score(sets["test"], shifts)}
    rng = np.random.default_rng(0)
    for name, depths, n_u, n_ev in (
        ("drawn d1, 512 + 2 x 128 (today)", (1,), CALIBRATION_SEQUENCES, CALIBRATION_EVENTS),
        ("drawn d1, 4096 + 2 x 1024", (1,), 8 * CALIBRATION_SEQUENCES, 8 * CALIBRATION_EVENTS),
        ("drawn d1-5, 512 + 2 x 128", HORIZON, CALIBRATION_SEQUENCES, CALIBRATION_EVENTS),
    ):
        shifts = np.array([scorer.fit_drawn(sets["train"], depths, rng, n_u, n_ev) for _ in range(args.draws)])
        result["drawn"][name] = {
            "shift_mean": shifts.mean(0).tolist(),
            "shift_sd": shifts.std(0).tolist(),
            **spread([scorer.score(sets["test"], s.tolist()) for s in shifts]),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(
        f"rates {scorer.rates[0]:.4f} / {scorer.rates[1]:.4f}; held-out rewarded / ended windows at depth 1: "
        f"{int((sets['test'][1]['reward'] != 0).sum())} / {int(sets['test'][1]['ended'].sum())}"
    )
    print("| shifts from | reward / continue shift | paid d1/4/8 | unrewarded | sign | lives flagged | false end |")
    print("|---|---|---|---|---|---|---|")
    for name, f in result["fits"].items():
        cols = " | ".join(" / ".join(f"{f[k][d]:.3f}" for d in (1, 4, 8)) for k in FIGURES)
        print(f"| {name} | {f['shifts'][0]:.2f} / {f['shifts'][1]:.2f} | {cols} |")
    for name, f in result["drawn"].items():
        cols = " | ".join(" / ".join(f"{f[k][d][0]:.3f}+-{f[k][d][1]:.3f}" for d in (1, 4, 8)) for k in FIGURES)
        mean, sd = f["shift_mean"], f["shift_sd"]
        print(f"| {name}, {args.draws} draws | {mean[0]:.2f}+-{sd[0]:.2f} / {mean[1]:.2f}+-{sd[1]:.2f} | {cols} |")


if __name__ == "__main__":
    main()
