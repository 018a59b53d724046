"""A pipeline folder's non-weight components are checked at load time, before any weight is read.

Each test breaks one file of a copy of the shipped folder and loads it with FluxPipeline.from_pretrained.
The copy has no weight files at all, so an error about the broken file (rather than about a missing
safetensors file) also shows that the check runs before any weight is loaded.
"""

import json
import shutil

import pytest

from models.components import check_pipeline_components
from models.embedded import SHIPPED_PIPELINE
from models.loading import CheckpointError
from pipeline_flux import FluxPipeline


@pytest.fixture
def folder(tmp_path):
    """The shipped pipeline folder without its weights (configs, tokenizers and scheduler only)."""
    return shutil.copytree(SHIPPED_PIPELINE, tmp_path / "flux", ignore=shutil.ignore_patterns("*.safetensors"))


def refused(folder, error, message):
    with pytest.raises(error, match=message):
        FluxPipeline.from_pretrained(str(folder))


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_the_shipped_folder_passes():
    check_pipeline_components(SHIPPED_PIPELINE)


@pytest.mark.parametrize("relative", [
    "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json", "scheduler/scheduler_config.json",
])
def test_a_missing_file_is_named(folder, relative):
    """A missing text_encoder_2/config.json no longer loads T5 with transformers' default (T5-small) config."""
    (folder / relative).unlink()
    refused(folder, FileNotFoundError, f"{relative} is missing: the pipeline folder is incomplete; copy it again")


def test_missing_merges_are_named(folder):
    (folder / "tokenizer" / "merges.txt").unlink()
    refused(folder, FileNotFoundError, "tokenizer/merges.txt is missing: the CLIP tokenizer needs its BPE merges")


def test_a_t5_tokenizer_without_tokenizer_json_is_refused(folder):
    (folder / "tokenizer_2" / "tokenizer.json").unlink()
    refused(folder, FileNotFoundError, "tokenizer_2 has no tokenizer.json")


@pytest.mark.parametrize("relative", [
    "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer/tokenizer_config.json",
    "tokenizer_2/tokenizer_config.json", "scheduler/scheduler_config.json", "transformer/config.json",
])
def test_a_truncated_json_file_is_named(folder, relative):
    path = folder / relative
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(folder, CheckpointError, f"{relative} is not valid JSON .*: it is damaged or truncated; copy it again")


def test_a_truncated_t5_tokenizer_is_named(folder):
    path = folder / "tokenizer_2" / "tokenizer.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(folder, CheckpointError, "tokenizer_2/tokenizer.json cannot be read as a tokenizer .*damaged or truncated")


def test_merges_cut_mid_line_are_named(folder):
    path = folder / "tokenizer" / "merges.txt"
    text = path.read_text()
    cut = text[: text.index(" ", len(text) // 2)]
    path.write_text(cut)
    refused(folder, CheckpointError, rf"merges.txt line {len(cut.splitlines())} is not a merge of two symbols")


def test_merges_without_their_version_line_are_refused(folder):
    path = folder / "tokenizer" / "merges.txt"
    path.write_text(path.read_text().split("\n", 1)[1])
    refused(folder, CheckpointError, "merges.txt does not start with a '#version' line")


def test_a_config_that_is_not_a_json_object_is_refused(folder):
    (folder / "text_encoder" / "config.json").write_text("[768]")
    refused(folder, CheckpointError, "text_encoder/config.json holds a JSON list, not an object")


@pytest.mark.parametrize("component,key,value", [
    ("text_encoder_2", "d_model", "wide"), ("text_encoder", "hidden_size", 0), ("text_encoder", "num_hidden_layers", True),
    ("transformer", "joint_attention_dim", None), ("vae", "latent_channels", 1.5),
])
def test_a_mis_shaped_width_is_refused(folder, component, key, value):
    edit_json(folder / component / "config.json", **{key: value})
    refused(folder, CheckpointError, rf"{component}/config.json: {key} must be a positive integer, got {value!r}")


@pytest.mark.parametrize("component,key,class_name", [
    ("text_encoder", "hidden_size", "CLIPTextModel"), ("text_encoder_2", "d_model", "T5EncoderModel"),
])
def test_a_text_encoder_config_without_a_shape_setting_is_refused(folder, component, key, class_name):
    """Left out, the setting would silently take transformers' default."""
    path = folder / component / "config.json"
    config = json.loads(path.read_text())
    del config[key]
    path.write_text(json.dumps(config))
    refused(folder, CheckpointError, rf"{component}/config.json is not a {class_name} config: it lacks \['{key}'\]")


def test_a_clip_vocabulary_with_non_integer_ids_is_refused(folder):
    edit_json(folder / "tokenizer" / "vocab.json", cat="7")
    refused(folder, CheckpointError, "tokenizer/vocab.json is not a token -> id vocabulary")


def test_a_tokenizer_config_without_max_length_is_refused(folder):
    path = folder / "tokenizer_2" / "tokenizer_config.json"
    config = json.loads(path.read_text())
    del config["model_max_length"]
    path.write_text(json.dumps(config))
    refused(folder, CheckpointError, "tokenizer_2/tokenizer_config.json lacks model_max_length")


@pytest.mark.parametrize("changes,message", [
    (dict(_class_name="DDIMScheduler"), "describes a DDIMScheduler, but FLUX pipelines use a FlowMatchEulerDiscrete"),
    (dict(shift="3.0"), r"scheduler_config.json: shift must be a number, got '3.0'"),
])
def test_a_wrong_scheduler_config_is_refused(folder, changes, message):
    edit_json(folder / "scheduler" / "scheduler_config.json", **changes)
    refused(folder, CheckpointError, message)


@pytest.mark.parametrize("component,changes,message", [
    ("text_encoder_2", dict(d_model=64),
     r"text_encoder_2/config.json d_model=64 does not fit .*transformer/config.json joint_attention_dim=128: "
     "the transformer takes T5's token features"),
    ("text_encoder", dict(hidden_size=32),
     r"text_encoder/config.json hidden_size=32 does not fit .*transformer/config.json pooled_projection_dim=64: "
     "the transformer takes CLIP's pooled output"),
    ("vae", dict(latent_channels=4),
     r"vae/config.json latent_channels=4 does not fit .*transformer/config.json in_channels=64: .*2x2 patches"),
    ("transformer", dict(out_channels=16),
     r"transformer/config.json out_channels=16 does not fit .*transformer/config.json in_channels=64"),
    ("tokenizer", dict(model_max_length=100),
     r"tokenizer/tokenizer_config.json model_max_length=100 does not fit "
     r".*text_encoder/config.json max_position_embeddings=77"),
])
def test_components_that_do_not_fit_are_refused(folder, component, changes, message):
    file = "tokenizer_config.json" if component == "tokenizer" else "config.json"
    edit_json(folder / component / file, **changes)
    refused(folder, CheckpointError, message + ".*take every component from the same checkpoint")
