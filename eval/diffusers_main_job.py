"""The main job (eval/run_flux_withFBCache_pipeline.py with no arguments) done the way a user of torch
diffusers would do it: the reference that eval/bench_time_to_image.py times ours against.

    python eval/diffusers_main_job.py [--fbcache 0.08] [--save_path outputs]

Same shipped model (assets/flux-emoji, loaded by `diffusers.FluxPipeline.from_pretrained` in float32),
same default prompt, 128x128, 28 steps, true CFG 4 against "", the same T5 length as our pipeline
(the T5 tokenizer's model_max_length, at most 512: 32 here) and the same initial noise as ours for the
seed (numpy `default_rng(seed)` noise of shape (1, C, H/8, W/8), packed 2x2 into tokens as
pipeline_flux.pack_latents does; re-implemented here because pipeline_flux imports MindSpore).
`--fbcache T` applies diffusers' First Block Cache (`diffusers.hooks.apply_first_block_cache`) with
threshold T. torch keeps its default thread count (what a user gets).

Writes `diffusers_<seed>.png` (`diffusers_fbcache_<seed>.png` with --fbcache) into --save_path,
replacing one of that name, and prints one JSON line: its phase times (import, load, encode, denoise,
decode, save), torch's thread count and, with --fbcache, the steps the cache skipped per CFG branch.
diffusers' hooks do not report those; they are counted here by a forward hook on the last transformer
block's output projection, which runs only when a call computes the blocks.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from models.embedded import SHIPPED_PIPELINE, generation_defaults  # noqa: E402 (imports no MindSpore)

# No model hub: everything loads from the shipped folder. Set before huggingface_hub is imported.
os.environ["HF_HUB_OFFLINE"] = "1"

DEFAULTS = generation_defaults(ckpt_given=False)
# T5 tokens FLUX.1 reads at most (pipeline_flux.MAX_SEQUENCE_LENGTH; a test keeps them equal).
MAX_SEQUENCE_LENGTH = 512


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fbcache", type=float, metavar="THRESHOLD",
                        help="apply diffusers' First Block Cache with this threshold (default: no cache)")
    parser.add_argument("--prompt", default=DEFAULTS["prompt"][0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save_path", type=Path, default=REPO_ROOT / "outputs", help="folder for the PNG")
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.fbcache is not None and not (math.isfinite(args.fbcache) and args.fbcache > 0):
        parser.error(f"--fbcache must be a finite threshold > 0, got {args.fbcache}")
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    return args


def generation_settings() -> dict:
    """What the job generates besides prompt and seed: our CLI's defaults for the shipped model."""
    height, width = DEFAULTS["image_size"]
    return dict(height=height, width=width, num_inference_steps=DEFAULTS["num_inference_steps"],
                true_cfg_scale=DEFAULTS["true_cfg_scale"], negative_prompt="")


def sequence_length(tokenizer_2) -> int:
    """T5 tokens per prompt, chosen as our pipeline does (FluxPipeline.default_sequence_length): the T5
    tokenizer's model_max_length, at most 512. diffusers' own default is 512 whatever the tokenizer says."""
    return min(tokenizer_2.model_max_length, MAX_SEQUENCE_LENGTH)


def pack_latents(latents):
    """(B, C, H, W) -> (B, H/2 * W/2, 4C), as pipeline_flux.pack_latents and diffusers' _pack_latents."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def initial_noise(seed: int, channels: int, latent_height: int, latent_width: int):
    """Our pipeline's packed initial noise for `seed` (FluxPipeline.prepare_latents), as float32 numpy."""
    import numpy as np

    noise = np.random.default_rng(seed).standard_normal((1, channels, latent_height, latent_width))
    return pack_latents(noise.astype(np.float32))


class PhaseTimer:
    """Seconds spent in the pipeline's prompt encoding and VAE decoding, by wrapping the two calls."""

    def __init__(self, pipeline):
        self.seconds = {"encode": 0.0, "decode": 0.0}
        pipeline.encode_prompt = self._wrap("encode", pipeline.encode_prompt)
        pipeline.vae.decode = self._wrap("decode", pipeline.vae.decode)

    def _wrap(self, phase: str, call):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return call(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)


class ComputedStepCounter:
    """Transformer calls, and the calls that ran the blocks, per CFG branch (diffusers' FluxPipeline calls
    the transformer for cond, then uncond, each step). A call computes the blocks exactly when the last
    block's output projection runs; diffusers' First Block Cache skips it on a cache hit."""

    def __init__(self, transformer, branches=("cond", "uncond")):
        self.branches = branches
        self.calls, self.computed = [], []
        transformer.register_forward_pre_hook(self._called)
        transformer.single_transformer_blocks[-1].proj_out.register_forward_hook(self._computed)

    def _called(self, module, args) -> None:
        self.calls.append(self.branches[len(self.calls) % len(self.branches)])

    def _computed(self, module, args, output) -> None:
        self.computed.append(self.calls[-1])

    def reset(self) -> None:
        self.calls, self.computed = [], []

    def summary(self) -> dict:
        return {branch: dict(steps=self.calls.count(branch), computed=self.computed.count(branch),
                             cached=self.calls.count(branch) - self.computed.count(branch))
                for branch in self.branches if branch in self.calls}


def load_pipeline(folder: Path = SHIPPED_PIPELINE):
    """diffusers' FluxPipeline on `folder` in float32, without progress bars."""
    import torch
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def generate(pipeline, prompt: str, seed: int):
    """One image (PIL) of the main job's settings with our noise for `seed`."""
    import torch

    settings = generation_settings()
    latent_height = 2 * (settings["height"] // (pipeline.vae_scale_factor * 2))
    latent_width = 2 * (settings["width"] // (pipeline.vae_scale_factor * 2))
    latents = initial_noise(seed, pipeline.transformer.config.in_channels // 4, latent_height, latent_width)
    with torch.no_grad():
        return pipeline(prompt, latents=torch.from_numpy(latents),
                        max_sequence_length=sequence_length(pipeline.tokenizer_2), **settings).images[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    args.save_path.mkdir(parents=True, exist_ok=True)
    import torch
    import diffusers  # noqa: F401 (its import is part of what a user waits for)
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    times = {"import": time.perf_counter() - STARTED}
    started = time.perf_counter()
    pipeline = load_pipeline()
    counter = None
    if args.fbcache is not None:
        apply_first_block_cache(pipeline.transformer, FirstBlockCacheConfig(threshold=args.fbcache))
        counter = ComputedStepCounter(pipeline.transformer)
    phases = PhaseTimer(pipeline)
    times["load"] = time.perf_counter() - started

    started = time.perf_counter()
    image = generate(pipeline, args.prompt, args.seed)
    generate_seconds = time.perf_counter() - started
    times.update(encode=phases.seconds["encode"], decode=phases.seconds["decode"],
                 denoise=generate_seconds - phases.seconds["encode"] - phases.seconds["decode"])

    started = time.perf_counter()
    path = args.save_path / f"diffusers{'_fbcache' if counter else ''}_{args.seed}.png"
    image.save(path)
    times["save"] = time.perf_counter() - started
    times["total"] = time.perf_counter() - STARTED
    report = dict(times_s={name: round(value, 4) for name, value in times.items()},
                  torch_threads=torch.get_num_threads(), torch_version=torch.__version__,
                  diffusers_version=diffusers.__version__, fbcache_threshold=args.fbcache,
                  max_sequence_length=sequence_length(pipeline.tokenizer_2), path=str(path))
    if counter is not None:
        report["fbcache_steps"] = counter.summary()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
