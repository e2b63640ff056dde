"""Can a policy learn a game inside a trained world model's imagination alone? (issue 22, item 5)

The world model of a run (its slow copy where it keeps one) is held fixed; a fresh policy is trained by
the run's PPO on imagined rollouts started from the run's replay, for ``--updates`` updates, with no
env step; then it plays ``--episodes`` real episodes. ``--baselines`` also scores policies that need
no model (uniform random, each action alone, and FIRE or a move at random) on the same episodes, so a
habit that any fixed rule would find is not taken for learning.

    python -m scripts.imagination_only runs/RUN --updates 400 --episodes 16 --entropy 3e-4 --baselines
    python -m scripts.imagination_only runs/RUN --critic-targets real --horizon 5

With ``--critic-targets real`` the critic learns from the replay's real discounted returns, one step of
128 windows per update (as the Dyna loop does with ``--ppo.critic-targets real``), not from imagination;
``--critic-prefit N`` gives it N such steps before the first update, ``--sil W`` sets self-imitation on
its steps (``--ppo.self-imitation``; default the run's, 1 in runs of today's presets, ``--sil 0`` off;
``--no-ppo``: self-imitation alone), ``--init-policy`` starts from
saved weights (``scripts/tracker_cloning.py``'s clone):

    python -m scripts.imagination_only runs/RUN --init-policy runs/RUN/tracker_clone.pt --critic-prefit 400
    python -m scripts.imagination_only runs/RUN --sil 1.0 --critic-prefit 400 [--no-ppo]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from agent.checkpoint import load_latest
from agent.dyna import calibrate_on_replay, load_agent, real_update
from agent.evaluate import evaluate
from agent.policy import ActorCritic
from agent.ppo import PPO
from envs import make_env
from scripts.ball_following import following
from worldmodel.imagined_env import ImaginedEnv


def fixed_rule_score(env_id: str, choose, episodes: int, seed: int, num_envs: int = 8) -> float:
    """Mean return of ``episodes`` full episodes where ``choose(rng, n)`` picks the actions."""
    num_envs = min(num_envs, episodes)
    env = make_env(env_id, num_envs=num_envs, seed=seed)
    rng = np.random.default_rng(0)
    env.reset(seed=seed)
    returns: list[float] = []
    started, active = np.ones(num_envs, int), np.ones(num_envs, bool)
    share = [episodes // num_envs + (1 if i < episodes % num_envs else 0) for i in range(num_envs)]
    while active.any():
        _, _, _, _, info = env.step(choose(rng, num_envs))
        for i in np.flatnonzero(~np.isnan(info["episode_return"]) & active):
            returns.append(float(info["episode_return"][i]))
            active[i] = started[i] < share[i]
            started[i] += 1
    env.close()
    return float(np.mean(returns))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--updates", type=int, default=400)
    p.add_argument("--entropy", type=float, default=None, help="PPO entropy coefficient (default: the run's)")
    p.add_argument("--episodes", type=int, default=16)
    p.add_argument("--horizon", type=int, default=None, help="imagined steps per rollout (default: the run's)")
    p.add_argument("--critic-targets", choices=("imagined", "real"), default=None, help="default: the run's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--baselines", action="store_true")
    p.add_argument(
        "--init-policy",
        type=Path,
        default=None,
        help="start from these ActorCritic weights (e.g. RUN/tracker_clone.pt)",
    )
    p.add_argument("--critic-prefit", type=int, default=0, help="critic steps on real returns before any PPO update")
    p.add_argument("--sil", type=float, default=None, help="--ppo.self-imitation (real critic; default: the run's)")
    p.add_argument("--no-ppo", action="store_true", help="skip the PPO update in imagination (self-imitation alone)")
    p.add_argument("--bayes", action="store_true", help="shift the heads by the base rates' log-odds, not fitted")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    device = torch.device("cpu")
    loaded = load_agent(a.run, device)
    cfg, wm = loaded.cfg, loaded.wm
    K = cfg.world_model.context
    _, replay, ckpt = load_latest(a.run, with_replay=True, warn=print, quarantine_broken=False)
    assert replay is not None
    wm.set_base_rates(*replay.base_rates())
    bayes = wm.head_shifts.tolist()
    if not a.bayes:
        calibrate_on_replay(wm, replay, rng)
    print(json.dumps({"head_shifts": wm.head_shifts.tolist(), "bayes_shifts": bayes}))
    changes = {
        "entropy_coef": a.entropy,
        "horizon": a.horizon,
        "critic_targets": a.critic_targets,
        "self_imitation": a.sil,
    }
    ppo_cfg = dataclasses.replace(cfg.ppo, **{k: v for k, v in changes.items() if v is not None})
    sil = ppo_cfg.self_imitation > 0
    if a.no_ppo and not sil:
        p.error("--no-ppo trains nothing without self-imitation (--sil W)")
    if sil and ppo_cfg.critic_targets != "real":
        p.error("self-imitation needs the real critic (--critic-targets real, or a run that has it); --sil 0 is off")
    returns = replay.returns(ppo_cfg.gamma) if ppo_cfg.critic_targets == "real" else None
    policy = ActorCritic(cfg.policy, cfg.world_model.encoder.latent_dim, wm.num_actions)
    if a.init_policy is not None:
        policy.load_state_dict(torch.load(a.init_policy, weights_only=True))
    ppo = PPO(policy, ppo_cfg)
    imagined = ImaginedEnv(wm, ppo_cfg.horizon)
    eval_seed = 1000 + a.seed

    def real_score() -> float:
        policy.eval()
        return float(np.mean(evaluate(wm, policy, cfg.env, a.episodes, seed=eval_seed, device=device)))

    t0 = time.time()
    print(
        json.dumps(
            {
                "checkpoint": str(ckpt),
                "entropy_coef": ppo_cfg.entropy_coef,
                "horizon": ppo_cfg.horizon,
                "critic_targets": ppo_cfg.critic_targets,
                "score_before": real_score(),
            }
        )
    )
    if a.critic_prefit and returns is not None:
        ppo.cfg = dataclasses.replace(ppo_cfg, self_imitation=0.0)  # the critic alone
        for _ in range(a.critic_prefit):
            real_update(ppo, wm, replay, returns, rng, device)
        ppo.cfg = ppo_cfg
        if a.init_policy is not None:  # the critic's steps move the norm the actor shares
            print(json.dumps({"score_after_critic_prefit": real_score()}), flush=True)
    window: list[dict[str, float]] = []
    for u in range(1, a.updates + 1):
        if not a.no_ppo:
            rollout = ppo.rollout(imagined, replay.sample(ppo_cfg.num_starts, K + 1, rng, device).frames[:, :K])
        real = real_update(ppo, wm, replay, returns, rng, device) if returns is not None else {}
        row = {"self_imitation_advantage": float(real["policy/self_imitation_advantage"])} if sil and real else {}
        if not a.no_ppo:
            m = ppo.update(rollout)
            keys = ("policy/entropy", "imagination/return", "policy/advantage_abs")
            row |= {k.split("/")[1]: float(m[k]) for k in keys}
        window.append(row)
        if u % 100 == 0:
            mean = {k: round(float(np.mean([w[k] for w in window])), 4) for k in window[0]}
            print(json.dumps({"update": u, **mean, "seconds": round(time.time() - t0)}), flush=True)
            window = []
    print(json.dumps({"score_after": real_score(), "seconds": round(time.time() - t0)}))
    if cfg.env == "ALE/Breakout-v5":
        policy.eval()
        print(json.dumps({"ball_following": following(wm, policy, cfg.env, 2000, eval_seed)}))
    if a.baselines:
        n = wm.num_actions
        rules = {"uniform": lambda r, k: r.integers(0, n, k)}
        rules |= {f"always_{i}": (lambda r, k, i=i: np.full(k, i)) for i in range(n)}
        if n >= 4:  # Breakout's minimal set: NOOP, FIRE, RIGHT, LEFT
            rules |= {f"fire_or_{i}": (lambda r, k, i=i: r.choice([1, i], k)) for i in range(2, n)}
        scores = {name: fixed_rule_score(cfg.env, rule, a.episodes, eval_seed) for name, rule in rules.items()}
        print(json.dumps({"fixed_rules": scores}))


if __name__ == "__main__":
    main()
