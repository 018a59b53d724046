"""One generation per cache setting on the shipped emoji-world Flux, saved for comparison across launches.

    python tests/context_parallel_job.py --out DIR                      # one process
    msrun --worker_num 2 --local_worker_num 2 --join True tests/context_parallel_job.py --out DIR --ranks 2

Each rank writes `DIR/rank<r>.npz`: for every setting the float image (before rounding to 8 bits, so
differences of 1e-6 are visible), each CFG branch's per-step diffs and decisions, and the number of
graphs compiled. tests/
test_context_parallel.py compares a 2-rank launch with one process; a user can run the same check on
their own devices.
"""

import argparse
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

import mindspore as ms  # noqa: E402

from cache_config import FBCacheConfig  # noqa: E402
from models.embedded import embedded_checkpoint, generation_defaults  # noqa: E402

# Thresholds that hit on this model within a few steps; bn=1 exercises the cached text residual,
# order 2 the forecast buffers, sync the follower context (so that setting runs the CFG branches as two
# calls; the others as one batch).
SETTINGS: Dict[str, Optional[FBCacheConfig]] = {
    "uncached": None,
    "fbcache_0.2_order1": FBCacheConfig(residual_diff_threshold=0.2, taylorseer_derivative=1),
    "fbcache_0.3_order2_bn1_sync": FBCacheConfig(residual_diff_threshold=0.3, taylorseer_derivative=2,
                                                 bn_compute_blocks=1, sync_cfg_branches=True),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for rank<r>.npz")
    parser.add_argument("--ranks", type=int, default=1, help="context-parallel ranks (the msrun worker count)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--image_size", type=int, nargs=2, default=(128, 128), metavar=("H", "W"))
    return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    from pipeline_flux import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(str(embedded_checkpoint()), context_parallel=args.ranks)
    defaults = generation_defaults(False)
    arrays = {}
    for name, cache in SETTINGS.items():
        output = pipeline(defaults["prompt"], negative_prompt="", true_cfg_scale=defaults["true_cfg_scale"],
                          height=args.image_size[0], width=args.image_size[1], num_inference_steps=args.steps,
                          seed=0, output_type="np", cache=cache,
                          batch_cfg=not (cache is not None and cache.sync_cfg_branches))
        arrays[f"{name}/image"] = output.images[0]
        for branch, summary in output.cache_summaries.items():
            arrays[f"{name}/{branch}/diffs"] = np.asarray(summary["diffs"])
            arrays[f"{name}/{branch}/cached"] = np.asarray(summary["cached"])
    arrays["compiled_graphs"] = np.asarray(pipeline.compiled_graphs())
    rank = 0 if pipeline.token_split is None else pipeline.token_split.rank
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez(args.out / f"rank{rank}.npz", **arrays)
    print(f"rank {rank}: wrote {args.out / f'rank{rank}.npz'}", flush=True)


if __name__ == "__main__":
    main()
