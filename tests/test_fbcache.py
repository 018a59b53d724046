"""First-Block Cache: parity with the uncached model and with diffusers' FirstBlockCache, Taylor
forecasting, guards, in-place reconfiguration without recompiles, modes, Fn/Bn variants, errors."""

from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch

import mindspore as ms
from mindspore import Tensor, nn

from conftest import set_mode
from models.transformer_flux import FluxTransformer2DModel
from models.transformer_flux import embed_inputs
from models.transformer_flux_withFBCache import enable_fbcache
from pipeline_flux import calculate_shift
from torch_reference import SMALL_CONFIG, make_inputs, relative_max_error, write_torch_checkpoint
from utils import CacheContext, FBCacheConfig

BATCH, HEIGHT, WIDTH, TEXT = 1, 4, 4, 5
TOKENS = HEIGHT * WIDTH
INNER = SMALL_CONFIG["num_attention_heads"] * SMALL_CONFIG["attention_head_dim"]
NUM_BLOCKS = SMALL_CONFIG["num_layers"] + SMALL_CONFIG["num_single_layers"]
STEPS = 8
# The first-block residual of these random weights is very sensitive to the timestep: over sigma
# 1 -> 0 consecutive diffs are 0.7-2 (no threshold separates hits from misses); over 1 -> 0.995 they
# are 0.1-0.2 per step (measured), so cached and computed steps both occur.
SIGMA_SPAN = 0.005
# fp32 ours vs diffusers after a loop of steps (single-call parity is 1e-4; errors compound a little).
FP32_LOOP_BOUND = 2e-4
# Same weights and ops, different execution (graph vs PyNative, fused vs block-by-block).
SAME_MODEL_BOUND = 1e-5

Forward = Callable[[np.ndarray, float], np.ndarray]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return str(write_torch_checkpoint(tmp_path_factory.mktemp("fbcache"), guidance_embeds=True))


@pytest.fixture(scope="module")
def inputs() -> Dict[str, np.ndarray]:
    return make_inputs(BATCH, HEIGHT, WIDTH, TEXT, guidance=True, seed=3).as_dict()


def euler_loop(forward: Forward, latents: np.ndarray, steps: int = STEPS) -> List[np.ndarray]:
    """A flow-matching Euler loop with decreasing timesteps; returns every step's model output."""
    sigmas = np.linspace(1.0, 1.0 - SIGMA_SPAN, steps + 1)
    outputs = []
    for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
        output = forward(latents, float(sigma))
        outputs.append(output)
        latents = (latents + (next_sigma - sigma) * output).astype(np.float32)
    return outputs


def ms_step(model, inputs: Dict[str, np.ndarray]) -> Forward:
    def forward(latents: np.ndarray, sigma: float) -> np.ndarray:
        tensors = {name: None if value is None else Tensor(value) for name, value in inputs.items()}
        tensors["hidden_states"] = Tensor(latents)
        tensors["timestep"] = Tensor(np.full(BATCH, sigma, np.float32))
        return model(**tensors)[0].asnumpy()
    return forward


def cached_model(checkpoint: str, **context_kwargs) -> Tuple[FluxTransformer2DModel, CacheContext]:
    model = FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer")
    context = CacheContext(BATCH, TOKENS, INNER, text_seq_len=TEXT, **context_kwargs)
    enable_fbcache(model, context)
    return model, context


def generate(model, context: CacheContext, inputs) -> Tuple[List[np.ndarray], Dict[str, object]]:
    context.reset()
    outputs = euler_loop(ms_step(model, inputs), inputs["hidden_states"])
    return outputs, context.summary()


def assert_outputs_close(actual: List[np.ndarray], reference: List[np.ndarray], bound: float) -> None:
    errors = [relative_max_error(a, r) for a, r in zip(actual, reference)]
    assert max(errors) <= bound, errors


@pytest.fixture(scope="module")
def uncached_outputs(checkpoint, inputs) -> List[np.ndarray]:
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model = FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer")
    return euler_loop(ms_step(model, inputs), inputs["hidden_states"])


@pytest.fixture(scope="module")
def f1_model(checkpoint):
    """One compiled F1B0 model shared by the tests that reconfigure and reset its context in place."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    return cached_model(checkpoint, residual_diff_threshold=0.0)


# ----- (a) no caching gives the uncached model -----

NEW_VARIANTS = dict(taylorseer_derivative=2, forecast_space="sigma", verify_forecast=True, skip_probe_steps=2,
                    skips_after_compute=2)
# Tests sharing f1_model start from these (a test that switches a variant on must not leak it).
PLAIN_SETTINGS = dict(taylorseer_derivative=0, warmup_steps=0, max_cached_steps=-1, max_continuous_cached_steps=-1,
                      forecast_space="step", verify_forecast=False, skip_probe_steps=0, skips_after_compute=0)


@pytest.mark.parametrize("settings", [dict(residual_diff_threshold=0.0, warmup_steps=0),
                                      dict(residual_diff_threshold=1e9, warmup_steps=STEPS),
                                      dict(residual_diff_threshold=0.0, warmup_steps=0, **NEW_VARIANTS)])
def test_no_cache_settings_equal_uncached_model(f1_model, inputs, uncached_outputs, settings):
    """Bit for bit, also with every forecast, gate and probe-skip variant switched on."""
    model, context = f1_model
    context.configure(**{**PLAIN_SETTINGS, **settings})
    outputs, stats = generate(model, context, inputs)
    assert stats["steps_cached"] == 0 and not any(stats["cached"])
    for output, reference in zip(outputs, uncached_outputs):
        np.testing.assert_array_equal(output, reference)


# ----- (b) decisions and outputs of diffusers' FirstBlockCache -----

def diffusers_fbcache_loop(checkpoint: str, inputs, threshold: float) -> Tuple[List[np.ndarray], List[bool]]:
    """diffusers' FBCache over the same loop; its per-step decisions read from the shared hook state."""
    from diffusers import FluxTransformer2DModel as TorchFlux
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK

    model = TorchFlux.from_pretrained(checkpoint, subfolder="transformer").eval()
    apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
    model._reset_stateful_cache()
    head_hook = model.transformer_blocks[0]._diffusers_hook.get_hook(_FBC_LEADER_BLOCK_HOOK)
    fixed = {name: torch.from_numpy(value) for name, value in inputs.items() if value is not None}
    cached = []

    def forward(latents: np.ndarray, sigma: float) -> np.ndarray:
        with torch.no_grad(), model.cache_context("cond"):
            output = model(**{**fixed, "hidden_states": torch.from_numpy(latents),
                              "timestep": torch.full((BATCH,), sigma)}, return_dict=False)[0]
            cached.append(not head_hook.state_manager.get_state().should_compute)
        return output.numpy()

    return euler_loop(forward, inputs["hidden_states"]), cached


# Measured diffs of this loop (F1B0, threshold 0.3): 0.11 0.26 0.39 0.17 0.35 0.18 0.33, 4 of 8 steps
# cached; the nearest is 0.028 from the threshold, far above fp32 noise (~1e-4).
DIFFUSERS_THRESHOLD = 0.3


def test_matches_diffusers_first_block_cache(checkpoint, f1_model, inputs):
    model, context = f1_model
    context.configure(**PLAIN_SETTINGS, residual_diff_threshold=DIFFUSERS_THRESHOLD)
    outputs, stats = generate(model, context, inputs)
    print(context.format_summary())
    reference, reference_cached = diffusers_fbcache_loop(checkpoint, inputs, DIFFUSERS_THRESHOLD)
    assert stats["cached"] == reference_cached
    assert 0 < stats["steps_cached"] < STEPS
    assert_outputs_close(outputs, reference, FP32_LOOP_BOUND)


# ----- (c) Taylor forecasting is exact for polynomial residuals -----

class TaylorUpdate(nn.Cell):
    """A computed step of the context, without a model: record a residual, advance the step."""

    def __init__(self, context: CacheContext):
        super().__init__()
        self.context = context

    def construct(self, residual: Tensor, sigma: Tensor) -> Tensor:
        self.context.update_taylor(residual, self.context.position(sigma))
        return self.context.finish_step(ms.ops.zeros((), ms.float32))


class TaylorForecast(nn.Cell):
    """A cached step of the context: forecast the residual, advance the step."""

    def __init__(self, context: CacheContext):
        super().__init__()
        self.context = context

    def construct(self, sigma: Tensor) -> Tensor:
        forecast = self.context.forecast(self.context.position(sigma))
        self.context.finish_step(ms.ops.zeros((), ms.float32))
        return forecast


# Exactness needs order + 1 computed steps; after the first four, computed steps are unevenly
# spaced, as cache hits make them (nodes 6, 5, 3, 2 at step 7). The other steps are forecast.
COMPUTED_STEPS = {0, 1, 2, 3, 5, 6, 9}
TAYLOR_STEPS = 12


def flux_sigmas(steps: int) -> np.ndarray:
    """The pipeline's shifted schedule at 128x128 (64 image tokens): unevenly spaced in sigma."""
    mu = calculate_shift(64)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    return np.exp(mu) / (np.exp(mu) + (1 / sigmas - 1))


def positions(space: str) -> np.ndarray:
    return flux_sigmas(TAYLOR_STEPS) if space == "sigma" else np.arange(TAYLOR_STEPS, dtype=np.float64)


def forecast_errors(order: int, space: str, polynomial_in: str) -> List[float]:
    """Relative forecast errors at the cached steps for a residual polynomial of degree `order` in
    `polynomial_in` (step index or sigma), forecast in `space`."""
    rng = np.random.default_rng(order)
    coefficients = rng.standard_normal((order + 1, 1, 2, 3))
    context = CacheContext(1, 2, 3, taylorseer_derivative=order, forecast_space=space)
    update, forecast = TaylorUpdate(context), TaylorForecast(context)
    sigmas, variable = flux_sigmas(TAYLOR_STEPS), positions(polynomial_in)
    errors = []
    for step in range(TAYLOR_STEPS):
        residual = sum(c * variable[step] ** power for power, c in enumerate(coefficients))
        sigma = Tensor(np.float32(sigmas[step]))
        if step in COMPUTED_STEPS:
            update(Tensor(residual.astype(np.float32)), sigma)
        else:
            errors.append(float(np.abs(forecast(sigma).asnumpy() - residual).max() / np.abs(residual).max()))
    return errors


@pytest.mark.parametrize("space", ["step", "sigma"])
@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_polynomial_residual_of_degree_order_is_forecast_exactly(order, space):
    assert max(forecast_errors(order, space, polynomial_in=space)) < 1e-4


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_space_matters_on_the_shifted_schedule(order):
    """A residual polynomial in sigma is not one in the step index: the step-space forecast misses it
    (the sigma-space one is exact, above), so the choice of variable is measurable."""
    assert max(forecast_errors(order, "step", polynomial_in="sigma")) > 1e-2


def test_orders_become_valid_one_per_computed_step():
    """Before order+1 computed steps the forecast uses only the valid orders (no garbage factors)."""
    context = CacheContext(1, 2, 3, taylorseer_derivative=3)
    update, forecast = TaylorUpdate(context), TaylorForecast(context)
    unused_sigma = Tensor(np.float32(0.5))
    first = np.full((1, 2, 3), 2.0, np.float32)
    update(Tensor(first), unused_sigma)
    np.testing.assert_array_equal(forecast(unused_sigma).asnumpy(), first)
    update(Tensor(first + 3.0), unused_sigma)  # step 2, after a forecast at step 1: slope 3 / 2 per step
    assert int(context.forecaster.valid_orders.asnumpy()) == 2
    np.testing.assert_allclose(forecast(unused_sigma).asnumpy(), first + 3.0 + 1.5, rtol=1e-6)


class GateStep(nn.Cell):
    """One step of the gate without a model: the probe and middle residuals are given."""

    def __init__(self, context: CacheContext):
        super().__init__()
        self.context = context

    def construct(self, probe: Tensor, middle: Tensor, sigma: Tensor) -> Tensor:
        position = self.context.position(sigma)
        diff = self.context.probe_diff(probe, position)
        cached = self.context.can_cache(diff)
        if cached:
            self.context.update_on_hit()
        else:
            self.context.update_on_miss(probe, middle, probe, position)
        self.context.finish_step(diff)
        return diff


def lagrange_value(nodes: List[float], values: List[np.ndarray], at: float) -> np.ndarray:
    """The interpolating polynomial through (nodes, values) at `at`, in Lagrange form (independent of
    the context's Newton form)."""
    total = np.zeros_like(values[0])
    for i, (node, value) in enumerate(zip(nodes, values)):
        weight = np.prod([(at - other) / (node - other) for j, other in enumerate(nodes) if j != i])
        total = total + weight * value
    return total


def reference_gate(probes: List[np.ndarray], sigmas: np.ndarray, threshold: float, order: int, verify: bool,
                   space: str) -> Tuple[List[float], List[bool]]:
    """The gate written plainly: diff against the last computed probe, or against the polynomial through
    the last min(order + 1, computed) computed probes."""
    nodes, values, diffs, decisions = [], [], [], []
    for step, probe in enumerate(probes):
        at = sigmas[step] if space == "sigma" else float(step)
        if not values:
            diff, cached = float("nan"), False
        else:
            count = min(order + 1, len(values)) if verify else 1
            reference = lagrange_value(nodes[-count:], values[-count:], at)
            diff = float(np.abs(probe - reference).sum() / np.abs(values[-1]).sum())
            cached = diff < threshold
        if not cached:
            nodes.append(at)
            values.append(probe)
        diffs.append(diff)
        decisions.append(cached)
    return diffs, decisions


@pytest.mark.parametrize("space", ["step", "sigma"])
@pytest.mark.parametrize("order,verify", [(0, True), (1, False), (1, True), (2, True)])
def test_verify_gate_decisions_match_a_plain_computation(order, verify, space):
    """A probe that drifts along a smooth curve plus a jolt at step 6: the verifying gate skips the steps its
    forecast predicts and computes the jolt; decisions and diffs equal the plain reference's."""
    steps, threshold = 10, 0.05
    sigmas = flux_sigmas(steps)
    rng = np.random.default_rng(order)
    base, slope, curve = (rng.standard_normal((1, 2, 3)) for _ in range(3))
    probes = [base + slope * sigmas[k] + curve * sigmas[k] ** 2 + (0.5 * base if k >= 6 else 0) for k in range(steps)]
    context = CacheContext(1, 2, 3, taylorseer_derivative=order, residual_diff_threshold=threshold,
                           forecast_space=space, verify_forecast=verify)
    gate = GateStep(context)
    for step in range(steps):
        gate(Tensor(probes[step].astype(np.float32)), Tensor(probes[step].astype(np.float32)),
             Tensor(np.float32(sigmas[step])))
    stats = context.summary()
    diffs, decisions = reference_gate(probes, sigmas, threshold, order, verify, space)
    assert stats["cached"] == decisions
    np.testing.assert_allclose(stats["diffs"][1:], diffs[1:], rtol=1e-4, atol=1e-6)
    assert not decisions[6], "the jolt must be computed"


def gate_decisions(probes: List[np.ndarray], sigmas: np.ndarray, threshold: float, order: int,
                   verify: bool) -> List[bool]:
    context = CacheContext(1, 2, 3, taylorseer_derivative=order, residual_diff_threshold=threshold,
                           forecast_space="sigma", verify_forecast=verify)
    gate = GateStep(context)
    for probe, sigma in zip(probes, sigmas):
        gate(Tensor(probe.astype(np.float32)), Tensor(probe.astype(np.float32)), Tensor(np.float32(sigma)))
    return context.summary()["cached"]


def test_verifying_at_order_1_caches_a_linear_drift_that_the_raw_gate_computes():
    steps = 10
    sigmas = flux_sigmas(steps)
    rng = np.random.default_rng(7)
    base, slope = rng.standard_normal((1, 2, 3)), rng.standard_normal((1, 2, 3))
    probes = [base + slope * sigma for sigma in sigmas]
    raw, verified = (gate_decisions(probes, sigmas, 0.02, 1, verify) for verify in (False, True))
    assert sum(verified) >= steps - 3 > sum(raw)


# ----- (d) guards -----

@pytest.mark.parametrize("limits,expected", [
    (dict(warmup_steps=3), [False, False, False, True, True, True, True, True]),
    (dict(max_cached_steps=2), [False, True, True, False, False, False, False, False]),
    (dict(max_continuous_cached_steps=2), [False, True, True, False, True, True, False, True]),
    (dict(warmup_steps=2, max_cached_steps=3, max_continuous_cached_steps=1),
     [False, False, True, False, True, False, True, False]),
])
def test_guards_limit_cached_steps(f1_model, inputs, limits, expected):
    model, context = f1_model
    context.configure(**{**PLAIN_SETTINGS, "residual_diff_threshold": 1e9, **limits})
    _, stats = generate(model, context, inputs)
    assert stats["cached"] == expected
    assert stats["steps_cached"] == sum(expected)


@pytest.mark.parametrize("skips,expected", [
    # Per cycle one computed step, one probe-only hit and k - 2 probe-skipping steps (k = 4).
    (dict(skip_probe_steps=2, max_continuous_cached_steps=3), "CCCHSSCH"),
    # Probe-free: after each computed step two steps run no block; the guard computes the next one.
    (dict(skips_after_compute=2, max_continuous_cached_steps=2), "CCCSSCSS"),
])
def test_guards_make_the_documented_fixed_schedules(f1_model, inputs, skips, expected):
    """The fixed schedules of docs/cache_peers.md (Choosing settings): every step may hit (threshold 100) after 3 warm-up steps."""
    model, context = f1_model
    context.configure(**{**PLAIN_SETTINGS, "residual_diff_threshold": 100.0, "warmup_steps": 3, **skips})
    _, stats = generate(model, context, inputs)
    letters = "".join("S" if skipped else ("H" if cached else "C")
                      for cached, skipped in zip(stats["cached"], stats["probe_skipped"]))
    assert letters == expected


# ----- (e) reconfiguration and reset: no recompile, no stale state -----

def generate_with(model, context: CacheContext, inputs, threshold: float, order: int):
    """Reconfigure in place, generate, and check the Taylor state the graph left is live."""
    context.configure(residual_diff_threshold=threshold, taylorseer_derivative=order)
    outputs, stats = generate(model, context, inputs)
    assert int(context.forecaster.valid_orders.asnumpy()) == min(stats["steps_computed"], order + 1)
    return outputs, stats


def test_reconfigure_and_reset_do_not_recompile_or_leak_state(f1_model, inputs):
    model, context = f1_model
    context.configure(**PLAIN_SETTINGS)
    first_outputs, first_stats = generate_with(model, context, inputs, 0.3, 1)
    other_outputs, other_stats = generate_with(model, context, inputs, 0.2, 3)
    order0_outputs, _ = generate_with(model, context, inputs, 0.3, 0)
    again_outputs, again_stats = generate_with(model, context, inputs, 0.3, 1)

    assert len(model.compile_cache) == 1
    assert 0 < first_stats["steps_cached"] < STEPS
    assert other_stats["cached"] != first_stats["cached"]
    # The order-1 forecast differs from plain reuse once two steps were computed (step 4: nodes 0, 3).
    assert relative_max_error(first_outputs[4], order0_outputs[4]) > 1e-3
    np.testing.assert_equal(again_stats, first_stats)
    for output, reference in zip(again_outputs, first_outputs):
        np.testing.assert_array_equal(output, reference)


# ----- (f) graph and PyNative agree -----

@pytest.mark.parametrize("variant", [dict(taylorseer_derivative=2), dict(NEW_VARIANTS, skip_probe_steps=1)])
def test_graph_and_pynative_agree(f1_model, inputs, variant):
    model, context = f1_model
    context.configure(**{**PLAIN_SETTINGS, "residual_diff_threshold": 0.3, **variant})
    graph_outputs, graph_stats = generate(model, context, inputs)
    set_mode("pynative")
    pynative_outputs, pynative_stats = generate(model, context, inputs)
    assert pynative_stats["cached"] == graph_stats["cached"]
    assert 0 < graph_stats["steps_cached"] < STEPS
    np.testing.assert_allclose(pynative_stats["diffs"][1:], graph_stats["diffs"][1:], rtol=1e-5)
    assert_outputs_close(pynative_outputs, graph_outputs, SAME_MODEL_BOUND)


# ----- (g) Fn/Bn variants against a plain reference -----

def reference_fbcache_step(model, state: dict, fn: int, bn: int, threshold: float, latents, sigma, inputs,
                           skip_probe_steps: int = 0):
    """Order-0 First-Block Cache written plainly in PyNative: blocks one by one, state in a dict. After a
    hit, `skip_probe_steps` steps add the stored probe and middle residuals and run no block."""
    tensors = {name: None if value is None else Tensor(value) for name, value in inputs.items()}
    tensors.update(hidden_states=Tensor(latents), timestep=Tensor(np.full(BATCH, sigma, np.float32)))
    image, text, temb, rotary = embed_inputs(model, **tensors)
    blocks = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    embedded = image.asnumpy()
    if state.get("skips_left", 0) > 0:
        state["skips_left"] -= 1
        state["cached"].append(True)
        image = Tensor(embedded + state["probe"] + state["image"])
        return model.proj_out(model.norm_out(image, temb)).asnumpy()
    for block in blocks[:fn]:
        text, image = block(image, text, temb, rotary)
    probe = image.asnumpy() - embedded
    previous = state.get("probe")
    cached = previous is not None and np.abs(probe - previous).mean() / np.abs(previous).mean() < threshold
    if cached:
        image, text = image + Tensor(state["image"]), text + Tensor(state["text"])
        state["skips_left"] = skip_probe_steps
    else:
        start_image, start_text = image.asnumpy(), text.asnumpy()
        for block in blocks[fn:len(blocks) - bn]:
            text, image = block(image, text, temb, rotary)
        state.update(probe=probe, image=image.asnumpy() - start_image, text=text.asnumpy() - start_text)
    for block in blocks[len(blocks) - bn:]:
        text, image = block(image, text, temb, rotary)
    state.setdefault("cached", []).append(bool(cached))
    return model.proj_out(model.norm_out(image, temb)).asnumpy()


@pytest.mark.parametrize("fn,bn", [(2, 1), (1, 2)])
def test_fn_bn_variants_match_plain_reference(checkpoint, inputs, fn, bn):
    threshold = 0.3
    model, context = cached_model(checkpoint, residual_diff_threshold=threshold, fn_compute_blocks=fn,
                                  bn_compute_blocks=bn)
    outputs, stats = generate(model, context, inputs)
    set_mode("pynative")
    plain = FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer")
    state = {}
    reference = euler_loop(
        lambda latents, sigma: reference_fbcache_step(plain, state, fn, bn, threshold, latents, sigma, inputs),
        inputs["hidden_states"])
    assert stats["cached"] == state["cached"]
    assert 0 < stats["steps_cached"] < STEPS
    assert_outputs_close(outputs, reference, SAME_MODEL_BOUND)


# ----- validation errors -----

BAD_SETTINGS = [
    (dict(taylorseer_derivative=-1), "taylorseer_derivative"),
    (dict(taylorseer_derivative=4), "taylorseer_derivative"),
    (dict(max_cached_steps=-2), "max_cached_steps"),
    (dict(max_continuous_cached_steps=1.5), "max_continuous_cached_steps"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(residual_diff_threshold=float("nan")), "residual_diff_threshold"),
    (dict(bn_compute_blocks=1), "text_seq_len"),
    (dict(fn_compute_blocks=0), "fn_compute_blocks"),
    (dict(forecast_space="time"), "forecast_space"),
    (dict(verify_forecast=1), "verify_forecast"),
    # The device counters are int32: 2**32 would wrap to 0, 2**32 + 5 to 5.
    (dict(warmup_steps=2 ** 32), r"warmup_steps: expected an int in \[0, 2147483647\], got 4294967296"),
    (dict(max_cached_steps=2 ** 32 + 5), r"max_cached_steps: expected -1 \(no limit\) or an int in \[0, 2147483647\]"),
    (dict(skip_probe_steps=2 ** 31), "skip_probe_steps: expected an int in"),
    (dict(skips_after_compute=-1), "skips_after_compute: expected an int in"),
]


@pytest.mark.parametrize("kwargs,message", BAD_SETTINGS)
def test_context_rejects_bad_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CacheContext(BATCH, TOKENS, INNER, **kwargs)


@pytest.mark.parametrize("kwargs,message", [case for case in BAD_SETTINGS if case[1] != "text_seq_len"])
def test_config_rejects_the_same_settings_before_any_model_is_loaded(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FBCacheConfig(**kwargs)


def test_configure_rejects_bad_order_and_keeps_old_value():
    context = CacheContext(BATCH, TOKENS, INNER, taylorseer_derivative=1)
    with pytest.raises(ValueError, match=r"expected an int in \[0, 3\], got 5"):
        context.configure(taylorseer_derivative=5)
    assert int(context.taylor_order.asnumpy()) == 1


def test_enable_rejects_more_always_computed_blocks_than_the_model_has(checkpoint):
    model = FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer")
    context = CacheContext(BATCH, TOKENS, INNER, fn_compute_blocks=3, bn_compute_blocks=2, text_seq_len=TEXT)
    with pytest.raises(ValueError, match=f"must be < {NUM_BLOCKS} .*got 3 \\+ 2"):
        enable_fbcache(model, context)


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_forward_rejects_shapes_other_than_the_context(checkpoint, mode):
    set_mode(mode)
    model, _ = cached_model(checkpoint)
    wrong = make_inputs(BATCH + 1, HEIGHT, WIDTH, TEXT, guidance=True).as_dict()
    expected = r"expects \(batch, image tokens, inner dim\) \(1, 16, 32\), got \(2, 16, 32\)"
    with pytest.raises(ValueError, match=expected):
        ms_step(model, wrong)(wrong["hidden_states"], 1.0)


# ----- (h) probe-skipping steps and CFG branches that follow a leader -----

@pytest.mark.parametrize("skips", [1, 2])
def test_probe_skipping_steps_match_plain_reference(checkpoint, inputs, skips):
    """Every step may cache (huge threshold): after each hit, `skips` steps run no block and add the last
    computed probe + middle residuals (order 0) to the embedded input."""
    model, context = cached_model(checkpoint, residual_diff_threshold=1e9, skip_probe_steps=skips)
    outputs, stats = generate(model, context, inputs)
    pattern = [False] + ([True] * (skips + 1)) * STEPS
    assert stats["cached"] == pattern[:STEPS]
    assert stats["probe_skipped"] == ([False] + ([False] + [True] * skips) * STEPS)[:STEPS]
    set_mode("pynative")
    plain = FluxTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer")
    state = {}
    reference = euler_loop(
        lambda latents, sigma: reference_fbcache_step(plain, state, 1, 0, 1e9, latents, sigma, inputs,
                                                      skip_probe_steps=skips),
        inputs["hidden_states"])
    assert state["cached"] == stats["cached"]
    assert_outputs_close(outputs, reference, SAME_MODEL_BOUND)


def test_follower_takes_the_leader_s_decisions():
    """The leader's probes drift slowly (hits), the follower's jump every step (its own gate computes all):
    following, the follower caches exactly where the leader does; not following, it computes every step."""
    steps, sigmas = 8, flux_sigmas(8)
    rng = np.random.default_rng(5)
    base = rng.standard_normal((1, 2, 3))
    slow = [base * (1 + 0.01 * k) for k in range(steps)]
    jumpy = [base * (1 + k) ** 2 for k in range(steps)]
    for follow in (True, False):
        leader = CacheContext(1, 2, 3, residual_diff_threshold=0.05, max_continuous_cached_steps=2)
        follower = CacheContext(1, 2, 3, residual_diff_threshold=0.05, max_continuous_cached_steps=2,
                                leader=leader, follow_leader=follow)
        lead_step, follow_step = GateStep(leader), GateStep(follower)
        for step in range(steps):
            for gate, probe in ((lead_step, slow[step]), (follow_step, jumpy[step])):
                gate(Tensor(probe.astype(np.float32)), Tensor(probe.astype(np.float32)), Tensor(np.float32(sigmas[step])))
        leader_cached = leader.summary()["cached"]
        assert sum(leader_cached) >= 4
        assert follower.summary()["cached"] == (leader_cached if follow else [False] * steps)


def test_follow_leader_needs_a_leader():
    with pytest.raises(ValueError, match="leader"):
        CacheContext(BATCH, TOKENS, INNER, follow_leader=True)
    with pytest.raises(ValueError, match="skip_probe_steps"):
        CacheContext(BATCH, TOKENS, INNER, bn_compute_blocks=1, text_seq_len=TEXT, skip_probe_steps=1)
