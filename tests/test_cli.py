"""eval/run_flux_withFBCache_pipeline.py end to end, and every input error it must refuse."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eval import run_flux_withFBCache_pipeline as cli
from models.demo_checkpoint import write_pipeline_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
CLI = REPO_ROOT / "eval" / "run_flux_withFBCache_pipeline.py"
FAST = ["--image_size", "64", "64", "--num_inference_steps", "2", "--max_sequence_length", "16"]


def run_cli(*args, timeout=900):
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pipeline_checkpoint(tmp_path_factory.mktemp("cli") / "flux", "demo", seed=0)


@pytest.mark.slow
def test_default_checkpoint_runs_and_writes_a_png(tmp_path):
    """The README's main job: no arguments, the shipped trained model, true CFG, cached steps at the
    default threshold in both branches."""
    result = run_cli("--save_path", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "shipped emoji-world Flux" in out and "step 28/28" in out
    for branch in ("cond", "uncond"):
        assert f"FBCache summary ({branch} branch)" in out
    cached = [int(count) for count in re.findall(r"computed, (\d+) cached", out)]
    assert len(cached) == 2 and min(cached) > 0, out[-3000:]
    assert (tmp_path / "fbcache_0.png").is_file()


def test_random_demo_checkpoint_is_still_selectable(tmp_path):
    result = run_cli("--demo_config", "demo", "--save_path", tmp_path, *FAST)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RANDOM weights, not FLUX.1" in result.stdout and (tmp_path / "fbcache_0.png").is_file()


def test_baseline_comparison_true_cfg_and_every_cache_flag(folder, tmp_path):
    result = run_cli("--ckpt", folder, "--save_path", tmp_path, *FAST, "--compare_baseline", "--prompt", "a fox",
                     "a dog", "--negative_prompt", "blurry", "--true_cfg_scale", "2", "--residual_diff_threshold",
                     "0.9", "--taylorseer_derivative", "2", "--warmup_steps", "1", "--max_cached_steps", "1",
                     "--max_continuous_cached_steps", "1", "--fn_compute_blocks", "2", "--bn_compute_blocks", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "FBCache summary (cond branch)" in out and "FBCache summary (uncond branch)" in out
    assert "speedup" in out and "baseline warm-up" in out
    # warm-up 1 and max 1 cached step: step 0 computed, at most one cached step per branch.
    cached = [int(count) for count in re.findall(r"FBCache: 2 steps, \d+ computed, (\d+) cached", out)]
    assert len(cached) == 2 and max(cached) <= 1, out[-3000:]
    assert len(re.findall(r"\n\s+0\s+nan computed\n", out)) == 2
    assert sorted(path.name for path in tmp_path.glob("*.png")) == [
        "baseline_0.png", "baseline_1.png", "fbcache_0.png", "fbcache_1.png"]


def test_forecast_gate_probe_skip_and_branch_sync_flags(folder, tmp_path):
    """A huge threshold caches every step it may: step 1 hits, step 2 skips the probe; the uncond branch
    follows the cond branch's decisions (verify gate and sigma forecast run in the same graph)."""
    steps = ("--num_inference_steps", "4")
    result = run_cli("--ckpt", folder, "--save_path", tmp_path, *FAST, *steps, "--prompt", "a fox", "--negative_prompt",
                     "blurry", "--true_cfg_scale", "2", "--residual_diff_threshold", "1e9", "--taylorseer_derivative",
                     "1", "--forecast_space", "sigma", "--verify_forecast", "--skip_probe_steps", "1",
                     "--sync_cfg_branches")
    assert result.returncode == 0, result.stderr[-3000:]
    decisions = re.findall(r"^\s+\d+\s+\S+ (computed|cached, probe skipped|cached)$", result.stdout, re.MULTILINE)
    assert decisions == ["computed", "cached", "cached, probe skipped", "cached"] * 2, result.stdout[-3000:]


@pytest.mark.parametrize("args,message", [
    (["--skip_probe_steps", "1", "--bn_compute_blocks", "1"], "--skip_probe_steps must be >= 0, and 0 with"),
    (["--image_size", "100", "64"], "multiples of 16"),
    (["--dtype", "bfloat16"], "bfloat16 needs bf16 matmul"),
    (["--prompt", "a", "b", "c", "--negative_prompt", "x", "y"], "--negative_prompt has 2 entries for 3 prompts"),
    (["--taylorseer_derivative", "7"], "--taylorseer_derivative must lie in"),
    (["--num_inference_steps", "0"], "--num_inference_steps must be >= 1"),
    (["--no_cache", "--compare_baseline"], "exclude each other"),
    (["--mindone_models"], "need kernels MindSpore's CPU backend lacks"),
])
def test_bad_arguments_are_refused_before_any_work(capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_args(args)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unwritable_save_path_is_refused_before_loading(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match="cannot write to --save_path"):
        cli.main(["--save_path", str(blocker / "images"), *FAST])


def test_missing_checkpoint_folder_exits_nonzero_without_output(tmp_path):
    result = run_cli("--ckpt", tmp_path / "missing", "--save_path", tmp_path / "out", *FAST, timeout=300)
    assert result.returncode == 1 and "does not exist" in result.stderr
    assert not list((tmp_path / "out").glob("*.png"))


def test_checkpoint_missing_a_component(folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(FileNotFoundError, match="no 'vae/' subfolder"):
        cli.main(["--ckpt", str(broken), "--save_path", str(tmp_path / "out"), *FAST])
    assert not list((tmp_path / "out").glob("*.png"))
