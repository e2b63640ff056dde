"""The model-free peer: stable-baselines3 PPO (CnnPolicy, rl-zoo3's Atari hyperparameters) on the
same envs (``envs.make_env``), the same env-step budget, and the same evaluation protocol.

    python -m agent.baseline --env wm/Catch-v0 --steps 30000 --seed 0 --out runs/sb3_catch_0.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecEnv, VecFrameStack

from agent.evaluate import episode_shares
from envs import make_env


class MakeEnvVecEnv(VecEnv):
    """Adapts a wm-agent vector env to SB3's VecEnv. Training sees rl-zoo3's Atari choices: rewards
    clipped to their sign and life loss as an episode end; the episodes SB3 logs (``info["episode"]``)
    are the real ones, with unclipped returns. wm-agent envs reset on the step after an end
    (NEXT_STEP); SB3 sees that step as an ordinary zero-reward transition, which both agents spend."""

    def __init__(self, env_id: str, num_envs: int, seed: int, sticky_actions: float = 0.0) -> None:
        self.env = make_env(env_id, num_envs=num_envs, seed=seed, sticky_actions=sticky_actions)
        self.seed_value = seed
        obs_space = gym.spaces.Box(0, 255, (1, 64, 64), dtype=np.uint8)
        super().__init__(num_envs, obs_space, gym.spaces.Discrete(self.env.num_actions))
        self.actions = np.zeros(num_envs, dtype=np.int64)
        self.episode_returns: list[float] = []
        self.episode_end_steps: list[int] = []
        """Env steps (all copies) when each episode in ``episode_returns`` ended."""
        self.env_steps = 0

    def reset(self) -> np.ndarray:
        obs, _ = self.env.reset(seed=self.seed_value)
        return obs[:, None]

    def step_async(self, actions: np.ndarray) -> None:
        self.actions = np.asarray(actions, dtype=np.int64)

    def step_wait(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, Any]]]:
        obs, rew, term, trunc, info = self.env.step(self.actions)
        self.env_steps += self.num_envs
        done = term | trunc | info["life_loss"]
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        for i in range(self.num_envs):
            if done[i]:
                infos[i]["terminal_observation"] = obs[i][None]
                infos[i]["TimeLimit.truncated"] = bool(trunc[i] and not term[i])
            if not np.isnan(info["episode_return"][i]):
                infos[i]["episode"] = {"r": float(info["episode_return"][i]), "l": int(info["episode_length"][i])}
                self.episode_returns.append(float(info["episode_return"][i]))
                self.episode_end_steps.append(self.env_steps)
        return obs[:, None], np.sign(rew).astype(np.float32), done, infos

    def close(self) -> None:
        self.env.close()

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self, attr_name)] * self.num_envs

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *args: Any, indices: Any = None, **kwargs: Any) -> list[Any]:
        raise NotImplementedError(method_name)

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False] * self.num_envs


def _linear(start: float):
    return lambda progress: progress * start


def train_ppo(
    env_id: str, steps: int, seed: int, sticky_actions: float = 0.0, device: str = "cpu"
) -> tuple[PPO, list[tuple[int, float]], float]:
    """rl-zoo3's Atari PPO: 8 envs, 128 steps, 4 epochs, batch 256, lr 2.5e-4 and clip 0.1 (both
    linearly decayed), ent 0.01, vf 0.5, 4 stacked frames. Returns the model, the training episodes'
    ``(env steps at the end, return)`` and the wall time."""
    venv = VecFrameStack(MakeEnvVecEnv(env_id, 8, seed, sticky_actions), 4, channels_order="first")
    model = PPO(
        "CnnPolicy",
        venv,
        n_steps=128,
        n_epochs=4,
        batch_size=256,
        learning_rate=_linear(2.5e-4),
        clip_range=_linear(0.1),
        vf_coef=0.5,
        ent_coef=0.01,
        seed=seed,
        verbose=0,
        device=device,
    )
    t0 = time.time()
    model.learn(total_timesteps=steps)
    inner = venv.venv
    return model, list(zip(inner.episode_end_steps, inner.episode_returns, strict=True)), time.time() - t0


def evaluate_ppo(model: PPO, env_id: str, episodes: int, seed: int, sticky_actions: float = 0.0) -> list[float]:
    """Full episodes (life loss is not an end) with the trained SB3 policy, sampling actions. Each env
    copy plays its share of the episodes, as in ``agent.evaluate``, so short episodes are not favoured."""
    num_envs = min(8, episodes)
    inner = MakeEnvVecEnv(env_id, num_envs, seed, sticky_actions)
    venv = VecFrameStack(inner, 4, channels_order="first")
    share = episode_shares(episodes, num_envs)
    done_per_copy = [0] * num_envs
    returns: list[float] = []
    obs = venv.reset()
    while sum(done_per_copy) < episodes:
        action, _ = model.predict(obs, deterministic=False)
        obs, _, _, infos = venv.step(action)
        for i, info in enumerate(infos):
            if "episode" in info and done_per_copy[i] < share[i]:
                returns.append(float(info["episode"]["r"]))
                done_per_copy[i] += 1
    venv.close()
    return returns


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="wm/Catch-v0")
    p.add_argument("--steps", type=int, default=30_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--sticky-actions", type=float, default=0.0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    model, train_returns, seconds = train_ppo(args.env, args.steps, args.seed, args.sticky_actions)
    scores = evaluate_ppo(model, args.env, args.episodes, 10_000 + args.seed, args.sticky_actions)
    result = {
        "env_id": args.env,
        "steps": args.steps,
        "seed": args.seed,
        "train_seconds": seconds,
        "train_returns": [r for _, r in train_returns],
        "train_episode_end_steps": [s for s, _ in train_returns],
        "eval_returns": scores,
        "eval_mean": float(np.mean(scores)),
        "sticky_actions": args.sticky_actions,
    }
    print(json.dumps({k: v for k, v in result.items() if not k.startswith("train_") or k == "train_seconds"}))
    if args.out:
        Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
