"""Train the shipped small Flux: FLUX's transformer, objective and folder layout on the emoji world.

Objective (rectified flow, as FLUX / SD3): x_sigma = (1 - sigma) x0 + sigma noise, the transformer predicts
the velocity noise - x0. sigma = shift(sigmoid(n)), n ~ N(0, 1) (logit-normal), with the scheduler's
resolution-dependent shift mu = calculate_shift(image tokens) applied as the sampler applies it, so
training and sampling see the same sigmas. Captions are dropped (replaced by "") 10% of the time so the
unconditional branch of true CFG is trained.

The text encoders (a 2-layer CLIP-shaped and a 2-layer T5-shaped one) are trained with the transformer.
Why not frozen random ones: FLUX gives text tokens no positional rope (txt_ids are zeros), so which
emoji goes with which position word can only come from the T5 encoder's own relative-position
attention, and a random encoder does not learn that binding.

Stages, each resumable: 1. encode a fixed pool of training scenes with the trained VAE (latents,
token ids); 2. train with an EMA of the weights; 3. write the diffusers pipeline folder (EMA weights).
"""

import argparse
import copy
import json
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from pipeline_flux import calculate_shift, latent_image_ids, pack_latents
from train.common import (RUNS_DIR, add_common_arguments, batches, check_common_arguments, save_checkpoint,
                          seed_everything, step_generator, train)
from train.scenes import caption, render_batch, scenes
from train.world import T5_TEXT_TOKENS, TRANSFORMER_CONFIG, text_encoder_configs, write_pipeline_skeleton

CAPTION_DROPOUT = 0.1
LATENT_SIDE = 16  # 128 px / 8


class TextEncoders(torch.nn.Module):
    """CLIP pooled features and T5 token features, as FluxPipeline.encode_prompt computes them."""

    def __init__(self, clip: CLIPTextModel, t5: T5EncoderModel):
        super().__init__()
        self.clip, self.t5 = clip, t5

    def forward(self, clip_ids: torch.Tensor, t5_ids: torch.Tensor):
        return self.t5(t5_ids)[0], self.clip(clip_ids).pooler_output


def tokenize(folder: Path, captions: list) -> tuple:
    clip_tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    t5_tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer_2")
    clip_ids = clip_tokenizer(captions, padding="max_length", max_length=clip_tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    t5_ids = t5_tokenizer(captions, padding="max_length", max_length=T5_TEXT_TOKENS, truncation=True,
                          return_tensors="pt").input_ids
    return clip_ids, t5_ids


@torch.no_grad()
def encode_pool(vae_folder: Path, skeleton: Path, count: int, seed: int, device: str) -> dict:
    """Latents (normalised as the pipeline normalises them, packed) and token ids of `count` training scenes."""
    vae = AutoencoderKL.from_pretrained(vae_folder).to(device).eval()
    pool = scenes(seed, count, "train")
    latents = []
    for part in batches(count, 64):
        images = torch.from_numpy(render_batch(pool[part])).to(device)
        latent = vae.encode(images).latent_dist.mean
        latent = (latent - vae.config.shift_factor) * vae.config.scaling_factor
        latents.append(torch.from_numpy(pack_latents(latent.cpu().numpy())))
    captions = [caption(scene) for scene in pool] + [""]  # the last entry is the dropped caption
    clip_ids, t5_ids = tokenize(skeleton, captions)
    return {"latents": torch.cat(latents), "clip_ids": clip_ids, "t5_ids": t5_ids}


def sample_sigmas(generator: torch.Generator, batch: int, mu: float) -> torch.Tensor:
    """Logit-normal sigmas shifted like FlowMatchEulerDiscreteScheduler's time shift with `mu`."""
    t = torch.sigmoid(torch.randn(batch, generator=generator))
    return np.exp(mu) / (np.exp(mu) + (1 / t - 1))


def flow_matching_loss(transformer, encoders, pool: dict, indices: torch.Tensor, generator: torch.Generator,
                       mu: float, device: str) -> torch.Tensor:
    batch = len(indices)
    x0 = pool["latents"][indices]
    dropped = torch.rand(batch, generator=generator) < CAPTION_DROPOUT
    text_index = torch.where(dropped, torch.full_like(indices, len(pool["t5_ids"]) - 1), indices)
    sigma = sample_sigmas(generator, batch, mu)
    noise = torch.randn(x0.shape, generator=generator)
    noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    text, pooled = encoders(pool["clip_ids"][text_index].to(device), pool["t5_ids"][text_index].to(device))
    prediction = transformer(
        hidden_states=noisy.to(device), encoder_hidden_states=text, pooled_projections=pooled,
        timestep=sigma.to(device), img_ids=pool["img_ids"].to(device), txt_ids=pool["txt_ids"].to(device),
        return_dict=False)[0]
    return F.mse_loss(prediction, (noise - x0).to(device))


def write_pipeline(out: Path, skeleton: Path, vae_folder: Path, ema: torch.nn.ModuleDict) -> Path:
    """The diffusers FLUX folder: skeleton (index, scheduler, tokenizers), EMA models, the trained VAE."""
    target = out / "pipeline"
    partial = out / "pipeline.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(skeleton, partial)
    ema["transformer"].save_pretrained(partial / "transformer")
    ema["encoders"].clip.save_pretrained(partial / "text_encoder")
    ema["encoders"].t5.save_pretrained(partial / "text_encoder_2")
    shutil.copytree(vae_folder, partial / "vae")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return target


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=3000, batch_size=32, lr=4e-4)
    parser.add_argument("--vae", type=Path, default=RUNS_DIR / "vae" / "vae", help="trained VAE folder (train.vae)")
    parser.add_argument("--pool", type=int, default=12000, help="training scenes encoded once")
    parser.add_argument("--out", type=Path, default=RUNS_DIR / "flux")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    if not (args.vae / "config.json").is_file():
        parser.error(f"--vae {args.vae} holds no trained VAE: run `python -m train.vae` first")
    seed_everything(args.seed)
    skeleton = write_pipeline_skeleton(args.out / "skeleton")

    pool_path = args.out / "pool.pt"
    if not pool_path.is_file():
        print(f"encoding {args.pool} training scenes with {args.vae}", flush=True)
        save_checkpoint(pool_path, encode_pool(args.vae, skeleton, args.pool, args.seed, args.device))
    pool = torch.load(pool_path)
    pool["img_ids"] = torch.from_numpy(latent_image_ids(LATENT_SIDE // 2, LATENT_SIDE // 2))
    pool["txt_ids"] = torch.zeros(T5_TEXT_TOKENS, 3)
    mu = calculate_shift(pool["latents"].shape[1])

    clip_config, t5_config = text_encoder_configs()
    t5_config.dropout_rate = 0.0
    model = torch.nn.ModuleDict({
        "transformer": FluxTransformer2DModel(**TRANSFORMER_CONFIG),
        "encoders": TextEncoders(CLIPTextModel(clip_config), T5EncoderModel(t5_config)),
    }).to(args.device)
    ema = copy.deepcopy(model).requires_grad_(False)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in model["encoders"].named_children()}
    counts["transformer"] = sum(p.numel() for p in model["transformer"].parameters())
    print("parameters: " + ", ".join(f"{name} {count / 1e6:.2f} M" for name, count in counts.items()), flush=True)

    def loss_fn(step: int):
        generator = step_generator(args.seed, step)
        indices = torch.randint(len(pool["latents"]), (args.batch_size,), generator=generator)
        loss = flow_matching_loss(model["transformer"], model["encoders"], pool, indices, generator, mu, args.device)
        return loss, {"loss": loss.item()}

    seconds = train("flux", args, model, loss_fn, weight_decay=0.01, max_grad_norm=1.0, ema=ema)
    if seconds is None:
        return
    folder = write_pipeline(args.out, skeleton, args.vae, ema.cpu())
    (args.out / "train_stats.json").write_text(json.dumps({"train_seconds": round(seconds, 1), "steps": args.steps,
                                                           "batch_size": args.batch_size, "parameters": counts}))
    print(f"flux: {seconds:.0f} s; wrote {folder}")


if __name__ == "__main__":
    main()
