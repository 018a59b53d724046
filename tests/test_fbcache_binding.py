"""Binding the cached forward onto a Flux transformer, ours or mindone's (constructed on CPU; its
forward needs kernels MindSpore's CPU backend lacks, so only binding and contract are checked)."""

import types

import pytest
from mindone.diffusers import FluxTransformer2DModel as MindoneFluxTransformer

from models.transformer_flux import FluxTransformer2DModel, num_blocks
from models.transformer_flux_withFBCache import FBCache_transformer_construct, disable_fbcache, enable_fbcache
from torch_reference import SMALL_CONFIG
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


def test_the_documented_methodtype_binding_is_equivalent():
    model = FluxTransformer2DModel(**SMALL_CONFIG, guidance_embeds=True)
    model.fbcache_context = CacheContext(1, 16, INNER)
    model.construct = types.MethodType(FBCache_transformer_construct, model)
    assert model.construct.__func__ is FBCache_transformer_construct
