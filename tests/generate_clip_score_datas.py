"""Generate the image sets that tests/flux_accuracy_test.py scores: one folder per cache setting.

    python tests/generate_clip_score_datas.py --ckpt /path/to/FLUX.1-dev --out accuracy_images \
        --prompt_set drawbench --settings baseline fbcache_0.08 fbcache_0.12_taylor2 --image_size 1024x1024

Layout: `<out>/<setting>/<H>x<W>/<prompt index:05d>.png` and `<out>/manifest.json` (prompts, per-prompt
seeds, generation parameters, the cache settings). Every setting uses the same seed for a prompt, so
each cached image has an uncached counterpart drawn from the same noise. Images already on disk are
skipped (a run can be resumed or extended with more settings), and every PNG is written under a
temporary name and renamed, so an interrupted run leaves no partial image.

Launched by MindSpore's `msrun` (e.g. `msrun --worker_num 8 --local_worker_num 8 tests/generate_clip_score_datas.py
...`), each worker takes the device of its local rank and the prompt indices rank, rank + size,
rank + 2*size, ... (size = the number of workers; `shard`) in every setting and size, so each image is
made by exactly one worker; rank 0 writes the manifest, and each generation_log.jsonl record names the
rank that made its image. A plain process is rank 0 of 1: it generates every prompt.

Without --ckpt it uses the shipped emoji-world Flux (assets/flux-emoji) on its 32 held-out prompts
(`--prompt_set emoji_heldout`), with true CFG.
"""

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent
sys.path[:0] = [str(REPO_ROOT), str(TESTS_DIR)]

import mindspore as ms  # noqa: E402

from eval.cli_common import DEVICE_TARGETS, DTYPE_NAMES, SIZE_MULTIPLE, check_dtype_device  # noqa: E402
from eval.run_flux_withFBCache_pipeline import check_writable  # noqa: E402
from models.context_parallel import join_msrun_cluster  # noqa: E402
from models.embedded import embedded_checkpoint, generation_defaults  # noqa: E402
from models.loading import CheckpointError  # noqa: E402
from pipeline_flux import DTYPES, MAX_SEQUENCE_LENGTH, FluxPipeline  # noqa: E402
from accuracy_data import (CACHE_SETTINGS, DEFAULT_SEED, PROMPT_SETS, RESOLUTIONS, CacheSetting,  # noqa: E402
                                fbcache_setting)
from utils import MAX_TAYLOR_ORDER  # noqa: E402

MANIFEST_NAME = "manifest.json"
GENERATION_LOG = "generation_log.jsonl"
Resolution = Tuple[int, int]


def parse_resolution(text: str) -> Resolution:
    """'HxW' -> (H, W), positive multiples of 16 (8x VAE downsampling, 2x2 packing)."""
    try:
        height, width = (int(side) for side in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"image size must be HxW, e.g. 1024x1024, got {text!r}")
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise argparse.ArgumentTypeError(f"image size sides must be positive multiples of {SIZE_MULTIPLE}, got {text!r}")
    return height, width


def resolution_name(resolution: Resolution) -> str:
    return f"{resolution[0]}x{resolution[1]}"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="diffusers-format FLUX folder; default: the shipped emoji-world Flux")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "accuracy", help="output folder")
    parser.add_argument("--prompt_set", choices=sorted(PROMPT_SETS),
                        help="default: emoji_heldout on the shipped model, smoke with --ckpt")
    parser.add_argument("--num_prompts", type=int, help="use only the first N prompts of the set")
    parser.add_argument("--settings", nargs="*", default=None,
                        help=f"named cache settings (default: all): {', '.join(CACHE_SETTINGS)}")
    parser.add_argument("--thresholds", type=float, nargs="+",
                        help="also generate FBCache settings with these residual_diff_thresholds (F1B0) ...")
    parser.add_argument("--taylor_orders", type=int, nargs="+", default=[0],
                        help=f"... for each of these forecast orders 0-{MAX_TAYLOR_ORDER}")
    parser.add_argument("--image_size", type=parse_resolution, nargs="+", metavar="HxW",
                        help="one or more sizes (default with --ckpt: " + " ".join(map(resolution_name, RESOLUTIONS))
                        + "; 128x128 for the shipped model)")
    parser.add_argument("--num_inference_steps", type=int, help="default 28")
    parser.add_argument("--guidance_scale", type=float,
                        help="checkpoints with guidance embedding only (FLUX.1-dev; default 3.5)")
    parser.add_argument("--true_cfg_scale", type=float,
                        help="> 1: true CFG against --negative_prompt (default 4 on the shipped model, else 1)")
    parser.add_argument("--negative_prompt", help="default \"\" with true CFG")
    parser.add_argument("--max_sequence_length", type=int,
                        help="T5 tokens (default: the T5 tokenizer's model_max_length, at most 512)")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="prompt i uses seed + i")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--device_target", choices=DEVICE_TARGETS, default="CPU")
    parser.add_argument("--use_graph_mode", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)

    if args.ckpt and not Path(args.ckpt).is_dir():
        parser.error(f"--ckpt {args.ckpt} is not a folder (expected a diffusers-format FLUX folder)")
    defaults = generation_defaults(bool(args.ckpt))
    default_sizes = list(RESOLUTIONS) if args.ckpt else [defaults["image_size"]]
    args.image_size = list(dict.fromkeys(args.image_size or default_sizes))
    if args.prompt_set is None:
        args.prompt_set = "smoke" if args.ckpt else "emoji_heldout"
    for name in ("num_inference_steps", "true_cfg_scale"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.negative_prompt is None and args.true_cfg_scale > 1:
        args.negative_prompt = ""
    if args.num_inference_steps < 1:
        parser.error(f"--num_inference_steps must be >= 1, got {args.num_inference_steps}")
    prompts = PROMPT_SETS[args.prompt_set]
    if args.num_prompts is not None and not 1 <= args.num_prompts <= len(prompts):
        parser.error(f"--num_prompts must lie in [1, {len(prompts)}] for --prompt_set {args.prompt_set}, "
                     f"got {args.num_prompts}")
    unknown = [name for name in args.settings or [] if name not in CACHE_SETTINGS]
    if unknown:
        parser.error(f"unknown cache setting(s) {', '.join(unknown)}; known: {', '.join(CACHE_SETTINGS)} "
                     "(use --thresholds / --taylor_orders for others)")
    if any(not 0 <= order <= MAX_TAYLOR_ORDER for order in args.taylor_orders):
        parser.error(f"--taylor_orders must lie in [0, {MAX_TAYLOR_ORDER}], got {args.taylor_orders}")
    if any(threshold <= 0 for threshold in args.thresholds or []):
        parser.error(f"--thresholds must be > 0 (a threshold <= 0 never caches: that is 'baseline'), "
                     f"got {args.thresholds}")
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        parser.error(f"--max_sequence_length must lie in [1, {MAX_SEQUENCE_LENGTH}], got {args.max_sequence_length}")
    check_dtype_device(parser, args.dtype, args.device_target)
    return args


def selected_settings(args: argparse.Namespace) -> List[CacheSetting]:
    """The named settings (all when none are named and no grid is given), then the threshold x order grid."""
    named = args.settings if args.settings is not None else ([] if args.thresholds else list(CACHE_SETTINGS))
    settings = {name: CACHE_SETTINGS[name] for name in named}
    for threshold in args.thresholds or []:
        for order in args.taylor_orders:
            setting = fbcache_setting(threshold, order)
            settings[setting.name] = setting
    return list(settings.values())


def build_manifest(args: argparse.Namespace, settings: Sequence[CacheSetting]) -> dict:
    prompts = list(PROMPT_SETS[args.prompt_set][:args.num_prompts])
    return {
        "prompt_set": args.prompt_set,
        "prompts": prompts,
        "seeds": [args.seed + index for index in range(len(prompts))],
        "generation": {"ckpt": str(Path(args.ckpt).resolve()) if args.ckpt else "shipped emoji-world Flux",
                       "num_inference_steps": args.num_inference_steps, "guidance_scale": args.guidance_scale,
                       "true_cfg_scale": args.true_cfg_scale, "negative_prompt": args.negative_prompt,
                       "max_sequence_length": args.max_sequence_length, "dtype": args.dtype},
        "settings": {setting.name: asdict(setting) for setting in settings},
        "resolutions": [resolution_name(resolution) for resolution in args.image_size],
    }


def merged_manifest(path: Path, new: dict) -> dict:
    """The manifest after this run: the existing one extended with new settings and resolutions.

    Refuses an existing folder made with other prompts, seeds or generation parameters, or with a
    setting of the same name but other values: its images would not be comparable with this run's.
    """
    if not path.is_file():
        return new
    old = json.loads(path.read_text())
    for key in ("prompt_set", "prompts", "seeds", "generation"):
        if old.get(key) != new[key]:
            raise ValueError(f"{path} was written with another {key} ({old.get(key)!r}, now {new[key]!r}): use "
                             "another --out, or the same arguments to resume")
    changed = [name for name, values in new["settings"].items() if old["settings"].get(name, values) != values]
    if changed:
        raise ValueError(f"{path} already has setting(s) {', '.join(changed)} with other values: use another --out")
    resolutions = old["resolutions"] + [name for name in new["resolutions"] if name not in old["resolutions"]]
    return dict(new, settings={**old["settings"], **new["settings"]}, resolutions=resolutions)


def write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """`write(temporary_path)`, then rename: a reader never sees a partial file."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def distributed_rank(device_target: str) -> Tuple[int, int]:
    """(rank, group size): joined to the cluster under msrun (MS_ROLE set, see `join_msrun_cluster`), 0 of 1
    in a plain process."""
    if os.environ.get("MS_ROLE") is None:
        return 0, 1
    return join_msrun_cluster(device_target)


def shard(indices: Sequence[int], rank: int, size: int) -> List[int]:
    """The prompt indices one rank generates: rank, rank + size, ..."""
    return list(indices[rank::size])


def generation_tasks(out: Path, settings: Sequence[CacheSetting], resolutions: Sequence[Resolution],
                     indices: Sequence[int]) -> List[Tuple[CacheSetting, Resolution, int, Path]]:
    return [(setting, resolution, index, out / setting.name / resolution_name(resolution) / f"{index:05d}.png")
            for resolution in resolutions for setting in settings for index in indices]


def cached_steps(summaries: dict) -> str:
    """', 3/28 steps cached' per CFG branch for a cached run, '' for the baseline."""
    return "".join(f", {summary['steps_cached']}/{summary['steps']} steps cached"
                   + (f" ({branch})" if len(summaries) > 1 else "") for branch, summary in summaries.items())


def log_generation(path: Path, seconds: float, summaries: dict, rank: int = 0) -> None:
    """One JSON line per image in `<setting>/<HxW>/generation_log.jsonl`: wall time (the first image of a
    setting includes its graph compilation), steps cached per CFG branch, for speed tables, and the rank
    that made it (0 in a plain process). Workers append to the same log, one whole line per write."""
    record = {"image": path.name, "seconds": round(seconds, 4),
              "steps_cached": {branch: summary["steps_cached"] for branch, summary in summaries.items()},
              "rank": rank}
    with open(path.parent / GENERATION_LOG, "a") as log:
        log.write(json.dumps(record) + "\n")


def generate(pipeline: FluxPipeline, args: argparse.Namespace, manifest: dict,
             tasks: Sequence[Tuple[CacheSetting, Resolution, int, Path]], rank: int = 0) -> None:
    text_features = {}  # prompt index -> (T5, pooled CLIP) features: encoded once, shared by every setting and size
    text_tokens = args.max_sequence_length or pipeline.default_sequence_length()
    for number, (setting, (height, width), index, path) in enumerate(tasks, start=1):
        started = time.perf_counter()
        if index not in text_features:
            prompt = manifest["prompts"][index]
            text_features[index] = pipeline.encode_prompt([prompt], [prompt], text_tokens)
        prompt_embeds, pooled_prompt_embeds = text_features[index]
        output = pipeline(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds, height=height,
                          width=width, num_inference_steps=args.num_inference_steps,
                          guidance_scale=args.guidance_scale, true_cfg_scale=args.true_cfg_scale,
                          negative_prompt=args.negative_prompt, max_sequence_length=text_tokens,
                          seed=manifest["seeds"][index],
                          cache=setting.fbcache_config())
        seconds = time.perf_counter() - started
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda partial: output.images[0].save(partial, format="PNG"))
        log_generation(path, seconds, output.cache_summaries, rank)
        print(f"[{number}/{len(tasks)}] {setting.name} {height}x{width} {path.name}: "
              f"{seconds:.2f} s{cached_steps(output.cache_summaries)}", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    settings = selected_settings(args)
    check_writable(args.out)
    manifest_path = args.out / MANIFEST_NAME
    manifest = merged_manifest(manifest_path, build_manifest(args, settings))
    ms.set_context(mode=ms.GRAPH_MODE if args.use_graph_mode else ms.PYNATIVE_MODE, device_target=args.device_target)
    rank, size = distributed_rank(args.device_target)
    if rank == 0:
        write_atomically(manifest_path, lambda partial: partial.write_text(json.dumps(manifest, indent=2) + "\n"))
    indices = shard(range(len(manifest["prompts"])), rank, size)
    tasks = generation_tasks(args.out, settings, args.image_size, indices)
    pending = [task for task in tasks if not task[3].is_file()]
    print(f"rank {rank} of {size}: {len(tasks)} images ({len(settings)} settings x {len(args.image_size)} sizes x "
          f"{len(indices)} prompts) in {args.out}; {len(tasks) - len(pending)} already exist, skipped", flush=True)
    if pending:
        pipeline = FluxPipeline.from_pretrained(str(args.ckpt or embedded_checkpoint()),
                                                mindspore_dtype=DTYPES[args.dtype])
        generate(pipeline, args, manifest, pending, rank)


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
