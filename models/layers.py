"""Portable building blocks of the Flux transformer.

Every op here has a kernel on MindSpore's CPU, GPU and Ascend backends (the `mint` LayerNorm, RMSNorm,
GELU and arange kernels do not exist on CPU). Parameter names follow the diffusers modules they stand
in for, so a diffusers checkpoint loads with no renaming.
"""

import math

import numpy as np

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops


def broadcast(operand: Tensor, like: Tensor) -> Tensor:
    """`operand` broadcast to the shape of `like`, the other operand of an elementwise Add, Sub or Mul.

    Host memory: MindSpore's CPU Add/Sub/Mul kernels, given operands of different shapes (neither a
    single element), build two size_t index tables as long as the output on their first launch (16
    bytes per element, 4x an fp32 output) and keep them as long as the compiled graph; with equal shapes
    they take a direct loop and keep nothing, and BroadcastTo keeps nothing either. In the `mid`
    transformer at 512x512 these tables were most of what each compiled graph kept (resident growth of
    the first forward: 2.64 GiB before, 0.94 GiB after; eval/bench_memory.py). Same results bit for bit.
    """
    return ops.broadcast_to(operand, like.shape)


def modulate(normed: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation `normed * (1 + scale) + shift` of (batch, tokens, dim) by (batch, dim) vectors."""
    return normed * broadcast((1 + scale)[:, None], normed) + broadcast(shift[:, None], normed)


class LayerNormNoAffine(nn.Cell):
    """LayerNorm without weight or bias (diffusers `elementwise_affine=False`), reduced in fp32.

    The fixed unit scale and zero shift are constants, not Parameters, so the module has no weights,
    exactly like the diffusers module it replaces.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.layer_norm = ops.LayerNorm(begin_norm_axis=-1, begin_params_axis=-1, epsilon=eps)
        self.unit_scale = Tensor(np.ones(dim, np.float32))
        self.zero_shift = Tensor(np.zeros(dim, np.float32))

    def construct(self, x: Tensor) -> Tensor:
        return self.layer_norm(x.astype(ms.float32), self.unit_scale, self.zero_shift)[0].astype(x.dtype)


class RMSNorm(nn.Cell):
    """RMS norm over the last axis with a learned scale named `weight` (torch.nn.RMSNorm).

    The mean is reduced over a 2-D `(-1, dim)` view: MindSpore's CPU ReduceMean is slower on the 4-D
    (batch, heads, tokens, head_dim) attention tensors (measured -0.03 s per `mid` forward on 2 cores,
    -0.2 s on one).
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = Parameter(Tensor(np.ones(dim, np.float32)), name="weight")

    def construct(self, x: Tensor) -> Tensor:
        x32 = x.astype(ms.float32).reshape(-1, x.shape[-1])
        normed = x32 * broadcast(ops.rsqrt(ops.mean(x32 * x32, -1, keep_dims=True) + self.eps), x32)
        normed = normed.reshape(x.shape).astype(x.dtype)
        return normed * broadcast(self.weight.astype(x.dtype), normed)


# tanh GELU is 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2/pi); since 0.5 (1 + tanh z) = sigmoid(2z)
# exactly, it equals x * sigmoid(x (GELU_C1 + GELU_C2 x^2)).
GELU_C1 = 2.0 * math.sqrt(2.0 / math.pi)
GELU_C2 = 0.044715 * GELU_C1


def native_gelu_preferred() -> bool:
    """Whether `gelu_tanh` takes MindSpore's own GeLU kernel: on Ascend only, where it is the fused
    native op. MindSpore's CPU GeLU(tanh) took 60 ms per call on a (1152, 4096) fp32 tensor against
    10.8 ms for the sigmoid form (torch: 10.6 ms), 19% of a `mid` forward; the CPU Tanh, the other
    short form, is accurate only to about 2e-4. GPU takes the portable form too (not measured)."""
    return ms.get_context("device_target") == "Ascend"


def gelu_tanh(x: Tensor, native: bool) -> Tensor:
    """tanh-approximate GELU (diffusers `approximate="tanh"`), for both MLPs of the model.

    `native` (from `native_gelu_preferred()`, fixed when a Cell is built) picks `ops.gelu`; otherwise
    the exact sigmoid identity above, computed in fp32 like torch's fp16 GELU (measured against the
    fp64 formula: 5.6e-7 max abs error in fp32, and in fp16 as accurate as `ops.gelu`; computed in fp16
    the sigmoid form loses 6e-3 relative).
    """
    if native:
        return ops.gelu(x, approximate="tanh")
    x32 = x.astype(ms.float32)
    return (x32 * ops.sigmoid(x32 * (GELU_C1 + GELU_C2 * (x32 * x32)))).astype(x.dtype)


class GELUProjection(nn.Cell):
    """diffusers `GELU(approximate="tanh")` module: a projection followed by tanh GELU."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Dense(dim_in, dim_out)
        self.native_gelu = native_gelu_preferred()

    def construct(self, x: Tensor) -> Tensor:
        return gelu_tanh(self.proj(x), self.native_gelu)


class FeedForward(nn.Cell):
    """diffusers `FeedForward(activation_fn="gelu-approximate")`: weights `net.0.proj` and `net.2`."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # Slot 1 is diffusers' Dropout (no weights, identity at inference); it keeps the output
        # projection at index 2, where the checkpoint has it.
        self.net = nn.CellList([GELUProjection(dim, dim * mult), nn.Identity(), nn.Dense(dim * mult, dim)])

    def construct(self, x: Tensor) -> Tensor:
        return self.net[2](self.net[0](x))


def sinusoidal_frequencies(num_channels: int, max_period: float = 10000.0) -> Tensor:
    """Frequencies of diffusers' `get_timestep_embedding` with `downscale_freq_shift=0`, as fp32.

    The exponent is formed in fp32 as diffusers does, and its exp correctly rounded (computed in fp64).
    Timesteps are scaled by 1000, so a 1-ulp error in a frequency moves the angle by ~6e-5 rad; numpy's
    fp32 exp is off by one ulp in 55 of 128 entries and that alone cost 5e-5 relative error at the
    output (measured against diffusers in fp32 and fp64).
    """
    half = num_channels // 2
    exponent = np.float32(-math.log(max_period)) * np.arange(half, dtype=np.float32) / np.float32(half)
    return Tensor(np.exp(exponent.astype(np.float64)).astype(np.float32)[None, :])


class Timesteps(nn.Cell):
    """Sinusoidal embedding of (fractional) timesteps, cos half first (`flip_sin_to_cos=True`)."""

    def __init__(self, num_channels: int = 256):
        super().__init__()
        self.frequencies = sinusoidal_frequencies(num_channels)

    def construct(self, timesteps: Tensor) -> Tensor:
        angles = timesteps.astype(ms.float32)[:, None] * self.frequencies
        return ops.cat([ops.cos(angles), ops.sin(angles)], -1)


class SiLUProjection(nn.Cell):
    """`linear_2(silu(linear_1(x)))`: diffusers' `TimestepEmbedding` and its `PixArtAlphaTextProjection`
    with `act_fn="silu"` are this same module under two names, with the same weight names."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Dense(in_features, hidden_size)
        self.linear_2 = nn.Dense(hidden_size, hidden_size)

    def construct(self, x: Tensor) -> Tensor:
        return self.linear_2(ops.silu(self.linear_1(x)))


class CombinedTimestepTextProjEmbeddings(nn.Cell):
    """FLUX.1-schnell conditioning: timestep embedding plus the pooled CLIP text projection."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256)
        self.timestep_embedder = SiLUProjection(256, embedding_dim)
        self.text_embedder = SiLUProjection(pooled_projection_dim, embedding_dim)

    def construct(self, timestep: Tensor, pooled_projection: Tensor) -> Tensor:
        timestep_emb = self.timestep_embedder(self.time_proj(timestep).astype(pooled_projection.dtype))
        return timestep_emb + self.text_embedder(pooled_projection)


class CombinedTimestepGuidanceTextProjEmbeddings(CombinedTimestepTextProjEmbeddings):
    """FLUX.1-dev conditioning: adds the embedded (distilled) guidance scale."""

    def __init__(self, embedding_dim: int, pooled_projection_dim: int):
        super().__init__(embedding_dim, pooled_projection_dim)
        self.guidance_embedder = SiLUProjection(256, embedding_dim)

    def construct(self, timestep: Tensor, guidance: Tensor, pooled_projection: Tensor) -> Tensor:
        dtype = pooled_projection.dtype
        time_guidance_emb = self.timestep_embedder(self.time_proj(timestep).astype(dtype)) + self.guidance_embedder(
            self.time_proj(guidance).astype(dtype)
        )
        return time_guidance_emb + self.text_embedder(pooled_projection)


class AdaLayerNormZero(nn.Cell):
    """adaLN-Zero: the conditioning is projected to `chunks` vectors; the first two (shift, scale)
    modulate the normalised input, the others (gates, MLP modulation) are returned for the block.
    Double-stream blocks use 6 chunks, single-stream blocks 3 (diffusers' `AdaLayerNormZeroSingle`)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.linear = nn.Dense(dim, chunks * dim)
        self.norm = LayerNormNoAffine(dim)

    def construct(self, x: Tensor, emb: Tensor):
        modulation = ops.split(self.linear(ops.silu(emb)), x.shape[-1], axis=1)
        shift, scale = modulation[0], modulation[1]
        return (modulate(self.norm(x), shift, scale),) + modulation[2:]


class AdaLayerNormContinuous(nn.Cell):
    """Final adaptive norm. Note the order: diffusers splits the projection into (scale, shift)."""

    def __init__(self, dim: int, conditioning_dim: int, eps: float = 1e-6):
        super().__init__()
        self.linear = nn.Dense(conditioning_dim, 2 * dim)
        self.norm = LayerNormNoAffine(dim, eps)

    def construct(self, x: Tensor, conditioning: Tensor) -> Tensor:
        scale, shift = ops.split(self.linear(ops.silu(conditioning).astype(x.dtype)), x.shape[-1], axis=1)
        return modulate(self.norm(x), shift, scale)
