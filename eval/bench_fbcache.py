"""What the First-Block Cache costs and saves per denoising step, in MindSpore GRAPH mode.

Forces a known pattern (warm-up steps computed, then every step cached: the threshold is above every
diff), so the cache's own overhead is measured exactly rather than depending on random-weight diffs.
Reports: the uncached model's step, a computed (miss) step, a cached step at each Taylor order, the
ideal cached step (embeddings + always-computed blocks + head, nothing else, compiled on its own),
achieved/ideal = ideal / cached, and the compile count of the cached model over all generations.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mindspore as ms  # noqa: E402

from eval.bench_common import AlwaysComputedPart, flux_inputs, time_calls, timed, to_mindspore  # noqa: E402
from eval.cli_common import check_image_size  # noqa: E402
from models.demo_configs import TRANSFORMER_CONFIGS  # noqa: E402
from models.embedded import embedded_checkpoint  # noqa: E402
from models.loading import CheckpointError  # noqa: E402
from models.transformer_flux import FluxTransformer2DModel  # noqa: E402
from models.transformer_flux_withFBCache import enable_fbcache  # noqa: E402
from utils import MAX_TAYLOR_ORDER, CacheContext  # noqa: E402

FORCED_HIT_THRESHOLD = 1e9


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="diffusers-format FLUX folder (with transformer/); default: embedded")
    parser.add_argument("--config", choices=sorted(TRANSFORMER_CONFIGS), default="demo",
                        help="random-weight configuration used when --ckpt is not given")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=(512, 512))
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--fn", type=int, default=1, help="blocks always computed first (the probe)")
    parser.add_argument("--bn", type=int, default=0, help="blocks always computed last")
    parser.add_argument("--orders", type=int, nargs="+", default=list(range(MAX_TAYLOR_ORDER + 1)))
    parser.add_argument("--computed_steps", type=int, default=4, help="warm-up steps, all computed")
    parser.add_argument("--cached_steps", type=int, default=8, help="forced cached steps after the warm-up")
    parser.add_argument("--repeats", type=int, default=5,
                        help="warm-up calls of the uncached model and of the always-computed part")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    check_image_size(parser, args.image_size)
    if args.computed_steps < 2 or args.cached_steps < 1:
        parser.error("--computed_steps must be >= 2 (the first includes the compile) and --cached_steps >= 1")
    if any(not 0 <= order <= MAX_TAYLOR_ORDER for order in args.orders):
        parser.error(f"--orders must lie in [0, {MAX_TAYLOR_ORDER}]")
    return args


def median_pair(pairs: list) -> tuple:
    return statistics.median(own for own, _ in pairs), statistics.median(other for _, other in pairs)


def load(folder: Path) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer")


def generation(model, context: CacheContext, tensors: dict, steps: int, counterparts: dict, warmup: int) -> list:
    """One generation: per step, the cached model's time and, right after, the time of its uncached
    counterpart on the same inputs (the plain model for a computed step, the always-computed part
    for a cached one). Pairing them step by step keeps drifts of a shared machine out of the ratios."""
    context.reset()
    pairs = []
    for step in range(steps):
        tensors["timestep"] = ms.Tensor([1.0 - step / steps] * context.batch_size, ms.float32)
        own = timed(lambda: model(**tensors)[0].asnumpy())
        counterpart = counterparts["cached" if step >= warmup else "computed"]
        pairs.append((own, timed(lambda: counterpart(**tensors)[0].asnumpy())))
    return pairs


def main(argv=None) -> dict:
    args = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    folder = Path(args.ckpt) if args.ckpt else embedded_checkpoint(args.config)
    cached = load(folder)
    config = cached.config
    inputs = flux_inputs(config, args.image_size, args.text_tokens, args.batch_size)
    tokens = inputs["hidden_states"].shape[1]
    context = CacheContext(args.batch_size, tokens, cached.inner_dim, residual_diff_threshold=FORCED_HIT_THRESHOLD,
                           warmup_steps=args.computed_steps, fn_compute_blocks=args.fn, bn_compute_blocks=args.bn,
                           text_seq_len=args.text_tokens)
    enable_fbcache(cached, context)
    header = (f"{folder}: {config.num_layers} double + {config.num_single_layers} single blocks, hidden "
              f"{cached.inner_dim}, batch {args.batch_size}, {tokens} image + {args.text_tokens} text tokens, "
              f"F{args.fn}B{args.bn}, GRAPH mode, {ms.get_context('device_target')}")
    print(header, flush=True)

    plain = load(folder)
    counterparts = {"computed": plain, "cached": AlwaysComputedPart(plain, args.fn, args.bn)}
    tensors = to_mindspore(inputs)
    for name, counterpart in counterparts.items():
        time_calls(lambda: counterpart(**tensors)[0].asnumpy(), args.repeats, f"counterpart of a {name} step")

    steps = args.computed_steps + args.cached_steps
    expected = [False] * args.computed_steps + [True] * args.cached_steps
    computed_pairs, rows = [], {}
    for order in args.orders:
        context.configure(taylorseer_derivative=order)
        pairs = generation(cached, context, tensors, steps, counterparts, args.computed_steps)
        decisions = context.summary()["cached"]
        if decisions != expected:
            raise SystemExit(f"forced pattern not obtained at order {order}: {decisions}")
        computed_pairs += pairs[1:args.computed_steps]
        rows[f"cached step, Taylor order {order}"] = median_pair(pairs[args.computed_steps:])
        print(f"  order {order}: (step, counterpart) times {[(round(a, 3), round(b, 3)) for a, b in pairs]}",
              flush=True)
    rows["computed step (cache miss)"] = median_pair(computed_pairs)
    context.configure(residual_diff_threshold=0.05, warmup_steps=0)
    generation(cached, context, tensors, steps, counterparts, steps)

    print(f"\n{header}\n")
    print("| step | median time (s) | counterpart median (s) | counterpart / step |")
    print("|---|---|---|---|")
    for name, (own, counterpart) in rows.items():
        print(f"| {name} | {own:.4f} | {counterpart:.4f} | {counterpart / own:.3f} |")
    print("\nCounterpart of a computed step: the uncached model (the ratio is 1 / the cache's overhead on a "
          "miss).\nCounterpart of a cached step: the always-computed part alone, i.e. the ideal cached step "
          "(the ratio is achieved / ideal).")
    compiles = len(cached.compile_cache)
    print(f"\ngraph compiles of the cached model over {len(args.orders) + 1} generations "
          f"(Taylor orders {args.orders}, then threshold 0.05): {compiles}")
    result = {"setup": header, "median_step_and_counterpart_s": rows, "compiles": compiles}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError) as error:
        sys.exit(f"error: {error}")
