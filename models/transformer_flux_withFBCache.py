"""First-Block Cache forward for Flux transformers, decided on the device in graph mode.

Written only against the model contract (x_embedder, time_text_embed, context_embedder, pos_embed,
transformer_blocks, single_transformer_blocks, norm_out, proj_out, guidance_embeds; blocks called
`block(hidden, encoder_hidden, temb, rotary) -> (encoder_hidden, hidden)`), so it binds onto the
portable model and onto mindone's FluxTransformer2DModel alike. Double and single blocks form one
sequence: the first Fn always run, the last Bn always run, the ones between are cached.

The cache context lives in `self.fbcache_context` (mindone's CacheMixin owns `cache_context`).
Bind before the first call: a compiled graph ignores a later change of `construct` or context.
"""

import types
from typing import Any, Dict, Optional, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from models.transformer_flux import block_at, check_call_options, embed_inputs, num_blocks, run_blocks
from cache_config import check_block_split
from utils import CacheContext


def _check_block_counts(model, context: CacheContext) -> None:
    check_block_split(context.fn_compute_blocks, context.bn_compute_blocks, num_blocks(model))


def _checked(model, context, hidden_states: Tensor, encoder_hidden_states: Tensor) -> Tensor:
    """`hidden_states`, after checking the embedded streams against the context. Shapes are compile-time
    constants: a mismatch fails at compile time. Returned rather than called for its effect: a call whose
    result is unused became an isolated node that MindSpore removed with a [WARNING]."""
    got = (hidden_states.shape[0], hidden_states.shape[1], hidden_states.shape[2])
    expected = (context.batch_size, context.seq_len, context.inner_dim)
    if got != expected:
        raise ValueError(f"FBCache context expects (batch, image tokens, inner dim) {expected}, got {got}")
    if context.bn_compute_blocks > 0 and encoder_hidden_states.shape[1] != context.text_seq_len:
        raise ValueError(f"FBCache context expects {context.text_seq_len} text tokens, "
                         f"got {encoder_hidden_states.shape[1]}")
    _check_block_counts(model, context)
    return hidden_states


def run_probe(model, end: int, hidden_states: Tensor, encoder_hidden_states: Tensor, temb: Tensor, rotary):
    """Blocks [0, end), the probe: returns (image output, text, pending text update).

    When the last probe block is double-stream and has a separate `text_stream` (the portable model), its
    text update is left pending: `text` is that block's text input and `probe_text_output` finishes it,
    only in the branches that read it. Otherwise (a single-stream block, mindone's blocks) `text` is the
    probe's text output and nothing is pending.
    """
    encoder_hidden_states, hidden_states = run_blocks(
        model, 0, end - 1, hidden_states, encoder_hidden_states, temb, rotary)
    last = block_at(model, end - 1)
    if hasattr(last, "text_stream"):
        hidden_states, text_update = last.image_stream(hidden_states, encoder_hidden_states, temb, rotary)
        return hidden_states, encoder_hidden_states, text_update
    encoder_hidden_states, hidden_states = last(hidden_states, encoder_hidden_states, temb, rotary)
    return hidden_states, encoder_hidden_states, None


def probe_text_output(model, end: int, text: Tensor, text_update) -> Tensor:
    """The probe's text output from `run_probe`'s `text` and pending update."""
    if text_update is None:
        return text
    return block_at(model, end - 1).text_stream(text, text_update)


def cached_forward(model, context: CacheContext, hidden_states: Tensor, encoder_hidden_states: Tensor,
                   pooled_projections: Tensor, timestep: Tensor, img_ids: Tensor, txt_ids: Tensor,
                   guidance: Optional[Tensor] = None) -> Tuple[Tensor]:
    """One denoising step of `model` under `context`; returns `(sample,)`."""
    first_end = context.fn_compute_blocks
    middle_end = num_blocks(model) - context.bn_compute_blocks
    hidden_states, encoder_hidden_states, temb, rotary = embed_inputs(
        model, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
    hidden_states = _checked(model, context, hidden_states, encoder_hidden_states)

    # The scheduler's sigma is the timestep the pipeline passes (t / 1000): the forecast's ODE time.
    position = context.position(timestep[0])
    if context.skips_probe():
        hidden_states = hidden_states + context.forecast_probe_and_middle(position)
        context.update_on_probe_skip()
        diff = ops.fill(ms.float32, (), float("nan"))
    else:
        probe_input = hidden_states
        hidden_states, probe_text, text_update = run_probe(
            model, first_end, hidden_states, encoder_hidden_states, temb, rotary)
        probe_residual = hidden_states - probe_input
        diff = context.probe_diff(probe_residual, position)
        if context.can_cache(diff):
            hidden_states = hidden_states + context.forecast(position)
            if context.bn_compute_blocks > 0:
                encoder_hidden_states = (probe_text_output(model, first_end, probe_text, text_update)
                                         + context.text_residual)
            context.update_on_hit()
        else:
            encoder_hidden_states = probe_text_output(model, first_end, probe_text, text_update)
            middle_encoder, middle_hidden = run_blocks(
                model, first_end, middle_end, hidden_states, encoder_hidden_states, temb, rotary)
            context.update_on_miss(probe_residual, middle_hidden - hidden_states,
                                   middle_encoder - encoder_hidden_states, position)
            hidden_states, encoder_hidden_states = middle_hidden, middle_encoder
        hidden_states = run_blocks(
            model, middle_end, num_blocks(model), hidden_states, encoder_hidden_states, temb, rotary)[1]
    context.finish_step(diff)
    return (model.proj_out(model.norm_out(hidden_states, temb)),)


def FBCache_transformer_construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor,
                                  pooled_projections: Tensor, timestep: Tensor, img_ids: Tensor, txt_ids: Tensor,
                                  guidance: Optional[Tensor] = None,
                                  joint_attention_kwargs: Optional[Dict[str, Any]] = None,
                                  return_dict: bool = False) -> Tuple[Tensor]:
    """Cached Flux forward to bind as `construct`: one call is one denoising step of
    `self.fbcache_context`; returns `(sample,)`."""
    check_call_options(joint_attention_kwargs, return_dict)
    return cached_forward(self, self.fbcache_context, hidden_states, encoder_hidden_states, pooled_projections,
                          timestep, img_ids, txt_ids, guidance)


class FBCachedTransformer(nn.Cell):
    """A transformer and one cache context as a Cell of its own.

    A compiled graph keeps the context it was compiled with, so true CFG (one context per branch)
    needs one compiled graph per context. Wrappers give that while sharing the transformer's weights.
    """

    def __init__(self, transformer, context: CacheContext):
        super().__init__()
        _check_block_counts(transformer, context)
        self.transformer = transformer
        self.context = context

    def construct(self, hidden_states: Tensor, encoder_hidden_states: Tensor, pooled_projections: Tensor,
                  timestep: Tensor, img_ids: Tensor, txt_ids: Tensor, guidance: Optional[Tensor] = None):
        return cached_forward(self.transformer, self.context, hidden_states, encoder_hidden_states,
                              pooled_projections, timestep, img_ids, txt_ids, guidance)


def enable_fbcache(transformer, cache_context: CacheContext) -> None:
    """Attach a context and bind the cached forward. Do it before the first call (see module doc): a
    model already compiled would keep running its compiled uncached graph, so that is refused."""
    _check_block_counts(transformer, cache_context)
    if transformer.compile_cache:
        raise ValueError("enable_fbcache: this transformer has already run in graph mode, and its compiled graph "
                         "would ignore the cached forward (the cache would never run); call enable_fbcache before "
                         "the first call, or wrap it instead: FBCachedTransformer(transformer, cache_context)")
    transformer.fbcache_context = cache_context
    transformer.construct = types.MethodType(FBCache_transformer_construct, transformer)


def disable_fbcache(transformer) -> None:
    """Restore the class forward and drop the context (for an uncompiled or re-created model)."""
    if "construct" in transformer.__dict__:
        del transformer.construct
    if hasattr(transformer, "fbcache_context"):
        del transformer.fbcache_context
