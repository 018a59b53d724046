"""Exact T5 relative-position buckets for mindone's T5 encoder.

T5 puts a distance d >= max_exact into bucket `max_exact + int(log(d / max_exact) / log(max_distance /
max_exact) * (num_buckets - max_exact))`. For FLUX's T5 (32 buckets, max distance 128) that quotient
is a whole number at d = 16, 32 and 64, and MindSpore's CPU `log` is a few ulp low (log 16 = 2.7725880
instead of 2.7725887), so truncation puts those distances one bucket too low: every prompt longer
than 16 tokens got a different text embedding than transformers gives (measured 1e-1 relative error
at 64 tokens). Here the bucket boundaries are computed once on the host, with the same fp32 formula
transformers evaluates (models/t5_encoder.bucket_boundaries, which the portable T5 uses too), and the
graph only compares distances against those integers.
"""

from mindspore import Tensor, ops
from mindone.transformers.models.t5 import modeling_t5

from .t5_encoder import bucket_boundaries


def relative_position_bucket(relative_position: Tensor, bidirectional: bool = True, num_buckets: int = 32,
                             max_distance: int = 128) -> Tensor:
    """Drop-in for mindone's `T5Attention._relative_position_bucket`, with exact bucket boundaries."""
    dtype = relative_position.dtype
    buckets = ops.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = (relative_position > 0).astype(dtype) * num_buckets
        distance = ops.abs(relative_position)
    else:
        distance = -ops.minimum(relative_position, ops.zeros_like(relative_position))
    max_exact = num_buckets // 2
    large = ops.full_like(distance, max_exact)
    for boundary in bucket_boundaries(num_buckets, max_distance):
        large = large + (distance >= boundary).astype(dtype)
    return buckets + ops.where(distance < max_exact, distance, large)


def use_exact_t5_position_buckets() -> None:
    """Install the exact buckets on mindone's T5 attention (all instances; idempotent)."""
    modeling_t5.T5Attention._relative_position_bucket = staticmethod(relative_position_bucket)
