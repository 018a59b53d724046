"""One process of tests/test_compile_cache.py: the shipped model's cached true-CFG pipeline at the given
sizes, images saved to an .npz, and what the compile cache did printed as one JSON line.

A separate process per run, because MindSpore's compile cache lives for the process (its folder is fixed
at the first compile and its entries are numbered by a per-process counter).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import mindspore as ms  # noqa: E402

from models.embedded import SHIPPED_PIPELINE  # noqa: E402
from pipeline_flux import FBCacheConfig, FluxPipeline  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", nargs="+", default=["64x64"], help="one pipeline call per HxW, in order")
    parser.add_argument("--no_compile_cache", action="store_true")
    parser.add_argument("--fn_compute_blocks", type=int, default=1)
    parser.add_argument("--folder", default=str(SHIPPED_PIPELINE))
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    pipeline = FluxPipeline.from_pretrained(args.folder, compile_cache=not args.no_compile_cache)
    cache = FBCacheConfig(residual_diff_threshold=0.08, fn_compute_blocks=args.fn_compute_blocks)
    images = {}
    for size in args.sizes:
        height, width = map(int, size.split("x"))
        output = pipeline("a large red apple in the center, on a white background", negative_prompt="",
                          true_cfg_scale=4.0, height=height, width=width, num_inference_steps=3, seed=0,
                          output_type="np", cache=cache)
        images[size] = np.stack(output.images)
    np.savez(args.out, **images)
    compile_cache = pipeline.compile_cache
    print(json.dumps({} if compile_cache is None else dict(
        enabled=compile_cache.enabled, note=compile_cache.note, positions=compile_cache.position,
        folder=str(compile_cache.shared), stored=compile_cache.stored, compile_seconds=pipeline.timings["compile"])))


if __name__ == "__main__":
    main()
