"""Binding the cached forward onto a Flux transformer, ours or mindone's (constructed on CPU; its
forward needs kernels MindSpore's CPU backend lacks, so only binding and contract are checked there), and
the bindings' equality, run on ours."""

import types

import numpy as np
import pytest

import mindspore as ms
from mindone.diffusers import FluxTransformer2DModel as MindoneFluxTransformer

from conftest import ms_forward
from models.transformer_flux import FluxTransformer2DModel, num_blocks
from models.transformer_flux_withFBCache import (FBCache_transformer_construct, FBCachedTransformer, disable_fbcache,
                                                 enable_fbcache)
from torch_reference import SMALL_CONFIG, make_inputs
from utils import CacheContext

INNER = SMALL_CONFIG["num_attention_heads"] * SMALL_CONFIG["attention_head_dim"]
MODELS = {"ours": FluxTransformer2DModel, "mindone": MindoneFluxTransformer}


@pytest.mark.parametrize("implementation", sorted(MODELS))
@pytest.mark.parametrize("guidance_embeds", [True, False])
def test_enable_and_disable_fbcache(implementation, guidance_embeds):
    model = MODELS[implementation](**SMALL_CONFIG, guidance_embeds=guidance_embeds)
    original = model.construct
    context = CacheContext(1, 16, INNER)
    enable_fbcache(model, context)
    assert model.fbcache_context is context
    assert isinstance(model.construct, types.MethodType)
    assert model.construct.__func__ is FBCache_transformer_construct and model.construct.__self__ is model
    # The cached forward tells FLUX.1-dev from schnell by this attribute, on both implementations.
    assert hasattr(model.time_text_embed, "guidance_embedder") == guidance_embeds
    assert num_blocks(model) == SMALL_CONFIG["num_layers"] + SMALL_CONFIG["num_single_layers"]
    disable_fbcache(model)
    assert not hasattr(model, "fbcache_context")
    assert model.construct.__func__ is original.__func__


def test_context_does_not_shadow_mindones_cache_context_method():
    model = MindoneFluxTransformer(**SMALL_CONFIG, guidance_embeds=True)
    enable_fbcache(model, CacheContext(1, 16, INNER))
    assert callable(model.cache_context) and not isinstance(model.cache_context, CacheContext)


def test_documented_binding_wrapper_and_enable_fbcache_run_the_same_cached_steps():
    """docs/usage.md's `model.construct = MethodType(...)` binding, `enable_fbcache` and the
    `FBCachedTransformer` wrapper compile the same cached forward: equal outputs and decisions over
    three steps that include a hit (threshold 1e9: step 1 hits)."""
    inputs = make_inputs(1, 4, 4, 5, guidance=True, seed=1).as_dict()
    weights = FluxTransformer2DModel(**SMALL_CONFIG, guidance_embeds=True).parameters_dict()

    def fresh_model():
        model = FluxTransformer2DModel(**SMALL_CONFIG, guidance_embeds=True)
        ms.load_param_into_net(model, weights, strict_load=True)
        return model

    def run(forward, context):
        outputs = []
        for sigma in (1.0, 0.99, 0.98):
            outputs.append(ms_forward(forward, {**inputs, "timestep": np.full(1, sigma, np.float32)}))
        return outputs, context.summary()["cached"]

    documented, wrapped, enabled = fresh_model(), fresh_model(), fresh_model()
    contexts = [CacheContext(1, 16, INNER, residual_diff_threshold=1e9) for _ in range(3)]
    documented.fbcache_context = contexts[0]
    documented.construct = types.MethodType(FBCache_transformer_construct, documented)
    enable_fbcache(enabled, contexts[2])
    results = [run(documented, contexts[0]), run(FBCachedTransformer(wrapped, contexts[1]), contexts[1]),
               run(enabled, contexts[2])]
    for outputs, decisions in results:
        assert decisions == [False, True, True]
        for output, reference in zip(outputs, results[0][0]):
            np.testing.assert_array_equal(output, reference)


def test_enable_fbcache_after_the_first_compiled_call_is_refused():
    """A compiled graph keeps the forward it was compiled with: binding later would silently never cache."""
    model = FluxTransformer2DModel(**SMALL_CONFIG, guidance_embeds=True)
    ms_forward(model, make_inputs(1, 4, 4, 5, guidance=True, seed=1).as_dict())
    with pytest.raises(ValueError, match="already run in graph mode.*FBCachedTransformer"):
        enable_fbcache(model, CacheContext(1, 16, INNER))
    assert "construct" not in model.__dict__ and not hasattr(model, "fbcache_context")


def test_fn_plus_bn_covering_every_block_is_refused():
    """With no block between the first Fn and the last Bn a "cached" step would skip nothing."""
    model = FluxTransformer2DModel(**SMALL_CONFIG, guidance_embeds=True)
    blocks = num_blocks(model)
    with pytest.raises(ValueError, match=f"must be < {blocks}.*got 1 \\+ {blocks - 1}"):
        enable_fbcache(model, CacheContext(1, 16, INNER, bn_compute_blocks=blocks - 1, text_seq_len=5))
    with pytest.raises(ValueError, match=f"must be < {blocks}"):
        FBCachedTransformer(model, CacheContext(1, 16, INNER, fn_compute_blocks=blocks))
