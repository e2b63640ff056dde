"""Real vs imagined: the policy's actions played in the real env and, open loop, in the world model.

From ``K`` real frames of context the world model is given only the actions; its predicted frames
are decoded and set beside the real ones. When the real episode ends the imagination starts again
from the new episode's first ``K`` frames (a new segment).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from agent.actor import RealEnvActor
from agent.dyna import LoadedAgent
from envs import make_env
from worldmodel.world_model import WorldModel


@dataclass
class OpenLoop:
    """``T`` open-loop steps: real and imagined frames ``[T, H, W]`` (uint8), rewards and the like ``[T]``."""

    real: np.ndarray
    imagined: np.ndarray
    last_context: np.ndarray
    """The last real context frame of each step's segment ``[T, H, W]``: the copy-last baseline."""
    real_reward: np.ndarray
    predicted_reward: np.ndarray
    predicted_continue: np.ndarray
    step_in_segment: np.ndarray
    env_actions: np.ndarray
    """Every action sent to the real env from its reset on, context steps included: ``[env steps]``."""
    segment_starts: list[int] = field(default_factory=list)

    def mse(self) -> np.ndarray:
        """Per-step mean squared error of the imagined frames, pixels in [0, 1]: ``[T]``."""
        d = (self.real.astype(np.float32) - self.imagined.astype(np.float32)) / 255.0
        return (d**2).mean(axis=(1, 2))

    def copy_last_mse(self) -> np.ndarray:
        """Per-step error of predicting that nothing moves after the context: ``[T]``."""
        d = (self.real.astype(np.float32) - self.last_context.astype(np.float32)) / 255.0
        return (d**2).mean(axis=(1, 2))


@torch.no_grad()
def open_loop(
    agent: LoadedAgent, steps: int, seed: int, device: torch.device, max_env_steps: int = 100_000
) -> OpenLoop:
    """Play ``steps`` open-loop steps of ``agent``'s policy (sampled actions) from seed ``seed``."""
    cfg, wm = agent.cfg, agent.wm
    K = cfg.world_model.context
    env = make_env(cfg.env, num_envs=1, seed=seed, sticky_actions=cfg.sticky_actions)
    actor = RealEnvActor(wm, agent.policy, 1, device)
    obs, info = env.reset(seed=seed)
    actor.observe(obs, info["is_first"])
    context = [obs[0]]
    window: torch.Tensor | None = None
    rows: dict[str, list] = {k: [] for k in ("real", "imag", "last", "r", "r_hat", "c_hat", "t")}
    starts: list[int] = []
    sent: list[int] = []
    t_seg = 0

    if K == 1:  # the first frame is a whole context
        window = wm.encode(torch.from_numpy(obs[:1])[None].to(device))
        starts.append(0)
    for _ in range(max_env_steps):
        if len(rows["real"]) >= steps:
            break
        action = actor.act()
        sent.append(int(action[0]))
        nxt, rew, _, _, info = env.step(action)
        actor.observe(nxt, info["is_first"])
        if info["is_first"][0]:
            context, window = [nxt[0]], None
        elif window is not None:
            pred = wm.imagine_step(window, torch.as_tensor(action, device=device))
            window = torch.cat([window[:, 1:], pred.latent], dim=1)
            frame = wm.decode(pred.latent[:, 0])[0].clamp(0, 1)
            t_seg += 1
            rows["real"].append(model_pixels(wm, nxt[0]))
            rows["imag"].append((frame * 255).round().byte().cpu().numpy())
            rows["last"].append(model_pixels(wm, context[-1]))
            rows["r"].append(float(rew[0]))
            rows["r_hat"].append(float(pred.reward[0]))
            rows["c_hat"].append(float(pred.cont[0]))
            rows["t"].append(t_seg)
        else:
            context.append(nxt[0])
        if window is None and len(context) == K:
            window = wm.encode(torch.from_numpy(np.stack(context))[None].to(device))
            starts.append(len(rows["real"]))
            t_seg = 0
    env.close()
    if len(rows["real"]) < steps:
        raise RuntimeError(
            f"only {len(rows['real'])} of {steps} open-loop steps in {max_env_steps} env steps: "
            f"are episodes shorter than the {K}-frame context?"
        )
    return OpenLoop(
        real=np.stack(rows["real"]),
        imagined=np.stack(rows["imag"]),
        last_context=np.stack(rows["last"]),
        real_reward=np.array(rows["r"], dtype=np.float32),
        predicted_reward=np.array(rows["r_hat"], dtype=np.float32),
        predicted_continue=np.array(rows["c_hat"], dtype=np.float32),
        step_in_segment=np.array(rows["t"]),
        env_actions=np.array(sent),
        segment_starts=starts,
    )


def model_pixels(wm: WorldModel, frame: np.ndarray) -> np.ndarray:
    """A real uint8 frame ``[H, W]`` as the model sees it (``WorldModel.to_float``), as uint8, to show
    beside imagined frames."""
    return (wm.to_float(torch.from_numpy(frame)) * 255).round().byte().numpy()


def _round_up(n: int, m: int = 16) -> int:
    return (n + m - 1) // m * m


def render_frames(ol: OpenLoop, scale: int = 4) -> np.ndarray:
    """Side-by-side RGB frames ``[T, H', W', 3]``: real | imagined | absolute difference, upscaled, under a
    text line with the step, real and predicted reward. Sizes are multiples of 16 (video codecs)."""
    from PIL import Image, ImageDraw

    T, H, W = ol.real.shape
    ph, pw = H * scale, W * scale
    header = 32
    height, width = _round_up(header + ph + 16), _round_up(3 * pw)
    out = np.zeros((T, height, width, 3), dtype=np.uint8)
    for i in range(T):
        diff = np.abs(ol.real[i].astype(np.int16) - ol.imagined[i].astype(np.int16)).astype(np.uint8)
        panels = [np.stack([p] * 3, axis=-1) for p in (ol.real[i], ol.imagined[i])]
        panels.append(np.stack([diff, diff // 4, diff // 4], axis=-1))  # difference in red
        strip = np.concatenate([np.kron(p, np.ones((scale, scale, 1), dtype=np.uint8)) for p in panels], axis=1)
        img = Image.new("RGB", (width, height))
        img.paste(Image.fromarray(strip), (0, header))
        draw = ImageDraw.Draw(img)
        new = " (new context)" if ol.step_in_segment[i] == 1 else ""
        draw.text(
            (4, 2),
            f"step {i + 1}/{T}, {ol.step_in_segment[i]} after context{new}   "
            f"reward real {ol.real_reward[i]:+.2f}  predicted {ol.predicted_reward[i]:+.2f}   "
            f"continue {ol.predicted_continue[i]:.2f}",
            fill=(255, 255, 255),
        )
        for j, label in enumerate(("real", "imagined (open loop)", "|difference|")):
            draw.text((j * pw + 4, 18), label, fill=(255, 220, 0))
        out[i] = np.asarray(img)
    return out


def write_video(frames: np.ndarray, path: Path, fps: int = 8) -> None:
    """``frames`` ``[T, H, W, 3]`` uint8 to ``.gif`` (Pillow) or ``.mp4`` (imageio-ffmpeg's bundled ffmpeg)."""
    import imageio.v2 as imageio

    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower()
    if suffix == ".gif":
        imageio.mimwrite(path, list(frames), duration=1000 / fps, loop=0)
    elif suffix == ".mp4":
        imageio.mimwrite(path, list(frames), fps=fps, codec="libx264", macro_block_size=16, quality=8)
    else:
        raise ValueError(f"video must end in .gif or .mp4, got {path.name}")


def plot_error(ol: OpenLoop, path: Path, title: str) -> None:
    """PNG of the per-step MSE of the imagined frames next to the copy-last-context baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.5))
    x = np.arange(1, len(ol.real) + 1)
    ax.plot(x, ol.mse(), label="imagined vs real", color="tab:red")
    ax.plot(x, ol.copy_last_mse(), label="last context frame held (baseline)", color="tab:gray", ls="--")
    for s in ol.segment_starts[1:]:
        ax.axvline(s + 0.5, color="k", lw=0.5, alpha=0.4)
    ax.set_xlabel("open-loop step (vertical lines: new real context)")
    ax.set_ylabel("MSE per pixel, [0, 1] scale")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
