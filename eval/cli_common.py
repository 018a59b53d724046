"""Command-line pieces the scripts share: the cache flags (defaults from `FBCacheConfig`), the
size / dtype / device checks, and quiet imports of MindSpore and its friends.

Nothing here imports MindSpore: a script parses and checks its arguments first, so `--help` and a bad
flag answer in about 0.3 s instead of the 9-10 s MindSpore and mindone take to import, and a bad
setting fails before minutes of loading real weights.
"""

import argparse
import contextlib
import io
import logging
import os
import warnings
from typing import Iterator, Sequence

from cache_config import FBCacheConfig, INT32_MAX, MAX_TAYLOR_ORDER
from eval.device_check import TARGETS as DEVICE_TARGETS  # noqa: F401 (re-exported: the scripts' choices)

DTYPE_NAMES = ("bfloat16", "float16", "float32")
# T5 tokens FLUX.1 reads at most (pipeline_flux.MAX_SEQUENCE_LENGTH; a test keeps the two equal).
MAX_SEQUENCE_LENGTH = 512
# Height and width: 8x VAE downsampling, then 2x2 packing of latent patches into tokens.
SIZE_MULTIPLE = 16
QUIET_LIBRARIES = ("mindone", "mindspore", "transformers")
# numpy's default_rng takes any non-negative int; the CLI keeps seeds in uint64 so they print and store.
MAX_SEED = 2 ** 64 - 1


def add_cache_arguments(parser: argparse.ArgumentParser, defaults: FBCacheConfig = FBCacheConfig()) -> None:
    """The First-Block Cache flags, one per `FBCacheConfig` field, with its defaults."""
    group = parser.add_argument_group("First-Block Cache")
    group.add_argument("--residual_diff_threshold", type=float, default=defaults.residual_diff_threshold,
                       help="cache a step when the first-block residual changed less than this; <= 0 never caches. "
                            "Measured on the shipped model (28 steps, README 'Our cache against every peer'): "
                            "0.04 with --taylorseer_derivative 1 --verify_forecast --sync_cfg_branches saves 1.56x "
                            "of the block compute at 51 dB PSNR; 0.08 plain saves 1.55x at 45 dB; 100 with "
                            "--skips_after_compute 2 --max_continuous_cached_steps 2 --warmup_steps 6 "
                            "--sync_cfg_branches (every 3rd step computed) saves 2.15x at 44.7 dB; with 5 and "
                            "--warmup_steps 3, 4.00x at 32.2 dB")
    group.add_argument("--taylorseer_derivative", type=int, default=defaults.taylorseer_derivative,
                       help=f"forecast order 0-{MAX_TAYLOR_ORDER} of the cached residual (0 = plain reuse)")
    group.add_argument("--forecast_space", choices=("step", "sigma"), default=defaults.forecast_space,
                       help="variable of the forecast polynomial: step index, or the scheduler's sigma (ODE time)")
    group.add_argument("--verify_forecast", action="store_true", default=defaults.verify_forecast,
                       help="gate on the probe residual's own forecast error instead of its raw change")
    group.add_argument("--skip_probe_steps", type=int, default=defaults.skip_probe_steps,
                       help="after a cache hit, up to this many steps run no block at all (the first-block "
                            "residual is forecast too); needs --bn_compute_blocks 0")
    group.add_argument("--skips_after_compute", type=int, default=defaults.skips_after_compute,
                       help="after a computed step, up to this many steps run no block at all (no probe; as "
                            "MagCache and TaylorSeer lite skip); needs --bn_compute_blocks 0")
    group.add_argument("--sync_cfg_branches", action="store_true", default=defaults.sync_cfg_branches,
                       help="with true CFG, the uncond branch caches exactly when the cond branch does")
    group.add_argument("--warmup_steps", type=int, default=defaults.warmup_steps, help="first steps always computed")
    group.add_argument("--max_cached_steps", type=int, default=defaults.max_cached_steps, help="-1 = no limit")
    group.add_argument("--max_continuous_cached_steps", type=int, default=defaults.max_continuous_cached_steps,
                       help="-1 = no limit")
    group.add_argument("--fn_compute_blocks", type=int, default=defaults.fn_compute_blocks,
                       help="blocks always computed first (the probe)")
    group.add_argument("--bn_compute_blocks", type=int, default=defaults.bn_compute_blocks,
                       help="blocks always computed last")


def cache_config_from_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> FBCacheConfig:
    """The FBCacheConfig of the parsed cache flags; a bad value exits through `parser.error`, naming the flag."""
    values = {name: getattr(args, name) for name in FBCacheConfig.__dataclass_fields__}
    try:
        return FBCacheConfig(**values)
    except ValueError as error:
        parser.error(f"--{error}")


def check_image_size(parser: argparse.ArgumentParser, size: Sequence[int], flag: str = "--image_size") -> None:
    if any(side <= 0 or side % SIZE_MULTIPLE for side in size):
        parser.error(f"{flag} must be positive multiples of {SIZE_MULTIPLE} (8x VAE downsampling, 2x2 packing), "
                     f"got {' '.join(map(str, size))}")


def check_dtype_device(parser: argparse.ArgumentParser, dtype: str, device_target: str) -> None:
    if dtype == "bfloat16" and device_target == "CPU":
        parser.error("--dtype bfloat16 needs bf16 matmul, which MindSpore's CPU backend lacks: use float32 or "
                     "float16 on CPU (bfloat16 on Ascend)")


def check_seed(parser: argparse.ArgumentParser, seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        parser.error(f"--seed must lie in [0, 2**64 - 1], got {seed}")


def check_count(parser: argparse.ArgumentParser, flag: str, value: int, minimum: int = 1) -> None:
    """Counts that end up in int32 device tensors or shapes."""
    if not minimum <= value <= INT32_MAX:
        parser.error(f"{flag} must lie in [{minimum}, {INT32_MAX}], got {value}")


@contextlib.contextmanager
def quiet_imports(verbose: bool) -> Iterator[None]:
    """Import MindSpore, mindone and transformers inside this block to silence their chatter (65 of the 79
    lines a default run printed): MindSpore's C++ [WARNING] lines (GLOG_v, read once at its import),
    transformers' and mindone's notices (mindone sets its logger to WARNING at import, so the levels are
    set after the block), their deprecation warnings, and the "Config not found for parakeet" lines that
    transformers' auto_docstring `print`s while mindone imports it (stdout is captured, and replayed if the
    imports fail). `verbose` keeps everything."""
    if verbose:
        yield
        return
    os.environ.setdefault("GLOG_v", "3")  # MindSpore: errors only
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    for module in QUIET_LIBRARIES:
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        print(captured.getvalue(), end="")
        raise
    for module in QUIET_LIBRARIES:
        logging.getLogger(module).setLevel(logging.ERROR)
