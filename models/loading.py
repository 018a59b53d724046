"""Strict loading of diffusers-format model folders (config.json + safetensors, single or sharded).

mindone's loader only warns about missing or unexpected weights and leaves such parameters
uninitialised. Here every problem is found from the config and the safetensors headers before any
weight is read, and raised with the file, the key and what was expected.
"""

import json
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple, Type, TypeVar

import mindspore as ms
from mindspore import Parameter, Tensor, nn
from mindspore.nn.utils import no_init_parameters
from safetensors import safe_open

from .checkpoint_files import RESTORE, CheckpointError, read_json_object  # noqa: F401 (re-exported)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"
SUPPORTED_DTYPES = (ms.float32, ms.float16, ms.bfloat16)
MAX_LISTED_KEYS = 10

ModelT = TypeVar("ModelT")
StoredTensors = Dict[str, Tuple[Tuple[int, ...], Path]]


def model_folder(path: str, subfolder: Optional[str]) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} does not exist (expected a diffusers-format folder)")
    folder = root / subfolder if subfolder else root
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {root} has no '{subfolder}/' subfolder")
    return folder


def read_config(folder: Path, class_name: str, required_keys: Tuple[str, ...]) -> dict:
    config_path = folder / "config.json"
    config = read_json_object(config_path)
    found_class = config.get("_class_name", class_name)
    if found_class != class_name:
        raise CheckpointError(f"{config_path} describes a {found_class}, not a {class_name}")
    missing = [key for key in required_keys if key not in config]
    if missing:
        raise CheckpointError(f"{config_path} is not a {class_name} config: it lacks {missing}")
    return config


def weight_files(folder: Path, weights_name: str = WEIGHTS_NAME) -> List[Path]:
    """The safetensors files of a folder: the shards its index names, or the single weights file
    (diffusers names it diffusion_pytorch_model.safetensors, transformers model.safetensors)."""
    index_name = weights_name + ".index.json"
    index_path = folder / index_name
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise CheckpointError(f"{index_path} is not a safetensors index with a weight_map: {error}") from error
        files = [folder / name for name in sorted(set(weight_map.values()))]
        absent = [str(file) for file in files if not file.is_file()]
        if absent:
            raise FileNotFoundError(f"{index_path} lists shards that are missing: {absent}")
        return files
    single = folder / weights_name
    if not single.is_file():
        raise FileNotFoundError(f"{folder} has neither {weights_name} nor {index_name}")
    return [single]


def read_safetensors_header(file: Path) -> Dict[str, Tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header, checking that the file holds all their bytes."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file} is not a safetensors file: it is {size} bytes long")
        (header_length,) = struct.unpack("<Q", prefix)
        if header_length > size - 8:
            raise CheckpointError(f"{file} is corrupt: its header claims {header_length} bytes, the file has {size}")
        try:
            header = json.loads(handle.read(header_length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{file} is corrupt: unreadable safetensors header ({error})") from error
    header.pop("__metadata__", None)
    data_end = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_length + data_end > size:
        raise CheckpointError(f"{file} is truncated: it needs {8 + header_length + data_end} bytes, it has {size}")
    return {name: tuple(entry["shape"]) for name, entry in header.items()}


def stored_tensors(files: List[Path]) -> StoredTensors:
    stored: StoredTensors = {}
    for file in files:
        for name, shape in read_safetensors_header(file).items():
            if name in stored:
                raise CheckpointError(f"weight {name} is stored twice: in {stored[name][1]} and in {file}")
            stored[name] = (shape, file)
    return stored


def listed_names(keys: List[str]) -> str:
    """Sorted names for an error message, cut after MAX_LISTED_KEYS (a foreign checkpoint lists thousands)."""
    shown = ", ".join(sorted(keys)[:MAX_LISTED_KEYS])
    more = len(keys) - MAX_LISTED_KEYS
    return shown + (f" and {more} more" if more > 0 else "")


def check_weights_match(expected: Dict[str, Tuple[int, ...]], stored: StoredTensors, folder: Path) -> None:
    missing = [name for name in expected if name not in stored]
    if missing:
        raise CheckpointError(f"{folder} lacks {len(missing)} weight(s) the model needs: {listed_names(missing)}")
    unexpected = [f"{name} (in {stored[name][1].name})" for name in stored if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{folder} holds {len(unexpected)} weight(s) this model does not have: {listed_names(unexpected)}; "
            "is config.json the one these weights were saved with?"
        )
    for name, shape in expected.items():
        stored_shape, file = stored[name]
        if stored_shape != shape:
            raise CheckpointError(
                f"weight {name} in {file} has shape {list(stored_shape)}, but the model built from "
                f"config.json expects {list(shape)}"
            )


def without_ignored(stored: StoredTensors, ignored_prefixes: Tuple[str, ...]) -> StoredTensors:
    return {name: entry for name, entry in stored.items() if not name.startswith(ignored_prefixes)}


def read_weights(file: Path, names: Dict[str, object], dtype: ms.Type) -> Dict[str, Parameter]:
    """The weights of `file` named in `names`, as `dtype` Parameters, holding each weight's bytes once.

    Read tensor by tensor with pread (mmap would map the whole file into the resident set) and wrapped
    without a copy (`Tensor.from_numpy`); cast only when the stored dtype differs. mindone's `load_file`
    plus `astype` held the weights three times over (numpy arrays, their Parameter copies, the cast
    copies): for the mid transformer's 0.80 GiB of fp32 weights loading added 1.60 GiB resident and
    kept it; this adds 0.87-0.88 GiB, peak and after (eval/bench_memory.py).
    """
    weights = {}
    with safe_open(str(file), framework="np", backend="pread") as handle:
        for name in handle.keys():
            if name in names:
                tensor = Tensor.from_numpy(handle.get_tensor(name))
                weights[name] = Parameter(tensor if tensor.dtype == dtype else tensor.astype(dtype), name=name)
    return weights


def load_pretrained(cls: Type[ModelT], path: str, subfolder: Optional[str],
                    mindspore_dtype: Optional[ms.Type], required_keys: Tuple[str, ...] = (),
                    ignored_prefixes: Tuple[str, ...] = ()) -> ModelT:
    """Build `cls` from a diffusers folder's config and load every weight, cast to `mindspore_dtype`.

    Weights are cast tensor by tensor while loading, so a bf16 checkpoint loaded as bf16 never takes
    fp32 host memory. Defaults to fp32, like diffusers' `from_pretrained` without `torch_dtype`.
    Stored weights whose names start with one of `ignored_prefixes` (a VAE's encoder, for a
    decoder-only model) are neither loaded nor reported as unexpected; a file holding only such
    weights is never read. A model parameter with such a prefix is still required.
    """
    dtype = checked_dtype(mindspore_dtype)
    folder = model_folder(path, subfolder)
    config = read_config(folder, cls.__name__, required_keys)
    stored = without_ignored(stored_tensors(weight_files(folder)), tuple(ignored_prefixes))
    with no_init_parameters():
        model = cls.from_config(config)
    load_weights(model, stored, folder, dtype)
    model.register_to_config(_name_or_path=str(path))
    model.set_train(False)
    return model


def checked_dtype(mindspore_dtype: Optional[ms.Type]) -> ms.Type:
    """The dtype to load weights as: fp32 when None (diffusers' and transformers' default), else one of
    SUPPORTED_DTYPES."""
    dtype = ms.float32 if mindspore_dtype is None else mindspore_dtype
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"mindspore_dtype must be one of {SUPPORTED_DTYPES}, got {mindspore_dtype}")
    return dtype


def load_weights(model: nn.Cell, stored: StoredTensors, folder: Path, dtype: ms.Type) -> None:
    """Check that `stored` holds exactly `model`'s parameters, with their shapes, then load each as `dtype`.

    Build `model` under `no_init_parameters`: then no parameter is allocated before its weight is read.
    """
    expected = {name: tuple(param.shape) for name, param in model.parameters_and_names()}
    check_weights_match(expected, stored, folder)
    for param in model.get_parameters():
        param.set_dtype(dtype)
    for file in sorted({file for _, file in stored.values()}):
        ms.load_param_into_net(model, read_weights(file, stored, dtype), strict_load=True)
