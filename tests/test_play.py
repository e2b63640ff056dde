"""``wm-agent play``: the key mapping, the sessions behind the API, the server, the CLI's errors, a browser.

The browser test drives headless Chromium through Selenium; it is skipped, with the reason, where
Chromium or its driver is missing (Debian: ``apt install chromium chromium-driver``). To keep its
screenshot, or to run it on another checkpoint:
``WM_PLAY_CHECKPOINT=RUN_DIR WM_PLAY_SCREENSHOT=out.png python -m pytest tests/test_play.py -k browser``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from agent.dyna import LoadedAgent, load_agent
from agent.play import PlayServer, PlaySession, action_for_keys
from envs import make_env
from tests.test_cli import run

CPU = torch.device("cpu")
BREAKOUT = ["NOOP", "FIRE", "RIGHT", "LEFT"]
FULL = [
    "NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT",
    "UPFIRE", "RIGHTFIRE", "LEFTFIRE", "DOWNFIRE", "UPRIGHTFIRE", "UPLEFTFIRE", "DOWNRIGHTFIRE", "DOWNLEFTFIRE",
]  # fmt: skip


@pytest.fixture(scope="module")
def catch_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("play") / "catch"
    out = run("train", "--env", "wm/Catch-v0", "--preset", "debug", "--threads", "1", "--steps", "200",
              "--run-dir", str(run_dir))  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def agent(catch_run: Path) -> LoadedAgent:
    torch.manual_seed(0)
    return load_agent(catch_run, CPU)


@pytest.fixture
def server(agent: LoadedAgent) -> Iterator[str]:
    srv = PlayServer(agent, "127.0.0.1", 0, fps=15, seed=5, device=CPU)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}"
    srv.shutdown()
    srv.server_close()
    srv.close_all()


def call(url: str, body: dict | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def frame(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def replay_real(agent: LoadedAgent, seed: int, actions: list[int]) -> np.ndarray:
    """The real frame a fresh env shows after the session's context NOOPs and then ``actions``."""
    env = make_env(agent.cfg.env, num_envs=1, seed=seed)
    obs, _ = env.reset(seed=seed)
    noop = env.action_meanings.index("NOOP")
    for a in [noop] * (agent.cfg.world_model.context - 1) + actions:
        obs, *_ = env.step(np.array([a]))
    env.close()
    return obs[0]


def test_keys_map_to_the_games_actions() -> None:
    assert action_for_keys({"left"}, BREAKOUT) == 3
    assert action_for_keys(["fire"], BREAKOUT) == 1
    assert action_for_keys({"left", "fire"}, BREAKOUT) == 3  # no LEFTFIRE in Breakout: fire dropped
    assert action_for_keys({"left", "right"}, BREAKOUT) == 0  # opposite directions cancel
    assert action_for_keys({"up", "bogus"}, BREAKOUT) == 0  # no UP: NOOP; unknown keys ignored
    assert action_for_keys({"up", "left", "fire"}, FULL) == FULL.index("UPLEFTFIRE")
    assert action_for_keys({"down", "right"}, FULL) == FULL.index("DOWNRIGHT")
    assert action_for_keys(set(), ["LEFT", "NOOP", "RIGHT"]) == 1


def test_session_keeps_real_and_imagined_in_step(agent: LoadedAgent) -> None:
    s = PlaySession(agent, seed=3, device=CPU)
    K = agent.cfg.world_model.context
    start_imagined = s.imagined_frame.copy()
    actions = []
    for keys in (["left"], ["left"], [], ["right"]):
        s.step(keys)
        actions.append(s.meanings.index(s.info.action))
    assert actions == [0, 0, 1, 2]  # Catch: LEFT, NOOP, RIGHT
    assert s.info.steps_since_sync == 4 and s.info.episode == 1
    assert np.array_equal(s.real_frame, replay_real(agent, 3, actions))
    assert not np.array_equal(s.imagined_frame, start_imagined)
    # Dream mode: the real game waits, the imagination goes on.
    real_before = s.real_frame.copy()
    s.step(["left"], dream=True)
    assert np.array_equal(s.real_frame, real_before) and s.info.steps_since_sync == 5
    # Re-sync: imagination restarts from the last K real frames.
    s.resync()
    expected = agent.wm.decode(agent.wm.encode(torch.from_numpy(np.stack(s.recent[-K:]))[None])[:, -1])
    assert s.info.steps_since_sync == 0
    assert np.array_equal(s.imagined_frame, (expected[0].clamp(0, 1) * 255).round().byte().numpy())
    # The agent plays; a real episode end restarts both games (Catch episodes are 14 steps).
    for _ in range(20):
        s.step([], agent_acts=True)
        assert s.info.action in s.meanings
    assert s.info.episode == 2 and s.info.steps_since_sync < 20
    s.close()


def test_server_api_frames_sessions_and_errors(server: str, agent: LoadedAgent) -> None:
    with urllib.request.urlopen(server + "/", timeout=30) as r:
        assert "wm-agent play" in r.read().decode()
    status, info = call(server + "/api/info")
    assert status == 200 and info["env"] == "wm/Catch-v0" and info["actions"] == ["LEFT", "NOOP", "RIGHT"]

    _, a = call(server + "/api/session", {})
    _, b = call(server + "/api/session", {})
    assert a["id"] != b["id"]
    assert frame(a["state"]["real"]).shape == frame(a["state"]["imagined"]).shape == (64, 64)
    # Two tabs: A's game is what its own seed and keys make of it, whatever B does in between.
    for _ in range(3):
        status, sa = call(server + "/api/step", {"id": a["id"], "keys": ["right"]})
        assert status == 200
        call(server + "/api/step", {"id": b["id"], "keys": ["left"], "dream": True})
    assert sa["state"]["steps_since_sync"] == 3 and sa["state"]["action"] == "RIGHT"
    assert np.array_equal(frame(sa["state"]["real"]), replay_real(agent, 5, [2, 2, 2]))  # first tab: --seed
    _, sb = call(server + "/api/step", {"id": b["id"], "keys": ["nonsense", 3]})
    assert sb["state"]["action"] == "NOOP" and sb["state"]["steps_since_sync"] == 4
    _, sa = call(server + "/api/resync", {"id": a["id"]})
    assert sa["state"]["steps_since_sync"] == 0

    assert call(server + "/api/step", {"id": "nope"})[0] == 404
    assert call(server + "/api/step", raw=b"not json")[0] == 400
    assert call(server + "/api/step", raw=b"[1, 2]")[0] == 400
    assert call(server + "/api/teleport", {"id": a["id"]})[0] == 404


def test_close_ends_every_request_thread_even_with_stalled_clients(agent: LoadedAgent) -> None:
    # No request thread may outlive the server: one left running while the interpreter shuts down can abort it.
    before = set(threading.enumerate())
    srv = PlayServer(agent, "127.0.0.1", 0, fps=15, seed=5, device=CPU)
    serving = threading.Thread(target=srv.serve_forever, daemon=True)
    serving.start()
    closing = threading.Thread(target=srv.server_close, daemon=True)
    silent = socket.create_connection(("127.0.0.1", srv.server_port))  # a browser's preconnect sends nothing
    stalled = socket.create_connection(("127.0.0.1", srv.server_port))
    stalled.sendall(b"POST /api/step HTTP/1.0\r\nContent-Length: 100\r\n\r\n{")  # and never the rest
    try:
        assert call(f"http://127.0.0.1:{srv.server_port}/api/info")[0] == 200
        with socket.create_connection(("127.0.0.1", srv.server_port), timeout=30) as negative:
            negative.sendall(b"POST /api/step HTTP/1.0\r\nContent-Length: -1\r\n\r\n")
            assert negative.recv(64).startswith(b"HTTP/1.0 400")
    finally:
        srv.shutdown()
        serving.join()
        closing.start()
        closing.join(timeout=60)
        silent.close()
        stalled.close()
        srv.close_all()
    assert not closing.is_alive()
    assert set(threading.enumerate()) <= before


def test_cli_errors_are_one_line_before_serving(tmp_path: Path, catch_run: Path) -> None:
    missing = run("play", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    broken = tmp_path / "state.pt"
    broken.write_bytes(b"not a checkpoint")
    bad = run("play", str(broken))
    assert bad.returncode == 2 and "state.pt" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        busy = run("play", str(catch_run), "--port", str(port), "--threads", "1")
    assert busy.returncode == 2 and f"port {port}" in busy.stderr


def test_cli_serves_warns_on_open_host_and_stops_on_ctrl_c(catch_run: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "play", str(catch_run), "--port", "0", "--host", "0.0.0.0",
         "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A suite started in the background inherits an ignored SIGINT, and so would the server.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        lines = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not any("play at" in line for line in lines):
            lines.append(proc.stdout.readline())
        url = next(line for line in lines if "play at" in line).split()[2]
        assert "fps" in "".join(lines)  # it says how fast the model steps here
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        status, info = call(f"http://127.0.0.1:{port}/api/info")
        assert status == 200 and info["env"] == "wm/Catch-v0"
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    assert "anyone" in err and "warning" in err


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="no Chromium and chromedriver (apt install chromium chromium-driver)")
def test_browser_plays_and_frames_change(tmp_path: Path, agent: LoadedAgent) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    chosen = os.environ.get("WM_PLAY_CHECKPOINT")
    played = load_agent(Path(chosen), CPU) if chosen else agent
    srv = PlayServer(played, "127.0.0.1", 0, fps=15, seed=0, device=CPU)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    browser, driver_path = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=860,820"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(f"http://127.0.0.1:{srv.server_port}/")
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: (d.find_element(By.ID, "imagined").get_attribute("src") or "").startswith("data:"))
        first = driver.find_element(By.ID, "imagined").get_attribute("src")
        body = driver.find_element(By.TAG_NAME, "body")
        for key in (Keys.ARROW_LEFT, Keys.ARROW_RIGHT, Keys.SPACE) * 3:
            body.send_keys(key)
        wait.until(lambda d: int(d.find_element(By.ID, "steps_since_sync").text or 0) >= 8)
        assert driver.find_element(By.ID, "imagined").get_attribute("src") != first
        assert driver.find_element(By.ID, "error").text == ""
        body.send_keys("r")  # re-sync
        wait.until(lambda d: int(d.find_element(By.ID, "steps_since_sync").text or 99) < 8)
        body.send_keys("a")  # the agent plays
        time.sleep(1.0)
        assert driver.find_element(By.ID, "agent").is_selected()
        shot = tmp_path / "play.png"
        driver.save_screenshot(str(shot))
        assert Image.open(shot).size[0] > 700
        if target := os.environ.get("WM_PLAY_SCREENSHOT"):
            shutil.copy(shot, target)
    finally:
        driver.quit()
        srv.shutdown()
        srv.server_close()
        srv.close_all()


@pytest.mark.skipif(shutil.which("firefox") is None, reason="no Firefox (apt install firefox-esr)")
def test_firefox_plays_over_webdriver_bidi(server: str, tmp_path: Path) -> None:
    """Firefox speaks WebDriver BiDi itself, so no geckodriver is needed: load the page, press keys,
    see the game step and the imagined frame change."""
    websocket = pytest.importorskip("websocket", reason="websocket-client is not installed (it comes with selenium)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ff = subprocess.Popen(
        ["firefox", "--headless", "--remote-debugging-port", str(port), "--profile", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline, ws = time.monotonic() + 60, None
        while ws is None:
            try:  # Firefox refuses connections that carry an Origin header
                ws = websocket.create_connection(f"ws://127.0.0.1:{port}/session", timeout=30, suppress_origin=True)
            except OSError:
                assert time.monotonic() < deadline, "Firefox's WebDriver BiDi endpoint did not come up"
                time.sleep(0.5)
        ids = iter(range(1, 10**6))

        def bidi(method: str, params: dict) -> dict:
            n = next(ids)
            ws.send(json.dumps({"id": n, "method": method, "params": params}))
            while (msg := json.loads(ws.recv())).get("id") != n:
                pass
            assert msg.get("type") != "error", msg
            return msg["result"]

        def page(expr: str) -> str:
            res = bidi("script.evaluate", {"expression": expr, "target": {"context": ctx}, "awaitPromise": True})
            return res["result"].get("value") or ""

        def wait_for(cond: str) -> None:
            deadline = time.monotonic() + 60
            while page(cond) is not True and time.monotonic() < deadline:
                time.sleep(0.2)
            assert page(cond) is True, cond

        bidi("session.new", {"capabilities": {}})
        ctx = bidi("browsingContext.getTree", {})["contexts"][0]["context"]
        bidi("browsingContext.navigate", {"context": ctx, "url": server + "/", "wait": "complete"})
        wait_for("document.getElementById('imagined').src.startsWith('data:')")
        first = page("document.getElementById('imagined').src")
        presses = [{"type": t, "value": k} for k in ("\ue012", "\ue014", " ") for t in ("keyDown", "keyUp")]
        bidi("input.performActions", {"context": ctx, "actions": [{"type": "key", "id": "kb", "actions": presses}]})
        wait_for("Number(document.getElementById('steps_since_sync').textContent) >= 8")
        assert page("document.getElementById('imagined').src") != first
        assert page("document.getElementById('error').textContent") == ""
        ws.close()
    finally:
        ff.kill()
        ff.wait()
