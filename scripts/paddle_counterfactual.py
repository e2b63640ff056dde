"""Does imagination know that the paddle saves the ball? (issue 22, items 3 and 5)

From real Breakout states where the ball falls toward the paddle (random play, ball in play, RAM y
120-175 and growing), two action sequences play ``H`` steps in the real game: the RAM tracker (paddle
under the ball, FIRE without a ball) and its mirror (LEFT and RIGHT swapped: away from the ball). The
same action sequences are then fed to the world model from the same ``K`` frames, and the share of
starts that lose a life within ``h`` steps is compared, real against imagined, three ways:

- ``real_pairs``: the calibrated continue head on the encoder's latents of the real frames;
- ``one_step``: on one predictor step from the real context before each step;
- ``open_loop``: imagination as the policy sees it (the predictor fed its own outputs for ``h`` steps).

A policy can learn to follow the ball in imagination only if the open-loop mirror loses lives where the
tracker keeps them; ``pair_gap`` is the mean imagined difference (mirror minus tracker) on the starts
where only the mirror loses its life in the real game (1.0 would be a perfect model).

    python -m scripts.paddle_counterfactual MODEL [MODEL ...] --starts 400 --horizon 18

MODEL is a run directory (its acting model, shifts fitted on its replay) or a `bench world-model`
output directory holding `world_model.pt` (shifts fitted on random play like its training data).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from agent.checkpoint import load_latest
from agent.config import parse_config, preset
from agent.dyna import calibrate_on_replay, load_agent
from agent.replay import random_replay
from scripts.policy_ranking import LEFT, RIGHT, in_play_of, make_copy, ram_positions, ram_rule
from worldmodel.world_model import WorldModel


def load_model(path: Path, rng: np.random.Generator) -> WorldModel:
    """A run's acting world model, or a bench directory's, with its heads' shifts fitted."""
    if (path / "world_model.pt").exists():
        check = json.loads((path / "world_model_check.json").read_text())
        cfg = parse_config(check["overrides"], preset(check["preset"] or "cpu"), "the bench's flags")
        saved = torch.load(path / "world_model.pt", weights_only=True)
        wm = WorldModel(cfg.world_model, saved["num_actions"])
        wm.load_state_dict_compat(saved["world_model"])
        calibrate_on_replay(wm, random_replay(check["env"], check["data_steps"], 8, 0, np.random.default_rng(0)), rng)
    else:
        wm = load_agent(path, torch.device("cpu")).wm
        _, replay, _ = load_latest(path, with_replay=True, warn=print, quarantine_broken=False)
        calibrate_on_replay(wm, replay, rng)
    return wm.eval()


def falling_ball_starts(n: int, K: int, seed: int, env_id: str = "ALE/Breakout-v5"):
    """``n`` emulator states of random play with the ball falling toward the paddle, and the last ``K``
    frames before each ``[n, K, 64, 64]``; also returns an env to replay them in."""
    rng = np.random.default_rng(seed)
    copies = [make_copy(env_id, seed + i) for i in range(8)]
    history: list[list[np.ndarray]] = [[] for _ in copies]
    prev_y = np.zeros(len(copies))
    starts = []
    while len(starts) < n:
        for i, env in enumerate(copies):
            obs, _, term, trunc, _ = env.step(int(rng.integers(0, 4)))
            if term or trunc:
                obs, _ = env.reset()
                history[i] = []
            history[i] = (history[i] + [obs])[-K:]
            pos = ram_positions(env)
            falling = in_play_of(pos[None])[0] and pos[2] > prev_y[i] and 120 <= pos[2] <= 175
            if len(history[i]) == K and falling and rng.random() < 0.5 and len(starts) < n:
                starts.append((env.unwrapped.ale.cloneState(), np.stack(history[i])))
            prev_y[i] = pos[2]
    return copies[0], [s[0] for s in starts], np.stack([s[1] for s in starts])


def play(env, states, H: int, mirror: bool, offset: float = 8.0):
    """The rule (or its mirror) from every state: actions ``[n, H]``, the step at which the first life
    is lost (``H + 1`` if none) ``[n]``, and the frames seen ``[n, H, 64, 64]``."""
    actions = np.zeros((len(states), H), np.int64)
    lost_at = np.full(len(states), H + 1)
    seen = np.zeros((len(states), H, 64, 64), np.uint8)
    for b, state in enumerate(states):
        env.unwrapped.ale.restoreState(state)
        lives = env.unwrapped.ale.lives()
        for t in range(H):
            pos = ram_positions(env)
            a = int(ram_rule(pos[0:1], pos[1:2], in_play_of(pos[None])[0:1], offset)[0])
            if mirror:
                a = {LEFT: RIGHT, RIGHT: LEFT}.get(a, a)
            actions[b, t] = a
            seen[b, t], _, term, _, _ = env.step(a)
            if lost_at[b] > H and (term or env.unwrapped.ale.lives() < lives):
                lost_at[b] = t + 1
    return actions, lost_at, seen


@torch.no_grad()
def imagined_lost(wm: WorldModel, context: np.ndarray, seen: np.ndarray, actions: np.ndarray, mode: str) -> np.ndarray:
    """``[n, H]``: one minus the product of continue probabilities up to each step, with the heads on
    real pairs, on one-step predictions, or open loop (see the module docstring)."""
    K = wm.cfg.context
    z = torch.cat(
        [
            wm.encode(torch.from_numpy(np.concatenate([context, seen], 1)[i : i + 64]))
            for i in range(0, len(context), 64)
        ]
    )
    window = z[:, :K]
    alive = torch.ones(len(context))
    out = []
    for t in range(actions.shape[1]):
        a = torch.as_tensor(actions[:, t])
        real_window = z[:, t : t + K]
        if mode == "open_loop":
            pred = wm.imagine_step(window, a)
            window = torch.cat([window[:, 1:], pred.latent.to(window.dtype)], 1)
            cont = pred.cont.float()
        else:
            nxt = wm.predictor(real_window, a)[:, 0] if mode == "one_step" else z[:, t + K]
            cont = torch.sigmoid(wm.calibrated_heads(real_window[:, -1], nxt)[1].float())
        alive = alive * cont
        out.append(1 - alive)
    return torch.stack(out, 1).numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--starts", type=int, default=400)
    p.add_argument("--horizon", type=int, default=18)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    env, states, context = falling_ball_starts(a.starts, 4, a.seed)
    runs = {name: play(env, states, a.horizon, mirror) for name, mirror in (("tracker", False), ("mirror", True))}
    cuts = sorted({10, 14, a.horizon})
    real = {name: np.stack([lost <= h for h in cuts], 1) for name, (_, lost, _) in runs.items()}  # (n, cuts)
    print(
        json.dumps(
            {
                "starts": len(states),
                "real_lost": {n: [round(float(x), 3) for x in r.mean(0)] for n, r in real.items()},
                "depths": cuts,
            }
        ),
        flush=True,
    )
    for path in a.models:
        wm = load_model(path, np.random.default_rng(0))
        K = wm.cfg.context
        row: dict = {"model": str(path), "head_shifts": [round(x, 2) for x in wm.head_shifts.tolist()]}
        for mode in ("real_pairs", "one_step", "open_loop"):
            lost = {
                n: imagined_lost(wm, context[:, -K:], seen, acts, mode)[:, [h - 1 for h in cuts]]
                for n, (acts, _, seen) in runs.items()
            }
            only_mirror = real["mirror"] & ~real["tracker"]  # (n, cuts)
            row[mode] = {
                "tracker_mirror": [
                    [round(float(lost[n][:, j].mean()), 3) for n in ("tracker", "mirror")] for j in range(len(cuts))
                ],
                "pair_gap": [
                    round(float((lost["mirror"] - lost["tracker"])[only_mirror[:, j], j].mean()), 3)
                    for j in range(len(cuts))
                ],
            }
        row["seconds"] = round(time.time() - t0)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
