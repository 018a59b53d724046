"""FluxPipeline: Flux.1 text-to-image in MindSpore, with the First-Block Cache decided on the device.

Follows diffusers' FluxPipeline (same arguments, packing, position ids, resolution-dependent scheduler
shift, true CFG) so that a diffusers FLUX folder gives the same images. The cache differs from the
reference example in the way that matters for graph mode: a compiled graph keeps the cache context
it was compiled with, so contexts live as long as the pipeline, one per (CFG branch, batch, resolution,
Fn/Bn), and every call resets and reconfigures them in place instead of creating new ones.
"""

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

import mindspore as ms
from mindspore import nn, ops
from tqdm.auto import tqdm
from models.tokenizers import CLIPTokenizer, T5Tokenizer

from cache_config import FBCacheConfig  # noqa: F401 (re-exported: the pipeline's cache argument)
from models.clip_text import CLIPTextModel
from models.compile_cache import CompileCache, process_compile_cache, weights_identity
from models.components import check_pipeline_components
from models.context_parallel import ContextParallelForward, TokenSplit, enable_context_parallel, join_msrun
from models.loading import model_folder
from models.scheduler import FlowMatchEulerDiscreteScheduler
from models.t5_encoder import T5EncoderModel
from models.transformer_flux import FluxTransformer2DModel
from models.transformer_flux_withFBCache import FBCachedTransformer
from models.vae import AutoencoderKL
from utils import CacheContext

PromptInput = Union[str, List[str]]
ProgressCallback = Callable[[int, int, Dict[str, bool]], None]
Branches = Dict[str, Tuple[ms.Tensor, ms.Tensor, ms.Tensor]]
# Components that may run op by op in graph mode (FluxPipeline.op_by_op).
OP_BY_OP_COMPONENTS = frozenset({"text_encoders", "vae"})
# The branch name of true CFG run as one batch: cond rows first, then uncond.
BATCHED_CFG = "cond+uncond"
COMPONENT_FOLDERS = ("scheduler", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "transformer", "vae")
MAX_SEQUENCE_LENGTH = 512
# FLUX.1-dev's distilled guidance when a checkpoint with guidance embedding is given none.
DEFAULT_GUIDANCE_SCALE = 3.5
# The dtype names the command-line scripts accept.
DTYPES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


class NonFiniteError(ValueError):
    """Latents or pixels became NaN or infinite: raised instead of writing a black image."""


@dataclass
class FluxPipelineOutput:
    images: list
    cache_summaries: Dict[str, dict] = field(default_factory=dict)


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Flux's scheduler shift `mu`, linear in the number of image tokens (as diffusers)."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def pack_latents(latents: np.ndarray) -> np.ndarray:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 latent patch becomes one token."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: ms.Tensor, height: int, width: int) -> ms.Tensor:
    """Inverse of `pack_latents` for latent height and width (not pixels)."""
    batch, _, packed_channels = tokens.shape
    channels = packed_channels // 4
    patches = tokens.reshape(batch, height // 2, width // 2, channels, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, channels, height, width)


def latent_image_ids(height: int, width: int) -> np.ndarray:
    """Position ids (0, row, column) of the packed latent tokens."""
    ids = np.zeros((height, width, 3), np.float32)
    ids[..., 1] = np.arange(height)[:, None]
    ids[..., 2] = np.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def as_prompt_list(prompt: Optional[PromptInput], name: str) -> Optional[List[str]]:
    if prompt is None:
        return None
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(text, str) for text in prompts):
        raise ValueError(f"{name} must be a string or a non-empty list of strings, got {prompt!r}")
    return prompts


def check_one_each(name: str, texts: Optional[List[str]], owner: str, owners: Optional[List[str]]) -> None:
    """A second-encoder prompt list must pair one to one with the prompts it goes with."""
    if texts is not None and len(texts) != len(owners):
        raise ValueError(f"{name} has {len(texts)} entries but {owner} has {len(owners)}; give one per {owner}")


def warn_truncated(tokenizer, prompts: List[str], max_length: int, encoder: str, advice: str) -> None:
    """Say which prompts the encoder cuts (diffusers only logs it), so a long prompt is not cut silently."""
    lengths = [len(ids) for ids in tokenizer(prompts, truncation=False).input_ids]
    for index, length in enumerate(lengths):
        if length > max_length:
            warnings.warn(f"prompt {index} has {length} {encoder} tokens; the {encoder} encoder reads the first "
                          f"{max_length} and the rest is cut: {advice}", UserWarning, stacklevel=3)


def to_pil(images: np.ndarray) -> List[Image.Image]:
    return [Image.fromarray((image * 255).round().astype(np.uint8)) for image in images]


def batched_branches(cond: Tuple[ms.Tensor, ms.Tensor, ms.Tensor],
                     uncond: Tuple[ms.Tensor, ms.Tensor, ms.Tensor]) -> Tuple[ms.Tensor, ms.Tensor, ms.Tensor]:
    """Both CFG branches' text inputs as one batch (cond rows, then uncond rows); the text ids are shared."""
    return ops.concat((cond[0], uncond[0])), ops.concat((cond[1], uncond[1])), cond[2]


def input_signature(value) -> object:
    """What of a graph input shapes the compiled graph: a tensor's shape and dtype, else the value."""
    if isinstance(value, ms.Tensor):
        return tuple(value.shape), str(value.dtype)
    return repr(value)


def cache_context(forward: nn.Cell) -> Optional[CacheContext]:
    """The cache context a branch's forward runs under (None: uncached), through a context-parallel wrapper."""
    if isinstance(forward, ContextParallelForward):
        forward = forward.forward
    return forward.context if isinstance(forward, FBCachedTransformer) else None


class FluxPipeline:
    """Flux.1-dev (guidance embedding) and Flux.1-schnell text-to-image."""

    def __init__(self, scheduler, vae: AutoencoderKL, text_encoder, tokenizer, text_encoder_2, tokenizer_2,
                 transformer, token_split: Optional[TokenSplit] = None, compile_cache: Optional[CompileCache] = None,
                 source: Optional[list] = None):
        self.scheduler = scheduler
        self.vae = vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.transformer = transformer
        self.dtype = transformer.x_embedder.weight.dtype
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.tokenizer_max_length = tokenizer.model_max_length
        self._cached_transformers: Dict[tuple, FBCachedTransformer] = {}
        # Context parallel (see models/context_parallel.py): this rank's place, and one persistent wrapper
        # per forward, so each compiles once.
        self.token_split = token_split
        self._parallel_forwards: Dict[int, ContextParallelForward] = {}
        if token_split is not None:
            enable_context_parallel(transformer)
        # The persistent compile cache (models/compile_cache.py) and what identifies this pipeline's graphs.
        self.compile_cache = compile_cache
        self.source = source
        # Components that run op by op in graph mode: a subset of OP_BY_OP_COMPONENTS. The text encoders and
        # the VAE run once per call; a process that makes one call (the CLI) is faster running them op by op
        # than compiling them, a process that makes many is faster compiled (the default). Measured on the
        # shipped model, 2 CPU cores: the text encoders of both CFG branches take 0.3 s op by op, 0.01 s
        # compiled after a 2.3 s compile (0.2 s to load from the compile cache); the 128x128 VAE 2.2-3.6 s op
        # by op, 0.27 s compiled after a 9 s compile (0.9 s to load).
        self._op_by_op: frozenset = frozenset()
        self._graph_calls: set = set()
        self._run_key: Dict[str, object] = dict(source=source)  # replaced by each call's graph-shaping arguments
        self.timings: Dict[str, float] = {"compile": 0.0}

    @classmethod
    def from_pretrained(cls, path: str, mindspore_dtype: ms.Type = ms.float32, use_mindone_models: bool = False,
                        context_parallel: int = 1, compile_cache: Union[bool, str, Path] = True) -> "FluxPipeline":
        """Load every component of a diffusers FLUX folder, strictly (no silently random weights).

        `use_mindone_models` takes mindone's own FluxTransformer2DModel, AutoencoderKL and text encoders
        (Ascend kernels; its transformer and VAE do not run on MindSpore's CPU backend) instead of the
        portable ones; the cached forward binds onto either, and their weights are checked against the
        files just as strictly. `context_parallel=N > 1` splits each image's tokens over the N workers of the
        msrun launch this process is in (joined before anything loads; every rank returns the whole image).
        `compile_cache` stores compiled graphs across processes (graph mode; models/compile_cache.py): True
        for the user cache folder (`$FLUX_MS_COMPILE_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`), a folder,
        or False. It is off under context parallel (each rank would need its own manifest).
        """
        if isinstance(context_parallel, bool) or not isinstance(context_parallel, int) or context_parallel < 1:
            raise ValueError(f"context_parallel must be a whole number of ranks >= 1, got {context_parallel!r}")
        if context_parallel > 1 and use_mindone_models:
            raise ValueError("context_parallel needs the portable Flux transformer (its attention gathers keys and "
                             "values across ranks); drop use_mindone_models")
        token_split = join_msrun(context_parallel) if context_parallel > 1 else None
        if mindspore_dtype == ms.bfloat16 and ms.get_context("device_target") == "CPU":
            raise ValueError("bfloat16 needs bf16 matmul, which MindSpore's CPU backend lacks: use float32 or "
                             "float16 on CPU, bfloat16 on Ascend")
        for name in COMPONENT_FOLDERS:
            model_folder(path, name)
        check_pipeline_components(path)
        root = Path(path)
        if use_mindone_models:
            from models.mindone_components import load_mindone_components
            models = load_mindone_components(path, mindspore_dtype)
        else:
            models = dict(
                transformer=FluxTransformer2DModel.from_pretrained(path, subfolder="transformer",
                                                                   mindspore_dtype=mindspore_dtype),
                vae=AutoencoderKL.from_pretrained(path, subfolder="vae", mindspore_dtype=mindspore_dtype),
                text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder", mindspore_dtype=mindspore_dtype),
                text_encoder_2=T5EncoderModel.from_pretrained(root / "text_encoder_2", mindspore_dtype=mindspore_dtype),
            )
        cache = None
        if compile_cache is not False and token_split is None:
            cache = process_compile_cache(None if compile_cache is True else Path(compile_cache))
        return cls(
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
            tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True),
            tokenizer_2=T5Tokenizer.from_pretrained(str(root / "tokenizer_2"), local_files_only=True),
            token_split=token_split,
            compile_cache=cache,
            source=[str(root.resolve()), str(mindspore_dtype), use_mindone_models, weights_identity(root)],
            **models,
        )

    @property
    def op_by_op(self) -> frozenset:
        """The components that run op by op in graph mode (see __init__ for when that is faster)."""
        return self._op_by_op

    @op_by_op.setter
    def op_by_op(self, components) -> None:
        components = frozenset(components)
        unknown = sorted(components - OP_BY_OP_COMPONENTS)
        if unknown:
            raise ValueError(f"op_by_op: {unknown} cannot run op by op; choose from {sorted(OP_BY_OP_COMPONENTS)} "
                             "(the transformer always compiles in graph mode)")
        self._op_by_op = components

    def compiled_graphs(self) -> int:
        """Graphs compiled so far by all components, one per (cell, input signature). Lets a caller check
        that a new threshold, Taylor order or repeated call compiled nothing (benchmarks report it)."""
        cells = [self.text_encoder, self.text_encoder_2, self.transformer, self.vae,
                 *self._cached_transformers.values(), *self._parallel_forwards.values()]
        return sum(len(cell.compile_cache) for cell in cells)

    # ----- text -----

    def encode_prompt(self, prompts: List[str], prompts_2: List[str],
                      max_sequence_length: int) -> Tuple[ms.Tensor, ms.Tensor]:
        """T5 token features and pooled CLIP features of each prompt, as diffusers computes them. They can
        be passed back as `prompt_embeds` / `pooled_prompt_embeds` to reuse them across calls."""
        warn_truncated(self.tokenizer, prompts, self.tokenizer_max_length, "CLIP", "the pooled CLIP embedding "
                       "reads only these (as in diffusers)")
        warn_truncated(self.tokenizer_2, prompts_2, max_sequence_length, "T5",
                       f"raise max_sequence_length (at most {MAX_SEQUENCE_LENGTH}) to keep the rest")
        clip_ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer_max_length,
                                  truncation=True, return_tensors="np").input_ids
        pooled = self.run_text_encoder(0, clip_ids)[1]
        t5_ids = self.tokenizer_2(prompts_2, padding="max_length", max_length=max_sequence_length,
                                  truncation=True, return_tensors="np").input_ids
        return self.run_text_encoder(1, t5_ids)[0], pooled

    def encode_prompt_lists(self, texts: Dict[str, Tuple[List[str], List[str]]],
                            max_sequence_length: int) -> Dict[str, Tuple[ms.Tensor, ms.Tensor]]:
        """`encode_prompt` of several (prompts, prompts_2) lists in one batch (each encoder runs once, not once
        per CFG branch), split back per list."""
        if not texts:
            return {}
        names = list(texts)
        prompts = [text for name in names for text in texts[name][0]]
        prompts_2 = [text for name in names for text in texts[name][1]]
        embeds, pooled = self.encode_prompt(prompts, prompts_2, max_sequence_length)
        encoded, start = {}, 0
        for name in names:
            count = len(texts[name][0])
            encoded[name] = (embeds[start:start + count], pooled[start:start + count])
            start += count
        return encoded

    def run_text_encoder(self, index: int, ids: np.ndarray) -> tuple:
        """The outputs of CLIP (index 0) or T5 (1) for token ids."""
        name, encoder = (("clip", self.text_encoder), ("t5", self.text_encoder_2))[index]
        return self.run_component("text_encoders", name, encoder, ms.Tensor(ids))

    def run_component(self, component: str, name: str, cell: nn.Cell, *args):
        """Run a component compiled (graph mode), or op by op when it is in `self.op_by_op` (see there)."""
        if component not in self.op_by_op or ms.get_context("mode") != ms.GRAPH_MODE:
            return self.run_graph(name, cell, *args)
        ms.set_context(mode=ms.PYNATIVE_MODE)
        try:
            outputs = cell(*args)
            (outputs[0] if isinstance(outputs, tuple) else outputs).asnumpy()  # run before graph mode returns
        finally:
            ms.set_context(mode=ms.GRAPH_MODE)
        return outputs

    def run_graph(self, name: str, cell: nn.Cell, *args):
        """Call a component that graph mode compiles. The first call of each (cell, input signature)
        compiles: the compile cache is told which graph it is (`name`, the cell's class, the inputs'
        shapes and dtypes), and the call's time is counted in `timings["compile"]`."""
        if ms.get_context("mode") != ms.GRAPH_MODE or not isinstance(cell, nn.Cell):
            return cell(*args)
        key = (id(cell), tuple(input_signature(arg) for arg in args))
        if key in self._graph_calls:
            return cell(*args)
        signature = f"{name} {type(cell).__name__} {key[1]}"
        graphs_before = len(cell.compile_cache)
        started = time.perf_counter()
        if self.compile_cache is not None:
            self.compile_cache.activate(self._run_key)
            self.compile_cache.begin(signature)
        try:
            outputs = cell(*args)
        finally:
            if self.compile_cache is not None:
                self.compile_cache.end(signature, compiled=len(cell.compile_cache) > graphs_before)
        self._graph_calls.add(key)
        self.timings["compile"] = self.timings.get("compile", 0.0) + time.perf_counter() - started
        return outputs

    def text_conditioning(self, prompt_embeds: ms.Tensor, pooled: ms.Tensor,
                          num_images_per_prompt: int) -> Tuple[ms.Tensor, ms.Tensor, ms.Tensor]:
        """The transformer's text inputs: features repeated per image, and text position ids (zeros)."""
        prompt_embeds = ops.repeat_interleave(prompt_embeds.astype(self.dtype), num_images_per_prompt, 0)
        pooled = ops.repeat_interleave(pooled.astype(self.dtype), num_images_per_prompt, 0)
        return prompt_embeds, pooled, ms.Tensor(np.zeros((prompt_embeds.shape[1], 3), np.float32))

    # ----- cache -----

    def cached_transformer(self, branch: str, batch: int, image_tokens: int, text_tokens: int,
                           cache: FBCacheConfig, leader: Optional[CacheContext] = None) -> FBCachedTransformer:
        """The persistent cached transformer of one CFG branch and shape, reset and reconfigured. The uncond
        branch's context is built with the cond one as `leader` (used when `cache.sync_cfg_branches`)."""
        key = (branch, batch, image_tokens, text_tokens, cache.fn_compute_blocks, cache.bn_compute_blocks)
        if key not in self._cached_transformers:
            ranks = 1 if self.token_split is None else self.token_split.ranks
            context = CacheContext(batch, image_tokens // ranks, self.transformer.inner_dim,
                                   dtype=self.dtype,
                                   fn_compute_blocks=cache.fn_compute_blocks,
                                   bn_compute_blocks=cache.bn_compute_blocks, text_seq_len=text_tokens // ranks,
                                   leader=leader, context_parallel=ranks > 1)
            self._cached_transformers[key] = FBCachedTransformer(self.transformer, context)
        cached = self._cached_transformers[key]
        cached.context.configure(**cache.runtime_settings(follower=leader is not None))
        cached.context.reset()
        return cached

    # ----- generation -----

    def check_prompt_embeds(self, prompt, prompt_2, prompt_embeds: Optional[ms.Tensor],
                            pooled_prompt_embeds: Optional[ms.Tensor]) -> None:
        if prompt_embeds is None and pooled_prompt_embeds is None:
            if prompt is None:
                raise ValueError("give a prompt, or prompt_embeds and pooled_prompt_embeds from encode_prompt")
            return
        if prompt is not None or prompt_2 is not None:
            raise ValueError("give either prompt (and prompt_2) or prompt_embeds, not both")
        if prompt_embeds is None or pooled_prompt_embeds is None:
            raise ValueError("prompt_embeds and pooled_prompt_embeds go together (both come from encode_prompt)")
        config = self.transformer.config
        shape, pooled_shape = tuple(prompt_embeds.shape), tuple(pooled_prompt_embeds.shape)
        if len(shape) != 3 or shape[2] != config.joint_attention_dim or not 1 <= shape[1] <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"prompt_embeds must have shape (prompts, text tokens <= {MAX_SEQUENCE_LENGTH}, "
                             f"{config.joint_attention_dim}), got {shape}")
        if pooled_shape != (shape[0], config.pooled_projection_dim):
            raise ValueError(f"pooled_prompt_embeds must have shape ({shape[0]}, {config.pooled_projection_dim}) "
                             f"to match prompt_embeds, got {pooled_shape}")

    def check_inputs(self, prompt_count: int, negative_prompts, height: int, width: int,
                     num_inference_steps: int, max_sequence_length: int, num_images_per_prompt: int,
                     true_cfg_scale: float, guidance_scale: Optional[float], seed: Optional[int]) -> None:
        """Every argument checked before any encoding, so a bad one costs nothing and nothing is ignored."""
        multiple = self.vae_scale_factor * 2
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"height and width must be positive multiples of {multiple} (VAE downsampling "
                             f"{self.vae_scale_factor} x 2x2 packing), got {height}x{width}")
        if negative_prompts is not None and len(negative_prompts) != prompt_count:
            raise ValueError(f"negative_prompt has {len(negative_prompts)} entries but prompt has {prompt_count}; "
                             "give one negative prompt per prompt (or a single string for all)")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
            raise ValueError(f"max_sequence_length must lie in [1, {MAX_SEQUENCE_LENGTH}], got {max_sequence_length}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be >= 1, got {num_images_per_prompt}")
        if seed is not None and not 0 <= seed < 2 ** 64:
            raise ValueError(f"seed must lie in [0, 2**64 - 1] (or None for fresh noise), got {seed}")
        if self.token_split is not None:
            self.token_split.check((height // multiple) * (width // multiple), f"the image tokens ({height}x{width} "
                                   f"/ {multiple}^2)", "choose a height and width whose token count it divides")
            self.token_split.check(max_sequence_length, "the text tokens (max_sequence_length)",
                                   "choose a max_sequence_length it divides")
        self.check_guidance(true_cfg_scale, negative_prompts is not None, guidance_scale)

    def check_guidance(self, true_cfg_scale: float, has_negative_prompt: bool, guidance_scale: Optional[float]) -> None:
        """Scales must be finite (a NaN gives an all-black image), and none may be silently ignored."""
        if not math.isfinite(true_cfg_scale):
            raise ValueError(f"true_cfg_scale must be a finite number, got {true_cfg_scale}")
        if true_cfg_scale > 1 and not has_negative_prompt:
            raise ValueError(f"true_cfg_scale={true_cfg_scale:g} needs a negative_prompt to guide against (\"\" for "
                             "the empty prompt), or set true_cfg_scale=1")
        if true_cfg_scale <= 1 and has_negative_prompt:
            raise ValueError(f"negative_prompt is used only with true CFG: set true_cfg_scale > 1 (got "
                             f"{true_cfg_scale:g}), or drop the negative prompt")
        if not self.transformer.config.guidance_embeds:
            if guidance_scale is not None:
                raise ValueError(f"guidance_scale={guidance_scale:g}: this checkpoint has no guidance embedding "
                                 "(FLUX.1-schnell style), so it would be ignored; drop it (true_cfg_scale with a "
                                 "negative prompt guides such models)")
        elif guidance_scale is not None and not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")

    def prepare_latents(self, batch: int, height: int, width: int, seed: Optional[int],
                        latents: Optional[np.ndarray]) -> np.ndarray:
        """Packed initial noise for latent size height x width: given, or drawn from `seed`."""
        channels = self.transformer.config.in_channels // 4
        expected = (batch, (height // 2) * (width // 2), channels * 4)
        if latents is None:
            noise = np.random.default_rng(seed).standard_normal((batch, channels, height, width))
            return pack_latents(noise.astype(np.float32))
        latents = np.asarray(latents, np.float32)
        if latents.shape != expected:
            raise ValueError(f"latents must be packed with shape {expected} for this size and batch, "
                             f"got {latents.shape}")
        if not np.isfinite(latents).all():
            raise NonFiniteError("latents contain NaN or infinite values")
        return latents

    def prepare_timesteps(self, image_tokens: int, num_inference_steps: int) -> ms.Tensor:
        """The scheduler's timesteps, shifted for the resolution as diffusers' FluxPipeline does."""
        config = self.scheduler.config
        mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                             config.get("base_shift", 0.5), config.get("max_shift", 1.15))
        self.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps).tolist(),
                                     mu=mu)
        return self.scheduler.timesteps

    def guidance_input(self, batch: int, guidance_scale: Optional[float]) -> Optional[ms.Tensor]:
        if not self.transformer.config.guidance_embeds:
            return None
        scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        return ms.Tensor(np.full(batch, scale, np.float32))

    def __call__(
        self,
        prompt: Optional[PromptInput] = None,
        prompt_2: Optional[PromptInput] = None,
        negative_prompt: Optional[PromptInput] = None,
        negative_prompt_2: Optional[PromptInput] = None,
        true_cfg_scale: float = 1.0,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int = 28,
        guidance_scale: Optional[float] = None,
        num_images_per_prompt: int = 1,
        seed: Optional[int] = None,
        latents: Optional[np.ndarray] = None,
        max_sequence_length: Optional[int] = None,
        output_type: str = "pil",
        cache: Optional[FBCacheConfig] = None,
        callback: Optional[ProgressCallback] = None,
        prompt_embeds: Optional[ms.Tensor] = None,
        pooled_prompt_embeds: Optional[ms.Tensor] = None,
        progress: bool = False,
        batch_cfg: bool = True,
    ) -> FluxPipelineOutput:
        """Generate images. `cache=None` runs the uncached transformer. `callback(step, total, cached)`
        is called after each step (`cached` maps branch -> whether that step used the cache; reading it
        syncs the host, so only the callback pays for it); `progress=True` shows a tqdm bar instead, at no
        sync. Returns images as PIL (`output_type="pil"`), float arrays in [0, 1] (`"np"`) or packed latents
        (`"latent"`). `prompt_embeds` and `pooled_prompt_embeds` (from `encode_prompt`) replace `prompt` /
        `prompt_2`. `max_sequence_length` defaults to the T5 tokenizer's model_max_length (at most 512):
        FLUX.1's is 512, and a model trained on fewer padded tokens (the shipped emoji model: 32) says so there.
        `guidance_scale` (default 3.5) is for checkpoints with guidance embedding (FLUX.1-dev) and refused
        by others; true CFG needs both `true_cfg_scale > 1` and a negative prompt, and one without the other
        is refused rather than ignored. With true CFG, `batch_cfg=True` (default) runs both branches as one
        batch through one graph with one cache decision per step (the branch `"cond+uncond"` of
        `cache_summaries`): half the launches and compiles of `batch_cfg=False`, which runs them as two
        calls with a cache each (`"cond"`, `"uncond"`; `FBCacheConfig.sync_cfg_branches` ties them).
        Seconds spent per phase are left in `self.timings` (the first call of each graph counts as
        compile). Raises `NonFiniteError` instead of returning a NaN image."""
        if max_sequence_length is None:
            max_sequence_length = self.default_sequence_length()
        self.check_prompt_embeds(prompt, prompt_2, prompt_embeds, pooled_prompt_embeds)
        prompts = as_prompt_list(prompt, "prompt")
        prompts_2 = as_prompt_list(prompt_2, "prompt_2") or prompts
        prompt_count = len(prompts) if prompts else prompt_embeds.shape[0]
        negative_prompts = as_prompt_list(negative_prompt, "negative_prompt")
        if negative_prompts is not None and len(negative_prompts) == 1 and prompt_count > 1:
            negative_prompts = negative_prompts * prompt_count
        negative_prompts_2 = as_prompt_list(negative_prompt_2, "negative_prompt_2") or negative_prompts
        check_one_each("prompt_2", prompts_2, "prompt", prompts)
        check_one_each("negative_prompt_2", negative_prompts_2, "negative_prompt", negative_prompts)
        text_tokens = max_sequence_length if prompt_embeds is None else prompt_embeds.shape[1]
        self.check_inputs(prompt_count, negative_prompts, height, width, num_inference_steps, text_tokens,
                          num_images_per_prompt, true_cfg_scale, guidance_scale, seed)
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if not isinstance(batch_cfg, bool):
            raise ValueError(f"batch_cfg must be True or False, got {batch_cfg!r}")
        batch = prompt_count * num_images_per_prompt
        self.timings = {"compile": 0.0}
        self._run_key = dict(source=self.source, height=height, width=width, batch=batch, text_tokens=text_tokens,
                             embeds_given=prompt_embeds is not None, cfg=negative_prompts is not None,
                             batch_cfg=batch_cfg, output_type=output_type, guidance=guidance_scale is not None,
                             cache=None if cache is None else (cache.fn_compute_blocks, cache.bn_compute_blocks),
                             context_parallel=None if self.token_split is None else self.token_split.ranks)

        with self.timed("encode"):
            texts = {}
            if prompt_embeds is None:
                texts["cond"] = (prompts, prompts_2)
            if negative_prompts is not None:
                texts["uncond"] = (negative_prompts, negative_prompts_2)
            encoded = self.encode_prompt_lists(texts, max_sequence_length)
            if prompt_embeds is not None:
                encoded["cond"] = (prompt_embeds, pooled_prompt_embeds)
            branches = {name: self.text_conditioning(*encoded[name], num_images_per_prompt)
                        for name in ("cond", "uncond") if name in encoded}
            if "uncond" in branches and batch_cfg:
                branches = {BATCHED_CFG: batched_branches(branches["cond"], branches["uncond"])}
            next(iter(branches.values()))[0].asnumpy()  # the encoders' work counted here, not in denoising

        latent_height, latent_width = height // self.vae_scale_factor, width // self.vae_scale_factor
        packed = self.prepare_latents(batch, latent_height, latent_width, seed, latents)
        image_ids = ms.Tensor(latent_image_ids(latent_height // 2, latent_width // 2))
        timesteps = self.prepare_timesteps(packed.shape[1], num_inference_steps)
        forward_batch = 2 * batch if BATCHED_CFG in branches else batch
        forwards = self.branch_forwards(branches, forward_batch, packed.shape[1], cache)
        with self.timed("denoise"):
            latents_ms = self.denoise(ms.Tensor(packed).astype(self.dtype), timesteps, branches, forwards, image_ids,
                                      self.guidance_input(forward_batch, guidance_scale), true_cfg_scale, callback,
                                      progress, forward_batch)

        summaries = {name: cache_context(forward).summary() for name, forward in forwards.items() if cache is not None}
        if output_type == "latent":
            return FluxPipelineOutput(images=list(latents_ms.asnumpy()), cache_summaries=summaries)
        with self.timed("decode"):
            images = self.decode(latents_ms, latent_height, latent_width)
        if self.compile_cache is not None:
            self.compile_cache.publish()
        return FluxPipelineOutput(images=to_pil(images) if output_type == "pil" else list(images),
                                  cache_summaries=summaries)

    @contextlib.contextmanager
    def timed(self, phase: str) -> Iterator[None]:
        """Seconds spent in `phase`, less the compiles inside it (counted under "compile")."""
        compile_before, started = self.timings["compile"], time.perf_counter()
        yield
        self.timings[phase] = time.perf_counter() - started - (self.timings["compile"] - compile_before)

    def branch_forwards(self, branches: Branches, batch: int, image_tokens: int,
                        cache: Optional[FBCacheConfig]) -> Dict[str, nn.Cell]:
        """The transformer each CFG branch runs: the plain one, or its persistent cached wrapper (the
        uncond branch's context led by the cond one); under context parallel, wrapped to split and gather."""
        forwards = {}
        for name, (_, _, text_ids) in branches.items():
            leader = cache_context(forwards["cond"]) if name == "uncond" and cache is not None else None
            forward = self.transformer if cache is None else self.cached_transformer(
                name, batch, image_tokens, text_ids.shape[0], cache, leader)
            forwards[name] = forward if self.token_split is None else self.parallel_forward(forward)
        return forwards

    def parallel_forward(self, forward: nn.Cell) -> ContextParallelForward:
        """The persistent context-parallel wrapper of a forward."""
        if id(forward) not in self._parallel_forwards:
            self._parallel_forwards[id(forward)] = ContextParallelForward(forward, self.token_split)
        return self._parallel_forwards[id(forward)]

    def denoise(self, latents: ms.Tensor, timesteps: ms.Tensor, branches: Branches, forwards: Dict[str, nn.Cell],
                image_ids: ms.Tensor, guidance: Optional[ms.Tensor], true_cfg_scale: float,
                callback: Optional[ProgressCallback], progress: bool, forward_batch: int) -> ms.Tensor:
        """The sampling loop (true CFG when there is an uncond branch; `forward_batch` rows per transformer
        call). The first step whose latents are not finite is kept on the device and checked once at the
        end: no per-step host sync."""
        # Each step's timestep input, as diffusers makes it (cast to the model dtype, then / 1000), made
        # before the loop so that a step launches only the transformer, the guidance and the Euler update.
        timestep_inputs = [(t.broadcast_to((forward_batch,)).astype(self.dtype) / 1000) for t in timesteps]
        first_bad_step = ms.Tensor(-1, ms.int32)
        for step in tqdm(range(len(timesteps)), desc="denoising", unit="step", disable=not progress):
            noise_pred = self.predict_noise(latents, timestep_inputs[step], branches, forwards, image_ids, guidance,
                                            true_cfg_scale)
            latents = self.scheduler.step(noise_pred, step, latents)
            newly_bad = (first_bad_step < 0) & ~ops.isfinite(latents).all()
            first_bad_step = ops.select(newly_bad, ms.Tensor(step, ms.int32), first_bad_step)
            if callback is not None:
                callback(step, len(timesteps), {name: self._step_cached(forward, step)
                                                for name, forward in forwards.items()})
        bad_step = int(first_bad_step.asnumpy())
        if bad_step >= 0:
            raise NonFiniteError(
                f"the latents became NaN or infinite at step {bad_step} of {len(timesteps)}: check the checkpoint "
                "for NaN/inf weights and the guidance scales, or run in float32 if this was float16 (overflow)")
        return latents

    def predict_noise(self, latents: ms.Tensor, timestep: ms.Tensor, branches: Branches, forwards: Dict[str, nn.Cell],
                      image_ids: ms.Tensor, guidance: Optional[ms.Tensor], true_cfg_scale: float) -> ms.Tensor:
        """One step's flow prediction: the cond branch, or true CFG `uncond + scale * (cond - uncond)` (as
        diffusers), from two calls or from one call on both branches stacked along the batch."""
        predictions = {}
        for name, (prompt_embeds, pooled, text_ids) in branches.items():
            inputs = ops.concat((latents, latents)) if name == BATCHED_CFG else latents
            predictions[name] = self.run_graph(name, forwards[name], inputs, prompt_embeds, pooled, timestep,
                                               image_ids, text_ids, guidance)[0]
        if BATCHED_CFG in predictions:
            cond, uncond = ops.split(predictions[BATCHED_CFG], latents.shape[0])
        elif "uncond" in predictions:
            cond, uncond = predictions["cond"], predictions["uncond"]
        else:
            return predictions["cond"]
        return uncond + true_cfg_scale * (cond - uncond)

    def default_sequence_length(self) -> int:
        return min(self.tokenizer_2.model_max_length, MAX_SEQUENCE_LENGTH)

    @staticmethod
    def _step_cached(forward, step: int) -> bool:
        context = cache_context(forward)
        return False if context is None else bool(context.stats_cached.asnumpy()[step])

    def decode(self, packed: ms.Tensor, latent_height: int, latent_width: int) -> np.ndarray:
        """Packed latents -> images (batch, H, W, 3) in [0, 1], undoing the VAE's scale and shift."""
        latents = unpack_latents(packed, latent_height, latent_width)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.run_component("vae", "vae", self.vae, latents.astype(self.dtype)).astype(ms.float32).asnumpy()
        if not np.isfinite(image).all():
            raise NonFiniteError("the VAE decoded NaN or infinite pixels from finite latents: check the VAE weights "
                                 "for NaN/inf, or run in float32 if this was float16 (overflow)")
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
