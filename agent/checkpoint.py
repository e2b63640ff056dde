"""Checkpoints that survive crashes and never run code: versioned directories, written atomically.

Layout: ``RUN_DIR/checkpoints/step_<env steps>/`` holds ``state.pt`` (tensors and plain data only,
read back with ``torch.load(weights_only=True)``), ``replay/`` (the replay buffer), for a run of N > 1
ranks ``ranks/<r>/`` (rank r's ``state.pt`` with its RNG states and its ``replay/``), and, written
last, ``manifest.json`` (size and SHA-256 of every file). A checkpoint is first written to ``<name>.tmp``
and renamed into place, so a kill or a full disk mid-write leaves the previous one untouched. A
checkpoint that fails to load is renamed ``<name>.broken`` (kept, never overwritten) and loading
falls back to the one before it.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from agent.replay import ReplayBuffer, ReplayError

STATE = "state.pt"
MANIFEST = "manifest.json"
REPLAY = "replay"
RANKS = "ranks"
_STEP_DIR = re.compile(r"^step_(\d+)$")
REQUIRED_KEYS = ("world_model", "policy", "config", "num_actions", "counters")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and what is wrong."""


def checkpoint_root(run_dir: Path) -> Path:
    return run_dir / "checkpoints"


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first (temporary and broken ones excluded)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = {int(m.group(1)): p for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))}
    for p in root.glob("step_*.old"):  # a kill between replacing a same-step checkpoint's two renames
        m = _STEP_DIR.match(p.name[: -len(".old")])
        if m and int(m.group(1)) not in found and p.is_dir():
            found[int(m.group(1))] = p
    return [p for _, p in sorted(found.items())]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and hash of every file under ``directory`` (the last file a checkpoint gets)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    manifest = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def verify(directory: Path, only: str | None = None) -> None:
    """Raise :class:`CheckpointError` naming the first file that is missing, truncated or altered."""
    mpath = directory / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{mpath}: missing or unreadable manifest, the checkpoint is incomplete ({e})") from e
    for name, entry in manifest.items():
        if only is not None and name != only:
            continue
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: truncated or altered ({size} bytes, the manifest says {entry['bytes']})")
        try:
            digest = _sha256(path)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from e
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path}: corrupted (its SHA-256 differs from the manifest's)")


def save_state(state: dict, path: Path) -> None:
    """Serialise in memory, then write and fsync: a full disk surfaces as ``OSError(ENOSPC)``."""
    buf = io.BytesIO()
    torch.save(state, buf)
    with open(path, "wb") as f:
        f.write(buf.getbuffer())
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(
    run_dir: Path,
    step: int,
    state: dict,
    replay: ReplayBuffer | None,
    keep: int = 2,
    save: Callable[[dict, Path], None] = save_state,
    parts: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``state`` (and ``replay``) as checkpoint ``step_<step>``; keep the newest ``keep``.
    ``parts(tmp)`` adds more files (the other ranks') before the manifest is written."""
    if keep < 1:
        raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:010d}"
    tmp = root / f"{final.name}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("step_*.tmp"):  # left by a kill mid-write
            shutil.rmtree(stale)
        tmp.mkdir()
        save(state, tmp / STATE)
        if replay is not None:
            replay.save(tmp / REPLAY)
        if parts is not None:
            parts(tmp)
        write_manifest(tmp)
        _fsync_dir(tmp)
        old = root / f"{final.name}.old"
        if final.exists():  # the same step written again: keep it until the new one is in place
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(root)
        shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint_dirs(run_dir)
        kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no earlier checkpoint exists"
        if e.errno == errno.ENOSPC:
            raise CheckpointError(f"disk full while writing checkpoint {final}; {kept}") from e
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; {kept}") from e
    for stale in checkpoint_dirs(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(path: Path) -> dict:
    """Load ``state.pt`` onto the CPU (``load_state_dict`` moves tensors to the model's device) with
    ``weights_only=True``: a file that holds code or arbitrary objects is refused."""
    if (path.parent / MANIFEST).exists():
        verify(path.parent, only=path.name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused, it holds objects other than tensors and plain data "
            f"(loaded with weights_only=True, nothing was executed): {str(e).splitlines()[0]}"
        ) from e
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: no such checkpoint file") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupted ({str(e).splitlines()[0]})") from e
    if not isinstance(state, dict) or any(k not in state for k in REQUIRED_KEYS):
        raise CheckpointError(f"{path}: not a wm-agent checkpoint (expected keys {', '.join(REQUIRED_KEYS)})")
    return state


def read_rank_part(directory: Path, rank: int) -> dict:
    """Rank ``rank``'s own state (RNG states, parameter digest) in checkpoint ``directory``."""
    path = directory / RANKS / str(rank) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"{path}: cannot read rank {rank}'s part of the checkpoint ({reason})") from e


def rank_replay_dir(directory: Path, rank: int) -> Path:
    """Where checkpoint ``directory`` keeps rank ``rank``'s replay (rank 0's is the plain ``replay/``)."""
    return directory / REPLAY if rank == 0 else directory / RANKS / str(rank) / REPLAY


def resolve(path: Path) -> Path:
    """The ``state.pt`` meant by a run directory (its newest checkpoint), a checkpoint directory or a file."""
    if path.is_file():
        return path
    if (path / STATE).is_file():
        return path / STATE
    dirs = checkpoint_dirs(path)
    if dirs:
        return dirs[-1] / STATE
    if (path / "config.json").is_file():
        raise CheckpointError(f"{path} is a run directory without a checkpoint yet (none in {checkpoint_root(path)})")
    raise CheckpointError(f"{path} is neither a wm-agent run directory, a checkpoint directory nor a checkpoint file")


def quarantine(directory: Path) -> Path:
    """Rename a broken checkpoint to ``<name>.broken`` (a numbered suffix if taken); never delete it."""
    target = directory.with_name(directory.name + ".broken")
    n = 1
    while target.exists():
        n += 1
        target = directory.with_name(f"{directory.name}.broken{n}")
    os.replace(directory, target)
    return target


def load_latest(
    run_dir: Path,
    with_replay: bool,
    warn: Callable[[str], None],
    quarantine_broken: bool = True,
) -> tuple[dict, ReplayBuffer | None, Path]:
    """The newest checkpoint of ``run_dir`` that loads, with a warning for each broken one skipped
    (renamed ``.broken`` when ``quarantine_broken``, so a resumed run never writes over it)."""
    dirs = checkpoint_dirs(run_dir)
    if not dirs:
        raise CheckpointError(f"{run_dir}: no checkpoint to resume from in {checkpoint_root(run_dir)}")
    problems = []
    for d in reversed(dirs):
        try:
            verify(d)
        except CheckpointError as e:  # the files are not what was written: set them aside
            problems.append(str(e))
            kept = f"kept as {quarantine(d).name}" if quarantine_broken else "left as it is"
            warn(f"checkpoint {d.name} is unusable: {e}; {kept}; falling back to the one before it")
            continue
        try:
            state = read_state(d / STATE)
            replay = ReplayBuffer.load(d / REPLAY) if with_replay else None
            return state, replay, d
        except (CheckpointError, ReplayError) as e:  # intact files that this machine cannot load
            problems.append(str(e))
            warn(f"checkpoint {d.name} could not be loaded: {e}; falling back to the one before it")
    raise CheckpointError(f"{run_dir}: no usable checkpoint left ({'; '.join(problems)})")
