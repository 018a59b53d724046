"""Tests of the accuracy tooling and of its data (tests/accuracy_data.py).

The tests check the metric code against independent computations (scipy, closed forms, brute-force
loops, torch's CLIPModel) and run the generate -> score scripts end to end on the small demo pipeline.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Tuple

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file, save_file
from scipy import linalg
from transformers import CLIPImageProcessor

import mindspore as ms

from accuracy_data import CACHE_SETTINGS, DEFAULT_SEED, PROMPT_SETS, RESOLUTIONS, fbcache_setting
from conftest import set_mode
from eval import image_metrics
from eval.feature_extractors import CLIPScorer, InceptionFeatureExtractor, inception_pixels
from models.demo_checkpoint import (CLIP_BOS, CLIP_EOS, CLIP_MAX_LENGTH, clip_byte_vocabulary, write_clip_tokenizer,
                                   write_pipeline_checkpoint)
from models.loading import CheckpointError
from pipeline_flux import FBCacheConfig
from torch_reference import relative_max_error


# ----- PSNR, SSIM, Frechet distance, CLIP score formula -----


def covariance_by_hand(features: np.ndarray) -> np.ndarray:
    centered = features - features.mean(axis=0)
    return centered.T @ centered / (len(features) - 1)


def symmetric_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix from its eigendecomposition (no scipy.linalg.sqrtm).

    Eigenvalues below 1e-12 of the largest are rounding noise of a rank-deficient matrix and are set to 0:
    their square roots (~1e-8 each) would otherwise add up to a ~1e-8 relative error."""
    values, vectors = np.linalg.eigh(matrix)
    values[values < 1e-12 * values.max()] = 0
    return vectors @ np.diag(np.sqrt(values)) @ vectors.T


def test_frechet_distance_equals_direct_computations():
    rng = np.random.default_rng(0)
    dims = 6
    mixing1, mixing2 = rng.standard_normal((dims, dims)), rng.standard_normal((dims, dims))
    features1 = rng.standard_normal((400, dims)) @ mixing1 + 1.0
    features2 = rng.standard_normal((300, dims)) @ mixing2 - 0.5
    mu1, sigma1 = image_metrics.gaussian_statistics(features1)
    mu2, sigma2 = image_metrics.gaussian_statistics(features2)
    np.testing.assert_allclose(mu1, features1.sum(axis=0) / 400, rtol=1e-12)
    np.testing.assert_allclose(sigma1, covariance_by_hand(features1), rtol=1e-10)

    direct = (np.sum((mu1 - mu2) ** 2)
              + np.trace(sigma1 + sigma2 - 2 * linalg.sqrtm(sigma1 @ sigma2)).real)
    # tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), whose argument is symmetric: no scipy sqrtm involved.
    root1 = symmetric_sqrt(sigma1)
    symmetric = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * symmetric_sqrt(root1 @ sigma2 @ root1))
    ours = image_metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(direct, rel=1e-9)
    assert ours == pytest.approx(symmetric, rel=1e-8)
    assert image_metrics.fid_from_features(features1, features2) == pytest.approx(ours, rel=1e-12)


def test_fid_with_fewer_samples_than_dimensions_equals_the_symmetric_square_root_form():
    rng = np.random.default_rng(5)
    features1 = rng.standard_normal((5, 40)) * np.linspace(0.5, 2, 40) + 0.3
    features2 = rng.standard_normal((7, 40)) @ rng.standard_normal((40, 40)) * 0.2
    mu1, sigma1 = image_metrics.gaussian_statistics(features1)
    mu2, sigma2 = image_metrics.gaussian_statistics(features2)
    root1 = symmetric_sqrt(sigma1)
    symmetric = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * symmetric_sqrt(root1 @ sigma2 @ root1))
    assert image_metrics.fid_from_features(features1, features2) == pytest.approx(symmetric, rel=1e-9)
    assert image_metrics.fid_from_features(features2, features1) == pytest.approx(symmetric, rel=1e-9)
    assert abs(image_metrics.fid_from_features(features1, features1)) < 1e-9 * np.trace(sigma1)
    with pytest.raises(ValueError, match="differ in dimension"):
        image_metrics.fid_from_features(features1, features2[:, :39])


def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    mu1, mu2 = np.array([0.0, 1.0, -2.0]), np.array([0.5, -1.0, 0.0])
    var1, var2 = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    # Per dimension: (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations.
    closed_form = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
    assert closed_form == pytest.approx((0.25 + 4 + 4) + (4 + 1 + 0))
    assert image_metrics.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(closed_form,
                                                                                                  rel=1e-12)


def test_frechet_distance_of_identical_statistics_is_zero_even_when_singular():
    rng = np.random.default_rng(1)
    full_rank = rng.standard_normal((200, 8))
    few_samples = rng.standard_normal((4, 16))   # covariance of rank 3 in 16 dimensions
    for features in (full_rank, few_samples):
        mu, sigma = image_metrics.gaussian_statistics(features)
        distance = image_metrics.frechet_distance(mu, sigma, mu, sigma)
        assert np.isfinite(distance) and abs(distance) < 1e-6 * np.trace(sigma)


def test_frechet_distance_refuses_statistics_that_are_not_covariances():
    # sqrt(diag(-1, 1)) = diag(i, 1): a large imaginary part, not rounding.
    with pytest.raises(ValueError, match="not positive semi-definite"):
        image_metrics.frechet_distance(np.zeros(2), np.diag([-1.0, 1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="statistics do not match"):
        image_metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="n >= 2 samples"):
        image_metrics.gaussian_statistics(np.ones((1, 4)))


def test_psnr_on_fixed_arrays():
    rng = np.random.default_rng(2)
    image = rng.uniform(0, 0.9, (32, 24, 3))
    assert image_metrics.psnr(image, np.clip(image + 0.1, 0, 1)) == pytest.approx(20.0, abs=1e-9)
    eight_bit = rng.integers(0, 250, (16, 16, 3)).astype(np.uint8)
    expected = 10 * np.log10(255 ** 2 / 25)   # every pixel off by 5 (uint8 arithmetic must not wrap)
    assert image_metrics.psnr(eight_bit, eight_bit + 5, data_range=255) == pytest.approx(expected, rel=1e-12)
    assert image_metrics.psnr(image, image) == float("inf")
    with pytest.raises(ValueError, match="same shape"):
        image_metrics.psnr(image, image[:-1])


def brute_force_ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Wang et al.'s SSIM written out: every 11x11 window inside the image, Gaussian weights (sigma 1.5)."""
    offsets = np.arange(11) - 5.0
    weights = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5 ** 2))
    weights /= weights.sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    channel_means = []
    for channel in range(a.shape[2]):
        values = []
        for top in range(a.shape[0] - 10):
            for left in range(a.shape[1] - 10):
                x, y = a[top:top + 11, left:left + 11, channel], b[top:top + 11, left:left + 11, channel]
                mx, my = np.sum(weights * x), np.sum(weights * y)
                vx, vy = np.sum(weights * (x - mx) ** 2), np.sum(weights * (y - my) ** 2)
                cov = np.sum(weights * (x - mx) * (y - my))
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
        channel_means.append(np.mean(values))
    return float(np.mean(channel_means))


def test_ssim_equals_a_per_window_loop():
    rng = np.random.default_rng(3)
    a = rng.random((19, 16, 3))
    b = np.clip(a + 0.2 * rng.standard_normal(a.shape), 0, 1)
    expected = brute_force_ssim(a, b)
    assert 0.1 < expected < 0.95
    assert image_metrics.ssim(a, b) == pytest.approx(expected, rel=1e-10)
    assert image_metrics.ssim(a[..., 0], b[..., 0]) == pytest.approx(brute_force_ssim(a[..., :1], b[..., :1]),
                                                                     rel=1e-10)
    assert image_metrics.ssim(a * 255, b * 255, data_range=255) == pytest.approx(expected, rel=1e-10)


def test_ssim_of_constant_images_is_the_luminance_term():
    mx, my = 0.2, 0.7
    c1 = 0.01 ** 2
    expected = (2 * mx * my + c1) / (mx ** 2 + my ** 2 + c1)
    assert image_metrics.ssim(np.full((16, 16, 3), mx), np.full((16, 16, 3), my)) == pytest.approx(expected, rel=1e-9)


def test_ssim_of_identical_images_is_one_and_small_images_are_refused():
    image = np.random.default_rng(4).random((24, 24, 3))
    assert image_metrics.ssim(image, image) == 1.0
    with pytest.raises(ValueError, match="at least 11x11"):
        image_metrics.ssim(image[:10], image[:10])


def test_clip_score_formula():
    text = np.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    image = np.array([[0.0, 3.0], [-1.0, 0.0], [5.0, 0.0], [1.0, 1.0]])
    # orthogonal, opposite (clipped to 0, not negative), parallel, 45 degrees
    np.testing.assert_allclose(image_metrics.clip_score(image, text), [0.0, 0.0, 100.0, 100 / np.sqrt(2)],
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="zero vector"):
        image_metrics.clip_score(np.zeros((1, 2)), np.ones((1, 2)))


# ----- tests: CLIP scorer against torch's CLIPModel -----

CLIP_IMAGE_SIZE = 32


def write_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A random CLIPModel saved by transformers (torch), with a CLIP tokenizer and image processor, in the
    layout of a hub CLIP folder (everything at the top level)."""
    import torch
    from transformers import CLIPConfig
    from transformers import CLIPModel as TorchCLIPModel

    vocab_size = write_clip_tokenizer(folder)
    for file in (folder / "tokenizer").iterdir():
        file.rename(folder / file.name)
    (folder / "tokenizer").rmdir()
    vocab, _ = clip_byte_vocabulary()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=vocab[CLIP_BOS],
                         eos_token_id=vocab[CLIP_EOS], pad_token_id=vocab[CLIP_EOS]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=CLIP_IMAGE_SIZE, patch_size=8),
        projection_dim=16)
    TorchCLIPModel(config).save_pretrained(folder, safe_serialization=True)
    size = {"height": CLIP_IMAGE_SIZE, "width": CLIP_IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": CLIP_IMAGE_SIZE}, crop_size=size).save_pretrained(folder)
    return folder


def random_images(seed: int, count: int, size: Tuple[int, int] = (40, 48)) -> list:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    # Seed 5: the test pairs' cosines have both signs (3 positive, 2 negative), so both sides of
    # max(cos, 0) are compared; most seeds give one sign for all.
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "clip", seed=5)


CLIP_PROMPTS = ["a cat", "the dog and the cat", "a photo of a red car", "an oil painting of the sea", "x"]


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_clip_scorer_matches_torch_clip_model(clip_dir, mode):
    import torch
    from transformers import CLIPModel as TorchCLIPModel

    set_mode(mode)
    images = random_images(5, len(CLIP_PROMPTS))
    scorer = CLIPScorer(clip_dir, batch_size=2)   # 5 pairs: the last batch is padded
    image_embeds, text_embeds = scorer.image_embeds(images), scorer.text_embeds(CLIP_PROMPTS)
    scores = scorer(images, CLIP_PROMPTS)

    inputs = scorer.processor(text=CLIP_PROMPTS, images=images, return_tensors="pt", padding="max_length",
                              max_length=CLIP_MAX_LENGTH, truncation=True)
    reference = TorchCLIPModel.from_pretrained(clip_dir).eval()
    with torch.no_grad():
        torch_images = reference.get_image_features(pixel_values=inputs["pixel_values"])
        torch_texts = reference.get_text_features(input_ids=inputs["input_ids"],
                                                  attention_mask=inputs["attention_mask"])
    torch_scores = 100 * torch.nn.functional.cosine_similarity(torch_images, torch_texts).clamp(min=0)
    # fp32 on both sides, the same preprocessed inputs: measured ~5e-7 relative.
    assert relative_max_error(image_embeds, torch_images.numpy()) < 1e-4
    assert relative_max_error(text_embeds, torch_texts.numpy()) < 1e-4
    np.testing.assert_allclose(scores, torch_scores.numpy(), rtol=1e-4, atol=1e-3)
    assert (scores > 0).sum() == 3 and (scores == 0).sum() == 2   # both sides of max(cos, 0)


def rewrite_weights(folder: Path, edit) -> None:
    path = folder / "model.safetensors"
    weights = load_file(str(path))
    edit(weights)
    save_file(weights, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("edit,message", [
    (lambda weights: weights.pop("visual_projection.weight"), "lacks 1 weight.*visual_projection.weight"),
    (lambda weights: weights.update(extra=np.zeros(3, np.float32)), "holds 1 weight.*extra"),
    (lambda weights: weights.update({"text_projection.weight": np.zeros((16, 8), np.float32)}),
     r"text_projection.weight .* has shape \[16, 8\].*expects \[16, 32\]"),
])
def test_clip_weights_are_checked_strictly(clip_dir, tmp_path, edit, message):
    broken = shutil.copytree(clip_dir, tmp_path / "clip")
    rewrite_weights(broken, edit)
    with pytest.raises(CheckpointError, match=message):
        CLIPScorer(broken)


def test_clip_folder_missing_files_are_named(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CLIPScorer(tmp_path / "nowhere")
    broken = shutil.copytree(clip_dir, tmp_path / "clip")
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="lacks preprocessor_config.json"):
        CLIPScorer(broken)


# ----- tests: Inception features and FID -----

def write_random_inception(path: Path, seed: int = 0) -> Path:
    """mindcv's inception_v3 with He-initialised convolutions (activations stay O(1) through the ReLUs,
    so features of different images differ clearly), saved as mindcv checkpoints are."""
    from mindcv.models import inception_v3

    network = inception_v3(pretrained=False)
    rng = np.random.default_rng(seed)
    for param in network.get_parameters():
        if param.ndim == 4:
            fan_in = int(np.prod(param.shape[1:]))
            param.set_data(ms.Tensor((rng.standard_normal(param.shape) * np.sqrt(2 / fan_in)).astype(np.float32)))
    ms.save_checkpoint(network, str(path))
    return path


@pytest.fixture(scope="module")
def inception_ckpt(tmp_path_factory) -> Path:
    return write_random_inception(tmp_path_factory.mktemp("inception") / "inception_v3.ckpt")


def smooth_images(seed: int, count: int, size: int = 64) -> list:
    """Colour gradients: a different image distribution from `random_images`' uniform noise."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(count):
        colour = rng.uniform(40, 255, 3)
        shade = 0.5 + 0.5 * np.sin(6 * cols + rng.uniform(0, 6)) * np.cos(4 * rows)
        images.append(Image.fromarray((colour * shade[..., None]).astype(np.uint8)))
    return images


def test_inception_preprocessing_follows_mindcv():
    pixels = inception_pixels(Image.new("RGB", (64, 32), (10, 128, 250)))
    assert pixels.shape == (3, 299, 299) and pixels.dtype == np.float32
    # mindcv's ImageNet normalization, in the 0-255 scale.
    expected = (np.array([10, 128, 250]) - np.array([0.485, 0.456, 0.406]) * 255) / (np.array([0.229, 0.224, 0.225])
                                                                                     * 255)
    np.testing.assert_allclose(pixels[:, 150, 150], expected, rtol=1e-6)
    assert np.ptp(pixels, axis=(1, 2)).max() == 0


def test_inception_features_and_fid(inception_ckpt):
    noise, noise_other, smooth = random_images(6, 3, (64, 64)), random_images(7, 3, (64, 64)), smooth_images(8, 3)
    extractor = InceptionFeatureExtractor(inception_ckpt, batch_size=2)   # 3 images: the last batch is padded
    features = extractor(noise)
    assert features.shape == (3, 2048) and np.isfinite(features).all()
    batched_once = InceptionFeatureExtractor(inception_ckpt, batch_size=3)(noise)
    assert relative_max_error(batched_once, features) < 1e-5
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert relative_max_error(InceptionFeatureExtractor(inception_ckpt, batch_size=3)(noise), features) < 1e-4
    ms.set_context(mode=ms.GRAPH_MODE)

    # The same images through the batch-of-3 graph: each extraction costs ~10 s per image on this CPU
    # (MindSpore's CPU Conv2D runs a 3x3 convolution ~280x slower than torch), so none is repeated.
    to_itself = image_metrics.fid_from_features(features, batched_once)
    to_same_kind = image_metrics.fid_from_features(features, extractor(noise_other))
    to_other_kind = image_metrics.fid_from_features(features, extractor(smooth))
    assert to_other_kind > 10 * to_same_kind > 0
    assert abs(to_itself) < 1e-6 * to_other_kind


def rewrite_checkpoint(source: Path, target: Path, edit) -> Path:
    params = ms.load_checkpoint(str(source))
    edit(params)
    ms.save_checkpoint([{"name": name, "data": param} for name, param in params.items()], str(target))
    return target


@pytest.mark.parametrize("edit,message", [
    (lambda params: params.pop("conv1a.conv.weight"), "lacks 1 parameter.*conv1a.conv.weight"),
    (lambda params: params.update({"moments.conv1a.conv.weight": ms.Parameter(ms.Tensor(np.zeros(2, np.float32)))}),
     "holds 1 entries the network does not have: moments.conv1a.conv.weight.*without optimizer state"),
    (lambda params: params.update({"classifier.bias": ms.Parameter(ms.Tensor(np.zeros(1001, np.float32)))}),
     r"classifier.bias has shape \[1001\], the network expects \[1000\]"),
])
def test_inception_checkpoint_is_loaded_strictly(inception_ckpt, tmp_path, edit, message):
    broken = rewrite_checkpoint(inception_ckpt, tmp_path / "broken.ckpt", edit)
    with pytest.raises(CheckpointError, match=message):
        InceptionFeatureExtractor(broken)


def test_inception_weights_that_are_missing_or_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        InceptionFeatureExtractor(tmp_path / "missing.ckpt")
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="is not a MindSpore checkpoint"):
        InceptionFeatureExtractor(tmp_path / "text.ckpt")


# ----- tests: the data -----

def test_cache_settings_convert_to_pipeline_configs():
    assert CACHE_SETTINGS["baseline"].fbcache_config() is None
    assert CACHE_SETTINGS["fbcache_0.12_taylor2"].fbcache_config() == FBCacheConfig(
        residual_diff_threshold=0.12, taylorseer_derivative=2)
    assert CACHE_SETTINGS["f2b1_0.12"].fbcache_config() == FBCacheConfig(
        residual_diff_threshold=0.12, fn_compute_blocks=2, bn_compute_blocks=1)
    assert {"baseline", "fbcache_0.08", "fbcache_0.2", "fbcache_0.08_taylor2", "fbcache_0.2_taylor2"} <= set(
        CACHE_SETTINGS)
    assert all(name == setting.name for name, setting in CACHE_SETTINGS.items())
    assert fbcache_setting(0.08) == CACHE_SETTINGS["fbcache_0.08"]


def test_prompt_sets_are_distinct_prompts():
    assert len(PROMPT_SETS["smoke"]) == 4 and len(PROMPT_SETS["drawbench"]) == 32
    for prompts in PROMPT_SETS.values():
        assert len(set(prompts)) == len(prompts) and all(prompt.strip() for prompt in prompts)
    assert all(height % 16 == 0 and width % 16 == 0 for height, width in RESOLUTIONS)


# ----- tests: generate_clip_score_datas.py and flux_accuracy_test.py end to end -----

TESTS_DIR = Path(__file__).resolve().parent
GENERATE = TESTS_DIR / "generate_clip_score_datas.py"
SCORE = TESTS_DIR / "flux_accuracy_test.py"
# 2 steps, the second cached: a random-weight model's first-block diffs are ~0.6-0.9 (docs/benchmarks.md), below 1.5.
CACHED = "fbcache_1.5"
SMALL_JOB_ARGS = ["--prompt_set", "smoke", "--settings", "baseline", "--thresholds", "1.5", "--image_size", "64x64",
                  "--num_inference_steps", "2", "--max_sequence_length", "16"]   # all 4 prompts unless --num_prompts
GENERATE_ARGS = ["--num_prompts", "2", *SMALL_JOB_ARGS]


def run_script(script: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=TESTS_DIR.parent)


def test_prompts_are_sharded_across_ranks(monkeypatch):
    import generate_clip_score_datas as generate

    shards = [generate.shard(range(7), rank, 3) for rank in range(3)]
    assert shards == [[0, 3, 6], [1, 4], [2, 5]]
    monkeypatch.delenv("MS_ROLE", raising=False)
    assert generate.distributed_rank("CPU") == (0, 1)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """Images of the demo pipeline for the baseline and a setting that caches, generated in-process."""
    import generate_clip_score_datas as generate

    root = tmp_path_factory.mktemp("accuracy")
    checkpoint = write_pipeline_checkpoint(root / "flux", "demo", seed=0)
    out = root / "images"
    generate.main(["--ckpt", str(checkpoint), "--out", str(out), *GENERATE_ARGS])
    return checkpoint, out


def test_generation_layout_manifest_and_resume(generated, capsys):
    import generate_clip_score_datas as generate

    checkpoint, out = generated
    names = ["00000.png", "00001.png"]
    for setting in ("baseline", CACHED):
        assert sorted(path.name for path in (out / setting / "64x64").iterdir()) == names + [generate.GENERATION_LOG]
    log = [json.loads(line) for line in (out / CACHED / "64x64" / generate.GENERATION_LOG).read_text().splitlines()]
    assert [record["image"] for record in log] == names and all(record["seconds"] > 0 for record in log)
    assert all(record["steps_cached"] == {"cond": 1} for record in log)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["prompts"] == list(PROMPT_SETS["smoke"][:2]) and manifest["seeds"] == [DEFAULT_SEED,
                                                                                           DEFAULT_SEED + 1]
    assert manifest["settings"][CACHED]["residual_diff_threshold"] == 1.5 and manifest["resolutions"] == ["64x64"]
    pixels = {setting: [np.asarray(Image.open(out / setting / "64x64" / name)) for name in names]
              for setting in ("baseline", CACHED)}
    assert pixels["baseline"][0].shape == (64, 64, 3)
    assert not np.array_equal(pixels["baseline"][0], pixels["baseline"][1])   # other prompt and seed
    assert not np.array_equal(pixels["baseline"][0], pixels[CACHED][0])       # the cached step changed it

    kept = out / "baseline" / "64x64" / "00000.png"
    kept_mtime = kept.stat().st_mtime_ns
    (out / CACHED / "64x64" / "00001.png").unlink()
    capsys.readouterr()
    generate.main(["--ckpt", str(checkpoint), "--out", str(out), *GENERATE_ARGS])
    printed = capsys.readouterr().out
    assert "4 images" in printed and "3 already exist, skipped" in printed
    assert f"[1/1] {CACHED} 64x64 00001.png" in printed and "1/2 steps cached" in printed
    assert kept.stat().st_mtime_ns == kept_mtime
    regenerated = np.asarray(Image.open(out / CACHED / "64x64" / "00001.png"))
    assert np.array_equal(regenerated, pixels[CACHED][1])   # fixed per-prompt seeds: the same image again
    assert not list(out.rglob("*.partial"))


def test_generation_refuses_to_mix_runs(generated):
    import generate_clip_score_datas as generate

    checkpoint, out = generated
    with pytest.raises(ValueError, match="another generation"):
        generate.main(["--ckpt", str(checkpoint), "--out", str(out), *GENERATE_ARGS, "--guidance_scale", "5"])


@pytest.mark.parametrize("args,message", [
    (["--settings", "fbcache_9"], "unknown cache setting(s) fbcache_9"),
    (["--image_size", "100x64"], "positive multiples of 16"),
    (["--image_size", "64"], "must be HxW"),
    (["--taylor_orders", "5", "--thresholds", "0.1"], "--taylor_orders must lie in"),
    (["--thresholds", "0"], "--thresholds must be > 0"),
    (["--num_prompts", "5"], "--num_prompts must lie in [1, 4]"),
    (["--max_sequence_length", "513"], "--max_sequence_length must lie in [1, 512]"),
    (["--ckpt", "/nonexistent/flux"], "is not a folder"),
])
def test_generation_argument_errors(capsys, tmp_path, args, message):
    import generate_clip_score_datas as generate

    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--out", str(tmp_path / "out"), "--prompt_set", "smoke", *args])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generation_cli_exits_nonzero_before_any_work(tmp_path):
    result = run_script(GENERATE, "--out", tmp_path / "out", "--settings", "baseline", "nocache")
    assert result.returncode == 2 and "unknown cache setting(s) nocache" in result.stderr
    assert not (tmp_path / "out").exists()


def test_scoring_end_to_end(generated, inception_ckpt, clip_dir, tmp_path):
    import flux_accuracy_test as score

    _, out = generated
    report_path = tmp_path / "scores.json"
    score.main(["--images_dir", str(out), "--inception_weights", str(inception_ckpt), "--clip_model",
                str(clip_dir), "--json", str(report_path)])
    report = json.loads(report_path.read_text())
    rows = {row["setting"]: row for row in report["rows"]}
    assert [row["setting"] for row in report["rows"]] == ["baseline", CACHED]
    baseline, cached = rows["baseline"], rows[CACHED]
    assert baseline["images"] == cached["images"] == 2 and baseline["resolution"] == "64x64"
    assert baseline["psnr"] is None and baseline["ssim"] is None and baseline["fid"] is None
    assert 0 <= baseline["clip_score"] <= 100 and 0 <= cached["clip_score"] <= 100

    pairs = [(np.asarray(Image.open(out / "baseline" / "64x64" / name), np.float64) / 255,
              np.asarray(Image.open(out / CACHED / "64x64" / name), np.float64) / 255)
             for name in ("00000.png", "00001.png")]
    expected_psnr = np.mean([10 * np.log10(1 / np.mean((a - b) ** 2)) for a, b in pairs])
    assert cached["psnr"] == pytest.approx(expected_psnr, rel=1e-9)
    assert cached["ssim"] == pytest.approx(np.mean([image_metrics.ssim(a, b) for a, b in pairs]), rel=1e-12)
    assert cached["ssim"] < 1 and cached["fid"] > 0
    assert any("not with published pytorch-fid" in note for note in report["notes"])
    assert report["settings"][CACHED]["residual_diff_threshold"] == 1.5

    # Real images for FID: here the baseline's own images, so the baseline scores ~0 and the cached
    # setting scores what it scored against the baseline.
    reference = shutil.copytree(out / "baseline" / "64x64", tmp_path / "reference")
    rows = score.main(["--images_dir", str(out), "--inception_weights", str(inception_ckpt), "--reference_dir",
                       str(reference)])
    assert abs(rows[0].fid) < 1e-6 * cached["fid"]
    assert rows[1].fid == pytest.approx(cached["fid"], rel=1e-6)


def test_scoring_without_weights_reports_psnr_ssim_only(generated, capsys):
    import flux_accuracy_test as score

    _, out = generated
    rows = score.main(["--images_dir", str(out)])
    printed = capsys.readouterr().out
    assert "CLIP score skipped" in printed and "FID skipped" in printed
    assert f"| {CACHED} | 64x64 | 2 | - | - |" in printed
    assert rows[1].psnr > 0 and rows[1].clip_score is None and rows[1].fid is None


def test_scoring_input_errors(generated, tmp_path):
    import flux_accuracy_test as score

    _, out = generated
    with pytest.raises(FileNotFoundError, match="does not exist"):
        score.main(["--images_dir", str(tmp_path / "missing")])
    with pytest.raises(FileNotFoundError, match="has no 'nocache/' folder"):
        score.main(["--images_dir", str(out), "--baseline", "nocache"])
    with pytest.raises(FileNotFoundError, match="--inception_weights .* does not exist"):
        score.main(["--images_dir", str(out), "--inception_weights", str(tmp_path / "inception.ckpt")])
    with pytest.raises(FileNotFoundError, match="CLIP model folder .* does not exist"):
        score.main(["--images_dir", str(out), "--clip_model", str(tmp_path / "clip")])
    with pytest.raises(SystemExit):
        score.parse_args(["--images_dir", str(out), "--reference_dir", str(tmp_path)])


def test_scoring_cli_refuses_a_setting_with_missing_images(generated, tmp_path):
    _, out = generated
    incomplete = shutil.copytree(out, tmp_path / "images")
    (incomplete / CACHED / "64x64" / "00001.png").unlink()
    result = run_script(SCORE, "--images_dir", incomplete)
    assert result.returncode == 1 and "does not match the baseline's images: missing ['00001.png']" in result.stderr
