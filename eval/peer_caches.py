"""The peers' cache accelerators in torch, on the same diffusers folder as ours: diffusers' FirstBlockCache,
TaylorSeerCache and MagCache hooks and cache-dit's DBCache (with and without its TaylorSeer calibrator,
and its steps-computation masks), plus a counter of the transformer-block compute each one executes.

Compute is counted, not inferred from a method's own statistics, because the methods skip different
things (FirstBlockCache all blocks after the first, TaylorSeerCache by default only the attention
modules, MagCache every block): a forward hook on every Linear inside the blocks adds its FLOPs, and
each attention's `to_q` call adds the attention core's (it runs exactly when the projection does).
"""

import ast
import contextlib
import io
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")


@dataclass
class BlockComputeCounter:
    """FLOPs executed inside the transformer blocks, per transformer call, keyed by block.

    `calls[i]` maps block name -> FLOPs run in the i-th transformer call; an uncached call gives each
    block's full cost, which `full_cost()` returns.
    """

    text_tokens: int
    calls: List[Dict[str, float]] = field(default_factory=list)
    handles: list = field(default_factory=list)

    def attach(self, transformer: torch.nn.Module) -> "BlockComputeCounter":
        self.handles.append(transformer.register_forward_pre_hook(lambda module, args: self.calls.append({})))
        for list_name in BLOCK_LISTS:
            for index, block in enumerate(getattr(transformer, list_name)):
                block_name = f"{list_name}.{index}"
                for name, module in block.named_modules():
                    if isinstance(module, torch.nn.Linear):
                        self.handles.append(module.register_forward_hook(self._linear_hook(block_name, name, block)))
        return self

    def _linear_hook(self, block_name: str, module_name: str, block: torch.nn.Module) -> Callable:
        is_query = module_name.endswith("attn.to_q")
        joint = hasattr(block, "attn") and getattr(block.attn, "add_q_proj", None) is not None

        def hook(module: torch.nn.Linear, args, output) -> None:
            tokens = args[0].numel() // module.in_features
            flops = 2.0 * tokens * module.in_features * module.out_features
            if is_query:
                batch, length = args[0].shape[0], args[0].shape[1] + (self.text_tokens if joint else 0)
                flops += 4.0 * batch * length * length * module.out_features  # QK^T and AV
            counts = self.calls[-1]
            counts[block_name] = counts.get(block_name, 0.0) + flops
        return hook

    def full_cost(self) -> Dict[str, float]:
        """Each block's FLOPs in one uncached call (the largest seen per block)."""
        cost: Dict[str, float] = {}
        for call in self.calls:
            for name, flops in call.items():
                cost[name] = max(cost.get(name, 0.0), flops)
        return cost

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def load_pipeline(folder: str):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)


def calibrate_mag_ratios(pipeline, run: Callable[[object], object], num_inference_steps: int) -> List[float]:
    """MagCache's per-step magnitude ratios on this model, as its documentation says: one run with
    `calibrate=True`, reading the list it prints. With true CFG it prints one list per branch; the
    first (cond) is used, as a user copying the first list would."""
    from diffusers import MagCacheConfig

    pipeline.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=num_inference_steps))
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run(pipeline)
    pipeline.transformer.disable_cache()
    lists = [ast.literal_eval(line) for line in printed.getvalue().splitlines() if line.startswith("[") and not line.startswith("[MagCache]")]
    if not lists or len(lists[0]) != num_inference_steps:
        raise RuntimeError(f"MagCache calibration printed no {num_inference_steps}-step ratio list: "
                           f"{printed.getvalue()[:400]!r}")
    return [float(value) for value in lists[0]]


def apply_peer(pipeline, method: str, params: dict, num_inference_steps: int,
               mag_ratios: Optional[List[float]] = None) -> None:
    """Enable one peer method with `params` on a freshly loaded diffusers pipeline."""
    if method == "diffusers_fbc":
        from diffusers import FirstBlockCacheConfig

        pipeline.transformer.enable_cache(FirstBlockCacheConfig(**params))
    elif method == "diffusers_taylorseer":
        from diffusers import TaylorSeerCacheConfig

        pipeline.transformer.enable_cache(TaylorSeerCacheConfig(taylor_factors_dtype=torch.float32, **params))
    elif method == "magcache":
        from diffusers import MagCacheConfig

        pipeline.transformer.enable_cache(MagCacheConfig(mag_ratios=mag_ratios, num_inference_steps=num_inference_steps,
                                                         **params))
    elif method.startswith("cachedit"):
        import cache_dit
        from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

        params = dict(params)
        order = params.pop("taylorseer_order", 0)
        mask_policy = params.pop("mask_policy", None)
        if mask_policy is not None:
            params["steps_computation_mask"] = cache_dit.steps_mask(mask_policy=mask_policy,
                                                                    total_steps=num_inference_steps)
        # diffusers' FluxPipeline runs the cond then the uncond branch each step: separate CFG, cond first.
        config = DBCacheConfig(enable_separate_cfg=True, cfg_compute_first=False,
                               num_inference_steps=num_inference_steps, **params)
        calibrator = TaylorSeerCalibratorConfig(taylorseer_order=order) if order else None
        cache_dit.enable_cache(pipeline, cache_config=config, calibrator_config=calibrator)
    else:
        raise ValueError(f"unknown peer method {method!r}")


def generate(pipeline, prompt: str, latents: np.ndarray, height: int, width: int, steps: int,
             true_cfg_scale: float, max_sequence_length: int) -> np.ndarray:
    """One image as floats in [0, 1], (H, W, 3)."""
    with torch.no_grad():
        images = pipeline(prompt, negative_prompt="", true_cfg_scale=true_cfg_scale, height=height, width=width,
                          num_inference_steps=steps, latents=torch.from_numpy(latents),
                          max_sequence_length=max_sequence_length, output_type="np").images
    return np.asarray(images[0], np.float32)
