"""Re-read saved `bench world-model` results with today's measures (e.g. after a label fix), without
training again: each ``DIR/world_model.pt`` is rebuilt from the preset and flags in its
``world_model_check.json`` and measured on the same held-out rollout (seed 1) with
``agent.wm_report.world_model_report``; the report goes to ``DIR/report_visible_ball.json``.

    python -m scripts.remeasure_world_models runs/cand/E2_dyn48 runs/cand/K_pred4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from agent.config import parse_config, preset
from agent.wm_report import replay_of, world_model_report
from envs.annotations import annotated_rollout
from worldmodel.world_model import WorldModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dirs", type=Path, nargs="+")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rollouts = {}
    for d in a.dirs:
        check = json.loads((d / "world_model_check.json").read_text())
        cfg = parse_config(check["overrides"], preset(check["preset"] or "cpu"), "the bench's flags")
        try:
            saved = torch.load(d / "world_model.pt", weights_only=True)
            wm = WorldModel(cfg.world_model, saved["num_actions"])
            wm.load_state_dict(saved["world_model"])
        except (OSError, RuntimeError, KeyError) as e:  # no weights kept, or another preset's shapes
            print(json.dumps({"dir": str(d), "skipped": str(e).splitlines()[0][:120]}))
            continue
        env = check["env"]
        if env not in rollouts:
            rollouts[env] = annotated_rollout(env, check["test_steps"], 8, 1)
        r = rollouts[env]
        t0 = time.time()
        report = world_model_report(wm, replay_of(r), r.positions, r.ball_in_play, seed=0)
        (d / "report_visible_ball.json").write_text(json.dumps(report, indent=1))
        print(json.dumps({"dir": str(d), "probe": report["probe"], "seconds": round(time.time() - t0)}), flush=True)


if __name__ == "__main__":
    main()
