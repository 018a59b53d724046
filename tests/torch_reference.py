"""The independent reference: torch diffusers 0.38 Flux transformers on small configurations.

Checkpoints are written with diffusers' own `save_pretrained`, so our loader is tested against the
real format and parameter names, and the reference outputs come from diffusers' own forward.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import torch
from diffusers import FluxTransformer2DModel as TorchFluxTransformer

SMALL_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=32,
    pooled_projection_dim=24,
    axes_dims_rope=(4, 6, 6),
)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_torch_checkpoint(folder: Path, guidance_embeds: bool, seed: int = 0, weights_dtype: str = "float32",
                           max_shard_size: Optional[str] = None, **overrides) -> Path:
    """Seeded diffusers transformer saved as `<folder>/transformer`; returns `folder`.

    Weights are drawn with a larger spread than diffusers' init (zero-init gates would make the
    blocks identity maps and hide errors).
    """
    torch.manual_seed(seed)
    model = TorchFluxTransformer(**{**SMALL_CONFIG, **overrides, "guidance_embeds": guidance_embeds}).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model = model.to(TORCH_DTYPES[weights_dtype])
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder / "transformer", **kwargs)
    return folder


@dataclass
class FluxInputs:
    hidden_states: np.ndarray
    encoder_hidden_states: np.ndarray
    pooled_projections: np.ndarray
    timestep: np.ndarray
    img_ids: np.ndarray
    txt_ids: np.ndarray
    guidance: Optional[np.ndarray]

    def as_dict(self) -> Dict[str, Optional[np.ndarray]]:
        return dict(self.__dict__)


def make_inputs(batch: int, height: int, width: int, text_tokens: int, guidance: bool, seed: int = 0,
                config: Optional[dict] = None) -> FluxInputs:
    """Packed-latent inputs with Flux's position ids: (0, row, col) for image, zeros for text."""
    config = config or SMALL_CONFIG
    rng = np.random.default_rng(seed)
    img_ids = np.zeros((height, width, 3), np.float32)
    img_ids[..., 1] = np.arange(height)[:, None]
    img_ids[..., 2] = np.arange(width)[None, :]
    return FluxInputs(
        hidden_states=rng.standard_normal((batch, height * width, config["in_channels"])).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text_tokens, config["joint_attention_dim"])).astype(
            np.float32
        ),
        pooled_projections=rng.standard_normal((batch, config["pooled_projection_dim"])).astype(np.float32),
        timestep=rng.uniform(0.05, 1.0, batch).astype(np.float32),
        img_ids=img_ids.reshape(-1, 3),
        txt_ids=np.zeros((text_tokens, 3), np.float32),
        guidance=np.full(batch, 3.5, np.float32) if guidance else None,
    )


def torch_forward(folder: Path, inputs: FluxInputs, dtype: str = "float32") -> np.ndarray:
    """diffusers' output in fp32 numpy for a checkpoint folder, computed in `dtype`."""
    torch_dtype = TORCH_DTYPES[dtype]
    model = TorchFluxTransformer.from_pretrained(folder, subfolder="transformer", torch_dtype=torch_dtype).eval()
    as_torch = {
        name: None if value is None else torch.from_numpy(value)
        for name, value in inputs.as_dict().items()
    }
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        if as_torch[name] is not None:
            as_torch[name] = as_torch[name].to(torch_dtype)
    with torch.no_grad():
        return model(**as_torch, return_dict=False)[0].float().numpy()


def relative_max_error(actual: np.ndarray, reference: np.ndarray) -> float:
    """max |actual - reference| / max |reference|: one number per comparison, scale-free."""
    return float(np.abs(actual.astype(np.float64) - reference).max() / np.abs(reference).max())
