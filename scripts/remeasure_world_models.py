"""Re-read saved `bench world-model` results with today's measures (e.g. after a label fix), without
training again: each ``DIR/world_model.pt`` is rebuilt from the preset and flags in its
``world_model_check.json`` and measured on the same held-out rollout (seed 1) with
``agent.wm_report.world_model_report``; the report goes to ``DIR/--out``. With ``--calibrate`` the
heads' shifts are fitted as the bench fits them today (``WorldModel.calibrate_heads`` on random-policy
data like the bench's training data, seed 0) instead of the saved ones.

    python -m scripts.remeasure_world_models runs/cand/E2_dyn48 runs/cand/K_pred4
    python -m scripts.remeasure_world_models runs/cand/E2_dyn48 --calibrate --out report_calibrated.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from agent.bench import load_world_model_check
from agent.dyna import calibrate_on_replay
from agent.replay import random_replay
from agent.wm_report import replay_of, world_model_report
from envs.annotations import annotated_rollout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="report_visible_ball.json")
    p.add_argument("--calibrate", action="store_true", help="fit the heads' shifts as the bench does today")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rollouts, train_data = {}, {}
    for d in a.dirs:
        check = json.loads((d / "world_model_check.json").read_text())
        try:
            wm, _ = load_world_model_check(d, check)
        except (OSError, RuntimeError, KeyError) as e:  # no weights kept, or another preset's shapes
            print(json.dumps({"dir": str(d), "skipped": str(e).splitlines()[0][:120]}))
            continue
        env = check["env"]
        if env not in rollouts:
            rollouts[env] = annotated_rollout(env, check["test_steps"], 8, 1)
        r = rollouts[env]
        if a.calibrate:
            if (env, check["data_steps"]) not in train_data:
                train_data[env, check["data_steps"]] = random_replay(
                    env, check["data_steps"], 8, 0, np.random.default_rng(0)
                )
            calibrate_on_replay(wm, train_data[env, check["data_steps"]], np.random.default_rng(0))
        t0 = time.time()
        report = world_model_report(wm, replay_of(r), r.positions, r.ball_in_play, seed=0)
        (d / a.out).write_text(json.dumps(report, indent=1))
        print(
            json.dumps(
                {
                    "dir": str(d),
                    "head_shifts": wm.head_shifts.tolist(),
                    "probe": report["probe"],
                    "seconds": round(time.time() - t0),
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
