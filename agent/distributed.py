"""Data-parallel training over the processes ``torchrun`` starts: one per GPU (NCCL) or per CPU
worker (gloo). Every rank steps its own envs into its own replay; DDP averages the world model's and the
policy's gradients, so their weights stay identical; everything else a rank decides alone (when to
stop, what to log, what to checkpoint) goes through the small agreements below.

Plain ``wm-agent train`` never touches this module's process group: :func:`from_environment` returns
``None`` unless ``torchrun`` (or the same environment variables) asked for more than one process.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

_DDP_ARGS = inspect.signature(DistributedDataParallel.__init__).parameters
COLLECTIVE_TIMEOUT_S = 60
"""A collective that waits longer than this on a rank that neither answers nor dies raises on every rank
(gloo; NCCL's own watchdog handles its collectives)."""
ROLL_CALL_S = 10.0
"""After a failed collective, how long the survivors wait for each other before naming the ranks lost."""


def peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another rank died or stopped answering."""
    return isinstance(error, dist.DistError) or "gloo" in str(error) or "Connection closed by peer" in str(error)


def launched() -> bool:
    """Whether this process was started as one of several ranks (``torchrun --nproc-per-node N>1``)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class Distributed:
    """This process's place in the group and the few collectives the Dyna loop needs beyond DDP's."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device_type: str) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.device_type = device_type
        # Control messages (stop flags, metrics, checkpoint results) travel over gloo on the CPU
        # even when the gradients go over NCCL.
        timeout = timedelta(seconds=COLLECTIVE_TIMEOUT_S)
        self.cpu_group = dist.new_group(backend="gloo", timeout=timeout) if dist.get_backend() != "gloo" else None
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # Under torchrun the store lives in the launcher, so the survivors of a dead rank can still meet there.
        attempt = f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
        self.store = dist.PrefixStore(
            f"wm_agent/{attempt}",
            dist.TCPStore(host, port, is_master=False, timeout=timedelta(seconds=ROLL_CALL_S * 2)),
        )

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes the run directory."""
        return self.rank == 0

    def rank_seed(self, seed: int) -> int:
        """Rank 0 keeps the run's seed; the others get seeds derived from it that share no env copy."""
        if self.rank == 0:
            return seed
        return int(np.random.SeedSequence([seed, self.rank]).generate_state(1)[0] & 0x7FFF_FFFF)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel: its forward averages gradients over the ranks.
        Some parameters sit out some updates (e.g. heads on detached latents), hence the unused search."""
        device_ids = [self.local_rank] if self.device_type == "cuda" else None
        # Buffers (running statistics) are averaged after each update instead of copied from rank 0
        # at each forward (``forward_sync_buffers`` replaces ``broadcast_buffers`` in newer torch).
        sync = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=True, **{sync: False})

    # --- agreements --------------------------------------------------------------------------
    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any rank (e.g. a stop request one rank received)."""
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return bool(t.item() > 0)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (same shape, dtype and device)."""
        t = value.detach().to("cpu", torch.float64).clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.cpu_group)
        return (t / self.world_size).to(value.device, value.dtype)

    @torch.no_grad()
    def average_buffers(self, module: nn.Module) -> None:
        """Average ``module``'s floating-point buffers over the ranks in place: running statistics each
        rank updated from its own batch become those of all ranks' batches, and the ranks stay identical."""
        bufs = [b for b in module.buffers() if b.is_floating_point()]
        if not bufs:
            return
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        for b, new in zip(bufs, flat.split([b.numel() for b in bufs]), strict=True):
            b.copy_(new.view_as(b))

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.cpu_group)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def all_ok(self, ok: bool) -> bool:
        """True on every rank only when ``ok`` is true on every rank (e.g. a finite loss and gradient)."""
        return not self.any(not ok)

    def first_error(self, error: str | None) -> str | None:
        """The first error any rank reports (prefixed with its rank when not rank 0), on every rank."""
        failed = [(r, e) for r, e in enumerate(self.gather(error)) if e]
        if not failed:
            return None
        r, e = failed[0]
        return e if r == 0 else f"rank {r}: {e}"

    # --- failures ----------------------------------------------------------------------------
    def lost_ranks(self, wait_s: float = ROLL_CALL_S) -> list[int]:
        """Called after a collective failed: every survivor signs in at the store and waits up to
        ``wait_s`` for the others; the ranks that never sign in are dead or stuck. Without a store
        (its host, rank 0 outside torchrun, is gone), rank 0 is the one lost."""
        try:
            self.store.set(f"alive/{self.rank}", "1")
            deadline = time.monotonic() + wait_s
            while True:
                present = [r for r in range(self.world_size) if self.store.check([f"alive/{r}"])]
                if len(present) == self.world_size or time.monotonic() > deadline:
                    return [r for r in range(self.world_size) if r not in present]
                time.sleep(0.1)
        except (RuntimeError, OSError):
            return [0] if self.rank != 0 else []

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device_name: str) -> Distributed | None:
    """Join the process group ``torchrun`` set up (NCCL for CUDA, gloo for the CPU); ``None`` for a
    single process. Each rank then uses GPU ``LOCAL_RANK``."""
    if not launched():
        return None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    backend = "nccl" if cuda and torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    return Distributed(rank, world_size, local_rank, "cuda" if backend == "nccl" else "cpu")


def tensor_digests(state_dicts: list[dict[str, torch.Tensor]]) -> dict[str, str]:
    """A short hash of every tensor of ``state_dicts`` (keyed ``<index>.<name>``): ranks whose digests
    match hold the same weights bit for bit."""
    out = {}
    for i, sd in enumerate(state_dicts):
        for name, t in sd.items():
            data = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            out[f"{i}.{name}"] = hashlib.sha256(data).hexdigest()[:16]
    return out
