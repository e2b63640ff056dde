"""A uint8 ring buffer of real transitions that serves sequences for world-model training.

Each frame is stored once (no frame stacks). The buffer holds one stream per env copy, all
written in lockstep: slot ``s`` of copy ``e`` holds the frame the agent saw, the action it took
there, and what that action led to (reward, terminated, truncated, life loss). The next slot
holds the next frame, unless it starts a new episode (``is_first``), so a sampled sequence of
``T + 1`` frames never contains an ``is_first`` after its first frame.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from envs import make_env
from worldmodel.batch import Batch

_ARRAYS = ("frames", "actions", "rewards", "terminated", "truncated", "life_loss", "is_first")


class ReplayError(ValueError):
    """The buffer cannot serve what was asked (too little data, sequences longer than episodes)."""


class ReplayBuffer:
    """Ring buffer of ``capacity`` frames split evenly across ``num_envs`` streams."""

    def __init__(self, capacity: int, num_envs: int, frame_shape: tuple[int, int] = (64, 64)) -> None:
        if capacity < num_envs:
            raise ReplayError(f"replay capacity {capacity} is smaller than num_envs {num_envs}")
        self.num_envs = num_envs
        self.slots = capacity // num_envs
        self.frame_shape = frame_shape
        S, N = self.slots, num_envs
        self.frames = np.zeros((S, N, *frame_shape), dtype=np.uint8)
        self.actions = np.zeros((S, N), dtype=np.int64)
        self.rewards = np.zeros((S, N), dtype=np.float32)
        self.terminated = np.zeros((S, N), dtype=bool)
        self.truncated = np.zeros((S, N), dtype=bool)
        self.life_loss = np.zeros((S, N), dtype=bool)
        self.is_first = np.zeros((S, N), dtype=bool)
        self.pos = 0
        self.filled = 0

    def __len__(self) -> int:
        """Number of frames stored, all streams together."""
        return self.filled * self.num_envs

    @property
    def capacity(self) -> int:
        return self.slots * self.num_envs

    def add(
        self,
        frames: np.ndarray,
        actions: np.ndarray,
        rewards: np.ndarray,
        terminated: np.ndarray,
        truncated: np.ndarray,
        life_loss: np.ndarray,
        is_first: np.ndarray,
    ) -> None:
        """Store one lockstep step of every copy: ``frames[i]`` (uint8 ``[N, H, W]``) is what copy ``i``
        saw, ``actions[i]`` what it did there, and the rest what followed; ``is_first[i]`` marks a
        frame that starts an episode."""
        p = self.pos
        self.frames[p] = frames
        self.actions[p] = actions
        self.rewards[p] = rewards
        self.terminated[p] = terminated
        self.truncated[p] = truncated
        self.life_loss[p] = life_loss
        self.is_first[p] = is_first
        self.pos = (p + 1) % self.slots
        self.filled = min(self.filled + 1, self.slots)

    def base_rates(self) -> tuple[float, float]:
        """Fractions of stored transitions with a non-zero reward, and with a terminal or life loss."""
        n = self.filled
        if n == 0:
            return 0.5, 0.5
        rewarded = float((self.rewards[:n] != 0).mean())
        terminal = float((self.terminated[:n] | self.life_loss[:n]).mean())
        return rewarded, terminal

    def _has_event(self, kind: str, idx: np.ndarray, envs: np.ndarray) -> np.ndarray:
        """Whether each transition at slots ``idx`` of copies ``envs`` is ``rewarded`` or ``ended`` (a life
        or the game ends); only the transitions asked about are read, not the whole buffer."""
        if kind == "rewarded":
            return self.rewards[idx, envs] != 0
        return self.terminated[idx, envs] | self.life_loss[idx, envs]

    def _oldest(self) -> int:
        return self.pos if self.filled == self.slots else 0

    def _valid_windows(self, starts: np.ndarray, envs: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """For logical start indices, the physical slot indices ``[K, length]`` and whether each window
        stays inside one episode."""
        idx = (self._oldest() + starts[:, None] + np.arange(length)[None, :]) % self.slots
        crosses = self.is_first[idx[:, 1:], envs[:, None]].any(axis=1)
        return idx, ~crosses

    def sample(
        self,
        batch_size: int,
        seq_len: int,
        rng: np.random.Generator,
        device: torch.device | str = "cpu",
        rewarded_fraction: float = 0.0,
        ended_fraction: float = 0.0,
        event_span: int | None = None,
    ) -> Batch:
        """``batch_size`` sequences of ``seq_len`` frames (``seq_len - 1`` transitions) from single episodes.

        ``rewarded_fraction`` of the batch (when available) is drawn from sequences with a non-zero
        reward, so that a sparse reward head sees rewards often enough to learn them, and
        ``ended_fraction`` from sequences where a life or the game ends, for the continue head; with
        ``event_span`` only a reward or end among the last ``event_span`` transitions counts.
        """
        if seq_len < 2:
            raise ReplayError(f"sequence length must be at least 2 frames, got {seq_len}")
        if self.filled < seq_len:
            raise ReplayError(f"replay holds {self.filled} steps per env, fewer than a sequence of {seq_len}")
        need = {
            "rewarded": int(round(batch_size * rewarded_fraction)),
            "ended": int(round(batch_size * ended_fraction)),
        }
        if sum(need.values()) > batch_size:
            raise ReplayError(
                f"rewarded_fraction + ended_fraction must not exceed 1, got {rewarded_fraction + ended_fraction}"
            )
        chosen_idx: list[np.ndarray] = []
        chosen_env: list[np.ndarray] = []
        need_any = batch_size - sum(need.values())
        for attempt in range(64):
            k = 4 * batch_size
            starts = rng.integers(0, self.filled - seq_len + 1, size=k)
            envs = rng.integers(0, self.num_envs, size=k)
            idx, ok = self._valid_windows(starts, envs, seq_len)
            idx, envs = idx[ok], envs[ok]
            for kind in need:
                if need[kind] > 0:
                    hit = self._has_event(kind, idx[:, -1 - (event_span or seq_len - 1) : -1], envs[:, None]).any(
                        axis=1
                    )
                    take = np.flatnonzero(hit)[: need[kind]]
                    chosen_idx.append(idx[take])
                    chosen_env.append(envs[take])
                    need[kind] -= len(take)
                    idx, envs = np.delete(idx, take, axis=0), np.delete(envs, take)
            take_n = min(need_any, len(idx))
            chosen_idx.append(idx[:take_n])
            chosen_env.append(envs[:take_n])
            need_any -= take_n
            if need_any == 0 and sum(need.values()) == 0:
                break
            if need_any == 0 and attempt >= 8:
                # Few such sequences exist yet: fill the rest of the batch with any valid ones.
                need_any, need = sum(need.values()), {kind: 0 for kind in need}
        if need_any > 0 or sum(need.values()) > 0:
            raise ReplayError(
                f"could not find {batch_size} sequences of {seq_len} frames inside single episodes; "
                "episodes in the buffer may be shorter than the sequence length"
            )
        return self._batch(np.concatenate(chosen_idx), np.concatenate(chosen_env), device)

    def _batch(self, idx: np.ndarray, envs: np.ndarray, device: torch.device | str) -> Batch:
        """The sequences at physical slots ``idx [B, L]`` of copies ``envs [B]``."""
        envs = envs[:, None]
        tr = idx[:, :-1]
        batch = Batch(
            frames=torch.from_numpy(self.frames[idx, envs]),
            actions=torch.from_numpy(self.actions[tr, envs]),
            rewards=torch.from_numpy(self.rewards[tr, envs]),
            terminated=torch.from_numpy(self.terminated[tr, envs]),
            life_loss=torch.from_numpy(self.life_loss[tr, envs]),
            truncated=torch.from_numpy(self.truncated[tr, envs]),
        )
        return batch.to(device)

    def sample_ending_with(
        self, kind: str, batch_size: int, seq_len: int, rng: np.random.Generator, device: torch.device | str = "cpu"
    ) -> Batch | None:
        """``batch_size`` sequences of ``seq_len`` frames from single episodes whose *last* transition is
        ``rewarded`` or ``ended`` (drawn with replacement), or ``None`` when the buffer holds none."""
        n = self.filled
        logical = (np.arange(n)[:, None] - self._oldest()) % self.slots  # logical index of each slot
        slot, env = np.nonzero(self._has_event(kind, np.arange(n)[:, None], np.arange(self.num_envs)[None]))
        last = logical[slot, 0]
        keep = (last >= seq_len - 2) & (last + 1 < n)
        envs = env[keep]
        idx, ok = self._valid_windows(last[keep] - (seq_len - 2), envs, seq_len)
        idx, envs = idx[ok], envs[ok]
        if len(idx) == 0:
            return None
        pick = rng.integers(0, len(idx), size=batch_size)
        return self._batch(idx[pick], envs[pick], device)

    def returns(self, gamma: float) -> tuple[np.ndarray, np.ndarray]:
        """Discounted returns ``[S, N]`` (per slot: the reward of the action taken there plus the discounted
        rewards after it, up to the end of that life or game), and whether each is complete ``[S, N]``
        (its life ended within the buffer; the rest still grows with the steps to come). Truncation
        counts as an end, and so does an episode's final frame (the slot before an ``is_first``), whose
        action the env ignores: its return is 0, not the next episode's."""
        n, oldest = self.filled, self._oldest()
        order = (oldest + np.arange(n)) % self.slots  # physical slots, oldest first
        ends = self.terminated | self.life_loss | self.truncated
        G = np.zeros((self.slots, self.num_envs), np.float32)
        complete = np.zeros((self.slots, self.num_envs), bool)
        acc = np.zeros(self.num_envs, np.float32)
        done = np.zeros(self.num_envs, bool)
        next_first = np.zeros(self.num_envs, bool)
        for slot in order[::-1]:
            end = ends[slot] | next_first
            acc = self.rewards[slot] + gamma * np.where(end, 0.0, acc)
            done = done | end
            G[slot], complete[slot] = acc, done
            next_first = self.is_first[slot]
        return G, complete

    def sample_with_returns(
        self,
        batch_size: int,
        seq_len: int,
        returns: tuple[np.ndarray, np.ndarray],
        rng: np.random.Generator,
        device: torch.device | str = "cpu",
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``batch_size`` uniformly drawn windows of ``seq_len`` frames from single episodes, uint8
        ``[B, L, H, W]``, the action taken at each window's last frame ``[B]`` (int64) and the complete
        return (``returns``, from :meth:`returns`) from there ``[B]``; ``None`` when fewer than ``seq_len``
        steps are stored or no window qualifies."""
        G, complete = returns
        if self.filled < seq_len:
            return None
        for _ in range(16):
            starts = rng.integers(0, self.filled - seq_len + 1, size=4 * batch_size)
            envs = rng.integers(0, self.num_envs, size=4 * batch_size)
            idx, ok = self._valid_windows(starts, envs, seq_len)
            ok &= complete[idx[:, -1], envs]
            if ok.sum() >= batch_size:
                idx, envs = idx[ok][:batch_size], envs[ok][:batch_size]
                frames = self._batch(idx, envs, device).frames
                actions = torch.from_numpy(self.actions[idx[:, -1], envs].astype(np.int64)).to(device)
                return frames, actions, torch.from_numpy(G[idx[:, -1], envs]).to(device)
        return None

    def save(self, directory: str | Path) -> None:
        """Write the buffer to ``directory`` (replaced atomically: a crash mid-write keeps the old copy)."""
        directory = Path(directory)
        tmp = directory.with_name(directory.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        n = self.filled
        order = (self._oldest() + np.arange(n)) % self.slots
        for name in _ARRAYS:
            np.save(tmp / f"{name}.npy", getattr(self, name)[order])
        meta = {"slots": self.slots, "num_envs": self.num_envs, "filled": n, "frame_shape": list(self.frame_shape)}
        (tmp / "meta.json").write_text(json.dumps(meta))
        old = directory.with_name(directory.name + ".old")
        if directory.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old.exists():
            shutil.rmtree(old)

    @classmethod
    def load(cls, directory: str | Path) -> ReplayBuffer:
        """Read a buffer written by :meth:`save`."""
        directory = Path(directory)
        try:
            meta = json.loads((directory / "meta.json").read_text())
            buf = cls(meta["slots"] * meta["num_envs"], meta["num_envs"], tuple(meta["frame_shape"]))
            n = meta["filled"]
            for name in _ARRAYS:
                arr = np.load(directory / f"{name}.npy", allow_pickle=False)
                if arr.shape[0] != n:
                    raise ReplayError(f"{directory / (name + '.npy')}: {arr.shape[0]} rows, meta.json says {n}")
                getattr(buf, name)[:n] = arr
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as e:
            if isinstance(e, ReplayError):
                raise
            raise ReplayError(f"cannot read replay buffer in {directory}: {e}") from e
        buf.filled = n
        buf.pos = n % buf.slots
        return buf


def repartition(buffers: list[ReplayBuffer], parts: int, capacity: int) -> list[ReplayBuffer]:
    """The transitions of ``buffers`` (e.g. one per rank of a run) dealt into ``parts`` buffers of
    ``capacity`` frames and the same number of streams, for resuming with a different number of ranks.

    Every stream of every buffer, oldest frame first, is laid end to end, then cut into
    ``parts * num_envs`` equal pieces, one per new stream; each piece keeps its newest frames when it is
    longer than a stream holds. Each original stream's first frame and each piece's first frame are
    marked ``is_first``, so no sampled sequence spans two streams; nothing else changes.
    """
    if not buffers or parts < 1:
        raise ReplayError(f"cannot deal {len(buffers)} replay buffers into {parts} parts")
    num_envs, shape = buffers[0].num_envs, buffers[0].frame_shape
    if any(b.num_envs != num_envs or b.frame_shape != shape for b in buffers):
        raise ReplayError("the replay buffers to merge differ in env streams or frame shape")
    pieces: dict[str, list[np.ndarray]] = {name: [] for name in _ARRAYS}
    for b in buffers:
        order = (b._oldest() + np.arange(b.filled)) % b.slots
        for e in range(num_envs):
            for name in _ARRAYS:
                pieces[name].append(getattr(b, name)[order, e])
            if b.filled:
                pieces["is_first"][-1] = pieces["is_first"][-1].copy()
                pieces["is_first"][-1][0] = True
    flat = {name: np.concatenate(arrs) for name, arrs in pieces.items()}
    per = len(flat["actions"]) // (parts * num_envs)
    out = []
    for p in range(parts):
        buf = ReplayBuffer(capacity, num_envs, shape)
        keep = min(per, buf.slots)
        for e in range(num_envs):
            end = (p * num_envs + e + 1) * per
            for name in _ARRAYS:
                getattr(buf, name)[:keep, e] = flat[name][end - keep : end]
        if keep:
            buf.is_first[0] = True
        buf.filled, buf.pos = keep, keep % buf.slots
        out.append(buf)
    return out


def random_replay(
    env_id: str, steps: int, num_envs: int = 8, seed: int = 0, rng: np.random.Generator | None = None
) -> ReplayBuffer:
    """A buffer of ``steps`` env steps (all copies together) of ``env_id`` under uniformly random
    actions drawn from ``rng`` (default: one seeded with ``seed``)."""
    rng = np.random.default_rng(seed) if rng is None else rng
    env = make_env(env_id, num_envs=num_envs, seed=seed)
    buf = ReplayBuffer(steps, num_envs)
    obs, info = env.reset(seed=seed)
    first = info["is_first"]
    for _ in range(steps // num_envs):
        a = rng.integers(0, env.num_actions, size=num_envs)
        nxt, r, term, trunc, info = env.step(a)
        buf.add(obs, a, r, term, trunc, info["life_loss"], first)
        obs, first = nxt, info["is_first"]
    env.close()
    return buf
