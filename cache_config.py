"""First-Block Cache settings: the one place their defaults and checks live.

`FBCacheConfig` feeds `utils.CacheContext`, `FluxPipeline(cache=...)` and every script's argparse
defaults. It imports no MindSpore, so a command line is parsed and checked in well under a second
before MindSpore's 8-10 s import, and a bad setting is refused before any loading. `utils.py`
re-exports everything here, so `from utils import FBCacheConfig` works beside `CacheContext`.

Counters live in int32 tensors on the device; a Python int above 2**31 - 1 would wrap (4294967296
becomes 0), so every count is checked against that bound here instead of wrapping silently.
"""

import math
from dataclasses import asdict, dataclass
from numbers import Integral, Real

import numpy as np

MAX_TAYLOR_ORDER = 3
FORECAST_SPACES = ("step", "sigma")
INT32_MAX = 2 ** 31 - 1
# Settings that shape the compiled graph (a change compiles a new one); the others are runtime tensors.
GRAPH_SETTINGS = ("fn_compute_blocks", "bn_compute_blocks")


def check_int(name: str, value: int, minimum: int) -> None:
    """An int in [minimum, 2**31 - 1] (the device counters are int32)."""
    if not isinstance(value, Integral) or isinstance(value, bool) or not minimum <= value <= INT32_MAX:
        raise ValueError(f"{name}: expected an int in [{minimum}, {INT32_MAX}], got {value!r}")


def check_limit(name: str, value: int) -> None:
    """Limits are -1 (no limit) or a count in [0, 2**31 - 1]."""
    if not isinstance(value, Integral) or isinstance(value, bool) or not -1 <= value <= INT32_MAX:
        raise ValueError(f"{name}: expected -1 (no limit) or an int in [0, {INT32_MAX}], got {value!r}")


def check_order(value: int) -> None:
    if not isinstance(value, Integral) or isinstance(value, bool) or not 0 <= value <= MAX_TAYLOR_ORDER:
        raise ValueError(f"taylorseer_derivative: expected an int in [0, {MAX_TAYLOR_ORDER}], got {value!r}")


def check_threshold(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"residual_diff_threshold: expected a finite float (<= 0 disables caching), got {value!r}")


def check_forecast_space(value: str) -> None:
    if value not in FORECAST_SPACES:
        raise ValueError(f"forecast_space: expected one of {FORECAST_SPACES}, got {value!r}")


def check_flag(name: str, value: bool) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


def check_probe_skipping(steps: int, bn_compute_blocks: int, name: str = "skip_probe_steps") -> None:
    """A count of steps that run no block (`name`: skip_probe_steps or skips_after_compute)."""
    check_int(name, steps, 0)
    if steps > 0 and bn_compute_blocks > 0:
        raise ValueError(f"{name}: must be 0 with bn_compute_blocks > 0 (a step without the first blocks "
                         f"has no text stream for the last ones), got {steps}")


def check_block_split(fn_compute_blocks: int, bn_compute_blocks: int, total_blocks: int) -> None:
    """At least one block must lie between the first Fn and the last Bn: with none, a "cached" step
    skips nothing and the statistics would report savings that do not exist."""
    if fn_compute_blocks + bn_compute_blocks >= total_blocks:
        raise ValueError(f"fn_compute_blocks + bn_compute_blocks must be < {total_blocks} (the model's blocks) so that "
                         f"some block is cached, got {fn_compute_blocks} + {bn_compute_blocks}: lower one of them")


@dataclass(frozen=True)
class FBCacheConfig:
    """First-Block Cache settings of one generation (see utils.CacheContext for what each does).

    `fn_compute_blocks` and `bn_compute_blocks` shape the compiled graph; the others change without a
    recompile. Checked on construction, so a bad value fails before anything is loaded.
    """

    residual_diff_threshold: float = 0.08
    taylorseer_derivative: int = 0
    warmup_steps: int = 0
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    fn_compute_blocks: int = 1
    bn_compute_blocks: int = 0
    forecast_space: str = "step"
    verify_forecast: bool = False
    skip_probe_steps: int = 0
    # After a computed step, up to this many steps run no block (no probe either).
    skips_after_compute: int = 0
    # With true CFG: the uncond branch takes the cond branch's decision at each step.
    sync_cfg_branches: bool = False

    def __post_init__(self):
        check_threshold(self.residual_diff_threshold)
        check_order(self.taylorseer_derivative)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_limit("max_cached_steps", self.max_cached_steps)
        check_limit("max_continuous_cached_steps", self.max_continuous_cached_steps)
        check_int("fn_compute_blocks", self.fn_compute_blocks, 1)
        check_int("bn_compute_blocks", self.bn_compute_blocks, 0)
        check_forecast_space(self.forecast_space)
        check_flag("verify_forecast", self.verify_forecast)
        check_probe_skipping(self.skip_probe_steps, self.bn_compute_blocks)
        check_probe_skipping(self.skips_after_compute, self.bn_compute_blocks, "skips_after_compute")
        check_flag("sync_cfg_branches", self.sync_cfg_branches)

    def runtime_settings(self, follower: bool = False) -> dict:
        """`CacheContext.configure` arguments; `follow_leader` only for the uncond (follower) context."""
        settings = asdict(self)
        for name in (*GRAPH_SETTINGS, "sync_cfg_branches"):
            del settings[name]
        if follower:
            settings["follow_leader"] = self.sync_cfg_branches
        return settings
