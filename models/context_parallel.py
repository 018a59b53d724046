"""Context parallelism: one image's tokens split across the ranks of an msrun launch.

Everything in a Flux block is token-local (embeddings, modulation, norms, projections, MLPs, the rotary
embedding at each token's own position) except attention, where every query needs every key and value.
So each rank runs its contiguous share of the image tokens and of the text tokens, and each attention
layer all-gathers the keys (after the rotary embedding) and values: the ranks' queries then see the whole
joint sequence. The keys arrive in rank order ([text 0, image 0, text 1, image 1, ...] instead of
[text, image]); attention is invariant to the order of its keys, so only the summation order changes.

Text is split too rather than replicated: at FLUX.1's 1024x1024 (4096 image, 512 text tokens) on 8
ranks, replicated text would be 512 of every rank's 1024 tokens, doubling the token-local work.

AllGather, not Ulysses' AlltoAll: MindSpore's CPU collectives run AllGather and AllReduce but not AlltoAll
(measured with MindSpore 2.10.0 under `msrun --worker_num 2`). Per layer each rank receives 2(N-1)/N of
the layer's activations (keys and values), Ulysses 4(N-1)/N^2 (queries, keys, values, output): equal at
N = 2, 4x more at N = 8, where an AlltoAll path on HCCL would move less.
"""

import os
from dataclasses import dataclass
from typing import Optional, Tuple

from mindspore import Tensor, nn, ops


@dataclass(frozen=True)
class TokenSplit:
    """This rank's place among `ranks` that split every token sequence into equal contiguous shares."""

    rank: int
    ranks: int

    def check(self, tokens: int, what: str, fix: str) -> None:
        """Equal shares or none: a remainder would need padding and masks that attention here lacks."""
        if tokens % self.ranks:
            raise ValueError(f"context parallel over {self.ranks} ranks needs {what} divisible by {self.ranks}, "
                             f"got {tokens}: {fix}")


def join_msrun_cluster(device_target: str) -> Tuple[int, int]:
    """(rank, workers) of this process in the msrun launch it runs in (MS_ROLE set), after joining it.

    Each worker takes the device of its local rank (msrun exports DEVICE_ID). msrun also runs the script as
    its scheduler (MS_ROLE=MS_SCHED), whose init() serves the cluster and exits the process.
    """
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init

    if os.environ.get("MS_ROLE") == "MS_WORKER":
        ms.set_device(device_target, int(os.environ["DEVICE_ID"]))
    init()
    return get_rank(), get_group_size()


def join_msrun(ranks: int) -> TokenSplit:
    """Join the msrun cluster this process was launched in and check that it has `ranks` workers.

    msrun sets MS_ROLE in every process it starts; without it there is nobody to split with, which is
    refused rather than run as a single rank (the user asked for N devices' worth of speed).
    """
    if os.environ.get("MS_ROLE") is None:
        raise ValueError(f"context parallel over {ranks} ranks needs a launch by msrun, e.g. `msrun --worker_num "
                         f"{ranks} --local_worker_num {ranks} --join True <script> ...`; without msrun use 1")
    import mindspore as ms

    rank, world = join_msrun_cluster(ms.get_context("device_target"))
    if world != ranks:
        raise ValueError(f"context parallel over {ranks} ranks, but msrun started {world} workers: launch with "
                         f"--worker_num {ranks} or pass {world}")
    return TokenSplit(rank, world)


class GatherTokens(nn.Cell):
    """All ranks' shares of a token axis, concatenated in rank order. AllGather joins along axis 0, so the
    token axis is moved there and back."""

    def __init__(self, axis: int):
        super().__init__()
        self.axis = axis
        self.all_gather = ops.AllGather()

    def construct(self, x: Tensor) -> Tensor:
        return self.all_gather(x.swapaxes(0, self.axis)).swapaxes(0, self.axis)


class ContextParallelForward(nn.Cell):
    """Runs `forward` (a transformer, plain or cached, already set up by `enable_context_parallel`) on this
    rank's share of the image tokens and returns the whole prediction, gathered from all ranks.

    Takes the full latents, as the pipeline's scheduler and VAE work on the whole image; the text inputs
    are split the same way.
    """

    def __init__(self, forward: nn.Cell, split: TokenSplit):
        super().__init__()
        self.forward = forward
        self.rank, self.ranks = split.rank, split.ranks
        self.gather_tokens = GatherTokens(1)

    def _share(self, x: Tensor) -> Tensor:
        """This rank's contiguous share of the token axis (the one before the last) of `x`."""
        size = x.shape[-2] // self.ranks
        return x[..., self.rank * size:(self.rank + 1) * size, :]

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                  timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Optional[Tensor] = None):
        sample = self.forward(self._share(hidden_states), self._share(encoder_hidden_states), pooled_projections,
                              timestep, self._share(img_ids), self._share(txt_ids), guidance)[0]
        return (self.gather_tokens(sample),)


def enable_context_parallel(transformer) -> None:
    """Make every attention layer of the portable transformer gather keys and values across the ranks.

    Call before the first forward (a compiled graph keeps what it was compiled with) and run the model
    through `ContextParallelForward`. Only the portable model has this hook; mindone's attention processors
    would need their own.
    """
    if transformer.compile_cache:
        raise ValueError("enable_context_parallel: this transformer has already run in graph mode and its compiled "
                         "graph would ignore the split; enable context parallel before the first call")
    for block in (*transformer.transformer_blocks, *transformer.single_transformer_blocks):
        if not hasattr(block.attn, "gather_tokens"):
            raise ValueError(f"context parallel needs the portable Flux transformer's attention, got "
                             f"{type(block.attn).__name__}; drop --mindone_models")
        block.attn.gather_tokens = GatherTokens(2)
