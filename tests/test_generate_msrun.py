"""tests/generate_clip_score_datas.py under MindSpore's msrun with 2 workers, on the demo pipeline.

One uninterrupted msrun run is checked against the generator's documented shares (rank r of size s makes
the prompts `shard(indices, r, s)` = r, r + s, ...) and against a plain single-process run of the same
job; a second run has one worker killed mid-run and is then resumed with the same command.

Measured here (2 shared CPU cores): every msrun image equals its single-process counterpart bit for bit
(max abs pixel difference 0), so the tests ask for equality: the same seeds and the same CPU kernels, each
image made whole by one process, and the kernels' results do not depend on the thread count (a single
process pinned to 1 core with taskset makes the same pixels as one on 2).

msrun itself: when a worker dies, msrun SIGKILLs the other workers within its 1 s poll, then waits about
30 s for its scheduler, which gives up only when the dead worker's heartbeat times out, and exits 1. The
workers run in sessions of their own (setsid), so killing msrun's process group would leave them running.
MindSpore's compile cache (MS_COMPILER_CACHE_ENABLE) would save most of the compilation time, but it keys
graphs by compilation order: a resumed run that compiles the cached setting's graph first loads another
graph (NaN latents at step 0). These tests do not use it.
"""

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Dict, List, Set, Tuple

import numpy as np
import psutil
import pytest
from PIL import Image

import generate_clip_score_datas as generate
from accuracy_data import DEFAULT_SEED, PROMPT_SETS
from models.demo_checkpoint import write_pipeline_checkpoint
from msrun_launch import MSRUN, kill_tree, start_msrun, worker_log
from test_accuracy_data import CACHED, GENERATE, SMALL_JOB_ARGS

WORKERS = 2
NUM_PROMPTS = 3   # shares of unequal size, and told apart from contiguous blocks: rank 0 makes 0 and 2, rank 1 makes 1
JOB_ARGS = ["--num_prompts", str(NUM_PROMPTS), *SMALL_JOB_ARGS]
SETTINGS = ("baseline", CACHED)
RESOLUTION = "64x64"
MSRUN_TIMEOUT = 480
Key = Tuple[str, int]   # an image: (setting, prompt index)
GENERATED_LINE = re.compile(r"^\[\d+/\d+\] (\S+) (\d+x\d+) (\d{5})\.png: ", re.MULTILINE)


def shares() -> Dict[int, List[int]]:
    return {rank: generate.shard(range(NUM_PROMPTS), rank, WORKERS) for rank in range(WORKERS)}


def owner(index: int) -> int:
    (rank,) = [rank for rank, indices in shares().items() if index in indices]
    return rank


def images_of(rank: int) -> Set[Key]:
    return {(setting, index) for setting in SETTINGS for index in shares()[rank]}


ALL_IMAGES = {(setting, index) for setting in SETTINGS for index in range(NUM_PROMPTS)}


def image_path(out: Path, image: Key) -> Path:
    return out / image[0] / RESOLUTION / f"{image[1]:05d}.png"


def pngs(out: Path) -> Dict[Key, os.stat_result]:
    """The images on disk, each with its stat (inode, mtime)."""
    return {(path.parts[-3], int(path.stem)): path.stat() for path in out.glob(f"*/{RESOLUTION}/*.png")}


def pixels(out: Path, image: Key) -> np.ndarray:
    return np.asarray(Image.open(image_path(out, image)))


def log_records(out: Path) -> List[Tuple[Key, dict]]:
    """Every generation_log.jsonl record, with the image it is about."""
    records = []
    for setting in SETTINGS:
        for line in (out / setting / RESOLUTION / generate.GENERATION_LOG).read_text().splitlines():
            record = json.loads(line)
            records.append(((setting, int(Path(record["image"]).stem)), record))
    return records


def generated_by(log_dir: Path, rank: int) -> List[Key]:
    """The images a worker's log says it generated, in order ('[n/N] setting HxW 00000.png: ...')."""
    return [(setting, int(index)) for setting, size, index in GENERATED_LINE.findall(worker_log(log_dir, rank))
            if size == RESOLUTION]


def start_generation(checkpoint: Path, out: Path, log_dir: Path) -> subprocess.Popen:
    return start_msrun(GENERATE, ["--ckpt", checkpoint, "--out", out, *JOB_ARGS], WORKERS, log_dir)


def logs(log_dir: Path) -> str:
    """The ends of msrun's logs without MindSpore's warnings, for failure messages."""
    ends = []
    for path in sorted(log_dir.glob("*.log")) + [log_dir.with_name(log_dir.name + ".out")]:
        lines = [line for line in path.read_text(errors="replace").splitlines() if "[WARNING]" not in line]
        ends.append(f"--- {path.name}\n" + "\n".join(lines[-25:]))
    return "\n".join(ends)


def wait_for(process: subprocess.Popen, log_dir: Path) -> int:
    try:
        return process.wait(timeout=MSRUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        pytest.fail(f"msrun did not finish in {MSRUN_TIMEOUT} s\n{logs(log_dir)}")


def run_msrun(checkpoint: Path, out: Path, log_dir: Path) -> None:
    process = start_generation(checkpoint, out, log_dir)
    assert wait_for(process, log_dir) == 0, logs(log_dir)


def live_workers(msrun: subprocess.Popen) -> Dict[int, psutil.Process]:
    """msrun's running workers by rank (msrun exports it as RANK_ID, and names the worker's log after it; the
    `tail -f` of that log has the same environment but another command line)."""
    found = {}
    for child in psutil.Process(msrun.pid).children(recursive=True):
        try:
            environment = child.environ()
            if str(GENERATE) in child.cmdline() and environment.get("MS_ROLE") == "MS_WORKER" \
                    and child.status() != psutil.STATUS_ZOMBIE:
                found[int(environment["RANK_ID"])] = child
        except psutil.NoSuchProcess:   # ended meanwhile (zombies included)
            continue
    return found


def test_msrun_is_installed_and_the_shares_differ():
    """Not a skip: without msrun beside this interpreter, the tests below cannot run and CI must say so."""
    assert MSRUN.is_file(), f"{MSRUN} is missing: msrun comes with the mindspore package of requirements.txt"
    assert shares() == {0: [0, 2], 1: [1]}
    assert {owner(index) for index in range(NUM_PROMPTS)} == {0, 1}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_pipeline_checkpoint(tmp_path_factory.mktemp("msrun") / "flux", "demo", seed=0)


@pytest.fixture(scope="module")
def single_process(checkpoint, tmp_path_factory) -> Path:
    """The same job in one plain process (a fresh one, as the msrun workers are: in-process, a pytest
    worker that had run many other test files once crashed inside MindSpore's compile of the first text
    encoder here): rank 0 of 1 makes every image."""
    out = tmp_path_factory.mktemp("single") / "images"
    result = subprocess.run([sys.executable, generate.__file__, "--ckpt", str(checkpoint), "--out", str(out),
                             *JOB_ARGS], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def msrun_run(checkpoint, tmp_path_factory) -> Tuple[Path, Path]:
    """The job under msrun with 2 workers, uninterrupted: (images, log folder)."""
    root = tmp_path_factory.mktemp("msrun_run")
    run_msrun(checkpoint, root / "images", root / "logs")
    return root / "images", root / "logs"


def assert_complete(out: Path) -> None:
    assert set(pngs(out)) == ALL_IMAGES
    for setting in SETTINGS:
        assert sorted(path.name for path in (out / setting / RESOLUTION).iterdir()) == sorted(
            [f"{index:05d}.png" for index in range(NUM_PROMPTS)] + [generate.GENERATION_LOG])
    assert not list(out.rglob("*.partial"))


def assert_equal_images(out: Path, reference: Path) -> None:
    differences = {image: int(np.abs(pixels(out, image).astype(int) - pixels(reference, image)).max())
                   for image in sorted(ALL_IMAGES)}
    assert set(differences.values()) == {0}, f"max abs pixel differences: {differences}"


@pytest.mark.slow
def test_msrun_makes_each_image_once_in_the_documented_shares(msrun_run, single_process):
    out, log_dir = msrun_run
    assert_complete(out)

    for rank in range(WORKERS):
        log = worker_log(log_dir, rank)
        share = images_of(rank)
        assert f"rank {rank} of {WORKERS}: {len(share)} images ({len(SETTINGS)} settings x 1 sizes x " \
               f"{len(shares()[rank])} prompts)" in log and "0 already exist, skipped" in log
        made = generated_by(log_dir, rank)
        assert sorted(made) == sorted(share), f"rank {rank} made {made}, its share is {sorted(share)}"
    assert Counter(generated_by(log_dir, 0) + generated_by(log_dir, 1)) == Counter(ALL_IMAGES)   # each once

    records = log_records(out)
    assert Counter(image for image, _ in records) == Counter(ALL_IMAGES)
    assert all(record["rank"] == owner(index) for (_, index), record in records)
    assert all(record["steps_cached"] == ({"cond": 1} if setting == CACHED else {})
               for (setting, _), record in records)
    assert {record["rank"] for _, record in log_records(single_process)} == {0}

    manifest = json.loads((out / generate.MANIFEST_NAME).read_text())
    assert manifest["prompts"] == list(PROMPT_SETS["smoke"][:NUM_PROMPTS])
    assert manifest["seeds"] == [DEFAULT_SEED + index for index in range(NUM_PROMPTS)]
    assert list(manifest["settings"]) == list(SETTINGS) and manifest["resolutions"] == [RESOLUTION]
    assert manifest == json.loads((single_process / generate.MANIFEST_NAME).read_text())

    assert_complete(single_process)
    assert_equal_images(out, single_process)


VICTIM = 1   # its first image, the baseline, is followed by the cached setting's graph compilation: seconds


@pytest.mark.slow
def test_msrun_resumes_after_a_worker_is_killed(checkpoint, msrun_run, tmp_path):
    out, first_logs, second_logs = tmp_path / "images", tmp_path / "logs_killed", tmp_path / "logs_resumed"
    victim_images = [image_path(out, image) for image in sorted(images_of(VICTIM))]
    process = start_generation(checkpoint, out, first_logs)
    try:
        deadline = time.monotonic() + MSRUN_TIMEOUT
        while not any(path.is_file() for path in victim_images):
            assert process.poll() is None, f"msrun ended before rank {VICTIM} made an image\n{logs(first_logs)}"
            assert time.monotonic() < deadline, f"rank {VICTIM} made no image in {MSRUN_TIMEOUT} s\n{logs(first_logs)}"
            time.sleep(0.05)
        live_workers(process)[VICTIM].kill()
        made_by_victim = sum(path.is_file() for path in victim_images)
        # msrun sees the worker's exit within its 1 s poll and SIGKILLs the other; its scheduler would then
        # wait ~30 s for the dead worker's heartbeat to time out: end it (and anything left) instead.
        deadline = time.monotonic() + 30
        while live_workers(process) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        kill_tree(process)
    assert 1 <= made_by_victim < len(victim_images), "the worker was to be killed mid-run"
    before = pngs(out)
    assert set(before) < ALL_IMAGES

    run_msrun(checkpoint, out, second_logs)
    assert_complete(out)
    after = pngs(out)
    for image, stat in before.items():   # not written again: the same file, untouched
        assert (after[image].st_ino, after[image].st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), image
    for rank in range(WORKERS):
        share = images_of(rank)
        done = share & set(before)
        assert f"rank {rank} of {WORKERS}: {len(share)} images" in worker_log(second_logs, rank)
        assert f"; {len(done)} already exist, skipped" in worker_log(second_logs, rank)
        assert sorted(generated_by(second_logs, rank)) == sorted(share - done)
    records = log_records(out)
    assert all(record["rank"] == owner(index) for (_, index), record in records)
    assert ALL_IMAGES - set(before) <= {image for image, _ in records}

    assert_equal_images(out, msrun_run[0])
