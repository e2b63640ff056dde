"""Which input tells a reward (or a lost life) better, d steps into imagination: the transition pair the
heads read now (z_t, predicted z_t+1), or the predictor's own last hidden token (before its LN+Linear)?

A saved ``bench world-model`` model (``--model DIR/world_model.pt``, built with the ``cpu`` preset) is
frozen; fresh MLP heads (2 x 256) learn, class-balanced, from 20k random-policy Breakout steps at depth
1 (real context, one predicted step); their ranking (AUC, no calibration) is read on 10k held-out steps
(seed 1) at depths 1, 4 and 8 of open-loop imagination under the real actions.

    python -m scripts.head_inputs --model runs/cand/E2_dyn48/world_model.pt
"""

import argparse
import json
import time

import numpy as np
import torch

from agent.config import preset
from agent.replay import random_replay
from agent.wm_report import encode_all, episode_windows
from envs.annotations import annotated_rollout
from scripts.end_window import auc, fit
from worldmodel.world_model import WorldModel


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/cand/E2_dyn48/world_model.pt")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    cfg = preset("cpu")
    K = cfg.world_model.context
    wm = WorldModel(cfg.world_model, 4)
    wm.load_state_dict_compat(torch.load(args.model, weights_only=True)["world_model"])
    wm.eval()
    t0 = time.time()
    tr = random_replay("ALE/Breakout-v5", 20_000, 8, 0, rng)
    S = tr.filled
    tr_f, tr_a, tr_r, tr_end, tr_first = (
        tr.frames[:S],
        tr.actions[:S],
        tr.rewards[:S],
        tr.terminated[:S] | tr.life_loss[:S],
        tr.is_first[:S],
    )
    te = annotated_rollout("ALE/Breakout-v5", 10_000, 8, 1)
    te_a, te_r, te_end, te_first = te.actions, te.rewards, te.terminated | te.life_loss, te.is_first
    z_tr, z_te = encode_all(wm, tr_f), encode_all(wm, te.frames)
    print("data", round(time.time() - t0), flush=True)

    @torch.no_grad()
    def feats(z, acts, starts, envs, d):
        """d predictor steps open loop from K real latents; features of the last step: pair and hidden."""
        w = z[starts[:, None] + np.arange(K), envs[:, None]]  # (M, K, E)
        for j in range(d):
            a = torch.as_tensor(acts[starts + K - 1 + j, envs])
            tokens = torch.cat([wm.predictor.action_embed(a).unsqueeze(1), w], 1)
            h = wm.predictor.transformer_outputs(tokens)[:, -1]
            nz = wm.predictor(w, a)
            prev = w[:, -1]
            w = torch.cat([w[:, 1:], nz], 1)
        n = wm.head_input_norm
        return torch.cat([n(prev), n(nz[:, 0])], -1), h

    def label(arr, starts, envs, d):
        return arr[starts + K - 1 + d - 1, envs]

    # train windows at depth 1 (the transition right after the context)
    s, e = episode_windows(tr_first, K + 1, 0, S)
    pair_tr, hid_tr = [], []
    for i in range(0, len(s), 4096):
        p, h = feats(z_tr, tr_a, s[i : i + 4096], e[i : i + 4096], 1)
        pair_tr.append(p)
        hid_tr.append(h)
    pair_tr, hid_tr = torch.cat(pair_tr), torch.cat(hid_tr)
    y_rew = torch.as_tensor(label(tr_r, s, e, 1) != 0).float()
    y_end = torch.as_tensor(label(tr_end, s, e, 1)).float()
    print(
        "train windows",
        len(s),
        "rewarded",
        int(y_rew.sum()),
        "ended",
        int(y_end.sum()),
        round(time.time() - t0),
        flush=True,
    )

    heads = {
        (kind, inp): fit(x, y)
        for kind, y in (("reward", y_rew), ("end", y_end))
        for inp, x in (("pair", pair_tr), ("hidden", hid_tr), ("both", torch.cat([pair_tr, hid_tr], -1)))
    }
    print("fitted", round(time.time() - t0), flush=True)
    for d in (1, 4, 8):
        s, e = episode_windows(te_first, K + d, 0, te_first.shape[0])
        p, h = feats(z_te, te_a, s, e, d)
        x = {"pair": p, "hidden": h, "both": torch.cat([p, h], -1)}
        lr, le = label(te_r, s, e, d) != 0, label(te_end, s, e, d)
        out = {"depth": d, "windows": len(s), "rewarded": int(lr.sum()), "ended": int(le.sum())}
        for (kind, inp), f in heads.items():
            out[f"{kind}_auc_{inp}"] = round(auc(f(x[inp]).numpy(), lr if kind == "reward" else le), 3)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
