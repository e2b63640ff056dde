"""Does a trained Breakout policy follow the ball, or play a habit? (issue 22, item 5)

A score near random can hide a policy that has started to track the ball, and a score above random can
come from a habit a fixed rule also finds (FIRE or LEFT at random scores ~3). This plays a run's
policy (sampling, as `wm-agent eval`) on the gymnasium backend, whose copies expose their RAM, and
counts, on steps where the ball is in play and more than ``--dead`` RAM units to one side of where the
paddle should be, how often the policy moves toward it and how often away. A uniform policy moves each
way a quarter of the time; a tracker moves toward it far more often than away.

    python -m scripts.ball_following runs/RUN [runs/OTHER ...] --steps 4000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from agent.actor import RealEnvActor
from agent.dyna import load_agent
from agent.policy import ActorCritic
from envs.annotations import BALL_HIDDEN_FROM, RAM_POSITIONS
from envs.atari import AtariGymEnv
from envs.base import EnvSettings
from worldmodel.world_model import WorldModel

RIGHT, LEFT = 2, 3
AIM_OFFSET = 8.0
"""RAM ball x minus paddle x at which a RAM rule that moves the paddle under the ball scored best
(44.5 over 2 episodes, against 7-36 for offsets -8 to 16; ``scripts/policy_ranking.py``)."""


def following(
    wm: WorldModel, policy: ActorCritic, env_id: str, steps: int, seed: int, dead: float = 6.0, num_envs: int = 8
) -> dict:
    """Shares of counted steps (ball in play, more than ``dead`` to one side) where the policy moves
    toward / away from the ball, its action shares and the returns of the episodes it finished."""
    env = AtariGymEnv(EnvSettings(env_id=env_id, num_envs=num_envs, seed=seed))
    actor = RealEnvActor(wm, policy, num_envs, torch.device("cpu"))
    paddle, ball_x, ball_y = RAM_POSITIONS["breakout"]
    limit = BALL_HIDDEN_FROM["breakout"][1]
    obs, info = env.reset(seed=seed)
    actor.observe(obs, info["is_first"])
    toward = away = counted = 0
    returns: list[float] = []
    actions = np.zeros(4, np.int64)
    for _ in range(steps // num_envs):
        ram = env.ram().astype(np.float32)
        a = actor.act()
        actions += np.bincount(a, minlength=4)
        gap = ram[:, ball_x] - (ram[:, paddle] + AIM_OFFSET)
        ok = (ram[:, ball_x] > 0) & (ram[:, ball_y] > 0) & (ram[:, ball_y] < limit) & (np.abs(gap) > dead)
        want = np.where(gap > 0, RIGHT, LEFT)
        counted += int(ok.sum())
        toward += int((ok & (a == want)).sum())
        away += int((ok & (a == (RIGHT + LEFT - want))).sum())
        obs, _, _, _, info = env.step(a)
        actor.observe(obs, info["is_first"])
        returns += [float(r) for r in info["episode_return"][~np.isnan(info["episode_return"])]]
    env.close()
    return {
        "counted_steps": counted,
        "toward": round(toward / max(counted, 1), 3),
        "away": round(away / max(counted, 1), 3),
        "action_shares": (actions / actions.sum()).round(3).tolist(),
        "episodes": len(returns),
        "mean_return": round(float(np.mean(returns)), 2) if returns else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--seed", type=int, default=1000)
    p.add_argument("--dead", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    for run in a.runs:
        loaded = load_agent(run, torch.device("cpu"), warn=lambda _: None)
        stats = following(loaded.wm, loaded.policy, loaded.cfg.env, a.steps, a.seed, a.dead)
        print(json.dumps({"run": str(run), "env_steps": loaded.env_steps, **stats}), flush=True)


if __name__ == "__main__":
    main()
