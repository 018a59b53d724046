"""Build the emoji atlas: the artwork of the small trained world, rendered once from Noto Color Emoji.

Tests and training read the committed atlas (`assets/emoji_atlas.png` + `assets/emoji_atlas.json`), so
neither needs the font; only this script does (Debian's `fonts-noto-color-emoji`). The font is a CBDT
bitmap font drawn at 109 px; each glyph is cropped to its alpha box, fitted into a square tile and
stored RGBA, with the lower-cased Unicode name as its caption word(s).

Why a subset of 32: a model of the size that trains in about an hour on two CPU cores learns a few
dozen visually distinct subjects well and blurs a few hundred into colour blobs. The subset mixes
animals, food, plants and objects with distinct colours and silhouettes, and short names.
"""

import argparse
import json
import unicodedata
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO_ROOT = Path(__file__).resolve().parents[1]
ATLAS_PNG = REPO_ROOT / "assets" / "emoji_atlas.png"
ATLAS_JSON = REPO_ROOT / "assets" / "emoji_atlas.json"
FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_SIZE = 109  # the only size the CBDT strike renders
TILE = 64  # stored tile side: the largest emoji in a 128x128 scene is 64 px

# (character, caption name). Names are the Unicode names shortened to what a person would say.
SUBSET: List[Tuple[str, str]] = [
    ("\U0001F428", "koala"), ("\U0001F354", "hamburger"), ("\U0001F34E", "red apple"), ("\U0001F34C", "banana"),
    ("\U0001F347", "bunch of grapes"), ("\U0001F349", "watermelon"), ("\U0001F355", "pizza"), ("\U0001F353", "strawberry"),
    ("\U0001F955", "carrot"), ("\U0001F966", "broccoli"), ("\U0001F369", "doughnut"), ("\U0001F431", "cat face"),
    ("\U0001F436", "dog face"), ("\U0001F438", "frog"), ("\U0001F43C", "panda"), ("\U0001F437", "pig face"),
    ("\U0001F98A", "fox"), ("\U0001F427", "penguin"), ("\U0001F419", "octopus"), ("\U0001F422", "turtle"),
    ("\U0001F433", "whale"), ("\U0001F31E", "sun"), ("\u2B50", "star"), ("\U0001F680", "rocket"),
    ("\u2764", "red heart"), ("\u2744", "snowflake"), ("\U0001F525", "fire"), ("\U0001F333", "tree"),
    ("\U0001F335", "cactus"), ("\U0001F340", "four leaf clover"), ("\U0001F30D", "globe"), ("\U0001F388", "balloon"),
]


def render(character: str, font: ImageFont.FreeTypeFont) -> Image.Image:
    """One emoji, cropped to its visible pixels and centred in a TILE x TILE RGBA square."""
    canvas = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((10, 10), character, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        raise ValueError(f"the font has no glyph for U+{ord(character[0]):04X} ({unicodedata.name(character[0])})")
    glyph = canvas.crop(box)
    scale = TILE / max(glyph.size)
    glyph = glyph.resize((max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale))), Image.LANCZOS)
    tile = Image.new("RGBA", (TILE, TILE), (0, 0, 0, 0))
    tile.paste(glyph, ((TILE - glyph.width) // 2, (TILE - glyph.height) // 2))
    return tile


def build_atlas(font_path: Path = FONT_PATH) -> Tuple[Image.Image, List[Dict[str, str]]]:
    """The atlas image (tiles in one row-major grid of 8 columns) and its index (name, unicode name)."""
    if not font_path.is_file():
        raise FileNotFoundError(f"{font_path} not found: install Debian's fonts-noto-color-emoji "
                                "(apt-get install fonts-noto-color-emoji) or pass --font")
    font = ImageFont.truetype(str(font_path), FONT_SIZE)
    columns = 8
    rows = -(-len(SUBSET) // columns)
    atlas = Image.new("RGBA", (columns * TILE, rows * TILE), (0, 0, 0, 0))
    entries = []
    for index, (character, name) in enumerate(SUBSET):
        atlas.paste(render(character, font), ((index % columns) * TILE, (index // columns) * TILE))
        entries.append({"name": name, "unicode_name": unicodedata.name(character[0]).lower()})
    return atlas, entries


def load_atlas(png: Path = ATLAS_PNG, index: Path = ATLAS_JSON) -> Tuple[np.ndarray, List[str]]:
    """(tiles uint8 (N, TILE, TILE, 4), caption names) from the committed atlas."""
    entries = json.loads(Path(index).read_text())["emoji"]
    grid = np.asarray(Image.open(png).convert("RGBA"))
    columns = grid.shape[1] // TILE
    tiles = np.stack([grid[(i // columns) * TILE:(i // columns + 1) * TILE, (i % columns) * TILE:(i % columns + 1) * TILE]
                      for i in range(len(entries))])
    return tiles, [entry["name"] for entry in entries]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--font", type=Path, default=FONT_PATH)
    parser.add_argument("--out_png", type=Path, default=ATLAS_PNG)
    parser.add_argument("--out_json", type=Path, default=ATLAS_JSON)
    args = parser.parse_args()
    atlas, entries = build_atlas(args.font)
    args.out_png.parent.mkdir(parents=True, exist_ok=True)
    atlas.save(args.out_png, optimize=True)
    args.out_json.write_text(json.dumps({"tile": TILE, "font": args.font.name, "emoji": entries}, indent=1) + "\n")
    print(f"wrote {args.out_png} ({args.out_png.stat().st_size} bytes, {len(entries)} emoji) and {args.out_json}")


if __name__ == "__main__":
    main()
