"""Can the encoder learn where Breakout's ball is when it is told directly? (issue 3 diagnostics)

Trains a freshly initialised ``VideoViT`` and a linear head, supervised, to regress paddle x, ball x
and ball y (console RAM, standardized) from single random-play Breakout frames with the ball in play,
and prints the held-out R^2 (last 20% of the frames) every ``--eval-every`` steps. Where this fails,
no reconstruction loss can put the ball into the latent either; the variants tell which part of the
design is in the way:

- ``document``: the encoder as ARCHITECTURE.md has it (RoPE only, mean over patches);
- ``abs-pos``: plus a learned absolute position embedding added to the patch tokens;
- ``no-mean``: the patch tokens concatenated instead of averaged (the head reads ``N * E`` numbers);
- ``gain3``: the document's encoder on frames brightened 3x (clipped at 255);
- ``sqrt``: the document's encoder on the square root of the pixels in [0, 1].

    python -m scripts.ball_capacity --variant document --steps 1000

(``no-mean`` is what ``--world-model.encoder.pool flatten`` now builds into the world model; the
world model's own latents are measured by ``wm-agent bench world-model``.)
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from envs.annotations import annotated_rollout
from worldmodel.encoder import EncoderConfig, VideoViT

VARIANTS = ("document", "abs-pos", "no-mean", "gain3", "sqrt")


def patch_tokens(enc: VideoViT, x: torch.Tensor) -> torch.Tensor:
    """``x [B, 1, 1, H, W]`` -> the encoder's normalised patch tokens, concatenated: ``[B, 1, N*E]``."""
    p = enc.cfg.patch_size
    tokens = rearrange(enc.patch_embed(x), "b t n e -> (b t) n e")
    rope = enc.rope(x.shape[-2] // p, x.shape[-1] // p)
    for block in enc.blocks:
        tokens = block(tokens, rope)
    return enc.norm(tokens).flatten(1)[:, None]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", choices=VARIANTS, default="document")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--frames", type=int, default=12000, help="random-play frames collected (seed 0)")
    ap.add_argument("--embed-dim", type=int, default=64, help="the cpu preset's sizes by default")
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--patch-size", type=int, default=8)
    ap.add_argument("--cache", type=Path, help="an .npz to keep the collected frames in between runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)

    if args.cache and args.cache.exists():
        saved = np.load(args.cache)
        frames, pos = saved["frames"], saved["pos"]
    else:
        rollout = annotated_rollout("ALE/Breakout-v5", args.frames, num_envs=1, seed=0)
        frames, pos = rollout.frames[:, 0], rollout.positions[:, 0].astype(np.float64)
        if args.cache:
            np.savez(args.cache, frames=frames, pos=pos)
    in_play = (pos[:, 2] > 0) & (pos[:, 1] > 0)
    x = torch.as_tensor(frames[in_play])  # (N, 64, 64) uint8
    if args.variant == "gain3":
        x = (x.int() * 3).clamp(max=255).to(torch.uint8)
    y = torch.as_tensor(pos[in_play], dtype=torch.float32)
    y = (y - y.mean(0)) / y.std(0)
    split = int(0.8 * len(x))

    enc = VideoViT(
        EncoderConfig(embed_dim=args.embed_dim, depth=args.depth, num_heads=args.heads, patch_size=args.patch_size)
    )
    n_patches = (64 // args.patch_size) ** 2
    params = list(enc.parameters())
    if args.variant == "abs-pos":
        pos_embed = nn.Parameter(torch.randn(n_patches, args.embed_dim) * 0.02)
        embed = enc.patch_embed.forward
        enc.patch_embed.forward = lambda v: embed(v) + pos_embed
        params.append(pos_embed)
    if args.variant == "no-mean":
        enc.forward = lambda v: patch_tokens(enc, v)
    head = nn.Linear(args.embed_dim * (n_patches if args.variant == "no-mean" else 1), 3)
    opt = torch.optim.AdamW(params + list(head.parameters()), 1e-3)

    def pixels(frames_u8: torch.Tensor) -> torch.Tensor:
        v = frames_u8[:, None, None].float() / 255  # (B, 1, 1, H, W)
        return v.sqrt() if args.variant == "sqrt" else v

    @torch.no_grad()
    def held_out_r2() -> list[float]:
        z = torch.cat([enc(pixels(x[i : i + 512]))[:, 0] for i in range(split, len(x), 512)])
        pred, t = head(z), y[split:]
        return (1 - (pred - t).square().sum(0) / (t - t.mean(0)).square().sum(0)).tolist()

    t0 = time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            r = held_out_r2()
            print(
                f"{args.variant} step {step}: held-out R^2 paddle x {r[0]:.2f} | ball x {r[1]:.2f} | "
                f"ball y {r[2]:.2f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
        idx = torch.randint(0, split, (64,))
        loss = (head(enc(pixels(x[idx]))[:, 0]) - y[idx]).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


if __name__ == "__main__":
    main()
