"""The composed world model: loss contract, gradients, overfitting, and short online training on Catch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from agent.config import from_dict, preset, to_dict
from tests.helpers import random_replay
from worldmodel.imagined_env import ImaginedEnv
from worldmodel.trainer import OptimConfig, WorldModelTrainer
from worldmodel.world_model import WorldModel, WorldModelConfig, foreground_mask, sign_balanced_weights


@pytest.fixture(scope="module")
def catch_replay():
    return random_replay("wm/Catch-v0", steps=1500, num_envs=4, seed=0)


def small_cfg() -> WorldModelConfig:
    return preset("debug").world_model


def test_loss_is_finite_and_reaches_every_parameter(catch_replay) -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    batch = catch_replay.sample(8, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)
    loss, metrics = wm.compute_loss(batch)
    assert torch.isfinite(loss)
    assert all(not v.requires_grad for v in metrics.values())
    loss.backward()
    for name, p in wm.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_foreground_against_the_batch_or_each_sequence() -> None:
    frames = torch.zeros(2, 3, 4, 4)  # (B, L, H, W)
    frames[0, :, 0, 0] = 1.0  # lit in every frame of sequence 0: its static background
    frames[1, 0, 2, 2] = 1.0  # lit in one frame of sequence 1: something that moved
    targets = frames[:, [0, 2]].reshape(4, 4, 4)  # two frames per sequence, sequence-major
    per_seq = foreground_mask(frames, targets, 0.05, per_sequence=True)
    assert per_seq.sum() == 1 and per_seq[2, 2, 2] == 1
    # Against the batch's median (of three lit and three dark frames) the static pixel of sequence 0
    # is foreground and the moving one of sequence 1 is too.
    per_batch = foreground_mask(frames, targets, 0.05)
    assert per_batch[0, 0, 0] == 1 and per_batch[1, 0, 0] == 1 and per_batch[2, 2, 2] == 1
    cfg = small_cfg()
    cfg.loss.foreground = "sequences"
    with pytest.raises(ValueError, match="foreground"):
        WorldModel(cfg, num_actions=3)


def test_head_batch_trains_the_heads_only(catch_replay) -> None:
    """The extra transitions of ``head_batch`` change the reward and continue heads' gradients, and leave
    the encoder's and decoder's as they were: those learn from pixels alone. (The predictor's change with
    them: the heads' loss reaches it through the predicted latents, reweighted by the extra pairs.)"""
    torch.manual_seed(0)
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    rng = np.random.default_rng(0)
    batch = catch_replay.sample(8, cfg.seq_len, rng, rewarded_fraction=0.5)
    head_batch = catch_replay.sample(16, 2, rng, rewarded_fraction=0.5)
    assert (head_batch.rewards != 0).sum() == 8

    def grads(hb):
        wm.zero_grad(set_to_none=True)
        wm.compute_loss(batch, hb)[0].backward()
        return {n: p.grad.clone() for n, p in wm.named_parameters()}

    without, with_heads = grads(None), grads(head_batch)
    for name in without:
        if name.startswith(("reward_head.", "cont_head.")):
            assert not torch.allclose(without[name], with_heads[name]), name
        elif name.startswith(("encoder.", "decoder.")):
            torch.testing.assert_close(without[name], with_heads[name], msg=name)


def test_loss_traces_as_one_graph_for_torch_compile(catch_replay) -> None:
    """The GPU path compiles the loss (``--compile``); a graph break would split it and cost a host sync.
    Traced with the eager backend (no code generation, so it runs on any CPU); same loss as eager."""
    torch.manual_seed(0)
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    batch = catch_replay.sample(8, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)
    traced = torch.compile(wm.loss_and_latents, fullgraph=True, backend="eager")
    loss_traced, _, _ = traced(batch)
    loss_eager, _, _ = wm.loss_and_latents(batch)
    torch.testing.assert_close(loss_traced, loss_eager)


def test_cpu_preset_and_document_sizes_run_one_loss() -> None:
    for cfg in (preset("cpu").world_model, WorldModelConfig()):
        wm = WorldModel(cfg, num_actions=4)
        L = cfg.seq_len
        frames = torch.randint(0, 256, (2, L, 64, 64), dtype=torch.uint8)
        from worldmodel.batch import Batch

        b = Batch(
            frames,
            torch.randint(0, 4, (2, L - 1)),
            torch.zeros(2, L - 1),
            torch.zeros(2, L - 1, dtype=torch.bool),
            torch.zeros(2, L - 1, dtype=torch.bool),
            torch.zeros(2, L - 1, dtype=torch.bool),
        )
        loss, _ = wm.compute_loss(b)
        assert torch.isfinite(loss)
        assert wm.encode(frames).shape == (2, L, cfg.encoder.latent_dim)


def test_overfits_a_fixed_batch(catch_replay) -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    trainer = WorldModelTrainer(wm, OptimConfig(lr=2e-3, warmup_updates=10), torch.device("cpu"))
    batch = catch_replay.sample(8, cfg.seq_len, np.random.default_rng(1), rewarded_fraction=0.5)
    first = trainer.update(batch)[0]["world_model/loss"].item()
    for _ in range(250):
        last = trainer.update(batch)[0]["world_model/loss"].item()
    print(f"overfit: loss {first:.3f} -> {last:.4f} ({first / last:.1f}x)")
    assert last < first / 10


@pytest.mark.slow
def test_short_training_beats_copy_and_majority_baselines(catch_replay) -> None:
    """After a short online training, on held-out Catch transitions: the predicted next frame beats
    'copy the last frame' on moving pixels, and the reward head beats the majority class (always 0,
    which scores 0% on rewarded steps). In online Catch runs the reward head first scored on rewarded
    steps after ~850 updates (LESSONS.md: the majority class holds for a long time)."""
    torch.manual_seed(0)
    cfg = preset("cpu").world_model
    wm = WorldModel(cfg, num_actions=3)
    trainer = WorldModelTrainer(wm, OptimConfig(lr=1e-3, warmup_updates=50), torch.device("cpu"))
    rng = np.random.default_rng(0)
    for _ in range(1200):
        trainer.update(catch_replay.sample(16, cfg.seq_len, rng, rewarded_fraction=0.25))
    held_out = random_replay("wm/Catch-v0", steps=300, num_envs=4, seed=123)
    wm.eval()
    with torch.no_grad():
        _, m = wm.compute_loss(held_out.sample(128, cfg.seq_len, rng, rewarded_fraction=0.5))
    pred, copy = m["world_model/next_frame_mse_moving"].item(), m["world_model/copy_last_mse_moving"].item()
    acc = m["world_model/reward_acc_rewarded"].item()
    print(
        f"held-out: moving-pixel MSE predicted {pred:.4f} vs copy-last {copy:.4f}; "
        f"reward accuracy on rewarded steps {acc:.2f} (majority class: 0.00)"
    )
    assert pred < copy
    assert acc > 0.0


def test_imagined_env_steps_in_latent_space(catch_replay) -> None:
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    env = ImaginedEnv(wm, horizon=3)
    ctx = catch_replay.sample(5, cfg.context, np.random.default_rng(0)).frames
    obs = env.reset(ctx)
    assert obs.shape == (5, cfg.context, cfg.encoder.embed_dim)
    for t in range(3):
        obs, r, c, trunc, _ = env.step(torch.zeros(5, dtype=torch.long))
        assert obs.shape == (5, cfg.context, cfg.encoder.embed_dim) and r.shape == (5,)
        assert ((c >= 0) & (c <= 1)).all()
        assert trunc.all() == (t == 2)
    with pytest.raises(ValueError, match="horizon"):
        ImaginedEnv(wm, horizon=0)


def test_base_rates_calibrate_balanced_heads() -> None:
    """Heads trained with balanced weights answer as if both classes were equally common; with the real
    data's base rates set, a 50/50 answer becomes the base rate."""
    wm = WorldModel(small_cfg(), num_actions=3)
    bins = wm.reward_bins
    one = int((bins - torch.log1p(torch.tensor(1.0))).abs().argmin())
    logits = torch.full((1, len(bins)), -30.0)
    logits[0, wm.zero_bin] = logits[0, one] = 0.0  # half reward 0, half reward ~1
    wm.heads = lambda a, b: (logits, torch.zeros(1))  # type: ignore[method-assign]
    wm.set_base_rates(rewarded=0.1, terminal=0.02)
    rew_logits, cont_logit = wm.calibrated_heads(torch.zeros(1, 4), torch.zeros(1, 4))
    p = rew_logits.softmax(-1)[0]
    assert abs(float(p[one]) - 0.1) < 1e-4 and abs(float(p[wm.zero_bin]) - 0.9) < 1e-4
    assert abs(float(torch.sigmoid(cont_logit)) - 0.98) < 1e-4  # continuing is 98% of real transitions


@pytest.mark.parametrize(("head_window", "reader"), [(1, "attention"), (3, "attention"), (3, "mlp")])
def test_calibrated_heads_predict_the_real_rates_on_real_windows(catch_replay, head_window, reader) -> None:
    """After ``calibrate_heads`` the calibrated heads, over the imagined steps run from the same real
    context under the same actions, predict a reward and an end as often on average as asked, whatever
    the untrained heads said; the heads' input statistics are not touched, and the shifts survive a
    state-dict round trip."""
    torch.manual_seed(0)
    cfg = small_cfg()
    cfg.reward.window, cfg.reward.reader = head_window, reader
    wm = WorldModel(cfg, num_actions=3)
    K, D = wm.cfg.context, 2
    batch = catch_replay.sample(32, K + D, np.random.default_rng(0))
    norm_before = {k: v.clone() for k, v in wm.head_input_norm.state_dict().items()}
    for rewarded, ended in ((0.01, 0.05), (0.3, 0.002)):
        fitted = wm.calibrate_heads(batch.frames, batch.actions, rewarded, ended)
        assert float(fitted["reward_shift"]) == pytest.approx(float(wm.head_shifts[0]))
        assert float(fitted["cont_shift"]) == pytest.approx(float(wm.head_shifts[1]))
        env = ImaginedEnv(wm, horizon=D)
        env.reset(batch.frames[:, :K])
        p_reward, p_end = [], []
        for d in range(D):
            window = env.window
            with torch.no_grad():
                z_next = wm.predictor(window, batch.actions[:, K - 1 + d])
                rew_logits, cont_logit = wm.calibrated_heads(*wm.head_inputs(window, z_next[:, 0]))
            p_reward.append(1 - rew_logits.softmax(-1)[:, wm.zero_bin])
            p_end.append(1 - torch.sigmoid(cont_logit))
            env.step(batch.actions[:, K - 1 + d])
        assert float(torch.cat(p_reward).mean()) == pytest.approx(rewarded, rel=1e-3)
        assert float(torch.cat(p_end).mean()) == pytest.approx(ended, rel=1e-3)
    for k, v in wm.head_input_norm.state_dict().items():
        assert torch.equal(v, norm_before[k])
    again = WorldModel(cfg, num_actions=3)
    again.load_state_dict_compat(wm.state_dict())
    assert torch.equal(again.head_shifts, wm.head_shifts)


def test_calibration_weights_pick_the_sequences_the_average_runs_over(catch_replay) -> None:
    """Weights that put everything on one half of the sequences fit the shifts of that half alone."""
    torch.manual_seed(0)
    wm = WorldModel(small_cfg(), num_actions=3)
    batch = catch_replay.sample(32, wm.cfg.context + 1, np.random.default_rng(1))
    frames = batch.frames.clone()
    frames[16:] = 255 - frames[16:]  # a second half the heads see differently
    half = torch.cat([torch.full((16,), 1 / 16), torch.zeros(16)])
    weighted = wm.calibrate_heads(frames, batch.actions, 0.05, 0.1, half, half)
    alone = wm.calibrate_heads(frames[:16], batch.actions[:16], 0.05, 0.1)
    for k in ("reward_shift", "cont_shift"):
        assert float(weighted[k]) == pytest.approx(float(alone[k]), abs=1e-4)
    other = wm.calibrate_heads(frames[16:], batch.actions[16:], 0.05, 0.1)
    assert float(other["cont_shift"]) != pytest.approx(float(alone["cont_shift"]), abs=1e-3)


def test_checkpoints_with_base_rates_load_with_their_bayes_shifts() -> None:
    """World models saved before ``head_shifts`` kept the data's rates as ``base_rates``."""
    wm = WorldModel(small_cfg(), num_actions=3)
    state = {k: v for k, v in wm.state_dict().items() if k != "head_shifts"}
    state["base_rates"] = torch.tensor([0.1, 0.02])
    wm.load_state_dict_compat(state)
    expected = WorldModel(small_cfg(), num_actions=3)
    expected.set_base_rates(0.1, 0.02)
    torch.testing.assert_close(wm.head_shifts, expected.head_shifts)
    assert float(wm.head_shifts[0]) == pytest.approx(float(torch.log(torch.tensor(0.9 / 0.1))))


def test_encoder_hold_keeps_the_encoder_fixed_then_releases_it(catch_replay) -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    trainer = WorldModelTrainer(wm, OptimConfig(warmup_updates=1, encoder_hold_updates=3), torch.device("cpu"))
    rng = np.random.default_rng(0)

    def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
        return [p.detach().clone() for p in module.parameters()]

    enc0, dec0 = snapshot(wm.encoder), snapshot(wm.decoder)
    for _ in range(3):
        trainer.update(catch_replay.sample(8, cfg.seq_len, rng, rewarded_fraction=0.5))
    assert all(torch.equal(a, b) for a, b in zip(enc0, snapshot(wm.encoder), strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(dec0, snapshot(wm.decoder), strict=True))
    trainer.update(catch_replay.sample(8, cfg.seq_len, rng, rewarded_fraction=0.5))
    assert any(not torch.equal(a, b) for a, b in zip(enc0, snapshot(wm.encoder), strict=True))


def test_decoder_reads_standardized_latents(catch_replay) -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    cfg.standardize_decoder_input = True
    wm = WorldModel(cfg, num_actions=3)
    batch = catch_replay.sample(8, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)
    wm.compute_loss(batch)  # training mode: the first batch sets the running statistics
    z = wm.encode(batch.frames).flatten(0, 1)  # (B*L, E)
    assert torch.allclose(wm.decoder_input_norm.mean, z.mean(0).detach(), atol=1e-6)
    wm.eval()
    with torch.no_grad():
        standardized = (z - z.mean(0)) / z.var(0, unbiased=False).sqrt()
        expected = wm.decoder(standardized.unsqueeze(1))[:, 0, 0]
        assert torch.allclose(wm.decode(z), expected, atol=1e-4)


def test_config_round_trip_keeps_the_representation_options() -> None:
    cfg = preset("cpu")
    cfg.world_model.standardize_decoder_input = True
    cfg.optim.encoder_hold_updates = 400
    cfg.world_model.pixel_gain = 3.0
    cfg.world_model.loss.reward_sign_balance = True
    back = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert back == cfg
    old = to_dict(preset("cpu"))
    del old["world_model"]["standardize_decoder_input"], old["optim"]["encoder_hold_updates"]
    del old["world_model"]["pixel_gain"], old["world_model"]["loss"]["reward_sign_balance"]
    del old["world_model"]["loss"]["motion_map"], old["world_model"]["loss"]["motion_map_cells"]
    del old["world_model"]["subtract_background"]
    # Runs written before the options load with them off (as they were trained), whatever the preset is now.
    expected = preset("cpu")
    expected.world_model.pixel_gain, expected.world_model.loss.motion_map = 1.0, 0.0
    expected.world_model.subtract_background = False
    assert from_dict(old) == expected


def test_pixel_gain_brightens_model_pixels_and_clips_at_one() -> None:
    frames = torch.tensor([[0, 40, 100, 255]], dtype=torch.uint8)
    plain = WorldModel(small_cfg(), num_actions=3).to_float(frames)
    cfg = small_cfg()
    cfg.pixel_gain = 3.0
    bright = WorldModel(cfg, num_actions=3).to_float(frames)
    assert torch.allclose(plain, frames.float() / 255)
    assert torch.allclose(bright, torch.tensor([[0.0, 120 / 255, 300 / 255, 1.0]]).clamp(max=1.0))


def test_subtract_background_zeroes_the_field_and_keeps_a_black_one_unchanged() -> None:
    cfg = small_cfg()
    cfg.subtract_background, cfg.pixel_gain = True, 3.0
    wm, plain = WorldModel(cfg, num_actions=3), WorldModel(small_cfg(), num_actions=3)
    grey = torch.full((2, 3, 8, 8), 87, dtype=torch.uint8)  # [B, T, H, W], Pong's field
    grey[0, 1, 2, 3], grey[1, 2, 5, 5] = 236, 50  # brighter and darker objects
    x = wm.to_float(grey)
    assert x.shape == grey.shape and float(x.sum()) == pytest.approx(1.0 + 3 * 37 / 255)
    assert float(x[0, 1, 2, 3]) == 1.0 and float(x[1, 2, 5, 5]) == pytest.approx(3 * 37 / 255)
    black = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    black[0, 0, 1, :] = 30  # a faint object on a black field: as without the option
    assert torch.equal(wm.to_float(black), (plain.to_float(black) * 3).clamp(max=1.0))


def test_pixel_gamma_brightens_faint_pixels_without_clipping() -> None:
    frames = torch.tensor([[0, 30, 87, 236, 255]], dtype=torch.uint8)
    cfg = small_cfg()
    cfg.pixel_gamma = 0.5
    x = WorldModel(cfg, num_actions=3).to_float(frames)
    assert torch.allclose(x, (frames.float() / 255).sqrt())
    assert bool((x[0, 1:-1] > frames[0, 1:-1].float() / 255).all()) and bool((x.diff() > 0).all())  # order kept
    cfg.pixel_gamma = 0.0
    with pytest.raises(ValueError, match="pixel_gamma"):
        cfg.validate()


def test_sign_balance_gives_a_rare_reward_sign_as_much_weight_as_the_common_one(catch_replay) -> None:
    # A Catch policy that catches 9 balls in 10 leaves few misses to learn from.
    rewards = torch.tensor([0.0] * 20 + [1.0] * 9 + [-1.0])
    w = sign_balanced_weights(rewards)
    torch.testing.assert_close(w.mean(), torch.tensor(1.0))
    torch.testing.assert_close(w[rewards < 0].sum(), w[rewards > 0].sum())
    torch.testing.assert_close(w[rewards == 0].sum(), w[rewards != 0].sum())
    one_sign = torch.tensor([0.0] * 20 + [1.0] * 10)
    torch.testing.assert_close(sign_balanced_weights(one_sign)[one_sign > 0].sum(), torch.tensor(15.0))
    # The option keeps the loss one graph for torch.compile.
    cfg = small_cfg()
    cfg.loss.reward_sign_balance = True
    torch.manual_seed(0)
    wm = WorldModel(cfg, num_actions=3)
    batch = catch_replay.sample(8, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)
    traced = torch.compile(wm.loss_and_latents, fullgraph=True, backend="eager")
    torch.testing.assert_close(traced(batch)[0], wm.loss_and_latents(batch)[0])


def test_paid_reward_metrics_read_the_calibrated_head(catch_replay) -> None:
    """At a balanced prior the calibrated head is the trained one; at a sparse prior it pays less on
    unrewarded steps (the zero bin gains the prior's log-odds), and the metrics follow."""
    torch.manual_seed(0)
    wm = WorldModel(small_cfg(), num_actions=3).eval()
    logits = torch.randn(5, wm.reward_bins.numel())
    wm.set_base_rates(0.5, 0.5)
    assert torch.allclose(wm.calibrate_reward(logits), logits)
    batch = catch_replay.sample(8, wm.cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)
    with torch.no_grad():
        balanced = wm.compute_loss(batch)[1]
        wm.set_base_rates(0.001, 0.5)
        sparse = wm.compute_loss(batch)[1]
    assert sparse["world_model/reward_paid_abs_unrewarded"] < balanced["world_model/reward_paid_abs_unrewarded"]
    assert sparse["world_model/reward_acc_rewarded"] == balanced["world_model/reward_acc_rewarded"]
    assert torch.isfinite(sparse["world_model/reward_paid_share_rewarded"])


def test_flatten_latent_world_model_trains_end_to_end(catch_replay) -> None:
    from worldmodel.encoder import EncoderConfig

    cfg = small_cfg()
    cfg.encoder = EncoderConfig(embed_dim=32, depth=1, num_heads=2, pool="flatten", flatten_dim=2)
    E = cfg.encoder.latent_dim
    assert E == 128
    for sub in (cfg.predictor, cfg.decoder, cfg.reward):
        sub.embed_dim = E
    torch.manual_seed(0)
    wm = WorldModel(cfg, num_actions=3)
    batch = catch_replay.sample(4, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)
    loss, _ = wm.compute_loss(batch)
    loss.backward()
    for name, p in wm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert wm.encode(batch.frames).shape == (4, cfg.seq_len, E)
    cfg.predictor.embed_dim = 32
    with pytest.raises(ValueError, match="flatten_dim"):
        WorldModel(cfg, num_actions=3)


def test_dynamics_batch_adds_to_the_predictor_losses_only(catch_replay) -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    rng = np.random.default_rng(0)
    batch = catch_replay.sample(4, cfg.seq_len, rng, rewarded_fraction=0.5)
    extra = catch_replay.sample(6, cfg.seq_len, rng)
    _, plain = wm.compute_loss(batch)
    _, with_extra = wm.compute_loss(batch, dynamics_batch=extra)
    for key in ("current_frame_loss", "next_frame_loss", "reward_loss", "cont_loss"):
        assert torch.allclose(plain[f"world_model/{key}"], with_extra[f"world_model/{key}"]), key
    assert not torch.allclose(plain["world_model/latent_loss"], with_extra["world_model/latent_loss"])
    # The extra sequences are encoded without gradient: only the predictor learns from them.
    cfg.loss.next_frame = cfg.loss.current_frame = cfg.loss.reward = cfg.loss.cont = 0.0
    wm.zero_grad()
    wm.compute_loss(batch, dynamics_batch=extra)[0].backward()
    encoder_grad = sum(p.grad.abs().sum() for p in wm.encoder.parameters() if p.grad is not None)
    assert encoder_grad == 0
    assert all(p.grad is not None for p in wm.predictor.parameters())


def test_heads_can_learn_from_real_transitions_only(catch_replay) -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    cfg.loss.heads_on_predicted = False
    wm = WorldModel(cfg, num_actions=3)
    batch = catch_replay.sample(4, cfg.seq_len, np.random.default_rng(0), rewarded_fraction=0.5)
    _, before = wm.compute_loss(batch)
    with torch.no_grad():
        for p in wm.predictor.parameters():
            p.add_(torch.randn_like(p))
    _, after = wm.compute_loss(batch)
    for key in ("reward_loss", "cont_loss"):
        assert torch.allclose(before[f"world_model/{key}"], after[f"world_model/{key}"]), key
    assert not torch.allclose(before["world_model/latent_loss"], after["world_model/latent_loss"])


def test_normalized_latent_losses_are_in_units_of_the_targets_variance(catch_replay) -> None:
    torch.manual_seed(0)
    cfg = small_cfg()
    wm = WorldModel(cfg, num_actions=3)
    batch = catch_replay.sample(4, cfg.seq_len, np.random.default_rng(0))
    K = cfg.context
    z = wm.encode(batch.frames).detach() * 1e-3  # a latent whose scale has collapsed
    plain = wm._predict(z, batch.actions, None)
    cfg.loss.latent_normalized = True
    normed = wm._predict(z, batch.actions, None)
    var = z[:, K:].var(dim=(0, 1)).mean()
    torch.testing.assert_close(normed.latent_loss, plain.latent_loss / var)
    torch.testing.assert_close(normed.open_loop_loss, plain.open_loop_loss / var)


def test_heads_reading_a_window_train_and_imagine(catch_replay) -> None:
    """With ``reward.window`` W the heads read the W latents up to a transition: the loss (head batch of
    2W frames included) reaches every parameter, imagination runs, and the continue probability of a
    transition depends on the oldest latent of the window, which the pair-reading heads never see."""
    from agent.dyna import sample_world_model_batches

    torch.manual_seed(0)
    cfg = preset("debug")
    K = cfg.world_model.context
    cfg.world_model.reward.window = K
    wm = WorldModel(cfg.world_model, num_actions=3)
    batch, head_batch, _ = sample_world_model_batches(catch_replay, cfg, np.random.default_rng(0), "cpu")
    assert head_batch is not None and head_batch.frames.shape[1] == 2 * K
    loss, _ = wm.compute_loss(batch, head_batch)
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in wm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    window = wm.encode(batch.frames[:2, :K]).detach()
    pred = wm.imagine_step(window, torch.zeros(2, dtype=torch.long))
    assert pred.latent.shape == (2, 1, window.shape[-1]) and pred.cont.shape == pred.reward.shape == (2,)
    older = window.clone()
    older[:, 0] = torch.randn_like(older[:, 0])
    z_next = pred.latent[:, 0]
    cont = lambda m, w: m.calibrated_heads(*m.head_inputs(w, z_next))[1]  # noqa: E731
    assert not torch.allclose(cont(wm, window), cont(wm, older))
    pair = WorldModel(small_cfg(), num_actions=3)
    torch.testing.assert_close(cont(pair, window), cont(pair, older))
    cfg.world_model.reward.window = K + 1
    with pytest.raises(ValueError, match="reward.window"):
        WorldModel(cfg.world_model, num_actions=3)


def test_mlp_reader_heads_train_calibrate_and_load(catch_replay) -> None:
    """Heads with ``reward.reader = "mlp"`` in the world model: the loss reaches every parameter, the reader
    survives a config round trip, and a run written before the option loads with the document's attention
    heads (calibration: ``test_calibrated_heads_predict_the_real_rates_on_real_windows``)."""
    from agent.dyna import sample_world_model_batches

    torch.manual_seed(0)
    cfg = preset("debug")
    cfg.world_model.reward.reader, cfg.world_model.reward.window = "mlp", 2
    wm = WorldModel(cfg.world_model, num_actions=3)
    batch, head_batch, _ = sample_world_model_batches(catch_replay, cfg, np.random.default_rng(0), "cpu")
    loss, _ = wm.compute_loss(batch, head_batch)
    loss.backward()
    for name, p in wm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    back = from_dict(json.loads(json.dumps(to_dict(cfg))))
    assert back.world_model.reward.reader == "mlp"
    old = to_dict(cfg)
    del old["world_model"]["reward"]["reader"]
    assert from_dict(old).world_model.reward.reader == "attention"


def test_predictor_reading_fewer_latents_than_the_heads(catch_replay) -> None:
    """``predictor.context`` Kp < K: the predictor reads only the last Kp latents of a window while the
    heads read ``reward.window`` = K; the dynamics batch then holds Kp + P frames, and the loss still
    reaches every parameter."""
    from agent.dyna import sample_world_model_batches

    torch.manual_seed(0)
    cfg = preset("debug")
    K, P = cfg.world_model.context, cfg.world_model.pred_steps
    cfg.world_model.reward.window = K
    cfg.world_model.predictor.context = K - 1
    cfg.dynamics_batch_size = 4
    wm = WorldModel(cfg.world_model, num_actions=3)
    batch, head_batch, dyn = sample_world_model_batches(catch_replay, cfg, np.random.default_rng(0), "cpu")
    assert batch.frames.shape[1] == K + P and dyn is not None and dyn.frames.shape[1] == K - 1 + P
    loss, metrics = wm.compute_loss(batch, head_batch, dyn)
    assert torch.isfinite(loss) and torch.isfinite(metrics["world_model/latent_loss"])
    loss.backward()
    for name, p in wm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name

    # The one-step and open-loop predictions are the main batch's last P transitions, read from K-frame windows.
    with torch.no_grad():
        z = wm.encode(batch.frames)
        dyn_out = wm._predict(z, batch.actions, None)
        window = z[:, :K]
        for p in range(P):
            one = wm.predictor(z[:, p : K + p], batch.actions[:, K - 1 + p])[:, 0]
            torch.testing.assert_close(dyn_out.z_pred.view(len(z), P, -1)[:, p], one)
            window = torch.cat([window[:, 1:], wm.predictor(window, batch.actions[:, K - 1 + p])], dim=1)
            torch.testing.assert_close(dyn_out.z_open[:, p], window[:, -1])

    window = wm.encode(batch.frames[:2, :K]).detach()
    older = window.clone()
    older[:, 0] = torch.randn_like(older[:, 0])
    action = torch.zeros(2, dtype=torch.long)
    torch.testing.assert_close(wm.imagine_step(window, action).latent, wm.imagine_step(older, action).latent)
    torch.testing.assert_close(wm.predictor(window, action), wm.predictor(window[:, 1:], action))
    cfg.world_model.predictor.context = K + 1
    with pytest.raises(ValueError, match="predictor.context"):
        WorldModel(cfg.world_model, num_actions=3)
