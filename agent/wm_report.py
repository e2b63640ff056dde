"""What a world model knows, read on held-out real data: does its latent place the objects, does its
predictor carry them forward, and does imagination pay rewards and end lives where the game does?

Every figure comes from windows of held-out random-policy play: ``K`` real context frames are encoded,
then the predictor runs ``d`` steps open loop on its own outputs under the real actions, as imagination
does. Positions are read by an MLP probe fitted on encoder latents of the first 80% of the data and
scored (R^2) on latents of the rest: the encoder's own, and the predictor's at each depth ``d``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from agent.replay import ReplayBuffer
from envs.annotations import POSITION_NAMES, AnnotatedRollout, ball_in_play
from envs.ram_players import breakout_tracker, emulator_copy, ram_positions
from worldmodel.world_model import WorldModel

DEPTHS = (1, 2, 3, 4, 5, 6, 7, 8)
SIGN_SHARE = 0.1
"""A paid reward has "the right sign" when it has the true reward's sign and at least this share of
its size: a head that cannot tell a won point from a lost one pays ~0, and that counts as wrong."""


def r2(pred: np.ndarray, y: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` for ``y`` (1 is perfect, 0 is predicting the mean)."""
    return float(1 - ((pred - y) ** 2).sum() / max(((y - y.mean()) ** 2).sum(), 1e-12))


class MLPProbe:
    """A two-hidden-layer MLP regressor on standardized inputs and target, fitted with Adam."""

    def __init__(self, x: np.ndarray, y: np.ndarray, steps: int = 2000, seed: int = 0, hidden: int = 256) -> None:
        """Fit on inputs ``x [N, D]`` and targets ``y [N]``."""
        gen = torch.Generator().manual_seed(seed)
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        self.ym, self.ys = float(y.mean()), float(y.std()) + 1e-6
        a = self._inputs(x)
        t = torch.as_tensor((y - self.ym) / self.ys, dtype=torch.float32)[:, None]
        torch.manual_seed(seed)
        self.net = nn.Sequential(
            nn.Linear(a.shape[1], hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)
        )
        opt = torch.optim.Adam(self.net.parameters(), 1e-3, weight_decay=1e-4)
        for _ in range(steps):
            idx = torch.randint(0, len(a), (256,), generator=gen)
            loss = (self.net(a[idx]) - t[idx]).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()

    def _inputs(self, x: np.ndarray) -> torch.Tensor:
        return torch.as_tensor((x - self.mu) / self.sd, dtype=torch.float32)

    @torch.no_grad()
    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Inputs ``[M, D]`` -> predicted targets ``[M]``."""
        return self.net(self._inputs(x))[:, 0].numpy() * self.ys + self.ym


def replay_of(rollout: AnnotatedRollout) -> ReplayBuffer:
    """The rollout's transitions in a replay buffer (same layout), for the next-frame measures."""
    S, N = rollout.actions.shape
    buf = ReplayBuffer(S * N, N)
    for name in ("frames", "actions", "rewards", "terminated", "life_loss", "is_first"):
        getattr(buf, name)[:] = getattr(rollout, name)
    buf.filled, buf.pos = S, 0
    return buf


def episode_windows(is_first: np.ndarray, length: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Every window of ``length`` consecutive slots inside ``[lo, hi)`` of one episode: start slots and env
    indices ``[M]`` each (``is_first [S, N]`` marks frames that start an episode)."""
    S, N = is_first.shape
    starts = np.arange(lo, hi - length + 1)
    if len(starts) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # Windows whose frames after the first include an episode start cross a reset.
    later_first = np.lib.stride_tricks.sliding_window_view(is_first[lo + 1 : hi], length - 1, axis=0)  # (M, N, L-1)
    ok = ~later_first.any(-1)[: len(starts)]  # (M, N)
    s_idx, n_idx = np.nonzero(ok)
    return starts[s_idx], n_idx


@torch.no_grad()
def encode_all(wm: WorldModel, frames: np.ndarray, chunk: int = 512) -> torch.Tensor:
    """uint8 frames ``[S, N, H, W]`` -> latents ``[S, N, E]`` (float32, on the CPU)."""
    S, N = frames.shape[:2]
    flat = torch.from_numpy(frames.reshape(S * N, 1, *frames.shape[2:]))
    device = next(wm.parameters()).device
    out = [wm.encode(flat[i : i + chunk].to(device))[:, 0].float().cpu() for i in range(0, len(flat), chunk)]
    return torch.cat(out).reshape(S, N, -1)


@dataclass
class OpenLoop:
    """``d`` imagined steps from real context for a set of windows: the last predicted latent ``[M, E]``,
    the calibrated reward and continue probability of the last step ``[M]``, and the reward of every
    step ``[M, d]``."""

    latent: torch.Tensor
    reward: torch.Tensor
    cont: torch.Tensor
    rewards: torch.Tensor


@torch.no_grad()
def open_loop(
    wm: WorldModel,
    z: torch.Tensor,
    actions: np.ndarray,
    starts: np.ndarray,
    envs: np.ndarray,
    d: int,
    chunk: int = 1024,
) -> OpenLoop:
    """From the ``K`` real latents ``z [S, N, E]`` at ``starts..starts+K-1`` of copy ``envs``, ``d`` predictor
    steps under the real actions taken from the last context frame on."""
    K = wm.cfg.context
    device = next(wm.parameters()).device
    parts = []
    for i in range(0, len(starts), chunk):
        s, n = starts[i : i + chunk], envs[i : i + chunk]
        window = z[s[:, None] + np.arange(K), n[:, None]].to(device)  # (m, K, E)
        rewards = []
        for j in range(d):
            a = torch.as_tensor(actions[s + K - 1 + j, n], device=device)
            pred = wm.imagine_step(window, a)
            rewards.append(pred.reward.float().cpu())
            window = torch.cat([window[:, 1:], pred.latent.to(window.dtype)], dim=1)
        parts.append(
            (window[:, -1].float().cpu(), pred.reward.float().cpu(), pred.cont.float().cpu(), torch.stack(rewards, 1))
        )
    if not parts:
        empty = torch.zeros(0)
        return OpenLoop(torch.zeros(0, z.shape[-1]), empty, empty, torch.zeros(0, d))
    return OpenLoop(*(torch.cat(p) for p in zip(*parts, strict=True)))


REWARD_AND_END_KEYS = (
    "reward_paid_share",
    "reward_paid_unrewarded",
    "reward_paid_share_within_1",
    "reward_paid_unrewarded_within_1",
    "reward_sign_acc",
    "life_loss_recall",
    "false_end_rate",
)


def _paid_within_one_step(
    wm: WorldModel, z: torch.Tensor, data: ReplayBuffer, rewards: np.ndarray, d: int, cap: int, rng: np.random.Generator
) -> dict[str, float]:
    """The reward imagination pays within one step of a true one at depth ``d``: summed over imagined
    steps ``d - 1 .. d + 1`` (1 .. 2 at depth 1, whose step before is real), over the true rewards of the
    same steps (``reward_paid_share_within_1``), and the mean ``|sum|`` over windows whose steps hold no
    reward (``reward_paid_unrewarded_within_1``). A reward paid a step early or late counts here, not in
    ``reward_paid_share``."""
    S, K = data.filled, wm.cfg.context
    starts, envs = episode_windows(data.is_first[:S], K + d + 1, 0, S)
    lo = 0 if d == 1 else -1
    near = rewards[starts[:, None] + K + d - 2 + np.arange(lo, 2), envs[:, None]]  # (M, 2 or 3)

    def paid_near(mask: np.ndarray, n: int) -> tuple[np.ndarray, torch.Tensor]:
        idx = _subsample(mask, n, rng)
        return idx, open_loop(wm, z, data.actions, starts[idx], envs[idx], d + 1).rewards[:, d - 1 + lo :].sum(1)

    idx, paid = paid_near((near[:, -lo] != 0) & (near.sum(1) != 0), 10**9)
    _, paid_quiet = paid_near(~near.any(1), cap)
    share = (paid / torch.as_tensor(near[idx].sum(1))).mean() if len(idx) else torch.tensor(float("nan"))
    return {
        "reward_paid_share_within_1": float(share),
        "reward_paid_unrewarded_within_1": float(paid_quiet.abs().mean()),
    }


def _subsample(mask: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    idx = np.flatnonzero(mask)
    return idx if len(idx) <= cap else np.sort(rng.choice(idx, cap, replace=False))


def world_model_report(
    wm: WorldModel,
    data: ReplayBuffer,
    positions: np.ndarray | None = None,
    ball_in_play: np.ndarray | None = None,
    depths: tuple[int, ...] = DEPTHS,
    max_windows: int = 2048,
    probe_steps: int = 2000,
    seed: int = 0,
) -> dict:
    """Items 1-4 of issue 22 on held-out data ``data`` (arrays ``[S, N]`` from slot 0, as
    :func:`replay_of` or ``random_replay`` leave them); ``positions [S, N, 3]`` and ``ball_in_play [S, N]``
    (see :class:`AnnotatedRollout`) add the probes. The world model's ``head_shifts`` must be set
    (``calibrate_heads`` or ``set_base_rates``).

    Returns ``probe`` (R^2 of each position on encoder latents), ``open_loop`` (per depth: R^2 of the same
    probe on the predictor's latents, and ``hold_last_*`` for the last real latent held still), and per
    depth ``reward_paid_share`` (mean of paid / true reward on rewarded steps), ``reward_paid_unrewarded``
    (mean |paid| elsewhere), ``reward_sign_acc`` (see :data:`SIGN_SHARE`), ``life_loss_recall`` (continue
    probability below 0.5 where a life or the game ended) and ``false_end_rate`` (the same elsewhere),
    with the number of windows behind each."""
    wm.eval()
    rng = np.random.default_rng(seed)
    S = data.filled
    K = wm.cfg.context
    z = encode_all(wm, data.frames[:S])
    split = int(0.8 * S)
    report: dict = {"windows": {}}
    probes: dict[str, MLPProbe] = {}
    if positions is not None:
        report["probe"], report["open_loop"] = {}, {}
        for j, name in enumerate(POSITION_NAMES):
            keep = ball_in_play[:S] if j > 0 else np.ones((S, data.num_envs), bool)  # the ball only in play
            fit, test = keep.copy(), keep.copy()
            fit[split:], test[:split] = False, False
            probes[name] = MLPProbe(z[fit].numpy(), positions[:S][fit][:, j], steps=probe_steps, seed=seed)
            report["probe"][f"{name}_r2"] = r2(probes[name](z[test].numpy()), positions[:S][test][:, j])
    rewards, ends = data.rewards[:S], data.terminated[:S] | data.life_loss[:S]
    measures: dict[str, dict[str, float]] = {}
    for d in depths:
        L = K + d
        cats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        starts, envs = episode_windows(data.is_first[:S], L, 0, S)
        last = starts + L - 2  # the slot of the last imagined transition
        r_last, end_last = rewards[last, envs], ends[last, envs]
        for cat, mask, cap in (
            ("rewarded", r_last != 0, 10**9),
            ("unrewarded", r_last == 0, max_windows),
            ("ended", end_last, 10**9),
            ("going_on", ~end_last, max_windows),
        ):
            idx = _subsample(mask, cap, rng)
            cats[cat] = (starts[idx], envs[idx])
        if positions is not None:
            ts, te = episode_windows(data.is_first[:S], L, split, S)
            target_in_play = ball_in_play[ts + L - 1, te]
            idx = _subsample(np.ones(len(ts), bool), max_windows, rng)
            cats["probe"] = (ts[idx], te[idx])
            cats["probe_ball"] = (ts[idx][target_in_play[idx]], te[idx][target_in_play[idx]])
        runs = {cat: open_loop(wm, z, data.actions, s, e, d) for cat, (s, e) in cats.items()}
        m: dict[str, float] = {}
        rs, re = cats["rewarded"]
        r_true = torch.as_tensor(rewards[rs + L - 2, re])
        paid = runs["rewarded"].reward
        m["reward_paid_share"] = float((paid / r_true).mean()) if len(r_true) else float("nan")
        m["reward_sign_acc"] = (
            float((paid * r_true.sign() >= SIGN_SHARE * r_true.abs()).float().mean()) if len(r_true) else float("nan")
        )
        m["reward_paid_unrewarded"] = float(runs["unrewarded"].reward.abs().mean())
        ended = runs["ended"].cont
        m["life_loss_recall"] = float((ended < 0.5).float().mean()) if len(ended) else float("nan")
        m["false_end_rate"] = float((runs["going_on"].cont < 0.5).float().mean())
        m.update(_paid_within_one_step(wm, z, data, rewards, d, max_windows, rng))
        report["windows"][str(d)] = {cat: len(s) for cat, (s, _) in cats.items()}
        if positions is not None:
            for j, name in enumerate(POSITION_NAMES):
                cat = "probe" if j == 0 else "probe_ball"
                s, e = cats[cat]
                truth = positions[s + L - 1, e, j]
                m[f"{name}_r2"] = r2(probes[name](runs[cat].latent.numpy()), truth)
                m[f"hold_last_{name}_r2"] = r2(probes[name](z[s + K - 1, e].numpy()), truth)
        measures[str(d)] = m
    for key in REWARD_AND_END_KEYS:
        report[key] = {d: m[key] for d, m in measures.items()}
    if positions is not None:
        for name in POSITION_NAMES:
            for key in (f"{name}_r2", f"hold_last_{name}_r2"):
                report["open_loop"][key] = {d: m[key] for d, m in measures.items()}
    return report


PADDLE_DEPTHS = (10, 14, 18)


@dataclass
class FallingBall:
    """Breakout states of random play with the ball falling toward the paddle: the emulator states and
    the ``K`` frames seen up to each ``[n, K, 64, 64]``."""

    states: list
    context: np.ndarray


def falling_ball_starts(env_id: str, n: int, K: int, seed: int) -> FallingBall:
    """``n`` states of random play (8 copies) where the ball is in play, falling, at RAM y 120-175."""
    rng = np.random.default_rng(seed)
    copies = [emulator_copy(env_id, seed + i) for i in range(8)]
    history: list[list[np.ndarray]] = [[] for _ in copies]
    prev_y = np.zeros(len(copies))
    states, context = [], []
    while len(states) < n:
        for i, env in enumerate(copies):
            obs, _, term, trunc, _ = env.step(int(rng.integers(0, env.action_space.n)))
            if term or trunc:
                obs, _ = env.reset()
                history[i] = []
            history[i] = (history[i] + [obs])[-K:]
            pos = ram_positions(env, env_id)
            falling = ball_in_play(pos, "breakout") and pos[2] > prev_y[i] and 120 <= pos[2] <= 175
            if len(history[i]) == K and falling and rng.random() < 0.5 and len(states) < n:
                states.append(env.unwrapped.ale.cloneState())
                context.append(np.stack(history[i]))
            prev_y[i] = pos[2]
    for env in copies:
        env.close()
    return FallingBall(states, np.stack(context))


class Played(NamedTuple):
    """What a scripted player did and saw for ``H`` steps from each of ``n`` starts."""

    actions: np.ndarray  # int64 [n, H]
    lost_at: np.ndarray  # int [n]: the step (1-based) at which the first life was lost, H + 1 if none
    seen: np.ndarray  # uint8 [n, H, 64, 64]: the frame after each action


def play_tracker(env_id: str, starts: FallingBall, horizon: int, mirror: bool) -> Played:
    """The RAM tracker (or its mirror) for ``horizon`` steps from every start."""
    n, H = len(starts.states), horizon
    env = emulator_copy(env_id, 0)
    actions = np.zeros((n, H), np.int64)
    lost_at = np.full(n, H + 1)
    seen = np.zeros((n, H, *starts.context.shape[2:]), np.uint8)
    for b, state in enumerate(starts.states):
        env.unwrapped.ale.restoreState(state)
        lives = env.unwrapped.ale.lives()
        for t in range(H):
            actions[b, t] = breakout_tracker(ram_positions(env, env_id), mirror=mirror)
            seen[b, t], _, term, _, _ = env.step(int(actions[b, t]))
            if lost_at[b] > H and (term or env.unwrapped.ale.lives() < lives):
                lost_at[b] = t + 1
    env.close()
    return Played(actions, lost_at, seen)


@torch.no_grad()
def imagined_life_lost(
    wm: WorldModel, context: np.ndarray, seen: np.ndarray, actions: np.ndarray, mode: str = "open_loop"
) -> np.ndarray:
    """``[n, H]``: one minus the product of the calibrated continue probabilities up to each step, from
    real context ``[n, K, 64, 64]`` under ``actions [n, H]``. ``mode``: ``open_loop`` (the predictor fed
    its own outputs, as imagination runs), ``one_step`` (each step predicted from the real frames
    ``seen [n, H, 64, 64]`` before it) or ``real_pairs`` (the heads on the encoder's latents of them)."""
    if mode not in ("open_loop", "one_step", "real_pairs"):
        raise ValueError(f"mode must be open_loop, one_step or real_pairs, got {mode!r}")
    K = wm.cfg.context
    device = next(wm.parameters()).device
    frames = np.concatenate([context[:, -K:], seen], 1)
    z = torch.cat([wm.encode(torch.from_numpy(frames[i : i + 64]).to(device)) for i in range(0, len(frames), 64)])
    window = z[:, :K]
    alive = torch.ones(len(frames), device=device)
    out = []
    for t in range(actions.shape[1]):
        a = torch.as_tensor(actions[:, t], device=device)
        real_window = z[:, t : t + K]
        if mode == "open_loop":
            pred = wm.imagine_step(window, a)
            window = torch.cat([window[:, 1:], pred.latent.to(window.dtype)], 1)
            cont = pred.cont.float()
        else:
            nxt = wm.predictor(real_window, a)[:, 0] if mode == "one_step" else z[:, t + K]
            cont = torch.sigmoid(wm.calibrated_heads(*wm.head_inputs(real_window, nxt))[1].float())
        alive = alive * cont
        out.append(1 - alive)
    return torch.stack(out, 1).cpu().numpy()


@dataclass
class TrackerRuns:
    """Falling-ball starts, each played for real by the RAM tracker and by its mirror."""

    starts: FallingBall
    tracker: Played
    mirror: Played


def tracker_runs(env_id: str, n: int, horizon: int, K: int, seed: int = 7) -> TrackerRuns:
    """Breakout only: ``n`` :func:`falling_ball_starts` played by the tracker and by its mirror."""
    fb = falling_ball_starts(env_id, n, K, seed)
    return TrackerRuns(fb, play_tracker(env_id, fb, horizon, False), play_tracker(env_id, fb, horizon, True))


def paddle_saves(
    wm: WorldModel, runs: TrackerRuns, depths: tuple[int, ...] = PADDLE_DEPTHS, mode: str = "open_loop"
) -> dict:
    """Does imagination know that the paddle saves the ball? From the same falling-ball states, a
    paddle that meets the ball (the RAM tracker) and one that runs away (its mirror) play for real and
    in imagination, with the same actions; per depth: the share of starts that lose a life within it,
    real and imagined, and ``pair_gap``, the mean imagined loss of the mirror minus the tracker's on the
    starts where only the mirror loses its life for real (1 for a perfect model, 0 when imagination
    cannot tell the two apart)."""
    wm.eval()
    played = {"tracker": runs.tracker, "mirror": runs.mirror}
    real = {name: np.stack([p.lost_at <= d for d in depths], 1) for name, p in played.items()}
    imagined = {
        name: imagined_life_lost(wm, runs.starts.context, p.seen, p.actions, mode)[:, [d - 1 for d in depths]]
        for name, p in played.items()
    }
    only_mirror = real["mirror"] & ~real["tracker"]
    out: dict = {"starts": len(runs.starts.states), "mode": mode, "pairs": {}, "pair_gap": {}}
    for name in ("tracker", "mirror"):
        out[f"real_lost_{name}"] = {str(d): float(real[name][:, j].mean()) for j, d in enumerate(depths)}
        out[f"imagined_lost_{name}"] = {str(d): float(imagined[name][:, j].mean()) for j, d in enumerate(depths)}
    for j, d in enumerate(depths):
        pairs = only_mirror[:, j]
        gap = imagined["mirror"][pairs, j] - imagined["tracker"][pairs, j]
        out["pairs"][str(d)] = int(pairs.sum())
        out["pair_gap"][str(d)] = float(gap.mean()) if pairs.any() else None
    return out
