"""One world-model gradient step at a time: optimizer, gradient clipping, optional bf16 autocast
and ``torch.compile``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from worldmodel.batch import Batch
from worldmodel.graphs import GraphedStep, SkipCounts, adapt_loaded_optimizer, step_unless_nonfinite
from worldmodel.world_model import WorldModel


@dataclass
class OptimConfig:
    """Optimizer settings (AdamW)."""

    lr: float = 6e-4
    """Learning rate; the prototype needed a high one before the decoder drew the ball."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 100.0
    """Clip the global gradient norm to this value. Only against spikes: at 1.0 the reward head's
    gradients set the norm and starved every other part (a fixed batch no longer overfit)."""
    warmup_updates: int = 100
    """Linear learning-rate warm-up over this many updates."""
    encoder_hold_updates: int = 0
    """Updates during which the encoder does not learn (the rest of the model does); its learning
    rate then warms up over ``warmup_updates``. 0 = the encoder learns from the first update. A fresh
    encoder's latents already place Catch's ball (MLP probe R^2 0.91); trained at once, beside a decoder
    that cannot read them yet, it first erased them (0.75 after 300 updates, 0.54 after 600). Yet a
    whole Catch run holding it 300 updates (seed 0) ended at 0.64 against the default's 0.86."""
    eps: float = 1e-6
    """AdamW epsilon."""


def autocast_context(device: torch.device, enabled: bool, cache: bool = True) -> torch.autocast:
    """bf16 autocast on CUDA when ``enabled``; a disabled context elsewhere (CPU runs fp32)."""
    use = enabled and device.type == "cuda"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use, cache_enabled=cache)


def make_optimizer(params: list | object, cfg: OptimConfig, on_device: bool = False) -> torch.optim.AdamW:
    """AdamW; ``on_device``: fused, its learning rate a tensor on the parameters' device, as a CUDA graph
    needs (the step then reads it there, and can be skipped there through ``found_inf``)."""
    if not on_device:
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    params = list(params)
    first = params[0]["params"][0] if isinstance(params[0], dict) else params[0]
    lr = torch.tensor(cfg.lr, device=first.device)
    optimizer = torch.optim.AdamW(
        params, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.eps, fused=True, capturable=True
    )
    for group in optimizer.param_groups:  # each group its own tensor, set apart
        group["lr"] = group["lr"].clone()
    return optimizer


class LossModule(nn.Module):
    """``WorldModel.loss_and_latents`` as a module's forward, the call DistributedDataParallel wraps."""

    def __init__(self, model: WorldModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, batch: Batch, head_batch: Batch | None, dynamics_batch: Batch | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        return self.model.loss_and_latents(batch, head_batch, dynamics_batch)


class WorldModelTrainer:
    """Owns the world model's optimizer; ``update(batch)`` is one gradient step."""

    def __init__(
        self,
        model: WorldModel,
        cfg: OptimConfig,
        device: torch.device,
        amp: bool = True,
        compile: bool = False,
        wrap: Callable[[nn.Module], nn.Module] | None = None,
        agree: Callable[[bool], bool] | None = None,
        graphs: bool = False,
    ) -> None:
        """``wrap`` (e.g. DistributedDataParallel) wraps the loss's module, so gradients are averaged over
        ranks; ``agree`` turns this rank's "the step is finite" into every rank's verdict, so all of them
        skip the same steps. ``graphs``: each update is one replayed CUDA graph (:class:`GraphedStep`; on
        the CPU the same step without capture), with a fused AdamW and no host sync; a skipped update
        still counts in ``updates``."""
        self.agree = agree
        self.model = model
        self.cfg = cfg
        self.device = device
        self.amp = amp
        if graphs and (compile or wrap is not None or agree is not None):
            raise ValueError("cuda_graphs runs one process without torch.compile; drop --compile or torchrun")
        loss_fn = wrap(LossModule(model)) if wrap is not None else model.loss_and_latents
        # Compiling the bound method leaves the module (and its state_dict keys) as they are.
        self.loss_and_latents = torch.compile(loss_fn) if compile else loss_fn
        if cfg.encoder_hold_updates > 0:
            encoder = list(model.encoder.parameters())
            ids = {id(p) for p in encoder}
            rest = [p for p in model.parameters() if id(p) not in ids]
            groups: list[dict] | object = [{"params": rest}, {"params": encoder}]
        else:  # one group, as checkpoints written before the option have
            groups = model.parameters()
        self.optimizer = make_optimizer(groups, cfg, on_device=graphs)
        self.graphs = graphs
        self.updates = 0
        # The graphed step decides on the device whether to skip (the fused optimizer reads ``found_inf``)
        # and counts there: no host sync per update.
        self.skips = SkipCounts(device if graphs else None)
        if graphs:
            self.optimizer.found_inf = torch.zeros((), device=device)
            self.graphed = GraphedStep(self._device_step)

    @property
    def skipped(self) -> int:
        """Updates skipped for a non-finite loss or gradient (a host sync on the graphed path)."""
        return self.skips.total

    @property
    def consecutive_skipped(self) -> int:
        return self.skips.run

    def load_optimizer_state(self, state: dict) -> None:
        """The optimizer's state from a checkpoint of either path; before the first graphed update."""
        if self.graphs and self.graphed.captured:
            raise RuntimeError("load the optimizer's state before the first graphed update")
        self.optimizer.load_state_dict(state)
        adapt_loaded_optimizer(self.optimizer, self.graphs, self.device)

    def _set_lr(self, group: int, value: float) -> None:
        g = self.optimizer.param_groups[group]
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].fill_(value)  # read by the graph on the device
        else:
            g["lr"] = value

    def update(
        self, batch: Batch, head_batch: Batch | None = None, dynamics_batch: Batch | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One gradient step on ``batch`` (and ``head_batch`` for the heads, ``dynamics_batch`` for the predictor, see
        :meth:`WorldModel.compute_loss`); returns detached metrics and the batch's detached latents
        ``[B, K+P, E]``. A non-finite loss or gradient norm skips the step (counted in ``skipped``)."""
        self.model.train()
        warmup = max(1, self.cfg.warmup_updates)
        self._set_lr(0, self.cfg.lr * min(1.0, (self.updates + 1) / warmup))
        if len(self.optimizer.param_groups) == 2:  # the encoder's
            held = max(0, self.updates + 1 - self.cfg.encoder_hold_updates)
            self._set_lr(1, self.cfg.lr * min(1.0, held / warmup))
        if self.graphs:
            self.updates += 1
            return self.graphed(batch, head_batch, dynamics_batch)
        with autocast_context(self.device, self.amp):
            loss, metrics, latents = self.loss_and_latents(batch, head_batch, dynamics_batch)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        # One host sync per update; a finite loss can still have inf gradients, so both are checked.
        finite = bool(torch.isfinite(loss.detach()) & torch.isfinite(grad_norm))
        if self.agree(finite) if self.agree is not None else finite:
            self.optimizer.step()
            self.updates += 1
            self.skips.record(False)
            metrics["world_model/grad_norm"] = grad_norm.detach()
            return metrics, latents.float()
        self.skips.record(True)
        self.optimizer.zero_grad(set_to_none=True)
        metrics["world_model/skipped_updates"] = self.skips.total_tensor()
        return metrics, latents.float()

    def _device_step(
        self, batch: Batch, head_batch: Batch | None, dynamics_batch: Batch | None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The graphed update: the eager one's loss, gradient and clipping, with the skip decided on the device."""
        # A graph cannot keep autocast's cache of cast weights between replays.
        with autocast_context(self.device, self.amp, cache=False):
            loss, metrics, latents = self.loss_and_latents(batch, head_batch, dynamics_batch)
        grad_norm = step_unless_nonfinite(self.optimizer, loss, self.model.parameters(), self.cfg.grad_clip)
        self.skips.record(self.optimizer.found_inf)
        metrics["world_model/grad_norm"] = grad_norm.detach()
        metrics["world_model/skipped_updates"] = self.skips.total_tensor()
        return metrics, latents.float()
