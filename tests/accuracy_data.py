"""Accuracy evaluation data: prompt sets, cache settings, image sizes and the seed.

Imported by tests/generate_clip_score_datas.py, tests/flux_accuracy_test.py and eval scripts; it
imports neither pytest nor MindSpore (their tests live in tests/test_accuracy_data.py).
"""

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from cache_config import FBCacheConfig
from train.scenes import evaluation_prompts

PROMPT_SETS: Dict[str, Tuple[str, ...]] = {
    # The shipped emoji-world model's 32 held-out prompts (emoji pairs and compositions never trained on).
    "emoji_heldout": tuple(evaluation_prompts(32)[0]),
    "smoke": (
        "A cat holding a sign that says hello world",
        "A red apple on a wooden table, studio lighting",
        "An astronaut riding a horse on the moon, digital art",
        "A watercolor painting of a lighthouse at sunset",
    ),
    # DrawBench-style: colours, counting, spatial relations, text rendering, rare words, long
    # descriptions, styles and unusual compositions, written for this project.
    "drawbench": (
        "A blue bird sitting on a yellow fence",
        "A green banana and a purple orange in a white bowl",
        "A pink elephant wearing a black top hat",
        "Three red cubes stacked on top of two blue spheres",
        "Five wooden chairs around a round glass table",
        "Two dogs and one cat sleeping on a sofa",
        "A cup of coffee to the left of an open book",
        "A bicycle leaning against a brick wall, under a street lamp",
        "A small boat in front of a large snowy mountain",
        "A neon sign that reads 'OPEN 24 HOURS' above a diner door",
        "A chalkboard with the words 'E = mc^2' written in white chalk",
        "A birthday cake with 'Happy 30th Anna' written in icing",
        "A pangolin walking through a bamboo forest",
        "An axolotl in a glass aquarium with green plants",
        "A vintage theodolite on a surveyor's tripod in a field",
        "A steampunk airship with brass propellers flying over Victorian London at dusk, "
        "with smoke rising from chimneys and gas lamps glowing in the streets below",
        "A cozy reading nook with a window seat, knitted blankets, a sleeping tabby cat and "
        "rain streaking down the glass",
        "A bustling night market in Taipei with lanterns, food stalls and crowds, photographed with a 35mm lens",
        "A portrait of an old fisherman with a white beard, oil painting in the style of Rembrandt",
        "A city skyline made entirely of books, surreal digital art",
        "A low-poly 3D render of a fox in an autumn forest",
        "A pixel art castle on a floating island",
        "A charcoal sketch of a ballerina mid-leap",
        "A ukiyo-e woodblock print of a great wave crashing over a modern container ship",
        "A giraffe made of glass standing in a desert",
        "A teapot shaped like a snail, product photo",
        "An octopus playing a grand piano underwater",
        "A tiny dragon sleeping in a teacup",
        "A macro photograph of a dewdrop on a spider web at sunrise",
        "An aerial view of terraced rice fields in the morning mist",
        "A close-up of a vintage pocket watch with exposed gears",
        "A bowl of ramen with a soft-boiled egg, chopsticks resting on the rim, top-down view",
    ),
}

# FLUX.1's usual sizes: square, and 16:9-ish both ways (multiples of 16).
RESOLUTIONS: Tuple[Tuple[int, int], ...] = ((1024, 1024), (768, 1360), (1360, 768))
DEFAULT_SEED = 42


@dataclass(frozen=True)
class CacheSetting:
    """One cache configuration to evaluate; `residual_diff_threshold=None` is the uncached baseline."""

    name: str
    residual_diff_threshold: Optional[float] = None
    taylorseer_derivative: int = 0
    fn_compute_blocks: int = 1
    bn_compute_blocks: int = 0
    warmup_steps: int = 0

    def fbcache_config(self) -> Optional[FBCacheConfig]:
        """The pipeline's cache argument: None runs the uncached transformer."""
        if self.residual_diff_threshold is None:
            return None
        return FBCacheConfig(residual_diff_threshold=self.residual_diff_threshold,
                             taylorseer_derivative=self.taylorseer_derivative, warmup_steps=self.warmup_steps,
                             fn_compute_blocks=self.fn_compute_blocks, bn_compute_blocks=self.bn_compute_blocks)


def fbcache_setting(threshold: float, taylor_order: int = 0, fn_compute_blocks: int = 1,
                    bn_compute_blocks: int = 0) -> CacheSetting:
    """A cached setting named after its values: fbcache_0.12, fbcache_0.12_taylor2, f2b1_0.12, ..."""
    blocks = (fn_compute_blocks, bn_compute_blocks)
    prefix = "fbcache" if blocks == (1, 0) else f"f{fn_compute_blocks}b{bn_compute_blocks}"
    name = f"{prefix}_{threshold:g}" + (f"_taylor{taylor_order}" if taylor_order else "")
    return CacheSetting(name, threshold, taylor_order, fn_compute_blocks, bn_compute_blocks)


CACHE_SETTINGS: Dict[str, CacheSetting] = {
    setting.name: setting for setting in (
        CacheSetting("baseline"),
        *(fbcache_setting(threshold, order) for order in (0, 2) for threshold in (0.08, 0.12, 0.2)),
        fbcache_setting(0.12, 0, fn_compute_blocks=2, bn_compute_blocks=1),
    )
}
