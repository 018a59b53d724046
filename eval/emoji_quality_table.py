"""Quality and speed of cache settings on the shipped emoji-world Flux, over its 32 held-out prompts.

    python eval/emoji_quality_table.py --out outputs/emoji_quality

Generates every setting's images with tests/generate_clip_score_datas.py (fixed seed per prompt, true
CFG, 128x128, 28 steps; resumable), renders the prompts' real scenes, scores with
tests/flux_accuracy_test.py (PSNR / SSIM against the uncached image, the judge's CLIP score, the
Frechet distance of the judge's image features to the real renders) and prints one Markdown table with
the steps computed and the median wall time per image (CPU, graph mode; the compile of each setting
lands in its first image and is left out by the median).
"""

import argparse
import json
import statistics
import sys
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import flux_accuracy_test as scoring  # noqa: E402
import generate_clip_score_datas as generation  # noqa: E402
from models.embedded import SHIPPED_JUDGE  # noqa: E402
from train.scenes import JITTER, Scene, evaluation_prompts, image_from_array, render  # noqa: E402

DEFAULT_SETTINGS = ["baseline", "fbcache_0.08", "fbcache_0.12", "fbcache_0.2", "fbcache_0.08_taylor2",
                    "fbcache_0.12_taylor2", "fbcache_0.2_taylor2", "f2b1_0.12"]
RESOLUTION = "128x128"


def rejittered(scene: Scene, rng: np.random.Generator) -> Scene:
    """The same caption drawn again: each emoji moved by another uncaptioned jitter."""
    return replace(scene, placements=tuple(
        replace(placement, offset=tuple(int(v) for v in rng.integers(-JITTER, JITTER + 1, 2)))
        for placement in scene.placements))


def write_real_renders(folder: Path, count: int, redraw_seed: Optional[int] = None) -> List[str]:
    """Renders of the held-out prompts' scenes (or, with `redraw_seed`, of the same captions re-jittered:
    a second real sample, whose distance to the first is the noise floor of the Frechet distance)."""
    prompts, scenes = evaluation_prompts(count)
    if redraw_seed is not None:
        rng = np.random.default_rng(redraw_seed)
        scenes = [rejittered(scene, rng) for scene in scenes]
    folder.mkdir(parents=True, exist_ok=True)
    for index, scene in enumerate(scenes):
        path = folder / f"{index:05d}.png"
        if not path.is_file():
            generation.write_atomically(path, lambda partial: image_from_array(render(scene)).save(partial, format="PNG"))
    return prompts


def generation_records(folder: Path) -> Dict[str, dict]:
    """The last log record of each image (a resumed run appends)."""
    records = {}
    for line in (folder / generation.GENERATION_LOG).read_text().splitlines():
        record = json.loads(line)
        records[record["image"]] = record
    return records


def table(rows: Sequence[scoring.Row], images_dir: Path, steps: int, real_clip_score: float,
          real_frechet: float) -> str:
    timings = {row.setting: generation_records(images_dir / row.setting / RESOLUTION) for row in rows}
    baseline_time = statistics.median(record["seconds"] for record in timings["baseline"].values())
    lines = ["| setting | steps computed (per cache: cond+uncond, or cond / uncond, of %d) | time per image (s) | speedup | PSNR (dB) | SSIM | "
             "judge CLIP score | Frechet distance to real renders |" % steps, "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        records = list(timings[row.setting].values())
        seconds = statistics.median(record["seconds"] for record in records)
        branches = sorted({branch for record in records for branch in record["steps_cached"]})
        computed = " / ".join(f"{steps - np.mean([r['steps_cached'][b] for r in records]):.1f}" for b in branches)
        lines.append(f"| {row.setting} | {computed or f'{steps} / {steps}'} | {seconds:.3f} | "
                     f"{baseline_time / seconds:.2f}x | {scoring.format_value(row.psnr, 2)} | "
                     f"{scoring.format_value(row.ssim, 4)} | {scoring.format_value(row.clip_score, 2)} | "
                     f"{scoring.format_value(row.fid, 2)} |")
    lines.append(f"| real renders (re-drawn: the noise floor) | - | - | - | - | - | {real_clip_score:.2f} | "
                 f"{real_frechet:.2f} |")
    return "\n".join(lines)


def gallery(images_dir: Path, real_dir: Path, settings: Sequence[str], columns: int) -> Image.Image:
    """A grid to look at: real renders in the first row, then one row per setting, one column per prompt."""
    rows = [sorted(real_dir.glob("*.png"))[:columns]]
    rows += [sorted((images_dir / setting / RESOLUTION).glob("*.png"))[:columns] for setting in settings]
    tiles = [[Image.open(path).convert("RGB") for path in row] for row in rows]
    side = tiles[0][0].width
    grid = Image.new("RGB", (columns * side, len(tiles) * side), "white")
    for row_index, row in enumerate(tiles):
        for column, tile in enumerate(row):
            grid.paste(tile, (column * side, row_index * side))
    return grid


def main(argv: Optional[Sequence[str]] = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "emoji_quality")
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS,
                        help=f"named cache settings of tests/accuracy_data.py (default: {' '.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--num_prompts", type=int, default=32, help="held-out prompts (at most 32)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--gallery", type=Path,
                        help="also write a PNG grid: real renders, then each setting, for the first 8 prompts")
    args = parser.parse_args(argv)
    if "baseline" not in args.settings:
        parser.error("--settings must include baseline: every other setting is compared with it")
    if not 2 <= args.num_prompts <= 32:
        parser.error(f"--num_prompts must lie in [2, 32] (a Frechet distance needs 2 images), got {args.num_prompts}")
    images_dir, real_dir = args.out / "images", args.out / "real"
    prompts = write_real_renders(real_dir, args.num_prompts)
    redrawn_dir = args.out / "real_redrawn"
    write_real_renders(redrawn_dir, args.num_prompts, redraw_seed=1)
    generation.main(["--out", str(images_dir), "--num_prompts", str(args.num_prompts), "--settings", *args.settings])
    rows = scoring.main(["--images_dir", str(images_dir), "--clip_model", str(SHIPPED_JUDGE), "--frechet_features",
                         "clip", "--reference_dir", str(real_dir), "--json", str(args.out / "scores.json")])
    judge = scoring.CLIPScorer(SHIPPED_JUDGE)
    real, redrawn = (scoring.load_images(sorted(folder.glob("*.png"))[:args.num_prompts])
                     for folder in (real_dir, redrawn_dir))
    real_clip_score = float(np.mean(judge(redrawn, prompts)))
    real_frechet = scoring.fid_from_features(judge.image_embeds(redrawn), judge.image_embeds(real))
    manifest = json.loads((images_dir / generation.MANIFEST_NAME).read_text())
    text = table(rows, images_dir, manifest["generation"]["num_inference_steps"], real_clip_score, real_frechet)
    print("\n" + text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.gallery:
        gallery(images_dir, real_dir, args.settings, min(8, args.num_prompts)).save(args.gallery, optimize=True)
    return text


if __name__ == "__main__":
    main()
