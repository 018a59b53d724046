"""Rotary position embedding and joint attention of the Flux transformer."""

from typing import Optional, Sequence, Tuple

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from .layers import RMSNorm, broadcast

RotaryEmbedding = Tuple[Tensor, Tensor]


def fused_attention_available() -> bool:
    """MindSpore's FlashAttentionScore kernel exists on Ascend only; CPU and GPU take the math path."""
    return ms.get_context("device_target") == "Ascend"


class FluxPosEmbed(nn.Cell):
    """Multi-axis rotary embedding: returns (cos, signed_sin), each (tokens, head_dim), fp32.

    Each axis of the position ids owns a slice of the head dimension. All axes are handled by one
    product `ids @ frequency_matrix`, where row `a` of the matrix holds axis `a`'s frequencies (each
    repeated twice, matching the interleaved real/imaginary pairs) in that axis's columns and zeros
    elsewhere; the zeros add nothing, so the angles equal the per-axis outer products exactly.
    `signed_sin` is sin with the sign of the real slots flipped (-sin, +sin, ...), the form
    `apply_rotary_emb` takes; computed once per forward, it serves every block.
    """

    def __init__(self, theta: int, axes_dim: Sequence[int]):
        super().__init__()
        head_dim = int(sum(axes_dim))
        matrix = np.zeros((len(axes_dim), head_dim), np.float64)
        start = 0
        for axis, dim in enumerate(axes_dim):
            if dim % 2:
                raise ValueError(f"axes_dims_rope entries must be even, got {list(axes_dim)}")
            frequencies = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
            matrix[axis, start : start + dim] = np.repeat(frequencies, 2)
            start += dim
        self.frequency_matrix = Tensor(matrix.astype(np.float32))
        self.sin_sign = Tensor(np.tile(np.array([-1.0, 1.0], np.float32), head_dim // 2))

    def construct(self, ids: Tensor) -> RotaryEmbedding:
        angles = ops.matmul(ids.astype(ms.float32), self.frequency_matrix)
        return ops.cos(angles), ops.sin(angles) * self.sin_sign


def rotary_partners(head_dim: int) -> Tensor:
    """Index of each channel's pair partner (1, 0, 3, 2, ...), the gather `apply_rotary_emb` takes."""
    return Tensor(np.arange(head_dim).reshape(-1, 2)[:, ::-1].reshape(-1).astype(np.int32))


def apply_rotary_emb(x: Tensor, rotary_emb: RotaryEmbedding, partners: Tensor) -> Tensor:
    """Rotate interleaved (real, imaginary) pairs of `x` (batch, heads, tokens, head_dim), in fp32:
    real' = real cos - imag sin, imag' = imag cos + real sin, i.e. `x cos + x[partners] signed_sin`.

    The same products and sums as the complex rotation, so bit for bit the previous slice-negate-concat
    form, without its concat (4.6% of a `mid` forward on CPU; the gather saved 0.04-0.13 s).
    """
    cos, signed_sin = rotary_emb
    x32 = x.astype(ms.float32)
    return (x32 * broadcast(cos, x32) + ops.gather(x32, partners, -1) * broadcast(signed_sin, x32)).astype(x.dtype)


# Attention products on the 4-D (batch, heads, tokens, head_dim) tensors; transpose_b saves the
# materialised key transpose (measured -0.06 s per `mid` forward on CPU).
_SCORES = ops.BatchMatMul(transpose_b=True)
_WEIGHTED_SUM = ops.BatchMatMul()


def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, use_fused: bool) -> Tensor:
    """Softmax attention over (batch, heads, tokens, head_dim) tensors, without a mask.

    `use_fused` selects MindSpore's FlashAttentionScore (Ascend); the math path works on every
    backend and takes the softmax in fp32.
    """
    scale = query.shape[-1] ** -0.5
    if use_fused:
        return ops.flash_attention_score(
            query, key, value, query.shape[1], scalar_value=scale, input_layout="BNSD"
        )
    scores = _SCORES(query * scale, key)
    probabilities = ops.softmax(scores.astype(ms.float32), -1).astype(value.dtype)
    return _WEIGHTED_SUM(probabilities, value)


class FluxAttention(nn.Cell):
    """Multi-head attention with RMS-normalised queries and keys (diffusers `FluxAttention`).

    With `added_kv_proj_dim` (double-stream blocks) the text stream has its own projections and the
    two streams attend jointly, text tokens first. With `pre_only` (single-stream blocks) there is no
    output projection: the block fuses it with the MLP output.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, added_kv_proj_dim: Optional[int] = None,
                 pre_only: bool = False, eps: float = 1e-6):
        super().__init__()
        inner_dim = heads * head_dim
        self.heads = heads
        # Set by models.context_parallel.enable_context_parallel: gathers keys and values across ranks.
        self.gather_tokens = None
        self.use_fused_attention = fused_attention_available()
        self.rotary_partners = rotary_partners(head_dim)
        self.norm_q = RMSNorm(head_dim, eps)
        self.norm_k = RMSNorm(head_dim, eps)
        self.to_q = nn.Dense(dim, inner_dim)
        self.to_k = nn.Dense(dim, inner_dim)
        self.to_v = nn.Dense(dim, inner_dim)
        if not pre_only:
            # Slot 1 is diffusers' Dropout, kept so that the checkpoint's `to_out.0` names match.
            self.to_out = nn.CellList([nn.Dense(inner_dim, dim), nn.Identity()])
        self.joint = added_kv_proj_dim is not None
        if self.joint:
            self.norm_added_q = RMSNorm(head_dim, eps)
            self.norm_added_k = RMSNorm(head_dim, eps)
            self.add_q_proj = nn.Dense(added_kv_proj_dim, inner_dim)
            self.add_k_proj = nn.Dense(added_kv_proj_dim, inner_dim)
            self.add_v_proj = nn.Dense(added_kv_proj_dim, inner_dim)
            self.to_add_out = nn.Dense(inner_dim, dim)

    def _heads(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], x.shape[1], self.heads, -1).swapaxes(1, 2)

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                  image_rotary_emb: Optional[RotaryEmbedding] = None):
        if not self.joint:
            return self.attend(hidden_states, None, image_rotary_emb)
        image_out, text_heads = self.attend(hidden_states, encoder_hidden_states, image_rotary_emb)
        return image_out, self.to_add_out(text_heads)

    def attend(self, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
               image_rotary_emb: Optional[RotaryEmbedding] = None):
        """`construct` without the text output projection `to_add_out` (joint attention): returns the image
        output and the text tokens' attention output before it, which a cached hit step never reads."""
        query = self.norm_q(self._heads(self.to_q(hidden_states)))
        key = self.norm_k(self._heads(self.to_k(hidden_states)))
        value = self._heads(self.to_v(hidden_states))
        if self.joint:
            query = ops.cat([self.norm_added_q(self._heads(self.add_q_proj(encoder_hidden_states))), query], 2)
            key = ops.cat([self.norm_added_k(self._heads(self.add_k_proj(encoder_hidden_states))), key], 2)
            value = ops.cat([self._heads(self.add_v_proj(encoder_hidden_states)), value], 2)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, self.rotary_partners)
            key = apply_rotary_emb(key, image_rotary_emb, self.rotary_partners)
        if self.gather_tokens is not None:
            key, value = self.gather_tokens(key), self.gather_tokens(value)
        out = scaled_dot_product_attention(query, key, value, self.use_fused_attention)
        out = out.swapaxes(1, 2).reshape(out.shape[0], out.shape[2], -1)
        if not self.joint:
            return out
        text_tokens = encoder_hidden_states.shape[1]
        return self.to_out[0](out[:, text_tokens:]), out[:, :text_tokens]
