"""The portable VAE decoder against diffusers' torch `AutoencoderKL`, and its strict loading.

Checkpoints are written by diffusers' own `save_pretrained`, so they hold the encoder weights a real
FLUX `vae/` folder holds, and the reference is diffusers' own `vae.decode(z).sample`.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file

import mindspore as ms

from conftest import set_mode
from models import loading
from models.loading import CheckpointError
from models.vae import AutoencoderKL
from torch_reference import relative_max_error

SMALL_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=32,
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    use_quant_conv=False,
    use_post_quant_conv=False,
    mid_block_add_attention=True,
    scaling_factor=0.3611,
    shift_factor=0.1159,
)
LATENT_SHAPE = (2, 16, 6, 4)  # batch 2, non-square, so a transposed height/width would show
FP32_TOLERANCE = 1e-4
# fp16 runs are compared with torch fp16 on the same weights. Both sides round every activation to
# fp16 (unit roundoff 4.9e-4) through 12 convs, 7 group norms and an attention, each rounding
# differently (we take group-norm statistics and the softmax in fp32, the order of sums differs), so
# the two fp16 results differ by about the fp16 error of either. Measured on this config: torch fp16
# is 9.9e-4 from torch fp32; ours (3x3 convolutions as shifted matmuls on CPU) is 1.4e-3 from torch
# fp32, and 1.4e-3 (graph) / 1.1e-3 (PyNative) from torch fp16 (with nn.Conv2d: 0.9e-3 / 1.2e-3 from
# torch fp32). The bound is ~3x the measured difference and ~4x torch's own fp16 error; a wrong op
# gives errors of order 1e-1. Separately, ours must be about as close to fp32 as diffusers' fp16 is.
FP16_TOLERANCE = 4e-3
FP16_ACCURACY_RATIO = 2.0
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def write_torch_vae(folder: Path, seed: int = 0, **overrides) -> Path:
    """Seeded diffusers AutoencoderKL saved as `<folder>/vae`; returns `folder`.

    Weights are drawn with std 0.15 (diffusers' init would leave norms as identities, zero biases and
    convs near zero, hiding a swapped scale and bias or a missing term).
    """
    torch.manual_seed(seed)
    model = TorchAutoencoderKL(**{**SMALL_VAE_CONFIG, **overrides}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15)
    model.save_pretrained(folder / "vae")
    return folder


def make_latents(seed: int = 0, shape=LATENT_SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_decode(folder: Path, latents: np.ndarray, dtype=torch.float32) -> np.ndarray:
    model = TorchAutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype).eval()
    with torch.no_grad():
        return model.decode(torch.from_numpy(latents).to(dtype)).sample.float().numpy()


def ms_decode(model: AutoencoderKL, latents: np.ndarray) -> np.ndarray:
    return model(ms.Tensor(latents)).astype(ms.float32).asnumpy()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_torch_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def reference(pristine):
    return torch_decode(pristine, make_latents())


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_fp32_parity(pristine, reference, mode):
    set_mode(mode)
    model = AutoencoderKL.from_pretrained(str(pristine), subfolder="vae")
    actual = ms_decode(model, make_latents())
    assert actual.shape == (2, 3, 12, 8)
    error = relative_max_error(actual, reference)
    print(f"VAE fp32 {mode}: relative max error {error:.2e}")
    assert error <= FP32_TOLERANCE


def test_reference_is_not_trivial(pristine, reference):
    """The seeded decoder's output must vary over pixels and with the latents: an output that is nearly
    constant, or dominated by biases, would let a broken latent path pass the parity tests."""
    assert reference.std() > 0.2 * np.abs(reference).max()
    other = torch_decode(pristine, make_latents(seed=5))
    assert relative_max_error(other, reference) > 0.3


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_fp16_parity(pristine, reference, mode):
    set_mode(mode)
    model = AutoencoderKL.from_pretrained(str(pristine), subfolder="vae", mindspore_dtype=ms.float16)
    latents = make_latents()
    actual = model(ms.Tensor(latents))
    assert actual.dtype == ms.float16
    actual = actual.astype(ms.float32).asnumpy()
    torch_fp16 = torch_decode(pristine, latents, torch.float16)
    error = relative_max_error(actual, torch_fp16)
    print(
        f"VAE fp16 {mode}: vs torch fp16 {error:.2e}; ours vs torch fp32 {relative_max_error(actual, reference):.2e}, "
        f"torch fp16 vs torch fp32 {relative_max_error(torch_fp16, reference):.2e}"
    )
    assert error <= FP16_TOLERANCE
    assert relative_max_error(actual, reference) <= FP16_ACCURACY_RATIO * relative_max_error(torch_fp16, reference)


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_post_quant_conv_parity(tmp_path, mode):
    set_mode(mode)
    folder = write_torch_vae(tmp_path, seed=1, use_post_quant_conv=True, use_quant_conv=True)
    latents = make_latents(seed=1)
    model = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    assert "post_quant_conv.weight" in dict(model.parameters_and_names())
    error = relative_max_error(ms_decode(model, latents), torch_decode(folder, latents))
    print(f"VAE fp32 {mode} with post_quant_conv: relative max error {error:.2e}")
    assert error <= FP32_TOLERANCE


def test_compiles_once_per_shape(pristine):
    model = AutoencoderKL.from_pretrained(str(pristine), subfolder="vae")
    for _ in range(2):
        ms_decode(model, make_latents())
    assert len(model.compile_cache) == 1
    ms_decode(model, make_latents(shape=(1, 16, 4, 4)))
    ms_decode(model, make_latents(seed=3))
    assert len(model.compile_cache) == 2


# ---- loading -------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(pristine, tmp_path):
    """A private copy of a valid checkpoint that a test may damage."""
    copy = tmp_path / "ckpt"
    shutil.copytree(pristine, copy)
    return copy


def rewrite_weights(checkpoint: Path, edit) -> None:
    path = checkpoint / "vae" / WEIGHTS_FILE
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_loads_every_decoder_weight_and_skips_the_encoder(checkpoint):
    model = AutoencoderKL.from_pretrained(str(checkpoint))
    stored = load_file(checkpoint / "vae" / WEIGHTS_FILE)
    params = dict(model.parameters_and_names())
    assert any(name.startswith("encoder.") for name in stored)
    assert set(params) == {name for name in stored if name.startswith("decoder.")}
    for name in ("decoder.mid_block.attentions.0.group_norm.weight", "decoder.up_blocks.0.upsamplers.0.conv.weight",
                 "decoder.conv_norm_out.bias"):
        assert (params[name].asnumpy() == stored[name]).all()
    assert model.config.scaling_factor == 0.3611 and model.config.shift_factor == 0.1159


def test_missing_vae_folder(checkpoint):
    shutil.rmtree(checkpoint / "vae")
    with pytest.raises(FileNotFoundError, match="no 'vae/' subfolder"):
        AutoencoderKL.from_pretrained(str(checkpoint))


def test_config_of_another_model(checkpoint):
    config_path = checkpoint / "vae" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "FluxTransformer2DModel"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="describes a FluxTransformer2DModel, not a AutoencoderKL"):
        AutoencoderKL.from_pretrained(str(checkpoint))


def test_missing_decoder_weight(checkpoint):
    rewrite_weights(checkpoint, lambda tensors: tensors.pop("decoder.mid_block.attentions.0.to_k.bias"))
    with pytest.raises(CheckpointError, match=r"lacks 1 weight.*decoder\.mid_block\.attentions\.0\.to_k\.bias"):
        AutoencoderKL.from_pretrained(str(checkpoint))


def test_misshaped_decoder_weight(checkpoint):
    def shrink(tensors):
        tensors["decoder.conv_in.weight"] = tensors["decoder.conv_in.weight"][:, :8]

    rewrite_weights(checkpoint, shrink)
    expected = r"decoder\.conv_in\.weight .* has shape \[64, 8, 3, 3\].*\[64, 16, 3, 3\]"
    with pytest.raises(CheckpointError, match=expected):
        AutoencoderKL.from_pretrained(str(checkpoint))


def test_unknown_non_encoder_weight_is_still_unexpected(checkpoint):
    def add(tensors):
        tensors["decoder.extra.weight"] = np.zeros(3, np.float32)

    rewrite_weights(checkpoint, add)
    with pytest.raises(CheckpointError, match=r"does not have: decoder\.extra\.weight"):
        AutoencoderKL.from_pretrained(str(checkpoint))


def test_file_holding_only_encoder_weights_is_not_read(checkpoint, monkeypatch):
    """Sharded checkpoint whose second shard holds only encoder weights: it is never loaded."""
    vae = checkpoint / "vae"
    tensors = load_file(vae / WEIGHTS_FILE)
    decoder = {name: value for name, value in tensors.items() if not name.startswith("encoder.")}
    encoder = {name: value for name, value in tensors.items() if name.startswith("encoder.")}
    (vae / WEIGHTS_FILE).unlink()
    save_file(decoder, vae / "shard-1.safetensors")
    save_file(encoder, vae / "shard-2.safetensors")
    weight_map = {name: "shard-1.safetensors" for name in decoder} | {name: "shard-2.safetensors" for name in encoder}
    (vae / (WEIGHTS_FILE + ".index.json")).write_text(json.dumps({"weight_map": weight_map}))

    read = []
    original_read_weights = loading.read_weights

    def recording_read_weights(path, names, dtype):
        read.append(Path(path).name)
        return original_read_weights(path, names, dtype)

    monkeypatch.setattr(loading, "read_weights", recording_read_weights)
    model = AutoencoderKL.from_pretrained(str(checkpoint))
    assert read == ["shard-1.safetensors"]
    assert (model.decoder.conv_out.bias.asnumpy() == decoder["decoder.conv_out.bias"]).all()


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_deeper_config_without_mid_attention(tmp_path, mode):
    """Three up blocks (two upsamplers, 4x), two layers per block as in FLUX, a shortcut conv in every
    channel change, and the mid block without attention (`attentions` has no weights then)."""
    set_mode(mode)
    folder = write_torch_vae(tmp_path, seed=2, block_out_channels=(32, 32, 64), layers_per_block=2,
                             down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                             mid_block_add_attention=False)
    latents = make_latents(seed=2, shape=(1, 16, 3, 5))
    model = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    assert not any(".attentions." in name for name, _ in model.parameters_and_names())
    actual = ms_decode(model, latents)
    assert actual.shape == (1, 3, 12, 20)
    error = relative_max_error(actual, torch_decode(folder, latents))
    print(f"VAE fp32 {mode} deeper, no mid attention: relative max error {error:.2e}")
    assert error <= FP32_TOLERANCE


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="act_fn 'gelu'"):
        AutoencoderKL(**{**SMALL_VAE_CONFIG, "act_fn": "gelu"})
    with pytest.raises(ValueError, match="only UpDecoderBlock2D"):
        AutoencoderKL(**{**SMALL_VAE_CONFIG, "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")})
