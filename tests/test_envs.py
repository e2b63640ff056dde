"""Tests of the envs package: the vector-env contract of envs/base.py on Atari and Catch."""

from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from envs import CATCH_ID, FRAME_SIZE, AtariEnv, AtariGymEnv, EnvSettings, EnvSpecError, make_env
from envs.atari import AreaResize
from envs.catch import (
    BALL_START_Y,
    EPISODE_STEPS,
    LANDING_Y,
    MAX_PADDLE_X,
    PADDLE_START_X,
    CatchState,
    CatchVecEnv,
    register,
)

INFO_DTYPES = {"is_first": bool, "life_loss": bool, "episode_return": np.float64, "episode_length": np.int64}


def check_step(out: tuple, n: int) -> None:
    obs, reward, terminated, truncated, info = out
    assert obs.shape == (n, FRAME_SIZE, FRAME_SIZE) and obs.dtype == np.uint8
    assert reward.shape == (n,) and reward.dtype == np.float32
    assert terminated.shape == (n,) and terminated.dtype == bool
    assert truncated.shape == (n,) and truncated.dtype == bool
    check_info(info, n)


def check_info(info: dict, n: int) -> None:
    for key, dtype in INFO_DTYPES.items():
        assert info[key].shape == (n,) and info[key].dtype == dtype, key


@pytest.mark.parametrize(
    ("env_id", "backend", "num_actions"),
    [
        ("ALE/Breakout-v5", "auto", 4),
        ("ALE/Pong-v5", "auto", 6),
        ("ALE/Breakout-v5", "gym", 4),
        (CATCH_ID, "auto", 3),
    ],
)
def test_shapes_and_dtypes(env_id: str, backend: str, num_actions: int) -> None:
    env = make_env(env_id, num_envs=3, seed=1, backend=backend)
    try:
        assert env.num_envs == 3 and env.num_actions == num_actions
        assert env.single_action_space == gym.spaces.Discrete(num_actions)
        assert env.settings == EnvSettings(env_id, 3, 1)
        obs, info = env.reset()
        assert obs.shape == (3, FRAME_SIZE, FRAME_SIZE) and obs.dtype == np.uint8
        check_info(info, 3)
        assert info["is_first"].all() and not info["life_loss"].any()
        rng = np.random.default_rng(0)
        for _ in range(5):
            check_step(env.step(rng.integers(0, num_actions, 3)), 3)
    finally:
        env.close()


@pytest.mark.parametrize("env_id", ["ALE/Breakout-v5", CATCH_ID])
def test_seeding(env_id: str) -> None:
    def first_frames(seed: int, steps: int = 3) -> np.ndarray:
        env = make_env(env_id, num_envs=4, seed=seed)
        frames = [env.reset()[0]]
        for _ in range(steps):
            frames.append(env.step(np.ones(4, dtype=np.int64))[0])
        env.close()
        return np.stack(frames)

    same = first_frames(7)
    np.testing.assert_array_equal(same, first_frames(7))
    assert not np.array_equal(same, first_frames(8))


def test_explicit_reset_seed_overrides_settings() -> None:
    env = make_env(CATCH_ID, num_envs=4, seed=0)
    a = env.reset(seed=5)[0]
    b = make_env(CATCH_ID, num_envs=4, seed=5).reset()[0]
    np.testing.assert_array_equal(a, b)


def test_breakout_life_loss_vs_game_over() -> None:
    env = make_env("ALE/Breakout-v5", num_envs=1, seed=3)
    rng = np.random.default_rng(0)
    env.reset()
    rewards, life_losses = 0.0, 0
    for steps in range(1, 5000):  # noqa: B007 - steps is the episode length after the loop
        _, reward, terminated, truncated, info = env.step(rng.integers(0, 4, 1))
        assert not truncated[0] and not info["is_first"][0]
        rewards += float(reward[0])
        if info["life_loss"][0] and not terminated[0]:
            life_losses += 1
            assert np.isnan(info["episode_return"][0]) and info["episode_length"][0] == 0
        if terminated[0]:
            break
    else:
        pytest.fail("Breakout did not end under random play")
    assert life_losses == 4
    assert info["episode_return"][0] == rewards and info["episode_length"][0] == steps

    obs, reward, terminated, truncated, info = env.step(np.array([2]))
    assert info["is_first"][0] and not info["life_loss"][0]
    assert reward[0] == 0 and not terminated[0] and not truncated[0]
    assert np.isnan(info["episode_return"][0])
    _, _, _, _, info = env.step(np.array([0]))
    assert not info["is_first"][0]
    env.close()


@pytest.mark.parametrize("cls", [AtariEnv, AtariGymEnv])
def test_atari_time_limit_truncates(cls: type) -> None:
    env = cls(EnvSettings("ALE/Breakout-v5", 1, 0, max_episode_frames=200))
    env.reset()
    for steps in range(1, 100):  # noqa: B007 - steps is the episode length after the loop
        _, _, terminated, truncated, info = env.step(np.array([1]))
        if truncated[0]:
            break
    assert truncated[0] and not terminated[0]
    assert info["episode_length"][0] == steps and np.isfinite(info["episode_return"][0])
    assert env.step(np.array([1]))[4]["is_first"][0]
    env.close()


def test_catch_next_step_autoreset() -> None:
    env = make_env(CATCH_ID, num_envs=2, seed=0)
    obs, info = env.reset()
    assert (obs[:, BALL_START_Y : BALL_START_Y + 4] == 255).any(axis=(1, 2)).all()
    for t in range(1, EPISODE_STEPS + 1):
        obs, reward, terminated, truncated, info = env.step(np.array([0, 2]))
        assert not truncated.any() and not info["life_loss"].any() and not info["is_first"].any()
        assert terminated.all() == (t == EPISODE_STEPS)
    assert set(reward.tolist()) <= {-1.0, 1.0}
    np.testing.assert_array_equal(info["episode_return"], reward)
    np.testing.assert_array_equal(info["episode_length"], [EPISODE_STEPS] * 2)
    assert (obs[:, LANDING_Y] == 255).any(axis=1).all(), "the terminal step shows the final frame"
    np.testing.assert_array_equal(env.state.paddle_x, [0, MAX_PADDLE_X])

    obs, reward, terminated, truncated, info = env.step(np.array([0, 0]))
    assert info["is_first"].all() and not terminated.any() and not truncated.any()
    assert (reward == 0).all() and np.isnan(info["episode_return"]).all()
    np.testing.assert_array_equal(env.state.paddle_x, [PADDLE_START_X] * 2)  # actions ignored
    assert (obs[:, BALL_START_Y : BALL_START_Y + 4] == 255).any(axis=(1, 2)).all()
    _, _, _, _, info = env.step(np.array([0, 0]))
    assert not info["is_first"].any()


def test_catch_copies_do_not_depend_on_num_envs() -> None:
    small, large = make_env(CATCH_ID, num_envs=2, seed=3), make_env(CATCH_ID, num_envs=5, seed=3)
    np.testing.assert_array_equal(small.reset()[0], large.reset()[0][:2])
    for _ in range(3 * EPISODE_STEPS):
        np.testing.assert_array_equal(small.step(np.ones(2))[0], large.step(np.ones(5))[0][:2])


def test_catch_one_frame_hides_direction() -> None:
    left = CatchState(*(np.array([v]) for v in (30, BALL_START_Y, -6, PADDLE_START_X)))
    right = CatchState(*(np.array([v]) for v in (30, BALL_START_Y, 6, PADDLE_START_X)))
    np.testing.assert_array_equal(left.render(), right.render())
    assert left.landing_x()[0] != right.landing_x()[0]


def chase(env: CatchVecEnv, target_ball_x: np.ndarray) -> np.ndarray:
    """Moves each paddle so that its centre approaches the centre of a ball at target_ball_x."""
    target = np.clip(target_ball_x - 4, 0, MAX_PADDLE_X)
    paddle = env.state.paddle_x
    return np.where(paddle < target - 2, 2, np.where(paddle > target + 2, 0, 1))


def catch_rate(policy: str, balls: int = 200, num_envs: int = 8) -> float:
    env = make_env(CATCH_ID, num_envs=num_envs, seed=0)
    env.reset()
    returns: list[float] = []
    while len(returns) < balls:
        if policy == "oracle":
            actions = chase(env, env.state.landing_x())
        else:
            actions = chase(env, env.state.ball_x)
        _, _, _, _, info = env.step(actions)
        returns += info["episode_return"][~np.isnan(info["episode_return"])].tolist()
    return float(np.mean(np.array(returns[:balls]) > 0))


def test_catch_oracle_catches_all_and_ball_follower_does_not() -> None:
    oracle, follower = catch_rate("oracle"), catch_rate("follow")
    print(f"Catch rate over 200 balls: oracle {oracle:.2f}, follow-current-x {follower:.2f}")
    assert oracle == 1.0
    assert follower < 0.8


def test_catch_gymnasium_registration() -> None:
    register()
    env = gym.make(CATCH_ID)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (FRAME_SIZE, FRAME_SIZE) and obs.dtype == np.uint8
    for _ in range(EPISODE_STEPS):
        obs, reward, terminated, truncated, _ = env.step(1)
    assert terminated and reward in (-1.0, 1.0) and not truncated
    env.close()


def test_area_resize_matches_box_filter() -> None:
    frame = np.random.default_rng(0).integers(0, 256, (210, 160), dtype=np.uint8)
    out = AreaResize((210, 160), (64, 64))(frame)
    assert out.shape == (64, 64) and out.dtype == np.uint8
    # Output pixel (0, 0) averages rows [0, 210/64) and cols [0, 2.5) with fractional edge weights.
    rows = np.array([1, 1, 1, 210 / 64 - 3])[:, None]
    cols = np.array([1, 1, 0.5])[None, :]
    expected = (frame[:4, :3] * rows * cols).sum() / (rows.sum() * cols.sum())
    assert abs(int(out[0, 0]) - expected) <= 0.5 + 1e-6
    flat = np.full((210, 160), 77, dtype=np.uint8)
    assert (AreaResize((210, 160), (64, 64))(flat) == 77).all()


@pytest.mark.parametrize(
    ("env_id", "message"),
    [
        ("ALE/Breakuot-v5", "unknown env id 'ALE/Breakuot-v5'; did you mean ALE/Breakout-v5?"),
        ("CartPole-v1", "wm-agent needs image observations; CartPole-v1 has Box(4,)"),
        ("Pendulum-v1", "wm-agent needs a discrete action space; Pendulum-v1 has Box(1,)"),
        ("BreakoutNoFrameskip-v4", "did you mean ALE/Breakout-v5?"),
    ],
)
def test_env_id_errors(env_id: str, message: str) -> None:
    with pytest.raises(EnvSpecError) as e:
        make_env(env_id)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_continuous_image_env_is_rejected() -> None:
    class ContinuousPixels(gym.Env):
        observation_space = gym.spaces.Box(0, 255, (64, 64, 3), np.uint8)
        action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    if "test/ContinuousPixels-v0" not in gym.registry:
        gym.register("test/ContinuousPixels-v0", entry_point=ContinuousPixels)
    with pytest.raises(EnvSpecError, match="needs a discrete action space; .* has Box\\(2,\\)"):
        make_env("test/ContinuousPixels-v0")


@pytest.mark.parametrize("kwargs", [{"num_envs": 0}, {"num_envs": -2}, {"sticky_actions": 1.5}, {"backend": "cuda"}])
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(EnvSpecError):
        make_env(CATCH_ID, **kwargs)


def test_envs_package_does_not_import_torch() -> None:
    import subprocess
    import sys

    code = "import sys, envs; envs.make_env('wm/Catch-v0'); print('torch' in sys.modules)"
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.strip() == "False"
