"""Context parallel on this machine and projected onto 8 NPUs: time split into compute and communication,
bytes moved per step and cache memory per rank, for 1 and more ranks.

    python eval/bench_context_parallel.py --config mid --image_size 512 512 --ranks 1 2

Each rank count runs in its own launch (1: a plain process; N > 1: `msrun --worker_num N`) of this script
as its ranks, which time, on the random-weight `mid` transformer with `--image_size` and
`--text_tokens`:
- the uncached forward (split, gathered: what one denoising step costs every rank),
- the same collectives alone (every attention layer's key and value all-gather and the output gather, at
  the same shapes) — the communication part; compute is the difference;
and reports the bytes each rank receives per step and the bytes of one cache context's buffers on a rank.
The parent prints the table, writes it to `--out` (markdown + JSON) and projects FLUX.1-dev at
1024x1024 on 8 NPUs from the reference example's single-NPU time and an assumed all-gather bandwidth.

On this 2-core CPU the ranks share the two cores (one rank: 2 threads; two ranks: one core each), so
the CPU times show the split's overhead, not a speedup.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

from eval.cli_common import check_count, check_image_size  # noqa: E402
from models.demo_configs import TRANSFORMER_CONFIGS  # noqa: E402

MIB = 2 ** 20
# FLUX.1-dev at 1024x1024: 19 double + 38 single blocks, hidden 3072, 4096 image and 512 text tokens,
# bf16; one Atlas 800T A2 NPU in graph mode takes 12.7 s for 28 steps (the MindSpore reference example's
# speed table): 0.454 s per step.
FLUX_DEV = dict(blocks=57, hidden=3072, image_tokens=4096, text_tokens=512, out_channels=64, dtype_bytes=2,
                step_s=12.7 / 28)
ASSUMED_BANDWIDTHS_GBPS = (25, 50, 100, 200)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(TRANSFORMER_CONFIGS), default="mid")
    parser.add_argument("--image_size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--text_tokens", type=int, default=128)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="rank counts to launch")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "eval" / "results" / "context_parallel",
                        help="output stem: .md and .json are written")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "outputs" / "context_parallel",
                        help="folder for each launch's per-rank records and msrun logs")
    # Internal: measure as one rank of a launch of this many ranks. (No flag may abbreviate one of msrun's
    # own, such as --worker_num: msrun's parser would take it.)
    parser.add_argument("--as_rank_of", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_image_size(parser, args.image_size)
    check_count(parser, "--text_tokens", args.text_tokens)
    check_count(parser, "--repeats", args.repeats)
    image_tokens = (args.image_size[0] // 16) * (args.image_size[1] // 16)
    for ranks in args.ranks:
        check_count(parser, "--ranks", ranks)
        if image_tokens % ranks or args.text_tokens % ranks:
            parser.error(f"--ranks {ranks} must divide the image tokens ({image_tokens}) and --text_tokens "
                         f"({args.text_tokens})")
    return args


def received_bytes_per_step(blocks: int, hidden: int, image_tokens: int, text_tokens: int, out_channels: int,
                            ranks: int, dtype_bytes: int, batch: int = 1) -> int:
    """Bytes one rank receives in one uncached step: every attention layer gathers the other ranks' keys and
    values of the joint sequence, and the output is gathered once. (The diff's all-reduce adds 2 scalars.)"""
    others = (ranks - 1) / ranks
    keys_values = 2 * batch * (image_tokens + text_tokens) * hidden * dtype_bytes * others
    output = batch * image_tokens * out_channels * dtype_bytes * others
    return int(blocks * keys_values + output)


def median_seconds(call, repeats: int) -> float:
    call()  # compiles
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def worker(args: argparse.Namespace) -> None:
    """Measure on this rank and write its JSON line."""
    import mindspore as ms
    from mindspore import nn, ops

    from eval.bench_common import flux_inputs, to_mindspore
    from models.context_parallel import ContextParallelForward, GatherTokens, enable_context_parallel, join_msrun
    from models.embedded import embedded_checkpoint
    from models.transformer_flux import FluxTransformer2DModel, num_blocks
    from utils import CacheContext

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ranks = args.as_rank_of
    split = join_msrun(ranks) if ranks > 1 else None
    config = TRANSFORMER_CONFIGS[args.config]
    model = FluxTransformer2DModel.from_pretrained(str(embedded_checkpoint(args.config)), subfolder="transformer")
    inputs = to_mindspore(flux_inputs(config, args.image_size, args.text_tokens, 1))
    forward = model
    if split is not None:
        enable_context_parallel(model)
        forward = ContextParallelForward(model, split)
    image_tokens = inputs["hidden_states"].shape[1]
    blocks, hidden = num_blocks(model), model.inner_dim
    heads = config["num_attention_heads"]
    local_joint = (image_tokens + args.text_tokens) // ranks

    class CollectivesAlone(nn.Cell):
        """The forward's collectives at its shapes, distinct inputs so that none is merged with another."""

        def __init__(self):
            super().__init__()
            self.gather_heads, self.gather_tokens = GatherTokens(2), GatherTokens(1)

        def construct(self, key, output):
            total = output.sum()
            for layer in range(2 * blocks):
                total = total + self.gather_heads(key + layer).sum()
            return total + self.gather_tokens(output).sum()

    forward_s = median_seconds(lambda: forward(**inputs)[0].asnumpy(), args.repeats)
    communication_s = 0.0
    if split is not None:
        collectives = CollectivesAlone()
        key = ops.ones((1, heads, local_joint, hidden // heads), ms.float32)
        output = ops.ones((1, image_tokens // ranks, config["in_channels"]), ms.float32)
        communication_s = median_seconds(lambda: collectives(key, output).asnumpy(), args.repeats)
    context = CacheContext(1, image_tokens // ranks, hidden, text_seq_len=args.text_tokens // ranks,
                           context_parallel=ranks > 1)
    cache_bytes = sum(param.size * param.itemsize for param in context.get_parameters())
    record = dict(ranks=ranks, rank=0 if split is None else split.rank, forward_s=forward_s,
                  communication_s=communication_s, compute_s=forward_s - communication_s,
                  received_bytes_per_step=received_bytes_per_step(blocks, hidden, image_tokens, args.text_tokens,
                                                                  config["in_channels"], ranks, 4),
                  cache_bytes=int(cache_bytes))
    args.runs.mkdir(parents=True, exist_ok=True)
    (args.runs / f"ranks{ranks}_rank{record['rank']}.json").write_text(json.dumps(record))
    print(json.dumps(record), flush=True)


def launch(args: argparse.Namespace, ranks: int, folder: Path) -> List[dict]:
    """Run the worker in its own launch and read back every rank's record."""
    from msrun_launch import msrun_command, msrun_env

    worker_args = ["--as_rank_of", str(ranks), "--runs", str(folder), "--config", args.config,
                   "--image_size", *map(str, args.image_size), "--text_tokens", str(args.text_tokens),
                   "--repeats", str(args.repeats), "--ranks", str(ranks)]
    script = Path(__file__).resolve()
    command = ([sys.executable, str(script), *worker_args] if ranks == 1
               else msrun_command(script, worker_args, ranks, folder / f"logs{ranks}"))
    print(f"launching {ranks} rank(s) ...", flush=True)
    result = subprocess.run(command, capture_output=True, text=True, env=msrun_env())
    if result.returncode != 0:
        sys.exit(f"error: the {ranks}-rank launch failed (logs in {folder}):\n{result.stderr[-2000:]}")
    return [json.loads((folder / f"ranks{ranks}_rank{rank}.json").read_text()) for rank in range(ranks)]


def measured_table(records: List[dict]) -> str:
    lines = ["| ranks | rank | forward s | communication s (collectives alone) | compute s | MiB received per step "
             "| cache state MiB per rank |", "|---|---|---|---|---|---|---|"]
    for record in records:
        lines.append(f"| {record['ranks']} | {record['rank']} | {record['forward_s']:.3f} | "
                     f"{record['communication_s']:.3f} | {record['compute_s']:.3f} | "
                     f"{record['received_bytes_per_step'] / MIB:.1f} | {record['cache_bytes'] / MIB:.1f} |")
    return "\n".join(lines)


def projection(ranks: int = 8) -> Dict[str, object]:
    """FLUX.1-dev 1024x1024 on `ranks` NPUs: compute split evenly (every part of a step scales with the
    local tokens, attention too: local queries against all keys), communication at each assumed bandwidth,
    without and with full overlap."""
    dev = FLUX_DEV
    received = received_bytes_per_step(dev["blocks"], dev["hidden"], dev["image_tokens"], dev["text_tokens"],
                                       dev["out_channels"], ranks, dev["dtype_bytes"])
    compute_s = dev["step_s"] / ranks
    rows = []
    for bandwidth in ASSUMED_BANDWIDTHS_GBPS:
        communication_s = received / (bandwidth * 1e9)
        rows.append(dict(bandwidth_gbps=bandwidth, communication_ms=communication_s * 1e3,
                         compute_ms=compute_s * 1e3,
                         speedup_no_overlap=dev["step_s"] / (compute_s + communication_s),
                         speedup_full_overlap=dev["step_s"] / max(compute_s, communication_s)))
    return dict(ranks=ranks, received_mib_per_step=received / MIB, single_npu_step_s=dev["step_s"], rows=rows)


def projection_table(projected: Dict[str, object]) -> str:
    lines = [f"FLUX.1-dev 1024x1024 bf16 on {projected['ranks']} NPUs: each rank receives "
             f"{projected['received_mib_per_step']:.0f} MiB per uncached step; one NPU takes "
             f"{projected['single_npu_step_s'] * 1e3:.0f} ms per step.", "",
             "| assumed all-gather GB/s per rank | communication ms | compute ms | step speedup (no overlap) | "
             "(full overlap) |", "|---|---|---|---|---|"]
    for row in projected["rows"]:
        lines.append(f"| {row['bandwidth_gbps']} | {row['communication_ms']:.1f} | {row['compute_ms']:.1f} | "
                     f"{row['speedup_no_overlap']:.2f}x | {row['speedup_full_overlap']:.2f}x |")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    if args.as_rank_of is not None:
        worker(args)
        return
    from models.embedded import embedded_checkpoint

    embedded_checkpoint(args.config)  # created once here, not by every rank at the same time
    records = [record for ranks in args.ranks for record in launch(args, ranks, args.runs)]
    projected = projection()
    command = "python eval/bench_context_parallel.py " + " ".join(sys.argv[1:] if argv is None else argv)
    report = (f"# Context parallel\n\n`{command}` ({args.config}, {args.image_size[0]}x{args.image_size[1]}, "
              f"{args.text_tokens} text tokens, fp32, CPU, median of {args.repeats})\n\n"
              f"{measured_table(records)}\n\n{projection_table(projected)}\n")
    print("\n" + report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(report)
    args.out.with_suffix(".json").write_text(json.dumps(dict(measured=records, projection=projected), indent=2))
    print(f"wrote {args.out.with_suffix('.md')} and .json")


if __name__ == "__main__":
    main()
