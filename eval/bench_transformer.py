"""Time one Flux transformer forward pass in MindSpore GRAPH and PYNATIVE mode (and diffusers/torch eager).

With no arguments it runs on the embedded demo checkpoint (a small random-weight model it creates on
first use). `--config mid` uses a larger random-weight configuration (3 double + 6 single blocks,
hidden 1024) and `--ckpt` any diffusers-format FLUX folder. Prints a Markdown table; `--json` saves it.
"""

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import mindspore as ms  # noqa: E402

from eval.bench_common import flux_inputs, time_calls, to_mindspore  # noqa: E402
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
    parser.add_argument("--repeats", type=int, default=5, help="timed forward passes after the first call")
    parser.add_argument("--torch", action="store_true", help="also time diffusers' torch model (eager, CPU)")
    parser.add_argument("--json", type=Path, help="write the results to this JSON file")
    parser.add_argument("--device_target", default="CPU", choices=DEVICE_TARGETS)
    args = parser.parse_args(argv)
    size = args.image_size or DEFAULT_IMAGE_SIZE.get(args.config, (256, 256))
    check_image_size(parser, size)
    if args.repeats < 1 or args.text_tokens < 1 or args.batch_size < 1:
        parser.error("--repeats, --text_tokens and --batch_size must be at least 1")
    check_dtype_device(parser, args.dtype, args.device_target)
    args.image_size = size
    return args


def time_mindspore(folder: Path, inputs: dict, args: argparse.Namespace, mode: str) -> dict:
    ms.set_context(mode=MODES[mode])
    model = FluxTransformer2DModel.from_pretrained(str(folder), subfolder="transformer",
                                                   mindspore_dtype=DTYPES[args.dtype])
    tensors = to_mindspore(inputs)
    result = time_calls(lambda: model(**tensors)[0].asnumpy(), args.repeats, f"mindspore {mode}")
    result["compiles"] = len(model.compile_cache) if mode == "graph" else 0
    return result


def time_torch(folder: Path, inputs: dict, args: argparse.Namespace) -> dict:
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

    result = time_calls(call, args.repeats, "torch eager")
    result["compiles"] = 0
    return result


def print_table(rows: dict, header: str) -> None:
    print(f"\n{header}\n")
    print("| backend | first call (s) | median forward (s) | graph compiles | speedup vs mindspore pynative |")
    print("|---|---|---|---|---|")
    baseline = rows.get("mindspore pynative", {}).get("median_s")
    for name, row in rows.items():
        speedup = f"{baseline / row['median_s']:.2f}x" if baseline else "-"
        print(f"| {name} | {row['first_call_s']:.2f} | {row['median_s']:.3f} | {row['compiles']} | {speedup} |")


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
              f"{tokens} image + {args.text_tokens} text tokens, {args.dtype}, {args.device_target}")
    print(header, flush=True)
    rows = {}
    for mode in args.modes:
        rows[f"mindspore {mode}"] = time_mindspore(folder, inputs, args, mode)
    if args.torch:
        rows["diffusers torch eager"] = time_torch(folder, inputs, args)
    print_table(rows, header)
    if args.json:
        args.json.write_text(json.dumps({"setup": header, "results": rows}, indent=2))
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError) as error:
        sys.exit(f"error: {error}")
