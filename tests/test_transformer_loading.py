"""Every way a checkpoint can be wrong ends in an exception that names the file or key."""

import json
import shutil

import pytest
from safetensors.numpy import load_file, save_file

import mindspore as ms

from models.loading import CheckpointError
from models.transformer_flux import FluxTransformer2DModel
from torch_reference import write_torch_checkpoint


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return write_torch_checkpoint(tmp_path_factory.mktemp("pristine"), guidance_embeds=True)


@pytest.fixture
def checkpoint(pristine, tmp_path):
    """A private copy of a valid checkpoint that a test may damage."""
    copy = tmp_path / "ckpt"
    shutil.copytree(pristine, copy)
    return copy


def weights_path(checkpoint):
    return checkpoint / "transformer" / "diffusion_pytorch_model.safetensors"


def rewrite_weights(checkpoint, edit):
    tensors = load_file(weights_path(checkpoint))
    edit(tensors)
    save_file(tensors, weights_path(checkpoint))


def load(checkpoint):
    return FluxTransformer2DModel.from_pretrained(str(checkpoint), subfolder="transformer")


def test_valid_checkpoint_loads_every_weight(checkpoint):
    model = load(checkpoint)
    stored = load_file(weights_path(checkpoint))
    params = dict(model.parameters_and_names())
    assert set(params) == set(stored)
    name = "single_transformer_blocks.1.attn.norm_k.weight"
    assert (params[name].asnumpy() == stored[name]).all()


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_missing_subfolder(checkpoint):
    shutil.rmtree(checkpoint / "transformer")
    with pytest.raises(FileNotFoundError, match="no 'transformer/' subfolder"):
        load(checkpoint)


def test_missing_config(checkpoint):
    (checkpoint / "transformer" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json is missing"):
        load(checkpoint)


def test_config_of_another_model(checkpoint):
    config_path = checkpoint / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["_class_name"] = "AutoencoderKL"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="describes a AutoencoderKL, not a FluxTransformer2DModel"):
        load(checkpoint)


def test_config_without_flux_keys(checkpoint):
    config_path = checkpoint / "transformer" / "config.json"
    config_path.write_text(json.dumps({"_class_name": "FluxTransformer2DModel", "in_channels": 16}))
    with pytest.raises(CheckpointError, match="lacks.*num_layers"):
        load(checkpoint)


def test_config_not_json(checkpoint):
    (checkpoint / "transformer" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(checkpoint)


def test_missing_weights_file(checkpoint):
    weights_path(checkpoint).unlink()
    with pytest.raises(FileNotFoundError, match="neither diffusion_pytorch_model.safetensors nor"):
        load(checkpoint)


def test_missing_shard(tmp_path):
    folder = write_torch_checkpoint(tmp_path, guidance_embeds=True, max_shard_size="40KB")
    shard = sorted((folder / "transformer").glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=f"shards that are missing.*{shard.name}"):
        load(folder)


def test_truncated_weights(checkpoint):
    data = weights_path(checkpoint).read_bytes()
    weights_path(checkpoint).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors is truncated"):
        load(checkpoint)


def test_garbage_weights(checkpoint):
    weights_path(checkpoint).write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="is corrupt"):
        load(checkpoint)


def test_missing_key(checkpoint):
    rewrite_weights(checkpoint, lambda tensors: tensors.pop("transformer_blocks.1.ff.net.2.weight"))
    with pytest.raises(CheckpointError, match=r"lacks 1 weight\(s\).*transformer_blocks.1.ff.net.2.weight"):
        load(checkpoint)


def test_unexpected_key(checkpoint):
    def add_key(tensors):
        tensors["transformer_blocks.2.ff.net.2.weight"] = tensors["transformer_blocks.1.ff.net.2.weight"]

    rewrite_weights(checkpoint, add_key)
    with pytest.raises(CheckpointError, match="does not have: transformer_blocks.2.ff.net.2.weight"):
        load(checkpoint)


def test_shape_mismatch(checkpoint):
    def shrink(tensors):
        tensors["x_embedder.weight"] = tensors["x_embedder.weight"][:, :8].copy()

    rewrite_weights(checkpoint, shrink)
    with pytest.raises(CheckpointError, match=r"x_embedder.weight in .* has shape \[32, 8\].*expects \[32, 16\]"):
        load(checkpoint)


def test_unsupported_dtype(checkpoint):
    with pytest.raises(ValueError, match="mindspore_dtype must be one of"):
        FluxTransformer2DModel.from_pretrained(str(checkpoint), "transformer", mindspore_dtype=ms.int32)
