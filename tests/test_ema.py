"""The slow (EMA) copy of a model, and the Dyna loop imagining and acting through it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from agent.config import preset
from agent.dyna import DynaTrainer, load_agent
from agent.replay import random_replay
from tests.helpers import train_quietly
from worldmodel.ema import ema_update_, make_slow_copy
from worldmodel.world_model import WorldModel


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.register_buffer("stat", torch.zeros(2))
        self.register_buffer("flag", torch.tensor(False))


def test_ema_update_moves_parameters_and_float_buffers_by_one_minus_decay() -> None:
    torch.manual_seed(0)
    fast = Tiny()
    slow = make_slow_copy(fast)
    assert not any(p.requires_grad for p in slow.parameters())
    before = slow.lin.weight.clone()
    with torch.no_grad():
        fast.lin.weight.add_(1.0)
        fast.stat.fill_(4.0)
        fast.flag.fill_(True)
    ema_update_(slow, fast, decay=0.75)
    torch.testing.assert_close(slow.lin.weight, 0.75 * before + 0.25 * fast.lin.weight)
    torch.testing.assert_close(slow.stat, torch.full((2,), 1.0))
    assert bool(slow.flag)
    ema_update_(slow, fast, decay=0.0)
    torch.testing.assert_close(slow.lin.weight, fast.lin.weight, rtol=0, atol=0)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match="decay"):
            ema_update_(slow, fast, decay=bad)


def test_dyna_imagines_and_acts_through_the_slow_copy_and_checkpoints_it(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.seed, cfg.threads = "wm/Catch-v0", 200, 0, 1
    cfg.slow_world_model_decay = 0.9
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    trainer = DynaTrainer(cfg, run_dir)
    assert trainer.wm_slow is not None and trainer.wm_act is trainer.wm_slow
    assert trainer.imagined.wm is trainer.wm_slow and trainer.actor.wm is trainer.wm_slow
    train_quietly(trainer)
    assert trainer.wm_trainer.updates > 0
    differs = [
        not torch.equal(s, f) for s, f in zip(trainer.wm_slow.parameters(), trainer.wm.parameters(), strict=True)
    ]
    assert any(differs), "the slow copy should lag the trained model"

    frames = torch.randint(0, 256, (3, cfg.world_model.context, 64, 64), dtype=torch.uint8)
    loaded = load_agent(run_dir, torch.device("cpu"))
    resumed = DynaTrainer(cfg, run_dir, resume=True)
    with torch.no_grad():
        z_slow = trainer.wm_slow.encode(frames)
        torch.testing.assert_close(loaded.wm.encode(frames), z_slow, rtol=0, atol=0)
        torch.testing.assert_close(resumed.wm_slow.encode(frames), z_slow, rtol=0, atol=0)
        torch.testing.assert_close(resumed.wm.encode(frames), trainer.wm.encode(frames), rtol=0, atol=0)

    # One more update: the newest imagination starts are that batch's windows as the slow copy encodes them.
    batch = trainer.replay.sample(cfg.batch_size, cfg.world_model.seq_len, trainer.rng, torch.device("cpu"))
    trainer.world_model_update(batch, None)
    with torch.no_grad():
        expected = WorldModel.windows(trainer.wm_slow.encode(batch.frames)[:, :-1], cfg.world_model.context)
        trained = WorldModel.windows(trainer.wm.encode(batch.frames)[:, :-1], cfg.world_model.context)
    assert trainer.starts is not None
    newest = trainer.starts[: len(expected)]
    torch.testing.assert_close(newest, expected)
    assert not torch.allclose(newest, trained)


def test_slow_copy_encodes_starts_only_once_the_policy_is_about_to_start(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.threads, cfg.slow_world_model_decay = "wm/Catch-v0", 1, 0.5
    cfg.policy_start_updates = 10
    trainer = DynaTrainer(cfg, tmp_path)
    trainer.replay = random_replay("wm/Catch-v0", 300, seed=0)
    K, L, B = cfg.world_model.context, cfg.world_model.seq_len, cfg.batch_size
    needed = -(-cfg.ppo.num_starts // (B * (L - K)))
    slow_encoded = []
    for _ in range(cfg.policy_start_updates):
        batch = trainer.replay.sample(B, L, trainer.rng, torch.device("cpu"))
        trainer.world_model_update(batch, None)
        with torch.no_grad():
            slow = WorldModel.windows(trainer.wm_slow.encode(batch.frames)[:, :-1], K)
        assert trainer.starts is not None
        slow_encoded.append(torch.allclose(trainer.starts[: len(slow)], slow))
    assert slow_encoded == [False] * (cfg.policy_start_updates - needed) + [True] * needed
    assert trainer.imagination_starts().shape[0] == cfg.ppo.num_starts
