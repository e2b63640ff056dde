"""Learning curve of a `wm-agent train` run (mean of the last 100 training episodes against env
steps, read from its newest checkpoint), optionally next to an SB3 PPO run of `agent.baseline --out`
and a random-play level.

    python -m scripts.plot_learning runs/breakout_s0 --sb3 runs/sb3_breakout_s0.json --random 1.7 --out curve.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.bench_learn import plot_curves, rolling_curve
from agent.checkpoint import load_latest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--sb3", type=Path, default=None, help="JSON written by python -m agent.baseline --out")
    p.add_argument("--random", type=float, default=None, help="random play's mean return, drawn as a line")
    p.add_argument("--title", default=None)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    state, _, path = load_latest(args.run_dir, with_replay=False, warn=print, quarantine_broken=False)
    steps, means = rolling_curve(state["episode_end_steps"].tolist(), state["episode_returns"].tolist())
    result: dict[str, dict] = {"wm_agent": {"curve_steps": steps, "curve_last100": means}}
    if args.sb3:
        sb3 = json.loads(args.sb3.read_text())
        s_steps, s_means = rolling_curve(sb3["train_episode_end_steps"], sb3["train_returns"])
        result["sb3_ppo"] = {"curve_steps": s_steps, "curve_last100": s_means}
    title = args.title or f"{json.loads(state['config'])['env']}, {path.name}"
    plot_curves([result], args.out, title, threshold=None, random_level=args.random)
    print(f"{len(means)} wm-agent episodes, last-100 mean at the end {means[-1]:.2f}; written to {args.out}")


if __name__ == "__main__":
    main()
