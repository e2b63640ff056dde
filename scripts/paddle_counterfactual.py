"""Does imagination know that the paddle saves the ball? (issue 22, items 3 and 5)

From real Breakout states where the ball falls toward the paddle (random play, ball in play, RAM y
120-175 and growing), two action sequences play ``H`` steps in the real game: the RAM tracker (paddle
under the ball, FIRE without a ball) and its mirror (LEFT and RIGHT swapped: away from the ball). The
same action sequences are then fed to the world model from the same ``K`` frames, and the share of
starts that lose a life within ``h`` steps is compared, real against imagined, three ways:

- ``real_pairs``: the calibrated continue head on the encoder's latents of the real frames;
- ``one_step``: on one predictor step from the real context before each step;
- ``open_loop``: imagination as the policy sees it (the predictor fed its own outputs for ``h`` steps).

A policy can learn to follow the ball in imagination only if the open-loop mirror loses lives where the
tracker keeps them; ``pair_gap`` is the mean imagined difference (mirror minus tracker) on the starts
where only the mirror loses its life in the real game (1.0 would be a perfect model).

    python -m scripts.paddle_counterfactual MODEL [MODEL ...] --starts 400 --horizon 18

The open-loop figures are also in ``wm-agent bench world-model`` on Breakout (``paddle_saves``); this
script adds the two other ways and several models on the same starts.

The starts are drawn with the longest context of the models given (4 frames for every preset but
`atari100k`), so a set of models with another context gets other starts.

MODEL is a run directory (its acting model, shifts fitted on its replay) or a `bench world-model`
output directory holding `world_model.pt` (shifts fitted on random play like its training data).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from agent.bench import load_world_model_check
from agent.checkpoint import load_latest
from agent.dyna import calibrate_on_replay, load_agent
from agent.replay import random_replay
from agent.wm_report import paddle_saves, tracker_runs
from worldmodel.world_model import WorldModel


def load_model(path: Path, rng: np.random.Generator) -> WorldModel:
    """A run's acting world model, or a bench directory's, with its heads' shifts fitted."""
    if (path / "world_model.pt").exists():
        check = json.loads((path / "world_model_check.json").read_text())
        wm, _ = load_world_model_check(path, check)
        calibrate_on_replay(wm, random_replay(check["env"], check["data_steps"], 8, 0, np.random.default_rng(0)), rng)
    else:
        wm = load_agent(path, torch.device("cpu")).wm
        _, replay, _ = load_latest(path, with_replay=True, warn=print, quarantine_broken=False)
        calibrate_on_replay(wm, replay, rng)
    return wm.eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--starts", type=int, default=400)
    p.add_argument("--horizon", type=int, default=18)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    models = {path: load_model(path, np.random.default_rng(0)) for path in a.models}
    K = max(wm.cfg.context for wm in models.values())
    runs = tracker_runs("ALE/Breakout-v5", a.starts, a.horizon, K, a.seed)
    depths = tuple(sorted({10, 14, a.horizon}))
    for path, wm in models.items():
        row: dict = {"model": str(path), "head_shifts": [round(x, 2) for x in wm.head_shifts.tolist()]}
        for mode in ("real_pairs", "one_step", "open_loop"):
            r = paddle_saves(wm, runs, depths, mode)
            row[mode] = {k: r[k] for k in ("imagined_lost_tracker", "imagined_lost_mirror", "pair_gap")}
        row["real_lost"] = {k: r[f"real_lost_{k}"] for k in ("tracker", "mirror")}
        row["seconds"] = round(time.time() - t0)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
