"""Diffusers-style model configs for the portable models, without mindone.

The portable transformer and VAE took `ConfigMixin` / `ModelMixin` / `register_to_config` from
mindone.diffusers only for their config; importing mindone for that cost the CLI about 7 s of its
start (mindone imports its whole model zoo). What the models need is small: `Model.from_config(dict)`,
`model.config` (attribute and key access, read-only) holding every `__init__` argument, and
`save_config(folder)` writing a `config.json` that diffusers and mindone read back.
"""

import functools
import inspect
import json
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, TypeVar

ModelT = TypeVar("ModelT", bound="ConfigMixin")
# The diffusers release whose config format save_config writes (the one the tests load it with).
DIFFUSERS_VERSION = "0.38.0"


class FrozenConfig(dict):
    """A read-only dict whose keys are also attributes (`config.in_channels`), as diffusers' FrozenDict."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"the config has no key {name!r}") from None

    def _refuse(self, *args, **kwargs):
        raise TypeError("a model's config is read-only: build a new model with from_config to change it")

    __setitem__ = __delitem__ = __setattr__ = update = pop = clear = setdefault = _refuse


def init_parameters(cls: type) -> Dict[str, inspect.Parameter]:
    """The `__init__` parameters of a config class, without `self`."""
    init = inspect.unwrap(cls.__init__)
    return {name: parameter for name, parameter in inspect.signature(init).parameters.items() if name != "self"}


def register_to_config(init: Callable) -> Callable:
    """Record every `__init__` argument (defaults included) in `self.config` once the model is built."""

    @functools.wraps(init)
    def wrapper(self, *args, **kwargs):
        bound = inspect.signature(init).bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        arguments = {name: value for name, value in bound.arguments.items() if name != "self"}
        self.register_to_config(**arguments)

    return wrapper


class ConfigMixin:
    """`from_config`, `config` and `save_config` for a model whose `__init__` is `@register_to_config`."""

    config_name = "config.json"

    @classmethod
    def from_config(cls: type, config: Mapping[str, Any]) -> ModelT:
        """Build from a config dict. Keys starting with `_` (class name, library version, source path) are
        kept in the config; keys that are no `__init__` argument are kept too (a folder round-trips) but
        warned about by name, since this model builds nothing from them."""
        parameters = init_parameters(cls)
        unknown = sorted(key for key in config if not key.startswith("_") and key not in parameters)
        if unknown:
            warnings.warn(f"{cls.__name__} config keys {unknown} are not arguments of this model and are ignored",
                          UserWarning, stacklevel=2)
        model = cls(**{key: value for key, value in config.items() if key in parameters})
        model.register_to_config(**{key: value for key, value in config.items() if key not in parameters})
        return model

    def register_to_config(self, **values: Any) -> None:
        config = dict(getattr(self, "_config", None) or {}, **values)
        object.__setattr__(self, "_config", FrozenConfig(config))

    @property
    def config(self) -> FrozenConfig:
        return self._config

    def save_config(self, folder: str) -> Path:
        """Write `folder/config.json` with the class name and every argument, as diffusers' save_config."""
        target = Path(folder)
        target.mkdir(parents=True, exist_ok=True)
        values = {key: list(value) if isinstance(value, tuple) else value for key, value in self.config.items()
                  if key != "_name_or_path"}
        values.update(_class_name=type(self).__name__, _diffusers_version=DIFFUSERS_VERSION)
        path = target / self.config_name
        path.write_text(json.dumps(dict(sorted(values.items())), indent=2) + "\n", encoding="utf-8")
        return path
