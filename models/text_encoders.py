"""What the portable text encoders (models/clip_text.py, models/t5_encoder.py) share: transformers-style
config.json reading, strict loading of a transformers model folder, the embedding table and attention heads.

They replace mindone's CLIPTextModel and T5EncoderModel, which cost ~9 s to import and use `mint` ops
(Embedding, Arange) that MindSpore's CPU backend has only inside a graph, so they failed in PyNative mode.
The portable ones use ops that every backend has in both modes, keep transformers' parameter names (a
transformers folder loads with no renaming), and load strictly: a missing, unexpected or mis-shaped weight
is an error naming it, never a randomly initialised weight.
"""

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Dict, Tuple, Type, TypeVar, Union

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer
from mindspore.nn.utils import no_init_parameters

from .loading import (TRANSFORMERS_WEIGHTS_NAME, CheckpointError, checked_dtype, load_weights, read_json_object,
                      stored_tensors, weight_files, without_ignored)

ConfigT = TypeVar("ConfigT")
ModelT = TypeVar("ModelT", bound=nn.Cell)


def read_config_json(path: Path, config_class: type) -> Dict[str, object]:
    """The keys of a transformers config.json, which must describe a `config_class.MODEL_TYPE` model."""
    content = read_json_object(path)
    found = content.get("model_type")
    if found != config_class.MODEL_TYPE:
        raise CheckpointError(f"{path} has model_type {found!r}, not {config_class.MODEL_TYPE!r}: it does not "
                              f"describe a {config_class.MODEL_CLASS}; give the folder of that model (in a FLUX "
                              "pipeline, text_encoder/ holds the CLIPTextModel and text_encoder_2/ the T5EncoderModel)")
    return content


def config_from_keys(config_class: Type[ConfigT], path: Path, content: Dict[str, object]) -> ConfigT:
    """`config_class` (a dataclass) from those keys of a config.json that it has fields for, type-checked.

    transformers' defaults, the dataclass's, stand for absent optional keys, as in transformers'
    `from_pretrained`: an old config.json without `relative_attention_max_distance` loads as there.
    """
    missing = [field.name for field in fields(config_class) if field.default is MISSING and field.name not in content]
    if missing:
        raise CheckpointError(f"{path} lacks {missing}, which a {config_class.MODEL_CLASS} needs: it is not a "
                              "complete transformers config.json; copy it again from the checkpoint it came from")
    values = {field.name: content[field.name] for field in fields(config_class) if field.name in content}
    for field in fields(config_class):
        value = values.get(field.name, field.default)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not (is_int if field.type is int else is_int or isinstance(value, float) if field.type is float
                else isinstance(value, field.type)):
            raise CheckpointError(f"{path}: {field.name} is {value!r}, but a {config_class.MODEL_CLASS} needs a "
                                  f"{field.type.__name__} there; the file is damaged or not a transformers config")
    try:
        return config_class(**values)
    except CheckpointError as error:  # an unsupported option: say which file asks for it
        raise CheckpointError(f"{path}: {error}") from None


def load_transformers_model(cls: Type[ModelT], config_class: type, folder: Union[str, Path],
                            mindspore_dtype: ms.Type, ignored: Tuple[str, ...]) -> ModelT:
    """`cls` built from `folder`'s config.json with every weight of its model.safetensors (single or
    sharded), each cast to `mindspore_dtype` as it is read. Stored names starting with one of `ignored`
    (buffers or tied copies that transformers skips too) are neither loaded nor reported as unexpected."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist (expected config.json and model.safetensors)")
    dtype = checked_dtype(mindspore_dtype)
    config = config_class.from_json_file(folder / "config.json")
    stored = without_ignored(stored_tensors(weight_files(folder, TRANSFORMERS_WEIGHTS_NAME)), ignored)
    with no_init_parameters():
        model = cls(config)
    load_weights(model, stored, folder, dtype)
    model.set_train(False)
    return model


class Embedding(nn.Cell):
    """A lookup table named `weight` (torch.nn.Embedding), read with `ops.gather`: it has a kernel on every
    backend in both modes, where `mint.nn.Embedding` has none on CPU outside a graph."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.weight = Parameter(initializer("zeros", (num_embeddings, dim), ms.float32), name="weight")

    def construct(self, ids: Tensor) -> Tensor:
        return ops.gather(self.weight, ids, 0)


def split_heads(x: Tensor, heads: int) -> Tensor:
    """(batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)."""
    batch, tokens, _ = x.shape
    return x.reshape(batch, tokens, heads, -1).swapaxes(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(batch, heads, tokens, head_dim) -> (batch, tokens, heads * head_dim)."""
    batch, _, tokens, _ = x.shape
    return x.swapaxes(1, 2).reshape(batch, tokens, -1)
