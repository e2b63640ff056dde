"""Run logging: metrics to JSONL and TensorBoard on one env-step axis, progress on the console."""

from __future__ import annotations

import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from agent.distributed import Distributed


class RunLogger:
    """Accumulates metric tensors between log steps (no host syncs in the hot loop), then writes
    their means to ``metrics.jsonl`` and TensorBoard, and updates the progress display."""

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        start_step: int = 0,
        console: Console | None = None,
        tensorboard: bool = True,
        dist: Distributed | None = None,
    ) -> None:
        """With ``dist`` (a run of several ranks) every rank calls :meth:`flush` at the same steps, the
        metrics are averaged over all ranks' values, and rank 0 alone writes and shows them."""
        self.run_dir = run_dir
        self.dist = dist
        writes = dist is None or dist.is_main
        self.console = console or Console(quiet=not writes)
        self.pending: dict[str, list[torch.Tensor | float]] = defaultdict(list)
        self.metrics_file = open(run_dir / "metrics.jsonl", "a") if writes else None  # noqa: SIM115 - closed in close()
        self.writer = None
        if tensorboard and writes:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        self.total = total_steps
        self.start_time = time.time()
        self.start_step = start_step
        self.interactive = sys.stdout.isatty() and writes
        self.progress: Progress | None = None
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                TextColumn("{task.completed}/{task.total} steps"),
                TextColumn("{task.fields[sps]:.0f} steps/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=self.console,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, sps=0.0, status="")
            self.progress.start()
        self.last: dict[str, float] = {}

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for k, v in metrics.items():
            self.pending[k].append(v)

    def flush(self, step: int) -> dict[str, float]:
        """Average what was added since the last flush, write it at ``step`` and show a status line."""
        sums: dict[str, tuple[float, int]] = {}
        for k, vals in self.pending.items():
            t = torch.stack([torch.as_tensor(v, dtype=torch.float32).detach().cpu() for v in vals])
            t = t[torch.isfinite(t)]
            if len(t):
                sums[k] = (float(t.double().sum()), len(t))
        self.pending.clear()
        if self.dist is not None:
            merged: dict[str, tuple[float, int]] = {}
            for part in self.dist.gather(sums):
                for k, (total, n) in part.items():
                    t0, n0 = merged.get(k, (0.0, 0))
                    merged[k] = (t0 + total, n0 + n)
            sums = merged
        row: dict[str, float] = {k: total / n for k, (total, n) in sums.items()}
        elapsed = time.time() - self.start_time
        sps = (step - self.start_step) / max(elapsed, 1e-9)
        row["time/steps_per_s"] = sps
        row["time/elapsed_s"] = elapsed
        self.last.update(row)
        if self.metrics_file is None:
            return row
        self.metrics_file.write(json.dumps({"step": step, **row}) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for k, v in row.items():
                self.writer.add_scalar(k, v, step)
        status = self.status_line()
        if self.progress is not None:
            self.progress.update(self.task, completed=step, sps=sps, status=status)
        elif not self.console.quiet:
            eta = (self.total - step) / sps if sps > 0 else math.inf
            print(f"step {step}/{self.total} | {sps:.0f} steps/s | ETA {eta:.0f}s | {status}", flush=True)
        return row

    def phase(self, message: str) -> None:
        """Progress inside a long stretch without env steps (the world model's pretraining): the status
        of the progress bar, or a plain line when stdout is not a terminal."""
        if self.progress is not None:
            self.progress.update(self.task, status=message)
        elif not self.console.quiet:
            print(message, flush=True)

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        """A ``[C, H, W]`` image in [0, 1] to TensorBoard at ``step``."""
        if self.writer is not None:
            self.writer.add_image(tag, image, step, dataformats="CHW")

    def status_line(self) -> str:
        parts = []
        for key, label in (
            ("charts/episode_return", "return"),
            ("charts/return_last100", "last100"),
            ("world_model/loss", "wm"),
            ("world_model/reward_acc_rewarded", "rew_acc"),
            # what imagination pays for a true reward (rew_acc reads the class-balanced head)
            ("world_model/reward_paid_share_rewarded", "paid"),
            ("imagination/return", "imag"),
            ("policy/entropy", "ent"),
        ):
            if key in self.last:
                parts.append(f"{label} {self.last[key]:.3g}")
        return " ".join(parts)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
