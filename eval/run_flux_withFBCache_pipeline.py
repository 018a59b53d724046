"""Generate images with Flux.1 and the First-Block Cache (+ TaylorSeer) in MindSpore.

Without --ckpt it runs the shipped small Flux trained on the emoji world (assets/flux-emoji: FLUX's
architecture and folder layout, 128x128 scenes of 32 emoji on coloured backgrounds, captions such as
"a small fox at the top right, on a yellow background"). It is not FLUX.1; give --ckpt
/path/to/FLUX.1-dev for FLUX images. --demo_config demo|mid picks a random-weight checkpoint instead.

Arguments are checked before MindSpore is imported (--help answers at once; a bad flag fails before
any loading). Existing PNGs are never replaced unless --overwrite is given: a taken name gets a
numbered one (fbcache_0-1.png, ...).
"""

import argparse
import errno
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cache_config import check_block_split  # noqa: E402
from eval.cli_common import (DEVICE_TARGETS, DTYPE_NAMES, MAX_SEQUENCE_LENGTH, SIZE_MULTIPLE,  # noqa: E402
                             add_cache_arguments, cache_config_from_args, check_count, check_dtype_device,
                             check_image_size, check_seed, quiet_imports)
from eval.device_check import check_device_target  # noqa: E402
from models.demo_configs import TRANSFORMER_CONFIGS  # noqa: E402
from models.embedded import EMBEDDED, SHIPPED_PIPELINE, TRAINED, generation_defaults  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="diffusers-format FLUX folder; default: the shipped emoji-world Flux")
    parser.add_argument("--demo_config", choices=EMBEDDED, default=TRAINED,
                        help="embedded checkpoint without --ckpt: the trained 'emoji' model (default), or the "
                             "random-weight 'demo' / larger 'mid'")
    parser.add_argument("--prompt", nargs="+", help="one or more prompts (default: one the checkpoint can draw)")
    parser.add_argument("--negative_prompt", nargs="+",
                        help="negative prompt(s), one or one per prompt; needs --true_cfg_scale > 1 "
                             "(default \"\" when --true_cfg_scale > 1)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"),
                        help="multiples of 16 (default 1024 1024 with --ckpt; 128 128 emoji, 256 256 demo/mid)")
    parser.add_argument("--save_path", type=Path, default=REPO_ROOT / "outputs", help="folder for the PNGs")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing PNGs of the same name (default: write under the next free name)")
    add_cache_arguments(parser)
    parser.add_argument("--no_cache", action="store_true", help="run only the uncached transformer")
    parser.add_argument("--compare_baseline", action="store_true",
                        help="also run the uncached baseline in this process and print both times")
    parser.add_argument("--use_graph_mode", action=argparse.BooleanOptionalAction, default=True,
                        help="MindSpore GRAPH mode (default) or PyNative (--no-use_graph_mode)")
    parser.add_argument("--no_compile_cache", action="store_true",
                        help="compile every graph in this run instead of loading the ones an earlier run stored "
                             "(the cache lives in $FLUX_MS_COMPILE_CACHE, else $XDG_CACHE_HOME/flux-fbcache-ms or "
                             "~/.cache/flux-fbcache-ms; --verbose prints it)")
    parser.add_argument("--compile_all", action="store_true",
                        help="compile the text encoders and the VAE too (default: they run op by op, which is faster "
                             "for the one encode and one decode of a run unless their graphs are in the compile "
                             "cache; --compare_baseline compiles them)")
    parser.add_argument("--separate_cfg_branches", action="store_true",
                        help="with true CFG, run the cond and uncond branches as two transformer calls with a cache "
                             "each (default: one call on both as a batch, one cache decision per step)")
    parser.add_argument("--num_inference_steps", type=int, help="default 28 (8 for the random demo/mid)")
    parser.add_argument("--guidance_scale", type=float,
                        help="distilled guidance of checkpoints with guidance embedding (FLUX.1-dev; default 3.5); "
                             "refused by others (schnell, the shipped emoji model)")
    parser.add_argument("--true_cfg_scale", type=float,
                        help="> 1 with a negative prompt: true CFG (default 4 on the trained emoji model, else 1)")
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--max_sequence_length", type=int,
                        help="T5 tokens (default: the T5 tokenizer's model_max_length, at most 512; 32 on emoji)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--device_target", choices=DEVICE_TARGETS, default="CPU")
    parser.add_argument("--context_parallel", type=int, default=1, metavar="N",
                        help="split each image's tokens over the N workers of an msrun launch (msrun --worker_num N "
                             "--local_worker_num N --join True eval/run_flux_withFBCache_pipeline.py ...); the image "
                             "and text token counts must divide by N; rank 0 writes the PNGs")
    parser.add_argument("--mindone_models", action="store_true",
                        help="mindone's FluxTransformer2DModel and AutoencoderKL (Ascend) instead of the portable "
                             "models")
    parser.add_argument("--verbose", action="store_true",
                        help="show MindSpore's and transformers' log lines and the cache's per-step table")
    return parser


def transformer_config(args: argparse.Namespace) -> dict:
    """The transformer's config, read without MindSpore (empty if the folder has none: loading says why)."""
    if not args.ckpt and args.demo_config != TRAINED:
        return TRANSFORMER_CONFIGS[args.demo_config]
    path = Path(args.ckpt or SHIPPED_PIPELINE) / "transformer" / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def apply_defaults(args: argparse.Namespace) -> None:
    defaults = generation_defaults(bool(args.ckpt), args.demo_config)
    args.image_size = tuple(args.image_size or defaults["image_size"])
    for name in ("prompt", "num_inference_steps", "true_cfg_scale"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.negative_prompt is None and args.true_cfg_scale > 1:
        args.negative_prompt = [""]


def check_generation(parser: argparse.ArgumentParser, args: argparse.Namespace, config: dict) -> None:
    """What the pipeline would refuse after loading, refused here before it."""
    check_image_size(parser, args.image_size)
    check_dtype_device(parser, args.dtype, args.device_target)
    check_seed(parser, args.seed)
    check_count(parser, "--num_inference_steps", args.num_inference_steps)
    check_count(parser, "--num_images_per_prompt", args.num_images_per_prompt)
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        parser.error(f"--max_sequence_length must lie in [1, {MAX_SEQUENCE_LENGTH}], got {args.max_sequence_length}")
    if args.negative_prompt and len(args.negative_prompt) not in (1, len(args.prompt)):
        parser.error(f"--negative_prompt has {len(args.negative_prompt)} entries for {len(args.prompt)} prompts: "
                     "give one, or one per prompt")
    if args.negative_prompt and args.true_cfg_scale <= 1:
        parser.error(f"--negative_prompt is used only with true CFG: add --true_cfg_scale > 1 (it is "
                     f"{args.true_cfg_scale:g}), or drop --negative_prompt")
    for flag in ("guidance_scale", "true_cfg_scale"):
        value = getattr(args, flag)
        if value is not None and not math.isfinite(value):
            parser.error(f"--{flag} must be a finite number, got {value}")
    if args.guidance_scale is not None and config.get("guidance_embeds") is False:
        parser.error("--guidance_scale: this checkpoint has no guidance embedding (FLUX.1-schnell style), so it "
                     "would be ignored; drop it (--true_cfg_scale with a negative prompt guides such models)")


def check_setup(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.mindone_models and args.device_target == "CPU":
        parser.error("--mindone_models: mindone's Flux transformer and VAE need kernels MindSpore's CPU backend "
                     "lacks; use them with --device_target Ascend, or drop the flag for the portable models")
    if args.no_cache and args.compare_baseline:
        parser.error("--no_cache and --compare_baseline exclude each other")
    if args.no_compile_cache and not args.use_graph_mode:
        parser.error("--no_compile_cache: PyNative mode (--no-use_graph_mode) compiles no graphs; drop one of them")


def check_context_parallel(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The split must give every rank an equal share of the image and text tokens."""
    ranks = args.context_parallel
    check_count(parser, "--context_parallel", ranks)
    if ranks == 1:
        return
    if args.mindone_models:
        parser.error("--context_parallel needs the portable models (their attention gathers keys and values "
                     "across ranks); drop --mindone_models")
    image_tokens = (args.image_size[0] // SIZE_MULTIPLE) * (args.image_size[1] // SIZE_MULTIPLE)
    if image_tokens % ranks:
        parser.error(f"--context_parallel {ranks}: --image_size {args.image_size[0]} {args.image_size[1]} gives "
                     f"{image_tokens} image tokens, which {ranks} ranks cannot share equally; choose a size whose "
                     f"token count (H/16 * W/16) divides by {ranks}")
    if args.max_sequence_length is not None and args.max_sequence_length % ranks:
        parser.error(f"--context_parallel {ranks}: --max_sequence_length {args.max_sequence_length} does not divide "
                     f"by {ranks}; choose a multiple of {ranks}")


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check every argument; nothing here imports MindSpore."""
    parser = build_parser()
    args = parser.parse_args(argv)
    apply_defaults(args)
    config = transformer_config(args)
    check_setup(parser, args)
    check_generation(parser, args, config)
    check_context_parallel(parser, args)
    args.cache = cache_config_from_args(parser, args)
    blocks = config.get("num_layers", 0) + config.get("num_single_layers", 0)
    if blocks and not args.no_cache:
        try:
            check_block_split(args.cache.fn_compute_blocks, args.cache.bn_compute_blocks, blocks)
        except ValueError as error:
            parser.error(f"--fn_compute_blocks / --bn_compute_blocks: {error}")
    return args


def check_writable(folder: Path) -> None:
    """Fail before hours of generation, not after, if the PNGs cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise SystemExit(f"error: cannot write to --save_path {folder}: {error}")


def free_names(path: Path):
    """`path`, then `stem-1.png`, `stem-2.png`, ...: the names a PNG may take without replacing one."""
    yield path
    index = 1
    while True:
        yield path.with_name(f"{path.stem}-{index}{path.suffix}")
        index += 1


def claim_name(path: Path, overwrite: bool) -> Path:
    """Reserve the PNG's final name atomically (O_EXCL), so two runs writing to the same folder at once
    each keep their image; with `overwrite`, the name itself."""
    if overwrite:
        return path
    for candidate in free_names(path):
        try:
            os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return candidate
        except FileExistsError:
            continue


def save_image(image, path: Path, overwrite: bool) -> Path:
    """Write to a unique temporary file, then rename onto the claimed name: no partial PNG is ever left,
    and a full disk is reported with the file it hit, not as a traceback."""
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png.partial")
    os.close(handle)
    try:
        image.save(partial, format="PNG")
        final = claim_name(path, overwrite)
        os.replace(partial, final)
        return final
    except OSError as error:
        Path(partial).unlink(missing_ok=True)
        reason = "the disk is full" if error.errno == errno.ENOSPC else str(error)
        raise SystemExit(f"error: could not write {path}: {reason}; free space or choose another --save_path "
                         "(no partial file was left)")


def generate(pipeline, args: argparse.Namespace, cache, label: str, steps: int):
    print(f"\n[{label}] {steps} steps at {args.image_size[0]}x{args.image_size[1]}", flush=True)
    started = time.perf_counter()
    output = pipeline(
        args.prompt, negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
        height=args.image_size[0], width=args.image_size[1], num_inference_steps=steps,
        guidance_scale=args.guidance_scale, num_images_per_prompt=args.num_images_per_prompt, seed=args.seed,
        max_sequence_length=args.max_sequence_length, cache=cache, progress=True,
        batch_cfg=not args.separate_cfg_branches)
    elapsed = time.perf_counter() - started
    print(f"[{label}] total {elapsed:.2f} s", flush=True)
    return output, elapsed


def load_pipeline(args: argparse.Namespace):
    """Import MindSpore (quietly unless --verbose), set the device, and load the pipeline."""
    with quiet_imports(args.verbose):
        check_device_target(args.device_target)
        import mindspore as ms
        from models.embedded import embedded_checkpoint
        from pipeline_flux import DTYPES, OP_BY_OP_COMPONENTS, FluxPipeline
    # set_context, not set_device: set_device refuses a process whose runtime already ran a kernel
    # (a caller of main(), such as the tests).
    ms.set_context(mode=ms.GRAPH_MODE if args.use_graph_mode else ms.PYNATIVE_MODE, device_target=args.device_target)
    folder = args.ckpt or embedded_checkpoint(args.demo_config)
    if not args.ckpt and args.demo_config == TRAINED:
        print(f"Using the shipped emoji-world Flux {folder} (trained here; not FLUX.1, give --ckpt for FLUX).",
              flush=True)
    elif not args.ckpt:
        print(f"Using the embedded demo checkpoint {folder}: RANDOM weights, not FLUX.1 (give --ckpt for real "
              "images).", flush=True)
    pipeline = FluxPipeline.from_pretrained(str(folder), mindspore_dtype=DTYPES[args.dtype],
                                            use_mindone_models=args.mindone_models,
                                            context_parallel=args.context_parallel,
                                            compile_cache=args.use_graph_mode and not args.no_compile_cache)
    # One generation encodes and decodes once: op by op that is faster than compiling (FluxPipeline.op_by_op).
    if not (args.compare_baseline or args.compile_all):
        pipeline.op_by_op = OP_BY_OP_COMPONENTS
    if args.verbose:
        print(f"compile cache: {'off' if pipeline.compile_cache is None else pipeline.compile_cache.root}")
    return pipeline


def print_summaries(summaries: dict, verbose: bool) -> None:
    from utils import format_summary, format_summary_line
    for branch, summary in summaries.items():
        if verbose:
            print(f"\nFBCache summary ({branch} branch):\n{format_summary(summary)}")
        else:
            print(f"FBCache {branch}: {format_summary_line(summary)}")


def print_timings(load_seconds: float, timings: dict, summaries: dict) -> None:
    """Where the run's time went: loading, compiling (or loading compiled graphs), text encoding,
    denoising (with what the cache saved there) and decoding."""
    print(f"time: import + load {load_seconds:.2f} s, compile {timings['compile']:.2f} s, encode {timings['encode']:.2f} s, "
          f"denoise {timings['denoise']:.2f} s, decode {timings.get('decode', 0.0):.2f} s")
    for branch, summary in summaries.items():
        computed, steps = summary["steps_computed"], summary["steps"]
        if computed < steps:
            # A cached step still runs the probe block and the step's other work, so this bounds the saving
            # from above; --compare_baseline measures it.
            saved = timings["denoise"] * (steps / computed - 1)
            print(f"cache ({branch}): {steps - computed} of {steps} steps cached, at most {saved:.2f} s of "
                  f"denoising saved (--compare_baseline measures it)")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_writable(args.save_path)
    started = time.perf_counter()
    pipeline = load_pipeline(args)
    load_seconds = time.perf_counter() - started

    runs = []
    if args.compare_baseline or args.no_cache:
        runs.append(("baseline", None))
    if not args.no_cache:
        runs.append(("fbcache", args.cache))
    if args.compare_baseline:
        # One-step runs compile every graph first, so the timed runs compare steps, not compilations.
        for label, cache in runs:
            generate(pipeline, args, cache, f"{label} warm-up (compiles)", steps=1)
    times = {}
    for label, cache in runs:
        output, times[label] = generate(pipeline, args, cache, label, args.num_inference_steps)
        print_summaries(output.cache_summaries, args.verbose)
        print_timings(load_seconds, pipeline.timings, output.cache_summaries)
        if pipeline.token_split is not None and pipeline.token_split.rank > 0:
            continue  # every rank holds the whole image; rank 0 writes it
        for index, image in enumerate(output.images):
            print(f"wrote {save_image(image, args.save_path / f'{label}_{index}.png', args.overwrite)}")
    if len(times) == 2:
        print(f"\nbaseline {times['baseline']:.2f} s, fbcache {times['fbcache']:.2f} s, speedup "
              f"{times['baseline'] / times['fbcache']:.2f}x (graphs compiled beforehand)")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as error:  # CheckpointError and NonFiniteError are ValueErrors
        sys.exit(f"error: {error}")
