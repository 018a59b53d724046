"""Portable MindSpore decoder of diffusers' `AutoencoderKL`, as used by FLUX.1 (`vae/` folder).

mindone's `AutoencoderKL` does not run on MindSpore's CPU backend; this decoder is built from classic
ops that every backend has: `nn.Conv2d` with explicit padding (on CPU, as matmuls), `nn.Dense`, matmul, softmax, and a
group norm and nearest upsampling written from reshapes and reductions. Parameter names are those of
the diffusers checkpoint (`decoder.mid_block.attentions.0.to_q.weight`, ...), so the same `vae/`
folder loads everywhere. Only the decoder exists: image generation never encodes, and the encoder
weights that the checkpoint also holds are skipped at load time.
"""

from typing import Optional, Sequence

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import initializer

from .config_mixin import ConfigMixin, register_to_config
from .layers import broadcast
from .loading import load_pretrained

REQUIRED_CONFIG_KEYS = ("latent_channels", "block_out_channels", "layers_per_block", "up_block_types")
# The encoder half of the checkpoint: present in every diffusers `vae/` folder, never used to decode.
ENCODER_PREFIXES = ("encoder.", "quant_conv.")
SUPPORTED_ACTIVATIONS = ("silu", "swish")
RESNET_EPS = 1e-6  # diffusers' Decoder hard-codes this for every norm it builds


def conv2d(in_channels: int, out_channels: int, kernel_size: int) -> nn.Cell:
    """Torch-style `nn.Conv2d(in, out, k, padding=k // 2)` with bias; names `weight` and `bias`.

    Classic `nn.Conv2d` runs on CPU, GPU and Ascend in fp32 and fp16 (`mint.nn.Conv2d` has no CPU kernel),
    but MindSpore's CPU kernel runs a k > 1 convolution at about 1 GFLOP/s; on CPU those take
    `ShiftedMatmulConv2d` instead.
    """
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=1, pad_mode="pad", padding=kernel_size // 2,
                     has_bias=True)
    if kernel_size > 1 and ms.get_context("device_target") == "CPU":
        return ShiftedMatmulConv2d(conv)
    return conv


class ShiftedMatmulConv2d(nn.Cell):
    """A k x k convolution (stride 1, zero padding k // 2, bias) as k^2 matmuls, for MindSpore's CPU backend.

    The zero-padded image is flattened to (pixels, channels) rows; the tap (i, j) of every output pixel is
    then the input row a fixed offset away, so each tap is one contiguous row slice times a (C_in, C_out)
    weight slice, summed over the taps; the padding border of the result is dropped at the end. Measured
    on (2, 64, 147, 147), 64 -> 64 channels, 3x3: nn.Conv2d 3.1-4.3 s, this 0.25 s, torch 0.011 s (the
    shipped emoji VAE decodes a 128x128 image in 0.31 s instead of 1.77 s). MindSpore's 4-D strided slices
    (90 ms each here) rule out the usual im2col (0.9 s), while 2-D row slices cost 1.5 ms.
    The weight's taps come from one transpose and one unstack, not a slice and a transpose per tap: at
    512x512 the emoji VAE's graph then keeps 0.1 GiB less and compiles in 8.2 s instead of 9.7 s, with
    bit-identical output and the same decode time (2.2 s).
    Takes over the weight and bias Parameters of the `nn.Conv2d` it replaces (same names and shapes).
    """

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.kernel_size = conv.weight.shape[2]

    def construct(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        size, pad = self.kernel_size, self.kernel_size // 2
        padded_width = width + 2 * pad
        rows = ops.pad(x, (pad, pad, pad, pad)).transpose(0, 2, 3, 1).reshape(-1, channels)
        margin = pad * padded_width + pad  # the farthest tap of the first and last pixel
        shifted = ops.pad(rows, (0, 0, margin, margin))
        pixels = rows.shape[0]
        tap_weights = ops.unstack(self.weight.transpose(2, 3, 1, 0).reshape(size * size, channels, -1), 0)
        out = None
        for i in range(size):
            for j in range(size):
                start = margin + (i - pad) * padded_width + (j - pad)
                tap = ops.matmul(shifted[start:start + pixels], tap_weights[i * size + j])
                out = tap if out is None else out + tap
        out = ops.bias_add(out, self.bias).reshape(batch, height + 2 * pad, padded_width, -1)
        return out[:, pad:pad + height, pad:pad + width, :].transpose(0, 3, 1, 2)


class GroupNorm(nn.Cell):
    """torch `nn.GroupNorm(num_groups, num_channels, eps, affine=True)` on NCHW, computed in fp32.

    Written out because the classic MindSpore GroupNorm names its parameters `gamma`/`beta` (the
    checkpoint says `weight`/`bias`), and because in fp16 the statistics over a whole group of a large
    image would lose precision. Variance is the biased one, as torch's. Statistics and the affine
    weight are broadcast explicitly and the bias added by BiasAdd: MindSpore's CPU broadcasting Sub/Mul/Add
    keep index tables 4x the output's size for the graph's lifetime (see layers.broadcast): decoding a
    512x512 image in the `mid` pipeline added 3.24 GiB of resident memory before, 1.03 GiB after.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = RESNET_EPS):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = Parameter(initializer("ones", (num_channels,), ms.float32), name="weight")
        self.bias = Parameter(initializer("zeros", (num_channels,), ms.float32), name="bias")

    def construct(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        grouped = x.astype(ms.float32).reshape(batch, self.num_groups, -1)
        centred = grouped - broadcast(grouped.mean(-1, keep_dims=True), grouped)
        variance = ops.square(centred).mean(-1, keep_dims=True)
        normed = (centred * broadcast(ops.rsqrt(variance + self.eps), centred)).reshape(batch, channels, height, width)
        scaled = normed * broadcast(self.weight.astype(ms.float32).reshape(1, channels, 1, 1), normed)
        return ops.bias_add(scaled, self.bias.astype(ms.float32)).astype(x.dtype)


class ResnetBlock2D(nn.Cell):
    """diffusers `ResnetBlock2D` without time embedding (`temb_channels=None`), output scale 1."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, in_channels)
        self.conv1 = conv2d(in_channels, out_channels, 3)
        self.norm2 = GroupNorm(groups, out_channels)
        self.conv2 = conv2d(out_channels, out_channels, 3)
        # diffusers adds a 1x1 shortcut exactly when the channel count changes.
        self.conv_shortcut = conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def construct(self, x: Tensor) -> Tensor:
        hidden = self.conv1(ops.silu(self.norm1(x)))
        hidden = self.conv2(ops.silu(self.norm2(hidden)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + hidden


class SpatialSelfAttention(nn.Cell):
    """The VAE mid-block attention: diffusers `Attention` with one head over all channels,
    `group_norm` before the projections and a residual connection (`rescale_output_factor=1`).

    Scores are scaled by 1/sqrt(channels) on the query, and the softmax is taken in fp32 so fp16 runs
    do not saturate; the matmuls run in the model dtype.
    """

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = GroupNorm(groups, channels)
        self.to_q = nn.Dense(channels, channels)
        self.to_k = nn.Dense(channels, channels)
        self.to_v = nn.Dense(channels, channels)
        # Slot 1 is diffusers' Dropout (no weights, identity at inference); it keeps the projection at `to_out.0`.
        self.to_out = nn.CellList([nn.Dense(channels, channels), nn.Identity()])
        self.scale = channels ** -0.5

    def construct(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        tokens = self.group_norm(x).reshape(batch, channels, height * width).transpose(0, 2, 1)
        query = self.to_q(tokens) * self.scale
        key = self.to_k(tokens)
        value = self.to_v(tokens)
        scores = ops.matmul(query, key.transpose(0, 2, 1))
        probs = ops.softmax(scores.astype(ms.float32), -1).astype(value.dtype)
        out = self.to_out[0](ops.matmul(probs, value))
        return out.transpose(0, 2, 1).reshape(batch, channels, height, width) + x


class UNetMidBlock2D(nn.Cell):
    """resnet, (attention, resnet): diffusers `UNetMidBlock2D` with one layer and no time embedding."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.add_attention = add_attention
        # Without attention diffusers keeps a `[None]` list: no weights, so an empty CellList matches it.
        self.attentions = nn.CellList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.CellList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])

    def construct(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.add_attention:
            x = self.attentions[0](x)
        return self.resnets[1](x)


def upsample_nearest_2x(x: Tensor) -> Tensor:
    """`F.interpolate(x, scale_factor=2.0, mode="nearest")`: every pixel repeated into a 2x2 square,
    by broadcast and reshape, which every backend supports in every dtype."""
    batch, channels, height, width = x.shape
    repeated = ops.broadcast_to(x[:, :, :, None, :, None], (batch, channels, height, 2, width, 2))
    return repeated.reshape(batch, channels, 2 * height, 2 * width)


class Upsample2D(nn.Cell):
    """diffusers `Upsample2D(use_conv=True)`: nearest 2x upsampling then a 3x3 conv named `conv`."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv2d(channels, channels, 3)

    def construct(self, x: Tensor) -> Tensor:
        return self.conv(upsample_nearest_2x(x))


class UpDecoderBlock2D(nn.Cell):
    """diffusers `UpDecoderBlock2D`: `num_layers` resnets, then an optional `upsamplers.0`."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.CellList(
            [ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, groups) for i in range(num_layers)]
        )
        self.upsamplers = nn.CellList([Upsample2D(out_channels)] if add_upsample else [])
        self.add_upsample = add_upsample

    def construct(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.add_upsample:
            x = self.upsamplers[0](x)
        return x


class Decoder(nn.Cell):
    """diffusers `Decoder` with `norm_type="group"`: conv_in, mid block, up blocks, norm, SiLU, conv_out."""

    def __init__(self, in_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, norm_num_groups: int, mid_block_add_attention: bool):
        super().__init__()
        self.conv_in = conv2d(in_channels, block_out_channels[-1], 3)
        self.mid_block = UNetMidBlock2D(block_out_channels[-1], norm_num_groups, mid_block_add_attention)
        reversed_channels = list(reversed(block_out_channels))
        blocks = []
        for i, output_channel in enumerate(reversed_channels):
            prev_output_channel = reversed_channels[max(i - 1, 0)]
            blocks.append(
                UpDecoderBlock2D(prev_output_channel, output_channel, layers_per_block + 1, norm_num_groups,
                                 add_upsample=i != len(reversed_channels) - 1)
            )
        self.up_blocks = nn.CellList(blocks)
        self.conv_norm_out = GroupNorm(norm_num_groups, block_out_channels[0])
        self.conv_out = conv2d(block_out_channels[0], out_channels, 3)

    def construct(self, z: Tensor) -> Tensor:
        sample = self.mid_block(self.conv_in(z))
        for up_block in self.up_blocks:
            sample = up_block(sample)
        return self.conv_out(ops.silu(self.conv_norm_out(sample)))


class AutoencoderKL(nn.Cell, ConfigMixin):
    """The decoding half of diffusers' `AutoencoderKL` (FLUX.1's VAE), with its config keys.

    `decode(latents)` equals diffusers' `vae.decode(latents).sample`: scaling is not applied here; the
    pipeline computes `latents / scaling_factor + shift_factor` first (both are in `self.config`).
    `from_pretrained(folder, subfolder="vae", mindspore_dtype=...)` loads strictly: every decoder
    weight must be present with its shape; the checkpoint's encoder weights are skipped unread.
    Encoder-only config keys (`down_block_types`, `use_quant_conv`, ...) are accepted and kept in the
    config so the folder round-trips, but build nothing.
    """


    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
        up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
        block_out_channels: Sequence[int] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 4,
        norm_num_groups: int = 32,
        sample_size: int = 32,
        scaling_factor: float = 0.18215,
        shift_factor: Optional[float] = None,
        latents_mean: Optional[Sequence[float]] = None,
        latents_std: Optional[Sequence[float]] = None,
        force_upcast: bool = True,
        use_quant_conv: bool = True,
        use_post_quant_conv: bool = True,
        mid_block_add_attention: bool = True,
    ):
        super().__init__()
        if act_fn not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"act_fn {act_fn!r} is not supported by the portable VAE; use one of {SUPPORTED_ACTIVATIONS}"
            )
        unsupported = [kind for kind in up_block_types if kind != "UpDecoderBlock2D"]
        if unsupported:
            raise ValueError(f"up_block_types {unsupported} are not supported; only UpDecoderBlock2D is")
        if len(up_block_types) != len(block_out_channels):
            raise ValueError(
                f"up_block_types has {len(up_block_types)} entries but block_out_channels has "
                f"{len(block_out_channels)}; diffusers' Decoder needs one block per channel count"
            )
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups,
                               mid_block_add_attention)
        self.use_post_quant_conv = use_post_quant_conv
        self.post_quant_conv = conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = "vae",
                        mindspore_dtype: Optional[ms.Type] = None) -> "AutoencoderKL":
        return load_pretrained(cls, pretrained_model_name_or_path, subfolder, mindspore_dtype, REQUIRED_CONFIG_KEYS,
                               ignored_prefixes=ENCODER_PREFIXES)

    def decode(self, latents: Tensor) -> Tensor:
        """(batch, latent_channels, h, w) latents -> (batch, out_channels, 8h, 8w) for FLUX (2^(blocks-1)),
        in the weights' dtype."""
        z = latents.astype(self.decoder.conv_in.weight.dtype)
        if self.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def construct(self, latents: Tensor) -> Tensor:
        return self.decode(latents)
