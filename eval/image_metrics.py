"""Image-quality metrics for comparing cached and uncached generations: PSNR, SSIM, FID, CLIP score.

Pure numpy + scipy, no MindSpore, so the numbers can be checked against independent computations
and reused on any machine. The feature extractors that feed FID and CLIP score live in
eval/feature_extractors.py.
"""

from typing import Tuple

import numpy as np
from scipy import linalg

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# pytorch-fid's tolerances, kept so that our Frechet distances behave like the published implementation's.
FID_EPS = 1e-6
FID_MAX_IMAGINARY = 1e-3


def _pair(a: np.ndarray, b: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Two same-shaped images as float64: metrics on uint8 would overflow and round."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images must have the same shape, got {a.shape} and {b.shape}")
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE); inf for identical images.

    `data_range` is the span of the pixel values (1.0 for floats in [0, 1], 255 for uint8 values)."""
    a, b = _pair(a, b)
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return float("inf")
    return float(10 * np.log10(data_range ** 2 / mse))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalized 1-D Gaussian whose outer product is SSIM's 2-D window (MATLAB fspecial('gaussian'))."""
    offsets = np.arange(size) - (size - 1) / 2
    window = np.exp(-offsets ** 2 / (2 * sigma ** 2))
    return window / window.sum()


def _filter_valid(image: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Separable 2-D filtering of an (H, W) image keeping only windows fully inside it ('valid')."""
    rows = np.lib.stride_tricks.sliding_window_view(image, len(window), axis=0) @ window
    return np.lib.stride_tricks.sliding_window_view(rows, len(window), axis=1) @ window


def _ssim_channel(a: np.ndarray, b: np.ndarray, c1: float, c2: float, window: np.ndarray) -> float:
    mu_a, mu_b = _filter_valid(a, window), _filter_valid(b, window)
    var_a = _filter_valid(a * a, window) - mu_a ** 2
    var_b = _filter_valid(b * b, window) - mu_b ** 2
    cov = _filter_valid(a * b, window) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(ssim_map.mean())


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Structural similarity (Wang, Bovik, Sheikh, Simoncelli 2004); 1.0 for identical images.

    As the paper's reference code: an 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, the
    SSIM map over every window position fully inside the image ('valid' filtering, no padding: border
    pixels are covered only by the windows that contain them), averaged. Images are (H, W) or
    (H, W, C); a colour image's SSIM is the mean of its channels' SSIMs (no RGB -> luma conversion).
    """
    a, b = _pair(a, b)
    if a.ndim not in (2, 3):
        raise ValueError(f"images must be (H, W) or (H, W, C), got shape {a.shape}")
    if min(a.shape[:2]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels, got {a.shape[:2]}")
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    window = gaussian_window()
    return float(np.mean([_ssim_channel(a[..., c], b[..., c], c1, c2, window) for c in range(a.shape[2])]))


def gaussian_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) of a feature set: the Gaussian that FID compares."""
    features = np.asarray(features, np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (n >= 2 samples, dims) to have a covariance, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)).

    As pytorch-fid: when the square root is not finite (singular product, e.g. fewer samples than
    feature dimensions) it is retaken with eps * I added to both covariances; the square root of a
    product of covariances is real in exact arithmetic, so an imaginary part is rounding and is dropped
    when small, and raises when large (the statistics are not valid covariances).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: means {mu1.shape} and {mu2.shape}, covariances "
                         f"{sigma1.shape} and {sigma2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest = np.max(np.abs(np.diagonal(covmean).imag))
        if largest > FID_MAX_IMAGINARY:
            raise ValueError(f"sqrt(sigma1 sigma2) has an imaginary component of {largest:.3g} on its diagonal: "
                             "the covariances are not positive semi-definite")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """FID between two feature sets (rows are samples, e.g. Inception pool features of two image folders).

    With more samples than dimensions this is `frechet_distance` of their statistics. With fewer (a few
    hundred images against 2048-d features) the covariances are singular, and sqrtm of their product is
    slow (about a minute at 2048-d on a 2-core CPU) and inaccurate. The trace term is then computed
    exactly from the centred samples X1, X2 instead: S_i = X_i^T X_i / (n_i - 1), the non-zero eigenvalues
    of S1 S2 are those of M M^T with M = X1 X2^T / sqrt((n1 - 1)(n2 - 1)), so tr sqrt(S1 S2) = ||M||_*.
    """
    mu1, sigma1 = gaussian_statistics(features1)
    mu2, sigma2 = gaussian_statistics(features2)
    (samples1, dims), samples2 = np.shape(features1), len(features2)
    if min(samples1, samples2) > dims:
        return frechet_distance(mu1, sigma1, mu2, sigma2)
    if np.shape(features2)[1] != dims:
        raise ValueError(f"feature sets differ in dimension: {dims} and {np.shape(features2)[1]}")
    centred1 = np.asarray(features1, np.float64) - mu1
    centred2 = np.asarray(features2, np.float64) - mu2
    cross = centred1 @ centred2.T / np.sqrt((samples1 - 1) * (samples2 - 1))
    trace_sqrt = np.linalg.svd(cross, compute_uv=False).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def clip_score(image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
    """CLIP score of each (image, text) pair: 100 * max(cos(image, text), 0) (Hessel et al. 2021, w = 100,
    as torchmetrics). Embeddings are (n, dims) and need not be normalized; negative similarity scores 0."""
    image_embeds, text_embeds = np.asarray(image_embeds, np.float64), np.asarray(text_embeds, np.float64)
    if image_embeds.shape != text_embeds.shape or image_embeds.ndim != 2:
        raise ValueError(f"image and text embeddings must both be (n, dims), got {image_embeds.shape} and "
                         f"{text_embeds.shape}")
    norms = np.linalg.norm(image_embeds, axis=1) * np.linalg.norm(text_embeds, axis=1)
    if np.any(norms == 0):
        raise ValueError("an embedding is the zero vector: its cosine similarity is undefined")
    cosine = np.sum(image_embeds * text_embeds, axis=1) / norms
    return 100 * np.maximum(cosine, 0)
