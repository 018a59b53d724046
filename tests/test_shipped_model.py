"""The shipped emoji-world Flux (assets/flux-emoji) and its judge (assets/emoji-judge): strict loading in
ours and in diffusers / transformers, our pipeline equal to diffusers' FluxPipeline on it (uncached and
with diffusers' FirstBlockCache at the default threshold, true CFG as the CLI runs it), and the judge
telling real renders' captions from others through our MindSpore CLIP scorer."""

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from eval.feature_extractors import CLIPScorer
from models.demo_checkpoint import torch_parameter_name
from models.embedded import GENERATION_DEFAULTS, SHIPPED_JUDGE, TRAINED, embedded_checkpoint
from pipeline_flux import FBCacheConfig, FluxPipeline, pack_latents
from torch_reference import relative_max_error
from train.scenes import evaluation_prompts, image_from_array, render

FOLDER = embedded_checkpoint()
DEFAULTS = GENERATION_DEFAULTS[TRAINED]
PROMPT = DEFAULTS["prompt"][0]
HEIGHT, WIDTH = DEFAULTS["image_size"]
STEPS = DEFAULTS["num_inference_steps"]
CFG = dict(negative_prompt="", true_cfg_scale=DEFAULTS["true_cfg_scale"])
# Text encoders, transformer, scheduler and VAE each agree to ~1e-6 in fp32; 28 steps with true CFG
# compound them.
IMAGE_BOUND = 1e-4


@pytest.fixture(scope="module")
def ours():
    return FluxPipeline.from_pretrained(str(FOLDER))


def load_theirs():
    from diffusers import FluxPipeline as TorchFluxPipeline

    return TorchFluxPipeline.from_pretrained(FOLDER, torch_dtype=torch.float32)


def initial_latents(pipeline: FluxPipeline, seed: int = 0) -> np.ndarray:
    channels = pipeline.transformer.config.in_channels // 4
    shape = (1, channels, HEIGHT // pipeline.vae_scale_factor, WIDTH // pipeline.vae_scale_factor)
    return pack_latents(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def run_ours(pipeline, latents, cache=None, batch_cfg=True):
    return pipeline(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=latents,
                    output_type="np", cache=cache, batch_cfg=batch_cfg, **CFG)


def run_theirs(pipeline, latents):
    with torch.no_grad():
        images = pipeline(PROMPT, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, latents=torch.from_numpy(latents),
                          max_sequence_length=32, output_type="np", **CFG).images
    return np.asarray(images)


def test_components_load_completely_in_diffusers_and_transformers():
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    for cls, subfolder in ((FluxTransformer2DModel, "transformer"), (AutoencoderKL, "vae"),
                           (CLIPTextModel, "text_encoder"), (T5EncoderModel, "text_encoder_2")):
        _, info = cls.from_pretrained(FOLDER, subfolder=subfolder, output_loading_info=True)
        problems = {key: value for key, value in info.items() if value}
        assert not problems, f"{subfolder}: {problems}"


def test_our_pipeline_holds_exactly_the_stored_weights(ours):
    """Every parameter of every component equals its tensor in the files (nothing left random)."""
    components = {"transformer": ours.transformer, "vae": ours.vae, "text_encoder": ours.text_encoder,
                  "text_encoder_2": ours.text_encoder_2}
    for subfolder, model in components.items():
        stored = {}
        for file in (FOLDER / subfolder).glob("*.safetensors"):
            stored.update(load_file(file))
        for name, param in model.parameters_and_names():
            key = torch_parameter_name(name)
            assert key in stored, f"{subfolder}: {key} is not in the files"
            np.testing.assert_array_equal(param.asnumpy(), stored[key].astype(np.float32), err_msg=f"{subfolder}.{key}")
    assert ours.tokenizer_2.model_max_length == ours.default_sequence_length() == 32


def test_images_match_diffusers_with_true_cfg(ours):
    latents = initial_latents(ours)
    image = np.stack(run_ours(ours, latents).images)
    reference = run_theirs(load_theirs(), latents)
    assert image.shape == reference.shape == (1, HEIGHT, WIDTH, 3)
    assert relative_max_error(image, reference) <= IMAGE_BOUND


def test_default_threshold_caches_steps_as_diffusers_first_block_cache_does(ours):
    from diffusers.hooks import FirstBlockCacheConfig

    latents = initial_latents(ours, seed=1)
    cache = FBCacheConfig()  # the default residual_diff_threshold, 0.08
    # diffusers' hook keeps a state per branch, so the branches run as two calls with a cache each here.
    output = run_ours(ours, latents, cache=cache, batch_cfg=False)
    for branch in ("cond", "uncond"):
        summary = output.cache_summaries[branch]
        assert 0 < summary["steps_cached"] < STEPS, (branch, summary["diffs"])
    theirs = load_theirs()
    theirs.transformer.enable_cache(FirstBlockCacheConfig(threshold=cache.residual_diff_threshold))
    reference = run_theirs(theirs, latents)
    assert relative_max_error(np.stack(output.images), reference) <= IMAGE_BOUND


def test_judge_prefers_a_real_render_s_own_caption():
    prompts, scenes = evaluation_prompts(16)
    images = [image_from_array(render(scene)) for scene in scenes]
    scorer = CLIPScorer(SHIPPED_JUDGE, batch_size=16)
    image_embeds, text_embeds = scorer.image_embeds(images), scorer.text_embeds(prompts)
    cosine = (text_embeds / np.linalg.norm(text_embeds, axis=1, keepdims=True)) @ (
        image_embeds / np.linalg.norm(image_embeds, axis=1, keepdims=True)).T
    own = np.diag(cosine)
    others = cosine[~np.eye(len(prompts), dtype=bool)]
    # Measured with the fp32 judge before shipping: 0.92 against 0.01, 16 of 16 retrieved.
    assert own.mean() > others.mean() + 0.5, (own.mean(), others.mean())
    assert (cosine.argmax(axis=1) == np.arange(len(prompts))).mean() >= 0.8


@pytest.mark.slow
def test_quality_table_end_to_end(tmp_path):
    from eval import emoji_quality_table

    text = emoji_quality_table.main(["--out", str(tmp_path / "quality"), "--settings", "baseline", "fbcache_0.2",
                                     "--num_prompts", "2", "--gallery", str(tmp_path / "gallery.png")])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines()[2:]}
    assert list(rows) == ["baseline", "fbcache_0.2", "real renders (re-drawn: the noise floor)"]
    assert rows["baseline"].count(" - ") == 2  # no PSNR / SSIM against itself
    assert "x |" in rows["fbcache_0.2"] and " - " not in rows["fbcache_0.2"]
    from PIL import Image

    assert Image.open(tmp_path / "gallery.png").size == (2 * WIDTH, 3 * HEIGHT)
