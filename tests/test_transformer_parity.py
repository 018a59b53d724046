"""Numerical parity of the portable transformer with torch diffusers 0.38 on the same checkpoint."""

import math

import numpy as np
import pytest
import torch

import mindspore as ms

from conftest import ms_forward, set_mode
from models.layers import sinusoidal_frequencies
from models.transformer_flux import FluxTransformer2DModel
from torch_reference import (
    TorchFluxTransformer, make_inputs, relative_max_error, torch_forward, write_torch_checkpoint,
)

# fp32 against fp32: rounding-order differences plus the timestep frequencies, which differ from
# torch's in the last bit where torch's fp32 exp is not correctly rounded (2 of 128 entries); scaled by
# timestep * 1000 this gives the largest share. Measured 1e-6 to 2e-5.
FP32_BOUND = 1e-4
# fp16 against diffusers' fp16 forward. Not against fp32: diffusers rounds `timestep * 1000` to fp16,
# which alone moves both fp16 outputs 1e-2 to 1e-1 away from fp32 depending on the timestep (measured),
# and we reproduce that rounding on purpose. Measured ours-vs-diffusers fp16: 2.3e-3 to 3.0e-3.
FP16_BOUND = 5e-3

DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


@pytest.fixture(scope="module")
def dev_checkpoint(tmp_path_factory):
    return write_torch_checkpoint(tmp_path_factory.mktemp("dev"), guidance_embeds=True)


@pytest.fixture(scope="module")
def schnell_checkpoint(tmp_path_factory):
    return write_torch_checkpoint(tmp_path_factory.mktemp("schnell"), guidance_embeds=False, seed=1)


CASES = [
    # (variant, mode, batch, height, width, text_tokens)
    ("dev", "graph", 1, 4, 4, 5),
    ("dev", "graph", 2, 4, 6, 7),
    ("dev", "pynative", 2, 6, 4, 7),
    ("schnell", "graph", 2, 3, 5, 6),
    ("schnell", "pynative", 1, 4, 4, 5),
]


@pytest.mark.parametrize("variant,mode,batch,height,width,text_tokens", CASES)
def test_fp32_matches_diffusers(request, variant, mode, batch, height, width, text_tokens):
    folder = request.getfixturevalue(f"{variant}_checkpoint")
    inputs = make_inputs(batch, height, width, text_tokens, guidance=variant == "dev", seed=batch + height)
    reference = torch_forward(folder, inputs)
    set_mode(mode)
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    output = ms_forward(model, inputs.as_dict())
    assert output.shape == reference.shape == (batch, height * width, 16)
    assert relative_max_error(output, reference) <= FP32_BOUND


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_fp16_matches_diffusers_within_fp16_rounding(dev_checkpoint, mode):
    inputs = make_inputs(2, 4, 6, 7, guidance=True)
    reference = torch_forward(dev_checkpoint, inputs, dtype="float16")
    set_mode(mode)
    model = FluxTransformer2DModel.from_pretrained(str(dev_checkpoint), "transformer", mindspore_dtype=ms.float16)
    assert all(param.dtype == ms.float16 for param in model.get_parameters())
    output = ms_forward(model, inputs.as_dict())
    assert np.isfinite(output).all()
    assert relative_max_error(output, reference) <= FP16_BOUND


def test_sharded_checkpoint_loads_and_matches(tmp_path):
    folder = write_torch_checkpoint(tmp_path, guidance_embeds=True, max_shard_size="40KB")
    shards = sorted((folder / "transformer").glob("*.safetensors"))
    assert len(shards) > 2, "the checkpoint should really be sharded"
    inputs = make_inputs(1, 4, 4, 5, guidance=True)
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")
    assert relative_max_error(ms_forward(model, inputs.as_dict()), torch_forward(folder, inputs)) <= FP32_BOUND


@pytest.mark.parametrize("weights_dtype,load_dtype", [("bfloat16", "float32"), ("float16", "float16")])
def test_low_precision_weights_load_with_requested_dtype(tmp_path, weights_dtype, load_dtype):
    """bf16/fp16 files: values survive the cast exactly, so we match diffusers loading the same file."""
    folder = write_torch_checkpoint(tmp_path, guidance_embeds=False, weights_dtype=weights_dtype)
    model = FluxTransformer2DModel.from_pretrained(str(folder), "transformer", mindspore_dtype=DTYPES[load_dtype])
    assert {param.dtype for param in model.get_parameters()} == {DTYPES[load_dtype]}
    inputs = make_inputs(1, 4, 4, 5, guidance=False)
    bound = FP32_BOUND if load_dtype == "float32" else FP16_BOUND
    reference = torch_forward(folder, inputs, dtype=load_dtype)
    assert relative_max_error(ms_forward(model, inputs.as_dict()), reference) <= bound


def test_graph_mode_compiles_once_per_input_shape(dev_checkpoint):
    model = FluxTransformer2DModel.from_pretrained(str(dev_checkpoint), subfolder="transformer")
    for step, timestep in enumerate([1.0, 0.75, 0.5, 0.25]):
        inputs = make_inputs(1, 4, 4, 5, guidance=True, seed=step)
        inputs.timestep[:] = timestep
        ms_forward(model, inputs.as_dict())
    assert len(model.compile_cache) == 1
    ms_forward(model, make_inputs(1, 4, 6, 5, guidance=True).as_dict())
    assert len(model.compile_cache) == 2


def test_timestep_frequencies_are_correctly_rounded_and_within_one_ulp_of_torch():
    """Ours equal torch's fp64 exp of diffusers' fp32 exponent rounded to fp32, bit for bit. Torch's own
    fp32 exp is within 1 ulp; how many entries it misses depends on the CPU's vector exp (2 of 128 on the
    Zen 4 machine, 3 on an Intel Xeon), so that count is not asserted."""
    ours = sinusoidal_frequencies(256).asnumpy()[0]
    exponent = -math.log(10000) * torch.arange(0, 128, dtype=torch.float32) / 128
    np.testing.assert_array_equal(ours, torch.exp(exponent.double()).float().numpy())
    theirs = torch.exp(exponent).numpy()
    assert np.abs(ours.view(np.int32) - theirs.view(np.int32)).max() <= 1


def test_bf16_weights_load_as_bf16_bit_exact(tmp_path):
    """bf16 is for Ascend (MindSpore's CPU backend has no bf16 matmul), so check loading, not a forward."""
    folder = write_torch_checkpoint(tmp_path, guidance_embeds=True, weights_dtype="bfloat16")
    model = FluxTransformer2DModel.from_pretrained(str(folder), "transformer", mindspore_dtype=ms.bfloat16)
    stored = TorchFluxTransformer.from_pretrained(folder, subfolder="transformer", torch_dtype=torch.bfloat16)
    stored = {name: value.float().numpy() for name, value in stored.state_dict().items()}
    params = dict(model.parameters_and_names())
    assert set(params) == set(stored)
    for name, param in params.items():
        assert param.dtype == ms.bfloat16
        assert (param.astype(ms.float32).asnumpy() == stored[name]).all(), name
