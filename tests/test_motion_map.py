"""The motion-map auxiliary loss: its target, its cross-entropy, and its place in the world-model loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent.config import preset
from tests.helpers import random_replay
from worldmodel.motion_map import arrival_map, spatial_cross_entropy
from worldmodel.world_model import WorldModel


def test_arrival_map_marks_where_something_arrived_not_where_it_left() -> None:
    prev, now = torch.zeros(1, 64, 64), torch.zeros(1, 64, 64)
    prev[0, 8, 8] = 0.4  # the ball was here (cell 2, 2) ...
    now[0, 9, 13] = 0.4  # ... and is now here (cell 2, 3)
    now[0, 60, 0] = 0.03  # a change below the threshold
    cells = arrival_map(prev, now, threshold=0.05, cells=16)
    assert cells.shape == (1, 256)
    assert cells[0].nonzero().flatten().tolist() == [2 * 16 + 3]


def test_spatial_cross_entropy_matches_a_plain_loop_and_skips_still_frames() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 9)
    target = torch.zeros(4, 9)
    target[0, [1, 5]] = 1
    target[2, 7] = 1
    target[3, logits[3].argmax()] = 1  # row 3's most likely cell is its target: a hit
    loss, hit = spatial_cross_entropy(logits, target)
    expected, hits = [], []
    for row, tgt in zip(logits, target, strict=True):
        cells = tgt.nonzero().flatten().tolist()
        if not cells:  # row 1: nothing moved
            continue
        logp = row.log_softmax(-1)
        expected.append(-sum(float(logp[c]) for c in cells) / len(cells))
        hits.append(float(int(row.argmax()) in cells))
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert hit.item() == pytest.approx(np.mean(hits))
    zero, _ = spatial_cross_entropy(logits, torch.zeros(4, 9))
    assert zero.item() == 0.0


def test_motion_map_loss_reaches_the_encoder_and_stays_one_graph() -> None:
    replay = random_replay("wm/Catch-v0", steps=600, num_envs=4, seed=0)
    cfg = preset("debug").world_model
    batch = replay.sample(8, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)

    def encoder_grad(weight: float) -> tuple[torch.Tensor, dict[str, torch.Tensor], WorldModel]:
        cfg.loss.motion_map = weight
        torch.manual_seed(0)
        wm = WorldModel(cfg, num_actions=3)
        loss, metrics = wm.compute_loss(batch)
        loss.backward()
        return torch.cat([p.grad.flatten() for p in wm.encoder.parameters()]), metrics, wm

    without, metrics_off, wm_off = encoder_grad(0.0)
    with_map, metrics_on, wm = encoder_grad(1.0)
    assert wm_off.motion_head is None and "world_model/motion_map_loss" not in metrics_off
    assert metrics_on["world_model/motion_map_loss"] > 0
    assert 0.0 <= metrics_on["world_model/motion_map_hit"] <= 1.0
    assert not torch.allclose(without, with_map)
    for name, p in wm.motion_head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    traced = torch.compile(wm.loss_and_latents, fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(batch)[0], wm.loss_and_latents(batch)[0])


@pytest.mark.parametrize(("field", "value"), [("motion_map", -1.0), ("motion_map_cells", 0), ("motion_map_cells", 65)])
def test_bad_motion_map_settings_fail_at_construction(field: str, value: float) -> None:
    cfg = preset("debug").world_model
    setattr(cfg.loss, field, value)
    with pytest.raises(ValueError, match="motion_map"):
        WorldModel(cfg, num_actions=3)


def test_predicted_motion_map_trains_the_predictor_only() -> None:
    """The open-loop term reaches the predictor; the head reads it with fixed weights and the chain
    starts from detached context, so the head's and the encoder's gradients are those without it."""
    replay = random_replay("wm/Catch-v0", steps=600, num_envs=4, seed=0)
    cfg = preset("debug").world_model
    cfg.loss.motion_map = 1.0
    batch = replay.sample(8, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)

    def grads(weight: float) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        cfg.loss.motion_map_predicted = weight
        torch.manual_seed(0)
        wm = WorldModel(cfg, num_actions=3)
        loss, metrics = wm.compute_loss(batch)
        loss.backward()
        return {n: p.grad.clone() for n, p in wm.named_parameters() if p.grad is not None}, metrics

    off, metrics_off = grads(0.0)
    on, metrics_on = grads(1.0)
    assert "world_model/motion_map_predicted_loss" not in metrics_off
    assert metrics_on["world_model/motion_map_predicted_loss"] > 0
    for name in off:
        same = torch.allclose(off[name], on[name])
        assert same != name.startswith("predictor."), name
