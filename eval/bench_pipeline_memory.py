"""Peak host memory of a whole pipeline generation on CPU, against the bytes its tensors need.

    python eval/bench_pipeline_memory.py --config mid --image_size 512

One fresh process: MindSpore and the project imported, the pipeline loaded, the prompt encoded (two text
encoder graphs), one generation with true CFG and the First-Block Cache (two cached transformer graphs,
one per CFG branch; the threshold is above every diff after `--computed_steps`, so both the computed and
the cached branch of each graph run), then the VAE decode. Prints the resident set after each stage (the
first step, the first cached one and the last one are read by the pipeline's step callback), the
process's peak (VmHWM) and the arithmetic of what the tensors need: all weights, the widest activations
of the widest component (the transformer's attention block, or the VAE's mid attention and full-size
feature maps) and both branches' cache state. The libraries' own memory (the resident set after import)
is code and allocator state, not tensors; the ratio is given with and without it.

Why: issue 12 asks the mid pipeline's peak to be stated with what holds it and to stay within 3x of
what its tensors need; the speed table's 12.9 GiB (many graphs in one process) said neither.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Dict

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eval.bench_memory import measure_in_fresh_process, needed_activations  # noqa: E402
from eval.cli_common import check_image_size, quiet_imports  # noqa: E402
from models.demo_configs import TRANSFORMER_CONFIGS  # noqa: E402

GIB = 2 ** 30
STAGES = ("imported", "pipeline loaded", "prompt encoded", "first step (both branches computed)",
          "first cached step", "last step", "decoded")
PROMPT, NEGATIVE_PROMPT = "a red apple on a wooden table", ""


def vae_activations(config: dict, image_size: int) -> int:
    """fp32 bytes alive at the VAE decoder's widest point: its mid-block attention (one head over the
    latent's pixels: scores and probabilities) or three full-size feature maps of its last up block."""
    latent_pixels = (image_size // 8) ** 2
    attention = 2 * latent_pixels ** 2
    full_size = 3 * config["block_out_channels"][0] * image_size ** 2
    return 4 * max(attention, full_size)


def child(config_name: str, image_size: int, steps: int, computed_steps: int) -> Dict[str, object]:
    """Resident bytes after each stage and the bytes the tensors need, in this fresh process."""
    with quiet_imports(verbose=False):
        import mindspore as ms
        from eval.bench_common import PeakHostMemory
        from models.embedded import embedded_checkpoint
        from pipeline_flux import FBCacheConfig, FluxPipeline
        from utils import CacheContext
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    resident = {"imported": PeakHostMemory.resident_bytes()}
    pipeline = FluxPipeline.from_pretrained(str(embedded_checkpoint(config_name)))
    resident["pipeline loaded"] = PeakHostMemory.resident_bytes()
    text_tokens = pipeline.tokenizer_2.model_max_length
    pipeline.encode_prompt([PROMPT], [PROMPT], text_tokens)
    resident["prompt encoded"] = PeakHostMemory.resident_bytes()
    cache = FBCacheConfig(residual_diff_threshold=1e9, warmup_steps=computed_steps)

    def after_step(step: int, total: int, cached: Dict[str, bool]) -> None:
        if step in step_stages:
            resident[step_stages[step]] = PeakHostMemory.resident_bytes()

    step_stages = {0: STAGES[3], computed_steps: STAGES[4], steps - 1: STAGES[5]}
    output = pipeline(prompt=PROMPT, negative_prompt=NEGATIVE_PROMPT, true_cfg_scale=1.5, height=image_size,
                      width=image_size, num_inference_steps=steps, seed=0, output_type="np", cache=cache,
                      callback=after_step)
    resident["decoded"] = PeakHostMemory.resident_bytes()
    expected = [False] * computed_steps + [True] * (steps - computed_steps)
    for branch, summary in output.cache_summaries.items():
        if summary["cached"] != expected:
            raise RuntimeError(f"the {branch} branch cached {summary['cached']}, not the forced {expected}: the stages "
                               "read after the first step and the first cached one would be mislabelled")
    peak = PeakHostMemory.high_water_bytes()
    transformer = pipeline.transformer
    image_tokens = (image_size // 16) ** 2
    branch_state = CacheContext(1, image_tokens, transformer.inner_dim, text_seq_len=text_tokens)
    weights = {name: sum(parameter.nbytes for cell in cells for parameter in cell.get_parameters())
               for name, cells in (("transformer", [transformer]), ("VAE", [pipeline.vae]),
                                   ("text encoders", [pipeline.text_encoder, pipeline.text_encoder_2]))}
    activations = {"transformer": needed_activations(dict(transformer.config), image_tokens, text_tokens),
                   "VAE": vae_activations(dict(pipeline.vae.config), image_size)}
    return dict(resident=resident, peak=peak, weights=weights, activations=activations,
                cache_state=2 * sum(parameter.nbytes for parameter in branch_state.get_parameters()),
                text_tokens=text_tokens, cached=expected)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(TRANSFORMER_CONFIGS), default="mid")
    parser.add_argument("--image_size", type=int, default=512, help="square image size in pixels (default 512)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (default 4)")
    parser.add_argument("--computed_steps", type=int, default=2,
                        help="steps computed before every later one is cached (default 2)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_image_size(parser, [args.image_size, args.image_size])
    if not 1 <= args.computed_steps < args.steps - 1:
        parser.error(f"--computed_steps must be at least 1 and below --steps - 1 ({args.steps - 1}) so that both "
                     f"branches run and a later cached step follows, got {args.computed_steps}")
    return args


def main(argv=None) -> Dict[str, object]:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(child(args.config, args.image_size, args.steps, args.computed_steps)))
        return {}
    print(f"{args.config} pipeline at {args.image_size}x{args.image_size}: measuring in a fresh process ...",
          file=sys.stderr, flush=True)
    row = measure_in_fresh_process(__file__, ["--child", "--config", args.config, "--image_size", str(args.image_size),
                                              "--steps", str(args.steps), "--computed_steps", str(args.computed_steps)],
                                   "pipeline")
    resident = row["resident"]
    print(f"{args.config} pipeline, {args.image_size}x{args.image_size}, {row['text_tokens']} text tokens, fp32, CPU "
          f"graph mode, true CFG, {args.steps} steps (cached: {row['cached']}); GiB\n")
    print("| stage | resident | growth |\n|---|---|---|")
    previous = 0
    for stage in STAGES:
        print(f"| {stage} | {resident[stage] / GIB:.2f} | {(resident[stage] - previous) / GIB:+.2f} |")
        previous = resident[stage]
    print(f"| peak (VmHWM) | {row['peak'] / GIB:.2f} | |")
    weights, activations = row["weights"], row["activations"]
    needed = sum(weights.values()) + max(activations.values()) + row["cache_state"]
    print("\nWhat the tensors need (GiB):")
    for name, size in weights.items():
        print(f"- {name} weights: {size / GIB:.3f}")
    for name, size in activations.items():
        print(f"- {name} widest activations: {size / GIB:.3f}")
    print(f"- cache state, both CFG branches: {row['cache_state'] / GIB:.3f}")
    print(f"- needed = all weights + the widest activations + cache state = {needed / GIB:.3f}")
    print(f"\npeak / needed = {row['peak'] / needed:.2f}; without the libraries' {resident['imported'] / GIB:.2f} GiB "
          f"after import: {(row['peak'] - resident['imported']) / needed:.2f}")
    return row


if __name__ == "__main__":
    main()
