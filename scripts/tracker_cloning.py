"""Can the policy network, reading the latents it reads in play, play Breakout well at all? (issue 22)

A run's policy plays at ~8-10 after 100k env steps and follows the ball on ~40% of the steps where it
should move. Either what the policy reads (its last ``history`` latents of the run's encoder, through its
MLP) cannot place ball and paddle well enough to play better, or the learning signal imagination gives
it is what falls short. This separates the two: a scripted RAM tracker (``envs.ram_players``, which
scores ~40 on full episodes) plays with ``--explore`` of its actions replaced by random ones, its
decisions are recorded against the run's latent windows, and a fresh actor of the run's policy size is
trained to imitate them by cross-entropy. The clone then plays full episodes (sampling, as
``wm-agent eval``), beside the run's own policy on the same episodes.

    python -m scripts.tracker_cloning runs/RUN --steps 40000 --episodes 16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from agent.actor import RealEnvActor
from agent.checkpoint import load_latest
from agent.dyna import calibrate_on_replay, load_agent
from agent.evaluate import evaluate
from agent.policy import ActorCritic
from agent.returns import discounted_returns
from envs.annotations import RAM_POSITIONS
from envs.atari import AtariGymEnv
from envs.base import EnvSettings
from envs.ram_players import breakout_tracker
from scripts.ball_following import following
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.twohot import symlog


@torch.no_grad()
def collect(wm, clone: ActorCritic, env_id: str, steps: int, explore: float, seed: int, num_envs: int = 8):
    """Latent windows ``[N, history, E]`` as ``clone`` would read them and the tracker's decisions ``[N]`` on
    ``steps`` env steps played by the tracker with ``explore`` of its actions random; also the episodes' returns."""
    env = AtariGymEnv(EnvSettings(env_id=env_id, num_envs=num_envs, seed=seed))
    rng = np.random.default_rng(seed)
    history = RealEnvActor(wm, clone, num_envs, torch.device("cpu"))  # its frame history, not its actions
    obs, info = env.reset(seed=seed)
    windows, labels, returns = [], [], []
    for _ in range(steps // num_envs):
        history.observe(obs, info["is_first"])
        windows.append(wm.encode(torch.from_numpy(history.history)))
        decision = breakout_tracker(env.ram()[:, list(RAM_POSITIONS["breakout"])].astype(np.float32))
        labels.append(torch.from_numpy(decision))
        act = np.where(rng.random(num_envs) < explore, rng.integers(0, env.num_actions, num_envs), decision)
        obs, _, _, _, info = env.step(act)
        returns += [float(r) for r in info["episode_return"][~np.isnan(info["episode_return"])]]
    env.close()
    return torch.cat(windows), torch.cat(labels).long(), returns


@torch.no_grad()
def imagined_objective(
    wm, actor: ActorCritic, critics: dict[str, ActorCritic], starts: torch.Tensor, horizon: int, gamma: float
) -> dict:
    """What PPO in imagination maximises, for ``actor`` from real contexts ``starts`` ``[B, K, H, W]``: the
    discounted imagined rewards over ``horizon`` steps weighted by the imagined continues, plus a critic's
    value of the last imagined window (the real critic bootstraps the advantages), for each of ``critics``
    on the same rollouts; means over starts."""
    env = ImaginedEnv(wm, horizon)
    window = env.reset(starts)
    alive = torch.ones(len(starts))
    rewards = torch.zeros(len(starts))
    for t in range(horizon):
        window, r, c, _, _ = env.step(actor.act(window))
        rewards += gamma**t * alive * r
        alive = alive * c
    out = {"rewards": round(float(rewards.mean()), 4), "alive_at_end": round(float(alive.mean()), 4)}
    for name, critic in critics.items():
        bootstrap = gamma**horizon * alive * critic.value(window)
        out[f"objective_{name}"] = round(float((rewards + bootstrap).mean()), 4)
    return out


@torch.no_grad()
def critic_on_real_play(
    wm,
    actor: ActorCritic,
    critics: dict[str, ActorCritic],
    env_id: str,
    steps: int,
    gamma: float,
    seed: int,
    num_envs: int = 8,
) -> dict:
    """Each critic's values on the real states ``actor`` reaches over ``steps`` env steps, against the real
    discounted returns to the end of each life there (as the critic's targets in a run)."""
    env = AtariGymEnv(EnvSettings(env_id=env_id, num_envs=num_envs, seed=seed))
    actor_env = RealEnvActor(wm, actor, num_envs, torch.device("cpu"))
    obs, info = env.reset(seed=seed)
    actor_env.observe(obs, info["is_first"])
    values, rewards, ends = [], [], []
    for _ in range(steps // num_envs):
        window = wm.encode(torch.from_numpy(actor_env.history))
        values.append(torch.stack([c.value(window) for c in critics.values()], -1).numpy())
        obs, r, term, trunc, info = env.step(actor.act(window).numpy())
        actor_env.observe(obs, info["is_first"])
        rewards.append(r)
        ends.append(term | trunc | info["life_loss"])
    env.close()
    v, r, e = np.stack(values), np.stack(rewards), np.stack(ends)
    g = discounted_returns(torch.from_numpy(r), torch.from_numpy(~e).float(), torch.zeros(num_envs), gamma).numpy()
    done = np.flip(np.logical_or.accumulate(np.flip(e, 0), 0), 0)  # a life ends at or after t: g is complete
    v, g = v[done], g[done]  # [n, critics], [n]
    out = {
        "states": int(done.sum()),
        "return_mean": round(float(g.mean()), 3),
        "lives_lost_per_1000_steps": round(1000 * float(e.sum()) / e.size, 2),
    }
    for i, name in enumerate(critics):
        out[f"value_mean_{name}"] = round(float(v[:, i].mean()), 3)
        out[f"r2_{name}"] = round(float(1 - ((g - v[:, i]) ** 2).mean() / g.var()), 3)
    return out


def refit_critic(
    wm, cfg, replay, run_critic: ActorCritic, steps: int, recent: float, windows: int, seed: int
) -> tuple[ActorCritic, dict]:
    """A fresh critic of the run's size fitted offline, ``steps`` Adam steps of 256, to the real returns of
    ``windows`` replay windows (as the run's critic learns, but offline and for many steps), drawn from the
    newest ``recent`` share of the replay only (1: all of it, the mixture of every past policy); also the
    run's critic's and the refit's R^2 on a held-out tenth of those windows (not independent of the rest:
    neighbouring windows are nearly the same)."""
    rng = np.random.default_rng(seed)
    G, complete = replay.returns(cfg.ppo.gamma)
    L, n = cfg.policy.history, replay.filled
    if not 0 < recent <= 1:
        raise SystemExit(f"--critic-recent must be in (0, 1], got {recent}")
    xs, gs, found = [], [], 0
    for _ in range(16 * windows // 1024 + 16):
        starts = rng.integers(min(int(n * (1 - recent)), n - L), n - L + 1, size=1024)  # logical, oldest first
        envs = rng.integers(0, replay.num_envs, size=1024)
        idx, ok = replay._valid_windows(starts, envs, L)
        ok &= complete[idx[:, -1], envs]
        idx, envs = idx[ok], envs[ok]
        if not len(idx):
            continue
        with torch.no_grad():
            xs.append(wm.encode(torch.from_numpy(replay.frames[idx, envs[:, None]])))
        gs.append(torch.from_numpy(G[idx[:, -1], envs]))
        found += len(idx)
        if found >= windows:
            break
    else:
        raise SystemExit(f"only {found} complete windows found in the newest {recent} of the replay")
    x, targets = torch.cat(xs)[:windows], torch.cat(gs)[:windows]
    perm = torch.randperm(len(x))
    val, train = perm[: len(x) // 10], perm[len(x) // 10 :]
    critic = ActorCritic(cfg.policy, x.shape[-1], wm.num_actions)
    opt = torch.optim.Adam(critic.parameters(), lr=cfg.ppo.lr, eps=1e-5)
    for _ in range(steps):
        j = train[torch.randint(len(train), (256,))]
        _, v = critic(x[j])
        loss = F.mse_loss(v, symlog(targets[j]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    def r2(c: ActorCritic) -> float:
        with torch.no_grad():
            v, g = c.value(x[val]), targets[val]
        return round(float(1 - ((g - v) ** 2).mean() / g.var()), 3)

    return critic, {
        "windows": len(x),
        "recent": recent,
        "steps": steps,
        "held_out_r2_refit": r2(critic),
        "held_out_r2_run": r2(run_critic),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", type=Path)
    p.add_argument("--steps", type=int, default=40_000, help="env steps of tracker play to imitate")
    p.add_argument("--explore", type=float, default=0.2, help="share of the tracker's actions replaced by random ones")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--episodes", type=int, default=16, help="real episodes each policy plays (0: none)")
    p.add_argument("--horizons", type=int, nargs="*", default=[5, 10, 15], help="imagined objective at these horizons")
    p.add_argument("--starts", type=int, default=1024, help="replay contexts the imagined objective starts from")
    p.add_argument("--critic-steps", type=int, default=0, help="real env steps each policy plays for the critic check")
    p.add_argument("--refit", action="store_true", help="clone again even if RUN/tracker_clone.pt exists")
    p.add_argument("--critic-refit", type=int, default=0, help="also fit a fresh critic offline, this many steps")
    p.add_argument("--critic-recent", type=float, default=1.0, help="share of the replay, newest first, it fits on")
    p.add_argument("--critic-windows", type=int, default=40_000, help="replay windows it fits on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    device = torch.device("cpu")
    loaded = load_agent(a.run, device)
    cfg, wm = loaded.cfg, loaded.wm
    wm.eval()
    t0 = time.time()
    clone = ActorCritic(cfg.policy, cfg.world_model.encoder.latent_dim, wm.num_actions)
    path = a.run / "tracker_clone.pt"
    if path.exists() and not a.refit:
        clone.load_state_dict(torch.load(path, weights_only=True))
    else:
        fit_clone(clone, wm, cfg, a, t0)
        torch.save(clone.state_dict(), path)
    clone.eval()
    eval_seed = 1000 + a.seed
    if a.episodes:
        result = {
            "clone_score": float(np.mean(evaluate(wm, clone, cfg.env, a.episodes, seed=eval_seed, device=device))),
            "run_policy_score": float(
                np.mean(evaluate(wm, loaded.policy, cfg.env, a.episodes, seed=eval_seed, device=device))
            ),
            "clone_following": following(wm, clone, cfg.env, 2000, eval_seed),
            "seconds": round(time.time() - t0),
        }
        print(json.dumps(result), flush=True)
    critics = {"run": loaded.policy}
    replay = None
    if a.critic_refit or a.horizons:
        _, replay, _ = load_latest(a.run, with_replay=True, warn=print, quarantine_broken=False)
    if a.critic_refit:
        critics["refit"], fit = refit_critic(
            wm, cfg, replay, loaded.policy, a.critic_refit, a.critic_recent, a.critic_windows, seed=a.seed
        )
        print(json.dumps({"critic_refit": fit, "seconds": round(time.time() - t0)}), flush=True)
    if a.critic_steps:
        for name, actor in {"clone": clone, "run_policy": loaded.policy}.items():
            check = critic_on_real_play(wm, actor, critics, cfg.env, a.critic_steps, cfg.ppo.gamma, eval_seed)
            print(json.dumps({"critic_on_real_play_of": name, **check}), flush=True)
    if a.horizons:
        rng = np.random.default_rng(a.seed)
        wm.set_base_rates(*replay.base_rates())
        calibrate_on_replay(wm, replay, rng)
        K = cfg.world_model.context
        starts = replay.sample(a.starts, K, rng, device).frames
        torch.manual_seed(a.seed)  # the same fresh weights with or without a refit before
        uniform = ActorCritic(cfg.policy, cfg.world_model.encoder.latent_dim, wm.num_actions)  # near-uniform init
        actors = {"clone": clone, "run_policy": loaded.policy, "uniform": uniform}
        for h in a.horizons:
            row = {}
            for name, actor in actors.items():
                torch.manual_seed(a.seed)
                row[name] = imagined_objective(wm, actor, critics, starts, h, cfg.ppo.gamma)
            print(json.dumps({"horizon": h, **row}), flush=True)


def fit_clone(clone: ActorCritic, wm, cfg, a, t0: float) -> None:
    """Cross-entropy of ``clone``'s actor on the tracker's decisions over ``a.steps`` env steps."""
    x, y, tracker_returns = collect(wm, clone, cfg.env, a.steps, a.explore, seed=2000 + a.seed)
    n_val = len(y) // 5  # the last fifth, later in time, held out
    print(
        json.dumps(
            {
                "collected": len(y),
                "seconds": round(time.time() - t0),
                "tracker_with_exploration_returns": round(float(np.mean(tracker_returns)), 2)
                if tracker_returns
                else None,
                "label_shares": (torch.bincount(y, minlength=wm.num_actions) / len(y)).round(decimals=3).tolist(),
            }
        ),
        flush=True,
    )
    opt = torch.optim.Adam(clone.parameters(), lr=3e-4)
    xt, yt, xv, yv = x[:-n_val], y[:-n_val], x[-n_val:], y[-n_val:]
    for epoch in range(1, a.epochs + 1):
        clone.train()
        for j in torch.randperm(len(yt)).split(256):
            logits, _ = clone(xt[j])
            loss = F.cross_entropy(logits, yt[j])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 0 or epoch == a.epochs:
            clone.eval()
            with torch.no_grad():
                acc_t = (clone(xt[:20000])[0].argmax(-1) == yt[:20000]).float().mean()
                acc_v = (clone(xv)[0].argmax(-1) == yv).float().mean()
            print(
                json.dumps({"epoch": epoch, "train_acc": round(float(acc_t), 3), "val_acc": round(float(acc_v), 3)}),
                flush=True,
            )


if __name__ == "__main__":
    main()
