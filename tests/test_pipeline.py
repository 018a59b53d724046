"""FluxPipeline against diffusers' torch FluxPipeline on the project's own small pipeline checkpoint."""

import re
import shutil
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import mindspore as ms
from mindspore import ops

from models.demo_checkpoint import write_pipeline_checkpoint
from models.loading import CheckpointError
from conftest import set_mode
from pipeline_flux import FBCacheConfig, FluxPipeline, NonFiniteError, pack_latents
from torch_reference import relative_max_error

HEIGHT, WIDTH = 128, 96
STEPS = 4
TEXT_TOKENS = 32
PROMPT = "a small red fox in the snow"
NEGATIVE = "blurry"
# Text encoders, transformer, scheduler and VAE each agree to ~1e-6..1e-5 in fp32; four steps of the
# loop compound them (measured ~1e-5 on the image).
IMAGE_BOUND = 1e-4
# Same weights and ops, executed as a graph or op by op (the cache tests' bound for the same comparison).
SAME_MODEL_BOUND = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_pipeline_checkpoint(tmp_path_factory.mktemp("pipeline"), "demo", seed=0)


@pytest.fixture(scope="module")
def ours(folder):
    return FluxPipeline.from_pretrained(str(folder))


def load_theirs(folder):
    from diffusers import FluxPipeline as TorchFluxPipeline

    return TorchFluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(folder):
    return load_theirs(folder)


def initial_latents(pipeline: FluxPipeline, height=HEIGHT, width=WIDTH, batch=1, seed=0) -> np.ndarray:
    channels = pipeline.transformer.config.in_channels // 4
    shape = (batch, channels, height // pipeline.vae_scale_factor, width // pipeline.vae_scale_factor)
    return pack_latents(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def run_ours(pipeline, latents, cache=None, **kwargs):
    height, width = kwargs.pop("height", HEIGHT), kwargs.pop("width", WIDTH)
    return pipeline(PROMPT, height=height, width=width, num_inference_steps=STEPS, latents=latents,
                    max_sequence_length=TEXT_TOKENS, output_type="np", cache=cache, **kwargs)


def run_theirs(pipeline, latents, **kwargs):
    with torch.no_grad():
        images = pipeline(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS,
                          latents=torch.from_numpy(latents), max_sequence_length=TEXT_TOKENS, output_type="np",
                          **kwargs).images
    return np.asarray(images)


def test_uncached_images_match_diffusers(ours, theirs):
    latents = initial_latents(ours)
    output = run_ours(ours, latents)
    reference = run_theirs(theirs, latents)
    images = np.stack(output.images)
    assert images.shape == reference.shape == (1, HEIGHT, WIDTH, 3)
    assert images.std() > 0.01, "the image should not be flat"
    assert relative_max_error(images, reference) <= IMAGE_BOUND
    assert output.cache_summaries == {}


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_true_cfg_matches_diffusers(ours, theirs, batch_cfg):
    """Both branches as one batch (default) or as two calls: diffusers' true CFG either way."""
    latents = initial_latents(ours, seed=1)
    output = run_ours(ours, latents, negative_prompt=NEGATIVE, true_cfg_scale=2.5, batch_cfg=batch_cfg)
    reference = run_theirs(theirs, latents, negative_prompt=NEGATIVE, true_cfg_scale=2.5)
    assert relative_max_error(np.stack(output.images), reference) <= IMAGE_BOUND
    without_cfg = np.stack(run_ours(ours, latents).images)
    assert relative_max_error(without_cfg, reference) > 1e-2, "true CFG must change the image"


def first_block_cache_threshold(ours, latents) -> float:
    """A threshold between the probe diffs of this loop, so that both hits and misses occur."""
    diffs = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=0.0)).cache_summaries["cond"]["diffs"]
    finite = sorted(diff for diff in diffs if np.isfinite(diff))
    return float((finite[0] + finite[-1]) / 2)


def test_first_block_cache_matches_diffusers_hook(folder, ours):
    from diffusers.hooks import FirstBlockCacheConfig

    latents = initial_latents(ours, seed=2)
    threshold = first_block_cache_threshold(ours, latents)
    output = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=threshold))
    summary = output.cache_summaries["cond"]
    assert 0 < summary["steps_cached"] < STEPS, summary
    # A fresh pipeline: diffusers 0.38 caches a model's child hook registries at its first call, so a
    # cache enabled after a call never receives the "cond" context (ValueError: No context is set).
    theirs = load_theirs(folder)
    theirs.transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    reference = run_theirs(theirs, latents)
    assert relative_max_error(np.stack(output.images), reference) <= IMAGE_BOUND
    uncached = np.stack(run_ours(ours, latents).images)
    assert relative_max_error(uncached, reference) > IMAGE_BOUND, "the cache must have changed something"


def test_batched_cfg_takes_one_decision_for_both_branches(ours):
    """One context for the stacked batch: its diff is over both branches, so a threshold between the two
    branches' own step-1 diffs gives one decision, taken for both, in one compiled graph."""
    latents = initial_latents(ours, seed=3)
    cfg = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.0)
    separate = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=0.0), batch_cfg=False,
                        **cfg).cache_summaries
    batched = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=0.0), **cfg)
    assert set(batched.cache_summaries) == {"cond+uncond"}
    joint = batched.cache_summaries["cond+uncond"]["diffs"]
    low, high = sorted((separate["cond"]["diffs"][1], separate["uncond"]["diffs"][1]))
    assert low < joint[1] < high, "the joint diff weighs both branches"
    cached = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=high * 1.01), **cfg)
    assert cached.cache_summaries["cond+uncond"]["cached"][1], "step 1 hits for both branches at once"
    keys = [key for key in ours._cached_transformers if key[0] == "cond+uncond"]
    assert keys and all(key[1] == 2 for key in keys), "the cached graph runs the batch of both branches"
    assert relative_max_error(np.stack(cached.images), np.stack(batched.images)) > 1e-4, "the hit changed the image"


def test_true_cfg_keeps_one_cache_per_branch(ours):
    latents = initial_latents(ours, seed=3)
    output = run_ours(ours, latents, negative_prompt=NEGATIVE, true_cfg_scale=2.0,
                      cache=FBCacheConfig(residual_diff_threshold=0.0), batch_cfg=False)
    assert set(output.cache_summaries) == {"cond", "uncond"}
    cond, uncond = output.cache_summaries["cond"]["diffs"], output.cache_summaries["uncond"]["diffs"]
    assert len(cond) == len(uncond) == STEPS and cond[1:] != uncond[1:]


def test_synced_cfg_branches_take_the_cond_decisions_without_a_recompile(ours):
    latents = initial_latents(ours, seed=3)
    cfg = dict(negative_prompt=NEGATIVE, true_cfg_scale=2.0, batch_cfg=False)
    diffs = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=0.0), **cfg).cache_summaries
    # Between the branches' step-1 diffs: exactly one branch caches step 1 on its own.
    threshold = (diffs["cond"]["diffs"][1] + diffs["uncond"]["diffs"][1]) / 2
    independent = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=threshold), **cfg).cache_summaries
    compiled_before = ours.compiled_graphs()
    synced = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=threshold, sync_cfg_branches=True),
                      **cfg).cache_summaries
    assert ours.compiled_graphs() == compiled_before, "sync is a setting, not a new graph"
    assert synced["cond"]["cached"] == independent["cond"]["cached"], "the leader decides as before"
    assert synced["uncond"]["cached"] == synced["cond"]["cached"]
    assert independent["uncond"]["cached"] != independent["cond"]["cached"], "these inputs must differ unsynced"


def test_repeated_calls_and_resolution_switching_are_reproducible(ours):
    cache = FBCacheConfig(residual_diff_threshold=0.5, taylorseer_derivative=1)
    small = dict(height=64, width=64)
    first = run_ours(ours, initial_latents(ours), cache=cache)
    other = run_ours(ours, initial_latents(ours, **small), cache=cache, **small)
    compiled_before = ours.compiled_graphs()
    again = run_ours(ours, initial_latents(ours), cache=cache)
    assert ours.compiled_graphs() == compiled_before, "a repeated call compiles nothing"
    np.testing.assert_array_equal(np.stack(first.images), np.stack(again.images))
    np.testing.assert_equal(first.cache_summaries, again.cache_summaries)
    assert np.stack(other.images).shape == (1, 64, 64, 3)
    keys = [key for key in ours._cached_transformers if key[0] == "cond"]
    assert len({key[2] for key in keys}) >= 2, "one persistent context per resolution"
    compiled = [len(cached.compile_cache) for cached in ours._cached_transformers.values()]
    assert max(compiled) == 1, "each (branch, shape) context compiles once"


def test_prompt_embeds_replace_the_prompt(ours):
    """Features from encode_prompt, passed back, give the same image as the prompt; and with them a
    cached call builds its context for their text length."""
    embeds, pooled = ours.encode_prompt([PROMPT], [PROMPT], TEXT_TOKENS)
    latents = initial_latents(ours)
    from_prompt = run_ours(ours, latents, cache=FBCacheConfig(residual_diff_threshold=0.5))
    from_embeds = ours(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=HEIGHT, width=WIDTH,
                       num_inference_steps=STEPS, latents=latents, output_type="np",
                       cache=FBCacheConfig(residual_diff_threshold=0.5))
    np.testing.assert_array_equal(np.stack(from_prompt.images), np.stack(from_embeds.images))
    np.testing.assert_equal(from_prompt.cache_summaries, from_embeds.cache_summaries)  # diffs hold NaN


def test_seeded_noise_is_reproducible_and_pil_output(ours):
    images = [ours(PROMPT, height=64, width=64, num_inference_steps=1, seed=7, max_sequence_length=TEXT_TOKENS)
              .images[0] for _ in range(2)]
    assert images[0].size == (64, 64)
    np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(images[1]))


@pytest.mark.parametrize("kwargs,message", [
    (dict(height=100), "multiples of 16"),
    (dict(negative_prompt=["a", "b"], true_cfg_scale=2.0), "negative_prompt has 2 entries but prompt has 1"),
    (dict(prompt_2=["a", "b"]), "prompt_2 has 2 entries but prompt has 1"),
    (dict(num_inference_steps=0), "num_inference_steps must be >= 1"),
    # Would have been silently ignored, or given an all-black image: refused.
    (dict(true_cfg_scale=2.0), "true_cfg_scale=2 needs a negative_prompt"),
    (dict(negative_prompt="blurry"), "negative_prompt is used only with true CFG"),
    (dict(negative_prompt="blurry", true_cfg_scale=float("inf")), "true_cfg_scale must be a finite number"),
    (dict(guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (dict(seed=-1), r"seed must lie in \[0, 2\*\*64 - 1\]"),
    (dict(max_sequence_length=513), "max_sequence_length"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(latents=np.zeros((1, 5, 64), np.float32)), "latents must be packed with shape"),
    (dict(prompt=None), "give a prompt, or prompt_embeds"),
    (dict(negative_prompt="a", negative_prompt_2=["b", "c"], true_cfg_scale=2.0),
     "negative_prompt_2 has 2 entries but negative_prompt has 1"),
    (dict(prompt_embeds=ms.Tensor(np.zeros((1, 8, 64), np.float32))), "either prompt .* or prompt_embeds"),
    (dict(prompt=None, prompt_embeds=ms.Tensor(np.zeros((1, 8, 64), np.float32))), "go together"),
    (dict(prompt=None, prompt_embeds=ms.Tensor(np.zeros((1, 8, 63), np.float32)),
          pooled_prompt_embeds=ms.Tensor(np.zeros((1, 32), np.float32))), r"prompt_embeds must have shape"),
    (dict(prompt=None, prompt_embeds=ms.Tensor(np.zeros((2, 8, 64), np.float32)),
          pooled_prompt_embeds=ms.Tensor(np.zeros((1, 32), np.float32))),
     r"pooled_prompt_embeds must have shape \(2, 32\)"),
])
def test_bad_arguments_are_refused(ours, kwargs, message):
    arguments = dict(prompt=PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=1, max_sequence_length=TEXT_TOKENS)
    with pytest.raises(ValueError, match=message):
        ours(**{**arguments, **kwargs})


def test_mindone_models_load_strictly_and_take_the_cached_forward(folder, tmp_path):
    """The Ascend option, as far as MindSpore's CPU backend allows: construction, strict loading,
    binding of the cached forward (mindone's forward itself needs Ascend kernels)."""
    from mindone.diffusers import AutoencoderKL as MindoneAutoencoderKL
    from mindone.diffusers import FluxTransformer2DModel as MindoneFluxTransformer
    from models.transformer_flux_withFBCache import FBCachedTransformer

    pipeline = FluxPipeline.from_pretrained(str(folder), use_mindone_models=True)
    assert isinstance(pipeline.transformer, MindoneFluxTransformer)
    assert isinstance(pipeline.vae.vae, MindoneAutoencoderKL) and pipeline.vae_scale_factor == 8
    cached = pipeline.cached_transformer("cond", 1, 48, TEXT_TOKENS, FBCacheConfig(taylorseer_derivative=2))
    assert isinstance(cached, FBCachedTransformer) and cached.transformer is pipeline.transformer
    assert cached.context.inner_dim == pipeline.transformer.inner_dim
    assert int(cached.context.taylor_order.asnumpy()) == 2

    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    del tensors["proj_out.bias"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="lacks 1 weight.*proj_out.bias"):
        FluxPipeline.from_pretrained(str(broken), use_mindone_models=True)


@pytest.mark.parametrize("subfolder,weight", [("text_encoder", "text_model.final_layer_norm.weight"),
                                              ("text_encoder_2", "encoder.final_layer_norm.weight")])
def test_text_encoder_weights_are_checked_strictly(folder, tmp_path, subfolder, weight):
    """A missing text-encoder weight would be left random by mindone's loader: it is an error instead."""
    broken = shutil.copytree(folder, tmp_path / "broken")
    weights = broken / subfolder / "model.safetensors"
    tensors = load_file(weights)
    del tensors[weight]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=f"lacks 1 weight.*{weight}"):
        FluxPipeline.from_pretrained(str(broken))


@contextmanager
def poisoned(parameter):
    """One NaN in a weight for the duration of the block (the shared pipeline is restored after)."""
    saved = parameter.asnumpy().copy()
    poisoned_value = saved.copy()
    poisoned_value.flat[0] = np.nan
    parameter.set_data(ms.Tensor(poisoned_value))
    try:
        yield
    finally:
        parameter.set_data(ms.Tensor(saved))


def test_nan_weights_stop_the_run_instead_of_writing_a_black_image(ours):
    latents = initial_latents(ours)
    with poisoned(ours.transformer.proj_out.bias):
        with pytest.raises(NonFiniteError, match="latents became NaN or infinite at step 0 of 4"):
            run_ours(ours, latents)
    with poisoned(ours.vae.decoder.conv_out.bias):
        with pytest.raises(NonFiniteError, match="VAE decoded NaN or infinite pixels"):
            run_ours(ours, latents)
    assert np.isfinite(np.stack(run_ours(ours, latents).images)).all()


def test_the_first_non_finite_step_is_reported(ours):
    """Recorded on the device at each step, read once at the end: a forward that breaks at step 2."""
    latents = ms.Tensor(initial_latents(ours))
    timesteps = ours.prepare_timesteps(latents.shape[1], 5)
    calls = []

    def breaks_at_step_2(latents, *inputs):
        calls.append(len(calls))
        return (ops.ones_like(latents) * (np.nan if len(calls) > 2 else 0.1),)

    text = ms.Tensor(np.zeros((1, 4, 64), np.float32)), ms.Tensor(np.zeros((1, 32), np.float32)), None
    with pytest.raises(NonFiniteError, match="at step 2 of 5"):
        ours.denoise(latents, timesteps, {"cond": text}, {"cond": breaks_at_step_2}, None, None, 1.0, None, False,
                     forward_batch=1)
    assert calls == [0, 1, 2, 3, 4]


def test_prompts_longer_than_the_encoders_read_are_not_cut_silently(ours):
    long_prompt = " ".join(["a small red fox in the snow"] * 12)
    with pytest.warns(UserWarning) as warned:
        ours.encode_prompt([long_prompt], [long_prompt], max_sequence_length=TEXT_TOKENS)
    messages = [str(warning.message) for warning in warned]
    assert any(re.search(r"prompt 0 has \d+ CLIP tokens; the CLIP encoder reads the first 77", m) for m in messages)
    assert any(re.search(rf"prompt 0 has \d+ T5 tokens; the T5 encoder reads the first {TEXT_TOKENS}.*raise "
                         r"max_sequence_length", m) for m in messages), messages
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.encode_prompt([PROMPT], [PROMPT], max_sequence_length=TEXT_TOKENS)


def test_pynative_mode_gives_the_graph_image(ours):
    """PyNative on CPU used to crash in mindone's T5 (no PyNative CPU kernel for Embedding); the portable
    text encoders, transformer and VAE all run op by op there."""
    latents = initial_latents(ours, seed=2)
    cache = FBCacheConfig(residual_diff_threshold=0.5, taylorseer_derivative=1)
    graph = run_ours(ours, latents, cache=cache, negative_prompt=NEGATIVE, true_cfg_scale=2.0)
    set_mode("pynative")
    try:
        pynative = run_ours(ours, latents, cache=cache, negative_prompt=NEGATIVE, true_cfg_scale=2.0)
    finally:
        set_mode("graph")
    assert pynative.cache_summaries["cond+uncond"]["cached"] == graph.cache_summaries["cond+uncond"]["cached"]
    error = relative_max_error(np.stack(pynative.images), np.stack(graph.images))
    print(f"PyNative vs graph image: relative max error {error:.2e}")
    assert error <= SAME_MODEL_BOUND
