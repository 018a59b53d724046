"""First-Block Cache state for graph-compiled Flux forwards, with TaylorSeer-style forecasting.

All state lives in fixed-shape Parameters so that one compiled graph serves every generation:
the graph keeps the Parameters it was compiled with, so settings change through `configure()` and
state is cleared through `reset()`, both in place. Python-int settings (block counts, shapes) shape
the graph itself and are fixed at construction. The settings' defaults and checks live in
`FBCacheConfig` (cache_config.py, re-exported here); `NewtonForecaster` holds the forecast and
`CacheContext` the gate, the guards and the statistics.

Forecasting: each computed step stores the residual of the cached (middle) blocks together with its
Newton divided differences over the last computed steps. The forecast is the interpolating
polynomial through those steps, evaluated at the current step, i.e. the Taylor expansion of that
polynomial around the last computed step. Unlike the naive finite-difference Taylor series
(`sum F_i k^i / i!` with `F_{i+1} = (F_i new - F_i old) / dt`), which is exact only up to degree 1,
it reproduces any residual that is a polynomial of degree <= order exactly, also when the computed
steps are unevenly spaced (as cache hits make them). Order 0 is plain reuse and order 1 in the step
index is identical to TaylorSeer's first-order forecast.

The polynomial's variable is the step index (as every peer forecasts) or, with `forecast_space="sigma"`,
the scheduler's sigma: the ODE time the residual actually evolves in. FLUX's shifted schedule spaces
sigma unevenly (at 28 steps and 128x128 the first step spans 0.020, the last 0.036), so a forecast that
is exact in sigma is not exact in the step index.

The gate compares the probe (first-block) residual with the last computed one. With
`verify_forecast=True` it compares the probe with its own forecast instead (same order, same nodes as the
cached residual's forecast), so a step is skipped when the forecast has just proven right on the probe
(forecast-then-verify, as SpeCa does). At order 0 the two gates are the same.

Three settings save more compute per unit of image change (measured on the shipped emoji model, 28 steps,
true CFG: see the peer table in docs/cache_peers.md):
- `skip_probe_steps=k`: after a hit, up to k following steps run no block at all and take the probe's
  residual from its forecast as well. On a model whose first block is a large share of the compute (1/6
  here, 1/57 on FLUX.1-dev) the probe otherwise caps the speedup.
- `skips_after_compute=k`: after a computed step, up to k steps run no block at all (no probe), reusing the
  residual of all blocks, as MagCache and TaylorSeer lite skip. With a huge threshold and
  `max_continuous_cached_steps=k` it is a probe-free fixed schedule: 4.00x at 32.2 dB where TaylorSeer
  lite's order-1 forecast on the same schedule keeps 22.4.
- `follow_leader=True` on the uncond context of true CFG (constructed with `leader=` the cond context):
  the uncond branch takes the cond branch's decision of the same step, so both predictions are cached
  or computed together and CFG (which scales their difference by the CFG scale) does not amplify a
  mismatch of cache errors between them.
"""

from typing import Dict, List, Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from cache_config import (MAX_TAYLOR_ORDER, FBCacheConfig, check_flag, check_forecast_space, check_int,  # noqa: F401
                          check_limit, check_order, check_probe_skipping, check_threshold)

DEFAULT_MAX_STATS_STEPS = 1000
PERCENTILES = (0, 25, 50, 75, 95, 100)
PERCENTILE_NAMES = ("min", "P25", "P50", "P75", "P95", "max")


def _buffer(shape, dtype, name: str, value=0) -> Parameter:
    return Parameter(Tensor(np.full(shape, value), dtype), name=name, requires_grad=False)


def _scalar(value, dtype, name: str) -> Parameter:
    return Parameter(Tensor(value, dtype), name=name, requires_grad=False)


def _fill(param: Parameter, value) -> None:
    """Overwrite a Parameter in place from the host. `ops.assign`, not `set_data`: after a compile,
    `set_data` on Parameters written inside a graph branch left the graph's later writes invisible
    to the host (measured: Taylor state stayed at its reset value after the next generation)."""
    ops.assign(param, Tensor(np.full(param.shape, value), param.dtype))


def _sum_abs(x: Tensor) -> Tensor:
    """Sum of |x|, the last axis reduced by a matmul with a ones column: MindSpore's CPU ReduceSum runs
    on one thread (the whole reduction 3.5 ms, last axis first 0.9 ms at 1024 x 512; at 1024 x 1024 the
    diff of a hit took 4.5 ms with ReduceSum and 1.9 ms with the matmul). The ratio of two sums equals
    the ratio of means."""
    rows = ops.abs(x).reshape(-1, x.shape[-1])
    return ops.matmul(rows, ops.ones((x.shape[-1], 1), x.dtype)).sum()


MODE_COMPUTED, MODE_HIT, MODE_PROBE_SKIPPED = 0, 1, 2
# The settings' defaults: FBCacheConfig is their one source.
_DEFAULTS = FBCacheConfig()


class NewtonForecaster(nn.Cell):
    """The forecast of the probe (first-block) and middle residuals at any position.

    Holds, for each stream, the Newton divided differences over the last computed steps (order 0: the
    newest computed residual, the gate's reference) and those steps' positions (the nodes, newest
    first), plus how many orders hold data yet. One Parameter per order, not one stacked buffer:
    slicing a stacked Parameter in a CPU graph copied it whole (measured 20 ms per slice at 1024 x 512;
    the forecast cost 72 ms, now 3 ms).
    """

    def __init__(self, shape: tuple, dtype: ms.Type):
        super().__init__()
        self.dtype = dtype
        orders = range(MAX_TAYLOR_ORDER + 1)
        self.probe_divided_differences = ParameterTuple(
            [_buffer(shape, dtype, f"probe_divided_difference_{order}") for order in orders])
        self.middle_divided_differences = ParameterTuple(
            [_buffer(shape, dtype, f"middle_divided_difference_{order}") for order in orders])
        self.nodes = _buffer((MAX_TAYLOR_ORDER + 1,), ms.float32, "forecast_nodes")
        # Computed steps recorded so far, capped at the order + 1: the divided differences that hold data.
        self.valid_orders = _scalar(0, ms.int32, "valid_orders")

    def last_probe(self) -> Tensor:
        """The probe residual of the last computed step (fp32)."""
        return self.probe_divided_differences[0].astype(ms.float32)

    def probe_at(self, position: Tensor) -> Tensor:
        return self._value(self.probe_divided_differences, position)

    def middle_at(self, position: Tensor) -> Tensor:
        return self._value(self.middle_divided_differences, position)

    def _value(self, differences: ParameterTuple, position: Tensor) -> Tensor:
        """The interpolating polynomial (valid orders only) at `position`, in fp32."""
        distance = ops.ones((), ms.float32)
        total = differences[0].astype(ms.float32)
        for order in range(1, MAX_TAYLOR_ORDER + 1):
            distance = distance * (position - self.nodes[order - 1])
            weight = ops.select(order < self.valid_orders, distance, ops.zeros((), ms.float32))
            total = total + differences[order].astype(ms.float32) * weight
        return total

    def _update(self, differences: ParameterTuple, value: Tensor, position: Tensor, order: Tensor) -> None:
        """Divided differences with `value` at `position` as the newest node (orders beyond `order`: 0)."""
        new_differences = [value.astype(ms.float32)]
        for index in range(MAX_TAYLOR_ORDER):
            spacing = position - self.nodes[index]
            valid = (index < self.valid_orders) & (index + 1 <= order)
            safe_spacing = ops.select(valid, spacing, ops.ones((), ms.float32))
            difference = (new_differences[index] - differences[index].astype(ms.float32)) / safe_spacing
            new_differences.append(difference * valid.astype(ms.float32))
        for parameter, new_value in zip(differences, new_differences):
            ops.assign(parameter, new_value.astype(self.dtype))

    def record(self, middle: Tensor, position: Tensor, order: Tensor, probe: Optional[Tensor] = None) -> Tensor:
        """A computed step at `position`: new divided differences up to `order` (of the probe too when
        given) and nodes."""
        self._update(self.middle_divided_differences, middle, position, order)
        if probe is not None:
            self._update(self.probe_divided_differences, probe, position, order)
        ops.assign(self.nodes, ops.concat([position.reshape(1), self.nodes[:MAX_TAYLOR_ORDER]]))
        return ops.assign(self.valid_orders, ops.minimum(self.valid_orders + 1, order + 1))


class CacheContext(nn.Cell):
    """State of one First-Block Cache stream (one per CFG branch, per batch size and resolution).

    `residual_diff_threshold <= 0` never caches: every step is computed (still recording the diffs).
    Limits use -1 for "no limit". `fn_compute_blocks` blocks always run before the probe and
    `bn_compute_blocks` always run at the end; the blocks between them are cached.

    `context_parallel=True` (under msrun, see models/context_parallel.py): `seq_len` and `text_seq_len` are
    this rank's shares, the buffers hold only those, and the diff's two sums are all-reduced over the ranks,
    so every rank takes the same decision on the same number as one process would.
    """

    _instances = 0

    def __init__(self, batch_size: int, seq_len: int, inner_dim: int, dtype: ms.Type = ms.float32,
                 taylorseer_derivative: int = _DEFAULTS.taylorseer_derivative,
                 residual_diff_threshold: float = _DEFAULTS.residual_diff_threshold,
                 warmup_steps: int = _DEFAULTS.warmup_steps, max_cached_steps: int = _DEFAULTS.max_cached_steps,
                 max_continuous_cached_steps: int = _DEFAULTS.max_continuous_cached_steps,
                 fn_compute_blocks: int = _DEFAULTS.fn_compute_blocks,
                 bn_compute_blocks: int = _DEFAULTS.bn_compute_blocks, text_seq_len: Optional[int] = None,
                 max_stats_steps: int = DEFAULT_MAX_STATS_STEPS, forecast_space: str = _DEFAULTS.forecast_space,
                 verify_forecast: bool = _DEFAULTS.verify_forecast, skip_probe_steps: int = _DEFAULTS.skip_probe_steps,
                 skips_after_compute: int = _DEFAULTS.skips_after_compute, follow_leader: bool = False,
                 leader: Optional["CacheContext"] = None, context_parallel: bool = False):
        super().__init__()
        if leader is not None and not isinstance(leader, CacheContext):
            raise ValueError(f"leader: expected the CacheContext of the branch run first, got {type(leader).__name__}")
        if follow_leader and leader is None:
            raise ValueError("follow_leader=True needs leader= (the CacheContext whose decisions to take)")
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("inner_dim", inner_dim),
                            ("fn_compute_blocks", fn_compute_blocks), ("max_stats_steps", max_stats_steps)):
            check_int(name, value, 1)
        check_int("bn_compute_blocks", bn_compute_blocks, 0)
        if bn_compute_blocks > 0:
            if text_seq_len is None:
                raise ValueError("text_seq_len: expected the number of text tokens when bn_compute_blocks > 0, "
                                 "got None")
            check_int("text_seq_len", text_seq_len, 1)
        self.batch_size, self.seq_len, self.inner_dim = int(batch_size), int(seq_len), int(inner_dim)
        self.text_seq_len = None if text_seq_len is None else int(text_seq_len)
        self.fn_compute_blocks, self.bn_compute_blocks = int(fn_compute_blocks), int(bn_compute_blocks)
        self.dtype = dtype
        self.max_stats_steps = int(max_stats_steps)
        check_flag("context_parallel", context_parallel)
        self.sum_over_ranks = ops.AllReduce() if context_parallel else None

        self.forecaster = NewtonForecaster((batch_size, seq_len, inner_dim), dtype)
        # sum|probe residual| of the last computed step, taken once on the miss that stores it.
        self.prev_residual_norm = _scalar(0.0, ms.float32, "prev_residual_norm")
        text_shape = (batch_size, self.text_seq_len, inner_dim) if bn_compute_blocks > 0 else (1,)
        self.text_residual = _buffer(text_shape, dtype, "text_residual")
        self.has_prev = _scalar(0, ms.int32, "has_prev")
        self.step = _scalar(0, ms.int32, "step")
        self.consecutive_cached = _scalar(0, ms.int32, "consecutive_cached")
        self.cached_total = _scalar(0, ms.int32, "cached_total")
        self.stats_diff = _buffer((max_stats_steps,), ms.float32, "stats_diff", np.nan)
        self.stats_cached = _buffer((max_stats_steps,), ms.int32, "stats_cached")

        self.threshold = _scalar(0.0, ms.float32, "threshold")
        self.taylor_order = _scalar(0, ms.int32, "taylor_order")
        self.warmup_steps = _scalar(0, ms.int32, "warmup_steps")
        self.max_cached_steps = _scalar(-1, ms.int32, "max_cached_steps")
        self.max_continuous_cached_steps = _scalar(-1, ms.int32, "max_continuous_cached_steps")
        self.in_sigma = _scalar(0, ms.int32, "in_sigma")
        self.verify = _scalar(0, ms.int32, "verify")
        self.skip_probe_steps = _scalar(0, ms.int32, "skip_probe_steps")
        self.skips_after_compute = _scalar(0, ms.int32, "skips_after_compute")
        self.follow = _scalar(0, ms.int32, "follow")
        # This step's mode (MODE_*), read by a follower in the same step; probe-skipping steps left.
        # A unique name: a follower's graph holds its leader's mode Parameter too.
        CacheContext._instances += 1
        self.mode = _scalar(MODE_COMPUTED, ms.int32, f"mode_{CacheContext._instances}")
        self.probe_skips_left = _scalar(0, ms.int32, "probe_skips_left")
        self.leader_mode = None if leader is None else leader.mode
        self.configure(residual_diff_threshold=residual_diff_threshold, taylorseer_derivative=taylorseer_derivative,
                       warmup_steps=warmup_steps, max_cached_steps=max_cached_steps,
                       max_continuous_cached_steps=max_continuous_cached_steps, forecast_space=forecast_space,
                       verify_forecast=verify_forecast, skip_probe_steps=skip_probe_steps,
                       skips_after_compute=skips_after_compute, follow_leader=follow_leader)

    # ----- host-side control (between generations) -----

    def configure(self, residual_diff_threshold: Optional[float] = None, taylorseer_derivative: Optional[int] = None,
                  warmup_steps: Optional[int] = None, max_cached_steps: Optional[int] = None,
                  max_continuous_cached_steps: Optional[int] = None, forecast_space: Optional[str] = None,
                  verify_forecast: Optional[bool] = None, skip_probe_steps: Optional[int] = None,
                  skips_after_compute: Optional[int] = None, follow_leader: Optional[bool] = None) -> None:
        """Change settings in place (no recompile). Arguments left as None keep their value.

        Call `reset()` before the next generation: changing the order mid-generation keeps the
        factors already computed.
        """
        if residual_diff_threshold is not None:
            check_threshold(residual_diff_threshold)
        if taylorseer_derivative is not None:
            check_order(taylorseer_derivative)
        if warmup_steps is not None:
            check_int("warmup_steps", warmup_steps, 0)
        for name, value in (("max_cached_steps", max_cached_steps),
                            ("max_continuous_cached_steps", max_continuous_cached_steps)):
            if value is not None:
                check_limit(name, value)
        if forecast_space is not None:
            check_forecast_space(forecast_space)
        if verify_forecast is not None:
            check_flag("verify_forecast", verify_forecast)
        if skip_probe_steps is not None:
            check_probe_skipping(skip_probe_steps, self.bn_compute_blocks)
        if skips_after_compute is not None:
            check_probe_skipping(skips_after_compute, self.bn_compute_blocks, "skips_after_compute")
        if follow_leader is not None:
            check_flag("follow_leader", follow_leader)
            if follow_leader and self.leader_mode is None:
                raise ValueError("follow_leader=True needs a context constructed with leader=")
        updates = ((self.threshold, residual_diff_threshold), (self.taylor_order, taylorseer_derivative),
                   (self.warmup_steps, warmup_steps), (self.max_cached_steps, max_cached_steps),
                   (self.max_continuous_cached_steps, max_continuous_cached_steps),
                   (self.in_sigma, None if forecast_space is None else int(forecast_space == "sigma")),
                   (self.verify, None if verify_forecast is None else int(verify_forecast)),
                   (self.skip_probe_steps, skip_probe_steps), (self.skips_after_compute, skips_after_compute),
                   (self.follow, None if follow_leader is None else int(follow_leader)))
        for param, value in updates:
            if value is not None:
                _fill(param, value)

    def setting_parameters(self) -> tuple:
        return (self.threshold, self.taylor_order, self.warmup_steps, self.max_cached_steps,
                self.max_continuous_cached_steps, self.in_sigma, self.verify, self.skip_probe_steps,
                self.skips_after_compute, self.follow)

    def reset(self) -> None:
        """Clear all generation state in place, keeping the settings: every Parameter that is not a setting
        (nor the leader's) is state, so a new one cannot be missed. 0, and NaN for the diff statistics."""
        kept = (*self.setting_parameters(), self.leader_mode)
        for param in self.get_parameters():
            if all(param is not other for other in kept):
                _fill(param, np.nan if param is self.stats_diff else 0)

    # ----- graph-side methods, called from the cached forward -----

    def position(self, sigma: Tensor) -> Tensor:
        """The current step's coordinate for the forecast polynomial: sigma or the step index (fp32)."""
        return ops.select(self.in_sigma > 0, sigma.astype(ms.float32), self.step.astype(ms.float32))

    def probe_diff(self, residual: Tensor, position: Tensor) -> Tensor:
        """mean|r - r_ref| / mean|r_prev| in fp32, r_ref the last computed probe residual or, when verifying,
        its forecast; NaN when there is no previous residual."""
        reference = self.forecaster.last_probe()
        if self.verify > 0:
            reference = self.forecaster.probe_at(position)
        diff = self._total_abs(residual.astype(ms.float32) - reference) / self.prev_residual_norm
        return ops.select(self.has_prev > 0, diff, ops.fill(ms.float32, (), float("nan")))

    def _total_abs(self, x: Tensor) -> Tensor:
        """sum|x| over this rank's tokens, or over all ranks' tokens under context parallel."""
        total = _sum_abs(x)
        if self.sum_over_ranks is not None:
            total = self.sum_over_ranks(total)
        return total

    def _guards_allow(self) -> Tensor:
        warmed_up = self.step >= self.warmup_steps
        under_total = (self.max_cached_steps < 0) | (self.cached_total < self.max_cached_steps)
        under_consecutive = (self.max_continuous_cached_steps < 0) | (
            self.consecutive_cached < self.max_continuous_cached_steps)
        return (self.has_prev > 0) & warmed_up & under_total & under_consecutive

    def _own_or_leader(self, own: Tensor, leader_mode: int) -> Tensor:
        """`own`, or (following) whether the leader's step took `leader_mode`."""
        if self.leader_mode is None:
            return own
        following = self.follow > 0
        return (following & (self.leader_mode == leader_mode)) | (~following & own)

    def skips_probe(self) -> Tensor:
        """Whether this step runs no block at all (a bool scalar tensor), decided before the probe."""
        if self.bn_compute_blocks > 0:
            return ops.zeros((), ms.bool_)
        return self._own_or_leader(self.probe_skips_left > 0, MODE_PROBE_SKIPPED) & self._guards_allow()

    def can_cache(self, diff: Tensor) -> Tensor:
        """The cache decision from the diff and the guards (a bool scalar tensor)."""
        similar = (self.threshold > 0) & (diff < self.threshold)
        return self._own_or_leader(similar, MODE_HIT) & self._guards_allow()

    def forecast(self, position: Tensor) -> Tensor:
        """The middle-block residual at `position`."""
        return self.forecaster.middle_at(position).astype(self.dtype)

    def forecast_probe_and_middle(self, position: Tensor) -> Tensor:
        """The residual of all blocks but the last Bn (= 0) at `position`: for a step that skips the probe."""
        return (self.forecaster.probe_at(position) + self.forecaster.middle_at(position)).astype(self.dtype)

    def update_taylor(self, residual: Tensor, position: Tensor, probe_residual: Optional[Tensor] = None) -> Tensor:
        """Record a computed step's middle residual (and probe residual when given) at `position`."""
        return self.forecaster.record(residual, position, self.taylor_order, probe_residual)

    def update_on_miss(self, probe_residual: Tensor, middle_residual: Tensor, text_residual: Tensor,
                       position: Tensor) -> Tensor:
        """A computed step: store the probe residual (only here, as diffusers does) and the factors."""
        ops.assign(self.prev_residual_norm, self._total_abs(probe_residual.astype(self.dtype).astype(ms.float32)))
        ops.assign(self.has_prev, ops.ones((), ms.int32))
        if self.bn_compute_blocks > 0:
            ops.assign(self.text_residual, text_residual.astype(self.dtype))
        self.update_taylor(middle_residual, position, probe_residual)
        ops.assign(self.mode, ops.fill(ms.int32, (), MODE_COMPUTED))
        # Threshold <= 0 never caches, so it never skips either.
        skips = ops.select(self.threshold > 0, self.skips_after_compute, ops.zeros((), ms.int32))
        ops.assign(self.probe_skips_left, skips)
        return ops.assign(self.consecutive_cached, ops.zeros((), ms.int32))

    def _count_cached(self, mode: int) -> Tensor:
        ops.assign(self.mode, ops.fill(ms.int32, (), mode))
        ops.assign(self.cached_total, self.cached_total + 1)
        return ops.assign(self.consecutive_cached, self.consecutive_cached + 1)

    def update_on_hit(self) -> Tensor:
        ops.assign(self.probe_skips_left, self.skip_probe_steps)
        return self._count_cached(MODE_HIT)

    def update_on_probe_skip(self) -> Tensor:
        ops.assign(self.probe_skips_left, self.probe_skips_left - 1)
        return self._count_cached(MODE_PROBE_SKIPPED)

    def finish_step(self, diff: Tensor) -> Tensor:
        """Record the step's diff and mode in the statistics slots, then advance the step."""
        slot = ops.arange(0, self.max_stats_steps, 1, dtype=ms.int32) == self.step
        ops.assign(self.stats_diff, ops.select(slot, diff.broadcast_to(slot.shape), self.stats_diff))
        ops.assign(self.stats_cached, ops.select(slot, self.mode.broadcast_to(slot.shape), self.stats_cached))
        return ops.assign(self.step, self.step + 1)

    # ----- host-side statistics (after a generation) -----

    def summary(self) -> Dict[str, object]:
        """Steps computed/cached, per-step diffs (NaN: no previous residual) and decisions, percentiles."""
        steps = min(int(self.step.asnumpy()), self.max_stats_steps)
        diffs = self.stats_diff.asnumpy()[:steps].astype(np.float64)
        modes = self.stats_cached.asnumpy()[:steps]
        decisions: List[bool] = [bool(value != MODE_COMPUTED) for value in modes]
        finite = diffs[np.isfinite(diffs)]
        percentiles = {name: float(np.percentile(finite, q)) if finite.size else float("nan")
                       for name, q in zip(PERCENTILE_NAMES, PERCENTILES)}
        return {
            "steps": int(self.step.asnumpy()),
            "steps_cached": int(self.cached_total.asnumpy()),
            "steps_computed": int(self.step.asnumpy()) - int(self.cached_total.asnumpy()),
            "diffs": diffs.tolist(),
            "cached": decisions,
            "probe_skipped": [bool(value == MODE_PROBE_SKIPPED) for value in modes],
            "diff_percentiles": percentiles,
        }

    def format_summary(self) -> str:
        """A printable table of the summary."""
        return format_summary(self.summary())


def format_summary(stats: Dict[str, object]) -> str:
    """A printable table of a `CacheContext.summary()`."""
    lines = [f"FBCache: {stats['steps']} steps, {stats['steps_computed']} computed, {stats['steps_cached']} cached",
             f"{'step':>6} {'diff':>12} decision"]
    skipped = stats.get("probe_skipped", [False] * len(stats["cached"]))
    for index, (diff, cached, probe_skipped) in enumerate(zip(stats["diffs"], stats["cached"], skipped)):
        decision = "cached, probe skipped" if probe_skipped else ("cached" if cached else "computed")
        lines.append(f"{index:>6} {diff:>12.6f} {decision}")
    lines.append("diff percentiles: " + ", ".join(
        f"{name}={value:.6f}" for name, value in stats["diff_percentiles"].items()))
    return "\n".join(lines)


def format_summary_line(stats: Dict[str, object]) -> str:
    """One line for a `CacheContext.summary()`: counts, the decision of each step (C computed, H cache
    hit, S hit that also skipped the probe) and the diff's median."""
    skipped = stats.get("probe_skipped", [False] * len(stats["cached"]))
    letters = "".join("S" if probe_skipped else ("H" if cached else "C")
                      for cached, probe_skipped in zip(stats["cached"], skipped))
    return (f"{stats['steps']} steps, {stats['steps_computed']} computed, {stats['steps_cached']} cached "
            f"[{letters}], median diff {stats['diff_percentiles']['P50']:.4f}")
