"""Checks that a diffusers FLUX folder's components exist, parse and fit each other, before any weight is read.

The weight loaders (models/loading.py, models/text_encoders.py) check each model's weights
against its own config, but only after loading the ones before it, and nothing checks the rest:
transformers and diffusers read tokenizer and scheduler files with raw tracebacks or silent defaults,
and text encoders whose widths do not match the transformer load fine and fail mid-generation.
`check_pipeline_components` reads only the small config and tokenizer files, so such a folder is refused
in well under a second, with the file, the values and the fix in the message.
"""

import inspect
from pathlib import Path
from typing import Callable, Dict, List, Tuple, Union

from tokenizers import Tokenizer

from .loading import RESTORE, CheckpointError, model_folder, read_config, read_json_object
from .transformer_flux import REQUIRED_CONFIG_KEYS as TRANSFORMER_KEYS
from .transformer_flux import FluxTransformer2DModel
from .vae import REQUIRED_CONFIG_KEYS as VAE_KEYS

# Every setting that decides a text encoder's weight shapes: a missing one would silently take
# transformers' default (T5-small's d_model=512, ...) and then fail as dozens of mis-shaped weights.
CLIP_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings")
T5_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads")
TRANSFORMER_WIDTHS = ("in_channels", "joint_attention_dim", "pooled_projection_dim")
# (component, config key, value) of one side of a fit check.
Setting = Tuple[str, str, object]
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
SCHEDULER_NUMBERS = ("num_train_timesteps", "shift", "base_shift", "max_shift", "base_image_seq_len",
                     "max_image_seq_len")


def positive_int(config: dict, key: str, path: Path) -> int:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise CheckpointError(f"{path}: {key} must be a positive integer, got {value!r}; {RESTORE}")
    return value


def read_model_config(root: Path, component: str, class_name: str, required_keys: Tuple[str, ...],
                      widths: Tuple[str, ...]) -> dict:
    """`component/config.json` as loading.read_config reads it, with each of `widths` that it sets checked
    to be a positive integer."""
    path = model_folder(str(root), component) / "config.json"
    config = read_config(path.parent, class_name, required_keys)
    for key in widths:
        if key in config:
            positive_int(config, key, path)
    return config


def init_defaults(cls: type) -> Dict[str, object]:
    """The values `cls.from_config` gives the keys a config leaves out (its __init__ defaults)."""
    parameters = inspect.signature(cls.__init__).parameters.values()
    return {parameter.name: parameter.default for parameter in parameters if parameter.default is not parameter.empty}


def model_configs(root: Path) -> Dict[str, dict]:
    """The four model configs as their loaders will see them (the transformer's with its defaults)."""
    transformer = read_model_config(root, "transformer", "FluxTransformer2DModel", TRANSFORMER_KEYS, TRANSFORMER_WIDTHS)
    return {
        "transformer": {**init_defaults(FluxTransformer2DModel), **transformer},
        "vae": read_model_config(root, "vae", "AutoencoderKL", VAE_KEYS, ("latent_channels",)),
        "text_encoder": read_model_config(root, "text_encoder", "CLIPTextModel", CLIP_KEYS, CLIP_KEYS),
        "text_encoder_2": read_model_config(root, "text_encoder_2", "T5EncoderModel", T5_KEYS, T5_KEYS),
    }


def tokenizer_max_length(folder: Path) -> int:
    """model_max_length from tokenizer_config.json: the pipeline pads prompts to it (transformers' default
    when it is absent is 10**30)."""
    path = folder / "tokenizer_config.json"
    config = read_json_object(path)
    if "model_max_length" not in config:
        raise CheckpointError(f"{path} lacks model_max_length (the pipeline pads prompts to it); {RESTORE}")
    return positive_int(config, "model_max_length", path)


def check_merges(path: Path) -> None:
    """CLIP's BPE merges: a `#version` line (CLIPTokenizer skips the first line unread), then `a b` pairs;
    a file cut mid-line shows as a line without its pair."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the CLIP tokenizer needs its BPE merges; {RESTORE}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not UTF-8 text ({error}); {RESTORE}") from error
    if not lines or not lines[0].startswith("#version"):
        raise CheckpointError(f"{path} does not start with a '#version' line (CLIPTokenizer skips the first "
                              f"line, so the first merge would be lost); {RESTORE}")
    for number, line in enumerate(lines[1:], start=2):
        if len(line.split()) != 2:
            raise CheckpointError(f"{path} line {number} is not a merge of two symbols: {line!r}; {RESTORE}")


def check_clip_tokenizer(root: Path) -> int:
    """tokenizer/ (CLIPTokenizer): vocab.json, merges.txt, tokenizer_config.json; returns model_max_length."""
    folder = model_folder(str(root), "tokenizer")
    vocab_path = folder / "vocab.json"
    if not all(isinstance(index, int) for index in read_json_object(vocab_path).values()):
        raise CheckpointError(f"{vocab_path} is not a token -> id vocabulary (some ids are not integers); {RESTORE}")
    check_merges(folder / "merges.txt")
    return tokenizer_max_length(folder)


def parse_tokenizer(path: Path, parse: Callable[[str], object]) -> None:
    """Run a tokenizer library's parser on `path`, naming the file when it fails."""
    try:
        parse(str(path))
    except Exception as error:  # tokenizers raises a plain Exception for a file it cannot parse
        raise CheckpointError(f"{path} cannot be read as a tokenizer ({error}): it is damaged or truncated; "
                              f"{RESTORE}") from error


def check_t5_tokenizer(root: Path) -> None:
    """tokenizer_2/: the pipeline's T5 tokenizer (models/tokenizers.py) reads tokenizer.json."""
    folder = model_folder(str(root), "tokenizer_2")
    if not (folder / "tokenizer.json").is_file():
        fix = (" (a SentencePiece spiece.model is there: write tokenizer.json from it once with transformers' "
               "T5TokenizerFast.from_pretrained(folder).save_pretrained(folder))"
               if (folder / "spiece.model").is_file() else f"; {RESTORE}")
        raise FileNotFoundError(f"{folder} has no tokenizer.json, which the T5 tokenizer reads{fix}")
    parse_tokenizer(folder / "tokenizer.json", Tokenizer.from_file)
    tokenizer_max_length(folder)


def check_scheduler(root: Path) -> None:
    """scheduler/scheduler_config.json: FLUX's flow-matching Euler scheduler, with numbers where it needs them."""
    path = model_folder(str(root), "scheduler") / "scheduler_config.json"
    config = read_json_object(path)
    found = config.get("_class_name", SCHEDULER_CLASS)
    if found != SCHEDULER_CLASS:
        raise CheckpointError(f"{path} describes a {found}, but FLUX pipelines use a {SCHEDULER_CLASS}; {RESTORE}")
    for key in SCHEDULER_NUMBERS:
        value = config.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise CheckpointError(f"{path}: {key} must be a number, got {value!r}; {RESTORE}")


def fit_rules(configs: Dict[str, dict], clip_max_length: int) -> List[Tuple[bool, Setting, Setting, str]]:
    """(fits, one setting, the other, why they must agree) for each pair of components that must agree."""
    transformer, vae = configs["transformer"], configs["vae"]
    clip, t5 = configs["text_encoder"], configs["text_encoder_2"]
    in_channels = transformer["in_channels"]
    return [
        (t5["d_model"] == transformer["joint_attention_dim"], ("text_encoder_2", "d_model", t5["d_model"]),
         ("transformer", "joint_attention_dim", transformer["joint_attention_dim"]),
         "the transformer takes T5's token features, so both widths must be equal"),
        (clip["hidden_size"] == transformer["pooled_projection_dim"],
         ("text_encoder", "hidden_size", clip["hidden_size"]),
         ("transformer", "pooled_projection_dim", transformer["pooled_projection_dim"]),
         "the transformer takes CLIP's pooled output, which is hidden_size wide, so both must be equal"),
        (vae["latent_channels"] * 4 == in_channels, ("vae", "latent_channels", vae["latent_channels"]),
         ("transformer", "in_channels", in_channels),
         "the pipeline packs 2x2 patches of latents into tokens, so in_channels must be 4 x latent_channels"),
        (transformer["out_channels"] in (None, in_channels),
         ("transformer", "out_channels", transformer["out_channels"]),
         ("transformer", "in_channels", in_channels),
         "the transformer's output updates its input latents, so out_channels must equal in_channels or be null"),
        (clip_max_length <= clip["max_position_embeddings"], ("tokenizer", "model_max_length", clip_max_length),
         ("text_encoder", "max_position_embeddings", clip["max_position_embeddings"]),
         "prompts are padded to model_max_length tokens and CLIP has position embeddings for at most "
         "max_position_embeddings"),
    ]


def describe(root: Path, setting: Setting) -> str:
    component, key, value = setting
    file = "tokenizer_config.json" if component.startswith("tokenizer") else "config.json"
    return f"{root / component / file} {key}={value}"


def check_pipeline_components(path: Union[str, Path]) -> None:
    """Refuse a FLUX pipeline folder whose configs, tokenizers or scheduler are missing, unreadable or do
    not fit each other, naming the file or values and the fix; reads no weights (the loaders check those)."""
    root = Path(path)
    configs = model_configs(root)
    clip_max_length = check_clip_tokenizer(root)
    check_t5_tokenizer(root)
    check_scheduler(root)
    for fits, first, second, reason in fit_rules(configs, clip_max_length):
        if not fits:
            raise CheckpointError(f"{describe(root, first)} does not fit {describe(root, second)}: {reason}. The "
                                  "folder mixes components of different models: take every component from the same "
                                  "checkpoint")
