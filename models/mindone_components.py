"""mindone's FLUX components, for `FluxPipeline.from_pretrained(..., use_mindone_models=True)` only.

Importing mindone takes about 9 s (it imports its whole model zoo), so nothing else in the project
imports it: this module is imported only when a user asks for mindone's models (Ascend kernels; its
transformer and VAE do not run on MindSpore's CPU backend). Its loaders only warn about missing or
unexpected weights and leave them random, so every component is checked against its files first.
"""

from pathlib import Path
from typing import Dict

import mindspore as ms
from mindspore import nn
from mindspore.nn.utils import no_init_parameters

from .demo_checkpoint import checkpoint_shapes
from .loading import (TRANSFORMERS_WEIGHTS_NAME, check_weights_match, model_folder, stored_tensors, weight_files,
                      without_ignored)
from .t5_position_buckets import use_exact_t5_position_buckets


class MindoneVAEDecoder(nn.Cell):
    """mindone's AutoencoderKL behind the portable decoder's interface: calling it decodes latents."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae
        self.config = vae.config

    def construct(self, latents: ms.Tensor) -> ms.Tensor:
        return self.vae.decode(latents, return_dict=False)[0]


class MindoneTextEncoder(nn.Cell):
    """A mindone text encoder called as the portable ones are: `encoder(ids)` returns a tuple."""

    def __init__(self, encoder: nn.Cell):
        super().__init__()
        self.encoder = encoder
        self.config = encoder.config

    def construct(self, ids: ms.Tensor) -> tuple:
        return self.encoder(ids, return_dict=False)


def load_diffusers_model(cls, path: str, subfolder: str, dtype: ms.Type):
    model = cls.from_pretrained(path, subfolder=subfolder, mindspore_dtype=dtype)
    folder = model_folder(path, subfolder)
    expected = {name: tuple(param.shape) for name, param in model.parameters_and_names()}
    check_weights_match(expected, stored_tensors(weight_files(folder)), folder)
    return model


def load_transformers_model(cls, folder: Path, dtype: ms.Type):
    """Names and shapes checked against the files first. The tied copy of T5's embedding
    (`encoder.embed_tokens.weight`, which FLUX.1's file also stores) and transformers' ignorable buffers
    are allowed."""
    config = cls.config_class.from_pretrained(folder)
    with no_init_parameters():
        expected = checkpoint_shapes(cls(config))
    ignored = tuple(getattr(cls, "_keys_to_ignore_on_load_unexpected", None) or ()) + tuple(
        getattr(cls, "_tied_weights_keys", None) or ())
    check_weights_match(expected, without_ignored(stored_tensors(weight_files(folder, TRANSFORMERS_WEIGHTS_NAME)),
                                                  ignored), folder)
    return cls.from_pretrained(str(folder), config=config, dtype=dtype)


def load_mindone_components(path: str, dtype: ms.Type) -> Dict[str, nn.Cell]:
    """mindone's transformer, VAE and text encoders of a diffusers FLUX folder, strictly loaded."""
    from mindone.diffusers import AutoencoderKL, FluxTransformer2DModel
    from mindone.transformers import CLIPTextModel, T5EncoderModel

    use_exact_t5_position_buckets()
    root = Path(path)
    return dict(
        transformer=load_diffusers_model(FluxTransformer2DModel, path, "transformer", dtype),
        vae=MindoneVAEDecoder(load_diffusers_model(AutoencoderKL, path, "vae", dtype)),
        text_encoder=MindoneTextEncoder(load_transformers_model(CLIPTextModel, root / "text_encoder", dtype)),
        text_encoder_2=MindoneTextEncoder(load_transformers_model(T5EncoderModel, root / "text_encoder_2", dtype)),
    )
