"""Inputs and timing shared by the benchmark scripts."""

import statistics
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import mindspore as ms

from pipeline_flux import latent_image_ids


def flux_inputs(config: dict, image_size: Tuple[int, int], text_tokens: int, batch_size: int,
                seed: int = 0) -> Dict[str, Optional[np.ndarray]]:
    """Random packed latents and text features with Flux's position ids for an image size in pixels
    (8x VAE downsampling, 2x2 packing: one token per 16x16 pixels)."""
    rng = np.random.default_rng(seed)
    rows, cols = image_size[0] // 16, image_size[1] // 16
    inputs = dict(
        hidden_states=rng.standard_normal((batch_size, rows * cols, config["in_channels"])),
        encoder_hidden_states=rng.standard_normal((batch_size, text_tokens, config["joint_attention_dim"])),
        pooled_projections=rng.standard_normal((batch_size, config["pooled_projection_dim"])),
        timestep=np.full(batch_size, 0.5),
        img_ids=latent_image_ids(rows, cols),
        txt_ids=np.zeros((text_tokens, 3)),
        guidance=np.full(batch_size, 3.5) if config.get("guidance_embeds") else None,
    )
    return {name: None if value is None else value.astype(np.float32) for name, value in inputs.items()}


def to_mindspore(inputs: Dict[str, Optional[np.ndarray]]) -> Dict[str, Optional[ms.Tensor]]:
    return {name: None if value is None else ms.Tensor(value) for name, value in inputs.items()}


def timed(call: Callable[[], object]) -> float:
    """Seconds for one call; the call must block until its result is on the host (e.g. `.asnumpy()`)."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def time_calls(call: Callable[[], object], repeats: int, label: str) -> dict:
    """First call (compile + run) and the median of `repeats` further calls, with progress lines."""
    first = timed(call)
    print(f"  {label}: first call (compile + run) {first:.2f} s", flush=True)
    times: List[float] = []
    for index in range(repeats):
        times.append(timed(call))
        print(f"  {label}: call {index + 1}/{repeats} {times[-1]:.3f} s", flush=True)
    return {"first_call_s": first, "median_s": statistics.median(times)}
