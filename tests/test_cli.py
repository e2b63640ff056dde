"""The CLI end to end, in subprocesses, on the debug preset and the ROM-free Catch env."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import json
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pytest


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_help_lists_commands() -> None:
    out = run("--help")
    assert out.returncode == 0
    assert "train" in out.stdout and "eval" in out.stdout


def test_train_help_documents_fields() -> None:
    out = run("train", "--help")
    assert out.returncode == 0
    assert "--steps" in out.stdout and "--world-model.encoder.embed-dim" in out.stdout


def _undocumented_fields(cls: type, prefix: str = "") -> list[str]:
    """Config fields with no docstring under them (``train --help`` would show only a default)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    documented = {
        a.target.id
        for a, b in itertools.pairwise(body)
        if isinstance(a, ast.AnnAssign) and isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant)
    }
    hints = typing.get_type_hints(cls)
    missing = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            missing += _undocumented_fields(hints[f.name], f"{prefix}{f.name}.")
        elif f.name not in documented:
            missing.append(f"{prefix}{f.name}")
    return missing


def test_every_train_config_field_has_a_help_text() -> None:
    from agent.config import TrainConfig

    assert _undocumented_fields(TrainConfig) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--env", "ALE/Breakuot-v5"], "did you mean ALE/Breakout-v5"),
        (["--env", "CartPole-v1"], "image observations"),
        (["--env", "Pendulum-v1"], "discrete action"),
        (["--steps", "0"], "--steps must be positive"),
        (["--num-envs", "0"], "--num-envs must be positive"),
        (["--ppo.horizon", "0"], "horizon must be positive"),
        (["--ppo.critic-targets", "both"], "critic-targets must be imagined or real"),
        (["--ppo.self-imitation", "1"], "needs --ppo.critic-targets real"),
        (["--ppo.self-imitation", "-1"], "--ppo.self-imitation must be >= 0"),
        (["--preset", "cpu", "--ppo.critic-targets", "imagined"], "add --ppo.self-imitation 0"),
        (["--preset", "huge"], "unknown preset"),
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--world-model.context", "20", "--warmup-steps", "20", "--collect-steps", "20"], "raise --warmup-steps"),
        (["--world-model.context", "60"], "(60) exceeds --world-model.predictor.max-context (32)"),
        (["--world-model.predictor.embed-dim", "48"], "--world-model.predictor.embed-dim (48) must equal"),
        (["--env", "wm/Catch-v0", "--world-model.context", "20", "--warmup-steps", "400"], "shorter than the sequence"),
        (["--head-rewarded-fraction", "1.5"], "--head-rewarded-fraction must be in [0, 1]"),
        (["--slow-world-model-decay", "1"], "--slow-world-model-decay must be in [0, 1)"),
        (["--world-model.loss.motion-map", "-1"], "--world-model.loss.motion-map must be >= 0"),
        (["--world-model.loss.motion-map-cells", "0"], "motion-map-cells in 1..64"),
        (["--world-model.pixel-gain", "0.5"], "--world-model.pixel-gain must be >= 1"),
        (["--world-model.loss.motion-map-predicted", "1"], "only with --world-model.loss.motion-map > 0"),
        (["--no-such-field", "1"], "no-such-field"),
        (["--steps", "many"], "many"),
        (["--device", "cuda"], None),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str | None) -> None:
    import torch

    if args == ["--device", "cuda"]:
        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
        message = "no CUDA GPU"
    preset_args = [] if "--preset" in args else ["--preset", "debug"]
    out = run("train", *preset_args, "--run-dir", str(tmp_path / "r"), *args)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_train_then_eval_on_catch(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    out = run(
        "train",
        "--env",
        "wm/Catch-v0",
        "--preset",
        "debug",
        "--run-dir",
        str(run_dir),
        "--steps",
        "400",
        "--wm-pretrain-updates",
        "110",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "world-model pretraining: 100/" in out.stdout  # progress while no env step is taken
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["env"] == "wm/Catch-v0" and cfg["steps"] == 400
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 400
    wm_losses = [r["world_model/loss"] for r in rows if "world_model/loss" in r]
    assert len(wm_losses) >= 2 and wm_losses[-1] < wm_losses[0], wm_losses  # the loop runs and the model learns
    assert any("policy/entropy" in r for r in rows) and any("imagination/return" in r for r in rows)
    assert (run_dir / "checkpoints" / "step_0000000400" / "state.pt").is_file()

    again = run("train", "--env", "wm/Catch-v0", "--preset", "debug", "--run-dir", str(run_dir))
    assert again.returncode == 2 and "--resume" in again.stderr

    ev = run("eval", str(run_dir), "--episodes", "6", "--threads", "1", "--out", str(tmp_path / "eval.json"))
    assert ev.returncode == 0, ev.stderr[-2000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["episodes"] == 6 == len(res["returns"])
    assert all(r in (-1.0, 1.0) for r in res["returns"])
    assert abs(res["mean"] - sum(res["returns"]) / 6) < 1e-9
    assert res["env_steps_trained"] == 400 and res["hns"] is None

    bench = ["bench", "world-model", "--checkpoint", str(run_dir), "--device", "cpu", "--threads", "1"]
    wm = run(*bench, "--out-dir", str(tmp_path / "wm"))
    assert wm.returncode == 0, wm.stderr[-2000:]
    res = json.loads((tmp_path / "wm" / "world_model_check.json").read_text())
    assert res["env"] == "wm/Catch-v0" and res["checkpoint_env_steps"] == 400 and res["updates"] == 0
    parts = res["next_frame_mse_changed_part"] + res["next_frame_mse_unchanged_part"]
    assert abs(parts - res["next_frame_mse"]) < 1e-6 * max(1.0, res["next_frame_mse"])
    # Unchanged pixels differ from the last frame by at most the moving threshold (0.05).
    assert 0 <= res["copy_last_mse"] - res["copy_last_mse_changed_part"] <= 0.05**2
    for extra, message in (
        (["--world-model.pixel-gain", "2"], "measures the run's own world model"),
        (["--env", "ALE/Pong-v5"], "trained on wm/Catch-v0"),
    ):
        bad = run(*bench, *extra)
        assert bad.returncode == 2 and message in bad.stderr and "Traceback" not in bad.stderr


def test_eval_of_a_missing_run_fails_cleanly(tmp_path: Path) -> None:
    out = run("eval", str(tmp_path / "nothing"))
    assert out.returncode == 2 and "Traceback" not in out.stderr


def test_bench_speed_writes_positive_figures(tmp_path: Path) -> None:
    out = run("bench", "speed", "--preset", "debug", "--device", "cpu", "--out", str(tmp_path / "speed.json"))
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "speed.json").read_text())
    assert res["matmul_peak_flop_per_s"] > 0
    assert res["env_8"]["raw_steps_per_s"] > 0 and res["env_8"]["make_env_steps_per_s"] > 0
    assert res["replay_batches_per_s"] > 0
    w = res["world_model_debug"]
    assert w["updates_per_s"] > 0 and w["flop_per_update"] > 0 and 0 < w["fraction_of_peak"]
    parts = {k: v for k, v in w.items() if k.startswith("params_") and k != "params_total"}
    assert {"params_encoder", "params_predictor", "params_decoder", "params_reward_head"} <= set(parts)
    assert sum(parts.values()) == w["params_total"] > 0
    assert res["imagination_debug"]["imagined_steps_per_s"] > 0
    assert res["machine"]["cores"] >= 1 and res["machine"]["torch"]
    split = res["dyna_iteration_debug"]
    assert set(split["fraction"]) == {"collect", "world_model", "imagination", "policy", "other"}
    assert all(v > 0 for k, v in split["per_iteration_s"].items() if k != "other")
    assert abs(sum(split["fraction"].values()) - 1) < 1e-6


def test_bench_speed_times_the_batches_the_train_flags_give(tmp_path: Path) -> None:
    """Train flags override the named preset; the update is timed on the Dyna loop's batches, so a
    dynamics batch adds FLOPs. Flags without --preset are refused."""
    fast = ["bench", "speed", "--preset", "debug", "--device", "cpu", "--skip-env", "--skip-dyna", "--threads", "1"]
    plain = run(*fast, "--out", str(tmp_path / "plain.json"))
    flags = ["--dynamics-batch-size", "4"]
    more = run(*fast, *flags, "--out", str(tmp_path / "more.json"))
    assert plain.returncode == 0 and more.returncode == 0, more.stderr[-2000:]
    p = json.loads((tmp_path / "plain.json").read_text())["world_model_debug"]
    res = json.loads((tmp_path / "more.json").read_text())
    m = res["world_model_debug"]
    assert res["overrides"] == flags and m["dynamics_batch_size"] == 4 and p["dynamics_batch_size"] == 0
    assert m["seq_len"] == p["seq_len"] and m["flop_per_update"] > p["flop_per_update"]
    bad = run("bench", "speed", "--device", "cpu", "--dynamics-batch-size", "4")
    assert bad.returncode == 2 and "--preset" in bad.stderr and "Traceback" not in bad.stderr


def test_bench_learn_writes_both_agents(tmp_path: Path) -> None:
    out = run(
        "bench", "learn", "--env", "wm/Catch-v0", "--preset", "debug", "--steps", "300", "--seeds", "1",
        "--episodes", "3", "--threshold", "0.5", "--threads", "1", "--out", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "learn.json").read_text())
    # The budget is rounded up to whole SB3 rollouts (8 envs x 128 steps), the same for both agents.
    assert res["env_id"] == "wm/Catch-v0" and res["steps"] == 1024 and len(res["seeds"]) == 1
    for agent in ("wm_agent", "sb3_ppo"):
        a = res["seeds"][0][agent]
        assert a["env_steps"] == 1024 and a["train_seconds"] > 0 and len(a["eval_returns"]) == 3
        assert a["eval_mean"] == sum(a["eval_returns"]) / 3
        assert len(a["curve_steps"]) == len(a["curve_last100"]) > 0 and "steps_to_threshold" in a
    assert (tmp_path / "learn.png").stat().st_size > 0

    # --runs: the run just trained is scored from its checkpoint; SB3 trains on its env, seed and steps.
    trained = res["seeds"][0]["wm_agent"]
    again = tmp_path / "again"
    out = run("bench", "learn", "--runs", trained["run_dir"], "--episodes", "2", "--threads", "1", "--out", str(again))
    assert out.returncode == 0, out.stderr[-2000:]
    res2 = json.loads((again / "learn.json").read_text())
    assert res2["env_id"] == "wm/Catch-v0" and res2["steps"] == 1024 and res2["seeds"][0]["seed"] == 0
    w, b = res2["seeds"][0]["wm_agent"], res2["seeds"][0]["sb3_ppo"]
    assert w["env_steps"] == b["env_steps"] == 1024 and len(w["eval_returns"]) == 2
    assert w["curve_last100"] == trained["curve_last100"] and w["checkpoint"].endswith("step_0000001024/state.pt")
    assert 0 < w["train_seconds"] <= trained["train_seconds"]
    bad = run("bench", "learn", "--runs", str(tmp_path / "nothing"), "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "not a wm-agent run directory" in bad.stdout and "Traceback" not in bad.stderr


def test_bench_world_model_takes_config_overrides(tmp_path: Path) -> None:
    common = ["bench", "world-model", "--env", "wm/Catch-v0", "--preset", "debug", "--device", "cpu", "--threads", "1"]
    out = run(
        *common, "--updates", "2", "--data-steps", "600", "--out-dir", str(tmp_path),
        "--world-model.loss.motion-map", "1.0", "--slow-world-model-decay", "0.5",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads((tmp_path / "world_model_check.json").read_text())
    assert res["overrides"][:2] == ["--world-model.loss.motion-map", "1.0"] and res["updates"] == 2
    # Imagination reads the slow copy: it is measured, and the trained model is reported beside it.
    assert res["measured_model"] == "slow copy" and "the trained model (not the slow copy)" in out.stdout
    slow_paid, trained_paid = res["reward_paid_unrewarded"]["1"], res["trained_model"]["reward_paid_unrewarded"]["1"]
    assert slow_paid != trained_paid
    assert "motion_map_loss" in res and res["next_frame_mse"] >= 0 and res["copy_last_mse"] >= 0
    assert (tmp_path / "world_model_check.png").stat().st_size > 0
    bad = run(*common, "--world-model.pixel-gain", "0.5")
    assert bad.returncode == 2 and "--world-model.pixel-gain must be >= 1" in bad.stderr
    assert "Traceback" not in bad.stderr
