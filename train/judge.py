"""Train the judge: a small CLIP of the emoji world (image and text towers, contrastive loss), saved in
transformers' CLIPModel folder format so `tests/flux_accuracy_test.py --clip_model` scores with it as it
would with openai/clip-vit-large-patch14, and its image features give a Frechet distance to real renders.

Images reach it as the scorer's CLIPImageProcessor prepares them: 128 px scenes resized to 64 px (bicubic)
and normalised with CLIP's mean and std. It trains on freshly rendered training scenes and is validated
on held-out compositions (`validate`): CLIP score of real renders with their own captions against
shuffled captions, and top-1 text-to-image retrieval.
"""

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from models.demo_checkpoint import CLIP_BOS, CLIP_EOS, CLIP_MAX_LENGTH, clip_byte_vocabulary, write_clip_tokenizer
from train.common import RUNS_DIR, add_common_arguments, check_common_arguments, seed_everything, step_generator, train
from train.scenes import caption, render_batch, scenes
from train.world import caption_words

JUDGE_IMAGE_SIZE = 64
VALIDATION_SCENES = 256


def judge_config() -> CLIPConfig:
    vocab, _ = clip_byte_vocabulary(caption_words())
    return CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=128, intermediate_size=512, num_hidden_layers=3,
                         num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, bos_token_id=vocab[CLIP_BOS],
                         eos_token_id=vocab[CLIP_EOS], pad_token_id=vocab[CLIP_EOS]),
        vision_config=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, num_attention_heads=4,
                           image_size=JUDGE_IMAGE_SIZE, patch_size=8),
        projection_dim=128)


def write_processors(folder: Path) -> Path:
    """Tokenizer files at the top level (as in a hub CLIP folder) and the image processor config."""
    write_clip_tokenizer(folder, caption_words())
    for file in (folder / "tokenizer").iterdir():
        file.replace(folder / file.name)
    (folder / "tokenizer").rmdir()
    size = {"height": JUDGE_IMAGE_SIZE, "width": JUDGE_IMAGE_SIZE}
    CLIPImageProcessor(size={"shortest_edge": JUDGE_IMAGE_SIZE}, crop_size=size).save_pretrained(folder)
    return folder


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, 128, 128) in [-1, 1] -> the processor's input: bicubic to 64 px, CLIP mean / std."""
    images = F.interpolate((images + 1) / 2, size=JUDGE_IMAGE_SIZE, mode="bicubic", antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
    return (images.clamp(0, 1) - mean) / std


def text_ids(tokenizer: CLIPTokenizer, captions: list) -> dict:
    """Padded to the longest caption: with the attention mask, the scorer's padding to 77 gives the same
    features, and training skips the padding's compute."""
    return tokenizer(captions, padding="longest", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt")


@torch.no_grad()
def validate(model: CLIPModel, tokenizer: CLIPTokenizer, seed: int, device: str) -> dict:
    """Held-out scenes: CLIP score (100 max(cos, 0)) with own vs shuffled captions; top-1 text->image retrieval."""
    held_out = scenes(seed + 777, VALIDATION_SCENES, "heldout")
    captions = [caption(scene) for scene in held_out]
    images = model.get_image_features(pixel_values=pixel_values(torch.from_numpy(render_batch(held_out))).to(device))
    texts = model.get_text_features(**{k: v.to(device) for k, v in text_ids(tokenizer, captions).items()})
    cosine = F.normalize(texts, dim=-1) @ F.normalize(images, dim=-1).T
    shuffled = np.random.default_rng(seed).permutation(len(captions))
    own = 100 * cosine.diagonal().clamp(min=0)
    other = 100 * cosine[torch.from_numpy(shuffled), torch.arange(len(captions))].clamp(min=0)
    retrieval = (cosine.argmax(dim=1) == torch.arange(len(captions), device=cosine.device)).float().mean()
    return {"clip_score_own_captions": round(own.mean().item(), 2),
            "clip_score_shuffled_captions": round(other.mean().item(), 2),
            "top1_text_to_image_retrieval": round(retrieval.item(), 4), "validation_scenes": len(captions)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=800, batch_size=64, lr=1e-3)
    parser.add_argument("--out", type=Path, default=RUNS_DIR / "judge")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    seed_everything(args.seed)
    processors = write_processors(args.out / "processors")
    tokenizer = CLIPTokenizer.from_pretrained(processors)
    model = CLIPModel(judge_config()).to(args.device)

    def loss_fn(step: int):
        scene_seed = int(step_generator(args.seed, step).initial_seed() % 2**63)
        batch = scenes(scene_seed, args.batch_size)
        inputs = text_ids(tokenizer, [caption(scene) for scene in batch])
        output = model(input_ids=inputs.input_ids.to(args.device), attention_mask=inputs.attention_mask.to(args.device),
                       pixel_values=pixel_values(torch.from_numpy(render_batch(batch))).to(args.device),
                       return_loss=True)
        return output.loss, {"loss": output.loss.item()}

    seconds = train("judge", args, model, loss_fn, weight_decay=0.1)
    if seconds is None:
        return
    model.eval()
    stats = dict(validate(model, tokenizer, args.seed, args.device), train_seconds=round(seconds, 1))
    target = args.out / "judge"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(processors, target)
    model.cpu().save_pretrained(target, safe_serialization=True)
    (args.out / "judge_stats.json").write_text(json.dumps(stats, indent=1))
    print(f"judge: {stats}; wrote {target}")


if __name__ == "__main__":
    main()
