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

Two settings save more compute per unit of image change (measured on the shipped emoji model, 28 steps,
true CFG: see the README's peer table):
- `skip_probe_steps=k`: after a hit, up to k following steps run no block at all and take the probe's
  residual from its forecast as well. On a model whose first block is a large share of the compute (1/6
  here, 1/57 on FLUX.1-dev) the probe otherwise caps the speedup.
- `follow_leader=True` on the uncond context of true CFG (constructed with `leader=` the cond context):
  the uncond branch takes the cond branch's decision of the same step, so both predictions are cached
  or computed together and CFG (which scales their difference by the CFG scale) does not amplify a
  mismatch of cache errors between them.
"""

from typing import Dict, List, Optional

import numpy as np

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

MAX_TAYLOR_ORDER = 3
FORECAST_SPACES = ("step", "sigma")
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


def _check_forecast_space(value: str) -> None:
    if value not in FORECAST_SPACES:
        raise ValueError(f"forecast_space: expected one of {FORECAST_SPACES}, got {value!r}")


def _check_bool(name: str, value: bool) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name}: expected True or False, got {value!r}")


MODE_COMPUTED, MODE_HIT, MODE_PROBE_SKIPPED = 0, 1, 2


def _check_threshold(value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not np.isfinite(value):
        raise ValueError(f"residual_diff_threshold: expected a finite float (<= 0 disables caching), got {value!r}")


class CacheContext(nn.Cell):
    """State of one First-Block Cache stream (one per CFG branch, per batch size and resolution).

    `residual_diff_threshold <= 0` never caches: every step is computed (still recording the diffs).
    Limits use -1 for "no limit". `fn_compute_blocks` blocks always run before the probe and
    `bn_compute_blocks` always run at the end; the blocks between them are cached.
    """

    _instances = 0

    def __init__(self, batch_size: int, seq_len: int, inner_dim: int, dtype: ms.Type = ms.float32,
                 taylorseer_derivative: int = 0, residual_diff_threshold: float = 0.08, warmup_steps: int = 0,
                 max_cached_steps: int = -1, max_continuous_cached_steps: int = -1, fn_compute_blocks: int = 1,
                 bn_compute_blocks: int = 0, text_seq_len: Optional[int] = None,
                 max_stats_steps: int = DEFAULT_MAX_STATS_STEPS, forecast_space: str = "step",
                 verify_forecast: bool = False, skip_probe_steps: int = 0, follow_leader: bool = False,
                 leader: Optional["CacheContext"] = None):
        super().__init__()
        if leader is not None and not isinstance(leader, CacheContext):
            raise ValueError(f"leader: expected the CacheContext of the branch run first, got {type(leader).__name__}")
        if follow_leader and leader is None:
            raise ValueError("follow_leader=True needs leader= (the CacheContext whose decisions to take)")
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
        # Newton divided differences of the probe residual (factor 0: the last computed one, the gate's
        # reference) and of the cached residual. One Parameter per order, not one stacked buffer: slicing a
        # stacked Parameter in a CPU graph copied it whole (measured 20 ms per slice at 1024 x 512; the
        # forecast cost 72 ms, now 3 ms).
        self.probe_factors = ParameterTuple(
            [_buffer(image_shape, dtype, f"probe_factor_{order}") for order in range(MAX_TAYLOR_ORDER + 1)])
        # sum|probe residual| of the last computed step, taken once on the miss that stores it.
        self.prev_residual_norm = _scalar(0.0, ms.float32, "prev_residual_norm")
        self.taylor_factors = ParameterTuple(
            [_buffer(image_shape, dtype, f"taylor_factor_{order}") for order in range(MAX_TAYLOR_ORDER + 1)])
        # Positions (step index or sigma) of the last MAX_TAYLOR_ORDER + 1 computed steps, newest first:
        # the Newton nodes.
        self.computed_nodes = _buffer((MAX_TAYLOR_ORDER + 1,), ms.float32, "computed_nodes")
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
        self.in_sigma = _scalar(0, ms.int32, "in_sigma")
        self.verify = _scalar(0, ms.int32, "verify")
        self.skip_probe_steps = _scalar(0, ms.int32, "skip_probe_steps")
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
                       follow_leader=follow_leader)

    # ----- host-side control (between generations) -----

    def configure(self, residual_diff_threshold: Optional[float] = None, taylorseer_derivative: Optional[int] = None,
                  warmup_steps: Optional[int] = None, max_cached_steps: Optional[int] = None,
                  max_continuous_cached_steps: Optional[int] = None, forecast_space: Optional[str] = None,
                  verify_forecast: Optional[bool] = None, skip_probe_steps: Optional[int] = None,
                  follow_leader: Optional[bool] = None) -> None:
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
        if forecast_space is not None:
            _check_forecast_space(forecast_space)
        if verify_forecast is not None:
            _check_bool("verify_forecast", verify_forecast)
        if skip_probe_steps is not None:
            _check_int("skip_probe_steps", skip_probe_steps, 0)
            if skip_probe_steps > 0 and self.bn_compute_blocks > 0:
                raise ValueError(f"skip_probe_steps: must be 0 with bn_compute_blocks > 0 (a step without the "
                                 f"first blocks has no text stream for the last ones), got {skip_probe_steps}")
        if follow_leader is not None:
            _check_bool("follow_leader", follow_leader)
            if follow_leader and self.leader_mode is None:
                raise ValueError("follow_leader=True needs a context constructed with leader=")
        updates = ((self.threshold, residual_diff_threshold), (self.taylor_order, taylorseer_derivative),
                   (self.warmup_steps, warmup_steps), (self.max_cached_steps, max_cached_steps),
                   (self.max_continuous_cached_steps, max_continuous_cached_steps),
                   (self.in_sigma, None if forecast_space is None else int(forecast_space == "sigma")),
                   (self.verify, None if verify_forecast is None else int(verify_forecast)),
                   (self.skip_probe_steps, skip_probe_steps),
                   (self.follow, None if follow_leader is None else int(follow_leader)))
        for param, value in updates:
            if value is not None:
                _fill(param, value)

    def reset(self) -> None:
        """Clear all generation state in place, keeping the settings."""
        for param in (*self.probe_factors, self.prev_residual_norm, *self.taylor_factors, self.computed_nodes,
                      self.text_residual, self.has_prev, self.valid_orders, self.step, self.consecutive_cached,
                      self.cached_total, self.stats_cached, self.mode, self.probe_skips_left):
            _fill(param, 0)
        _fill(self.stats_diff, np.nan)

    # ----- graph-side methods, called from the cached forward -----

    def position(self, sigma: Tensor) -> Tensor:
        """The current step's coordinate for the forecast polynomial: sigma or the step index (fp32)."""
        return ops.select(self.in_sigma > 0, sigma.astype(ms.float32), self.step.astype(ms.float32))

    def probe_diff(self, residual: Tensor, position: Tensor) -> Tensor:
        """mean|r - r_ref| / mean|r_prev| in fp32, r_ref the last computed probe residual or, when verifying,
        its forecast; NaN when there is no previous residual."""
        reference = self.probe_factors[0].astype(ms.float32)
        if self.verify > 0:
            reference = self._newton_value(self.probe_factors, position)
        diff = _sum_abs(residual.astype(ms.float32) - reference) / self.prev_residual_norm
        return ops.select(self.has_prev > 0, diff, ops.fill(ms.float32, (), float("nan")))

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

    def _newton_value(self, factors: ParameterTuple, position: Tensor) -> Tensor:
        """The interpolating polynomial of `factors` (valid orders only) at `position`, in fp32."""
        distance = ops.ones((), ms.float32)
        total = factors[0].astype(ms.float32)
        for order in range(1, MAX_TAYLOR_ORDER + 1):
            distance = distance * (position - self.computed_nodes[order - 1])
            weight = ops.select(order < self.valid_orders, distance, ops.zeros((), ms.float32))
            total = total + factors[order].astype(ms.float32) * weight
        return total

    def forecast(self, position: Tensor) -> Tensor:
        """The middle-block residual at `position` from the valid Newton factors."""
        return self._newton_value(self.taylor_factors, position).astype(self.dtype)

    def forecast_probe_and_middle(self, position: Tensor) -> Tensor:
        """The residual of all blocks but the last Bn (= 0) at `position`: for a step that skips the probe."""
        total = self._newton_value(self.probe_factors, position) + self._newton_value(self.taylor_factors, position)
        return total.astype(self.dtype)

    def _newton_update(self, factors: ParameterTuple, value: Tensor, position: Tensor) -> None:
        """Divided differences with `value` at `position` as the newest node (orders beyond the setting: 0)."""
        new_factors = [value.astype(ms.float32)]
        for order in range(MAX_TAYLOR_ORDER):
            spacing = position - self.computed_nodes[order]
            valid = (order < self.valid_orders) & (order + 1 <= self.taylor_order)
            safe_spacing = ops.select(valid, spacing, ops.ones((), ms.float32))
            difference = (new_factors[order] - factors[order].astype(ms.float32)) / safe_spacing
            new_factors.append(difference * valid.astype(ms.float32))
        for factor, new_value in zip(factors, new_factors):
            ops.assign(factor, new_value.astype(self.dtype))

    def update_taylor(self, residual: Tensor, position: Tensor, probe_residual: Optional[Tensor] = None) -> Tensor:
        """Record a computed step at `position`: new divided differences (of the probe residual too when
        given) and nodes."""
        self._newton_update(self.taylor_factors, residual, position)
        if probe_residual is not None:
            self._newton_update(self.probe_factors, probe_residual, position)
        nodes = ops.concat([position.reshape(1), self.computed_nodes[:MAX_TAYLOR_ORDER]])
        ops.assign(self.computed_nodes, nodes)
        return ops.assign(self.valid_orders, ops.minimum(self.valid_orders + 1, self.taylor_order + 1))

    def update_on_miss(self, probe_residual: Tensor, middle_residual: Tensor, text_residual: Tensor,
                       position: Tensor) -> Tensor:
        """A computed step: store the probe residual (only here, as diffusers does) and the factors."""
        ops.assign(self.prev_residual_norm, _sum_abs(probe_residual.astype(self.dtype).astype(ms.float32)))
        ops.assign(self.has_prev, ops.ones((), ms.int32))
        if self.bn_compute_blocks > 0:
            ops.assign(self.text_residual, text_residual.astype(self.dtype))
        self.update_taylor(middle_residual, position, probe_residual)
        ops.assign(self.mode, ops.fill(ms.int32, (), MODE_COMPUTED))
        ops.assign(self.probe_skips_left, ops.zeros((), ms.int32))
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
