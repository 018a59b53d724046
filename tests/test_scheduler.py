"""models/scheduler.py against diffusers' (0.38, torch) FlowMatchEulerDiscreteScheduler: the same sigmas
and timesteps bit for bit, the same Euler loop bit for bit, and a strictly read config."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler as TorchScheduler

import mindspore as ms

from models.scheduler import FlowMatchEulerDiscreteScheduler
from pipeline_flux import calculate_shift

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "flux-emoji" / "scheduler"
DEV = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000, shift=3.0,
           use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
           max_image_seq_len=4096)
SCHNELL = dict(DEV, use_dynamic_shifting=False, shift=1.0)
CONFIGS = {
    "shipped": json.loads((SHIPPED / "scheduler_config.json").read_text()),
    "dev": DEV,
    "schnell": SCHNELL,
    # Beyond FLUX's own configs: a static non-unit shift, the terminal stretch, the linear time shift.
    "static_shift3": dict(SCHNELL, shift=3.0),
    "shift_terminal": dict(DEV, shift_terminal=0.1),
    "linear": dict(DEV, time_shift_type="linear"),
}
STEPS = (1, 4, 28, 50, 100)
# Image token counts (a 1024x1024 image has 4096): below, at and between FLUX's base and max, and above.
IMAGE_TOKENS = (64, 256, 1024, 4096, 9216)
TORCH_DTYPES = {ms.float32: torch.float32, ms.float16: torch.float16, ms.bfloat16: torch.bfloat16}


def flux_mu(config: dict, image_tokens: int) -> float:
    """mu as FluxPipeline computes it (with the pipeline's own calculate_shift)."""
    return calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                           config.get("base_shift", 0.5), config.get("max_shift", 1.15))


def steps_for(name: str):
    """A 1-step FLUX schedule ends at sigma 1, which shift_terminal cannot stretch (diffusers gives NaN,
    ours refuses: test_misuse_is_refused)."""
    return STEPS[1:] if "shift_terminal" in CONFIGS[name] else STEPS


def assert_same_schedule(ours: FlowMatchEulerDiscreteScheduler, reference: TorchScheduler) -> None:
    assert ours.host_sigmas.dtype == ours.host_timesteps.dtype == np.float32
    assert np.array_equal(ours.host_sigmas, reference.sigmas.numpy()), (ours.host_sigmas, reference.sigmas)
    assert np.array_equal(ours.host_timesteps, reference.timesteps.numpy()), (ours.host_timesteps,
                                                                             reference.timesteps)
    assert np.array_equal(ours.sigmas.asnumpy(), ours.host_sigmas)
    assert np.array_equal(ours.timesteps.asnumpy(), ours.host_timesteps)
    assert ours.num_inference_steps == reference.num_inference_steps == len(ours.host_timesteps)


@pytest.mark.parametrize("name", CONFIGS)
def test_flux_sigmas_match_diffusers_bit_for_bit(name):
    """FluxPipeline's schedule: sigmas = linspace(1, 1/n, n) shifted by mu from the token count."""
    config = CONFIGS[name]
    ours, reference = FlowMatchEulerDiscreteScheduler.from_config(config), TorchScheduler.from_config(config)
    for steps in steps_for(name):
        for tokens in IMAGE_TOKENS:
            sigmas = np.linspace(1.0, 1 / steps, steps)
            mu = flux_mu(config, tokens)
            reference.set_timesteps(sigmas=sigmas, mu=mu)
            ours.set_timesteps(sigmas=sigmas.tolist(), mu=mu)  # as pipeline_flux.prepare_timesteps passes them
            assert_same_schedule(ours, reference)
            ours.set_timesteps(sigmas=sigmas, mu=mu)
            assert_same_schedule(ours, reference)


@pytest.mark.parametrize("name", CONFIGS)
def test_default_sigmas_match_diffusers_bit_for_bit(name):
    """set_timesteps(num_inference_steps): the float64 linspace between the training schedule's ends."""
    config = CONFIGS[name]
    ours, reference = FlowMatchEulerDiscreteScheduler.from_config(config), TorchScheduler.from_config(config)
    assert (ours.sigma_max, ours.sigma_min) == (reference.sigma_max, reference.sigma_min)
    for steps in steps_for(name):
        for mu in (0.3, 0.5, 0.8, 1.15, 1.4):
            reference.set_timesteps(num_inference_steps=steps, mu=mu)
            ours.set_timesteps(num_inference_steps=steps, mu=mu)
            assert_same_schedule(ours, reference)


def test_shipped_folder_loads_with_its_options():
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(str(SHIPPED))
    assert FlowMatchEulerDiscreteScheduler.from_pretrained(str(SHIPPED.parent), subfolder="scheduler").config == \
        scheduler.config
    config = scheduler.config
    assert (config.shift, config["use_dynamic_shifting"], config.get("base_image_seq_len", 256)) == (3.0, True, 256)
    assert config.get("max_image_seq_len", 0) == 4096 and config["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    assert config["use_karras_sigmas"] is False  # diffusers' defaults fill what the file leaves out
    with pytest.raises(TypeError, match="read-only"):
        config["shift"] = 1.0


@pytest.mark.parametrize("dtype", [ms.float32, ms.float16, ms.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["dev", "schnell"])
def test_euler_loop_matches_diffusers_bit_for_bit(name, dtype):
    """A 4-step loop on random latents and velocities, diffusers' step (timestep lookup from the begin
    index, as FluxPipeline) against ours (the step index): equal bit for bit in every dtype, since both
    form the update in the model output's dtype and the sum in float32 (see step's docstring)."""
    config, steps = CONFIGS[name], 4
    ours, reference = FlowMatchEulerDiscreteScheduler.from_config(config), TorchScheduler.from_config(config)
    sigmas, mu = np.linspace(1.0, 1 / steps, steps), flux_mu(config, 1024)
    reference.set_timesteps(sigmas=sigmas, mu=mu)
    reference.set_begin_index(0)
    ours.set_timesteps(sigmas=sigmas.tolist(), mu=mu)
    rng = np.random.default_rng(0)
    torch_dtype = TORCH_DTYPES[dtype]

    def draw() -> torch.Tensor:
        return torch.from_numpy(rng.standard_normal((2, 64, 16)).astype(np.float32)).to(torch_dtype)

    torch_sample = draw()
    sample = ms.Tensor(torch_sample.float().numpy()).astype(dtype)
    for index, timestep in enumerate(reference.timesteps):
        velocity = draw()
        torch_sample = reference.step(velocity, timestep, torch_sample, return_dict=False)[0]
        sample = ours.step(ms.Tensor(velocity.float().numpy()).astype(dtype), index, sample)
        assert sample.dtype == dtype and torch_sample.dtype == torch_dtype
        assert np.array_equal(sample.astype(ms.float32).asnumpy(), torch_sample.float().numpy()), index


def test_half_precision_update_is_formed_in_the_model_dtype():
    """Why float16 matches diffusers bit for bit: a float32 product (the update upcast before the
    multiply) would differ from diffusers by one float16 ulp in 10-15% of the elements."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(DEV)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25], mu=0.7)
    rng = np.random.default_rng(1)
    sample, velocity = (rng.standard_normal(4096).astype(np.float16) for _ in range(2))
    ours = scheduler.step(ms.Tensor(velocity), 1, ms.Tensor(sample)).asnumpy()
    step_size = np.float32(scheduler.host_sigmas[2] - scheduler.host_sigmas[1])
    half_update = (sample.astype(np.float32) + (np.float16(step_size) * velocity).astype(np.float32))
    float32_update = sample.astype(np.float32) + step_size * velocity.astype(np.float32)
    assert np.array_equal(ours, half_update.astype(np.float16))
    assert 0 < np.mean(ours != float32_update.astype(np.float16)) < 0.3


@pytest.mark.parametrize("overrides, message", [
    (dict(_class_name="EulerDiscreteScheduler"), "describes a EulerDiscreteScheduler, not a FlowMatchEuler"),
    (dict(use_flow_sigmas=True, prediction_type="flow"), r"unknown keys \['prediction_type', 'use_flow_sigmas'\]"),
    (dict(use_karras_sigmas=True), "use_karras_sigmas=True is not supported; only false"),
    (dict(use_exponential_sigmas=True), "use_exponential_sigmas=True is not supported; only false"),
    (dict(use_beta_sigmas=True), "use_beta_sigmas=True is not supported; only false"),
    (dict(invert_sigmas=True), "invert_sigmas=True is not supported; only false"),
    (dict(stochastic_sampling=True), "stochastic_sampling=True is not supported; only false"),
    (dict(use_dynamic_shifting="yes"), "use_dynamic_shifting='yes' is not supported; it must be true or false"),
    (dict(time_shift_type="cosine"), r"time_shift_type='cosine' is not supported; .*'exponential', 'linear'"),
    (dict(shift_terminal=1.0), r"shift_terminal=1.0 is not supported; .*\[0, 1\)"),
    (dict(shift="3.0"), "shift='3.0' is not supported; it must be a positive number"),
    (dict(num_train_timesteps=0), "num_train_timesteps=0 is not supported; it must be a positive integer"),
    (dict(base_shift=None), "base_shift=None is not supported; it must be a number"),
    (dict(max_image_seq_len=256), "base_image_seq_len=256 is not supported; it must be below max_image_seq_len"),
])
def test_config_is_read_strictly(tmp_path, overrides, message):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(dict(DEV, **overrides)))
    with pytest.raises(ValueError, match=message) as error:
        FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path))
    assert str(tmp_path / "scheduler_config.json") in str(error.value)
    with pytest.raises(ValueError, match=message):
        FlowMatchEulerDiscreteScheduler.from_config(dict(DEV, **overrides))


def test_missing_or_damaged_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="scheduler_config.json is missing"):
        FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path))
    (tmp_path / "scheduler_config.json").write_text('{"shift": 3.0,')
    with pytest.raises(ValueError, match="not valid JSON"):
        FlowMatchEulerDiscreteScheduler.from_pretrained(str(tmp_path))


def test_misuse_is_refused():
    dynamic, static = FlowMatchEulerDiscreteScheduler.from_config(DEV), FlowMatchEulerDiscreteScheduler(shift=1.0)
    with pytest.raises(ValueError, match="mu must be passed when use_dynamic_shifting"):
        dynamic.set_timesteps(num_inference_steps=4)
    with pytest.raises(ValueError, match="num_inference_steps=3 but 4 sigmas"):
        static.set_timesteps(num_inference_steps=3, sigmas=[1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="needs num_inference_steps or sigmas"):
        static.set_timesteps()
    with pytest.raises(ValueError, match=r"sigmas must lie in \[0, 1\]"):
        static.set_timesteps(sigmas=[2.0, 1.0])
    reference = TorchScheduler.from_config(CONFIGS["shift_terminal"])
    with np.errstate(invalid="ignore"):
        reference.set_timesteps(sigmas=[1.0], mu=0.5)
    assert torch.isnan(reference.sigmas[0])
    with pytest.raises(ValueError, match="cannot stretch a schedule that ends at sigma 1"):
        FlowMatchEulerDiscreteScheduler.from_config(CONFIGS["shift_terminal"]).set_timesteps(sigmas=[1.0], mu=0.5)
    latents = ms.Tensor(np.zeros((1, 4, 8), np.float32))
    with pytest.raises(RuntimeError, match="call set_timesteps before step"):
        static.step(latents, 0, latents)
    static.set_timesteps(num_inference_steps=4)
    with pytest.raises(IndexError, match="step_index 4 is outside the 4 steps"):
        static.step(latents, 4, latents)
    with pytest.raises(TypeError, match="step_index must be an integer"):
        static.step(latents, static.timesteps[0], latents)
