"""Small seeded checkpoints in the diffusers FLUX folder layout.

No FLUX.1 weights can be downloaded here, so the project makes its own: random weights, real format.
They let every entry point run with no arguments and let tests cover the real loading path. They
are NOT FLUX.1 and produce no meaningful images.

A whole pipeline folder is written (model_index.json, scheduler, both tokenizers, both text
encoders, transformer, VAE) with runtime dependencies only: parameter names and shapes come from
mindone's own model classes built without allocating weights, mapped back to the torch names that
diffusers / transformers checkpoints use, so the same folder loads in diffusers (torch) and mindone.
"""

import json
import math
import os
import secrets
import shutil
import string
import zlib
from pathlib import Path
from typing import Dict, List, Sequence, Tuple, Union

import numpy as np
from mindspore import nn
from mindspore.nn.utils import no_init_parameters
from safetensors.numpy import save_file

from .demo_configs import TRANSFORMER_CONFIGS
from .loading import WEIGHTS_NAME, read_config
from .transformer_flux import FluxTransformer2DModel

TRANSFORMERS_WEIGHTS_NAME = "model.safetensors"


def seeded_weights(shapes: Dict[str, tuple], seed: Union[int, Sequence[int]]) -> Dict[str, np.ndarray]:
    """Weights N(0, 1/fan_in), small biases, unit norm scales: activations stay O(1) through the blocks.

    Linear/embedding matrices and conv kernels are scaled by their fan-in; 1-D norm scales (RMSNorm,
    LayerNorm, GroupNorm) sit near 1. One draw per tensor in sorted name order, so a seed always gives
    the same weights (the transformer's draws are the same as before conv and norm rules were added).
    """
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".weight") and len(shape) == 2:
            values = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif name.endswith(".weight") and len(shape) == 4:
            values = rng.standard_normal(shape) / np.sqrt(math.prod(shape[1:]))
        elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name.endswith(".weight") and len(shape) == 1 and "norm" in name:
            values = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            values = 0.02 * rng.standard_normal(shape)
        weights[name] = values.astype(np.float32)
    return weights


def write_transformer_checkpoint(folder: Path, config: dict, seed: int = 0) -> Path:
    """Write `<folder>/transformer/{config.json, diffusion_pytorch_model.safetensors}`; returns `folder`."""
    with no_init_parameters():
        model = FluxTransformer2DModel(**config)
    target = Path(folder) / "transformer"
    target.mkdir(parents=True, exist_ok=True)
    shapes = {name: tuple(param.shape) for name, param in model.parameters_and_names()}
    save_file(seeded_weights(shapes, seed), str(target / WEIGHTS_NAME), metadata={"format": "pt"})
    model.save_config(str(target))
    return Path(folder)


# model_index.json of FLUX.1-dev: which library and class loads each subfolder.
PIPELINE_COMPONENTS: Dict[str, Tuple[str, str]] = {
    "scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "T5EncoderModel"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "tokenizer_2": ("transformers", "T5TokenizerFast"),
    "transformer": ("diffusers", "FluxTransformer2DModel"),
    "vae": ("diffusers", "AutoencoderKL"),
}

# FLUX.1-dev's scheduler_config.json, verbatim apart from the version stamp.
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)

# FLUX's VAE shape (16 latent channels, no quant convs, mid-block attention, its scaling/shift) at tiny
# widths. Four blocks, so the pipeline's vae_scale_factor = 2 ** (4 - 1) = 8 as for real FLUX and the
# same image sizes are valid; widths 16/32 with 8 groups keep it ~0.3 M parameters.
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[16, 16, 32, 32], layers_per_block=1, norm_num_groups=8, act_fn="silu",
    sample_size=64, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
    scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
)

CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512
CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
# A few whole words, so both tokenizers do more than split into bytes / characters.
DEMO_WORDS = ("a", "the", "of", "and", "in", "on", "with", "cat", "dog", "photo", "painting", "red", "blue")


def component_seed(seed: int, component: str) -> List[int]:
    """Seed of one pipeline component: each gets its own stream, all fixed by the pipeline seed."""
    return [seed, zlib.crc32(component.encode())]


def torch_parameter_name(name: str) -> str:
    """Map a MindSpore parameter name to the torch name checkpoints use.

    Legacy MindSpore cells name LayerNorm scales gamma/beta and embeddings embedding_table; diffusers and
    transformers checkpoints call them weight/bias and weight.
    """
    prefix, _, leaf = name.rpartition(".")
    leaf = {"gamma": "weight", "beta": "bias", "embedding_table": "weight"}.get(leaf, leaf)
    return f"{prefix}.{leaf}" if prefix else leaf


def checkpoint_shapes(model: nn.Cell) -> Dict[str, tuple]:
    """{torch name: shape} of a mindone model built under no_init_parameters (nothing is allocated)."""
    shapes = {torch_parameter_name(name): tuple(param.shape) for name, param in model.parameters_and_names()}
    if len(shapes) != len(list(model.get_parameters())):
        raise ValueError(f"{type(model).__name__}: two parameters map to the same checkpoint name")
    return shapes


def write_json(path: Path, content: dict, sort_keys: bool = True) -> None:
    """Indented JSON, keys sorted unless their order means something (a vocabulary in id order)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n", encoding="utf-8")


def write_weights(path: Path, weights: Dict[str, np.ndarray]) -> None:
    """safetensors with the "pt" format tag that diffusers and transformers expect."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(path), metadata={"format": "pt"})


def write_vae_checkpoint(folder: Path, seed: int = 0) -> Path:
    """Write `<folder>/vae/`: a tiny FLUX-shaped AutoencoderKL, encoder and decoder, named as diffusers names it."""
    from mindone.diffusers import AutoencoderKL  # heavy import, only needed here

    with no_init_parameters():
        model = AutoencoderKL(**VAE_CONFIG)
    target = Path(folder) / "vae"
    write_weights(target / WEIGHTS_NAME, seeded_weights(checkpoint_shapes(model), component_seed(seed, "vae")))
    model.save_config(str(target))
    return Path(folder)


def word_merges(words: Sequence[str]) -> List[Tuple[str, str]]:
    """BPE merges that build each word left to right, ending in its `</w>` form (first occurrence kept)."""
    merges: Dict[Tuple[str, str], None] = {}
    for word in words:
        built = word[0]
        for index, character in enumerate(word[1:], start=1):
            merges[(built, character + ("</w>" if index == len(word) - 1 else ""))] = None
            built += character
    return list(merges)


def clip_byte_vocabulary(words: Sequence[str] = DEMO_WORDS) -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    """CLIP's vocabulary layout in miniature: 256 byte symbols, the same with `</w>`, merges, specials.

    Every byte has a symbol, so any text tokenizes without unknowns, as with the real 49408-token vocab;
    the merges of `words` make most of them single tokens.
    """
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    merges = word_merges(words)
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += list(dict.fromkeys("".join(pair) for pair in merges if "".join(pair) not in tokens))
    tokens += [CLIP_BOS, CLIP_EOS]
    return {token: index for index, token in enumerate(tokens)}, merges


def write_clip_tokenizer(folder: Path, words: Sequence[str] = DEMO_WORDS) -> int:
    """Write `<folder>/tokenizer/` (vocab.json, merges.txt, configs) for transformers' CLIPTokenizer;
    returns the vocabulary size."""
    vocab, merges = clip_byte_vocabulary(words)
    target = Path(folder) / "tokenizer"
    write_json(target / "vocab.json", vocab, sort_keys=False)
    (target / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    special = dict(bos_token=CLIP_BOS, eos_token=CLIP_EOS, unk_token=CLIP_EOS, pad_token=CLIP_EOS)
    write_json(target / "special_tokens_map.json", special)
    write_json(target / "tokenizer_config.json", dict(
        special, tokenizer_class="CLIPTokenizer", model_max_length=CLIP_MAX_LENGTH, do_lower_case=True,
        errors="replace", add_prefix_space=False, clean_up_tokenization_spaces=True,
    ))
    return len(vocab)


def t5_unigram_vocabulary(words: Sequence[str] = DEMO_WORDS) -> List[Tuple[str, float]]:
    """T5's layout in miniature: <pad>=0, </s>=1, <unk>=2, then word pieces with SentencePiece scores.

    Printable ASCII characters, with and without the word-start marker, so English prompts tokenize
    without unknowns; a few whole words so the Unigram model has real choices to make.
    """
    characters = [c for c in string.printable if not c.isspace()]
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + word, -3.0) for word in words]
    pieces += [("\u2581" + c, -6.0) for c in characters] + [(c, -5.0) for c in characters]
    return pieces


def write_t5_tokenizer(folder: Path, words: Sequence[str] = DEMO_WORDS, max_length: int = T5_MAX_LENGTH) -> int:
    """Write `<folder>/tokenizer_2/` (tokenizer.json + configs) for transformers' T5TokenizerFast; returns vocab size.

    Built with the `tokenizers` library as T5's converted SentencePiece tokenizer is: Unigram model,
    whitespace collapsing, Metaspace pre-tokenizer, and a post-processor appending `</s>`.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    pieces = t5_unigram_vocabulary(words)
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)])
    tokenizer.add_special_tokens([T5_PAD, T5_EOS, T5_UNK])
    target = Path(folder) / "tokenizer_2"
    target.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(target / "tokenizer.json"))
    special = dict(eos_token=T5_EOS, pad_token=T5_PAD, unk_token=T5_UNK)
    write_json(target / "special_tokens_map.json", dict(special, additional_special_tokens=[]))
    write_json(target / "tokenizer_config.json", dict(
        special, tokenizer_class="T5TokenizerFast", model_max_length=max_length, extra_ids=0,
        additional_special_tokens=[], legacy=True, clean_up_tokenization_spaces=True,
    ))
    return tokenizer.get_vocab_size()


def clip_text_config(transformer_config: dict, words: Sequence[str] = DEMO_WORDS):
    """CLIP-L's text config shrunk: hidden size = the transformer's pooled_projection_dim (FLUX uses the
    pooled output); vocabulary and special ids those of `clip_byte_vocabulary(words)`."""
    from transformers import CLIPTextConfig

    hidden = transformer_config["pooled_projection_dim"]
    vocab, _ = clip_byte_vocabulary(words)
    return CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=hidden, intermediate_size=4 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
        bos_token_id=vocab[CLIP_BOS], eos_token_id=vocab[CLIP_EOS], pad_token_id=vocab[CLIP_EOS],
        architectures=["CLIPTextModel"], dtype="float32",
    )


def t5_encoder_config(transformer_config: dict, vocab_size: int):
    """T5 v1.1-XXL's encoder config shrunk: d_model = the transformer's joint_attention_dim (FLUX's text tokens)."""
    from transformers import T5Config

    d_model = transformer_config["joint_attention_dim"]
    heads = 4
    return T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=2,
        num_decoder_layers=2, num_heads=heads, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_encoder_decoder=True, tie_word_embeddings=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0, architectures=["T5EncoderModel"], dtype="float32",
    )


def write_text_encoder_checkpoint(folder: Path, config, seed: int = 0) -> Path:
    """Write `<folder>/text_encoder/`: a seeded CLIPTextModel, named as transformers names it."""
    from mindone.transformers import CLIPTextModel

    with no_init_parameters():
        model = CLIPTextModel(config)
    target = Path(folder) / "text_encoder"
    write_weights(target / TRANSFORMERS_WEIGHTS_NAME,
                  seeded_weights(checkpoint_shapes(model), component_seed(seed, "text_encoder")))
    config.to_json_file(str(target / "config.json"))
    return Path(folder)


def write_text_encoder_2_checkpoint(folder: Path, config, seed: int = 0) -> Path:
    """Write `<folder>/text_encoder_2/`: a seeded T5EncoderModel, named as transformers names it.

    transformers' T5EncoderModel shares one embedding between `shared` and `encoder.embed_tokens` and
    lists both in its state_dict (FLUX.1-dev's file stores both); mindone's model holds only `shared`.
    The copy is written so the file's keys equal torch's state_dict keys.
    """
    from mindone.transformers import T5EncoderModel

    with no_init_parameters():
        model = T5EncoderModel(config)
    weights = seeded_weights(checkpoint_shapes(model), component_seed(seed, "text_encoder_2"))
    weights["encoder.embed_tokens.weight"] = weights["shared.weight"].copy()
    target = Path(folder) / "text_encoder_2"
    write_weights(target / TRANSFORMERS_WEIGHTS_NAME, weights)
    config.to_json_file(str(target / "config.json"))
    return Path(folder)


def write_scheduler_config(folder: Path) -> Path:
    """Write `<folder>/scheduler/scheduler_config.json` (FLUX.1-dev's dynamic-shift flow-matching Euler)."""
    write_json(Path(folder) / "scheduler" / "scheduler_config.json",
               dict(SCHEDULER_CONFIG, _class_name=PIPELINE_COMPONENTS["scheduler"][1], _diffusers_version="0.30.0"))
    return Path(folder)


def write_model_index(folder: Path) -> Path:
    """Write `<folder>/model_index.json`: FluxPipeline and the (library, class) of each component."""
    content = {name: list(entry) for name, entry in PIPELINE_COMPONENTS.items()}
    content.update(_class_name="FluxPipeline", _diffusers_version="0.30.0")
    write_json(Path(folder) / "model_index.json", content)
    return Path(folder)


def write_components(folder: Path, name: str, seed: int) -> None:
    """Write every file of the named pipeline into `folder`. Text encoder widths follow the transformer
    (CLIP hidden = pooled_projection_dim, T5 d_model = joint_attention_dim) and their vocabularies follow
    the tokenizers, so every component fits."""
    transformer_config = TRANSFORMER_CONFIGS[name]
    write_model_index(folder)
    write_scheduler_config(folder)
    write_clip_tokenizer(folder)
    t5_vocab_size = write_t5_tokenizer(folder)
    write_text_encoder_checkpoint(folder, clip_text_config(transformer_config), seed)
    write_text_encoder_2_checkpoint(folder, t5_encoder_config(transformer_config, t5_vocab_size), seed)
    write_transformer_checkpoint(folder, transformer_config, seed)
    write_vae_checkpoint(folder, seed)


def missing_parts(folder: Path) -> List[str]:
    """What `folder` lacks of a complete pipeline folder: model_index.json and the component subfolders."""
    missing = [] if (folder / "model_index.json").is_file() else ["model_index.json"]
    return missing + [f"{component}/" for component in PIPELINE_COMPONENTS if not (folder / component).is_dir()]


def check_complete(folder: Path) -> None:
    missing = missing_parts(folder)
    if missing:
        raise FileNotFoundError(f"{folder} exists but is not a complete pipeline checkpoint (it lacks "
                                f"{', '.join(missing)}; older versions wrote only transformer/): delete it to have "
                                "it recreated")


def move_into_place(temporary: Path, folder: Path) -> None:
    """Rename `temporary` to `folder` in one step (POSIX rename replaces only an absent or empty folder). If
    another writer completed `folder` first, its checkpoint is kept and `temporary` discarded."""
    try:
        temporary.rename(folder)
    except OSError:
        shutil.rmtree(temporary)
        if not folder.exists():
            raise
        check_complete(folder)


def write_pipeline_checkpoint(folder: Path, name: str = "demo", seed: int = 0) -> Path:
    """Write a complete diffusers FLUX pipeline folder for the named transformer config; returns `folder`.

    `folder` must be absent or empty. Everything is written into a temporary folder of this writer's own
    beside it, then renamed into place in one step, so no reader ever sees a half-written checkpoint and
    writers running at the same time never touch each other's files. The first complete writer wins: one
    that finds `folder` complete when it finishes keeps that and discards its own (the same name and seed
    write the same bytes). The temporary folder is made with mkdir, not tempfile.mkdtemp, whose 0700
    mode the checkpoint would keep after the rename (unreadable to other users); its name says what it
    is and which process wrote it. An exception or Ctrl-C removes it; one left by a killed process is
    never read (only `folder` is) and is not deleted automatically, because its age cannot tell a dead
    writer from a slow or suspended one: delete `<name>.incomplete-*` folders by hand.
    """
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    temporary = folder.with_name(f"{folder.name}.incomplete-{os.getpid()}-{secrets.token_hex(4)}")
    temporary.mkdir()
    try:
        write_components(temporary, name, seed)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)  # the write's own error is the one to report
        raise
    move_into_place(temporary, folder)
    return folder


def check_transformer_config(folder: Path, name: str) -> None:
    """Refuse an existing embedded checkpoint written for another version of the named configuration."""
    stored = read_config(folder / "transformer", "FluxTransformer2DModel", ())
    differing = sorted(key for key, value in TRANSFORMER_CONFIGS[name].items()
                       if json.loads(json.dumps(value)) != stored.get(key))
    if differing:
        raise FileNotFoundError(f"{folder} holds an older '{name}' configuration ({', '.join(differing)} differ): "
                                "delete it to have it recreated")


def ensure_demo_checkpoint(folder: Path, name: str = "demo", seed: int = 0) -> Path:
    """Create the named random-weight pipeline checkpoint at `folder` unless it is already there, safely when
    several runs create it at once (see write_pipeline_checkpoint). A folder there that is incomplete or
    made by an older version is refused with a message saying to delete it."""
    folder = Path(folder)
    if not folder.exists():
        print(f"Creating the '{name}' checkpoint at {folder}: a small RANDOM-WEIGHT Flux pipeline for "
              "demonstration and tests, not FLUX.1.", flush=True)
        write_pipeline_checkpoint(folder, name, seed)
    check_complete(folder)
    check_transformer_config(folder, name)
    return folder
