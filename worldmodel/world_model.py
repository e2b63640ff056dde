"""The world model: encoder, latent dynamics, decoder, reward and continue heads, and their losses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from worldmodel.batch import Batch
from worldmodel.decoder import DecoderConfig, HybridConvTransformerDecoder
from worldmodel.encoder import EncoderConfig, VideoViT
from worldmodel.layers import RunningStandardizer
from worldmodel.motion_map import MotionMapHead, arrival_map, spatial_cross_entropy
from worldmodel.predictor import LatentDynamicsPredictor, PredictorConfig
from worldmodel.reward_predictor import RewardConfig, RewardPredictor
from worldmodel.twohot import make_bins, twohot, twohot_decode


@dataclass
class LossConfig:
    """Weights and settings of the world-model loss."""

    next_frame: float = 1.0
    """Weight of the next-frame reconstruction (predictor -> decoder), the document's training signal."""
    current_frame: float = 1.0
    """Weight of reconstructing the current frame from its own latent (keeps every latent decodable)."""
    latent: float = 1.0
    """Weight of pulling the predicted latent toward the (stop-gradient) encoding of the real next frame."""
    reward: float = 1.0
    """Weight of the two-hot reward cross-entropy."""
    cont: float = 1.0
    """Weight of the continue (termination) binary cross-entropy."""
    open_loop: float = 1.0
    """Weight of the latent loss of P predictions chained open loop (each fed back as context), as
    imagination chains them; 0 trains the predictor on real context only."""
    moving_pixel_weight: float = 20.0
    """Extra weight on pixels that change between consecutive frames or differ from the batch's
    static background: plain MSE ignores a small ball."""
    moving_threshold: float = 0.05
    """A pixel 'moves' when its value in [0, 1] changes by more than this between frames."""
    foreground: Literal["batch", "sequence"] = "batch"
    """Background the foreground pixels are measured against: "batch" (per-pixel median of every frame
    in the batch) or "sequence" (of each sequence's own frames, so bricks and score that stay put within
    a sequence count as background and the ball and a paddle that moved count as foreground)."""
    reward_sign_balance: bool = False
    """Inside the rewarded class of the reward loss, positive and negative rewards share its weight
    equally. Without it, as the policy improves one sign grows rare in replay (on Catch the misses):
    a seed whose imagination judged misses at only -0.24 to -0.62 (catches +0.38 to +0.90) stalled
    below the target. Off: on Catch (cpu preset, seeds 0-2) it took that seed to 0.9 and kept
    another from it, and evaluated at 0.79 on average against 0.91 without it."""
    motion_map: float = 0.0
    """Weight of the motion-map loss (``worldmodel/motion_map.py``): every latent places, as a
    cross-entropy over coarse cells, where pixels brightened since the previous frame. 0 = off (no head)."""
    motion_map_predicted: float = 0.0
    """Weight of the same loss on the predictor's open-loop latents (the P-step chain imagination runs),
    read by the motion-map head with its weights held fixed: the predictor must carry the objects to
    where they arrive next. Needs ``motion_map > 0``. 0 = off."""
    motion_map_cells: int = 16
    """The motion map is ``cells x cells`` (16: 4x4-pixel cells at 64x64)."""
    reward_bins: int = 65
    """Two-hot bins of the reward head (a scale-robust target for Atari's varied reward sizes)."""
    reward_limit: float = 8.0
    """Two-hot reward bins span [-limit, limit] in symlog space (symlog(3000) ~ 8)."""


@dataclass
class WorldModelConfig:
    """Sizes of every component; the defaults are ARCHITECTURE.md's example sizes."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    predictor: PredictorConfig = field(default_factory=PredictorConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    context: int = 6
    """Frames of history the predictor sees (K)."""
    pred_steps: int = 1
    """Next-frame predictions trained per sampled sequence (P); sequences hold K + P frames."""
    standardize_decoder_input: bool = False
    """Decode latents standardized by a running per-feature mean and variance. The mean over patches
    leaves frame-to-frame differences ~60x smaller than the latent's common offset (Breakout, fresh
    cpu-size encoder), and a decoder reading them raw draws one average frame. Off: a whole Catch run
    with it (seed 0, cpu preset) ended near random (-0.52 against the default's 0.86)."""

    pixel_gain: float = 1.0
    """Frames enter the model (encoder input and reconstruction targets alike) as
    ``min(1, gain * pixel / 255)``. Above 1 it brightens faint objects: Breakout's ball, area-resized
    to 64x64, is a ~3-pixel blob at 30-100 of 255. At gain 3 the cpu-size encoder, trained supervised
    on the ball's position, found it within 1,000 steps (at gain 1 it did not); trained by the
    world-model losses, it did only together with the motion-map loss (Breakout, seed 0, 1,500 updates;
    either alone did not): the ``cpu`` preset uses both."""

    @property
    def seq_len(self) -> int:
        return self.context + self.pred_steps

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the world model cannot use; fields are named as backticked
        config paths (the CLI turns them into its flags)."""
        E = self.encoder.embed_dim
        for name, sub in (("predictor", self.predictor), ("decoder", self.decoder), ("reward", self.reward)):
            if sub.embed_dim != E:
                raise ValueError(f"`{name}.embed_dim` ({sub.embed_dim}) must equal `encoder.embed_dim` ({E})")
        loss = self.loss
        if loss.foreground not in ("batch", "sequence"):
            raise ValueError(f"`loss.foreground` must be 'batch' or 'sequence', got {loss.foreground!r}")
        if loss.motion_map < 0 or not 1 <= loss.motion_map_cells <= self.encoder.frame_size:
            raise ValueError(
                f"`loss.motion_map` must be >= 0 (0 = off) and `loss.motion_map_cells` in "
                f"1..{self.encoder.frame_size}, got {loss.motion_map} and {loss.motion_map_cells}"
            )
        if loss.motion_map_predicted < 0 or (loss.motion_map_predicted > 0 and loss.motion_map <= 0):
            raise ValueError("`loss.motion_map_predicted` must be >= 0, and above 0 only with `loss.motion_map` > 0")
        if self.pixel_gain < 1.0:
            raise ValueError(
                f"`pixel_gain` must be >= 1 (pixels are scaled up and clipped at 1), got {self.pixel_gain}"
            )
        if self.context < 1 or self.pred_steps < 1:
            raise ValueError(f"`context` and `pred_steps` must be at least 1, got {self.context} and {self.pred_steps}")
        if self.context > self.predictor.max_context:
            raise ValueError(
                f"`context` ({self.context}) exceeds `predictor.max_context` ({self.predictor.max_context})"
            )


@dataclass
class Prediction:
    """One imagined step: the next latent, its reward and the probability that the episode goes on."""

    latent: torch.Tensor  # (B, 1, E)
    reward: torch.Tensor  # (B,)
    cont: torch.Tensor  # (B,) in [0, 1]


def moving_mask(prev: torch.Tensor, nxt: torch.Tensor, threshold: float) -> torch.Tensor:
    """Pixels that change between two frames in [0, 1], grown by one pixel: ``[..., H, W]`` float."""
    changed = ((nxt - prev).abs() > threshold).float()
    shape = changed.shape
    grown = F.max_pool2d(changed.reshape(-1, 1, *shape[-2:]), 3, stride=1, padding=1)
    return grown.reshape(shape)


def foreground_mask(
    frames: torch.Tensor, target: torch.Tensor, threshold: float, per_sequence: bool = False
) -> torch.Tensor:
    """Pixels of ``target`` ``[N, H, W]`` that differ from a per-pixel median of ``frames`` ``[B, L, H, W]``
    (an estimate of the static background): of the whole batch, or with ``per_sequence`` of each
    sequence's ``L`` frames, target ``n`` then belonging to sequence ``n // (N / B)``."""
    if per_sequence:
        background = frames.median(dim=1).values  # (B, H, W)
        background = background.repeat_interleave(target.shape[0] // frames.shape[0], dim=0)  # (N, H, W)
    else:
        background = frames.flatten(0, -3).median(dim=0).values  # (H, W)
    return ((target - background).abs() > threshold).float()


def sign_balanced_weights(rewards: torch.Tensor) -> torch.Tensor:
    """:func:`balanced_weights` of rewarded vs unrewarded ``[N]``, with the rewarded half split equally
    between positive and negative rewards when both occur; mean weight is 1."""
    w = balanced_weights(rewards != 0)
    pos, neg = rewards > 0, rewards < 0
    n_pos, n_neg = pos.sum(), neg.sum()
    n_rew = n_pos + n_neg
    scale = torch.where(pos, n_rew / (2 * n_pos.clamp(min=1)), torch.where(neg, n_rew / (2 * n_neg.clamp(min=1)), 1.0))
    return torch.where((n_pos > 0) & (n_neg > 0), w * scale, w)


def balanced_weights(is_positive: torch.Tensor) -> torch.Tensor:
    """Per-sample weights that give both classes of ``is_positive`` (bool ``[N]``) half the total
    weight, so a rare class is not drowned by the majority; mean weight is 1."""
    n = is_positive.numel()
    pos = is_positive.float()
    count = pos.sum()
    balanced = pos * (n / (2 * count.clamp(min=1.0))) + (1 - pos) * (n / (2 * (n - count).clamp(min=1.0)))
    # torch.where rather than an if: no host sync, and torch.compile keeps one graph.
    return torch.where((count > 0) & (count < n), balanced, torch.ones_like(pos))


class WorldModel(nn.Module):
    """VideoViT encoder + LatentDynamicsPredictor + HybridConvTransformerDecoder + RewardPredictor,
    plus a continue head (a second RewardPredictor with one logit) so imagined episodes can end."""

    def __init__(self, cfg: WorldModelConfig, num_actions: int) -> None:
        super().__init__()
        cfg.validate()
        E = cfg.encoder.embed_dim
        self.cfg = cfg
        self.num_actions = num_actions
        self.encoder = VideoViT(cfg.encoder)
        self.predictor = LatentDynamicsPredictor(cfg.predictor, num_actions)
        self.decoder = HybridConvTransformerDecoder(cfg.decoder)
        self.reward_head = RewardPredictor(RewardConfig(**{**vars(cfg.reward), "out_dim": cfg.loss.reward_bins}))
        self.cont_head = RewardPredictor(RewardConfig(**{**vars(cfg.reward), "out_dim": 1}))
        self.motion_head = MotionMapHead(E, cfg.loss.motion_map_cells) if cfg.loss.motion_map > 0 else None
        self.register_buffer("reward_bins", make_bins(cfg.loss.reward_bins, cfg.loss.reward_limit), persistent=False)
        self.zero_bin = int(self.reward_bins.abs().argmin())
        # The heads learn with class-balanced weights, i.e. as if rewarded and unrewarded (terminal and
        # continuing) transitions were equally common. Imagination shifts their logits by the real data's
        # prior log-odds (Bayes' rule), so expected rewards and continue probabilities are calibrated:
        # without it, Breakout's imagined reward was ~0.45 on every step.
        self.register_buffer("base_rates", torch.tensor([0.5, 0.5]))  # (rewarded, terminal) fractions
        self.head_input_norm = RunningStandardizer(E)
        # eps well below the ~1e-4 per-feature variance of a fresh encoder's latents.
        self.decoder_input_norm = RunningStandardizer(E, eps=1e-8)

    def to_float(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames -> the model's pixels in [0, 1] (see ``WorldModelConfig.pixel_gain``)."""
        x = frames.float() / 255.0
        return x if self.cfg.pixel_gain == 1.0 else (x * self.cfg.pixel_gain).clamp(max=1.0)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[B, T, H, W]`` -> latents ``[B, T, E]``."""
        return self.encoder(self.to_float(frames).unsqueeze(1))

    def decode(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """Latents ``[B, E]`` -> frames ``[B, H, W]`` in (roughly) [0, 1]; ``frozen`` holds the decoder's
        weights fixed (gradients reach ``z`` only)."""
        if self.cfg.standardize_decoder_input:
            z = self.decoder_input_norm(z)
        if frozen:
            weights = {name: p.detach() for name, p in self.decoder.named_parameters()}
            return torch.func.functional_call(self.decoder, weights, (z.unsqueeze(1),))[:, 0, 0]
        return self.decoder(z.unsqueeze(1))[:, 0, 0]

    def heads(self, z_t: torch.Tensor, z_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward logits ``[B, bins]`` and continue logits ``[B]`` of transitions ``z_t -> z_next`` ``[B, E]``."""
        a, b = self.head_input_norm(z_t).unsqueeze(1), self.head_input_norm(z_next).unsqueeze(1)
        return self.reward_head(a, b)[:, 0], self.cont_head(a, b)[:, 0, 0]

    @staticmethod
    def windows(latents: torch.Tensor, size: int) -> torch.Tensor:
        """Every window of ``size`` consecutive latents: ``[B, L, E]`` -> ``[B * (L - size + 1), size, E]``."""
        return rearrange(latents.unfold(1, size, 1), "b n e k -> (b n) k e")

    @torch.no_grad()
    def predict_next_frame(self, context: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """uint8 context frames ``[B, K, H, W]`` and the action taken at the last ``[B]`` -> the predicted
        next frame ``[B, H, W]`` in [0, 1] (encode, one predictor step, decode)."""
        z_next = self.predictor(self.encode(context), action)[:, 0]
        return self.decode(z_next).clamp(0, 1)

    def set_base_rates(self, rewarded: float, terminal: float) -> None:
        """The fractions of real transitions with a non-zero reward and with a (life-loss) terminal."""
        self.base_rates.copy_(torch.tensor([rewarded, terminal]).clamp(1e-4, 1 - 1e-4))

    def load_state_dict_compat(self, state_dict: dict[str, torch.Tensor]) -> None:
        """``load_state_dict``; checkpoints written before ``base_rates`` existed load with 0.5 (no shift),
        and those from before the heads' input standardization with an identity one (how they were trained)."""
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        optional = {"base_rates"} | {
            f"{norm}.{k}" for norm in ("head_input_norm", "decoder_input_norm") for k in ("mean", "var", "initialized")
        }
        if unexpected or set(missing) - optional:
            raise RuntimeError(f"world-model state does not match: missing {missing}, unexpected {unexpected}")

    def calibrated_heads(self, z_t: torch.Tensor, z_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`heads` with logits shifted from the balanced training prior to ``base_rates``."""
        rew_logits, cont_logit = self.heads(z_t, z_next)
        terminal = self.base_rates[1]
        return self.calibrate_reward(rew_logits), cont_logit + torch.log((1 - terminal) / terminal)

    def calibrate_reward(self, rew_logits: torch.Tensor) -> torch.Tensor:
        """Reward logits ``[N, bins]`` of the balanced training prior -> logits at the real data's rewarded fraction."""
        rewarded = self.base_rates[0]
        shift = torch.zeros_like(self.reward_bins)
        shift[self.zero_bin] = torch.log((1 - rewarded) / rewarded)
        return rew_logits + shift

    @torch.no_grad()
    def imagine_step(self, window: torch.Tensor, action: torch.Tensor) -> Prediction:
        """Latent window ``[B, K, E]`` and actions ``[B]`` -> the next latent, reward and continue probability."""
        z_next = self.predictor(window, action)  # (B, 1, E)
        rew_logits, cont_logit = self.calibrated_heads(window[:, -1], z_next[:, 0])
        return Prediction(z_next, twohot_decode(rew_logits, self.reward_bins), torch.sigmoid(cont_logit))

    def compute_loss(
        self, batch: Batch, head_batch: Batch | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of ``K + P`` frame sequences; metrics are detached tensors. ``head_batch``
        (optional, sequences of any length >= 2) adds real transitions for the reward and continue heads
        only: encoded without gradient, so they cost an encoder pass and no decoding."""
        loss, metrics, _ = self.loss_and_latents(batch, head_batch)
        return loss, metrics

    def loss_and_latents(
        self, batch: Batch, head_batch: Batch | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`compute_loss` plus the batch's detached latents ``[B, K+P, E]``, which imagination
        reuses as start states instead of encoding frames a second time."""
        cfg, lc = self.cfg, self.cfg.loss
        K, P = cfg.context, cfg.pred_steps
        B, L, H, W = batch.frames.shape
        if L != K + P:
            raise ValueError(f"batch has sequences of {L} frames, the world model trains on K+P={K + P}")
        x = self.to_float(batch.frames)  # (B, L, H, W)
        z = self.encoder(x.unsqueeze(1))  # (B, L, E)
        if self.training and self.cfg.standardize_decoder_input:
            self.decoder_input_norm.update(z)

        # P windows of K latents per sequence, each predicting the latent that follows it.
        ctx = torch.stack([z[:, p : p + K] for p in range(P)], dim=1)  # (B, P, K, E)
        ctx = rearrange(ctx, "b p k e -> (b p) k e")
        act = rearrange(batch.actions[:, K - 1 : K - 1 + P], "b p -> (b p)")
        z_now = rearrange(z[:, K - 1 : K - 1 + P], "b p e -> (b p) e")
        z_next = rearrange(z[:, K : K + P], "b p e -> (b p) e")

        # Decoding dominates the update's cost (cross-attention at 64x64). The encoder and decoder learn
        # from pixels alone, as an autoencoder on two frames per sequence (LESSONS.md: other losses
        # flowing into the encoder early slowed or destroyed its picture of small objects). The next
        # frame predicted by the last window is decoded with the decoder's weights held fixed and the
        # context detached, so it trains only the predictor (blurry early predictions would otherwise
        # teach the decoder to draw an average frame without the ball).
        x_now, x_next = x[:, K + P - 2], x[:, K + P - 1]
        ae_idx = [max(0, K + P - 4), K + P - 2]
        ae_hat = self.decode(rearrange(z[:, ae_idx], "b n e -> (b n) e"))  # (2B, H, W)
        ae_real = rearrange(x[:, ae_idx], "b n h w -> (b n) h w")
        ae_prev = rearrange(x[:, [max(0, i - 1) for i in ae_idx]], "b n h w -> (b n) h w")
        z_pred_sg = self.predictor(ctx.detach(), act)[:, 0]  # (B*P, E)
        z_pred_last = rearrange(z_pred_sg, "(b p) e -> b p e", p=P)[:, -1]
        next_hat = self.decode(z_pred_last, frozen=True)  # (B, H, W)
        move_next = moving_mask(x_now, x_next, lc.moving_threshold)
        move_now = moving_mask(ae_prev, ae_real, lc.moving_threshold)
        # A still paddle does not move but matters as much as the ball: weight foreground pixels too.
        per_seq = lc.foreground == "sequence"
        fg_next = foreground_mask(x, x_next, lc.moving_threshold, per_seq)
        fg_now = foreground_mask(x, ae_real, lc.moving_threshold, per_seq)
        next_err = (next_hat - x_next).square()
        now_err = (ae_hat - ae_real).square()
        w_next = 1 + lc.moving_pixel_weight * torch.maximum(move_next, fg_next)
        w_now = 1 + lc.moving_pixel_weight * torch.maximum(move_now, fg_now)
        loss_next = (next_err * w_next).mean()
        loss_now = (now_err * w_now).mean()
        loss_motion = x.new_zeros(())
        if self.motion_head is not None:
            # Unlike the pixel losses this reaches the encoder with the same strength for a small, dim
            # ball as for the paddle (issue 3: MSE weighting never put Breakout's ball in the latent).
            target = arrival_map(
                rearrange(x[:, :-1], "b t h w -> (b t) h w"),
                rearrange(x[:, 1:], "b t h w -> (b t) h w"),
                lc.moving_threshold,
                lc.motion_map_cells,
            )
            logits = self.motion_head(rearrange(z[:, 1:], "b t e -> (b t) e"))
            loss_motion, motion_hit = spatial_cross_entropy(logits, target)

        # The predictor must land where the encoder would put the real next frame: imagination feeds
        # predicted latents back in as context. This term trains the predictor only (context and target
        # detached): let through to the encoder, it made the latents collapse to a constant on Catch.
        loss_latent = F.mse_loss(z_pred_sg, z_next.detach())
        # Imagination feeds the predictor its own outputs for H steps; trained on real context alone it
        # drifts off the encoder's manifold after a few steps and the heads then misjudge rewards. Chain
        # P predictions here, gradients through the chain but not into the encoder.
        z_targets = z[:, K : K + P].detach()
        window, chain = z[:, :K].detach(), []
        for p in range(P):
            step = self.predictor(window, batch.actions[:, K - 1 + p])  # (B, 1, E)
            chain.append(step[:, 0])
            window = torch.cat([window[:, 1:], step], dim=1)
        z_open = torch.stack(chain, dim=1)  # (B, P, E)
        open_err = (z_open - z_targets).square().mean(dim=(0, 2))  # (P,)
        loss_open = open_err.mean()
        loss_motion_pred = x.new_zeros(())
        if self.motion_head is not None and lc.motion_map_predicted > 0:
            # The open-loop chain predicts frames K..K+P-1: the last P of the L-1 arrivals above.
            target_pred = rearrange(rearrange(target, "(b t) c -> b t c", b=B)[:, K - 1 :], "b p c -> (b p) c")
            head_weights = {name: w.detach() for name, w in self.motion_head.named_parameters()}
            logits_pred = torch.func.functional_call(
                self.motion_head, head_weights, (rearrange(z_open, "b p e -> (b p) e"),)
            )
            loss_motion_pred, motion_pred_hit = spatial_cross_entropy(logits_pred, target_pred)
        z_open_prev = torch.cat([z[:, K - 1 : K].detach(), z_open[:, :-1]], dim=1)  # (B, P, E)

        rew = rearrange(batch.rewards[:, K - 1 : K - 1 + P], "b p -> (b p)")
        cont = rearrange(batch.continues[:, K - 1 : K - 1 + P], "b p -> (b p)")
        # The heads learn from the predicted next latent (what imagination gives them), from open-loop
        # pairs (the kind of transition deep into an imagined rollout) and from every encoded real
        # transition of the sequence: the replay oversamples sequences with a reward anywhere in them,
        # and with only the last P real pairs half of those rewards never reached the heads (on Catch
        # they stayed near chance on rewarded steps while a probe on the same frozen latents read them).
        # Their gradients stop at the encoder (LESSONS.md: a strong reward loss early on destroyed the
        # visual representation).
        z_sg = z.detach()
        if self.training:
            self.head_input_norm.update(z_sg)
        head_from = [
            z_now.detach(),
            rearrange(z_sg[:, :-1], "b t e -> (b t) e"),
            rearrange(z_open_prev, "b p e -> (b p) e"),
        ]
        head_to = [z_pred_sg, rearrange(z_sg[:, 1:], "b t e -> (b t) e"), rearrange(z_open, "b p e -> (b p) e")]
        rew_parts = [rew, rearrange(batch.rewards[:, : L - 1], "b t -> (b t)"), rew]
        cont_parts = [cont, rearrange(batch.continues[:, : L - 1], "b t -> (b t)"), cont]
        if head_batch is not None:
            # The main batch gives the heads few rewarded pairs (about 16 per update on Catch) while a
            # probe on the same latents read catch vs miss near-perfectly: these extra real pairs cost an
            # encoder pass without gradient and no decoding.
            with torch.no_grad():
                z_h = self.encode(head_batch.frames)  # (B2, T2+1, E)
            head_from.append(rearrange(z_h[:, :-1], "b t e -> (b t) e"))
            head_to.append(rearrange(z_h[:, 1:], "b t e -> (b t) e"))
            rew_parts.append(rearrange(head_batch.rewards, "b t -> (b t)"))
            cont_parts.append(rearrange(head_batch.continues, "b t -> (b t)"))
        rew_logits, cont_logit = self.heads(torch.cat(head_from), torch.cat(head_to))
        rew, cont = torch.cat(rew_parts), torch.cat(cont_parts)
        rewarded = rew != 0
        rew_ce = -(twohot(rew, self.reward_bins) * rew_logits.log_softmax(-1)).sum(-1)
        reward_weights = sign_balanced_weights(rew) if lc.reward_sign_balance else balanced_weights(rewarded)
        loss_reward = (rew_ce * reward_weights).mean()
        cont_bce = F.binary_cross_entropy_with_logits(cont_logit, cont, reduction="none")
        loss_cont = (cont_bce * balanced_weights(cont < 0.5)).mean()

        loss = (
            lc.next_frame * loss_next
            + lc.current_frame * loss_now
            + lc.latent * loss_latent
            + lc.open_loop * loss_open
            + lc.reward * loss_reward
            + lc.cont * loss_cont
            + lc.motion_map * loss_motion
            + lc.motion_map_predicted * loss_motion_pred
        )
        with torch.no_grad():
            moving = move_next > 0
            n_moving = moving.sum().clamp(min=1)
            # Head accuracies on the predicted latents only: those are what imagination runs on.
            # predicted pairs [:n], real pairs [n:o], open-loop pairs [o:q], head-batch pairs [q:]
            n, o = B * P, B * P + B * (L - 1)
            q = o + B * P
            open_hat = twohot_decode(rew_logits[o:q], self.reward_bins)
            open_ok = (open_hat - rew[o:q]).abs() < 0.5 * rew[o:q].abs().clamp(min=1.0)
            open_acc_rewarded = (open_ok & rewarded[o:q]).sum() / rewarded[o:q].sum().clamp(min=1)
            rew, cont, rewarded = rew[:n], cont[:n], rewarded[:n]
            rew_hat = twohot_decode(rew_logits[:n], self.reward_bins)
            rew_ok = (rew_hat - rew).abs() < 0.5 * rew.abs().clamp(min=1.0)
            n_rew = rewarded.sum()
            # The accuracies above read the balanced heads; imagination reads them calibrated to the real
            # rewarded fraction, which on a sparse game (Breakout: ~0.3% of random-policy steps) pays a
            # small share of a true reward even where the balanced head is right. (The Dyna loop sets the
            # rates once the policy starts; until then both read the balanced head.)
            paid = twohot_decode(self.calibrate_reward(rew_logits[:n]), self.reward_bins)
            share = (paid / rew.where(rewarded, torch.ones_like(rew)) * rewarded).sum() / n_rew.clamp(min=1)
            n_quiet = (~rewarded).sum().clamp(min=1)
            ended = cont < 0.5
            cont_ok = (cont_logit[:n] > 0) == (cont > 0.5)
            metrics = {
                "world_model/loss": loss.detach(),
                "world_model/next_frame_loss": loss_next.detach(),
                "world_model/current_frame_loss": loss_now.detach(),
                "world_model/latent_loss": loss_latent.detach(),
                "world_model/open_loop_latent_mse_last": open_err[-1].detach(),
                "world_model/reward_loss": loss_reward.detach(),
                "world_model/cont_loss": loss_cont.detach(),
                "world_model/next_frame_mse": next_err.mean(),
                "world_model/next_frame_mse_moving": (next_err * moving).sum() / n_moving,
                "world_model/copy_last_mse_moving": ((x_next - x_now).square() * moving).sum() / n_moving,
                "world_model/recon_mse": now_err.mean(),
                "world_model/reward_acc": rew_ok.float().mean(),
                "world_model/reward_acc_rewarded": (rew_ok & rewarded).sum() / n_rew.clamp(min=1),
                "world_model/reward_acc_rewarded_open_loop": open_acc_rewarded,
                "world_model/reward_acc_unrewarded": (rew_ok & ~rewarded).sum() / n_quiet,
                "world_model/reward_paid_share_rewarded": share,
                "world_model/reward_paid_abs_unrewarded": (paid.abs() * ~rewarded).sum() / n_quiet,
                "world_model/rewarded_fraction": rewarded.float().mean(),
                "world_model/cont_acc_terminal": (cont_ok & ended).sum() / ended.sum().clamp(min=1),
                "world_model/cont_acc": cont_ok.float().mean(),
            }
            if self.motion_head is not None:
                metrics["world_model/motion_map_loss"] = loss_motion.detach()
                metrics["world_model/motion_map_hit"] = motion_hit
            if self.motion_head is not None and lc.motion_map_predicted > 0:
                metrics["world_model/motion_map_predicted_loss"] = loss_motion_pred.detach()
                metrics["world_model/motion_map_predicted_hit"] = motion_pred_hit
        return loss, metrics, z.detach()
