"""Breakout learning curves of the `cpu` preset (seeds 0-2, from `bench learn`'s JSON) beside runs with
self-imitation (each run's episodes, from the JSON files under docs/results/).

    python -m scripts.plot_sil_curves --preset docs/results/breakout_cpu_preset_3seeds_2026-12-05.json \
        --runs docs/results/breakout_sil_s0_2026-12-06.json docs/results/breakout_sil_s1_2026-12-06.json \
        docs/results/breakout_sil_s2_2026-12-06.json --out docs/results/breakout_sil_s012_vs_preset_2026-12-06.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.bench_learn import rolling_curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", type=Path, required=True, help="wm-agent bench learn --out JSON of the preset's seeds")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="JSON: episode_end_steps, episode_returns")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, seed in enumerate(json.loads(args.preset.read_text())["seeds"]):
        w = seed["wm_agent"]
        ax.plot(w["curve_steps"], w["curve_last100"], color="tab:gray", lw=1, label=None if i else "cpu preset")
    for path in args.runs:
        run = json.loads(path.read_text())
        steps, means = rolling_curve(run["episode_end_steps"], run["episode_returns"])
        ax.plot(steps, means, lw=1.5, label=f"+ self-imitation: {run['run']}")
    ax.axhline(1.7, color="k", ls=":", lw=1, label="random")
    ax.set_xlabel("env steps")
    ax.set_ylabel("last-100 training mean")
    ax.set_title("Breakout, cpu preset and with self-imitation")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
