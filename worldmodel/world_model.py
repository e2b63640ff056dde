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
from worldmodel.reward_predictor import RewardConfig, transition_head
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
    latent_normalized: bool = False
    """Measure the latent and open-loop losses in units of the target latents' variance over the batch
    (1 = no better than their mean), so they do not vanish when the latent's scale does: on Pong the
    encoder's latents varied by 0.00046 per feature over time and the plain MSE was ~0 whatever the
    predictor said."""
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
    heads_on_predicted: bool = True
    """The reward and continue heads also learn from predicted (one-step and open-loop) transitions, not
    only from real ones."""
    heads_shape_predictor: bool = True
    """The reward and continue losses on predicted latents also train the predictor (through those
    latents). Off: the heads still learn from predicted latents, but the predictor learns only to land
    where the encoder would (its latent, open-loop and next-frame losses)."""
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

    subtract_background: bool = False
    """Frames enter the model as ``|pixel - median of the frame|``, before ``pixel_gain``: the field's
    colour becomes 0 and every object stands out from it. Breakout's and Catch's fields are black (the
    median is 0 on every frame, so nothing changes); Pong's is grey (87), which ``pixel_gain`` 3 turned,
    with everything on it, into 1.0."""
    pixel_gain: float = 1.0
    """Frames enter the model (encoder input and reconstruction targets alike) as
    ``min(1, gain * pixel / 255)``. Above 1 it brightens faint objects: Breakout's ball, area-resized
    to 64x64, is a ~3-pixel blob at 30-100 of 255. At gain 3 the cpu-size encoder, trained supervised
    on the ball's position, found it within 1,000 steps (at gain 1 it did not); trained by the
    world-model losses, it did only together with the motion-map loss (Breakout, seed 0, 1,500 updates;
    either alone did not): the ``cpu`` preset uses both."""
    pixel_gamma: float = 1.0
    """Frames enter the model as ``(pixel / 255) ** gamma`` (after ``pixel_gain``). Below 1 it also
    brightens faint objects, without clipping: gain 3 turned Pong's grey background (87 of 255) and
    everything on it into 1.0, while gamma 0.5 maps the background to 0.58 and what is brighter
    (123-236) to 0.69-0.96, and Breakout's faint ball (30-100) to 0.34-0.63."""

    @property
    def seq_len(self) -> int:
        return self.context + self.pred_steps

    @property
    def predictor_context(self) -> int:
        """Latents the predictor reads (``predictor.context``, or all ``K``)."""
        return self.predictor.context or self.context

    def validate(self) -> None:
        """Raise ``ValueError`` for settings the world model cannot use; fields are named as backticked
        config paths (the CLI turns them into its flags)."""
        E = self.encoder.latent_dim
        if self.encoder.pool not in ("mean", "flatten") or self.encoder.flatten_dim < 1:
            raise ValueError(
                f"`encoder.pool` must be 'mean' or 'flatten' and `encoder.flatten_dim` >= 1, "
                f"got {self.encoder.pool!r} and {self.encoder.flatten_dim}"
            )
        source = "`encoder.embed_dim`"
        if self.encoder.pool == "flatten":
            source = "the encoder's latent (patches x `encoder.flatten_dim`)"
        for name, sub in (("predictor", self.predictor), ("decoder", self.decoder), ("reward", self.reward)):
            if sub.embed_dim != E:
                raise ValueError(f"`{name}.embed_dim` ({sub.embed_dim}) must equal {source} ({E})")
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
        if not 0.0 < self.pixel_gamma <= 1.0:
            raise ValueError(f"`pixel_gamma` must be in (0, 1], got {self.pixel_gamma}")
        if self.context < 1 or self.pred_steps < 1:
            raise ValueError(f"`context` and `pred_steps` must be at least 1, got {self.context} and {self.pred_steps}")
        if self.context > self.predictor.max_context:
            raise ValueError(
                f"`context` ({self.context}) exceeds `predictor.max_context` ({self.predictor.max_context})"
            )
        if not 0 <= self.predictor.context <= self.context:
            raise ValueError(
                f"`predictor.context` (latents the predictor reads, 0 = all) must be in 0..`context` "
                f"({self.context}), got {self.predictor.context}"
            )
        if not 1 <= self.reward.window <= self.context:
            raise ValueError(
                f"`reward.window` (latents the reward and continue heads read) must be in 1..`context` "
                f"({self.context}), got {self.reward.window}"
            )


Term = tuple[torch.Tensor, dict[str, torch.Tensor]]
"""A loss term: its value and the metrics that go with it."""


@dataclass
class Dynamics:
    """The predictor's outputs on the main batch and its two losses (see ``WorldModel._predict``)."""

    z_pred: torch.Tensor  # (B*P, E): one step from each real window
    z_open: torch.Tensor  # (B, P, E): P steps chained open loop
    latent_loss: torch.Tensor
    open_loop_loss: torch.Tensor
    open_loop_mse_last: torch.Tensor


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
        per = target.shape[0] // frames.shape[0]
        background = background[:, None].expand(-1, per, -1, -1).flatten(0, 1)  # (N, H, W)
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


def fit_shift(
    rate_at, target: float, decreasing: bool, lo: float = -30.0, hi: float = 30.0, iters: int = 50, device=None
) -> torch.Tensor:
    """The logit shift ``s`` in ``[lo, hi]`` where the monotone ``rate_at(s)`` (a 0-d tensor, given a 0-d
    float32 ``s`` on ``device``) meets ``target``, as a 0-d float64 tensor: bisection kept on the device
    (no host read per step, so a GPU never waits on it)."""
    lo_t = torch.tensor(lo, dtype=torch.float64, device=device)
    hi_t = torch.tensor(hi, dtype=torch.float64, device=device)
    for _ in range(iters):
        mid = (lo_t + hi_t) / 2
        move_lo = (rate_at(mid.float()).double() > target) == decreasing
        lo_t, hi_t = torch.where(move_lo, mid, lo_t), torch.where(move_lo, hi_t, mid)
    return (lo_t + hi_t) / 2


class WorldModel(nn.Module):
    """VideoViT encoder + LatentDynamicsPredictor + HybridConvTransformerDecoder + RewardPredictor,
    plus a continue head (a second RewardPredictor with one logit) so imagined episodes can end
    (both an :class:`MLPTransitionHead` with ``reward.reader = "mlp"``)."""

    def __init__(self, cfg: WorldModelConfig, num_actions: int) -> None:
        super().__init__()
        cfg.validate()
        E = cfg.encoder.latent_dim
        self.cfg = cfg
        self.num_actions = num_actions
        self.encoder = VideoViT(cfg.encoder)
        self.predictor = LatentDynamicsPredictor(cfg.predictor, num_actions)
        self.decoder = HybridConvTransformerDecoder(cfg.decoder)
        self.reward_head = transition_head(RewardConfig(**{**vars(cfg.reward), "out_dim": cfg.loss.reward_bins}))
        self.cont_head = transition_head(RewardConfig(**{**vars(cfg.reward), "out_dim": 1}))
        self.motion_head = MotionMapHead(E, cfg.loss.motion_map_cells) if cfg.loss.motion_map > 0 else None
        self.register_buffer("reward_bins", make_bins(cfg.loss.reward_bins, cfg.loss.reward_limit), persistent=False)
        self.zero_bin = int(self.reward_bins.abs().argmin())
        # The heads learn with class-balanced weights on batches that oversample rewards and ends, i.e. as
        # if rewarded and unrewarded (ending and continuing) transitions were equally common. Imagination
        # adds to the logit of "no reward" and of "goes on" the shifts below, set by `set_base_rates`
        # (Bayes' rule) or fitted on real windows by `calibrate_heads`.
        self.register_buffer("head_shifts", torch.zeros(2))  # (reward zero bin, continue) logit shifts
        self.head_input_norm = RunningStandardizer(E)
        # eps well below the ~1e-4 per-feature variance of a fresh encoder's latents.
        self.decoder_input_norm = RunningStandardizer(E, eps=1e-8)

    def to_float(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames ``[..., H, W]`` -> the model's pixels in [0, 1] (see ``subtract_background``,
        ``pixel_gain`` and ``pixel_gamma``)."""
        x = frames.float()
        if self.cfg.subtract_background:
            x = (x - x.flatten(-2).median(dim=-1).values[..., None, None]).abs()
        x = x / 255.0
        if self.cfg.pixel_gain != 1.0:
            x = (x * self.cfg.pixel_gain).clamp(max=1.0)
        return x if self.cfg.pixel_gamma == 1.0 else x.pow(self.cfg.pixel_gamma)

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
        """Reward logits ``[B, bins]`` and continue logits ``[B]`` of transitions ``z_t -> z_next``: latents
        ``[B, E]``, or with ``reward.window`` W > 1 the W latents up to each ``[B, W, E]`` (see
        :meth:`head_inputs`)."""
        if z_t.dim() == 2:
            z_t, z_next = z_t.unsqueeze(1), z_next.unsqueeze(1)
        a, b = self.head_input_norm(z_t), self.head_input_norm(z_next)
        return self.reward_head(a, b)[:, 0], self.cont_head(a, b)[:, 0, 0]

    def head_inputs(self, window: torch.Tensor, z_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the heads read of the transition from the last latent of ``window [B, T, E]`` to ``z_next
        [B, E]``: the ``W = reward.window`` latents up to it and up to ``z_next``, ``[B, W, E]`` each."""
        W = self.cfg.reward.window
        return window[:, -W:], torch.cat([window[:, window.shape[1] - W + 1 :], z_next.unsqueeze(1)], dim=1)

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
        """Shift the heads by the prior log-odds of the real data's fractions of transitions with a non-zero
        reward and with a (life-loss) terminal: exact if the balanced heads were calibrated on negatives
        drawn like the real ones. :meth:`calibrate_heads` fits the shifts instead."""
        rates = torch.tensor([rewarded, terminal], dtype=torch.float64).clamp(1e-4, 1 - 1e-4)
        self.head_shifts.copy_(torch.log((1 - rates) / rates))

    @torch.no_grad()
    def calibrate_heads(
        self,
        frames: torch.Tensor,
        actions: torch.Tensor,
        rewarded: float,
        ended: float,
        reward_weights: torch.Tensor | None = None,
        end_weights: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fit :attr:`head_shifts` so that imagination, run ``D`` steps from the first ``K`` frames of real
        sequences under their real actions (uint8 ``frames [B, K + D, H, W]``, ``actions [B, K + D - 1]``),
        predicts a reward and an end as often, on average over the ``B * D`` steps, as the real data has
        them (fractions ``rewarded`` and ``ended``). The average weighs sequence ``b`` by
        ``reward_weights[b]`` / ``end_weights[b]`` (``[B]``, summing to 1; default equal: sequences drawn
        uniformly). On Breakout the Bayes shift of :meth:`set_base_rates` paid ~1/9 of the real mean
        reward: the batches' negatives are oversampled next to rewards, where they look like rewards.
        Returns the fitted shifts (0-d tensors on the device: reading them is the caller's choice)."""
        K, was_training = self.cfg.context, self.training
        self.eval()  # the heads' input standardizer must not learn from these
        window = self.encode(frames[:, :K])  # (B, K, E)
        rew, cont = [], []
        for a in actions[:, K - 1 :].unbind(1):
            z_next = self.predictor(window, a)  # (B, 1, E)
            r, c = self.heads(*self.head_inputs(window, z_next[:, 0]))
            rew.append(r.float())
            cont.append(c.float())
            window = torch.cat([window[:, 1:], z_next.to(window.dtype)], dim=1)
        self.train(was_training)
        B, D = len(frames), len(rew)
        equal = torch.full((B,), 1 / B, device=frames.device)
        w_rew = (equal if reward_weights is None else reward_weights).float().repeat(D) / D
        w_end = (equal if end_weights is None else end_weights).float().repeat(D) / D
        fitted = self.fit_head_shifts(torch.cat(rew), torch.cat(cont), w_rew, w_end, rewarded, ended)
        self.head_shifts.copy_(fitted)
        return {"reward_shift": fitted[0], "cont_shift": fitted[1]}

    def fit_head_shifts(
        self,
        rew_logits: torch.Tensor,
        cont_logit: torch.Tensor,
        reward_weights: torch.Tensor,
        end_weights: torch.Tensor,
        rewarded: float,
        ended: float,
    ) -> torch.Tensor:
        """The (reward zero bin, continue) logit shifts ``[2]`` at which the heads' unshifted logits
        (``[N, bins]``, ``[N]``), averaged with weights ``[N]`` summing to 1, predict a reward and an end at
        fractions ``rewarded`` and ``ended``; :attr:`head_shifts` is left as it is."""
        device = rew_logits.device
        zero = F.one_hot(torch.tensor(self.zero_bin, device=device), rew_logits.shape[-1]).to(rew_logits)

        def p_reward(shift: torch.Tensor) -> torch.Tensor:
            return 1 - ((rew_logits + shift * zero).softmax(-1)[:, self.zero_bin] * reward_weights).sum()

        def p_end(shift: torch.Tensor) -> torch.Tensor:
            return 1 - (torch.sigmoid(cont_logit + shift) * end_weights).sum()

        return torch.stack(
            [fit_shift(p_reward, rewarded, True, device=device), fit_shift(p_end, ended, True, device=device)]
        )

    def load_state_dict_compat(self, state_dict: dict[str, torch.Tensor]) -> None:
        """``load_state_dict``; checkpoints written with ``base_rates`` (fractions, before ``head_shifts``)
        load with their Bayes shifts, those from before either with none, and those from before the heads'
        input standardization with an identity one (how they were trained)."""
        state_dict = dict(state_dict)
        rates = state_dict.pop("base_rates", None)
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        optional = {"head_shifts"} | {
            f"{norm}.{k}" for norm in ("head_input_norm", "decoder_input_norm") for k in ("mean", "var", "initialized")
        }
        if unexpected or set(missing) - optional:
            raise RuntimeError(f"world-model state does not match: missing {missing}, unexpected {unexpected}")
        if rates is not None and "head_shifts" not in state_dict:
            self.set_base_rates(*rates.tolist())

    def calibrated_heads(self, z_t: torch.Tensor, z_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`heads` with the logits shifted by :attr:`head_shifts` to the real data's rates."""
        rew_logits, cont_logit = self.heads(z_t, z_next)
        return self.calibrate_reward(rew_logits), cont_logit + self.head_shifts[1]

    def calibrate_reward(self, rew_logits: torch.Tensor) -> torch.Tensor:
        """Reward logits ``[N, bins]`` of the balanced training prior -> logits at the real data's rewarded fraction."""
        shift = torch.zeros_like(self.reward_bins)
        shift[self.zero_bin] = self.head_shifts[0]
        return rew_logits + shift

    @torch.no_grad()
    def imagine_step(self, window: torch.Tensor, action: torch.Tensor) -> Prediction:
        """Latent window ``[B, K, E]`` and actions ``[B]`` -> the next latent, reward and continue probability."""
        z_next = self.predictor(window, action)  # (B, 1, E)
        rew_logits, cont_logit = self.calibrated_heads(*self.head_inputs(window, z_next[:, 0]))
        return Prediction(z_next, twohot_decode(rew_logits, self.reward_bins), torch.sigmoid(cont_logit))

    def compute_loss(
        self, batch: Batch, head_batch: Batch | None = None, dynamics_batch: Batch | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of one batch of ``K + P`` frame sequences; metrics are detached tensors. ``head_batch``
        (optional, sequences of any length >= 2) adds real transitions for the reward and continue heads
        only: encoded without gradient, so they cost an encoder pass and no decoding. ``dynamics_batch``
        (optional, ``Kp + P`` frames, ``Kp`` = :attr:`WorldModelConfig.predictor_context`) adds sequences
        for the predictor's latent and open-loop losses only, encoded without gradient the same way."""
        loss, metrics, _ = self.loss_and_latents(batch, head_batch, dynamics_batch)
        return loss, metrics

    def loss_and_latents(
        self, batch: Batch, head_batch: Batch | None = None, dynamics_batch: Batch | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`compute_loss` plus the batch's detached latents ``[B, K+P, E]``, which imagination
        reuses as start states instead of encoding frames a second time.

        The encoder and decoder learn from pixels alone (``current_frame``); every other term stops at
        the encoder (LESSONS.md: other losses flowing into it early slowed or destroyed its picture of
        small objects), except the motion map, which reaches it on purpose."""
        cfg, lc = self.cfg, self.cfg.loss
        B, L = batch.frames.shape[:2]
        if L != cfg.seq_len:
            raise ValueError(f"batch has sequences of {L} frames, the world model trains on K+P={cfg.seq_len}")
        x = self.to_float(batch.frames)  # (B, L, H, W)
        z = self.encoder(x.unsqueeze(1))  # (B, L, E)
        if self.training and cfg.standardize_decoder_input:
            self.decoder_input_norm.update(z)
        dyn = self._predict(z.detach(), batch.actions, dynamics_batch)
        terms = {
            "current_frame": self._current_frame_loss(x, z),
            "next_frame": self._next_frame_loss(x, dyn.z_pred),
            "latent": (dyn.latent_loss, {"world_model/latent_loss": dyn.latent_loss}),
            "open_loop": (dyn.open_loop_loss, {"world_model/open_loop_latent_mse_last": dyn.open_loop_mse_last}),
            **self._head_losses(batch, z.detach(), dyn, head_batch),
            **self._motion_map_losses(x, z, dyn.z_open),
        }
        loss = sum(getattr(lc, name) * value for name, (value, _) in terms.items())
        metrics = {"world_model/loss": loss}
        for _, term_metrics in terms.values():
            metrics.update(term_metrics)
        return loss, {k: v.detach() for k, v in metrics.items()}, z.detach()

    def _predict(self, z: torch.Tensor, actions: torch.Tensor, dynamics_batch: Batch | None) -> Dynamics:
        """The predictor on detached latents ``z [B, K+P, E]``: one step from each of the P real
        windows, and a chain of P steps fed back open loop, as imagination runs it. Both train the
        predictor to land where the encoder puts the real next frame (imagination feeds predicted
        latents back in as context); ``dynamics_batch`` (``Kp + P`` frames, ``Kp`` the latents the predictor
        reads) adds sequences to these two losses only."""
        Kp, P = self.cfg.predictor_context, self.cfg.pred_steps
        B = z.shape[0]
        first = z.shape[1] - (Kp + P)  # the main batch holds the heads' longer window when Kp < K
        z, actions = z[:, first:], actions[:, first:]  # (B, Kp+P, E), (B, Kp+P-1)
        if dynamics_batch is not None:
            with torch.no_grad():
                z = torch.cat([z, self.encode(dynamics_batch.frames).to(z.dtype)])  # (B + B3, Kp+P, E)
            actions = torch.cat([actions, dynamics_batch.actions])
        windows = rearrange(z.unfold(1, Kp, 1)[:, :P], "b p e k -> (b p) k e")  # (N*P, Kp, E)
        one_step = self.predictor(windows, rearrange(actions[:, Kp - 1 : Kp - 1 + P], "b p -> (b p)"))[:, 0]
        # z is detached, so the scale is a constant of the loss
        scale = z[:, Kp:].var(dim=(0, 1)).mean().clamp_min(1e-12) if self.cfg.loss.latent_normalized else 1.0
        latent_loss = F.mse_loss(one_step, rearrange(z[:, Kp:], "b p e -> (b p) e")) / scale
        window, chain = z[:, :Kp], []
        for p in range(P):
            step = self.predictor(window, actions[:, Kp - 1 + p])  # (N, 1, E)
            chain.append(step[:, 0])
            window = torch.cat([window[:, 1:], step], dim=1)
        open_err = (torch.stack(chain, dim=1) - z[:, Kp:]).square().mean(dim=(0, 2)) / scale  # (P,)
        return Dynamics(
            z_pred=one_step[: B * P],
            z_open=torch.stack(chain, dim=1)[:B],
            latent_loss=latent_loss,
            open_loop_loss=open_err.mean(),
            open_loop_mse_last=open_err[-1],
        )

    def _pixel_weights(self, x: torch.Tensor, prev: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel weights of a reconstruction of ``target [N, H, W]``: plain MSE ignores a small ball, so
        pixels that moved since ``prev`` or differ from the background of ``x [B, L, H, W]`` (a still
        paddle matters as much as the ball) weigh ``1 + moving_pixel_weight``."""
        lc = self.cfg.loss
        moved = moving_mask(prev, target, lc.moving_threshold)
        fg = foreground_mask(x, target, lc.moving_threshold, lc.foreground == "sequence")
        return 1 + lc.moving_pixel_weight * torch.maximum(moved, fg)

    def _current_frame_loss(self, x: torch.Tensor, z: torch.Tensor) -> Term:
        """Autoencoding two frames per sequence trains the encoder and decoder (decoding dominates an
        update's cost: cross-attention at 64x64)."""
        L = x.shape[1]
        idx = [max(0, L - 4), L - 2]

        def pick(t: torch.Tensor, steps: list[int]) -> torch.Tensor:  # integer indexing: no index tensor to copy
            return torch.stack([t[:, i] for i in steps], dim=1).flatten(0, 1)

        real = pick(x, idx)  # (2B, H, W)
        prev = pick(x, [max(0, i - 1) for i in idx])
        err = (self.decode(pick(z, idx)) - real).square()  # (2B, H, W)
        loss = (err * self._pixel_weights(x, prev, real)).mean()
        return loss, {"world_model/current_frame_loss": loss, "world_model/recon_mse": err.mean()}

    def _next_frame_loss(self, x: torch.Tensor, z_pred: torch.Tensor) -> Term:
        """The last window's predicted next latent, decoded with the decoder held fixed, must draw the real
        next frame: trains the predictor only (blurry early predictions would otherwise teach the decoder
        to draw an average frame without the ball)."""
        now, nxt = x[:, -2], x[:, -1]
        pred = self.decode(
            rearrange(z_pred, "(b p) e -> b p e", p=self.cfg.pred_steps)[:, -1], frozen=True
        )  # (B, H, W)
        err = (pred - nxt).square()
        loss = (err * self._pixel_weights(x, now, nxt)).mean()
        with torch.no_grad():
            moving = moving_mask(now, nxt, self.cfg.loss.moving_threshold) > 0
            n_moving = moving.sum().clamp(min=1)
            metrics = {
                "world_model/next_frame_loss": loss,
                "world_model/next_frame_mse": err.mean(),
                "world_model/next_frame_mse_moving": (err * moving).sum() / n_moving,
                "world_model/copy_last_mse_moving": ((nxt - now).square() * moving).sum() / n_moving,
            }
        return loss, metrics

    def _head_losses(self, batch: Batch, z: torch.Tensor, dyn: Dynamics, head_batch: Batch | None) -> dict[str, Term]:
        """Class-balanced reward (two-hot) and continue losses of the heads on transitions ``z_t -> z_next``
        (each read with the ``W = reward.window`` latents up to it, :meth:`head_inputs`) of four kinds: the
        one-step predictions (what imagination gives them), every real transition of the sequence with W
        latents before it (rewarded sequences are oversampled, and with only the last P pairs half of those
        rewards never reached the heads), the open-loop ones (deep into an imagined rollout) and the head
        batch's real ones (few rewarded pairs per main batch; these cost an encoder pass and no decoding)."""
        lc = self.cfg.loss
        K, P, W = self.cfg.context, self.cfg.pred_steps, self.cfg.reward.window
        B, L = batch.frames.shape[:2]
        if self.training:
            self.head_input_norm.update(z)
        z_pred, z_open = dyn.z_pred, dyn.z_open
        if not lc.heads_shape_predictor:
            z_pred, z_open = z_pred.detach(), z_open.detach()

        def spans(seq: torch.Tensor, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
            """Every transition of ``seq [B, T, E]`` from ``first`` on with W latents before it: the W latents
            up to it and up to its next latent, ``[N, W, E]`` each."""
            w = self.windows(seq[:, first:], W + 1)
            return w[:, :W], w[:, 1:]

        one_from, one_to = spans(z, K - W)  # the real windows the one-step predictions read, and their targets
        one_to = torch.cat([one_to[:, :-1], z_pred.unsqueeze(1)], dim=1)
        real_from, real_to = spans(z)
        open_from, open_to = spans(torch.cat([z[:, :K], z_open], dim=1), K - W)
        labels = lambda t, first: rearrange(t[:, first:], "b t -> (b t)")  # noqa: E731
        head_from, head_to = [one_from, real_from, open_from], [one_to, real_to, open_to]
        rewards = [labels(batch.rewards, K - 1), labels(batch.rewards, W - 1), labels(batch.rewards, K - 1)]
        conts = [labels(batch.continues, K - 1), labels(batch.continues, W - 1), labels(batch.continues, K - 1)]
        if head_batch is not None:
            with torch.no_grad():
                z_h = self.encode(head_batch.frames)  # (B2, T2+1, E)
            h_from, h_to = spans(z_h)
            head_from.append(h_from)
            head_to.append(h_to)
            rewards.append(labels(head_batch.rewards, W - 1))
            conts.append(labels(head_batch.continues, W - 1))
        rew_logits, cont_logit = self.heads(torch.cat(head_from), torch.cat(head_to))
        rew, cont = torch.cat(rewards), torch.cat(conts)
        # predicted pairs [:n], real pairs [n:o], open-loop pairs [o:o+n], head-batch pairs after
        n, o = B * P, B * P + B * (L - W)
        real = torch.cat([torch.arange(n, o, device=rew.device), torch.arange(o + n, len(rew), device=rew.device)])
        train = slice(None) if lc.heads_on_predicted else real
        t_rew, t_cont, t_logits = rew[train], cont[train], rew_logits[train]
        rew_ce = -(twohot(t_rew, self.reward_bins) * t_logits.log_softmax(-1)).sum(-1)
        reward_weights = sign_balanced_weights(t_rew) if lc.reward_sign_balance else balanced_weights(t_rew != 0)
        loss_reward = (rew_ce * reward_weights).mean()
        cont_bce = F.binary_cross_entropy_with_logits(cont_logit[train], t_cont, reduction="none")
        loss_cont = (cont_bce * balanced_weights(t_cont < 0.5)).mean()
        # Accuracies on the predicted pairs (what imagination runs on) and the open-loop pairs.
        metrics = self._head_metrics(rew_logits[:n], cont_logit[:n], rew[:n], cont[:n])
        metrics["world_model/reward_acc_rewarded_open_loop"] = self._reward_accuracy(
            rew_logits[o : o + n], rew[o : o + n]
        )[1]
        metrics["world_model/reward_loss"] = loss_reward
        metrics["world_model/cont_loss"] = loss_cont
        return {"reward": (loss_reward, {}), "cont": (loss_cont, metrics)}

    def _reward_accuracy(self, rew_logits: torch.Tensor, rew: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-step correctness of the balanced reward head (within half the reward, or 0.5) ``[N]`` bool,
        and its accuracy on rewarded steps."""
        with torch.no_grad():
            ok = (twohot_decode(rew_logits, self.reward_bins) - rew).abs() < 0.5 * rew.abs().clamp(min=1.0)
            rewarded = rew != 0
            return ok, (ok & rewarded).sum() / rewarded.sum().clamp(min=1)

    @torch.no_grad()
    def _head_metrics(
        self, rew_logits: torch.Tensor, cont_logit: torch.Tensor, rew: torch.Tensor, cont: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        rewarded = rew != 0
        rew_ok, acc_rewarded = self._reward_accuracy(rew_logits, rew)
        n_quiet = (~rewarded).sum().clamp(min=1)
        # The accuracies read the balanced heads; imagination reads them calibrated to the real rewarded
        # fraction, which on a sparse game (Breakout: ~0.3% of random-policy steps) pays a small share of
        # a true reward even where the balanced head is right. (The Dyna loop sets the rates once the
        # policy starts; until then both read the balanced head.)
        paid = twohot_decode(self.calibrate_reward(rew_logits), self.reward_bins)
        share = (paid / rew.where(rewarded, torch.ones_like(rew)) * rewarded).sum() / rewarded.sum().clamp(min=1)
        ended = cont < 0.5
        cont_ok = (cont_logit > 0) == (cont > 0.5)
        return {
            "world_model/reward_acc": rew_ok.float().mean(),
            "world_model/reward_acc_rewarded": acc_rewarded,
            "world_model/reward_acc_unrewarded": (rew_ok & ~rewarded).sum() / n_quiet,
            "world_model/reward_paid_share_rewarded": share,
            "world_model/reward_paid_abs_unrewarded": (paid.abs() * ~rewarded).sum() / n_quiet,
            "world_model/rewarded_fraction": rewarded.float().mean(),
            "world_model/cont_acc_terminal": (cont_ok & ended).sum() / ended.sum().clamp(min=1),
            "world_model/cont_acc": cont_ok.float().mean(),
        }

    def _motion_map_losses(self, x: torch.Tensor, z: torch.Tensor, z_open: torch.Tensor) -> dict[str, Term]:
        """Every latent must place, over coarse cells, where pixels brightened since the previous frame:
        unlike the pixel losses this reaches the encoder as strongly for a small, dim ball as for the
        paddle. ``motion_map_predicted``: the same, read with the head held fixed, on the open-loop latents
        (the predictor must carry the objects to where they arrive)."""
        lc = self.cfg.loss
        if self.motion_head is None:
            return {}
        K, B = self.cfg.context, x.shape[0]
        target = arrival_map(
            rearrange(x[:, :-1], "b t h w -> (b t) h w"),
            rearrange(x[:, 1:], "b t h w -> (b t) h w"),
            lc.moving_threshold,
            lc.motion_map_cells,
        )  # (B*(L-1), cells^2)
        loss, hit = spatial_cross_entropy(self.motion_head(rearrange(z[:, 1:], "b t e -> (b t) e")), target)
        terms = {"motion_map": (loss, {"world_model/motion_map_loss": loss, "world_model/motion_map_hit": hit})}
        if lc.motion_map_predicted > 0:
            # The open-loop chain predicts frames K..K+P-1: the last P of the L-1 arrivals.
            target_pred = rearrange(rearrange(target, "(b t) c -> b t c", b=B)[:, K - 1 :], "b p c -> (b p) c")
            fixed = {name: w.detach() for name, w in self.motion_head.named_parameters()}
            logits = torch.func.functional_call(self.motion_head, fixed, (rearrange(z_open, "b p e -> (b p) e"),))
            loss_pred, hit_pred = spatial_cross_entropy(logits, target_pred)
            terms["motion_map_predicted"] = (
                loss_pred,
                {"world_model/motion_map_predicted_loss": loss_pred, "world_model/motion_map_predicted_hit": hit_pred},
            )
        return terms
