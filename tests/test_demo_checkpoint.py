"""The project's own seeded checkpoints are real diffusers checkpoints: diffusers loads them and agrees."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from conftest import ms_forward
from eval import bench_transformer
from models.demo_checkpoint import TRANSFORMER_CONFIGS, ensure_demo_checkpoint, write_transformer_checkpoint
from models.transformer_flux import FluxTransformer2DModel
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
    assert not (tmp_path / "demo.partial").exists()


def test_checkpoint_of_an_older_configuration_is_refused(tmp_path):
    folder = ensure_demo_checkpoint(tmp_path / "demo")
    config_file = folder / "transformer" / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(config, num_layers=config["num_layers"] + 1)))
    with pytest.raises(FileNotFoundError, match=r"older 'demo' configuration \(num_layers differ\).*delete it"):
        ensure_demo_checkpoint(folder)


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
