"""The graphed training steps (``--cuda-graphs``) on the CPU: the same numbers as the eager path, skips
decided on the device, checkpoints that move between the paths, and steps a CUDA graph can capture
(nothing read back to the host, no tensor made on the default device)."""

from __future__ import annotations

import copy
import dataclasses
import json
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from agent.cli import main
from agent.config import UsageError, preset, validate_config
from agent.dyna import DynaTrainer
from agent.policy import ActorCritic, sample_actions
from agent.ppo import PPO
from tests.helpers import random_replay, train_quietly
from worldmodel.graphs import GraphedStep, StaticShapeError, adapt_loaded_optimizer
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.trainer import OptimConfig, WorldModelTrainer
from worldmodel.world_model import WorldModel

CPU = torch.device("cpu")


def test_graphed_step_copies_inputs_into_fixed_buffers_and_returns_copies() -> None:
    seen = []

    def step(x: torch.Tensor, extra: dict) -> dict:
        seen.append(x)
        return {"y": x * 2 + extra["b"]}

    g = GraphedStep(step)
    out1 = g(torch.ones(3), {"b": torch.zeros(3)})
    out2 = g(torch.full((3,), 5.0), {"b": torch.ones(3)})
    assert seen[0] is seen[1]  # one static input, refilled
    assert torch.equal(out1["y"], torch.full((3,), 2.0)) and torch.equal(out2["y"], torch.full((3,), 11.0))
    out2["y"].zero_()  # a copy: the next call is unaffected
    assert torch.equal(g(torch.ones(3), {"b": torch.zeros(3)})["y"], torch.full((3,), 2.0))
    with pytest.raises(StaticShapeError, match="fixed shapes"):
        g(torch.ones(4), {"b": torch.zeros(4)})
    with pytest.raises(StaticShapeError):
        g(torch.ones(3), {"c": torch.zeros(3)})


def _world_model_batches(n: int = 3):
    cfg = preset("debug")
    buf = random_replay("wm/Catch-v0", steps=80, num_envs=2)
    rng = np.random.default_rng(0)
    L = cfg.world_model.seq_len
    return cfg, [(buf.sample(4, L, rng), buf.sample(4, 2 * cfg.world_model.reward.window, rng)) for _ in range(n)]


def test_graphed_world_model_update_matches_eager() -> None:
    cfg, batches = _world_model_batches()
    torch.manual_seed(0)
    wm_e = WorldModel(cfg.world_model, 3)
    wm_g = copy.deepcopy(wm_e)
    eager = WorldModelTrainer(wm_e, OptimConfig(warmup_updates=2), CPU)
    graphed = WorldModelTrainer(wm_g, OptimConfig(warmup_updates=2), CPU, graphs=True)
    for i, (batch, head) in enumerate(batches):
        m_e, z_e = eager.update(batch, head)
        m_g, z_g = graphed.update(batch, head)
        assert m_e.keys() <= m_g.keys()
        assert torch.allclose(m_e["world_model/loss"], m_g["world_model/loss"], rtol=1e-5), i
        assert torch.allclose(z_e, z_g, rtol=1e-4, atol=1e-5)
        if i == 0:  # same weights, same batch: the same gradients
            for p_e, p_g in zip(wm_e.parameters(), wm_g.parameters(), strict=True):
                assert (p_e.grad is None) == (p_g.grad is None)
                assert p_e.grad is None or torch.allclose(p_e.grad, p_g.grad, rtol=1e-5, atol=1e-7)
    assert graphed.updates == eager.updates == len(batches)
    assert isinstance(graphed.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert float(graphed.optimizer.param_groups[0]["lr"]) == pytest.approx(OptimConfig().lr)


def test_graphed_update_skips_non_finite_steps_on_the_device() -> None:
    cfg, batches = _world_model_batches(2)
    wm = WorldModel(cfg.world_model, 3)
    trainer = WorldModelTrainer(wm, OptimConfig(), CPU, graphs=True)
    before = [p.detach().clone() for p in wm.parameters()]
    hook = next(wm.decoder.parameters()).register_hook(lambda g: g * float("inf"))
    metrics, _ = trainer.update(*batches[0])
    hook.remove()
    assert trainer.skipped == 1 and trainer.consecutive_skipped == 1
    assert float(metrics["world_model/skipped_updates"]) == 1
    assert all(torch.equal(a, b) for a, b in zip(before, wm.parameters(), strict=True))
    assert all(int(s["step"]) == 0 for s in trainer.optimizer.state.values())  # Adam's count stays
    trainer.update(*batches[1])
    assert trainer.skipped == 1 and trainer.consecutive_skipped == 0
    assert not all(torch.equal(a, b) for a, b in zip(before, wm.parameters(), strict=True))
    assert trainer.updates == 2  # a skipped graphed update still counts


def _policy_parts(graphs: bool, seed: int = 0, self_imitation: float = 0.0):
    cfg = preset("debug")
    if self_imitation:  # as the cpu and atari100k presets
        cfg.ppo = dataclasses.replace(cfg.ppo, critic_targets="real", self_imitation=self_imitation)
    torch.manual_seed(seed)
    E = cfg.world_model.encoder.latent_dim
    wm = WorldModel(cfg.world_model, 3)
    policy = ActorCritic(cfg.policy, E, 3)
    return cfg, wm, policy, PPO(policy, cfg.ppo, graphs=graphs)


@pytest.mark.parametrize("self_imitation", [0.0, 1.0])
def test_graphed_ppo_steps_match_eager_where_no_sampling_differs(self_imitation: float) -> None:
    cfg, wm, policy, graphed = _policy_parts(graphs=True, self_imitation=self_imitation)
    _, _, eager_policy, eager = _policy_parts(graphs=False, self_imitation=self_imitation)
    E, H = cfg.world_model.encoder.latent_dim, cfg.policy.history
    windows, actions, returns = torch.randn(32, H, E), torch.randint(0, 3, (32,)), torch.rand(32) * 3
    m_g = graphed.real_update(windows, actions, returns)
    m_e = eager.real_update(windows, actions, returns)
    assert torch.allclose(m_g["policy/real_value_loss"], m_e["policy/real_value_loss"])
    if self_imitation:
        assert torch.allclose(m_g["policy/self_imitation_advantage"], m_e["policy/self_imitation_advantage"])
    for a, b in zip(policy.parameters(), eager_policy.parameters(), strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    env = ImaginedEnv(wm, cfg.ppo.horizon)
    starts = torch.randn(16, cfg.world_model.context, E)
    ro = graphed.rollout(env, starts)
    with torch.no_grad():  # the rollout's steps, recomputed eagerly from its own inputs
        for t in range(cfg.ppo.horizon):
            assert torch.allclose(ro.windows[t + 1][:, -1:], wm.imagine_step(ro.windows[t], ro.actions[t]).latent)
        assert torch.allclose(ro.values, policy.value(ro.windows.flatten(0, 1)).view(ro.values.shape))
    m_g = graphed.update(ro)
    m_e = eager.update(ro)  # the same advantages and return scale; minibatches are drawn apart
    for k in ("policy/advantage_abs", "policy/return_scale", "imagination/return"):
        assert torch.allclose(m_g[k], m_e[k]), k
    assert graphed.updates == 1 and graphed.skipped == 0


def test_graphed_ppo_skips_non_finite_steps_on_the_device() -> None:
    cfg, _, policy, ppo = _policy_parts(graphs=True)
    E, H = cfg.world_model.encoder.latent_dim, cfg.policy.history
    before = [p.detach().clone() for p in policy.parameters()]
    ppo.real_update(torch.randn(8, H, E), torch.zeros(8, dtype=torch.long), torch.full((8,), float("nan")))
    assert all(torch.equal(a, b) for a, b in zip(before, policy.parameters(), strict=True))


def test_sample_actions_draws_from_the_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0]).repeat(100_000, 1)
    freq = torch.bincount(sample_actions(logits), minlength=4) / 100_000
    assert torch.allclose(freq, logits[0].softmax(-1), atol=0.005)


class HostReads(TorchFunctionMode):
    """Records what a CUDA graph cannot capture: values read back to the host, and tensors made on the
    default device (on a GPU step, a CPU tensor copied in)."""

    READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__}
    INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}
    READS |= {torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}
    FACTORIES = {torch.tensor, torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.linspace}
    FACTORIES |= {torch.randperm, torch.rand, torch.randn, torch.randint, torch.as_tensor, torch.scalar_tensor}

    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # An index given as a list or array is copied to the device as a tensor, with a host sync.
        index = args[1] if func in self.INDEXING and len(args) > 1 else None
        by_list = any(isinstance(i, list | np.ndarray) for i in (index if isinstance(index, tuple) else (index,)))
        if func in self.READS or (func in self.FACTORIES and "device" not in kwargs) or by_list:
            self.found.append(f"{getattr(func, '__name__', func)} at {traceback.format_stack(limit=3)[0]}")
        return func(*args, **kwargs)


@pytest.mark.parametrize("self_imitation", [0.0, 1.0])
def test_graphed_steps_read_nothing_back_and_make_no_host_tensors(self_imitation: float) -> None:
    cfg, batches = _world_model_batches(1)
    wm = WorldModel(cfg.world_model, 3)
    trainer = WorldModelTrainer(wm, OptimConfig(), CPU, graphs=True)
    trainer.update(*batches[0])  # the optimizer's state exists, as it does after the eager warm-up calls
    _, _, policy, ppo = _policy_parts(graphs=True, self_imitation=self_imitation)
    E, H = cfg.world_model.encoder.latent_dim, cfg.policy.history
    ppo._env = ImaginedEnv(wm, cfg.ppo.horizon)
    starts = torch.randn(8, cfg.world_model.context, E)
    real = torch.randn(8, H, E), torch.zeros(8, dtype=torch.long), torch.rand(8)
    ppo.real_update(*real)
    with HostReads() as probe:
        trainer._device_step(*batches[0], None)
        ro = ppo._rollout_tensors(starts)
        ppo._device_update(*ro)
        ppo._device_real_update(*real)
    assert probe.found == []


def test_head_calibration_reads_nothing_back() -> None:
    """The shifts' bisection runs on the device: one calibration per Dyna iteration, no host read."""
    cfg, batches = _world_model_batches(1)
    wm = WorldModel(cfg.world_model, 3)
    frames, actions = batches[0][0].frames, batches[0][0].actions
    with HostReads() as probe:
        wm.calibrate_heads(frames, actions, 0.05, 0.1)
    assert probe.found == []


def test_optimizer_state_moves_between_the_paths() -> None:
    p = torch.nn.Parameter(torch.randn(4))
    eager = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(4)
    eager.step()
    fused = torch.optim.AdamW([p], lr=torch.tensor(1e-3), fused=True, capturable=True)
    fused.load_state_dict(eager.state_dict())
    adapt_loaded_optimizer(fused, on_device=True, device=CPU)
    group = fused.param_groups[0]
    assert isinstance(group["lr"], torch.Tensor) and group["fused"] and group["capturable"]
    fused.step()
    back = torch.optim.AdamW([p], lr=1e-3)
    back.load_state_dict(fused.state_dict())
    adapt_loaded_optimizer(back, on_device=False, device=CPU)
    assert back.param_groups[0]["lr"] == pytest.approx(1e-3) and not back.param_groups[0]["capturable"]
    assert int(back.state[p]["step"]) == 2
    back.step()


def test_a_graphed_run_resumes_eagerly_and_back(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.threads, cfg.cuda_graphs = "wm/Catch-v0", 300, 1, True
    a = DynaTrainer(cfg, tmp_path)
    summary = train_quietly(a)
    assert summary["env_steps"] == 300 and a.wm_trainer.updates > 0 and a.ppo.updates > 0
    for graphs, steps in ((False, 400), (True, 500)):
        cfg.cuda_graphs, cfg.steps = graphs, steps
        b = DynaTrainer(cfg, tmp_path, resume=True)
        assert b.wm_trainer.graphs == graphs
        assert isinstance(b.ppo.optimizer.param_groups[0]["lr"], torch.Tensor) == graphs
        assert train_quietly(b)["env_steps"] == steps


def test_cuda_graphs_and_compile_are_refused_together() -> None:
    cfg = preset("atari100k")
    assert cfg.cuda_graphs
    cfg.compile = True
    with pytest.raises(UsageError, match="--cuda-graphs and --compile"):
        validate_config(cfg)


def test_bench_graphs_reports_agreement(tmp_path: Path) -> None:
    out = tmp_path / "graphs.json"
    flags = ["--batch-size", "4", "--head-batch-size", "4", "--ppo.num-starts", "16"]
    rc = main(["bench", "graphs", "--device", "cpu", "--preset", "debug", "--updates", "1", "--out", str(out), *flags])
    result = json.loads(out.read_text())
    assert rc == 0 and result["failed"] == []
    assert result["world_model"]["grad_rel_err"] <= result["tolerance"]
    assert result["world_model"]["graphed_ms"] > 0 and result["policy"]["rollout_graphed_ms"] > 0
    assert result["world_model"]["nan_batch_skipped"] and result["policy"]["nan_real_step_skipped"]
    assert result["world_model"]["step_rel_err"] <= result["tolerance"] >= result["policy"]["ppo_step_rel_err"]


def _metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


def test_overlapped_collection_counts_every_step_and_is_reproducible(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.threads, cfg.overlap_collection = "wm/Catch-v0", 600, 1, True
    trainers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        trainer = DynaTrainer(cfg, tmp_path / name)
        summary = train_quietly(trainer)
        assert summary["env_steps"] == 600 and len(trainer.replay) == 600
        assert trainer.ppo.updates > 0  # the thread acted with the policy after the warm-up
        trainers.append(trainer)
    a, b = trainers
    assert a.episode_returns == b.episode_returns and a.episode_end_steps == b.episode_end_steps
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")  # the thread's timing changes nothing
    assert all(torch.equal(x, y) for x, y in zip(a.policy.parameters(), b.policy.parameters(), strict=True))


def test_a_stop_during_overlapped_collection_keeps_its_steps_and_resumes(tmp_path: Path) -> None:
    cfg = preset("debug")
    cfg.env, cfg.steps, cfg.threads, cfg.overlap_collection = "wm/Catch-v0", 600, 1, True
    trainer = DynaTrainer(cfg, tmp_path)
    update = trainer.world_model_update

    def stop_later(*args):
        if trainer.wm_trainer.updates == 3:
            trainer.request_stop()
        return update(*args)

    trainer.world_model_update = stop_later
    summary = train_quietly(trainer)
    assert summary["stopped_early"] and len(trainer.replay) == trainer.counters.env_steps == summary["env_steps"]
    resumed = DynaTrainer(cfg, tmp_path, resume=True)
    assert resumed.counters.env_steps == summary["env_steps"]
    assert train_quietly(resumed)["env_steps"] == 600
