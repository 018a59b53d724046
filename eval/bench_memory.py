"""Host memory of the portable model on CPU: what one compiled graph holds, against what its tensors need.

    python eval/bench_memory.py --config mid --image_sizes 256 512 768

Each image size runs in a fresh process (resident memory never shrinks back, so one process cannot tell
one graph from the next): the resident set after MindSpore's import, after loading the transformer,
after the first graph-mode forward (the compile and its buffers), after a second forward of the same
graph, and after the first forward of a second graph on the same weights (a First-Block Cache wrapper,
as the pipeline compiles one per CFG branch). Beside them, the bytes the tensors need: the weights, the
largest set of activations alive at once (one block's attention scores and probabilities plus the block's
widest hidden tensors) and the cache state of one context, per image token.

Why: the speed table reported 12.9 GiB for the mid pipeline at 512x512 whatever the row. Measured here
(mid, 512x512), each compiled graph kept 2.1-2.6 GiB against 0.12 GiB of widest activations, whatever
`ms.runtime.set_memory` and `memory_optimize_level` said: MindSpore's CPU Add/Sub/Mul kernels keep two
size_t index tables of the output's size (4x an fp32 output) for every broadcasting launch, for the
graph's lifetime. With the model's broadcasts made explicit (`models.layers.broadcast`) a graph keeps
0.94 GiB (first) and 0.37 GiB (second), and loading adds 0.88 GiB for 0.80 GiB of weights (1.60 with
mindone's `load_file`); the printed table is the evidence, docs/benchmarks.md "Host memory" the details.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from eval.cli_common import quiet_imports  # noqa: E402
from models.demo_configs import TRANSFORMER_CONFIGS  # noqa: E402

GIB = 2 ** 30
STAGES = ("imported", "loaded", "first forward", "second forward", "second graph")


def child(config_name: str, image_size: int, text_tokens: int) -> Dict[str, float]:
    """Resident bytes after each stage, in this fresh process."""
    with quiet_imports(verbose=False):
        import mindspore as ms
        from eval.bench_common import PeakHostMemory, flux_inputs, to_mindspore
        from models.embedded import embedded_checkpoint
        from models.transformer_flux import FluxTransformer2DModel
        from models.transformer_flux_withFBCache import FBCachedTransformer
        from utils import CacheContext
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    resident = {"imported": PeakHostMemory.resident_bytes()}
    model = FluxTransformer2DModel.from_pretrained(str(embedded_checkpoint(config_name)), subfolder="transformer")
    resident["loaded"] = PeakHostMemory.resident_bytes()
    inputs = to_mindspore(flux_inputs(model.config, (image_size, image_size), text_tokens, batch_size=1))
    for stage in ("first forward", "second forward"):
        model(*inputs.values())[0].asnumpy()
        resident[stage] = PeakHostMemory.resident_bytes()
    tokens = (image_size // 16) ** 2
    context = CacheContext(1, tokens, model.inner_dim, residual_diff_threshold=0.0)
    FBCachedTransformer(model, context)(*inputs.values())[0].asnumpy()
    resident["second graph"] = PeakHostMemory.resident_bytes()
    weights = sum(parameter.nbytes for parameter in model.get_parameters())
    cache_state = sum(parameter.nbytes for parameter in context.get_parameters())
    return dict(resident, weights=weights, cache_state=cache_state, tokens=tokens)


def measure_in_fresh_process(script: str, args: List[str], label: str) -> dict:
    """The JSON row that `script args` prints last, run in a new Python process: resident memory never
    shrinks, so each measurement needs a process that has held nothing else."""
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"the {label} measurement failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def needed_activations(config: dict, image_tokens: int, text_tokens: int) -> int:
    """fp32 bytes alive at the widest point of a forward: one block's attention scores and probabilities
    (heads x L x L, twice) plus its input, q, k, v, attention output and MLP hidden (4x) streams."""
    length = image_tokens + text_tokens
    heads, inner = config["num_attention_heads"], config["num_attention_heads"] * config["attention_head_dim"]
    return 4 * (2 * heads * length * length + (5 + 4) * length * inner)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=sorted(TRANSFORMER_CONFIGS), default="mid")
    parser.add_argument("--image_sizes", type=int, nargs="+", default=[256, 512, 768],
                        help="square image sizes in pixels, multiples of 16 (default: 256 512 768)")
    parser.add_argument("--text_tokens", type=int, default=128)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if any(size <= 0 or size % 16 for size in args.image_sizes):
        parser.error(f"--image_sizes must be positive multiples of 16, got {args.image_sizes}")
    if args.text_tokens < 1:
        parser.error(f"--text_tokens must be >= 1, got {args.text_tokens}")
    return args


def main(argv=None) -> List[dict]:
    args = parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args.config, args.child, args.text_tokens)))
        return []
    config = TRANSFORMER_CONFIGS[args.config]
    rows = []
    for size in args.image_sizes:
        print(f"{size}x{size}: measuring in a fresh process ...", file=sys.stderr, flush=True)
        row = measure_in_fresh_process(__file__, ["--config", args.config, "--child", str(size),
                                                  "--text_tokens", str(args.text_tokens)], f"{size}x{size}")
        row["size"] = size
        row["needed"] = needed_activations(config, row["tokens"], args.text_tokens)
        rows.append(row)
    print(f"{args.config} transformer, {args.text_tokens} text tokens, fp32, CPU graph mode; resident memory in GiB\n")
    print("| image | tokens | imported | + weights loaded | + first graph's forward | + same graph again "
          "| + second graph | weights | widest activations | per graph per image token | cache state per image token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        resident = [row[stage] for stage in STAGES]
        graph = row["first forward"] - row["loaded"]
        print(f"| {row['size']}x{row['size']} | {row['tokens']} | {resident[0] / GIB:.2f} | "
              f"{(resident[1] - resident[0]) / GIB:+.2f} | {graph / GIB:+.2f} | "
              f"{(resident[3] - resident[2]) / GIB:+.2f} | {(resident[4] - resident[3]) / GIB:+.2f} | "
              f"{row['weights'] / GIB:.2f} | {row['needed'] / GIB:.2f} | "
              f"{graph / row['tokens'] / 2 ** 20:.2f} MiB | {row['cache_state'] / row['tokens'] / 2 ** 10:.1f} KiB |")
    return rows


if __name__ == "__main__":
    main()
