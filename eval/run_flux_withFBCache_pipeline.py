"""Generate images with Flux.1 and the First-Block Cache (+ TaylorSeer) in MindSpore.

Without --ckpt it runs the shipped small Flux trained on the emoji world (assets/flux-emoji: FLUX's
architecture and folder layout, 128x128 scenes of 32 emoji on coloured backgrounds, captions such as
"a small fox at the top right, on a yellow background"). It is not FLUX.1; give --ckpt
/path/to/FLUX.1-dev for FLUX images. --demo_config demo|mid picks a random-weight checkpoint instead.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mindspore as ms  # noqa: E402

from models.embedded import EMBEDDED, TRAINED, embedded_checkpoint, generation_defaults  # noqa: E402
from models.loading import CheckpointError  # noqa: E402
from pipeline_flux import DTYPES, FBCacheConfig, FluxPipeline  # noqa: E402
from utils import MAX_TAYLOR_ORDER, format_summary  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="diffusers-format FLUX folder; default: the shipped emoji-world Flux")
    parser.add_argument("--demo_config", choices=EMBEDDED, default=TRAINED,
                        help="embedded checkpoint without --ckpt: the trained 'emoji' model (default), or the "
                             "random-weight 'demo' / larger 'mid'")
    parser.add_argument("--prompt", nargs="+", help="one or more prompts (default: one the checkpoint can draw)")
    parser.add_argument("--negative_prompt", nargs="+",
                        help="negative prompt(s), one or one per prompt; used with --true_cfg_scale > 1 "
                             "(default \"\" when --true_cfg_scale > 1)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"),
                        help="multiples of 16 (default 1024 1024 with --ckpt; 128 128 emoji, 256 256 demo/mid)")
    parser.add_argument("--save_path", type=Path, default=REPO_ROOT / "outputs", help="folder for the PNGs")
    parser.add_argument("--residual_diff_threshold", type=float, default=0.08,
                        help="cache a step when the first-block residual changed less than this; <= 0 never caches. "
                             "Measured on the shipped model (28 steps, README 'Our cache against every peer'): "
                             "0.04 with --taylorseer_derivative 1 --verify_forecast --sync_cfg_branches saves 1.56x "
                             "of the block compute at 51 dB PSNR; 0.08 plain saves 1.55x at 45 dB; 0.12 with "
                             "--skip_probe_steps 2 --warmup_steps 3 --sync_cfg_branches saves 2.75x at 38 dB")
    parser.add_argument("--taylorseer_derivative", type=int, default=0,
                        help=f"forecast order 0-{MAX_TAYLOR_ORDER} of the cached residual (0 = plain reuse)")
    parser.add_argument("--forecast_space", choices=("step", "sigma"), default="step",
                        help="variable of the forecast polynomial: step index, or the scheduler's sigma (ODE time)")
    parser.add_argument("--verify_forecast", action="store_true",
                        help="gate on the probe residual's own forecast error instead of its raw change")
    parser.add_argument("--skip_probe_steps", type=int, default=0,
                        help="after a cache hit, up to this many steps run no block at all (the first-block "
                             "residual is forecast too); needs --bn_compute_blocks 0")
    parser.add_argument("--sync_cfg_branches", action="store_true",
                        help="with true CFG, the uncond branch caches exactly when the cond branch does")
    parser.add_argument("--warmup_steps", type=int, default=0, help="first steps always computed")
    parser.add_argument("--max_cached_steps", type=int, default=-1, help="-1 = no limit")
    parser.add_argument("--max_continuous_cached_steps", type=int, default=-1, help="-1 = no limit")
    parser.add_argument("--fn_compute_blocks", type=int, default=1, help="blocks always computed first")
    parser.add_argument("--bn_compute_blocks", type=int, default=0, help="blocks always computed last")
    parser.add_argument("--no_cache", action="store_true", help="run only the uncached transformer")
    parser.add_argument("--compare_baseline", action="store_true",
                        help="also run the uncached baseline in this process and print both times")
    parser.add_argument("--use_graph_mode", action=argparse.BooleanOptionalAction, default=True,
                        help="MindSpore GRAPH mode (default) or PyNative (--no-use_graph_mode)")
    parser.add_argument("--num_inference_steps", type=int, help="default 28 (8 for the random demo/mid)")
    parser.add_argument("--guidance_scale", type=float, default=3.5, help="distilled guidance (FLUX.1-dev)")
    parser.add_argument("--true_cfg_scale", type=float,
                        help="> 1 with a negative prompt: true CFG (default 4 on the trained emoji model, else 1)")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int,
                        help="T5 tokens (default: the T5 tokenizer's model_max_length, at most 512; 32 on emoji)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--device_target", choices=["CPU", "GPU", "Ascend"], default="CPU")
    parser.add_argument("--mindone_models", action="store_true",
                        help="mindone's FluxTransformer2DModel and AutoencoderKL (Ascend) instead of the portable "
                             "models")
    args = parser.parse_args(argv)

    defaults = generation_defaults(bool(args.ckpt), args.demo_config)
    args.image_size = tuple(args.image_size or defaults["image_size"])
    for name in ("prompt", "num_inference_steps", "true_cfg_scale"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.negative_prompt is None and args.true_cfg_scale > 1:
        args.negative_prompt = [""]
    if any(side <= 0 or side % 16 for side in args.image_size):
        parser.error(f"--image_size must be positive multiples of 16 (8x VAE downsampling, 2x2 packing), "
                     f"got {args.image_size[0]} {args.image_size[1]}")
    if args.dtype == "bfloat16" and args.device_target == "CPU":
        parser.error("--dtype bfloat16 needs bf16 matmul, which MindSpore's CPU backend lacks: use float32 or "
                     "float16 on CPU (bfloat16 on Ascend)")
    if args.mindone_models and args.device_target == "CPU":
        parser.error("--mindone_models: mindone's Flux transformer and VAE need kernels MindSpore's CPU backend "
                     "lacks; use them with --device_target Ascend, or drop the flag for the portable models")
    if args.negative_prompt and len(args.negative_prompt) not in (1, len(args.prompt)):
        parser.error(f"--negative_prompt has {len(args.negative_prompt)} entries for {len(args.prompt)} prompts: "
                     "give one, or one per prompt")
    if not 0 <= args.taylorseer_derivative <= MAX_TAYLOR_ORDER:
        parser.error(f"--taylorseer_derivative must lie in [0, {MAX_TAYLOR_ORDER}], got {args.taylorseer_derivative}")
    if args.num_inference_steps < 1:
        parser.error(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    if args.skip_probe_steps < 0 or (args.skip_probe_steps and args.bn_compute_blocks):
        parser.error(f"--skip_probe_steps must be >= 0, and 0 with --bn_compute_blocks > 0 (a step without the "
                     f"first blocks has no text stream for the last ones), got {args.skip_probe_steps}")
    if args.no_cache and args.compare_baseline:
        parser.error("--no_cache and --compare_baseline exclude each other")
    return args


def check_writable(folder: Path) -> None:
    """Fail before hours of generation, not after, if the PNGs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SystemExit(f"error: cannot write to --save_path {folder}: {error}")


def cache_config(args: argparse.Namespace) -> FBCacheConfig:
    return FBCacheConfig(
        residual_diff_threshold=args.residual_diff_threshold, taylorseer_derivative=args.taylorseer_derivative,
        warmup_steps=args.warmup_steps, max_cached_steps=args.max_cached_steps,
        max_continuous_cached_steps=args.max_continuous_cached_steps, fn_compute_blocks=args.fn_compute_blocks,
        bn_compute_blocks=args.bn_compute_blocks, forecast_space=args.forecast_space,
        verify_forecast=args.verify_forecast, skip_probe_steps=args.skip_probe_steps,
        sync_cfg_branches=args.sync_cfg_branches)


def generate(pipeline: FluxPipeline, args: argparse.Namespace, cache, label: str, steps: int):
    print(f"\n[{label}] {steps} steps at {args.image_size[0]}x{args.image_size[1]}", flush=True)
    last = [time.perf_counter()]

    def progress(step: int, total: int, cached: dict) -> None:
        now = time.perf_counter()
        decisions = ", ".join(f"{name} {'cached' if hit else 'computed'}" for name, hit in cached.items())
        print(f"  step {step + 1}/{total}  {now - last[0]:.2f} s  {decisions}", flush=True)
        last[0] = now

    started = time.perf_counter()
    output = pipeline(
        args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
        height=args.image_size[0], width=args.image_size[1], num_inference_steps=steps,
        guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images_per_prompt, seed=args.seed,
        max_sequence_length=args.max_sequence_length, cache=cache, callback=progress)
    elapsed = time.perf_counter() - started
    print(f"[{label}] total {elapsed:.2f} s", flush=True)
    return output, elapsed


def save_images(images, folder: Path, label: str) -> list:
    """Each PNG is written under a temporary name and renamed, so no partial file is ever left."""
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{label}_{index}.png"
        partial = path.with_name(path.name + ".partial")
        image.save(partial, format="PNG")
        os.replace(partial, path)
        paths.append(path)
    return paths


def main(argv=None) -> None:
    args = parse_args(argv)
    check_writable(args.save_path)
    ms.set_context(mode=ms.GRAPH_MODE if args.use_graph_mode else ms.PYNATIVE_MODE, device_target=args.device_target)
    folder = args.ckpt or embedded_checkpoint(args.demo_config)
    if not args.ckpt and args.demo_config == TRAINED:
        print(f"Using the shipped emoji-world Flux {folder} (trained here; not FLUX.1, give --ckpt for FLUX).",
              flush=True)
    elif not args.ckpt:
        print(f"Using the embedded demo checkpoint {folder}: RANDOM weights, not FLUX.1 (give --ckpt for real "
              "images).", flush=True)
    pipeline = FluxPipeline.from_pretrained(str(folder), mindspore_dtype=DTYPES[args.dtype],
                                            use_mindone_models=args.mindone_models)

    runs = []
    if args.compare_baseline or args.no_cache:
        runs.append(("baseline", None))
    if not args.no_cache:
        runs.append(("fbcache", cache_config(args)))
    if args.compare_baseline:
        # One-step runs compile every graph first, so the timed runs compare steps, not compilations.
        for label, cache in runs:
            generate(pipeline, args, cache, f"{label} warm-up (compiles)", steps=1)
    times = {}
    for label, cache in runs:
        output, times[label] = generate(pipeline, args, cache, label, args.num_inference_steps)
        for branch, summary in output.cache_summaries.items():
            print(f"\nFBCache summary ({branch} branch):\n{format_summary(summary)}")
        for path in save_images(output.images, args.save_path, label):
            print(f"wrote {path}")
    if len(times) == 2:
        print(f"\nbaseline {times['baseline']:.2f} s, fbcache {times['fbcache']:.2f} s, speedup "
              f"{times['baseline'] / times['fbcache']:.2f}x (graphs compiled beforehand)")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
