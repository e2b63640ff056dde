"""The typed batch that the replay buffer produces and the world model consumes."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch.utils import _pytree as pytree


@dataclass
class Batch:
    """``B`` sequences of ``T + 1`` consecutive frames from one episode each, and the ``T``
    transitions between them: ``actions[:, t]`` was taken at ``frames[:, t]`` and led to
    ``rewards[:, t]``, ``frames[:, t + 1]``.

    - ``frames``: uint8 ``[B, T+1, 64, 64]``
    - ``actions``: int64 ``[B, T]``
    - ``rewards``: float32 ``[B, T]`` (unclipped)
    - ``terminated``: bool ``[B, T]`` (real episode end)
    - ``life_loss``: bool ``[B, T]``
    - ``truncated``: bool ``[B, T]``
    """

    frames: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    terminated: torch.Tensor
    life_loss: torch.Tensor
    truncated: torch.Tensor

    @property
    def continues(self) -> torch.Tensor:
        """float32 ``[B, T]``: 0 where the transition ends an episode or a life (training terminal), else 1."""
        return (~(self.terminated | self.life_loss)).float()

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})


# A pytree node, so that a graphed step (``worldmodel/graphs.py``) takes batches as it takes tensors.
pytree.register_pytree_node(
    Batch,
    lambda b: ([getattr(b, f.name) for f in fields(b)], None),
    lambda values, _: Batch(*values),
    serialized_type_name="worldmodel.batch.Batch",
)
