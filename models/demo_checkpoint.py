"""Small seeded checkpoints in the diffusers FLUX folder layout.

No FLUX.1 weights can be downloaded here, so the project makes its own: random weights, real format.
They let every entry point run with no arguments and let tests cover the real loading path. They
are NOT FLUX.1 and produce no meaningful images.
"""

import shutil
from pathlib import Path
from typing import Dict

import numpy as np
from mindspore.nn.utils import no_init_parameters
from safetensors.numpy import save_file

from .loading import WEIGHTS_NAME
from .transformer_flux import FluxTransformer2DModel

# Real FLUX.1 keeps in_channels=64 (16 latent channels packed 2x2) and a 3-axis rope; so do these.
TRANSFORMER_CONFIGS: Dict[str, dict] = {
    "demo": dict(
        patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=32,
        num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12),
    ),
    # Big enough that block compute dominates a forward pass on CPU (issue benchmarks use it).
    "mid": dict(
        patch_size=1, in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
        num_attention_heads=4, joint_attention_dim=512, pooled_projection_dim=128, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}


def seeded_weights(shapes: Dict[str, tuple], seed: int) -> Dict[str, np.ndarray]:
    """Weights N(0, 1/fan_in), small biases, unit norm scales: activations stay O(1) through the blocks."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name in sorted(shapes):
        shape = shapes[name]
        if name.endswith(".weight") and len(shape) == 2:
            values = rng.standard_normal(shape) / np.sqrt(shape[1])
        elif name.endswith("norm_q.weight") or name.endswith("norm_k.weight") or "norm_added" in name:
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


def ensure_demo_checkpoint(folder: Path, name: str = "demo", seed: int = 0) -> Path:
    """Create the named random-weight checkpoint at `folder` unless it is already there.

    Written to a sibling temporary folder and renamed into place, so an interrupted run never leaves a
    half-written checkpoint behind.
    """
    folder = Path(folder)
    if folder.exists():
        return folder
    print(f"Creating the '{name}' checkpoint at {folder}: a small RANDOM-WEIGHT Flux model for "
          "demonstration and tests, not FLUX.1.", flush=True)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    write_transformer_checkpoint(partial, TRANSFORMER_CONFIGS[name], seed)
    partial.rename(folder)
    return folder
