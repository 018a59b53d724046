"""The model contract shared with mindone's FluxTransformer2DModel (docs/design.md), which the cached
forward is written against: attribute names, block call signature and return order, parameter names."""

import inspect

import numpy as np
import pytest

import mindspore as ms
from mindone.diffusers import FluxTransformer2DModel as MindoneFluxTransformer

from conftest import ms_forward, set_mode
from models.transformer_flux import FluxTransformer2DModel
from torch_reference import SMALL_CONFIG, make_inputs

CONTRACT_ATTRIBUTES = [
    "x_embedder", "time_text_embed", "context_embedder", "pos_embed",
    "transformer_blocks", "single_transformer_blocks", "norm_out", "proj_out",
]
BLOCK_PARAMETERS = ["hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs"]


def small_model(guidance_embeds=True):
    return FluxTransformer2DModel(**SMALL_CONFIG, guidance_embeds=guidance_embeds)


def test_attributes_and_parameter_names_match_mindone():
    ours = small_model()
    theirs = MindoneFluxTransformer(**SMALL_CONFIG, guidance_embeds=True)
    for name in CONTRACT_ATTRIBUTES:
        assert hasattr(ours, name) and hasattr(theirs, name), name
    our_shapes = {name: tuple(param.shape) for name, param in ours.parameters_and_names()}
    their_shapes = {name: tuple(param.shape) for name, param in theirs.parameters_and_names()}
    assert our_shapes == their_shapes


@pytest.mark.parametrize("blocks", ["transformer_blocks", "single_transformer_blocks"])
def test_block_call_contract(blocks):
    set_mode("pynative")
    model = small_model()
    block = getattr(model, blocks)[0]
    assert list(inspect.signature(block.construct).parameters) == BLOCK_PARAMETERS
    rng = np.random.default_rng(0)
    dim = model.inner_dim
    image = ms.Tensor(rng.standard_normal((2, 12, dim)).astype(np.float32))
    text = ms.Tensor(rng.standard_normal((2, 5, dim)).astype(np.float32))
    temb = ms.Tensor(rng.standard_normal((2, dim)).astype(np.float32))
    rotary = model.pos_embed(ms.Tensor(np.zeros((17, 3), np.float32)))
    text_out, image_out = block(image, text, temb, image_rotary_emb=rotary, joint_attention_kwargs=None)
    assert text_out.shape == text.shape and image_out.shape == image.shape


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_model_returns_one_element_tuple(mode):
    set_mode(mode)
    inputs = make_inputs(1, 2, 3, 4, guidance=True)
    outputs = small_model()(**{k: ms.Tensor(v) for k, v in inputs.as_dict().items()})
    assert isinstance(outputs, tuple) and len(outputs) == 1
    assert outputs[0].shape == (1, 6, SMALL_CONFIG["in_channels"])


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize(
    "guidance_embeds,guidance,message",
    [(True, None, "pass a `guidance` tensor"), (False, 3.5, "pass guidance=None")],
)
def test_guidance_must_match_the_variant(mode, guidance_embeds, guidance, message):
    set_mode(mode)
    inputs = make_inputs(1, 2, 2, 3, guidance=False).as_dict()
    inputs["guidance"] = None if guidance is None else np.array([guidance], np.float32)
    with pytest.raises(ValueError, match=message):
        ms_forward(small_model(guidance_embeds), inputs)


def test_attention_kwargs_are_refused():
    set_mode("pynative")
    inputs = {k: ms.Tensor(v) for k, v in make_inputs(1, 2, 2, 3, guidance=True).as_dict().items()}
    with pytest.raises(ValueError, match="joint_attention_kwargs are not supported"):
        small_model()(**inputs, joint_attention_kwargs={"scale": 0.5})
