"""Shapes, causal masking, relative-position RoPE and gradient flow of the world-model parts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worldmodel.decoder import DecoderConfig, HybridConvTransformerDecoder
from worldmodel.encoder import EncoderConfig, FactorizedPatchEmbed, VideoViT
from worldmodel.layers import (
    MultiHeadSelfAttention,
    RotaryEmbedding1D,
    RotaryEmbedding2D,
    TransformerBlock,
    apply_rope,
)
from worldmodel.predictor import LatentDynamicsPredictor, PredictorConfig
from worldmodel.reward_predictor import MLPTransitionHead, RewardConfig, RewardPredictor, transition_head

NUM_ACTIONS = 6

SIZES = {
    "default": dict(
        encoder=EncoderConfig(),
        predictor=PredictorConfig(),
        decoder=DecoderConfig(),
        reward=RewardConfig(),
    ),
    "cpu": dict(
        encoder=EncoderConfig(embed_dim=64, depth=2, num_heads=2),
        predictor=PredictorConfig(embed_dim=64, depth=2, num_heads=2),
        decoder=DecoderConfig(embed_dim=64, channels=(32, 16, 8)),
        reward=RewardConfig(embed_dim=64, hidden_dim=64, num_heads=2),
    ),
}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def test_encoder_document_shape() -> None:
    encoder = VideoViT(EncoderConfig()).eval()
    with torch.no_grad():
        z = encoder(torch.rand(64, 1, 6, 64, 64))
    assert z.shape == (64, 6, 128)
    assert torch.isfinite(z).all()


@pytest.mark.parametrize("size", SIZES)
def test_shapes(size: str) -> None:
    cfg = SIZES[size]
    B, T, E = 4, 6, cfg["encoder"].embed_dim
    patches = FactorizedPatchEmbed(1, E, 8)(torch.rand(B, 1, T, 64, 64))
    assert patches.shape == (B, T, 64, E)

    z = VideoViT(cfg["encoder"])(torch.rand(B, 1, T, 64, 64))
    assert z.shape == (B, T, E)

    predictor = LatentDynamicsPredictor(cfg["predictor"], NUM_ACTIONS)
    assert predictor(z, torch.randint(0, NUM_ACTIONS, (B,))).shape == (B, 1, E)
    assert predictor.transformer_outputs(z).shape == (B, T, E)

    frame = HybridConvTransformerDecoder(cfg["decoder"])(torch.randn(B, 1, E))
    assert frame.shape == (B, 1, 1, 64, 64)

    reward = RewardPredictor(cfg["reward"])(z, torch.randn(B, T, E))
    assert reward.shape == (B, 1, 1)
    logits = RewardPredictor(RewardConfig(embed_dim=E, out_dim=255))(z, z)
    assert logits.shape == (B, 1, 255)


def test_layer_shapes() -> None:
    x = torch.randn(3, 10, 32)
    rope = RotaryEmbedding1D(16)(10)
    assert rope[0].shape == rope[1].shape == (10, 16)
    assert RotaryEmbedding2D(16)(2, 5)[0].shape == (10, 16)
    attn = MultiHeadSelfAttention(32, 2, causal=False)
    assert attn(x, rope).shape == (3, 10, 32)
    assert attn.attention_scores(x, rope).shape == (3, 2, 10, 10)
    assert TransformerBlock(32, 2, causal=True)(x, None).shape == (3, 10, 32)


def test_decoder_rejects_mismatched_channels() -> None:
    with pytest.raises(ValueError, match="upsampling blocks"):
        HybridConvTransformerDecoder(DecoderConfig(channels=(64, 32)))
    HybridConvTransformerDecoder(DecoderConfig(frame_size=32, channels=(64, 32)))


def test_predictor_rejects_long_context() -> None:
    predictor = LatentDynamicsPredictor(PredictorConfig(embed_dim=32, depth=1, num_heads=2, max_context=4), 3)
    predictor(torch.randn(2, 4, 32), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="max_context"):
        predictor(torch.randn(2, 5, 32), torch.zeros(2, dtype=torch.long))


def test_predictor_causal_mask() -> None:
    predictor = LatentDynamicsPredictor(SIZES["cpu"]["predictor"], NUM_ACTIONS).eval()
    tokens = torch.randn(2, 8, 64)
    with torch.no_grad():
        base = predictor.transformer_outputs(tokens)
        for t in range(8):
            changed = tokens.clone()
            changed[:, t] += torch.randn(2, 64)
            out = predictor.transformer_outputs(changed)
            torch.testing.assert_close(out[:, :t], base[:, :t], rtol=0, atol=1e-5)
            assert (out[:, t:] - base[:, t:]).abs().amax(dim=-1).min() > 1e-3


def test_predictor_action_reaches_prediction() -> None:
    predictor = LatentDynamicsPredictor(SIZES["cpu"]["predictor"], NUM_ACTIONS).eval()
    z = torch.randn(2, 5, 64)
    with torch.no_grad():
        a = predictor(z, torch.tensor([0, 0]))
        b = predictor(z, torch.tensor([1, 1]))
    assert not torch.allclose(a, b)


def test_apply_rope_is_a_rotation() -> None:
    x = torch.randn(2, 3, 7, 16)
    cos, sin = RotaryEmbedding2D(16).at_positions(torch.randint(0, 8, (7,)), torch.randint(0, 8, (7,)))
    torch.testing.assert_close(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))
    cos0, sin0 = RotaryEmbedding1D(16).at_positions(torch.zeros(7))
    torch.testing.assert_close(apply_rope(x, cos0, sin0), x)


def test_encoder_rope_is_relative_2d() -> None:
    encoder = VideoViT(SIZES["cpu"]["encoder"])
    attn = encoder.blocks[0].attn
    x = torch.randn(1, 2, 64)  # the contents of two patches

    def score(p1: tuple[int, int], p2: tuple[int, int]) -> torch.Tensor:
        rows, cols = torch.tensor([p1[0], p2[0]]), torch.tensor([p1[1], p2[1]])
        with torch.no_grad():
            return attn.attention_scores(x, encoder.rope.at_positions(rows, cols))[0, :, 0, 1]

    base = score((1, 2), (4, 7))
    for d in [(1, 0), (0, 1), (3, -2), (-1, -2)]:
        shifted = score((1 + d[0], 2 + d[1]), (4 + d[0], 7 + d[1]))
        torch.testing.assert_close(shifted, base, rtol=1e-4, atol=1e-4)
    # Moving one patch by a row or by a column changes the score: both axes are encoded.
    assert not torch.allclose(score((1, 2), (5, 7)), base, atol=1e-3)
    assert not torch.allclose(score((1, 2), (4, 6)), base, atol=1e-3)


def test_predictor_rope_is_relative_1d() -> None:
    predictor = LatentDynamicsPredictor(SIZES["cpu"]["predictor"], NUM_ACTIONS)
    attn = predictor.blocks[0].attn
    x = torch.randn(1, 2, 64)

    def score(p1: int, p2: int) -> torch.Tensor:
        with torch.no_grad():
            return attn.attention_scores(x, predictor.rope.at_positions(torch.tensor([p1, p2])))[0, :, 0, 1]

    base = score(0, 3)
    for d in [1, 5, 20]:
        torch.testing.assert_close(score(d, 3 + d), base, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(score(0, 4), base, atol=1e-3)


def _assert_grads_reach_every_parameter(module: nn.Module, loss: torch.Tensor) -> None:
    loss.backward()
    for name, param in module.named_parameters():
        assert param.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(param.grad).all(), f"non-finite gradient for {name}"
        assert param.grad.abs().sum() > 0, f"zero gradient for {name}"


def test_gradients_reach_every_parameter() -> None:
    cfg = SIZES["cpu"]
    B, T, E = 2, 4, 64

    encoder = VideoViT(cfg["encoder"])
    _assert_grads_reach_every_parameter(encoder, encoder(torch.rand(B, 1, T, 64, 64)).pow(2).mean())

    predictor = LatentDynamicsPredictor(cfg["predictor"], NUM_ACTIONS)
    actions = torch.arange(NUM_ACTIONS)  # every action row gets a gradient
    pred = predictor(torch.randn(NUM_ACTIONS, T, E), actions)
    _assert_grads_reach_every_parameter(predictor, pred.pow(2).mean())

    decoder = HybridConvTransformerDecoder(cfg["decoder"])
    frame = decoder(torch.randn(B, 1, E))
    _assert_grads_reach_every_parameter(decoder, (frame - torch.rand_like(frame)).pow(2).mean())

    head = RewardPredictor(cfg["reward"])
    _assert_grads_reach_every_parameter(head, head(torch.randn(B, T, E), torch.randn(B, T, E)).pow(2).mean())


def test_flatten_pool_keeps_the_patch_layout() -> None:
    cfg = EncoderConfig(embed_dim=32, depth=1, num_heads=2, pool="flatten", flatten_dim=4)
    assert cfg.latent_dim == 64 * 4
    encoder = VideoViT(cfg)
    z = encoder(torch.rand(2, 1, 3, 64, 64))
    assert z.shape == (2, 3, 256)
    _assert_grads_reach_every_parameter(encoder, z.pow(2).mean())
    # Each patch owns its slice of the latent: shuffling the patch tokens changes a flattened latent,
    # while a mean over patches cannot tell the shuffled tokens from the originals.
    with torch.no_grad():
        tokens = encoder.norm(torch.randn(1, 1, 64, 32))
        shuffled = tokens[:, :, torch.randperm(64)]
        assert torch.allclose(tokens.mean(2), shuffled.mean(2), atol=1e-6)
        flat = lambda t: encoder.flatten_proj(t).flatten(2)  # noqa: E731
        assert flat(tokens).shape == (1, 1, 256)
        assert not torch.allclose(flat(tokens), flat(shuffled))


def test_document_form_is_the_default_pool() -> None:
    cfg = EncoderConfig()
    assert cfg.pool == "mean" and cfg.latent_dim == cfg.embed_dim == 128
    with pytest.raises(ValueError, match="pool"):
        VideoViT(EncoderConfig(pool="max"))  # type: ignore[arg-type]


def test_residual_predictor_starts_by_holding_the_last_latent() -> None:
    cfg = PredictorConfig(embed_dim=32, depth=1, num_heads=2, residual=True)
    predictor = LatentDynamicsPredictor(cfg, NUM_ACTIONS)
    z = torch.randn(3, 4, 32)
    actions = torch.tensor([0, 1, 2])
    assert torch.equal(predictor(z, actions), z[:, -1:])
    nn.init.normal_(predictor.head.weight, std=0.02)  # as after a first update
    _assert_grads_reach_every_parameter(predictor, predictor(z, torch.arange(3)).pow(2).mean())
    assert not torch.allclose(predictor(z, actions), z[:, -1:])


def test_mlp_reader_reads_the_same_inputs_in_order() -> None:
    """``reward.reader = "mlp"``: the head's inputs and output shape are the document's, each position has
    its own weights (a reversed window reads differently), gradients reach every parameter; the document's
    attention form stays the default."""
    B, T, E = 3, 4, 32
    z_t, z_next = torch.randn(B, T, E), torch.randn(B, T, E)
    assert isinstance(transition_head(RewardConfig(embed_dim=E)), RewardPredictor)
    head = transition_head(RewardConfig(embed_dim=E, hidden_dim=16, out_dim=5, window=T, reader="mlp"))
    assert isinstance(head, MLPTransitionHead)
    out = head(z_t, z_next)
    assert out.shape == (B, 1, 5)
    assert not torch.allclose(out, head(z_t.flip(1), z_next.flip(1)), atol=1e-4)
    _assert_grads_reach_every_parameter(head, out.pow(2).mean())
    with pytest.raises(ValueError, match="window"):
        head(z_t[:, 1:], z_next[:, 1:])
    with pytest.raises(ValueError, match="reader"):
        transition_head(RewardConfig(reader="lstm"))  # type: ignore[arg-type]


def test_reward_predictor_window_reads_the_order_of_its_latents() -> None:
    """ARCHITECTURE.md's head reads sequences without order: attention over a shuffled window gives the
    same answer. With ``window`` each position has its own embedding, so it can tell when something
    happened (on Breakout the ball vanishes 3-6 frames before a lost life)."""
    B, T, E = 3, 4, 32
    z_t, z_next = torch.randn(B, T, E), torch.randn(B, T, E)
    flip = lambda z: z.flip(1)  # noqa: E731
    plain = RewardPredictor(RewardConfig(embed_dim=E, hidden_dim=32, num_heads=2))
    torch.testing.assert_close(plain(z_t, z_next), plain(flip(z_t), flip(z_next)))
    head = RewardPredictor(RewardConfig(embed_dim=E, hidden_dim=32, num_heads=2, out_dim=5, window=T))
    out = head(z_t, z_next)
    assert out.shape == (B, 1, 5)
    assert not torch.allclose(out, head(flip(z_t), flip(z_next)), atol=1e-4)
    _assert_grads_reach_every_parameter(head, out.pow(2).mean())
    with pytest.raises(ValueError, match="window"):
        head(z_t[:, 1:], z_next[:, 1:])
