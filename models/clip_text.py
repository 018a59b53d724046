"""transformers' CLIPTextModel in portable MindSpore: FLUX's first text encoder (its pooled output).

Runs on every backend in graph and PyNative mode; loads a transformers folder strictly (models/text_encoders.py).
"""

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, ClassVar, Dict, Tuple, Union

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .layers import broadcast
from .loading import CheckpointError
from .text_encoders import (Embedding, config_from_keys, load_transformers_model, merge_heads, read_config_json,
                            split_heads)


class LayerNorm(nn.Cell):
    """torch.nn.LayerNorm with `weight` and `bias`, reduced in fp32 like torch's half-precision kernels.
    (MindSpore's nn.LayerNorm names them gamma and beta; `mint`'s has no CPU kernel.)"""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.weight = Parameter(initializer("ones", (dim,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (dim,), ms.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        normed = self.layer_norm(x.astype(ms.float32), self.weight.astype(ms.float32), self.bias.astype(ms.float32))
        return normed[0].astype(x.dtype)


def quick_gelu(x: Tensor) -> Tensor:
    """transformers' QuickGELUActivation (OpenAI CLIP's activation, FLUX's CLIP-L uses it)."""
    return x * ops.sigmoid(1.702 * x)


def gelu_erf(x: Tensor) -> Tensor:
    """Exact (erf) GELU, transformers' "gelu", computed in fp32 like torch's half-precision GELU."""
    return ops.gelu(x.astype(ms.float32), approximate="none").astype(x.dtype)


CLIP_ACTIVATIONS: Dict[str, Callable[[Tensor], Tensor]] = {"quick_gelu": quick_gelu, "gelu": gelu_erf}

# transformers keeps the pooled-output rule of configs written before its PR #24773 for this eos_token_id.
LEGACY_CLIP_EOS_TOKEN_ID = 2


@dataclass(frozen=True)
class CLIPTextConfig:
    """What CLIPTextModel reads of transformers' CLIPTextConfig; the defaults are transformers'."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    MODEL_TYPE: ClassVar[str] = "clip_text_model"
    MODEL_CLASS: ClassVar[str] = "CLIPTextModel"

    def __post_init__(self):
        if self.hidden_act not in CLIP_ACTIVATIONS:
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not supported: this CLIPTextModel implements "
                                  f"{sorted(CLIP_ACTIVATIONS)} (FLUX's CLIP-L uses quick_gelu)")
        if self.hidden_size % self.num_attention_heads:
            raise CheckpointError(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                                  f"{self.num_attention_heads}, as CLIP's attention needs")

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "CLIPTextConfig":
        return config_from_keys(cls, Path(path), read_config_json(Path(path), cls))


@lru_cache(maxsize=None)
def causal_mask(length: int) -> np.ndarray:
    """(length, length) fp32 additive mask: 0 on and below the diagonal, fp32's lowest value above it
    (transformers' `_create_4d_causal_attention_mask`). A host constant, so the graph folds it; cached as
    numpy, and made a Tensor where it is used, so that no Tensor object is shared between graphs."""
    upper = np.triu(np.ones((length, length), dtype=bool), k=1)
    mask = np.where(upper, np.finfo(np.float32).min, 0).astype(np.float32)
    mask.setflags(write=False)
    return mask


class CLIPAttention(nn.Cell):
    """Causal multi-head self-attention. The queries are scaled before the product (transformers scales the
    product: equal up to rounding); the mask is added and the softmax taken in fp32."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q_proj = nn.Dense(dim, dim)
        self.k_proj = nn.Dense(dim, dim)
        self.v_proj = nn.Dense(dim, dim)
        self.out_proj = nn.Dense(dim, dim)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        query = split_heads(self.q_proj(x) * self.scale, self.heads)
        key = split_heads(self.k_proj(x), self.heads)
        scores = ops.matmul(query, key.swapaxes(-1, -2)).astype(ms.float32)
        weights = ops.softmax(scores + broadcast(mask, scores), -1).astype(x.dtype)
        return self.out_proj(merge_heads(ops.matmul(weights, split_heads(self.v_proj(x), self.heads))))


class CLIPMLP(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Dense(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Dense(config.intermediate_size, config.hidden_size)
        self.activation = CLIP_ACTIVATIONS[config.hidden_act]

    def construct(self, x: Tensor) -> Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Cell):
    """Pre-norm block: attention, then the MLP, each added to its input."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.self_attn = CLIPAttention(config.hidden_size, config.num_attention_heads)
        self.layer_norm2 = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.mlp = CLIPMLP(config)

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.CellList([CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers)])

    def construct(self, x: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPTextEmbeddings(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = Embedding(config.max_position_embeddings, config.hidden_size)

    def construct(self, input_ids: Tensor) -> Tensor:
        tokens = self.token_embedding(input_ids)
        return tokens + broadcast(self.position_embedding.weight[: input_ids.shape[1]], tokens)


def first_true(marks: Tensor, countdown: Tensor) -> Tensor:
    """Index of the first True of each row, 0 for a row without one: torch's `argmax` of the 0/1 row
    (ties go to the first index), written so that it does not depend on how a backend's ArgMax breaks ties.
    `countdown` is (length, ..., 1) for the rows' length."""
    length = marks.shape[-1]
    best = ops.amax(marks.astype(ms.int32) * countdown, -1)
    return ops.where(best > 0, length - best, ops.zeros_like(best))


class CLIPTextTransformer(nn.Cell):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = LayerNorm(config.hidden_size, config.layer_norm_eps)
        self.eos_token_id = config.eos_token_id
        # Host constants for the longest input, sliced to each input's length in the graph: the graph makes
        # no Tensor from Python while it compiles (a worker of the test suite crashed in such compiles).
        self.max_length = config.max_position_embeddings
        self.causal_mask = Tensor(causal_mask(self.max_length))
        self.countdown = Tensor(np.arange(self.max_length, 0, -1, dtype=np.int32))

    def construct(self, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
        ids = input_ids.astype(ms.int32)
        length = ids.shape[1]
        hidden = self.encoder(self.embeddings(ids), self.causal_mask[:length, :length])
        hidden = self.final_layer_norm(hidden)
        if self.eos_token_id == LEGACY_CLIP_EOS_TOKEN_ID:
            eos = ids == ops.amax(ids, -1, keepdims=True)  # the highest id, as transformers' legacy argmax of ids
        else:
            eos = ids == self.eos_token_id  # first eos: padding may repeat it
        pooled_at = first_true(eos, self.countdown[self.max_length - length:])
        return hidden, ops.gather(hidden, pooled_at, 1, batch_dims=1)


class CLIPTextModel(nn.Cell):
    """transformers' CLIPTextModel: `construct(input_ids) -> (last_hidden_state, pooled_output)`, the pooled
    output being the final hidden state at each sequence's end-of-text token, chosen as transformers 4.57
    chooses it. No attention mask: FLUX pads prompts to 77 tokens and attends to the padding, as diffusers."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)

    def construct(self, input_ids: Tensor) -> Tuple[Tensor, Tensor]:
        return self.text_model(input_ids)

    @classmethod
    def from_pretrained(cls, folder: Union[str, Path], mindspore_dtype: ms.Type = ms.float32) -> "CLIPTextModel":
        """Load a transformers CLIPTextModel folder (a FLUX pipeline's text_encoder/). Checkpoints written
        by older transformers also store the `position_ids` buffer: it is skipped, as transformers skips it."""
        return load_transformers_model(cls, CLIPTextConfig, folder, mindspore_dtype,
                                       ("text_model.embeddings.position_ids",))
