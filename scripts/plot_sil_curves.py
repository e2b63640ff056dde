"""Learning curves: the `cpu` preset's seeds (from `bench learn`'s JSON) or earlier runs (episode JSON files
under docs/results/) in grey, if given, beside the runs compared with them (episode JSON files).

    python -m scripts.plot_sil_curves --preset docs/results/breakout_cpu_preset_3seeds_2026-12-05.json \
        --runs docs/results/breakout_sil_s0_2026-12-06.json docs/results/breakout_sil_s1_2026-12-06.json \
        docs/results/breakout_sil_s2_2026-12-06.json --out docs/results/breakout_sil_s012_vs_preset_2026-12-06.png
    python -m scripts.plot_sil_curves --base-runs docs/results/breakout_sil_s{0,1,2}_2026-12-06.json \
        --base-label "cpu preset (self-imitation), seeds 0-2" \
        --runs docs/results/breakout_K8_W8_end_s0_2026-12-06.json \
        docs/results/breakout_K8_W8_end_sil_s0_2026-12-07.json \
        --label K8_W8_end \
        --title "Breakout: heads reading 9 frames (K8_W8_end), without and with self-imitation" \
        --out docs/results/breakout_K8_W8_end_sil_vs_preset_2026-12-07.png
    python -m scripts.plot_sil_curves --runs docs/results/pong_sil_s0_2026-12-07.json --random -20.7 \
        --label "cpu preset" --title "Pong, cpu preset (self-imitation)" --out pong.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.bench_learn import rolling_curve


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", type=Path, help="wm-agent bench learn --out JSON of the preset's seeds (grey)")
    p.add_argument("--base-runs", type=Path, nargs="*", default=[], help="episode JSON files drawn in grey")
    p.add_argument("--base-label", default="cpu preset")
    p.add_argument("--runs", type=Path, nargs="+", required=True, help="JSON: run, episode_end_steps, episode_returns")
    p.add_argument("--label", default="+ self-imitation", help="put before each run's name in the legend")
    p.add_argument("--title", default="Breakout, cpu preset and with self-imitation")
    p.add_argument("--random", type=float, default=1.7, help="random play's score, drawn dotted (Breakout: 1.7)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grey = []
    if args.preset is not None:
        grey += [
            (s["wm_agent"]["curve_steps"], s["wm_agent"]["curve_last100"])
            for s in json.loads(args.preset.read_text())["seeds"]
        ]
    for path in args.base_runs:
        run = json.loads(path.read_text())
        grey.append(rolling_curve(run["episode_end_steps"], run["episode_returns"]))
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (steps, means) in enumerate(grey):
        ax.plot(steps, means, color="tab:gray", lw=1, label=None if i else args.base_label)
    for path in args.runs:
        run = json.loads(path.read_text())
        steps, means = rolling_curve(run["episode_end_steps"], run["episode_returns"])
        ax.plot(steps, means, lw=1.5, label=f"{args.label}: {run['run']}")
    ax.axhline(args.random, color="k", ls=":", lw=1, label="random")
    ax.set_xlabel("env steps")
    ax.set_ylabel("last-100 training mean")
    ax.set_title(args.title)
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
