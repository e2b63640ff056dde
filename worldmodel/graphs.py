"""One training step on fixed-shape tensors, replayed as a single CUDA graph.

On an H100 a world-model update spent 46-85 ms launching kernels for 0.3 ms of arithmetic at the
bf16 peak (docs/results.md, "Speed on a GPU"); a graph launches them all at once. The step must
have fixed shapes, no host synchronisation and no tensors created on the CPU; its optimizer must
keep its learning rate and step counts on the device (``fused=True, capturable=True``, a tensor ``lr``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pytree


class StaticShapeError(ValueError):
    """A call's inputs do not have the shapes, dtypes or structure the graph was captured with."""


def _describe(flat: list[Any]) -> list[tuple]:
    return [(tuple(t.shape), t.dtype, t.device.type) if isinstance(t, torch.Tensor) else (t,) for t in flat]


class GraphedStep:
    """``step(*args) -> outputs`` (pytrees of tensors, e.g. batches and metric dicts) replayed as a CUDA graph.

    The first ``warmup`` calls run eagerly on a side stream (capture needs the kernels chosen and the
    optimizer's state allocated); the next one captures ``step`` on static copies of its inputs and
    replays it, and every later call copies its inputs into those copies and replays. Every call does
    the step's work exactly once and returns copies of its outputs, safe to keep across calls.

    Off CUDA, or with ``capture=False``, every call copies into the same static inputs and runs
    ``step`` eagerly on them: the same path without the graph, which the CPU tests exercise. A capture
    that fails warns and leaves the step eager, so a run goes on (``bench graphs`` fails on it)."""

    def __init__(self, step: Callable[..., Any], warmup: int = 3, capture: bool = True) -> None:
        self.step = step
        self.name = getattr(step, "__qualname__", repr(step))
        self.warmup = warmup
        self.capture = capture
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[Any] | None = None
        self.spec: pytree.TreeSpec | None = None
        self.static_out: Any = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *args: Any) -> Any:
        flat, spec = pytree.tree_flatten(args)
        if self.static_in is None:
            self.static_in = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
            self.spec = spec
        elif spec != self.spec or _describe(flat) != _describe(self.static_in):
            raise StaticShapeError(
                f"a graphed step takes inputs of fixed shapes: captured with {_describe(self.static_in)} "
                f"and {self.spec}, called with {_describe(flat)} and {spec}"
            )
        else:
            for static, t in zip(self.static_in, flat, strict=True):
                if isinstance(t, torch.Tensor):
                    static.copy_(t, non_blocking=True)
        self.calls += 1
        inputs = pytree.tree_unflatten(self.static_in, self.spec)
        on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in flat)
        if not (self.capture and on_cuda):
            return _copy(self.step(*inputs))
        if self.graph is None and self.calls <= self.warmup:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                out = self.step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            return _copy(out)
        if self.graph is None:
            graph, stream = torch.cuda.CUDAGraph(), torch.cuda.current_stream()
            try:
                with torch.cuda.graph(graph):
                    self.static_out = self.step(*inputs)
            except RuntimeError as e:  # nothing ran during the capture: run the step eagerly from now on
                torch.cuda.set_stream(stream)  # a failed capture_end leaves the capture stream current
                self.capture = False
                cause = e.__context__ or e
                warnings.warn(f"CUDA graph capture of {self.name} failed, it runs eagerly: {cause}", stacklevel=2)
                torch.cuda.synchronize()
                return _copy(self.step(*inputs))
            self.graph = graph
        self.graph.replay()
        return _copy(self.static_out)


class SkipCounts:
    """Updates skipped for a non-finite loss or gradient, all told and in a row: numbers on the eager path;
    with a ``device``, tensors there that a graph updates in place (the host reads them only when asked)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.on_device = device is not None
        self._total: int | torch.Tensor = torch.zeros((), device=device) if device is not None else 0
        self._run: int | torch.Tensor = torch.zeros((), device=device) if device is not None else 0

    def record(self, skipped: bool | torch.Tensor) -> None:
        """One more update, ``skipped`` or not (on the device: a ``[]`` tensor, 1.0 or 0.0)."""
        if self.on_device:
            self._total.add_(skipped)
            self._run.add_(1).mul_(skipped)
        elif skipped:
            self._total += 1
            self._run += 1
        else:
            self._run = 0

    @property
    def total(self) -> int:
        return int(self._total)

    @property
    def run(self) -> int:
        return int(self._run)

    def total_tensor(self) -> torch.Tensor:
        """The total as a metric: the device tensor itself on the graphed path."""
        return self._total if self.on_device else torch.tensor(float(self._total))


def step_unless_nonfinite(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, params: Any, grad_clip: float
) -> torch.Tensor:
    """Backward, clipping and a fused optimizer step that the device skips where the loss or the gradient
    norm is not finite (through ``optimizer.found_inf``, left at 1.0 then); returns the gradient norm."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.found_inf.copy_((~(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))).float())
    optimizer.step()
    return grad_norm


def adapt_loaded_optimizer(optimizer: torch.optim.Optimizer, on_device: bool, device: torch.device) -> None:
    """After ``optimizer.load_state_dict`` of a checkpoint written by either path: the groups' learning
    rates, implementation and step counts as this path runs them (graphed: fused and capturable, a tensor ``lr`` and
    step counts on ``device``; eager: the default implementation, numbers and counts on the CPU)."""
    for group in optimizer.param_groups:
        lr = float(group["lr"])
        group["lr"] = torch.tensor(lr, device=device) if on_device else lr
        group["fused"] = True if on_device else None
        group["capturable"] = on_device
    for param, state in optimizer.state.items():
        if "step" in state:
            state["step"] = state["step"].to(param.device if on_device else "cpu", torch.float32)


def _copy(out: Any) -> Any:
    return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, out)
