"""Captioned scenes of the trained small world: one or two emoji on a plain or gradient background.

A scene is drawn from a seed (`sample_scene`), rendered from the committed atlas (`render`) and
described in plain English (`caption`), e.g. "a small koala at the top left and a hamburger on the
right, on a light blue background". Captions name what a person sees: subject, size, position,
background colour(s).

Held out for evaluation, never trained on: every two-emoji scene whose unordered emoji pair is one of
the held-out pairs (about 1 in 8 pairs), and every one-emoji scene whose (emoji, position, first
background colour) is a held-out composition (about 1 in 8). `split="train"` rejects both,
`split="heldout"` draws only from them.
"""

import zlib
from dataclasses import dataclass
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from train.atlas import load_atlas

IMAGE_SIZE = 128
COLOURS = {
    "white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128), "red": (215, 40, 40),
    "orange": (245, 140, 30), "yellow": (245, 225, 60), "green": (50, 160, 70), "light blue": (150, 200, 245),
    "dark blue": (25, 45, 140), "purple": (130, 60, 170), "pink": (245, 160, 200),
}
SIZES = {"small": 36, "": 48, "large": 64}  # caption word -> emoji side in pixels ("" = medium, unsaid)
# 3x3 grid of positions: (row, column) -> caption phrase
POSITIONS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}
CELL_CENTRES = (30, 64, 98)
JITTER = 4
HELD_OUT_MODULUS = 8


@dataclass(frozen=True)
class Placement:
    emoji: int
    size: str
    position: Tuple[int, int]
    offset: Tuple[int, int]  # jitter (dy, dx) in pixels, not captioned


@dataclass(frozen=True)
class Scene:
    placements: Tuple[Placement, ...]
    colours: Tuple[str, ...]  # one (plain) or two (top-to-bottom gradient)


@lru_cache(maxsize=None)
def atlas_tiles() -> Tuple[Tuple[np.ndarray, ...], Tuple[str, ...]]:
    tiles, names = load_atlas()
    return tuple(tiles), tuple(names)


def emoji_names() -> Tuple[str, ...]:
    return atlas_tiles()[1]


def held_out_pair(first: int, second: int) -> bool:
    low, high = sorted((first, second))
    return zlib.crc32(f"pair {low} {high}".encode()) % HELD_OUT_MODULUS == 0


def held_out_single(emoji: int, position: Tuple[int, int], colour: str) -> bool:
    return zlib.crc32(f"single {emoji} {position} {colour}".encode()) % HELD_OUT_MODULUS == 0


def is_held_out(scene: Scene) -> bool:
    if len(scene.placements) == 2:
        return held_out_pair(scene.placements[0].emoji, scene.placements[1].emoji)
    placement = scene.placements[0]
    return held_out_single(placement.emoji, placement.position, scene.colours[0])


def draw_scene(rng: np.random.Generator) -> Scene:
    """Any scene, held out or not: 1 or 2 emoji (2 on opposite sides of the grid, never large)."""
    colour_names = list(COLOURS)
    count = 1 + int(rng.random() < 0.5)
    emoji = rng.choice(len(emoji_names()), size=count, replace=False)
    cells = list(POSITIONS)
    if count == 1:
        positions = [cells[rng.integers(len(cells))]]
        sizes = [list(SIZES)[rng.integers(len(SIZES))]]
    else:
        while True:
            first, second = (cells[i] for i in rng.choice(len(cells), size=2, replace=False))
            if max(abs(first[0] - second[0]), abs(first[1] - second[1])) == 2:
                break
        positions = [first, second]
        sizes = [("small", "")[rng.integers(2)] for _ in range(2)]
    placements = tuple(Placement(int(e), s, p, tuple(int(v) for v in rng.integers(-JITTER, JITTER + 1, 2)))
                       for e, s, p in zip(emoji, sizes, positions))
    colours = tuple(colour_names[i] for i in rng.choice(len(colour_names), size=1 + int(rng.random() < 0.4),
                                                         replace=False))
    return Scene(placements, colours)


def sample_scene(rng: np.random.Generator, split: str = "train") -> Scene:
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    while True:
        scene = draw_scene(rng)
        if is_held_out(scene) == (split == "heldout"):
            return scene


def caption(scene: Scene) -> str:
    names = emoji_names()
    parts = []
    for placement in scene.placements:
        subject = " ".join(word for word in (placement.size, names[placement.emoji]) if word)
        parts.append(f"{article(subject)} {subject} {POSITIONS[placement.position]}")
    background = " to ".join(scene.colours) + (" gradient" if len(scene.colours) == 2 else "")
    return f"{' and '.join(parts)}, on {article(background)} {background} background"


def article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


@lru_cache(maxsize=None)
def sized_tile(emoji: int, side: int) -> np.ndarray:
    """Premultiplied RGB and alpha of one emoji at `side` pixels, float32 in [0, 1]."""
    tile = Image.fromarray(atlas_tiles()[0][emoji]).resize((side, side), Image.LANCZOS)
    rgba = np.asarray(tile, np.float32) / 255
    return np.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], axis=-1)


def render(scene: Scene, image_size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as float32 RGB (H, W, 3) in [0, 1]."""
    top, bottom = (np.array(COLOURS[name], np.float32) / 255 for name in (scene.colours * 2)[:2])
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)[:, None, None]
    image = np.broadcast_to(top + (bottom - top) * ramp, (image_size, image_size, 3)).copy()
    scale = image_size / IMAGE_SIZE
    for placement in scene.placements:
        side = round(SIZES[placement.size] * scale)
        tile = sized_tile(placement.emoji, side)
        centre_y, centre_x = (round((CELL_CENTRES[c] + o) * scale) for c, o in zip(placement.position, placement.offset))
        y0, x0 = np.clip(centre_y - side // 2, 0, image_size - side), np.clip(centre_x - side // 2, 0, image_size - side)
        region = image[y0:y0 + side, x0:x0 + side]
        region[:] = tile[..., :3] + region * (1 - tile[..., 3:])
    return image


def scenes(seed: int, count: int, split: str = "train") -> List[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(count)]


def render_batch(batch: Sequence[Scene], image_size: int = IMAGE_SIZE) -> np.ndarray:
    """(B, 3, H, W) float32 in [-1, 1], the VAE's input range."""
    return np.stack([render(scene, image_size).transpose(2, 0, 1) * 2 - 1 for scene in batch])


def evaluation_prompts(count: int = 32, seed: int = 1234) -> Tuple[List[str], List[Scene]]:
    """Held-out captions for evaluation (half one-emoji, half two-emoji scenes) and their real scenes."""
    rng = np.random.default_rng(seed)
    chosen: List[Scene] = []
    seen = set()
    while len(chosen) < count:
        scene = sample_scene(rng, "heldout")
        want_pair = len(chosen) % 2 == 1
        if (len(scene.placements) == 2) == want_pair and caption(scene) not in seen:
            seen.add(caption(scene))
            chosen.append(scene)
    return [caption(scene) for scene in chosen], chosen


def image_from_array(image: np.ndarray, mode: Optional[str] = None) -> Image.Image:
    return Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), mode)
