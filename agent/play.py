"""Play inside the world model in a browser: the real game and its imagination side by side.

``wm-agent play RUN`` serves one page (``play.html``, no build step) and a small JSON API over HTTP.
Each browser tab gets its own :class:`PlaySession`: a real env and the world model's latent window,
started from the same real context frames and driven by the same actions (the player's keys or the
policy). Frames travel as base64 PNGs inside the JSON replies; the page asks for the next step at
the chosen frame rate, so the model runs at that rate or as fast as it can.

API (every reply is JSON; errors are ``{"error": "..."}`` with a 4xx status):
  GET  /api/info                                    env, actions, keys, fps, device
  POST /api/session                                 a new session: ``{"id", "state"}``
  POST /api/step    {"id", "keys", "agent", "dream"} one step; ``keys`` from left/right/up/down/fire
  POST /api/resync  {"id"}                          imagination restarts from the last real frames
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import numpy as np
import torch

from agent.actor import RealEnvActor
from agent.dyna import LoadedAgent
from agent.watch import model_pixels
from envs import make_env

KEYS = ("left", "right", "up", "down", "fire")
MAX_SESSIONS = 16
IDLE_SECONDS = 15 * 60


def action_for_keys(keys: set[str] | list[str], meanings: list[str]) -> int:
    """The env action for a set of held keys, from ALE's action names (``UPLEFTFIRE``, ``RIGHT``, ...).

    Keys outside :data:`KEYS` are ignored; opposite directions cancel; where the game lacks the exact
    combination, the nearest one it has (fire dropped first, then one direction), else NOOP (else 0)."""
    held = {k for k in keys if k in KEYS}
    vert = "UP" if "up" in held and "down" not in held else "DOWN" if "down" in held and "up" not in held else ""
    horiz = (
        "LEFT" if "left" in held and "right" not in held else "RIGHT" if "right" in held and "left" not in held else ""
    )
    fire = "FIRE" if "fire" in held else ""
    for name in (vert + horiz + fire, vert + horiz, horiz + fire, vert + fire, horiz, vert, fire):
        if name and name in meanings:
            return meanings.index(name)
    return meanings.index("NOOP") if "NOOP" in meanings else 0


def png_base64(frame: np.ndarray) -> str:
    """A uint8 frame ``[H, W]`` as a base64 PNG."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


@dataclass
class StepInfo:
    """What the page shows after a step."""

    action: str = "NOOP"
    real_reward: float = 0.0
    predicted_reward: float = 0.0
    predicted_continue: float = 1.0
    real_return: float = 0.0
    imagined_return: float = 0.0
    steps_since_sync: int = 0
    episode: int = 1
    step_ms: float = 0.0


class PlaySession:
    """One player's game: the real env and the world model's imagination from the same real context.

    In side-by-side mode each action steps both; the imagination is open loop (it never sees the real
    frames again until :meth:`resync`, or a new real episode, re-encodes the last ``K`` real frames). In
    dream mode only the imagination steps and the real game waits. Returns count from the episode's
    start; a re-sync leaves them as they are.
    """

    def __init__(self, agent: LoadedAgent, seed: int, device: torch.device) -> None:
        self.agent, self.device = agent, device
        self.wm, self.policy = agent.wm, agent.policy
        self.K = agent.cfg.world_model.context
        self.env = make_env(agent.cfg.env, num_envs=1, seed=seed, sticky_actions=agent.cfg.sticky_actions)
        self.meanings: list[str] = list(self.env.action_meanings)
        self.noop = action_for_keys(set(), self.meanings)
        self.actor = RealEnvActor(self.wm, self.policy, 1, device)
        self.last_used = time.monotonic()
        self.info = StepInfo()
        obs, info = self.env.reset(seed=seed)
        self._start_episode(obs, info["is_first"])

    def _start_episode(self, obs: np.ndarray, is_first: np.ndarray) -> None:
        """A real episode begins: ``K - 1`` NOOPs gather the world model's context, then imagination syncs."""
        self.actor.observe(obs, is_first)
        self.recent = [obs[0]]
        while len(self.recent) < self.K:
            obs, _, _, _, info = self.env.step(np.array([self.noop]))
            self.actor.observe(obs, info["is_first"])
            self.recent = [obs[0]] if info["is_first"][0] else [*self.recent, obs[0]]
        self.real_frame = obs[0]
        self.info.real_return = self.info.imagined_return = 0.0
        self.resync()

    @torch.no_grad()
    def resync(self) -> None:
        """Imagination restarts from the last ``K`` real frames; its frame is the decoded last latent."""
        frames = torch.from_numpy(np.stack(self.recent[-self.K :]))[None].to(self.device)
        self.window = self.wm.encode(frames)  # (1, K, E)
        self.imagined_frame = self._decode(self.window[:, -1])
        self.info.steps_since_sync = 0

    def _decode(self, z: torch.Tensor) -> np.ndarray:
        """Latent ``[1, E]`` -> uint8 frame ``[H, W]`` in the model's pixels."""
        return (self.wm.decode(z)[0].clamp(0, 1) * 255).round().byte().cpu().numpy()

    @torch.no_grad()
    def step(self, keys: set[str] | list[str], agent_acts: bool = False, dream: bool = False) -> None:
        """One step of the player's keys (or, with ``agent_acts``, the policy's sampled action)."""
        t0 = time.perf_counter()
        self.last_used = time.monotonic()
        if agent_acts:  # the policy reads the frames of the game it plays: imagined in a dream, else real
            action = int(self.policy.act(self.window)[0] if dream else self.actor.act()[0])
        else:
            action = action_for_keys(keys, self.meanings)
        self.info.action = self.meanings[action]
        if not dream:
            obs, rew, _, _, info = self.env.step(np.array([action]))
            self.info.real_reward = float(rew[0])
            if info["is_first"][0]:  # the real episode ended: both games start again from its new frames
                self.info.episode += 1
                self._start_episode(obs, info["is_first"])
                self.info.step_ms = 1000 * (time.perf_counter() - t0)
                return
            self.actor.observe(obs, info["is_first"])
            self.recent = [*self.recent[-self.K + 1 :], obs[0]] if self.K > 1 else [obs[0]]
            self.real_frame = obs[0]
            self.info.real_return += self.info.real_reward
        pred = self.wm.imagine_step(self.window, torch.tensor([action], device=self.device))
        self.window = torch.cat([self.window[:, 1:], pred.latent], dim=1)
        self.imagined_frame = self._decode(pred.latent[:, 0])
        self.info.predicted_reward = float(pred.reward[0])
        self.info.predicted_continue = float(pred.cont[0])
        self.info.imagined_return += self.info.predicted_reward
        self.info.steps_since_sync += 1
        self.info.step_ms = 1000 * (time.perf_counter() - t0)

    def state(self) -> dict:
        return {
            "real": png_base64(model_pixels(self.wm, self.real_frame)),
            "imagined": png_base64(self.imagined_frame),
            **self.info.__dict__,
        }

    def close(self) -> None:
        self.env.close()


class PlayServer(ThreadingHTTPServer):
    """The HTTP server: one page, the JSON API, a session per browser tab. Model calls take one lock.

    Request threads are joined on close, so none is left running while the interpreter shuts down; close
    first shuts down every open connection, so a client that sends nothing (a browser's preconnect) or
    trickles bytes cannot hold Ctrl-C up.
    """

    daemon_threads = False

    def __init__(self, agent: LoadedAgent, host: str, port: int, fps: int, seed: int, device: torch.device) -> None:
        self.agent, self.fps, self.seed, self.device = agent, fps, seed, device
        self.sessions: dict[str, PlaySession] = {}
        self.lock = threading.Lock()
        self.created = 0
        self.open_requests: set[socket.socket] = set()
        self.requests_lock = threading.Lock()
        env = make_env(agent.cfg.env, num_envs=1, seed=seed)
        self.meanings: list[str] = list(env.action_meanings)
        env.close()
        super().__init__((host, port), PlayHandler)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        with self.requests_lock:
            self.open_requests.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self.requests_lock:
            self.open_requests.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        with self.requests_lock:
            for request in self.open_requests:
                try:
                    request.shutdown(socket.SHUT_RDWR)  # its thread's read returns at once
                except OSError:
                    pass
        super().server_close()  # joins the request threads

    def info(self) -> dict:
        return {
            "env": self.agent.cfg.env,
            "checkpoint": str(self.agent.checkpoint),
            "env_steps_trained": self.agent.env_steps,
            "context": self.agent.cfg.world_model.context,
            "fps": self.fps,
            "device": str(self.device),
            "keys": list(KEYS),
            "actions": self.meanings,
        }

    def new_session(self) -> tuple[str, PlaySession]:
        with self.lock:
            now = time.monotonic()
            for sid in [s for s, sess in self.sessions.items() if now - sess.last_used > IDLE_SECONDS]:
                self.sessions.pop(sid).close()
            if len(self.sessions) >= MAX_SESSIONS:
                raise SessionError(HTTPStatus.SERVICE_UNAVAILABLE, f"{MAX_SESSIONS} games are open; close a tab")
            # Each tab plays its own real game: seeds follow --seed in the order the tabs opened.
            session = PlaySession(self.agent, self.seed + self.created, self.device)
            self.created += 1
            sid = secrets.token_hex(8)
            self.sessions[sid] = session
            return sid, session

    def session(self, sid: object) -> PlaySession:
        if not isinstance(sid, str) or sid not in self.sessions:
            raise SessionError(HTTPStatus.NOT_FOUND, "no such game (it may have been idle too long): reload the page")
        return self.sessions[sid]

    def close_all(self) -> None:
        with self.lock:
            for session in self.sessions.values():
                session.close()
            self.sessions.clear()


class SessionError(Exception):
    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


class PlayHandler(BaseHTTPRequestHandler):
    server: PlayServer
    timeout = 10  # seconds a connection may stay silent while serving before it is dropped

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass  # one line per frame would drown the terminal

    def _reply(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the tab was closed mid-reply

    def _json(self, obj: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._reply(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self) -> None:  # noqa: N802 - the base class's name
        if self.path in ("/", "/index.html"):
            page = resources.files("agent").joinpath("play.html").read_bytes()
            self._reply(HTTPStatus.OK, page, "text/html; charset=utf-8")
        elif self.path == "/api/info":
            self._json(self.server.info())
        else:
            self._json({"error": f"no such page: {self.path}"}, HTTPStatus.NOT_FOUND)

    def do_POST(self) -> None:  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length < 0:
                raise ValueError(f"Content-Length {length}")
            body = json.loads(self.rfile.read(length) or b"{}") if length else {}
            if not isinstance(body, dict):
                raise SessionError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
            if self.path == "/api/session":
                sid, session = self.server.new_session()
                with self.server.lock:
                    self._json({"id": sid, "actions": session.meanings, "state": session.state()})
                return
            with self.server.lock:
                session = self.server.session(body.get("id"))
                if self.path == "/api/step":
                    keys = body.get("keys") or []
                    keys = [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
                    session.step(keys, agent_acts=bool(body.get("agent")), dream=bool(body.get("dream")))
                elif self.path == "/api/resync":
                    session.resync()
                else:
                    raise SessionError(HTTPStatus.NOT_FOUND, f"no such call: {self.path}")
                self._json({"state": session.state()})
        except SessionError as e:
            self._json({"error": str(e)}, e.status)
        except (json.JSONDecodeError, ValueError) as e:
            self._json({"error": f"bad request: {e}"}, HTTPStatus.BAD_REQUEST)


def measure_step_ms(agent: LoadedAgent, seed: int, device: torch.device, steps: int = 10) -> float:
    """Median milliseconds of one side-by-side step (real env, world model, two PNGs) on this machine."""
    session = PlaySession(agent, seed, device)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        session.step([])
        session.state()
        times.append(1000 * (time.perf_counter() - t0))
    session.close()
    return float(np.median(times))
