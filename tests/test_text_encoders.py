"""The portable CLIP and T5 text encoders against transformers' torch models, and their strict loading.

Checkpoints are written by transformers' own `save_pretrained` (single file, sharded, fp16, bf16), and
the references are transformers' own forwards on the same token ids, unmasked and padded to the
length FLUX pads to, as diffusers' FLUX pipeline calls them.
"""

import json
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

import mindspore as ms

from conftest import set_mode
from models.clip_text import CLIPTextModel, LEGACY_CLIP_EOS_TOKEN_ID
from models.loading import CheckpointError
from models.t5_encoder import T5EncoderModel, clamp_fp16, relative_position_buckets
from torch_reference import relative_max_error

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "flux-emoji"
WEIGHTS_FILE = "model.safetensors"
MODES = ["graph", "pynative"]
FP32_TOLERANCE = 1e-4
# fp16 runs are compared with torch fp16 on the same weights: both round every activation to fp16
# through the blocks, in different orders (we reduce norms and softmax in fp32 too, but add the CLIP
# mask in fp32). Measured on the shipped T5: ours 1.1e-3 from torch fp16, torch fp16 1.3e-3 from fp32.
FP16_TOLERANCE = 4e-3
CLIP_LENGTH = 77  # the pipeline pads CLIP prompts to the tokenizer's model_max_length
T5_LENGTH = 32  # and T5 prompts to max_sequence_length: the shipped tokenizer_2's model_max_length
PROMPTS = [
    "a large red apple in the center, on a white background",
    # over 16 T5 tokens, so distances in T5's logarithmic position buckets occur between real tokens
    "two small yellow stars at the top left and a blue heart at the bottom right corner of a green field",
]
SMALL_CLIP = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=CLIP_LENGTH, hidden_act="quick_gelu", bos_token_id=998, eos_token_id=500,
                  pad_token_id=500)
SMALL_T5 = dict(vocab_size=300, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu")


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """transformers' init leaves norm scales 1 and biases 0, which would hide a swapped or dropped norm
    weight or bias, and T5's position-bias table near 0, which would hide a wrong bucket: those are
    redrawn (scales 1 + 0.1 N, biases 0.1 N, the position-bias table N(0, 1))."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "relative_attention_bias" in name:
                param.copy_(noise)
            elif param.ndim == 1 and name.endswith("weight"):
                param.copy_(1 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.1 * noise)
    return model.eval()


def write_torch_model(folder: Path, model_class, config, seed: int = 0, dtype=None, **save_options) -> Path:
    """A seeded, randomized transformers model saved by its own `save_pretrained` (safetensors), optionally
    cast to `dtype` first and with `save_options` such as `max_shard_size`."""
    torch.manual_seed(seed)
    model = randomized(model_class(config), seed)
    if dtype is not None:
        model = model.to(dtype)
    model.save_pretrained(str(folder), safe_serialization=True, **save_options)
    return folder


def clip_config(**overrides) -> transformers.CLIPTextConfig:
    return transformers.CLIPTextConfig(**{**SMALL_CLIP, **overrides})


def t5_config(**overrides) -> transformers.T5Config:
    return transformers.T5Config(**{**SMALL_T5, **overrides})


def torch_outputs(folder: Path, model_class, ids: np.ndarray) -> Tuple[np.ndarray, ...]:
    """transformers' fp32 outputs (last hidden state, and CLIP's pooled output) for `ids`."""
    model = model_class.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        output = model(torch.from_numpy(ids))
    pooled = getattr(output, "pooler_output", None)
    return tuple(tensor.float().numpy() for tensor in (output.last_hidden_state, pooled) if tensor is not None)


def ours(model, ids: np.ndarray) -> Tuple[np.ndarray, ...]:
    return tuple(tensor.astype(ms.float32).asnumpy() for tensor in model(ms.Tensor(ids)))


def assert_close(actual: Tuple[np.ndarray, ...], reference: Tuple[np.ndarray, ...], tolerance: float) -> None:
    assert len(actual) == len(reference)
    for got, expected in zip(actual, reference):
        assert got.shape == expected.shape
        assert relative_max_error(got, expected) <= tolerance


def clip_ids(eos: int, rows: int = 3, length: int = CLIP_LENGTH, seed: int = 0) -> np.ndarray:
    """Token rows as CLIP's tokenizer lays them out: bos, text, eos, then eos as padding. The text holds ids
    above the eos id, so the highest id is not the eos, and the rows end at different positions (one
    unpadded, its eos last)."""
    rng = np.random.default_rng(seed)
    ids = np.full((rows, length), eos, np.int64)
    for row, text_length in enumerate([5, 30, length - 2][:rows]):
        ids[row, 0] = SMALL_CLIP["bos_token_id"]
        ids[row, 1:1 + text_length] = rng.choice([i for i in range(3, SMALL_CLIP["vocab_size"]) if i != eos],
                                                 text_length)
    return ids


# ------------------------------------------------------------------------------------- shipped model


@pytest.fixture(scope="module")
def shipped_ids() -> Tuple[np.ndarray, np.ndarray]:
    clip_tokenizer = transformers.CLIPTokenizer.from_pretrained(str(SHIPPED / "tokenizer"), local_files_only=True)
    t5_tokenizer = transformers.T5TokenizerFast.from_pretrained(str(SHIPPED / "tokenizer_2"), local_files_only=True)
    clip = clip_tokenizer(PROMPTS, padding="max_length", max_length=CLIP_LENGTH, truncation=True,
                          return_tensors="np").input_ids
    t5 = t5_tokenizer(PROMPTS, padding="max_length", max_length=T5_LENGTH, truncation=True,
                      return_tensors="np").input_ids
    assert (t5[1] != t5_tokenizer.pad_token_id).sum() > 16
    return clip, t5


@pytest.fixture(scope="module")
def shipped_clip() -> CLIPTextModel:
    return CLIPTextModel.from_pretrained(SHIPPED / "text_encoder")


@pytest.fixture(scope="module")
def shipped_t5() -> T5EncoderModel:
    return T5EncoderModel.from_pretrained(str(SHIPPED / "text_encoder_2"))


@pytest.mark.parametrize("mode", MODES)
def test_shipped_clip_matches_transformers(mode, shipped_clip, shipped_ids):
    set_mode(mode)
    ids = shipped_ids[0]
    assert_close(ours(shipped_clip, ids), torch_outputs(SHIPPED / "text_encoder", transformers.CLIPTextModel, ids),
                 FP32_TOLERANCE)
    assert shipped_clip.config.hidden_size == 64


@pytest.mark.parametrize("mode", MODES)
def test_shipped_t5_matches_transformers(mode, shipped_t5, shipped_ids):
    set_mode(mode)
    ids = shipped_ids[1]
    assert_close(ours(shipped_t5, ids), torch_outputs(SHIPPED / "text_encoder_2", transformers.T5EncoderModel, ids),
                 FP32_TOLERANCE)
    assert shipped_t5.config.d_model == 128


def test_shipped_encoders_in_fp16_match_transformers_fp16(shipped_ids):
    """Run in fp16 (PyNative, CPU), ours is as close to torch fp16 as fp16 allows."""
    set_mode("pynative")
    for subfolder, ours_class, torch_class, ids in [
        ("text_encoder", CLIPTextModel, transformers.CLIPTextModel, shipped_ids[0]),
        ("text_encoder_2", T5EncoderModel, transformers.T5EncoderModel, shipped_ids[1]),
    ]:
        model = ours_class.from_pretrained(SHIPPED / subfolder, mindspore_dtype=ms.float16)
        assert {param.dtype for param in model.get_parameters()} == {ms.float16}
        reference = torch_class.from_pretrained(str(SHIPPED / subfolder), dtype=torch.float16).eval()
        with torch.no_grad():
            output = reference(torch.from_numpy(ids))
        expected = tuple(t.float().numpy() for t in (output.last_hidden_state, getattr(output, "pooler_output", None))
                         if t is not None)
        assert_close(ours(model, ids), expected, FP16_TOLERANCE)


# --------------------------------------------------------------------------------------- T5 buckets


@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (32, 20), (64, 256), (8, 16)])
def test_t5_buckets_equal_transformers(num_buckets, max_distance):
    length = 600  # past every max_distance here: every bucket and the clamp to the last one occur
    positions = torch.arange(length)
    reference = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
        positions[None, :] - positions[:, None], bidirectional=True, num_buckets=num_buckets, max_distance=max_distance)
    buckets = relative_position_buckets(length, num_buckets, max_distance)
    np.testing.assert_array_equal(buckets, reference.numpy())
    np.testing.assert_array_equal(relative_position_buckets(50, num_buckets, max_distance),
                                  reference[:50, :50].numpy())


def test_fp16_clamp_matches_transformers():
    """transformers clamps fp16 hidden states after each T5 layer, lower when one is already infinite."""
    set_mode("pynative")
    for values in ([1.0, -65504.0, 3.0, 65504.0], [1.0, -np.inf, 65504.0, 70000.0, -65000.0]):
        hidden = torch.tensor(values, dtype=torch.float16)
        limit = torch.where(torch.isinf(hidden).any(), torch.finfo(torch.float16).max - 1000,
                            torch.finfo(torch.float16).max)
        expected = torch.clamp(hidden, min=-limit, max=limit).numpy()
        np.testing.assert_array_equal(clamp_fp16(ms.Tensor(hidden.numpy())).asnumpy(), expected)


# ------------------------------------------------------------------------------ full-width random models


@pytest.fixture(scope="module")
def t5_xxl(tmp_path_factory) -> Tuple[Path, np.ndarray, Tuple[np.ndarray, ...]]:
    """T5 v1.1-XXL's widths (FLUX's text_encoder_2) with one layer and a small vocabulary, 512 random
    tokens (FLUX.1-dev's max_sequence_length: distances up to 511, past T5's max distance of 128), and
    transformers' output for them."""
    config = t5_config(vocab_size=300, d_model=4096, num_heads=64, d_kv=64, d_ff=10240, num_layers=1)
    folder = write_torch_model(tmp_path_factory.mktemp("t5_xxl"), transformers.T5EncoderModel, config)
    ids = np.random.default_rng(1).integers(0, 300, (1, 512))
    return folder, ids, torch_outputs(folder, transformers.T5EncoderModel, ids)


@pytest.fixture(scope="module")
def clip_l(tmp_path_factory) -> Tuple[Path, np.ndarray, Tuple[np.ndarray, ...]]:
    """CLIP-L's text widths (FLUX's text_encoder) with one layer, and transformers' output for token rows
    whose eos id is not the highest id: only transformers 4.57's first-eos rule picks their pooled token."""
    config = clip_config(hidden_size=768, num_attention_heads=12, intermediate_size=3072, num_hidden_layers=1)
    folder = write_torch_model(tmp_path_factory.mktemp("clip_l"), transformers.CLIPTextModel, config)
    ids = clip_ids(SMALL_CLIP["eos_token_id"])
    assert ids.max() > SMALL_CLIP["eos_token_id"]
    return folder, ids, torch_outputs(folder, transformers.CLIPTextModel, ids)


@pytest.fixture(scope="module")
def clip_legacy(tmp_path_factory) -> Tuple[Path, np.ndarray, Tuple[np.ndarray, ...]]:
    """eos_token_id 2 (FLUX.1-dev's CLIP config), with exact GELU: transformers' legacy rule pools at the
    highest id, its first occurrence where padding repeats it."""
    config = clip_config(eos_token_id=LEGACY_CLIP_EOS_TOKEN_ID, hidden_act="gelu")
    folder = write_torch_model(tmp_path_factory.mktemp("clip_legacy"), transformers.CLIPTextModel, config)
    ids = clip_ids(SMALL_CLIP["vocab_size"] - 1)
    ids[0, 3] = LEGACY_CLIP_EOS_TOKEN_ID  # an id 2 in the text, which the legacy rule must not pool at
    return folder, ids, torch_outputs(folder, transformers.CLIPTextModel, ids)


@pytest.mark.parametrize("mode", MODES)
def test_t5_xxl_width_matches_transformers_at_512_tokens(mode, t5_xxl):
    set_mode(mode)
    folder, ids, reference = t5_xxl
    assert_close(ours(T5EncoderModel.from_pretrained(folder), ids), reference, FP32_TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
def test_clip_l_width_matches_transformers(mode, clip_l):
    set_mode(mode)
    folder, ids, reference = clip_l
    assert_close(ours(CLIPTextModel.from_pretrained(folder), ids), reference, FP32_TOLERANCE)


@pytest.mark.parametrize("mode", MODES)
def test_legacy_eos_id_and_gelu_match_transformers(mode, clip_legacy):
    set_mode(mode)
    folder, ids, reference = clip_legacy
    assert_close(ours(CLIPTextModel.from_pretrained(folder), ids), reference, FP32_TOLERANCE)


# ------------------------------------------------------------------------------ storage formats


@pytest.mark.parametrize("stored", ["sharded", "fp16", "bf16", "relu"])
def test_storage_formats_load(stored, tmp_path):
    """Sharded files, and fp16 / bf16 files loaded as fp32 (against torch loading them as fp32); T5's
    original ungated relu feed-forward."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(stored)
    options = dict(max_shard_size="50KB") if stored == "sharded" else {}
    t5_overrides = dict(feed_forward_proj="relu") if stored == "relu" else {}
    for model_class, ours_class, config, ids in [
        (transformers.CLIPTextModel, CLIPTextModel, clip_config(), clip_ids(SMALL_CLIP["eos_token_id"])),
        (transformers.T5EncoderModel, T5EncoderModel, t5_config(**t5_overrides),
         np.random.default_rng(2).integers(0, 300, (2, 40))),
    ]:
        folder = write_torch_model(tmp_path / model_class.__name__, model_class, config, dtype=dtype, **options)
        assert (folder / f"{WEIGHTS_FILE}.index.json").is_file() == (stored == "sharded")
        model = ours_class.from_pretrained(folder)
        assert {param.dtype for param in model.get_parameters()} == {ms.float32}
        assert_close(ours(model, ids), torch_outputs(folder, model_class, ids), FP32_TOLERANCE)


def test_tied_and_buffer_copies_are_accepted(tmp_path):
    """FLUX.1's T5 file also stores `encoder.embed_tokens.weight` (transformers' tied copy of `shared`),
    and older CLIP files the `position_ids` buffer: transformers loads both, so do we."""
    t5 = write_torch_model(tmp_path / "t5", transformers.T5EncoderModel, t5_config())
    weights = load_file(str(t5 / WEIGHTS_FILE))
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"].copy()
    save_file(weights, str(t5 / WEIGHTS_FILE), metadata={"format": "pt"})
    T5EncoderModel.from_pretrained(t5)
    clip = write_torch_model(tmp_path / "clip", transformers.CLIPTextModel, clip_config())
    weights = load_file(str(clip / WEIGHTS_FILE))
    weights["text_model.embeddings.position_ids"] = np.arange(CLIP_LENGTH, dtype=np.int64)[None]
    save_file(weights, str(clip / WEIGHTS_FILE), metadata={"format": "pt"})
    CLIPTextModel.from_pretrained(clip)


# ----------------------------------------------------------------------------------------- strictness


@pytest.fixture(scope="module")
def small_folders(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("small")
    return {
        "clip": write_torch_model(root / "clip", transformers.CLIPTextModel, clip_config()),
        "t5": write_torch_model(root / "t5", transformers.T5EncoderModel, t5_config()),
    }


def copied(folder: Path, target: Path) -> Path:
    target.mkdir()
    for file in folder.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def edit_weights(folder: Path, edit) -> None:
    weights = load_file(str(folder / WEIGHTS_FILE))
    edit(weights)
    save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


MODEL_CLASSES = {"clip": CLIPTextModel, "t5": T5EncoderModel}
WEIGHT_EDITS = {
    "missing": ("clip", lambda w: w.pop("text_model.encoder.layers.1.mlp.fc2.bias"),
                "text_model.encoder.layers.1.mlp.fc2.bias"),
    "unexpected": ("t5", lambda w: w.update({"encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight":
                                             np.zeros((32, 4), np.float32)}),
                   "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"),
    "misshaped": ("t5", lambda w: w.update({"encoder.block.0.layer.1.DenseReluDense.wi_1.weight":
                                            np.zeros((64, 64), np.float32)}),
                  "encoder.block.0.layer.1.DenseReluDense.wi_1.weight"),
}
CONFIG_EDITS = {
    "wrong model_type": ("clip", lambda c: c.update(model_type="clip"), ["'clip'", "clip_text_model"]),
    "t5 as clip": ("t5", lambda c: c.update(model_type="clip_text_model"), ["'clip_text_model'", "'t5'"]),
    "missing key": ("t5", lambda c: c.pop("d_kv"), ["d_kv"]),
    "wrong type": ("clip", lambda c: c.update(hidden_size="64"), ["hidden_size", "'64'"]),
    "clip activation": ("clip", lambda c: c.update(hidden_act="silu"), ["'silu'", "quick_gelu"]),
    "t5 activation": ("t5", lambda c: c.update(feed_forward_proj="gated-silu", dense_act_fn="silu"),
                      ["'silu'", "gelu_new"]),
    "feed_forward_proj": ("t5", lambda c: (c.update(feed_forward_proj="gelu-new"), c.pop("dense_act_fn")),
                          ["'gelu-new'", "gated-ACT"]),
}


@pytest.mark.parametrize("case", sorted(WEIGHT_EDITS))
def test_weight_mismatches_are_refused_by_name(case, small_folders, tmp_path):
    model, edit, name = WEIGHT_EDITS[case]
    folder = copied(small_folders[model], tmp_path / model)
    edit_weights(folder, edit)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        MODEL_CLASSES[model].from_pretrained(folder)


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_config_problems_are_refused_by_name(case, small_folders, tmp_path):
    model, edit, words = CONFIG_EDITS[case]
    folder = copied(small_folders[model], tmp_path / model)
    edit_config(folder, edit)
    with pytest.raises(CheckpointError) as error:
        MODEL_CLASSES[model].from_pretrained(folder)
    for word in [str(folder / "config.json")] + words:
        assert word in str(error.value)


def test_wrong_folder_and_dtype_are_refused(small_folders, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPTextModel.from_pretrained(tmp_path / "absent")
    with pytest.raises(ValueError, match="mindspore_dtype"):
        T5EncoderModel.from_pretrained(small_folders["t5"], mindspore_dtype=ms.int32)
