"""The seeded demo checkpoint is a complete diffusers FLUX pipeline folder.

Written without torch (models/demo_checkpoint.py), it must load in the independent references
(diffusers' FluxPipeline, transformers' tokenizers and text encoders) with every weight accounted
for, and mindone's text encoders must compute what transformers computes from the same files.
"""

import json

import huggingface_hub.constants
import mindspore as ms
import numpy as np
import pytest
import torch
import transformers
from diffusers import FluxPipeline
from mindone.transformers import CLIPTextModel, T5EncoderModel
from mindone.transformers.models.t5 import modeling_t5 as mindone_t5
from safetensors.numpy import load_file
from transformers.models.t5.modeling_t5 import T5Attention

from conftest import set_mode
from models.demo_checkpoint import TRANSFORMER_CONFIGS, VAE_CONFIG, write_pipeline_checkpoint
from models.t5_position_buckets import relative_position_bucket, use_exact_t5_position_buckets
from torch_reference import relative_max_error

PROMPTS = ["a photo of the cat", "A red dog and a blue painting, 3 cats!"]
WEIGHT_FILES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
    "text_encoder_2": "model.safetensors",
}
# Taken at import, before any test installs the exact buckets on mindone's class.
MINDONE_RELATIVE_POSITION_BUCKET = mindone_t5.T5Attention._relative_position_bucket


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pipeline_checkpoint(tmp_path_factory.mktemp("pipeline") / "flux-demo", "demo", seed=0)


@pytest.fixture(scope="module")
def torch_pipeline(folder):
    assert huggingface_hub.constants.HF_HUB_OFFLINE, "tests must not reach a model hub"
    return FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)


def clip_ids(folder, length=77):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    return tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids


def t5_ids(folder, length):
    tokenizer = transformers.T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2"))
    return tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True, return_tensors="np").input_ids


def test_model_index_names_flux_components(folder):
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer_2"] == ["transformers", "T5TokenizerFast"]


def test_diffusers_loads_every_weight(folder, torch_pipeline):
    for component, filename in WEIGHT_FILES.items():
        stored = set(load_file(str(folder / component / filename)))
        expected = set(getattr(torch_pipeline, component).state_dict())
        assert stored == expected, (component, sorted(expected - stored)[:5], sorted(stored - expected)[:5])


def test_components_fit_together(torch_pipeline):
    transformer = TRANSFORMER_CONFIGS["demo"]
    assert torch_pipeline.vae_scale_factor == 8
    assert torch_pipeline.vae.config.latent_channels * 4 == transformer["in_channels"]
    assert torch_pipeline.text_encoder.config.hidden_size == transformer["pooled_projection_dim"]
    assert torch_pipeline.text_encoder_2.config.d_model == transformer["joint_attention_dim"]
    assert torch_pipeline.scheduler.config.use_dynamic_shifting and torch_pipeline.scheduler.config.max_shift == 1.15
    assert list(torch_pipeline.vae.config.block_out_channels) == VAE_CONFIG["block_out_channels"]


def test_tokenizers_load_offline_and_fit_the_encoders(folder, torch_pipeline):
    ids = clip_ids(folder)
    assert ids.shape == (2, 77)
    clip_config = torch_pipeline.text_encoder.config
    assert ids.max() < clip_config.vocab_size and ids[0, 0] == clip_config.bos_token_id
    assert (ids == clip_config.eos_token_id).any(axis=1).all()
    t5 = transformers.T5TokenizerFast.from_pretrained(str(folder / "tokenizer_2"))
    assert t5.model_max_length == 512
    ids2 = t5(PROMPTS, padding="max_length", max_length=24, return_tensors="np").input_ids
    assert ids2.shape == (2, 24) and ids2.max() < torch_pipeline.text_encoder_2.config.vocab_size
    for row in t5(PROMPTS).input_ids:
        assert row[-1] == t5.eos_token_id == 1
        assert t5.unk_token_id not in row  # English prompts need no unknowns
    assert (ids2[0] == t5.pad_token_id).any()


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_mindone_clip_pooled_output_matches_transformers(folder, mode):
    set_mode(mode)
    ids = clip_ids(folder)
    model = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder", dtype=ms.float32)
    pooled = model(ms.Tensor(ids))[1].asnumpy()
    reference = transformers.CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder").eval()
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).pooler_output.numpy()
    error = relative_max_error(pooled, expected)
    print(f"CLIP pooled output ({mode}): relative max error {error:.2e}")
    assert error <= 1e-4


def mindone_t5_and_reference(folder):
    model = T5EncoderModel.from_pretrained(str(folder), subfolder="text_encoder_2", dtype=ms.float32)
    reference = transformers.T5EncoderModel.from_pretrained(str(folder), subfolder="text_encoder_2").eval()
    return model, reference


@pytest.mark.parametrize("bidirectional,num_buckets,max_distance", [(True, 32, 128), (False, 32, 128), (True, 16, 64)])
def test_exact_position_buckets_equal_transformers(bidirectional, num_buckets, max_distance):
    distances = torch.arange(-600, 600)
    expected = T5Attention._relative_position_bucket(distances, bidirectional, num_buckets, max_distance)
    ours = relative_position_bucket(ms.Tensor(distances.numpy()), bidirectional, num_buckets, max_distance)
    np.testing.assert_array_equal(ours.asnumpy(), expected.numpy())


def test_mindones_own_buckets_are_off_at_16_32_64():
    """Why models/t5_position_buckets.py exists: mindone's buckets, taken through MindSpore's CPU `log`,
    truncate distances 16, 32 and 64 one bucket low. When this fails, MindSpore's `log` was fixed and
    the replacement is no longer needed (it stays correct either way)."""
    distances = torch.arange(-600, 600)
    expected = T5Attention._relative_position_bucket(distances, True, 32, 128).numpy()
    theirs = MINDONE_RELATIVE_POSITION_BUCKET(ms.Tensor(distances.numpy()), True, 32, 128).asnumpy()
    assert distances.numpy()[theirs != expected].tolist() == [-64, -32, -16, 16, 32, 64]


@pytest.mark.parametrize("tokens", [16, 64])
def test_mindone_t5_with_exact_buckets_matches_transformers(folder, tokens):
    """mindone's T5 encoder (graph mode, fp32; PyNative has no CPU Embedding kernel), short and long."""
    use_exact_t5_position_buckets()
    ids = t5_ids(folder, tokens)
    model, reference = mindone_t5_and_reference(folder)
    hidden = model(ms.Tensor(ids))[0].asnumpy()
    with torch.no_grad():
        expected = reference(torch.tensor(ids)).last_hidden_state.numpy()
    error = relative_max_error(hidden, expected)
    print(f"T5 last_hidden_state ({tokens} tokens): relative max error {error:.2e}")
    assert error <= 1e-4


def test_torch_flux_pipeline_runs_end_to_end(torch_pipeline):
    result = torch_pipeline(
        PROMPTS[0], height=64, width=128, num_inference_steps=2, guidance_scale=3.5, max_sequence_length=32,
        output_type="np", generator=torch.Generator().manual_seed(0),
    )
    image = result.images
    assert image.shape == (1, 64, 128, 3)
    assert np.isfinite(image).all() and image.std() > 0


def test_pipeline_checkpoint_is_deterministic(folder, tmp_path):
    again = write_pipeline_checkpoint(tmp_path / "again", "demo", seed=0)
    files = sorted(path.relative_to(folder) for path in folder.rglob("*") if path.is_file())
    assert files == sorted(path.relative_to(again) for path in again.rglob("*") if path.is_file())
    for name in files:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name
    total = sum((folder / name).stat().st_size for name in files if not str(name).startswith("transformer"))
    assert total < 3 * 2**20, f"pipeline components besides the transformer take {total} bytes"
