"""The reference example's speed table, measured end to end on any checkpoint and machine.

Rows: the uncached pipeline in PyNative and in graph mode, FBCache at several thresholds with and
without TaylorSeer, other Fn/Bn settings, and a forced-hit mode (threshold above every diff, so the
first `--forced_warmup` steps are computed and every later one is cached, whatever the weights) in
which the cache's own cost is measured exactly for each forecast order.

Every configuration first runs once (compiles, excluded), then `--repeats` rounds run all of them
in turn, so drifts of a shared machine hit every row alike; medians are reported. A generation is
what the reference timed: text encoders, denoising loop, VAE decode. The text encoders run in graph
mode in every row, the PyNative row included: mindone's T5 has no PyNative CPU kernel.

Ideal speedup: what the run would take if a cached step cost only the blocks it executes, i.e. the
graph baseline minus, per cached step, the difference between a full transformer forward and the
always-computed part (embeddings + first Fn + last Bn blocks + head, compiled on its own); both are
timed in the same rounds. achieved / ideal = ideal time / measured time.
"""

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mindspore as ms  # noqa: E402

from eval.bench_common import AlwaysComputedPart, PeakHostMemory, flux_inputs, timed, to_mindspore  # noqa: E402
from eval.cli_common import DEVICE_TARGETS, DTYPE_NAMES, check_dtype_device, check_image_size  # noqa: E402
from models.embedded import EMBEDDED, TRAINED, embedded_checkpoint, generation_defaults  # noqa: E402
from models.loading import CheckpointError  # noqa: E402
from pipeline_flux import DTYPES, MAX_SEQUENCE_LENGTH, FBCacheConfig, FluxPipeline  # noqa: E402
from utils import MAX_TAYLOR_ORDER  # noqa: E402

FORCED_HIT_THRESHOLD = 1e9
DEFAULT_IMAGE_SIZE = {TRAINED: (128, 128), "demo": (256, 256), "mid": (512, 512)}
GIB = 2 ** 30


@dataclass
class Row:
    """One configuration of the table; `cache=None` is the uncached pipeline."""

    name: str
    mode: str
    cache: Optional[FBCacheConfig] = None
    forced: bool = False

    @property
    def blocks(self) -> Tuple[int, int]:
        return (self.cache.fn_compute_blocks, self.cache.bn_compute_blocks) if self.cache else (0, 0)


def fn_bn(text: str) -> Tuple[int, int]:
    try:
        fn, bn = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FN,BN such as 1,0 or 2,1, got {text!r}")
    if fn < 1 or bn < 0:
        raise argparse.ArgumentTypeError(f"FN must be >= 1 and BN >= 0, got {text!r}")
    return fn, bn


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="diffusers-format FLUX folder; default: the shipped emoji-world Flux")
    parser.add_argument("--config", choices=EMBEDDED, default=TRAINED,
                        help="embedded checkpoint used without --ckpt: the trained 'emoji' model, or random-weight "
                             "'demo' / 'mid' (hidden 1024, 3 double + 6 single)")
    parser.add_argument("--prompt", help="default: one the checkpoint can draw")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"),
                        help="pixels, multiples of 16 (default 128 128 emoji, 256 256 demo, 512 512 mid, 1024 1024 "
                             "--ckpt)")
    parser.add_argument("--num_inference_steps", type=int, help="default 28 (8 on the random demo / mid)")
    parser.add_argument("--guidance_scale", type=float,
                        help="checkpoints with guidance embedding only (FLUX.1-dev; default 3.5)")
    parser.add_argument("--max_sequence_length", type=int,
                        help="T5 tokens (default: the T5 tokenizer's model_max_length, at most 512)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.08, 0.12],
                        help="residual_diff_threshold values (random weights need far larger ones: "
                             "pick them from the diffs this script prints)")
    parser.add_argument("--taylorseer_derivative", type=int, default=2,
                        help="forecast order of the 'with TaylorSeer' rows")
    parser.add_argument("--warmup_steps", type=int, default=1, help="warm-up steps of the threshold rows")
    parser.add_argument("--fn_bn", type=fn_bn, nargs="*", default=[(2, 1)], metavar="FN,BN",
                        help="extra Fn/Bn settings, each at the first threshold (F1B0 is always measured)")
    parser.add_argument("--forced_warmup", type=int, default=MAX_TAYLOR_ORDER + 1,
                        help="computed steps before forced hits (>= order + 1 lets every order forecast fully)")
    parser.add_argument("--no_forced", action="store_true", help="skip the forced-hit rows")
    parser.add_argument("--no_pynative", action="store_true", help="skip the PyNative baseline row")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the compile round")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--device_target", default="CPU", choices=DEVICE_TARGETS)
    parser.add_argument("--json", type=Path, help="write the table and every measurement here")
    parser.add_argument("--markdown", type=Path, help="write the Markdown table here")
    args = parser.parse_args(argv)
    args.image_size = tuple(args.image_size or (DEFAULT_IMAGE_SIZE[args.config] if not args.ckpt else (1024, 1024)))
    defaults = generation_defaults(bool(args.ckpt), args.config)
    args.prompt = args.prompt or defaults["prompt"][0]
    if args.num_inference_steps is None:
        args.num_inference_steps = defaults["num_inference_steps"]
    if args.max_sequence_length is not None and not 1 <= args.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        parser.error(f"--max_sequence_length must lie in [1, {MAX_SEQUENCE_LENGTH}], got {args.max_sequence_length}")
    check_image_size(parser, args.image_size)
    if args.num_inference_steps < 2 or args.repeats < 1:
        parser.error("--num_inference_steps must be >= 2 and --repeats >= 1")
    if not 0 <= args.taylorseer_derivative <= MAX_TAYLOR_ORDER:
        parser.error(f"--taylorseer_derivative must lie in [0, {MAX_TAYLOR_ORDER}]")
    if any(threshold <= 0 for threshold in args.thresholds):
        parser.error("--thresholds must be > 0 (a threshold <= 0 never caches: that is the baseline row)")
    if not args.no_forced and not 1 <= args.forced_warmup < args.num_inference_steps:
        parser.error(f"--forced_warmup must lie in [1, {args.num_inference_steps - 1}] so that some steps are cached")
    check_dtype_device(parser, args.dtype, args.device_target)
    for name in ("json", "markdown"):
        path = getattr(args, name)
        if path is not None and not path.parent.is_dir():
            parser.error(f"--{name}: folder {path.parent} does not exist")
    return args


def plan_rows(args: argparse.Namespace) -> List[Row]:
    rows = [] if args.no_pynative else [Row("baseline, PyNative", "pynative")]
    rows.append(Row("baseline, graph", "graph"))
    orders = sorted({0, args.taylorseer_derivative})
    for threshold in args.thresholds:
        for order in orders:
            label = f"FBCache {threshold:g}" + (f" + TaylorSeer {order}" if order else "")
            rows.append(Row(label, "graph", FBCacheConfig(threshold, order, warmup_steps=args.warmup_steps)))
    for fn, bn in args.fn_bn:
        if (fn, bn) != (1, 0):
            rows.append(Row(f"FBCache {args.thresholds[0]:g} F{fn}B{bn}", "graph", FBCacheConfig(
                args.thresholds[0], 0, warmup_steps=args.warmup_steps, fn_compute_blocks=fn, bn_compute_blocks=bn)))
    if not args.no_forced:
        for order in range(MAX_TAYLOR_ORDER + 1):
            rows.append(Row(f"forced hits, order {order}", "graph", FBCacheConfig(
                FORCED_HIT_THRESHOLD, order, warmup_steps=args.forced_warmup), forced=True))
    return rows


class Bench:
    """Runs generations of one pipeline and the two transformer probes that define the ideal."""

    def __init__(self, pipeline: FluxPipeline, args: argparse.Namespace, rows: List[Row]):
        self.pipeline, self.args = pipeline, args
        transformer = pipeline.transformer
        inputs = flux_inputs(transformer.config, args.image_size, args.max_sequence_length, batch_size=1)
        self.probe_inputs = {name: None if value is None else value.astype(DTYPES[args.dtype])
                             for name, value in to_mindspore(inputs).items()}
        self.probes = {"full forward": transformer}
        for blocks in sorted({row.blocks for row in rows if row.cache}):
            self.probes[f"always-computed part F{blocks[0]}B{blocks[1]}"] = AlwaysComputedPart(transformer, *blocks)

    def generate(self, row: Row) -> dict:
        """One timed generation: the prompt encoded in graph mode (mindone's T5 has no PyNative CPU kernel
        for its embedding), then the pipeline in the row's mode. Cache decisions, compiles and peak memory."""
        args = self.args
        compiled_before = self.pipeline.compiled_graphs()

        def generation():
            ms.set_context(mode=ms.GRAPH_MODE)
            embeds, pooled = self.pipeline.encode_prompt([args.prompt], [args.prompt], args.max_sequence_length)
            ms.set_context(mode=ms.PYNATIVE_MODE if row.mode == "pynative" else ms.GRAPH_MODE)
            return self.pipeline(
                prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=args.image_size[0], width=args.image_size[1],
                num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale, seed=args.seed,
                output_type="np", cache=row.cache)

        outputs = []
        with PeakHostMemory() as memory:
            seconds = timed(lambda: outputs.append(generation()))
        ms.set_context(mode=ms.GRAPH_MODE)
        summary = outputs[0].cache_summaries.get("cond")
        return dict(seconds=seconds, peak_bytes=memory.peak_bytes,
                    compiles=self.pipeline.compiled_graphs() - compiled_before,
                    cached=summary["cached"] if summary else [False] * args.num_inference_steps,
                    diffs=summary["diffs"] if summary else [])

    def time_probe(self, name: str) -> float:
        probe = self.probes[name]
        return timed(lambda: probe(*self.probe_inputs.values())[0].asnumpy())  # positional, as the pipeline calls


def check_forced_pattern(row: Row, cached: List[bool], warmup: int) -> None:
    expected = [step >= warmup for step in range(len(cached))]
    if cached != expected:
        raise SystemExit(f"{row.name}: the forced pattern was not obtained: cached steps {cached}")


def describe(row: Row, result: dict, steps: int) -> str:
    """A progress line; the first-block diffs are what a user picks thresholds from."""
    diffs = ", ".join(f"{diff:.3f}" for diff in result["diffs"])
    return (f"{row.name}: {result['seconds']:.2f} s, {sum(result['cached'])}/{steps} steps cached, "
            f"{result['compiles']} graph(s) compiled" + (f", diffs [{diffs}]" if diffs and not row.forced else ""))


def run(bench: Bench, rows: List[Row], args: argparse.Namespace) -> Tuple[Dict[str, dict], Dict[str, List[float]]]:
    """The compile round, then `repeats` rounds over every row and probe; raw measurements per row."""
    results = {row.name: {"runs": []} for row in rows}
    for row in rows:
        first = bench.generate(row)
        results[row.name].update(first_call_s=first["seconds"], compiles=first["compiles"])
        print(f"[compile round] {describe(row, first, args.num_inference_steps)}", flush=True)
    probe_times = {name: [] for name in bench.probes}
    for name in bench.probes:
        seconds = bench.time_probe(name)
        print(f"[compile round] probe {name}: {seconds:.3f} s", flush=True)
    for round_index in range(1, args.repeats + 1):
        for row in rows:
            run_result = bench.generate(row)
            if row.forced:
                check_forced_pattern(row, run_result["cached"], args.forced_warmup)
            results[row.name]["runs"].append(run_result)
            print(f"[round {round_index}/{args.repeats}] {describe(row, run_result, args.num_inference_steps)}",
                  flush=True)
        for name in bench.probes:
            probe_times[name] += [bench.time_probe(name) for _ in range(2)]
        print(f"[round {round_index}/{args.repeats}] probes: " + ", ".join(
            f"{name} {statistics.median(times):.3f} s" for name, times in probe_times.items()), flush=True)
    return results, probe_times


def summarize(rows: List[Row], results: Dict[str, dict], probe_times: Dict[str, List[float]],
              args: argparse.Namespace) -> List[dict]:
    """Median per row and the derived columns (speedup, ideal, achieved / ideal)."""
    steps = args.num_inference_steps
    probes = {name: statistics.median(times) for name, times in probe_times.items()}
    graph_total = statistics.median(run["seconds"] for run in results["baseline, graph"]["runs"])
    table = []
    for row in rows:
        runs = results[row.name]["runs"]
        total = statistics.median(run["seconds"] for run in runs)
        cached_counts = sorted({sum(run["cached"]) for run in runs})
        entry = dict(configuration=row.name, mode=row.mode, total_s=total, per_step_s=total / steps,
                     speedup_vs_graph=graph_total / total, cached_steps=cached_counts,
                     first_call_s=results[row.name]["first_call_s"], compiles=results[row.name]["compiles"],
                     peak_host_gib=max(run["peak_bytes"] for run in runs) / GIB,
                     cache=None if row.cache is None else vars(row.cache))
        if row.cache is not None:
            saved = probes["full forward"] - probes["always-computed part F{}B{}".format(*row.blocks)]
            ideal_total = graph_total - statistics.median(sum(run["cached"]) for run in runs) * saved
            entry.update(ideal_speedup=graph_total / ideal_total, achieved_over_ideal=ideal_total / total)
        table.append(entry)
    return table


def markdown(table: List[dict], header: str, args: argparse.Namespace) -> str:
    size = "x".join(map(str, args.image_size))
    lines = [header, "", "| configuration | image size | steps | time per step (s) | total (s) | speedup vs graph "
             "| steps computed / cached | ideal speedup | achieved / ideal | first call (s) | graphs compiled "
             "| peak host memory (GiB) |", "|" + "---|" * 12]
    for entry in table:
        cached = "/".join(map(str, entry["cached_steps"]))
        computed = "/".join(str(args.num_inference_steps - count) for count in entry["cached_steps"])
        ideal = f"{entry['ideal_speedup']:.2f}x" if "ideal_speedup" in entry else "-"
        ratio = f"{entry['achieved_over_ideal']:.3f}" if "achieved_over_ideal" in entry else "-"
        lines.append(f"| {entry['configuration']} | {size} | {args.num_inference_steps} | {entry['per_step_s']:.3f} "
                     f"| {entry['total_s']:.2f} | {entry['speedup_vs_graph']:.2f}x | {computed} / {cached} | {ideal} "
                     f"| {ratio} | {entry['first_call_s']:.2f} | {entry['compiles']} | {entry['peak_host_gib']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE, device_target=args.device_target)
    folder = Path(args.ckpt) if args.ckpt else embedded_checkpoint(args.config)
    pipeline = FluxPipeline.from_pretrained(str(folder), mindspore_dtype=DTYPES[args.dtype])
    args.max_sequence_length = args.max_sequence_length or pipeline.default_sequence_length()
    rows = plan_rows(args)
    config = pipeline.transformer.config
    header = (f"{folder}: {config.num_layers} double + {config.num_single_layers} single blocks, hidden "
              f"{pipeline.transformer.inner_dim}, {args.max_sequence_length} text tokens, {args.dtype}, "
              f"{args.device_target}; median of {args.repeats} rounds after a compile round")
    print(f"{header}\n{len(rows)} configurations: {', '.join(row.name for row in rows)}", flush=True)
    results, probe_times = run(Bench(pipeline, args, rows), rows, args)
    table = summarize(rows, results, probe_times, args)
    text = markdown(table, header, args)
    print(f"\n{text}")
    if args.markdown:
        args.markdown.write_text(text + "\n")
        print(f"wrote {args.markdown}")
    if args.json:
        args.json.write_text(json.dumps(dict(setup=header, arguments={k: str(v) for k, v in vars(args).items()},
                                             table=table, runs=results, probe_times_s=probe_times), indent=2))
        print(f"wrote {args.json}")
    return table


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
