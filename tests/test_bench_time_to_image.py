"""eval/bench_time_to_image.py and eval/diffusers_main_job.py: argument errors, the parsing of what the
processes print, the table's arithmetic on fake samples, and the diffusers job doing our main job (same
defaults, T5 length and initial noise). No benchmark runs here (minutes)."""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from eval import bench_time_to_image as bench
from eval import diffusers_main_job as job
from eval import run_flux_withFBCache_pipeline as cli

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "eval" / "bench_time_to_image.py"

CLI_STDOUT = """Using the shipped emoji-world Flux /work/main/assets/flux-emoji (trained here; not FLUX.1, give --ckpt for FLUX).

[fbcache] 28 steps at 128x128
[fbcache] total 26.25 s
FBCache cond+uncond: 28 steps, 17 computed, 11 cached [CCCHCHCHCHCHCHCHCHCHCHCHCCCC], median diff 0.0938
time: import + load 1.75 s, compile 23.32 s, encode 0.02 s, denoise 2.86 s, decode 0.01 s
cache (cond+uncond): 11 of 28 steps cached, at most 1.85 s of denoising saved (--compare_baseline measures it)
wrote /tmp/tmp.ZvLE4yr9DQ/fbcache_0.png
"""

JOB_STDOUT = "Loading pipeline components...\n" + json.dumps(dict(
    times_s=dict(import_=3.22, load=2.68, encode=0.01, decode=0.04, denoise=6.54, save=0.01, total=12.5),
    torch_threads=2, fbcache_threshold=0.08, max_sequence_length=32, path="/tmp/x/diffusers_fbcache_0.png",
    fbcache_steps=dict(cond=dict(steps=28, computed=17, cached=11), uncond=dict(steps=28, computed=16, cached=12)),
)).replace("import_", "import") + "\n"


def run_script(*args):
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True,
                            timeout=60, cwd=REPO_ROOT)
    return result, time.perf_counter() - started


@pytest.mark.parametrize("args, flag", [
    (["--repeats", "0"], "--repeats"),
    (["--repeats", "-2"], "--repeats"),
    (["--images", "0"], "--images"),
])
def test_argument_errors_name_the_flag_before_any_work(tmp_path, args, flag):
    result, seconds = run_script(*args, "--out", tmp_path / "table")
    assert result.returncode == 2, result.stderr
    assert flag in result.stderr.splitlines()[-1]
    assert seconds < 20, "refused before importing MindSpore or torch"
    assert not list(tmp_path.iterdir()), "nothing written"


def test_unwritable_out_is_refused(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result, _ = run_script("--out", blocker / "table")
    assert result.returncode == 2
    assert "--out" in result.stderr.splitlines()[-1]
    folder_in_the_way = tmp_path / "table.md"
    folder_in_the_way.mkdir()
    result, _ = run_script("--out", tmp_path / "table")
    assert result.returncode == 2 and "--out" in result.stderr.splitlines()[-1]


def test_output_paths():
    assert bench.output_paths(Path("r/time_to_image")) == {"md": Path("r/time_to_image.md"),
                                                           "json": Path("r/time_to_image.json")}
    assert bench.output_paths(Path("r/t.md"))["json"] == Path("r/t.json")


def test_parse_cli_stdout():
    parsed = bench.parse_cli_stdout(CLI_STDOUT)
    assert parsed["times_s"] == {"import + load": 1.75, "compile": 23.32, "encode": 0.02, "denoise": 2.86,
                                 "decode": 0.01}
    assert parsed["fbcache"] == {"cond+uncond": {"steps": 28, "computed": 17, "cached": 11}}
    assert parsed["generate_s"] == {"fbcache": 26.25}
    assert parsed["wrote"] == ["/tmp/tmp.ZvLE4yr9DQ/fbcache_0.png"]
    two_branches = CLI_STDOUT.replace(
        "FBCache cond+uncond: 28 steps, 17 computed, 11 cached",
        "FBCache cond: 28 steps, 17 computed, 11 cached [C], median diff 0.1\n"
        "FBCache uncond: 28 steps, 18 computed, 10 cached")
    assert bench.parse_cli_stdout(two_branches)["fbcache"]["uncond"] == {"steps": 28, "computed": 18, "cached": 10}
    with pytest.raises(ValueError, match="time:"):
        bench.parse_cli_stdout("wrote x.png\n")


def test_parse_job_stdout():
    parsed = bench.parse_job_stdout(JOB_STDOUT)
    assert parsed["times_s"]["denoise"] == 6.54
    assert parsed["fbcache_steps"]["uncond"]["computed"] == 16
    with pytest.raises(ValueError):
        bench.parse_job_stdout("no json here\n")


def fake_report():
    walls = {"ours_cold": [30.0, 28.0, 40.0], "ours_warm": [5.0, 6.0, 4.0], "diffusers": [12.0, 20.0, 14.0],
             "diffusers_fbcache": [10.0, 11.0, 18.0]}
    processes = []
    for index in range(3):
        for run, values in walls.items():
            parsed = (bench.parse_cli_stdout(CLI_STDOUT) if run.startswith("ours")
                      else bench.parse_job_stdout(JOB_STDOUT))
            processes.append(dict(round=index + 1, run=run, wall_s=values[index], pngs=["x.png"], parsed=parsed))
    seconds = {("ours", "cached"): [1.0, 1.5, 2.0], ("ours", "uncached"): [2.0, 3.0, 2.5],
               ("diffusers", "cached"): [0.8, 0.6, 1.0], ("diffusers", "uncached"): [1.2, 1.2, 1.5]}
    workers = {}
    for (side, mode), values in seconds.items():
        worker = workers.setdefault(side, dict(samples=[], threads=2, versions={side: "1.0"}, warmup_s={}))
        worker["samples"] += [dict(side=side, mode=mode, index=i, seconds=value,
                                   steps={"cond": dict(steps=28, computed=17, cached=11)} if mode == "cached" else {})
                              for i, value in enumerate(values)]
    return walls, seconds, processes, workers


def test_summary_medians_and_ratios():
    walls, seconds, processes, workers = fake_report()
    summary = bench.summarise(processes, workers)
    for run, values in walls.items():
        assert summary["time_to_image"][run] == dict(median=statistics.median(values), min=min(values), n=3)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    for (side, mode), value in median.items():
        row = summary["per_image"][f"{side}_{mode}"]
        assert row["seconds_per_image"]["median"] == value
        assert row["images_per_minute"] == pytest.approx(60 / value)
    ratios = summary["ratios"]
    assert ratios["ours_cold_over_diffusers"] == pytest.approx(30 / 14)
    assert ratios["ours_cold_over_diffusers_fbcache"] == pytest.approx(30 / 11)
    assert ratios["ours_warm_over_diffusers"] == pytest.approx(5 / 14)
    assert ratios["ours_warm_over_diffusers_fbcache"] == pytest.approx(5 / 11)
    assert ratios["ipm_ours_cached_over_diffusers_cached"] == pytest.approx(0.8 / 1.5)
    assert ratios["ipm_ours_uncached_over_diffusers_uncached"] == pytest.approx(1.2 / 2.5)
    assert ratios["ipm_ours_cached_over_diffusers_uncached"] == pytest.approx(1.2 / 1.5)
    assert ratios["cache_speedup_ours"] == pytest.approx(2.5 / 1.5)
    assert ratios["cache_speedup_diffusers"] == pytest.approx(1.2 / 0.8)


def test_markdown_table(tmp_path):
    _, _, processes, workers = fake_report()
    report = dict(command="python eval/bench_time_to_image.py --repeats 3", date="2025-01-01 00:00 UTC",
                  commit="abc", repeats=3, images=3, threshold=bench.THRESHOLD, processes=processes,
                  workers=workers, machine=dict(cpu_count=2, platform="Linux-test", python="3.11",
                                                loadavg_start="1 1 1", loadavg_end="2 2 2"))
    report["summary"] = bench.summarise(processes, workers)
    table = bench.render_markdown(report)
    assert "2 CPUs" in table and "Linux-test" in table and "2025-01-01" in table
    assert "`python eval/bench_time_to_image.py --repeats 3`" in table
    assert "| ours, cold compile cache | 30.00 | 28.00 | 3 |" in table
    assert "| diffusers, no cache | 14.00 | 12.00 | 3 |" in table
    assert "cond+uncond 17/28" in table
    assert f"| ours, First-Block Cache {bench.THRESHOLD:g} | 1.500 | 1.000 | 40.0 |" in table
    assert "| time to first image: ours cold / diffusers, no cache | 2.14 (diffusers 2.14x faster) |" in table
    assert "| time to first image: ours warm / diffusers, no cache | 0.36 (ours 2.80x faster) |" in table
    assert "| images/min: ours cached / diffusers FirstBlockCache | 0.53 (diffusers 1.88x faster) |" in table
    assert "| our cache: cached / uncached images per minute | 1.67x |" in table
    json.dumps(report)  # the report the script writes is plain JSON


def test_faster_wording():
    assert bench.faster(0.5, lower_is_ours=True) == "0.50 (ours 2.00x faster)"
    assert bench.faster(2.0, lower_is_ours=True) == "2.00 (diffusers 2.00x faster)"
    assert bench.faster(2.0, lower_is_ours=False) == "2.00 (ours 2.00x faster)"
    assert bench.faster(1.0, lower_is_ours=False) == "1.00 (even)"


def test_diffusers_job_does_our_main_job():
    """The diffusers job's defaults are the CLI's with no arguments on the shipped model."""
    ours = cli.parse_args([])
    theirs = job.parse_args([])
    settings = job.generation_settings()
    assert [theirs.prompt] == ours.prompt == [bench.PROMPTS[0]]
    assert (settings["height"], settings["width"]) == tuple(ours.image_size) == (128, 128)
    assert settings["num_inference_steps"] == ours.num_inference_steps == 28
    assert settings["true_cfg_scale"] == ours.true_cfg_scale == 4.0
    assert [settings["negative_prompt"]] == ours.negative_prompt == [""]
    assert theirs.seed == ours.seed == 0
    assert ours.cache.residual_diff_threshold == bench.THRESHOLD == 0.08
    assert ours.max_sequence_length is None, "the CLI leaves the T5 length to the pipeline's default"


def test_diffusers_job_t5_length_is_our_pipelines():
    from transformers import T5TokenizerFast

    import pipeline_flux
    from models.embedded import SHIPPED_PIPELINE
    from models.tokenizers import T5Tokenizer

    assert job.MAX_SEQUENCE_LENGTH == pipeline_flux.MAX_SEQUENCE_LENGTH
    ours = T5Tokenizer.from_pretrained(str(SHIPPED_PIPELINE / "tokenizer_2"), local_files_only=True)
    ours_length = pipeline_flux.FluxPipeline.default_sequence_length(SimpleNamespace(tokenizer_2=ours))
    theirs = T5TokenizerFast.from_pretrained(str(SHIPPED_PIPELINE / "tokenizer_2"))  # what diffusers loads
    assert job.sequence_length(theirs) == ours_length == 32


@pytest.mark.parametrize("seed", [0, 7])
def test_diffusers_job_noise_is_our_pipelines(seed):
    import pipeline_flux

    fake = SimpleNamespace(transformer=SimpleNamespace(config=SimpleNamespace(in_channels=64)))
    ours = pipeline_flux.FluxPipeline.prepare_latents(fake, 1, 16, 16, seed, None)
    theirs = job.initial_noise(seed, 16, 16, 16)
    assert theirs.dtype == np.float32 and theirs.shape == (1, 64, 64)
    np.testing.assert_array_equal(theirs, ours)


def test_prompts_speak_the_emoji_world():
    from train.scenes import COLOURS, emoji_names

    assert len(bench.PROMPTS) == len(set(bench.PROMPTS)) == 8
    for prompt in bench.PROMPTS:
        assert any(name in prompt for name in emoji_names()), prompt
        background = prompt.rsplit(", on ", 1)[1]
        assert background.endswith(" background")
        words = background.removesuffix(" background").removesuffix(" gradient").split(" ", 1)[1]
        assert all(colour in COLOURS for colour in words.split(" to ")), prompt
