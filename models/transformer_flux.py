"""Portable MindSpore Flux.1 transformer with diffusers' parameter names, config keys and call contract.

mindone's `FluxTransformer2DModel` relies on kernels that MindSpore's CPU backend lacks; this one is
built only from ops that every backend has (see models/layers.py), so the same checkpoint and the same
cached forward run on CPU, GPU and Ascend.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from .attention import FluxAttention, FluxPosEmbed, RotaryEmbedding
from .config_mixin import ConfigMixin, register_to_config
from .layers import (
    AdaLayerNormContinuous,
    AdaLayerNormZero,
    CombinedTimestepGuidanceTextProjEmbeddings,
    CombinedTimestepTextProjEmbeddings,
    FeedForward,
    LayerNormNoAffine,
    broadcast,
    gelu_tanh,
    modulate,
    native_gelu_preferred,
)
from .loading import load_pretrained

FP16_MAX = 65504.0
REQUIRED_CONFIG_KEYS = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads")
# A double-stream block's text stream after attention: the text tokens' attention output (before `to_add_out`)
# and four modulation vectors.
TextUpdate = Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]


def clip_fp16(x: Tensor) -> Tensor:
    """Keep fp16 activations finite, as diffusers does at the end of every block."""
    if x.dtype == ms.float16:
        return ops.clamp(x, -FP16_MAX, FP16_MAX)
    return x


def gated_add(residual: Tensor, gate: Tensor, update: Tensor) -> Tensor:
    """`residual + gate * update`, the per-sample (batch, dim) gate broadcast explicitly over the tokens
    (see layers.broadcast: host memory on CPU)."""
    return residual + broadcast(gate[:, None], update) * update


def check_call_options(joint_attention_kwargs: Optional[Dict[str, Any]], return_dict: bool = False) -> None:
    """The arguments exist for call compatibility with diffusers; attention processors, LoRA scales and
    output dataclasses (which graph mode cannot return) are not supported."""
    if joint_attention_kwargs:
        raise ValueError(
            f"joint_attention_kwargs are not supported by the portable Flux transformer, got "
            f"{list(joint_attention_kwargs)}; pass None"
        )
    if return_dict:
        raise ValueError("return_dict=True is not supported (graph mode returns tuples); read `(sample,)`")


class FluxTransformerBlock(nn.Cell):
    """Double-stream block: image and text keep separate weights and attend jointly.

    The block is two named steps, `image_stream` (attention and the image update) and `text_stream` (the
    text update after attention), so that the cached forward can leave the second out of a step that never
    reads the text output: a hit step with no Bn blocks. On the `mid` model at 512x512 that is 3 of the
    hit's 25 matmuls and the text output projection (measured 20 ms of a 376 ms hit against a 333 ms
    ideal, MindSpore profiler on CPU).
    """

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, chunks=6)
        self.norm1_context = AdaLayerNormZero(dim, chunks=6)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, added_kv_proj_dim=dim)
        self.norm2 = LayerNormNoAffine(dim)
        self.ff = FeedForward(dim)
        self.norm2_context = LayerNormNoAffine(dim)
        self.ff_context = FeedForward(dim)

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                  image_rotary_emb: Optional[RotaryEmbedding] = None,
                  joint_attention_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[Tensor, Tensor]:
        check_call_options(joint_attention_kwargs)
        hidden_states, text_update = self.image_stream(hidden_states, encoder_hidden_states, temb, image_rotary_emb)
        return self.text_stream(encoder_hidden_states, text_update), hidden_states

    def image_stream(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                     image_rotary_emb: Optional[RotaryEmbedding] = None) -> Tuple[Tensor, TextUpdate]:
        """The block's image output, and what `text_stream` needs to finish the text output."""
        norm_hidden, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(hidden_states, temb)
        norm_context, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(
            encoder_hidden_states, temb
        )
        attn_output, context_attention = self.attn.attend(norm_hidden, norm_context, image_rotary_emb)

        hidden_states = gated_add(hidden_states, gate_msa, attn_output)
        norm_hidden = modulate(self.norm2(hidden_states), shift_mlp, scale_mlp)
        hidden_states = gated_add(hidden_states, gate_mlp, self.ff(norm_hidden))
        return hidden_states, (context_attention, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp)

    def text_stream(self, encoder_hidden_states: Tensor, text_update: TextUpdate) -> Tensor:
        """The block's text output from its text input and `image_stream`'s `text_update`."""
        context_attention, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = text_update
        encoder_hidden_states = gated_add(encoder_hidden_states, c_gate_msa, self.attn.to_add_out(context_attention))
        norm_context = modulate(self.norm2_context(encoder_hidden_states), c_shift_mlp, c_scale_mlp)
        encoder_hidden_states = gated_add(encoder_hidden_states, c_gate_mlp, self.ff_context(norm_context))
        return clip_fp16(encoder_hidden_states)


class FluxSingleTransformerBlock(nn.Cell):
    """Single-stream block: text and image tokens share weights; attention and MLP run in parallel."""

    def __init__(self, dim: int, num_attention_heads: int, attention_head_dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        mlp_hidden_dim = int(dim * mlp_ratio)
        self.norm = AdaLayerNormZero(dim, chunks=3)
        self.proj_mlp = nn.Dense(dim, mlp_hidden_dim)
        self.proj_out = nn.Dense(dim + mlp_hidden_dim, dim)
        self.attn = FluxAttention(dim, num_attention_heads, attention_head_dim, pre_only=True)
        self.native_gelu = native_gelu_preferred()

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
                  image_rotary_emb: Optional[RotaryEmbedding] = None,
                  joint_attention_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[Tensor, Tensor]:
        check_call_options(joint_attention_kwargs)
        text_tokens = encoder_hidden_states.shape[1]
        residual = ops.cat([encoder_hidden_states, hidden_states], 1)
        norm_hidden, gate = self.norm(residual, temb)
        mlp_hidden = gelu_tanh(self.proj_mlp(norm_hidden), self.native_gelu)
        attn_output = self.attn(norm_hidden, image_rotary_emb=image_rotary_emb)
        joint = clip_fp16(gated_add(residual, gate, self.proj_out(ops.cat([attn_output, mlp_hidden], 2))))
        return joint[:, :text_tokens], joint[:, text_tokens:]


def embed_inputs(model, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                 timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Optional[Tensor]):
    """Embed the inputs of a Flux forward: (image stream, text stream, conditioning, rotary embedding).

    Uses only the contract attributes, so the plain and the cached forward share it on our model and on
    mindone's. Timestep and guidance arrive in [0, 1] and are scaled by 1000, as diffusers does.
    """
    has_guidance_embedder = hasattr(model.time_text_embed, "guidance_embedder")
    if has_guidance_embedder and guidance is None:
        raise ValueError("this transformer has guidance_embeds=True (FLUX.1-dev): pass a `guidance` tensor")
    if not has_guidance_embedder and guidance is not None:
        raise ValueError("this transformer has no guidance embedding (FLUX.1-schnell): pass guidance=None")
    dtype = model.x_embedder.weight.dtype
    hidden_states = model.x_embedder(hidden_states.astype(dtype))
    timestep = timestep.astype(dtype) * 1000
    pooled_projections = pooled_projections.astype(dtype)
    if guidance is None:
        temb = model.time_text_embed(timestep, pooled_projections)
    else:
        temb = model.time_text_embed(timestep, guidance.astype(dtype) * 1000, pooled_projections)
    encoder_hidden_states = model.context_embedder(encoder_hidden_states.astype(dtype))
    if txt_ids.ndim == 3:
        txt_ids = txt_ids[0]
    if img_ids.ndim == 3:
        img_ids = img_ids[0]
    image_rotary_emb = model.pos_embed(ops.cat([txt_ids.astype(ms.float32), img_ids.astype(ms.float32)], 0))
    return hidden_states, encoder_hidden_states, temb, image_rotary_emb


def num_blocks(model) -> int:
    """Double-stream then single-stream blocks form one sequence of blocks with one call contract."""
    return len(model.transformer_blocks) + len(model.single_transformer_blocks)


def block_at(model, index: int):
    """Block `index` (a compile-time int) of that sequence."""
    num_double = len(model.transformer_blocks)
    if index < num_double:
        return model.transformer_blocks[index]
    return model.single_transformer_blocks[index - num_double]


def run_blocks(model, start: int, end: int, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor,
               image_rotary_emb: RotaryEmbedding) -> Tuple[Tensor, Tensor]:
    """Run blocks [start, end) of that sequence (compile-time ints); returns (text, image) streams."""
    for index in range(start, end):
        encoder_hidden_states, hidden_states = block_at(model, index)(
            hidden_states, encoder_hidden_states, temb, image_rotary_emb)
    return encoder_hidden_states, hidden_states


class FluxTransformer2DModel(nn.Cell, ConfigMixin):
    """Flux.1 transformer (FLUX.1-dev with `guidance_embeds=True`, FLUX.1-schnell without).

    `from_pretrained(folder, subfolder="transformer", mindspore_dtype=...)` loads a diffusers
    checkpoint strictly: any missing, unexpected or mis-shaped weight is an error, never a silently
    random-initialised model.
    """


    @register_to_config
    def __init__(
        self,
        patch_size: int = 1,
        in_channels: int = 64,
        out_channels: Optional[int] = None,
        num_layers: int = 19,
        num_single_layers: int = 38,
        attention_head_dim: int = 128,
        num_attention_heads: int = 24,
        joint_attention_dim: int = 4096,
        pooled_projection_dim: int = 768,
        guidance_embeds: bool = False,
        axes_dims_rope: Sequence[int] = (16, 56, 56),
    ):
        super().__init__()
        if sum(axes_dims_rope) != attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(axes_dims_rope)} must add up to attention_head_dim {attention_head_dim}"
            )
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim

        self.pos_embed = FluxPosEmbed(theta=10000, axes_dim=axes_dims_rope)
        embedding_class = (
            CombinedTimestepGuidanceTextProjEmbeddings if guidance_embeds else CombinedTimestepTextProjEmbeddings
        )
        self.time_text_embed = embedding_class(self.inner_dim, pooled_projection_dim)
        self.context_embedder = nn.Dense(joint_attention_dim, self.inner_dim)
        self.x_embedder = nn.Dense(in_channels, self.inner_dim)
        self.transformer_blocks = nn.CellList(
            [FluxTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        self.single_transformer_blocks = nn.CellList(
            [
                FluxSingleTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim)
                for _ in range(num_single_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(self.inner_dim, self.inner_dim)
        self.proj_out = nn.Dense(self.inner_dim, patch_size * patch_size * self.out_channels)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        mindspore_dtype: Optional[ms.Type] = None) -> "FluxTransformer2DModel":
        return load_pretrained(cls, pretrained_model_name_or_path, subfolder, mindspore_dtype, REQUIRED_CONFIG_KEYS)

    def construct(
        self,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor,
        pooled_projections: Tensor,
        timestep: Tensor,
        img_ids: Tensor,
        txt_ids: Tensor,
        guidance: Optional[Tensor] = None,
        joint_attention_kwargs: Optional[Dict[str, Any]] = None,
        return_dict: bool = False,
    ) -> Tuple[Tensor]:
        """Predict the flow for packed latents (batch, image_tokens, in_channels); returns `(sample,)`."""
        check_call_options(joint_attention_kwargs, return_dict)
        hidden_states, encoder_hidden_states, temb, image_rotary_emb = embed_inputs(
            self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance
        )
        encoder_hidden_states, hidden_states = run_blocks(
            self, 0, num_blocks(self), hidden_states, encoder_hidden_states, temb, image_rotary_emb
        )
        return (self.proj_out(self.norm_out(hidden_states, temb)),)
