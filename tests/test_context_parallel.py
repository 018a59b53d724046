"""Context parallel under msrun: two CPU ranks give the single-process image and the same cache decisions,
and launches the split cannot serve are refused with errors that say how to launch instead."""

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.context_parallel import TokenSplit, join_msrun
from models.embedded import embedded_checkpoint
from msrun_launch import kill_tree, start_msrun, worker_log
from context_parallel_job import SETTINGS

JOB = Path(__file__).resolve().parent / "context_parallel_job.py"
STEPS = 8
# fp32; the ranks differ from one process only in summation order (keys gathered in rank order, the
# diff's sums split in two): measured 0.9e-6 to 3.9e-6 relative on the image at 10 steps.
IMAGE_BOUND = 1e-5
TIMEOUT_S = 900


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{launch: {rank: arrays}} for one process and a 2-rank msrun launch of the same job, run side by side
    (graph compilation is single-threaded: together they keep both cores busier)."""
    out = tmp_path_factory.mktemp("context_parallel")
    single = subprocess.Popen([sys.executable, str(JOB), "--out", str(out / "one"), "--steps", str(STEPS)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    launch = start_msrun(JOB, ["--out", out / "two", "--ranks", 2, "--steps", STEPS], 2, out / "logs")
    try:
        single_errors = single.communicate(timeout=TIMEOUT_S)[1]
        launch.wait(timeout=TIMEOUT_S)
    finally:
        single.kill()
        kill_tree(launch)
    assert single.returncode == 0, single_errors[-3000:]
    assert launch.returncode == 0, worker_log(out / "logs", 0)[-3000:] + worker_log(out / "logs", 1)[-3000:]
    return {"one": {0: dict(np.load(out / "one" / "rank0.npz"))},
            "two": {rank: dict(np.load(out / "two" / f"rank{rank}.npz")) for rank in (0, 1)}}


def relative_max_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - want).max() / np.abs(want).max())


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_two_ranks_draw_the_single_process_image(runs, setting):
    single = runs["one"][0][f"{setting}/image"]
    for rank in (0, 1):
        assert relative_max_error(runs["two"][rank][f"{setting}/image"], single) <= IMAGE_BOUND
    # Both ranks gather the same prediction and step the same scheduler: the same bits.
    np.testing.assert_array_equal(runs["two"][0][f"{setting}/image"], runs["two"][1][f"{setting}/image"])


@pytest.mark.slow
@pytest.mark.parametrize("setting", [name for name, cache in SETTINGS.items() if cache is not None])
def test_every_rank_takes_the_single_process_decisions(runs, setting):
    branches = {key.split("/")[1] for key in runs["one"][0] if key.startswith(f"{setting}/") and key.endswith("/cached")}
    assert branches == ({"cond", "uncond"} if "sync" in setting else {"cond+uncond"}), branches
    for branch in sorted(branches):
        decisions = runs["one"][0][f"{setting}/{branch}/cached"]
        assert decisions.any() and not decisions.all(), "the setting must both hit and miss to test anything"
        diffs = runs["one"][0][f"{setting}/{branch}/diffs"]
        for rank in (0, 1):
            np.testing.assert_array_equal(runs["two"][rank][f"{setting}/{branch}/cached"], decisions)
            np.testing.assert_allclose(runs["two"][rank][f"{setting}/{branch}/diffs"], diffs, rtol=1e-5)
        # The all-reduced sums are the same number on both ranks.
        np.testing.assert_array_equal(runs["two"][0][f"{setting}/{branch}/diffs"],
                                      runs["two"][1][f"{setting}/{branch}/diffs"])


@pytest.mark.slow
def test_the_split_compiles_as_many_graphs_as_one_process(runs):
    """One wrapper graph per forward (the wrapped transformer compiles inside it, not again on its own)."""
    single = int(runs["one"][0]["compiled_graphs"])
    assert single > 0
    assert [int(runs["two"][rank]["compiled_graphs"]) for rank in (0, 1)] == [single, single]


@pytest.mark.slow
def test_a_launch_with_another_worker_count_is_refused(tmp_path):
    """Both workers stop with the message before loading anything. msrun itself would then wait ~30 s for
    its scheduler to time the stopped workers out; the test ends it once both have said why."""
    message = "context parallel over 4 ranks, but msrun started 2 workers: launch with --worker_num 4 or pass 2"
    logs = tmp_path / "logs"
    launch = start_msrun(JOB, ["--out", tmp_path / "out", "--ranks", 4, "--steps", 1], 2, logs)
    deadline = time.monotonic() + 300
    try:
        while not all(message in worker_log(logs, rank) for rank in (0, 1)):
            if launch.poll() is not None or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        kill_tree(launch)
    for rank in (0, 1):
        assert message in worker_log(logs, rank), worker_log(logs, rank)[-3000:]
    assert launch.returncode != 0 and not (tmp_path / "out").exists()


def test_context_parallel_outside_msrun_is_refused(monkeypatch):
    monkeypatch.delenv("MS_ROLE", raising=False)
    with pytest.raises(ValueError, match="needs a launch by msrun"):
        join_msrun(2)


def test_the_pipeline_refuses_tokens_the_ranks_cannot_share():
    """Checked before any encoding: the split needs equal shares of the image and of the text tokens."""
    from pipeline_flux import FluxPipeline

    loaded = FluxPipeline.from_pretrained(str(embedded_checkpoint()))
    pipeline = FluxPipeline(loaded.scheduler, loaded.vae, loaded.text_encoder, loaded.tokenizer,
                            loaded.text_encoder_2, loaded.tokenizer_2, loaded.transformer,
                            token_split=TokenSplit(0, 3))
    with pytest.raises(ValueError, match=r"divisible by 3, got 64: choose a height and width"):
        pipeline("a red apple", height=128, width=128, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"text tokens \(max_sequence_length\) divisible by 3, got 32"):
        pipeline("a red apple", height=192, width=128, num_inference_steps=1)


def test_bad_rank_counts_and_mindone_models_are_refused():
    from pipeline_flux import FluxPipeline

    with pytest.raises(ValueError, match="context_parallel must be a whole number of ranks >= 1, got 0"):
        FluxPipeline.from_pretrained(str(embedded_checkpoint()), context_parallel=0)
    with pytest.raises(ValueError, match="drop use_mindone_models"):
        FluxPipeline.from_pretrained(str(embedded_checkpoint()), context_parallel=2, use_mindone_models=True)
