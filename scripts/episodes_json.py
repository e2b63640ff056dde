"""A run's training episodes (end step and return of each, from its newest checkpoint) and its `eval.json`,
as one JSON file for docs/results/ (what `scripts.plot_sil_curves` draws).

    python -m scripts.episodes_json runs/brk_k8end_sil_s0 \
        --command "wm-agent train ... ; wm-agent eval runs/brk_k8end_sil_s0 --episodes 100 --seed 10000" \
        --out docs/results/breakout_K8_W8_end_sil_s0_2026-12-07.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from agent.checkpoint import read_state, resolve

EVAL_FIELDS = ("episodes", "seed", "mean", "std", "median", "min", "max", "returns")


def episodes_doc(run: Path, command: str) -> dict:
    """``run``, ``command``, ``episode_end_steps``, ``episode_returns`` and, when the run has an
    ``eval.json``, its summary as ``eval``."""
    state = read_state(resolve(run))
    doc = {
        "run": str(run),
        "command": command,
        "episode_end_steps": state["episode_end_steps"].tolist(),
        "episode_returns": state["episode_returns"].tolist(),
    }
    if (run / "eval.json").exists():
        ev = json.loads((run / "eval.json").read_text())
        doc["eval"] = {k: ev[k] for k in EVAL_FIELDS if k in ev}
    return doc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path, help="a run directory")
    p.add_argument("--command", required=True, help="the commands that made the run and its eval, as text")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    doc = episodes_doc(args.run, args.command)
    args.out.write_text(json.dumps(doc))
    print(f"{args.out}: {len(doc['episode_returns'])} training episodes, eval mean {doc.get('eval', {}).get('mean')}")


if __name__ == "__main__":
    main()
