"""First-Block Cache state for graph-compiled Flux forwards, with TaylorSeer-style forecasting.

All state lives in fixed-shape Parameters so that one compiled graph serves every generation:
the graph keeps the Parameters it was compiled with, so settings change through `configure()` and
state is cleared through `reset()`, both in place. Python-int settings (block counts, shapes) shape
the graph itself and are fixed at construction.

Forecasting: each computed step stores the residual of the cached (middle) blocks together with its
Newton divided differences over the last computed steps. The forecast is the interpolating
polynomial through those steps, evaluated at the current step, i.e. the Taylor expansion of that
polynomial around the last computed step. Unlike the naive finite-difference Taylor series
(`sum F_i k^i / i!` with `F_{i+1} = (F_i new - F_i old) / dt`), which is exact only up to degree 1,
it reproduces any residual that is a polynomial of degree <= order in the step index exactly, also
when the computed steps are unevenly spaced (as cache hits make them). Order 0 is plain reuse and
order 1 is identical to TaylorSeer's first-order forecast.
"""

from typing import Dict, List, Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

MAX_TAYLOR_ORDER = 3
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
    """Sum of |x| reduced over the last axis first: one reduction over all elements ran 4x slower on
    CPU (measured 3.5 ms vs 0.9 ms at 1024 x 512). The ratio of two sums equals the ratio of means."""
    return ops.abs(x).sum(-1).sum()


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_limit(name: str, value: int) -> None:
    """Limits are -1 (no limit) or a non-negative count."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < -1:
        raise ValueError(f"{name}: expected -1 (no limit) or an int >= 0, got {value!r}")


def _check_order(value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or not 0 <= value <= MAX_TAYLOR_ORDER:
        raise ValueError(f"taylorseer_derivative: expected an int in [0, {MAX_TAYLOR_ORDER}], got {value!r}")


def _check_threshold(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value):
        raise ValueError(f"residual_diff_threshold: expected a finite float (<= 0 disables caching), got {value!r}")


class CacheContext(nn.Cell):
    """State of one First-Block Cache stream (one per CFG branch, per batch size and resolution).

    `residual_diff_threshold <= 0` never caches: every step is computed (still recording the diffs).
    Limits use -1 for "no limit". `fn_compute_blocks` blocks always run before the probe and
    `bn_compute_blocks` always run at the end; the blocks between them are cached.
    """

    def __init__(self, batch_size: int, seq_len: int, inner_dim: int, dtype: ms.Type = ms.float32,
                 taylorseer_derivative: int = 0, residual_diff_threshold: float = 0.08, warmup_steps: int = 0,
                 max_cached_steps: int = -1, max_continuous_cached_steps: int = -1, fn_compute_blocks: int = 1,
                 bn_compute_blocks: int = 0, text_seq_len: Optional[int] = None,
                 max_stats_steps: int = DEFAULT_MAX_STATS_STEPS):
        super().__init__()
        for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("inner_dim", inner_dim),
                            ("fn_compute_blocks", fn_compute_blocks), ("max_stats_steps", max_stats_steps)):
            _check_int(name, value, 1)
        _check_int("bn_compute_blocks", bn_compute_blocks, 0)
        if bn_compute_blocks > 0:
            if text_seq_len is None:
                raise ValueError("text_seq_len: expected the number of text tokens when bn_compute_blocks > 0, "
                                 "got None")
            _check_int("text_seq_len", text_seq_len, 1)
        self.batch_size, self.seq_len, self.inner_dim = int(batch_size), int(seq_len), int(inner_dim)
        self.text_seq_len = None if text_seq_len is None else int(text_seq_len)
        self.fn_compute_blocks, self.bn_compute_blocks = int(fn_compute_blocks), int(bn_compute_blocks)
        self.dtype = dtype
        self.max_stats_steps = int(max_stats_steps)

        image_shape = (batch_size, seq_len, inner_dim)
        self.prev_residual = _buffer(image_shape, dtype, "prev_residual")
        # sum|prev_residual|, taken once on the miss that stores it instead of on every step.
        self.prev_residual_norm = _scalar(0.0, ms.float32, "prev_residual_norm")
        # One Parameter per order, not one stacked buffer: slicing a stacked Parameter in a CPU graph
        # copied it whole (measured 20 ms per slice at 1024 x 512; the forecast cost 72 ms, now 3 ms).
        self.taylor_factors = ParameterTuple(
            [_buffer(image_shape, dtype, f"taylor_factor_{order}") for order in range(MAX_TAYLOR_ORDER + 1)])
        # Steps of the last MAX_TAYLOR_ORDER + 1 computed steps, newest first: the Newton nodes.
        self.computed_steps = _buffer((MAX_TAYLOR_ORDER + 1,), ms.int32, "computed_steps")
        text_shape = (batch_size, self.text_seq_len, inner_dim) if bn_compute_blocks > 0 else (1,)
        self.text_residual = _buffer(text_shape, dtype, "text_residual")
        self.has_prev = _scalar(0, ms.int32, "has_prev")
        self.valid_orders = _scalar(0, ms.int32, "valid_orders")
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
        self.configure(residual_diff_threshold=residual_diff_threshold, taylorseer_derivative=taylorseer_derivative,
                       warmup_steps=warmup_steps, max_cached_steps=max_cached_steps,
                       max_continuous_cached_steps=max_continuous_cached_steps)

    # ----- host-side control (between generations) -----

    def configure(self, residual_diff_threshold: Optional[float] = None, taylorseer_derivative: Optional[int] = None,
                  warmup_steps: Optional[int] = None, max_cached_steps: Optional[int] = None,
                  max_continuous_cached_steps: Optional[int] = None) -> None:
        """Change settings in place (no recompile). Arguments left as None keep their value.

        Call `reset()` before the next generation: changing the order mid-generation keeps the
        factors already computed.
        """
        if residual_diff_threshold is not None:
            _check_threshold(residual_diff_threshold)
        if taylorseer_derivative is not None:
            _check_order(taylorseer_derivative)
        if warmup_steps is not None:
            _check_int("warmup_steps", warmup_steps, 0)
        for name, value in (("max_cached_steps", max_cached_steps),
                            ("max_continuous_cached_steps", max_continuous_cached_steps)):
            if value is not None:
                _check_limit(name, value)
        updates = ((self.threshold, residual_diff_threshold), (self.taylor_order, taylorseer_derivative),
                   (self.warmup_steps, warmup_steps), (self.max_cached_steps, max_cached_steps),
                   (self.max_continuous_cached_steps, max_continuous_cached_steps))
        for param, value in updates:
            if value is not None:
                _fill(param, value)

    def reset(self) -> None:
        """Clear all generation state in place, keeping the settings."""
        for param in (self.prev_residual, self.prev_residual_norm, *self.taylor_factors, self.computed_steps,
                      self.text_residual, self.has_prev, self.valid_orders, self.step, self.consecutive_cached,
                      self.cached_total, self.stats_cached):
            _fill(param, 0)
        _fill(self.stats_diff, np.nan)

    # ----- graph-side methods, called from the cached forward -----

    def probe_diff(self, residual: Tensor) -> Tensor:
        """mean|r - r_prev| / mean|r_prev| in fp32; NaN when there is no previous residual."""
        diff = _sum_abs(residual.astype(ms.float32) - self.prev_residual.astype(ms.float32)) / self.prev_residual_norm
        return ops.select(self.has_prev > 0, diff, ops.fill(ms.float32, (), float("nan")))

    def can_cache(self, diff: Tensor) -> Tensor:
        """The cache decision from the diff and the guards (a bool scalar tensor)."""
        similar = (self.has_prev > 0) & (self.threshold > 0) & (diff < self.threshold)
        warmed_up = self.step >= self.warmup_steps
        under_total = (self.max_cached_steps < 0) | (self.cached_total < self.max_cached_steps)
        under_consecutive = (self.max_continuous_cached_steps < 0) | (
            self.consecutive_cached < self.max_continuous_cached_steps)
        return similar & warmed_up & under_total & under_consecutive

    def forecast(self) -> Tensor:
        """The middle-block residual at the current step from the valid Newton factors."""
        distance = ops.ones((), ms.float32)
        total = self.taylor_factors[0].astype(ms.float32)
        for order in range(1, MAX_TAYLOR_ORDER + 1):
            distance = distance * (self.step - self.computed_steps[order - 1]).astype(ms.float32)
            weight = ops.select(order < self.valid_orders, distance, ops.zeros((), ms.float32))
            total = total + self.taylor_factors[order].astype(ms.float32) * weight
        return total.astype(self.dtype)

    def update_taylor(self, residual: Tensor) -> Tensor:
        """Record a computed residual at the current step: new divided differences and nodes."""
        new_factors = [residual.astype(ms.float32)]
        for order in range(MAX_TAYLOR_ORDER):
            spacing = (self.step - self.computed_steps[order]).astype(ms.float32)
            valid = (order < self.valid_orders) & (order + 1 <= self.taylor_order)
            safe_spacing = ops.select(valid, spacing, ops.ones((), ms.float32))
            difference = (new_factors[order] - self.taylor_factors[order].astype(ms.float32)) / safe_spacing
            new_factors.append(difference * valid.astype(ms.float32))
        nodes = ops.concat([self.step.reshape(1), self.computed_steps[:MAX_TAYLOR_ORDER]])
        for factor, value in zip(self.taylor_factors, new_factors):
            ops.assign(factor, value.astype(self.dtype))
        ops.assign(self.computed_steps, nodes)
        return ops.assign(self.valid_orders, ops.minimum(self.valid_orders + 1, self.taylor_order + 1))

    def update_on_miss(self, probe_residual: Tensor, middle_residual: Tensor, text_residual: Tensor) -> Tensor:
        """A computed step: store the probe residual (only here, as diffusers does) and the factors."""
        ops.assign(self.prev_residual, probe_residual.astype(self.dtype))
        ops.assign(self.prev_residual_norm, _sum_abs(probe_residual.astype(self.dtype).astype(ms.float32)))
        ops.assign(self.has_prev, ops.ones((), ms.int32))
        if self.bn_compute_blocks > 0:
            ops.assign(self.text_residual, text_residual.astype(self.dtype))
        self.update_taylor(middle_residual)
        return ops.assign(self.consecutive_cached, ops.zeros((), ms.int32))

    def update_on_hit(self) -> Tensor:
        ops.assign(self.cached_total, self.cached_total + 1)
        return ops.assign(self.consecutive_cached, self.consecutive_cached + 1)

    def finish_step(self, diff: Tensor, cached: Tensor) -> Tensor:
        """Record the step's diff and decision in the statistics slots, then advance the step."""
        slot = ops.arange(0, self.max_stats_steps, 1, dtype=ms.int32) == self.step
        ops.assign(self.stats_diff, ops.select(slot, diff.broadcast_to(slot.shape), self.stats_diff))
        decision = cached.astype(ms.int32).broadcast_to(slot.shape)
        ops.assign(self.stats_cached, ops.select(slot, decision, self.stats_cached))
        return ops.assign(self.step, self.step + 1)

    # ----- host-side statistics (after a generation) -----

    def summary(self) -> Dict[str, object]:
        """Steps computed/cached, per-step diffs (NaN: no previous residual) and decisions, percentiles."""
        steps = min(int(self.step.asnumpy()), self.max_stats_steps)
        diffs = self.stats_diff.asnumpy()[:steps].astype(np.float64)
        decisions: List[bool] = [bool(value) for value in self.stats_cached.asnumpy()[:steps]]
        finite = diffs[np.isfinite(diffs)]
        percentiles = {name: float(np.percentile(finite, q)) if finite.size else float("nan")
                       for name, q in zip(PERCENTILE_NAMES, PERCENTILES)}
        return {
            "steps": int(self.step.asnumpy()),
            "steps_cached": int(self.cached_total.asnumpy()),
            "steps_computed": int(self.step.asnumpy()) - int(self.cached_total.asnumpy()),
            "diffs": diffs.tolist(),
            "cached": decisions,
            "diff_percentiles": percentiles,
        }

    def format_summary(self) -> str:
        """A printable table of the summary."""
        return format_summary(self.summary())


def format_summary(stats: Dict[str, object]) -> str:
    """A printable table of a `CacheContext.summary()`."""
    lines = [f"FBCache: {stats['steps']} steps, {stats['steps_computed']} computed, {stats['steps_cached']} cached",
             f"{'step':>6} {'diff':>12} decision"]
    for index, (diff, cached) in enumerate(zip(stats["diffs"], stats["cached"])):
        lines.append(f"{index:>6} {diff:>12.6f} {'cached' if cached else 'computed'}")
    lines.append("diff percentiles: " + ", ".join(
        f"{name}={value:.6f}" for name, value in stats["diff_percentiles"].items()))
    return "\n".join(lines)
