"""Time one Flux transformer forward pass in MindSpore GRAPH and PYNATIVE mode (and diffusers/torch eager).

With no arguments it runs on the embedded demo checkpoint (a small random-weight model it creates on
first use). `--config mid` uses a larger random-weight configuration (3 double + 6 single blocks,
hidden 1024) and `--ckpt` any diffusers-format FLUX folder. Prints a Markdown table; `--json` saves it.

The backends are timed round by round (one forward of each per round, the order rotating), so drift of
a shared machine reaches all of them alike, after `--warmup` untimed rounds: MindSpore's CPU kernels
choose their thread blocking by timing their first launches (`ParallelLaunchAutoSearch`), the first 5
of them single-threaded, so a process's first forwards run slower (mid, 2 cores: about 3.1 s, then 2.15 s,
before this branch's op changes). Each median is also given as a fraction of the machine's matmul
peak: the forward's matmul FLOPs per second over the best rate of large fp32 matmuls measured before
and after the rounds in the frameworks under test. The header gives the 1-minute load average before
the run (other jobs) and after it (about 2 of it the benchmark's own threads): on a shared machine,
torch eager loses more to another job than MindSpore graph does (mid: 1.3 -> 6.4 s against 2.1 -> 4.1 s),
so a loaded run flatters MindSpore.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mindspore as ms  # noqa: E402
from mindspore import nn, ops  # noqa: E402

from eval.bench_common import flux_inputs, timed, to_mindspore  # noqa: E402
from eval.cli_common import DEVICE_TARGETS, DTYPE_NAMES, check_dtype_device, check_image_size  # noqa: E402
from models.demo_configs import TRANSFORMER_CONFIGS  # noqa: E402
from models.embedded import embedded_checkpoint  # noqa: E402
from models.loading import CheckpointError, model_folder, read_config  # noqa: E402
from models.transformer_flux import REQUIRED_CONFIG_KEYS, FluxTransformer2DModel  # noqa: E402
from pipeline_flux import DTYPES  # noqa: E402

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}
DEFAULT_IMAGE_SIZE = {"demo": (256, 256), "mid": (512, 512)}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", help="diffusers-format FLUX folder (with transformer/); default: embedded")
    parser.add_argument("--config", choices=sorted(TRANSFORMER_CONFIGS), default="demo",
                        help="random-weight configuration used when --ckpt is not given")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"),
                        help="image size in pixels, multiples of 16 (default 256 256 demo, 512 512 mid)")
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=["graph", "pynative"])
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after the first call of each backend")
    parser.add_argument("--warmup", type=int, default=5,
                        help="untimed rounds after the first call of each backend (default 5)")
    parser.add_argument("--torch", action="store_true", help="also time diffusers' torch model (eager, CPU)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--device_target", default="CPU", choices=DEVICE_TARGETS)
    args = parser.parse_args(argv)
    size = args.image_size or DEFAULT_IMAGE_SIZE.get(args.config, (256, 256))
    check_image_size(parser, size)
    if args.repeats < 1 or args.text_tokens < 1 or args.batch_size < 1 or args.warmup < 0:
        parser.error("--repeats, --text_tokens and --batch_size must be at least 1, --warmup at least 0")
    check_dtype_device(parser, args.dtype, args.device_target)
    args.image_size = size
    return args


def forward_flops(config: dict, image_tokens: int, text_tokens: int, batch: int) -> float:
    """Matmul FLOPs of one forward: every block costs 24 L d^2 (projections and MLP) + 4 L^2 d (QK^T and
    AV) for L joint tokens and hidden size d (tests/test_cache_peers_table.py checks this against
    diffusers' layers), plus the input embedders and the output projection. The per-image modulation
    vectors (under 0.1% at mid) are left out."""
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    joint = image_tokens + text_tokens
    block = 24 * joint * dim * dim + 4 * joint * joint * dim
    out_channels = config.get("out_channels") or config["in_channels"]
    edges = 2 * dim * (image_tokens * (config["in_channels"] + out_channels) + text_tokens * config["joint_attention_dim"])
    return batch * ((config["num_layers"] + config["num_single_layers"]) * block + edges)


class MatmulChain(nn.Cell):
    """`count` dependent matmuls in one graph (a graph would compute repeated independent ones once)."""

    def __init__(self, count: int):
        super().__init__()
        self.count = count

    def construct(self, x, weight):
        for _ in range(self.count):
            x = ops.matmul(x, weight)
        return x


def matmul_peak(use_torch: bool, size: int = 2048, count: int = 4, repeats: int = 5) -> Dict[str, float]:
    """Best FLOP/s of chained (size x size) fp32 matmuls in MindSpore graph mode (and torch), each the
    fastest of `repeats`. Graph mode, because MindSpore's PyNative matmul is slower: 150 against 250-290
    GFLOP/s on this 2-core Xeon (torch: 320-350)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size)).astype(np.float32)
    weight = (rng.standard_normal((size, size)) / np.sqrt(size)).astype(np.float32)  # keeps the scale
    flops = 2.0 * size ** 3 * count
    ms.set_context(mode=ms.GRAPH_MODE)
    chain, x_ms, weight_ms = MatmulChain(count), ms.Tensor(x), ms.Tensor(weight)
    chain(x_ms, weight_ms).asnumpy()
    rates = {"mindspore": flops / min(timed(lambda: chain(x_ms, weight_ms).asnumpy()) for _ in range(repeats))}
    if use_torch:
        import torch

        x_torch, weight_torch = torch.from_numpy(x), torch.from_numpy(weight)

        def torch_chain():
            y = x_torch
            for _ in range(count):
                y = torch.matmul(y, weight_torch)

        torch_chain()
        rates["torch"] = flops / min(timed(torch_chain) for _ in range(repeats))
    return rates


def mindspore_call(folder: Path, inputs: dict, args: argparse.Namespace, mode: str):
    """A forward in `mode` that blocks until the output is on the host, and its model (for the compile count)."""
    ms.set_context(mode=MODES[mode])
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer",
                                                   mindspore_dtype=DTYPES[args.dtype])
    tensors = to_mindspore(inputs)

    def call():
        ms.set_context(mode=MODES[mode])
        model(**tensors)[0].asnumpy()

    return call, model


def torch_call(folder: Path, inputs: dict, args: argparse.Namespace) -> Callable[[], None]:
    try:
        import torch
        from diffusers import FluxTransformer2DModel as TorchFluxTransformer
    except ImportError as error:
        raise SystemExit(f"--torch needs torch and diffusers (pip install -r requirements-test.txt): {error}")
    dtype = getattr(torch, args.dtype)
    model = TorchFluxTransformer.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype).eval()
    tensors = {name: None if value is None else torch.from_numpy(value) for name, value in inputs.items()}
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections"):
        tensors[name] = tensors[name].to(dtype)

    def call():
        with torch.no_grad():
            model(**tensors, return_dict=False)

    return call


def time_interleaved(calls: Dict[str, Callable[[], None]], repeats: int, warmup: int) -> Dict[str, dict]:
    """First call of each backend (compile + run), `warmup` untimed rounds, then `repeats` rounds of one
    call each, the order rotating by one every round; per backend the first call, the median and the range."""
    names = list(calls)
    first = {}
    for name in names:
        first[name] = timed(calls[name])
        print(f"  {name}: first call (compile + run) {first[name]:.2f} s", flush=True)
    for round_index in range(warmup):
        print(f"  warm-up round {round_index + 1}/{warmup}: "
              + ", ".join(f"{name} {timed(calls[name]):.3f} s" for name in names), flush=True)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed(calls[name]))
        print(f"  round {round_index + 1}/{repeats}: "
              + ", ".join(f"{name} {times[name][-1]:.3f} s" for name in names), flush=True)
    return {name: {"first_call_s": first[name], "median_s": statistics.median(times[name]),
                   "min_s": min(times[name]), "max_s": max(times[name]), "times_s": times[name]} for name in names}


def print_table(rows: dict, header: str, peak: float) -> None:
    print(f"\n{header}\n")
    torch_median = rows.get("diffusers torch eager", {}).get("median_s")
    print("| backend | first call (s) | median forward (s) | range (s) | fraction of matmul peak | graph compiles "
          "| speedup vs mindspore pynative | time vs torch |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = rows.get("mindspore pynative", {}).get("median_s")
    for name, row in rows.items():
        speedup = f"{baseline / row['median_s']:.2f}x" if baseline else "-"
        versus_torch = f"{row['median_s'] / torch_median:.2f}" if torch_median else "-"
        print(f"| {name} | {row['first_call_s']:.2f} | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} "
              f"| {row['gflops'] * 1e9 / peak:.2f} | {row['compiles']} | {speedup} | {versus_torch} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    ms.set_context(device_target=args.device_target)
    if args.ckpt:
        folder = Path(args.ckpt)
    else:
        folder = embedded_checkpoint(args.config)
    config = read_config(model_folder(str(folder), "transformer"), "FluxTransformer2DModel", REQUIRED_CONFIG_KEYS)
    inputs = flux_inputs(config, args.image_size, args.text_tokens, args.batch_size)
    tokens = inputs["hidden_states"].shape[1]
    header = (f"{folder}: {config['num_layers']} double + {config['num_single_layers']} single blocks, hidden "
              f"{config['num_attention_heads'] * config['attention_head_dim']}, batch {args.batch_size}, "
              f"{tokens} image + {args.text_tokens} text tokens, {args.dtype}, {args.device_target}, "
              f"{args.warmup} warm-up + {args.repeats} timed rounds")
    flops = forward_flops(config, tokens, args.text_tokens, args.batch_size)
    header += f"; {flops / 1e9:.2f} GFLOP of matmuls per forward"
    print(header, flush=True)
    load_before = Path("/proc/loadavg").read_text().split()[0]
    peaks = matmul_peak(args.torch)
    calls, models = {}, {}
    for mode in args.modes:
        calls[f"mindspore {mode}"], models[mode] = mindspore_call(folder, inputs, args, mode)
    if args.torch:
        calls["diffusers torch eager"] = torch_call(folder, inputs, args)
    rows = time_interleaved(calls, args.repeats, args.warmup)
    # The peak is measured again after the rounds and the best kept: one measurement under another job's
    # load reads low and would inflate every fraction.
    peaks = {name: max(rate, peaks[name]) for name, rate in matmul_peak(args.torch).items()}
    peak = max(peaks.values())
    header += ("; best matmul rate " + ", ".join(f"{name} {rate / 1e9:.0f}" for name, rate in peaks.items())
               + " GFLOP/s (chained 2048^3 fp32 matmuls); 1-minute load average "
               + f"{load_before} before, {Path('/proc/loadavg').read_text().split()[0]} after")
    for name, row in rows.items():
        row["compiles"] = len(models["graph"].compile_cache) if name == "mindspore graph" else 0
        row["gflops"] = flops / row["median_s"] / 1e9
    print_table(rows, header, peak)
    if args.json:
        result = {"setup": header, "forward_gflop": flops / 1e9, "matmul_peak_gflops": {
            name: rate / 1e9 for name, rate in peaks.items()}, "results": rows}
        args.json.write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError) as error:
        sys.exit(f"error: {error}")
