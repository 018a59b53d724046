"""transformers' T5EncoderModel in portable MindSpore: FLUX's second text encoder (its token features).

Runs on every backend in graph and PyNative mode; loads a transformers folder strictly (models/text_encoders.py).
The relative-position buckets are computed on the host, exactly as transformers computes them. T5's layer
norm is layers.RMSNorm: the variance in fp32, the normalised value cast to the model dtype before the
scale, as transformers' T5LayerNorm.
"""

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Tuple, Union

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

from .layers import RMSNorm, broadcast, gelu_tanh, native_gelu_preferred
from .loading import CheckpointError
from .text_encoders import (Embedding, config_from_keys, load_transformers_model, merge_heads, read_config_json,
                            split_heads)


T5_ACTIVATIONS = ("gelu_new", "relu")


@dataclass(frozen=True)
class T5EncoderConfig:
    """What T5EncoderModel reads of transformers' T5Config; the defaults are transformers'."""

    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "relu"
    is_gated_act: bool = False

    MODEL_TYPE: ClassVar[str] = "t5"
    MODEL_CLASS: ClassVar[str] = "T5EncoderModel"

    def __post_init__(self):
        if self.dense_act_fn not in T5_ACTIVATIONS:
            raise CheckpointError(f"dense_act_fn {self.dense_act_fn!r} (from feed_forward_proj) is not supported: this "
                                  f"T5EncoderModel implements {list(T5_ACTIVATIONS)} (T5 v1.1 and FLUX's T5-XXL use "
                                  "gated-gelu, that is gated gelu_new)")
        if self.relative_attention_num_buckets < 4:
            raise CheckpointError(f"relative_attention_num_buckets {self.relative_attention_num_buckets} is below 4, "
                                  "which leaves T5's bidirectional buckets no logarithmic range")

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "T5EncoderConfig":
        """As T5Config: `feed_forward_proj` ("relu", "gated-gelu", ...) sets the activation and gating, and
        `dense_act_fn` / `is_gated_act`, where the file stores them, take precedence."""
        path = Path(path)
        content = read_config_json(path, cls)
        projection = content.get("feed_forward_proj", "relu")
        parts = projection.split("-") if isinstance(projection, str) else []
        if not parts or len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise CheckpointError(f"{path}: feed_forward_proj {projection!r} is not `ACT` or `gated-ACT` (e.g. "
                                  "'relu', 'gated-gelu'), the forms transformers accepts")
        derived = dict(dense_act_fn="gelu_new" if projection == "gated-gelu" else parts[-1],
                       is_gated_act=parts[0] == "gated")
        return config_from_keys(cls, path, {**derived, **content})


@lru_cache(maxsize=None)
def bucket_boundaries(num_buckets: int, max_distance: int) -> Tuple[int, ...]:
    """Smallest distance of each logarithmic bucket after the first, for one direction's `num_buckets`.

    T5 puts a distance d >= max_exact into bucket `max_exact + int(log(d / max_exact) / log(max_distance /
    max_exact) * (num_buckets - max_exact))`. For FLUX's T5 (32 buckets, max distance 128) the quotient
    is a whole number at d = 16, 32 and 64, so a `log` a few ulp low (MindSpore's CPU log gives
    2.7725880 for log 16, not 2.7725887) puts those distances one bucket too low: a 1e-1 relative error
    in the embedding of a 64-token prompt. The boundaries are found here with the same fp32 formula that
    transformers evaluates.
    """
    max_exact = num_buckets // 2
    distances = np.arange(max_exact, 4 * max_distance, dtype=np.float32)
    scale = np.float32(math.log(max_distance / max_exact))
    buckets = max_exact + (np.log(distances / np.float32(max_exact)) / scale
                           * np.float32(num_buckets - max_exact)).astype(np.int64)
    return tuple(int(distances[np.argmax(buckets >= bucket)]) for bucket in range(max_exact + 1, num_buckets))


# T5 tokens FLUX pipelines encode at most (pipeline_flux.MAX_SEQUENCE_LENGTH).
MAX_BUCKET_LENGTH = 512

@lru_cache(maxsize=None)
def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) int32 bucket of each (query, key) pair: transformers' bidirectional
    `_relative_position_bucket(key - query)`. A host constant per sequence length, so the graph folds it;
    cached as numpy, and made a Tensor where it is used, so that no Tensor object is shared between graphs."""
    half = num_buckets // 2
    max_exact = half // 2
    relative = np.arange(length)[None, :] - np.arange(length)[:, None]
    distance = np.abs(relative)
    large = max_exact + np.searchsorted(bucket_boundaries(half, max_distance), distance, side="right")
    buckets = np.where(distance < max_exact, distance, large) + half * (relative > 0)
    buckets = buckets.astype(np.int32)
    buckets.setflags(write=False)
    return buckets


class T5Attention(nn.Cell):
    """T5 self-attention: no bias, no 1/sqrt(d) scaling (folded into T5's initialisation), a learned
    per-head bias of the relative position bucket (held by the first block, shared by all)."""

    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.heads = config.num_heads
        inner = config.num_heads * config.d_kv
        self.q = nn.Dense(config.d_model, inner, has_bias=False)
        self.k = nn.Dense(config.d_model, inner, has_bias=False)
        self.v = nn.Dense(config.d_model, inner, has_bias=False)
        self.o = nn.Dense(inner, config.d_model, has_bias=False)
        if has_relative_attention_bias:
            self.num_buckets = config.relative_attention_num_buckets
            self.max_distance = config.relative_attention_max_distance
            self.relative_attention_bias = Embedding(self.num_buckets, config.num_heads)
            # The buckets of the longest prompt FLUX encodes; a shorter one's are its top-left corner (they
            # depend on key - query only), so the graph slices a constant instead of making a Tensor from
            # Python while it compiles (a worker of the test suite crashed in such compiles).
            self.buckets = Tensor(relative_position_buckets(MAX_BUCKET_LENGTH, self.num_buckets, self.max_distance))

    def position_bias(self, length: int) -> Tensor:
        """(heads, length, length) bias of every query-key pair."""
        if length <= MAX_BUCKET_LENGTH:
            buckets = self.buckets[:length, :length]
        else:
            buckets = Tensor(relative_position_buckets(length, self.num_buckets, self.max_distance))
        return self.relative_attention_bias(buckets).transpose(2, 0, 1)

    def construct(self, x: Tensor, position_bias: Tensor) -> Tensor:
        scores = ops.matmul(split_heads(self.q(x), self.heads), split_heads(self.k(x), self.heads).swapaxes(-1, -2))
        scores = scores + broadcast(position_bias, scores)  # in the model dtype, as transformers adds it
        weights = ops.softmax(scores.astype(ms.float32), -1).astype(x.dtype)
        return self.o(merge_heads(ops.matmul(weights, split_heads(self.v(x), self.heads))))


class T5LayerSelfAttention(nn.Cell):
    """`x + attention(rms_norm(x))`."""

    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_relative_attention_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x: Tensor, position_bias: Tensor) -> Tensor:
        return x + self.SelfAttention(self.layer_norm(x), position_bias)


def t5_activation(name: str, x: Tensor, native_gelu: bool) -> Tensor:
    """transformers' "gelu_new" (tanh GELU, layers.gelu_tanh) or "relu"."""
    return gelu_tanh(x, native_gelu) if name == "gelu_new" else ops.relu(x)


class T5DenseActDense(nn.Cell):
    """`wo(act(wi(x)))`: the original T5's feed-forward."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.wi = nn.Dense(config.d_model, config.d_ff, has_bias=False)
        self.wo = nn.Dense(config.d_ff, config.d_model, has_bias=False)
        self.activation = config.dense_act_fn
        self.native_gelu = native_gelu_preferred()

    def construct(self, x: Tensor) -> Tensor:
        return self.wo(t5_activation(self.activation, self.wi(x), self.native_gelu))


class T5DenseGatedActDense(nn.Cell):
    """`wo(act(wi_0(x)) * wi_1(x))`: T5 v1.1's gated feed-forward (FLUX's T5-XXL)."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.wi_0 = nn.Dense(config.d_model, config.d_ff, has_bias=False)
        self.wi_1 = nn.Dense(config.d_model, config.d_ff, has_bias=False)
        self.wo = nn.Dense(config.d_ff, config.d_model, has_bias=False)
        self.activation = config.dense_act_fn
        self.native_gelu = native_gelu_preferred()

    def construct(self, x: Tensor) -> Tensor:
        return self.wo(t5_activation(self.activation, self.wi_0(x), self.native_gelu) * self.wi_1(x))


class T5LayerFF(nn.Cell):
    """`x + feed_forward(rms_norm(x))`."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(config) if config.is_gated_act else T5DenseActDense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x: Tensor) -> Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


FP16_MAX = float(np.finfo(np.float16).max)


def clamp_fp16(x: Tensor) -> Tensor:
    """transformers' T5Block clamp of fp16 hidden states: to +-65504, or to +-(65504 - 1000) (64512 once
    rounded to fp16) when any value is already infinite, so that the next block sees finite values."""
    if x.dtype != ms.float16:
        return x
    limit = ops.select(ops.isinf(x).any(), Tensor(FP16_MAX - 1000, ms.float16), Tensor(FP16_MAX, ms.float16))
    return ops.clamp(x, -limit, limit)


class T5Block(nn.Cell):
    """Attention, then feed-forward, each followed by transformers' fp16 clamp."""

    def __init__(self, config: T5EncoderConfig, has_relative_attention_bias: bool):
        super().__init__()
        self.layer = nn.CellList([T5LayerSelfAttention(config, has_relative_attention_bias), T5LayerFF(config)])

    def construct(self, x: Tensor, position_bias: Tensor) -> Tensor:
        return clamp_fp16(self.layer[1](clamp_fp16(self.layer[0](x, position_bias))))


class T5Stack(nn.Cell):
    """transformers' encoder stack: the first block's table gives the position bias, which every block
    adds (only the first block has the weight)."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.block = nn.CellList([T5Block(config, index == 0) for index in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def construct(self, x: Tensor) -> Tensor:
        position_bias = self.block[0].layer[0].SelfAttention.position_bias(x.shape[1])
        for block in self.block:
            x = block(x, position_bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Cell):
    """transformers' T5EncoderModel: `construct(input_ids) -> (last_hidden_state,)`. No attention mask:
    FLUX pads prompts to max_sequence_length and attends to the padding, as diffusers."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.shared = Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config)

    def construct(self, input_ids: Tensor) -> Tuple[Tensor]:
        return (self.encoder(self.shared(input_ids.astype(ms.int32))),)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], mindspore_dtype: ms.Type = ms.float32) -> "T5EncoderModel":
        """Load a transformers T5EncoderModel folder (a FLUX pipeline's text_encoder_2/). The file may also
        store `encoder.embed_tokens.weight`, transformers' tied copy of `shared.weight` (FLUX.1's does):
        it is skipped, as transformers ties it."""
        return load_transformers_model(cls, T5EncoderConfig, folder, mindspore_dtype, ("encoder.embed_tokens.weight",))
