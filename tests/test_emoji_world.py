"""The emoji world the shipped model is trained on: atlas, scenes, captions, tokenizers, and the three
training scripts run for a few steps on tiny settings (deterministic, resumable) so none of it can rot."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer, T5TokenizerFast

from train import flux as train_flux
from train import judge as train_judge
from train import vae as train_vae
from train.atlas import ATLAS_JSON, TILE, load_atlas
from train.scenes import (caption, evaluation_prompts, is_held_out, render, render_batch, sample_scene, scenes)
from train.world import T5_TEXT_TOKENS, caption_words, write_pipeline_skeleton


def test_atlas_holds_every_named_emoji():
    tiles, names = load_atlas()
    assert tiles.shape == (len(names), TILE, TILE, 4) == (32, 64, 64, 4)
    assert len(set(names)) == len(names) == len(json.loads(ATLAS_JSON.read_text())["emoji"])
    visible = (tiles[..., 3] > 128).mean(axis=(1, 2))
    assert visible.min() > 0.2, "every tile should hold a visible emoji"


def test_scenes_are_deterministic_and_captioned():
    first, again = scenes(3, 20), scenes(3, 20)
    assert first == again
    assert np.array_equal(render_batch(first), render_batch(again))
    image = render(first[0])
    assert image.shape == (128, 128, 3) and 0 <= image.min() and image.max() <= 1
    text = caption(first[0])
    assert text.startswith(("a ", "an ")) and text.endswith(" background")


def test_held_out_scenes_never_reach_training():
    rng = np.random.default_rng(0)
    train = [sample_scene(rng, "train") for _ in range(3000)]
    assert not any(is_held_out(scene) for scene in train)
    prompts, held_out = evaluation_prompts(32)
    assert len(set(prompts)) == 32 and all(is_held_out(scene) for scene in held_out)
    assert not set(prompts) & {caption(scene) for scene in train}
    assert sum(len(scene.placements) == 2 for scene in held_out) == 16


def test_tokenizers_cover_the_caption_vocabulary(tmp_path):
    folder = write_pipeline_skeleton(tmp_path / "world")
    t5 = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    clip = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert t5.model_max_length == T5_TEXT_TOKENS
    for word in caption_words():
        assert t5.tokenize(word) == ["\u2581" + word], word
    captions = [caption(scene) for scene in scenes(0, 500)]
    assert max(len(t5(text).input_ids) for text in captions) <= T5_TEXT_TOKENS
    assert all(t5.unk_token_id not in t5(text).input_ids for text in captions)
    assert max(len(clip(text).input_ids) for text in captions) <= clip.model_max_length


def run(module, *args):
    module.main([str(arg) for arg in args])


@pytest.mark.slow
def test_training_scripts_run_deterministically_and_resume(tmp_path, capsys):
    tiny = ["--batch_size", 2, "--seed", 1]
    run(train_vae, "--steps", 3, "--out", tmp_path / "vae_a", "--stats_scenes", 32, *tiny)
    run(train_vae, "--steps", 3, "--out", tmp_path / "vae_b", "--stats_scenes", 32, "--until", 1, *tiny)
    assert "stopped after step 1 of 3" in capsys.readouterr().out
    run(train_vae, "--steps", 3, "--out", tmp_path / "vae_b", "--stats_scenes", 32, *tiny)
    assert "resuming" in capsys.readouterr().out
    weights = [load_file(tmp_path / run_name / "vae" / "diffusion_pytorch_model.safetensors")
               for run_name in ("vae_a", "vae_b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    config = json.loads((tmp_path / "vae_a" / "vae" / "config.json").read_text())
    assert config["latent_channels"] == 16 and len(config["block_out_channels"]) == 4
    stats = json.loads((tmp_path / "vae_a" / "vae_stats.json").read_text())
    assert config["scaling_factor"] == stats["scaling_factor"] > 0

    run(train_flux, "--vae", tmp_path / "vae_a" / "vae", "--pool", 8, "--steps", 2, "--out", tmp_path / "flux", *tiny)
    pipeline = tmp_path / "flux" / "pipeline"
    assert sorted(path.name for path in pipeline.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer",
        "vae"]

    run(train_judge, "--steps", 2, "--batch_size", 4, "--out", tmp_path / "judge")
    stats = json.loads((tmp_path / "judge" / "judge_stats.json").read_text())
    assert 0 <= stats["top1_text_to_image_retrieval"] <= 1
    assert (tmp_path / "judge" / "judge" / "preprocessor_config.json").is_file()
