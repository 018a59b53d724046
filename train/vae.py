"""Train the world's VAE: a FLUX-shaped AutoencoderKL (16 latent channels, 8x downsampling, mid-block
attention, no quant convs) on rendered scenes, then measure FLUX's `shift_factor` / `scaling_factor`.

FLUX.1's VAE config carries shift 0.1159 and scale 0.3611: the mean and 1/std of its latents over
data, so that the transformer sees roughly zero-mean unit-variance latents. They are measured here
the same way, over held-in scenes, and written into the config.

Loss: L1 + MSE reconstruction of the posterior mean (the latent every later stage uses) plus a weak KL
term (per latent element) that keeps the latent scale bounded; no perceptual or adversarial loss (none
of their pretrained networks can be downloaded). Decoding posterior samples during training, as LDM
does, gave 16-17 dB after 400 steps here: the sampling noise costs more than it regularises at this
training length.

One group per GroupNorm (FLUX uses 32): scenes are mostly flat colour, and a GroupNorm over few channels
normalises a flat region to the same values whatever its colour (measured: a yellow background came
back orange, white came back lavender with 8 groups of 2 channels).
"""

import argparse
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from train.common import RUNS_DIR, add_common_arguments, check_common_arguments, seed_everything, step_generator, train
from train.scenes import render_batch, scenes

VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[16, 32, 64, 64], layers_per_block=1,
    norm_num_groups=1, act_fn="silu", sample_size=128, use_quant_conv=False, use_post_quant_conv=False,
    mid_block_add_attention=True, force_upcast=True,
)
KL_WEIGHT = 1e-4
STATS_SCENES = 512


def scene_batch(seed: int, step: int, batch_size: int) -> torch.Tensor:
    scene_seed = int(step_generator(seed, step).initial_seed() % 2**63)
    return torch.from_numpy(render_batch(scenes(scene_seed, batch_size)))


def vae_loss(vae: AutoencoderKL, images: torch.Tensor) -> dict:
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.mean).sample
    error = reconstruction - images
    kl = posterior.kl().sum() / posterior.mean.numel()
    return {"l1": error.abs().mean(), "mse": error.pow(2).mean(), "kl": kl}


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, seed: int, device: str, count: int = STATS_SCENES) -> dict:
    """FLUX's shift (mean) and scale (1/std) of the latents of `count` training scenes, and the
    reconstruction PSNR (dB, pixels in [0, 1])."""
    latents, squared_errors = [], []
    for start in range(0, count, 32):
        images = torch.from_numpy(render_batch(scenes(seed + 10_000 + start, 32))).to(device)
        posterior = vae.encode(images).latent_dist
        latents.append(posterior.mean.cpu())
        squared_errors.append(((vae.decode(posterior.mean).sample.clamp(-1, 1) - images) / 2).pow(2).mean((1, 2, 3)).cpu())
    latents = torch.cat(latents)
    psnr = (-10 * torch.log10(torch.cat(squared_errors))).mean().item()
    return {"shift_factor": round(latents.mean().item(), 4), "scaling_factor": round(1 / latents.std().item(), 4),
            "reconstruction_psnr_db": round(psnr, 2)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_arguments(parser, steps=2400, batch_size=8, lr=1e-3)
    parser.add_argument("--out", type=Path, default=RUNS_DIR / "vae", help="run folder (checkpoint + final vae/)")
    parser.add_argument("--stats_scenes", type=int, default=STATS_SCENES,
                        help="scenes that measure the latent shift / scale (multiple of 32)")
    args = parser.parse_args(argv)
    check_common_arguments(parser, args)
    seed_everything(args.seed)
    vae = AutoencoderKL(**VAE_CONFIG).to(args.device)

    def loss_fn(step: int):
        losses = vae_loss(vae, scene_batch(args.seed, step, args.batch_size).to(args.device))
        loss = losses["l1"] + losses["mse"] + KL_WEIGHT * losses["kl"]
        return loss, {name: value.item() for name, value in losses.items()}

    seconds = train("vae", args, vae, loss_fn, weight_decay=0.0)
    if seconds is None:
        return
    vae.eval()
    stats = latent_statistics(vae, args.seed, args.device, args.stats_scenes)
    vae.register_to_config(shift_factor=stats["shift_factor"], scaling_factor=stats["scaling_factor"])
    vae.to("cpu").save_pretrained(args.out / "vae")
    (args.out / "vae_stats.json").write_text(json.dumps(dict(stats, train_seconds=round(seconds, 1)), indent=1))
    print(f"vae: {stats}, {seconds:.0f} s; wrote {args.out / 'vae'}")


if __name__ == "__main__":
    main()
