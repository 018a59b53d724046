"""The shipped small Flux's shape: transformer config, text encoders and tokenizers over the caption
vocabulary, and the pipeline folder they are written into (diffusers FLUX layout, model_index included).

Tokenizers are FLUX's kinds (byte-level BPE CLIP, Unigram T5) whose merges / pieces hold every caption
word whole, so a caption is one token per word. T5 keeps `model_max_length` = 32: the longest caption
is 28 tokens with `</s>`, and the transformer is trained on 32 padded T5 tokens, so the pipeline's
default text length must be the same 32 (FLUX.1 itself uses 512, or 256 for schnell).
"""

from pathlib import Path
from typing import List

from models.demo_checkpoint import (clip_text_config, t5_encoder_config, t5_unigram_vocabulary, write_clip_tokenizer,
                                    write_model_index, write_scheduler_config, write_t5_tokenizer)
from train.scenes import COLOURS, POSITIONS, SIZES, emoji_names

T5_TEXT_TOKENS = 32

# FLUX.1's transformer shape at hidden 256 (4 heads of 64; rope axes 8+28+28 = 64 as FLUX's 16+56+56 = 128),
# 2 double + 4 single blocks. guidance_embeds=False: FLUX.1-schnell-style, guided by true CFG (trained
# with caption dropout) rather than a CFG-distilled guidance embedding, which would need a teacher run.
TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=2, num_single_layers=4, attention_head_dim=64,
    num_attention_heads=4, joint_attention_dim=128, pooled_projection_dim=64, guidance_embeds=False,
    axes_dims_rope=(8, 28, 28),
)


def caption_words() -> List[str]:
    """Every word a caption can use, in a fixed order."""
    phrases = list(emoji_names()) + list(COLOURS) + list(SIZES) + list(POSITIONS.values())
    phrases += ["a an and on to gradient background"]
    words = [word for phrase in phrases for word in phrase.replace(",", "").split()]
    return list(dict.fromkeys(words))


def text_encoder_configs():
    """(CLIPTextConfig, T5Config) of the world: FLUX's encoder kinds at the transformer's widths."""
    words = caption_words()
    return (clip_text_config(TRANSFORMER_CONFIG, words),
            t5_encoder_config(TRANSFORMER_CONFIG, len(t5_unigram_vocabulary(words))))


def write_pipeline_skeleton(folder: Path) -> Path:
    """model_index.json, scheduler and both tokenizers of the world's pipeline folder."""
    folder = Path(folder)
    write_model_index(folder)
    write_scheduler_config(folder)
    write_clip_tokenizer(folder, caption_words())
    write_t5_tokenizer(folder, caption_words(), max_length=T5_TEXT_TOKENS)
    return folder
