"""The persistent compile cache (models/compile_cache.py), across real processes.

MindSpore numbers a process's cached graphs by compile order, so the dangerous case is a process that
compiles a different graph at a position that holds a stored one: it must never load it. Each run here is a
fresh process (tests/compile_cache_job.py) on the shipped model, 3 steps of cached true CFG.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from models.compile_cache import GRAPH_FOLDER, MANIFEST, CompileCache, file_sha256

JOB = Path(__file__).with_name("compile_cache_job.py")


def start(cache_root: Path, out: Path, *args: str, job: Path = JOB) -> subprocess.Popen:
    env = dict(os.environ, FLUX_MS_COMPILE_CACHE=str(cache_root), GLOG_v="3")
    return subprocess.Popen([sys.executable, str(job), "--out", str(out), *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, out: Path) -> tuple:
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1]), dict(np.load(out)), stderr


def run(cache_root: Path, out: Path, *args: str, job: Path = JOB) -> tuple:
    return finish(start(cache_root, out, *args, job=job), out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Images at 64x64, 96x96 and 128x128 compiled without any cache: what every cached run must give."""
    folder = tmp_path_factory.mktemp("reference")
    report, images, _ = run(folder / "unused", folder / "images.npz", "--sizes", "64x64", "96x96", "128x128",
                            "--no_compile_cache")
    assert report == {} and not (folder / "unused").exists(), "--no_compile_cache writes nothing"
    return images


@pytest.fixture(scope="module")
def filled(tmp_path_factory, reference):
    """A cache filled by one cold run (64x64 then 96x96), its report and stderr."""
    root = tmp_path_factory.mktemp("cache")
    report, images, stderr = run(root, root / "cold.npz", "--sizes", "64x64", "96x96")
    for size in ("64x64", "96x96"):
        np.testing.assert_array_equal(images[size], reference[size])
    return root, report


def manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())["entries"]


def test_a_warm_process_loads_every_graph_and_gives_the_same_images(filled, reference, tmp_path):
    root, cold = filled
    # CLIP, T5, the cached transformer and the VAE at 64x64; the transformer and VAE again at 96x96 (the text
    # encoders' inputs do not depend on the image size).
    assert cold["stored"] == 0 and cold["positions"] == 6, cold
    warm, images, _ = run(root, tmp_path / "warm.npz", "--sizes", "64x64", "96x96")
    assert warm["enabled"] and warm["folder"] == cold["folder"] and warm["stored"] == 6, warm
    assert warm["compile_seconds"] < cold["compile_seconds"], (warm, cold)
    for size in ("64x64", "96x96"):
        np.testing.assert_array_equal(images[size], reference[size])


def test_another_graph_at_a_stored_position_is_never_loaded(filled, reference, tmp_path):
    """Same first call (same folder), then 128x128 where the store holds 96x96's transformer at position 4:
    the cache switches itself off there, and both images are the uncached ones bit for bit."""
    root, cold = filled
    report, images, _ = run(root, tmp_path / "diverge.npz", "--sizes", "64x64", "128x128")
    assert report["folder"] == cold["folder"] and not report["enabled"], report
    assert "graph 4" in report["note"] and "differs from the stored one" in report["note"], report
    for size in ("64x64", "128x128"):
        np.testing.assert_array_equal(images[size], reference[size])


def test_a_graph_shaping_setting_compiles_anew(filled, tmp_path):
    root, cold = filled
    report, _, _ = run(root, tmp_path / "fn.npz", "--sizes", "64x64", "96x96", "--fn_compute_blocks", "2")
    assert report["folder"] != cold["folder"] and report["stored"] == 0 and report["positions"] == 6, report


def test_sources_weights_and_the_first_call_key_the_folder(tmp_path, monkeypatch):
    """What the folder is keyed on, in process: a project source file's content, a weight file's identity
    (rewriting it changes its modification time) and the first call's graph-shaping arguments."""
    import models.compile_cache as compile_cache

    source = tmp_path / "module.py"
    source.write_text("x = 1\n")
    monkeypatch.setattr(compile_cache, "source_files", lambda: [source])
    run_key = dict(height=64, width=64, cache=(1, 0))
    before = compile_cache.folder_key(run_key)
    assert compile_cache.folder_key(dict(run_key)) == before, "the same run, the same folder"
    for changed in (dict(run_key, height=96), dict(run_key, cache=(2, 0)), dict(run_key, cache=None)):
        assert compile_cache.folder_key(changed) != before
    source.write_text("x = 2\n")
    assert compile_cache.folder_key(run_key) != before, "an edited source file"

    weights = tmp_path / "model" / "transformer"
    weights.mkdir(parents=True)
    (weights / "config.json").write_text("{}")
    (weights / "diffusion_pytorch_model.safetensors").write_bytes(b"0" * 8)
    identity = compile_cache.weights_identity(tmp_path / "model")
    os.utime(weights / "diffusion_pytorch_model.safetensors", ns=(time.time_ns(), time.time_ns() + 10 ** 9))
    changed = compile_cache.weights_identity(tmp_path / "model")
    assert changed != identity, "a rewritten weight file"
    (weights / "config.json").write_text('{"num_layers": 2}')
    assert compile_cache.weights_identity(tmp_path / "model") != changed, "an edited config"


def test_a_damaged_entry_is_detected_and_compiled_again(filled, reference, tmp_path):
    root, cold = filled
    damaged = Path(cold["folder"]) / GRAPH_FOLDER / "compile_cache_2.mindir"
    content = damaged.read_bytes()
    damaged.write_bytes(content[: len(content) // 2])
    report, images, stderr = run(root, tmp_path / "damaged.npz", "--sizes", "64x64", "96x96")
    assert report["stored"] == 5 and "compile_cache_2.mindir is damaged or missing" in stderr, report
    for size in ("64x64", "96x96"):
        np.testing.assert_array_equal(images[size], reference[size])
    assert file_sha256(damaged) == manifest(cold["folder"])["2"]["sha256"], "the recompiled graph is stored again"


def test_two_processes_filling_one_cache_at_once(reference, tmp_path):
    root = tmp_path / "cache"
    processes = [start(root, tmp_path / f"{index}.npz", "--sizes", "64x64", "96x96") for index in range(2)]
    for index, process in enumerate(processes):
        report, images, _ = finish(process, tmp_path / f"{index}.npz")
        for size in ("64x64", "96x96"):
            np.testing.assert_array_equal(images[size], reference[size])
    entries = manifest(report["folder"])
    assert sorted(entries) == [str(position) for position in range(6)]
    for position, entry in entries.items():
        stored = Path(report["folder"]) / GRAPH_FOLDER / f"compile_cache_{position}.mindir"
        assert file_sha256(stored) == entry["sha256"], "every stored entry is whole"


def test_an_unwritable_cache_folder_warns_once_and_runs(reference, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    report, images, stderr = run(blocker / "cache", tmp_path / "images.npz", "--sizes", "64x64", "96x96")
    assert not report["enabled"] and stderr.count("cannot be used") == 1, stderr[-2000:]
    for size in ("64x64", "96x96"):
        np.testing.assert_array_equal(images[size], reference[size])


def test_positions_are_checked_in_process(tmp_path, monkeypatch):
    """The manifest check itself: a stored signature at this position other than the graph about to compile
    switches the cache off; the same one, or a new position, keeps it on. MindSpore's own cache is not
    touched here (this pytest worker has no entry script, and the rest of the worker's tests should run
    with it as they find it): the switch is recorded instead."""
    cache = CompileCache(tmp_path)
    cache.shared, cache.working = tmp_path / "shared", tmp_path / "working"
    switched = []
    monkeypatch.setattr(cache, "switch_mindspore_cache", switched.append)
    cache.begin("graph A")
    cache.end("graph A", compiled=True)
    cache.begin("graph B")
    cache.end("graph B", compiled=False)
    assert cache.position == 1 and cache.expected == {0: "graph A"}, "a call that compiled nothing takes no place"
    assert switched == [True, False, True, False], "on only around each compile"
    cache.begin("graph C")
    cache.end("graph C", compiled=True)
    assert cache.enabled and cache.expected == {0: "graph A", 1: "graph C"}
    cache.position = 0
    cache.begin("graph C")
    assert not cache.enabled and "differs from the stored one (graph A)" in cache.note
    assert switched[-1] is False
