"""The project's own seeded checkpoints are real diffusers checkpoints: diffusers loads them and agrees."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from conftest import ms_forward
from eval import bench_transformer
from models import demo_checkpoint
from models.demo_checkpoint import (TRANSFORMER_CONFIGS, ensure_demo_checkpoint, write_pipeline_checkpoint,
                                    write_transformer_checkpoint)
from models.transformer_flux import FluxTransformer2DModel
from pipeline_flux import FluxPipeline
from torch_reference import make_inputs, relative_max_error, torch_forward

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_demo_checkpoint_matches_diffusers(tmp_path):
    folder = ensure_demo_checkpoint(tmp_path / "demo")
    config = TRANSFORMER_CONFIGS["demo"]
    inputs = make_inputs(1, 4, 6, 8, guidance=True, config=config)
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    reference = torch_forward(folder, inputs)
    assert relative_max_error(ms_forward(model, inputs.as_dict()), reference) <= 1e-4


def test_weights_are_seeded(tmp_path):
    config = TRANSFORMER_CONFIGS["demo"]
    first = load_file(write_transformer_checkpoint(tmp_path / "a", config, seed=3) / "transformer" /
                      "diffusion_pytorch_model.safetensors")
    again = load_file(write_transformer_checkpoint(tmp_path / "b", config, seed=3) / "transformer" /
                      "diffusion_pytorch_model.safetensors")
    other = load_file(write_transformer_checkpoint(tmp_path / "c", config, seed=4) / "transformer" /
                      "diffusion_pytorch_model.safetensors")
    name = "transformer_blocks.0.attn.to_q.weight"
    assert (first[name] == again[name]).all() and not (first[name] == other[name]).all()


def test_existing_checkpoint_is_reused(tmp_path, capsys):
    folder = ensure_demo_checkpoint(tmp_path / "demo")
    assert "RANDOM-WEIGHT" in capsys.readouterr().out
    assert (folder / "model_index.json").is_file() and (folder / "vae" / "config.json").is_file()
    stamp = (folder / "transformer" / "config.json").stat().st_mtime_ns
    ensure_demo_checkpoint(tmp_path / "demo")
    assert (folder / "transformer" / "config.json").stat().st_mtime_ns == stamp
    assert list(tmp_path.iterdir()) == [folder]


def test_checkpoint_of_an_older_configuration_is_refused(tmp_path):
    folder = ensure_demo_checkpoint(tmp_path / "demo")
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, num_layers=config["num_layers"] + 1)))
    with pytest.raises(FileNotFoundError, match=r"older 'demo' configuration \(num_layers differ\).*delete it"):
        ensure_demo_checkpoint(folder)


# One process creating the demo checkpoint; it waits for `start` so that both writers of the race test look
# for the checkpoint at the same moment (each then writes for seconds, so both find it absent).
WRITER = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from models.demo_checkpoint import ensure_demo_checkpoint
folder, ready, start = (Path(arg) for arg in sys.argv[2:])
ready.touch()
while not start.exists():
    time.sleep(0.01)
ensure_demo_checkpoint(folder)
"""


def run_writers_together(tmp_path, folder, count=2):
    """Start `count` writer processes, release them at once, and return their (exit code, stdout, stderr)."""
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    start, ready = tmp_path / "start", [tmp_path / f"ready{index}" for index in range(count)]
    logs = [(tmp_path / f"out{index}", tmp_path / f"err{index}") for index in range(count)]
    writers = []
    for flag, (out, err) in zip(ready, logs):
        with open(out, "w") as stdout, open(err, "w") as stderr:
            writers.append(subprocess.Popen([sys.executable, str(script), str(REPO_ROOT), str(folder), str(flag),
                                             str(start)], stdout=stdout, stderr=stderr))
    deadline = time.monotonic() + 300
    while not all(flag.exists() for flag in ready):
        assert time.monotonic() < deadline and all(writer.poll() is None for writer in writers), \
            [err.read_text()[-2000:] for _, err in logs]
        time.sleep(0.05)
    start.touch()
    return [(writer.wait(timeout=300), out.read_text(), err.read_text()) for writer, (out, err) in zip(writers, logs)]


def test_concurrent_writers_both_succeed_and_one_complete_checkpoint_remains(tmp_path, capsys):
    folder = tmp_path / "checkpoints" / "flux-demo"
    results = run_writers_together(tmp_path, folder)
    for code, out, err in results:
        assert code == 0, err[-3000:]
        assert "Creating the 'demo' checkpoint" in out  # both found it absent and wrote: the race took place
    assert [path.name for path in folder.parent.iterdir()] == ["flux-demo"]  # no temporary folder left
    assert ensure_demo_checkpoint(folder) == folder and capsys.readouterr().out == ""
    pipeline = FluxPipeline.from_pretrained(str(folder))
    assert pipeline.transformer.config.num_layers == TRANSFORMER_CONFIGS["demo"]["num_layers"]


def test_interrupted_write_leaves_nothing_and_the_next_run_creates_it(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt("simulated Ctrl-C while writing the VAE")

    folder = tmp_path / "checkpoints" / "flux-demo"
    monkeypatch.setattr(demo_checkpoint, "write_vae_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt, match="simulated"):
        ensure_demo_checkpoint(folder)
    assert list(folder.parent.iterdir()) == []
    monkeypatch.undo()
    ensure_demo_checkpoint(folder)
    assert list(folder.parent.iterdir()) == [folder] and not demo_checkpoint.missing_parts(folder)


def test_a_writer_finding_the_checkpoint_complete_keeps_it(tmp_path):
    """The loser of a race: its own copy is discarded, the first complete one stays untouched."""
    folder = ensure_demo_checkpoint(tmp_path / "demo")
    stamp = (folder / "transformer" / "config.json").stat().st_mtime_ns
    assert write_pipeline_checkpoint(folder) == folder
    assert (folder / "transformer" / "config.json").stat().st_mtime_ns == stamp
    assert list(tmp_path.iterdir()) == [folder]


def test_an_incomplete_folder_is_refused_with_the_fix(tmp_path):
    folder = tmp_path / "demo"
    (folder / "transformer").mkdir(parents=True)
    message = (r"demo exists but is not a complete pipeline checkpoint \(it lacks model_index.json, scheduler/, "
               r"text_encoder/, .*vae/;.*\): delete it to have it recreated")
    with pytest.raises(FileNotFoundError, match=message):
        ensure_demo_checkpoint(folder)
    with pytest.raises(FileNotFoundError, match=message):
        write_pipeline_checkpoint(folder)
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == [folder / "transformer"]


def run_bench(*args):
    return subprocess.run([sys.executable, str(REPO_ROOT / "eval" / "bench_transformer.py"), *args],
                          capture_output=True, text=True, timeout=600)


def test_bench_script_runs_on_a_checkpoint_and_writes_json(tmp_path):
    folder = ensure_demo_checkpoint(tmp_path / "demo")
    result = run_bench("--ckpt", str(folder), "--image_size", "64", "96", "--text_tokens", "8",
                       "--repeats", "1", "--json", str(tmp_path / "bench.json"))
    assert result.returncode == 0, result.stderr
    assert "| mindspore graph |" in result.stdout and "| mindspore pynative |" in result.stdout
    assert "24 image + 8 text tokens" in result.stdout
    assert (tmp_path / "bench.json").is_file()


def test_bench_script_rejects_bad_input(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bench_transformer.main(["--ckpt", str(tmp_path / "missing")])
    with pytest.raises(SystemExit) as exit_info:
        bench_transformer.parse_args(["--ckpt", str(tmp_path), "--image_size", "100", "64"])
    assert exit_info.value.code != 0 and "multiples of 16" in capsys.readouterr().err
