"""FLUX's flow-matching Euler scheduler, without mindone (whose import costs the CLI about 9 s).

A portable replacement for diffusers' (0.38) and mindone's `FlowMatchEulerDiscreteScheduler` as
FLUX pipelines use it: `from_pretrained(folder)`, `set_timesteps(sigmas=..., mu=...)` and the Euler
`step`. Sigmas and timesteps are computed on the host with the same numpy/float32 operations, in the
same order, as diffusers, so they are bit-identical to its schedule (tests/test_scheduler.py compares
them with np.array_equal). Differences from diffusers' API, all deliberate:

- The config is read strictly: a wrong `_class_name`, a key that is no option of the scheduler, a
  value of the wrong type, or an option this scheduler does not implement (Karras / exponential / beta
  sigmas, inverted sigmas, stochastic sampling) raise a ValueError naming the key, the value and what is
  supported, where diffusers warns about unknown keys and silently takes such options.
- `step(model_output, step_index, sample)` takes the step's index, not its timestep: no lookup of
  the timestep among `timesteps` (a host sync per step in diffusers when the begin index is unset),
  and no hidden step counter to reset. It returns the new sample itself, not an output object or a
  tuple (diffusers' `return_dict`).
- No `set_begin_index`, `scale_noise`, `set_shift`, custom `timesteps` or per-token timesteps: FLUX's
  text-to-image pipeline uses none of them.
"""

import math
import numbers
import operator
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

import mindspore as ms

from .config_mixin import FrozenConfig
from .loading import CheckpointError, model_folder, read_json_object

CLASS_NAME = "FlowMatchEulerDiscreteScheduler"
CONFIG_NAME = "scheduler_config.json"
# diffusers' __init__ defaults.
DEFAULTS: Dict[str, Any] = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
    use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
    time_shift_type="exponential", stochastic_sampling=False,
)
BOOLEAN_KEYS = ("use_dynamic_shifting", "invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas",
                "use_beta_sigmas", "stochastic_sampling")
# Options diffusers has but this scheduler refuses when enabled, with the reason.
UNSUPPORTED = {
    "use_karras_sigmas": "Karras sigmas are no FLUX schedule",
    "use_exponential_sigmas": "exponential sigmas are no FLUX schedule",
    "use_beta_sigmas": "beta sigmas are no FLUX schedule",
    "invert_sigmas": "inverted sigmas (rising from 0 to 1) are no FLUX schedule",
    "stochastic_sampling": "stochastic sampling draws noise at each step; FLUX samples deterministically",
}
TIME_SHIFT_TYPES = ("exponential", "linear")


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_config(config: Mapping[str, Any], source: str) -> Dict[str, Any]:
    """Every option of `config` checked and completed with diffusers' defaults. Keys starting with `_`
    (`_class_name`, `_diffusers_version`, ...) are metadata, kept as they are; `_class_name` must name
    this scheduler."""
    found_class = config.get("_class_name", CLASS_NAME)
    if found_class != CLASS_NAME:
        raise CheckpointError(f"{source} describes a {found_class}, not a {CLASS_NAME} (FLUX's scheduler)")
    unknown = sorted(key for key in config if not key.startswith("_") and key not in DEFAULTS)
    if unknown:
        raise CheckpointError(f"{source}: unknown keys {unknown}; a {CLASS_NAME} has the options {sorted(DEFAULTS)}")
    values = {**DEFAULTS, **config}

    def refuse(key: str, supported: str) -> CheckpointError:
        return CheckpointError(f"{source}: {key}={values[key]!r} is not supported; {supported}")

    for key in BOOLEAN_KEYS:
        if not isinstance(values[key], bool):
            raise refuse(key, "it must be true or false")
    for key, reason in UNSUPPORTED.items():
        if values[key]:
            raise refuse(key, f"only false is implemented ({reason})")
    train_steps = values["num_train_timesteps"]
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps <= 0:
        raise refuse("num_train_timesteps", "it must be a positive integer")
    if not is_number(values["shift"]) or values["shift"] <= 0:
        raise refuse("shift", "it must be a positive number")
    # FLUX's pipeline computes mu from these four whether or not the shift is dynamic.
    for key in ("base_shift", "max_shift"):
        if not is_number(values[key]):
            raise refuse(key, "it must be a number (the pipeline computes mu from it)")
    for key in ("base_image_seq_len", "max_image_seq_len"):
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise refuse(key, "it must be a positive integer (the pipeline computes mu from it)")
    if values["base_image_seq_len"] >= values["max_image_seq_len"]:
        raise refuse("base_image_seq_len", f"it must be below max_image_seq_len={values['max_image_seq_len']} "
                                           "(mu is interpolated between them)")
    terminal = values["shift_terminal"]
    if terminal is not None and (not is_number(terminal) or not 0 <= terminal < 1):
        raise refuse("shift_terminal", "it must be null or a number in [0, 1) (0 and null: no stretching)")
    if values["time_shift_type"] not in TIME_SHIFT_TYPES:
        raise refuse("time_shift_type", f"it must be one of {list(TIME_SHIFT_TYPES)}")
    return values


class FlowMatchEulerDiscreteScheduler:
    """Flow-matching Euler sampler: sigma falls from (about) 1 to 0; each step moves the sample along the
    model's velocity, `x + (sigma_next - sigma) * v`.

    After `set_timesteps`:
    - `host_sigmas` (n + 1, with the trailing 0) and `host_timesteps` (n, sigma * num_train_timesteps)
      are numpy float32 arrays, bit-identical to diffusers' `sigmas` and `timesteps`;
    - `sigmas` and `timesteps` are the same values as MindSpore float32 tensors (the pipeline feeds
      `timesteps[i] / 1000` to the transformer);
    - `num_inference_steps` is n.
    """

    config_name = CONFIG_NAME
    order = 1

    def __init__(self, **options: Any):
        """Options as diffusers' `__init__` (same names and defaults), checked by `check_config`."""
        self._config = FrozenConfig(check_config(options, f"{CLASS_NAME}({', '.join(sorted(options))})"))
        train_steps = self._config["num_train_timesteps"]
        # diffusers' training schedule, of which set_timesteps(num_inference_steps) uses the two ends:
        # linspace(1, N, N) reversed / N, statically shifted unless the shift is dynamic (all float32).
        ends = np.array([train_steps, 1], dtype=np.float32) / train_steps
        if not self._config["use_dynamic_shifting"]:
            ends = self.shift * ends / (1 + (self.shift - 1) * ends)
        self.sigma_max, self.sigma_min = float(ends[0]), float(ends[1])
        self.num_inference_steps: Optional[int] = None
        self.host_sigmas: Optional[np.ndarray] = None
        self.host_timesteps: Optional[np.ndarray] = None
        self.sigmas: Optional[ms.Tensor] = None
        self.timesteps: Optional[ms.Tensor] = None
        self._step_sizes: List[float] = []

    @classmethod
    def from_config(cls, config: Mapping[str, Any], source: Optional[str] = None) -> "FlowMatchEulerDiscreteScheduler":
        """From a config dict (`_class_name` and other `_` metadata keys allowed and kept)."""
        values = check_config(config, source or f"the {CLASS_NAME} config")
        scheduler = cls(**{key: values[key] for key in DEFAULTS})
        scheduler._config = FrozenConfig(values)
        return scheduler

    @classmethod
    def from_pretrained(cls, path: Union[str, Path],
                        subfolder: Optional[str] = None) -> "FlowMatchEulerDiscreteScheduler":
        """From `<path>[/<subfolder>]/scheduler_config.json` (a diffusers scheduler folder)."""
        config_path = model_folder(str(path), subfolder) / CONFIG_NAME
        return cls.from_config(read_json_object(config_path), source=str(config_path))

    @property
    def config(self) -> FrozenConfig:
        """The options (defaults included) and metadata keys; read-only, with `.get` and attribute access."""
        return self._config

    @property
    def shift(self) -> float:
        return self._config["shift"]

    def time_shift(self, mu: float, sigma: float, t: np.ndarray) -> np.ndarray:
        """diffusers' resolution-dependent shift of the sigmas `t` (exponential: mu is a log-shift)."""
        if self._config["time_shift_type"] == "exponential":
            return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)
        return mu / (mu + (1 / t - 1) ** sigma)

    def stretch_shift_to_terminal(self, t: np.ndarray) -> np.ndarray:
        """Stretch the schedule so that its last sigma is `shift_terminal` (as diffusers)."""
        one_minus_z = 1 - t
        if one_minus_z[-1] == 0:
            raise ValueError(f"shift_terminal={self._config['shift_terminal']} cannot stretch a schedule that ends "
                             "at sigma 1 (diffusers divides by zero there): give more steps or lower sigmas")
        scale_factor = one_minus_z[-1] / (1 - self._config["shift_terminal"])
        return 1 - (one_minus_z / scale_factor)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, sigmas: Optional[Sequence[float]] = None,
                      mu: Optional[float] = None) -> None:
        """The schedule of `num_inference_steps` steps, or of the given `sigmas` (one per step, before the
        shift; FLUX passes linspace(1, 1/n, n)), shifted by `mu` when the shift is dynamic. Each float
        operation is diffusers': custom sigmas are float32 throughout, the default linspace is float64
        until the final rounding to float32."""
        config = self._config
        if config["use_dynamic_shifting"] and mu is None:
            raise ValueError("mu must be passed when use_dynamic_shifting is true (FLUX's pipeline computes it "
                             "from the image's token count)")
        if mu is not None and not is_number(mu):
            raise ValueError(f"mu must be a finite number, got {mu!r}")
        if mu is not None and config["use_dynamic_shifting"] and config["time_shift_type"] == "linear" and mu <= 0:
            raise ValueError(f"mu must be positive for the linear time shift, got {mu!r}")
        if num_inference_steps is not None:
            try:
                num_inference_steps = operator.index(num_inference_steps)
            except TypeError:
                raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}") from None
            if num_inference_steps < 1:
                raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        train_steps = config["num_train_timesteps"]

        if sigmas is None:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps or sigmas")
            timesteps = np.linspace(self.sigma_max * train_steps, self.sigma_min * train_steps, num_inference_steps)
            sigmas = timesteps / train_steps
        else:
            sigmas = np.array(sigmas).astype(np.float32)
            if sigmas.ndim != 1 or len(sigmas) == 0:
                raise ValueError(f"sigmas must be a non-empty list of numbers, got shape {sigmas.shape}")
            if num_inference_steps is not None and num_inference_steps != len(sigmas):
                raise ValueError(f"num_inference_steps={num_inference_steps} but {len(sigmas)} sigmas were given: "
                                 "pass one of them, or both agreeing")
            if not (np.isfinite(sigmas).all() and (sigmas >= 0).all() and (sigmas <= 1).all()):
                raise ValueError(f"sigmas must lie in [0, 1], got {sigmas.tolist()}")
            num_inference_steps = len(sigmas)

        # A sigma of 0 gives 1 / 0 = inf in the time shift and a shifted sigma of 0, as in diffusers.
        with np.errstate(divide="ignore"):
            if config["use_dynamic_shifting"]:
                sigmas = self.time_shift(mu, 1.0, sigmas)
            else:
                sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        if config["shift_terminal"]:
            sigmas = self.stretch_shift_to_terminal(sigmas)

        sigmas = sigmas.astype(np.float32)
        timesteps = sigmas * train_steps
        self.num_inference_steps = num_inference_steps
        self.host_sigmas = np.concatenate([sigmas, np.zeros(1, dtype=np.float32)])
        self.host_timesteps = timesteps
        self.sigmas = ms.Tensor(self.host_sigmas)
        self.timesteps = ms.Tensor(self.host_timesteps)
        # diffusers' `sigma_next - sigma`, a float32 difference; as Python floats (exact) they reach the
        # device with each step's multiply, without a host sync or an indexing kernel.
        self._step_sizes = [float(size) for size in self.host_sigmas[1:] - self.host_sigmas[:-1]]

    def step(self, model_output: ms.Tensor, step_index: int, sample: ms.Tensor) -> ms.Tensor:
        """The sample after step `step_index` (0-based), `sample + (sigma_next - sigma) * model_output`,
        returned as a tensor of model_output's dtype (diffusers returns it in an output object or tuple).

        The arithmetic is diffusers': the sum is float32 (sample upcast), and the update
        `(sigma_next - sigma) * model_output` is formed in model_output's dtype, because torch (like
        MindSpore) does not let a 0-dim float32 tensor promote a float16/bfloat16 one. So a half-precision
        model output gets the step size rounded to its dtype and a rounded product, bit for bit as
        diffusers and mindone; a float32 one is float32 throughout.
        """
        if self.num_inference_steps is None:
            raise RuntimeError("call set_timesteps before step")
        try:
            index = operator.index(step_index)
        except (TypeError, ValueError):  # a MindSpore float tensor raises ValueError here
            raise TypeError(f"step_index must be an integer (the step's position), got {step_index!r}") from None
        if not 0 <= index < self.num_inference_steps:
            raise IndexError(f"step_index {index} is outside the {self.num_inference_steps} steps of the schedule")
        update = model_output * self._step_sizes[index]
        return (sample.astype(ms.float32) + update.astype(ms.float32)).astype(model_output.dtype)

    def __len__(self) -> int:
        return self._config["num_train_timesteps"]
