"""Score the image sets of tests/generate_clip_score_datas.py: CLIP score, FID, PSNR and SSIM per cache setting.

    python tests/flux_accuracy_test.py --images_dir accuracy_images --clip_model /path/to/clip-vit-large-patch14 \
        --inception_weights /path/to/inception_v3-38f67890.ckpt --json scores.json

For every `<setting>/<H>x<W>` folder: the mean CLIP score of each image with its prompt (needs
--clip_model), the FID against the baseline setting's images of the same size, or against
--reference_dir's real images (needs --inception_weights), and the mean PSNR and SSIM against the
baseline image of the same name (no weights needed). Prints a Markdown table; --json writes it as JSON.

FID from mindcv's ImageNet Inception compares cache settings scored with the same weights; it is not
comparable with published (pytorch-fid) FID numbers, and it is biased upwards for small sets (its
covariances need many more images than 2048 feature dimensions to be well estimated).
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import mindspore as ms  # noqa: E402

from eval.feature_extractors import CLIPScorer, InceptionFeatureExtractor, clip_folder  # noqa: E402
from eval.image_metrics import fid_from_features, psnr, ssim  # noqa: E402
from generate_clip_score_datas import MANIFEST_NAME  # noqa: E402
from models.loading import CheckpointError  # noqa: E402

REFERENCE_SUFFIXES = (".png", ".jpg", ".jpeg")
FID_NOTE = ("FID uses mindcv's ImageNet Inception: comparable between settings scored with the same weights, "
            "not with published pytorch-fid numbers")

CLIP_FRECHET_NOTE = ("FID column: Frechet distance of the --clip_model's image features (--frechet_features clip), "
                     "comparable only between sets scored with the same CLIP model")
FeatureExtractor = Callable[[Sequence[Image.Image]], np.ndarray]

# {setting: {resolution "HxW": {image file name: path}}}
ImageSets = Dict[str, Dict[str, Dict[str, Path]]]


@dataclass
class Row:
    setting: str
    resolution: str
    images: int
    clip_score: Optional[float] = None
    fid: Optional[float] = None
    psnr: Optional[float] = None
    ssim: Optional[float] = None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images_dir", type=Path, required=True, help="--out folder of generate_clip_score_datas.py")
    parser.add_argument("--baseline", default="baseline", help="setting the others are compared with")
    parser.add_argument("--clip_model", type=Path, help="transformers CLIPModel folder; CLIP score is skipped without")
    parser.add_argument("--inception_weights", type=Path,
                        help="mindcv inception_v3 ImageNet .ckpt; FID is skipped without")
    parser.add_argument("--reference_dir", type=Path,
                        help="real images (png/jpg) to compute FID against instead of the baseline setting")
    parser.add_argument("--frechet_features", choices=["inception", "clip"], default="inception",
                        help="features of the Frechet distance: Inception (FID, --inception_weights) or the "
                             "--clip_model's image features (e.g. the shipped emoji judge: an FID of its world)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device_target", choices=["CPU", "GPU", "Ascend"], default="CPU")
    parser.add_argument("--use_graph_mode", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    if args.frechet_features == "clip" and args.clip_model is None:
        parser.error("--frechet_features clip uses the CLIP model's image features: give --clip_model too")
    if args.frechet_features == "clip" and args.inception_weights is not None:
        parser.error("--inception_weights is unused with --frechet_features clip: drop one of them")
    if args.reference_dir is not None and args.inception_weights is None and args.frechet_features != "clip":
        parser.error("--reference_dir is only used for FID: give --inception_weights (or --frechet_features clip)")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be >= 1, got {args.batch_size}")
    return args


def find_image_sets(images_dir: Path) -> ImageSets:
    """Every `<setting>/<resolution>/*.png` under `images_dir`."""
    return {
        setting.name: {
            resolution.name: {path.name: path for path in sorted(resolution.glob("*.png"))}
            for resolution in sorted(setting.iterdir()) if resolution.is_dir()
        }
        for setting in sorted(images_dir.iterdir()) if setting.is_dir()
    }


def check_image_sets(sets: ImageSets, baseline: str, images_dir: Path) -> None:
    """Every setting must have, per resolution, exactly the baseline's image names: PSNR, SSIM and a fair
    FID compare the same prompts and seeds."""
    if baseline not in sets:
        raise FileNotFoundError(f"{images_dir} has no '{baseline}/' folder (the --baseline setting); it has "
                                f"{sorted(sets) or 'no setting folders'}")
    for setting, resolutions in sets.items():
        for resolution, images in resolutions.items():
            if not images:
                raise FileNotFoundError(f"{images_dir / setting / resolution} holds no PNG images")
            reference = sets[baseline].get(resolution)
            if reference is None:
                raise FileNotFoundError(f"{setting}/{resolution} has no baseline counterpart: "
                                        f"{images_dir / baseline / resolution} does not exist")
            missing = sorted(set(reference) - set(images))
            extra = sorted(set(images) - set(reference))
            if missing or extra:
                raise ValueError(f"{images_dir / setting / resolution} does not match the baseline's images: "
                                 f"missing {missing}, not in the baseline {extra}; finish generating (the "
                                 "generator resumes) or remove them")


def read_manifest(images_dir: Path, sets: ImageSets) -> dict:
    """The generator's manifest, its prompts checked to cover every image index."""
    path = images_dir / MANIFEST_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: --images_dir must be an output folder of "
                                "generate_clip_score_datas.py (its manifest holds the prompts)")
    manifest = json.loads(path.read_text())
    prompts = manifest["prompts"]
    for setting, resolutions in sets.items():
        for resolution, images in resolutions.items():
            bad = [name for name in images if not name[:-4].isdigit() or int(name[:-4]) >= len(prompts)]
            if bad:
                raise ValueError(f"{images_dir / setting / resolution}: {bad} are not <prompt index>.png names "
                                 f"for the manifest's {len(prompts)} prompts")
    return manifest


def reference_images(folder: Path) -> List[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--reference_dir {folder} does not exist")
    paths = sorted(path for path in folder.iterdir() if path.suffix.lower() in REFERENCE_SUFFIXES)
    if len(paths) < 2:
        raise FileNotFoundError(f"--reference_dir {folder} holds {len(paths)} png/jpg images; FID needs at least 2")
    return paths


def load_images(paths: Sequence[Path]) -> List[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def pixel_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image, np.float64) / 255


def mean_pair_metrics(images: Sequence[Image.Image], baselines: Sequence[Image.Image]) -> Dict[str, float]:
    """Mean PSNR (inf as soon as one image equals its baseline) and mean SSIM, on pixels scaled to [0, 1]."""
    pairs = [(pixel_array(image), pixel_array(baseline)) for image, baseline in zip(images, baselines)]
    return {"psnr": float(np.mean([psnr(a, b) for a, b in pairs])),
            "ssim": float(np.mean([ssim(a, b) for a, b in pairs]))}


def score(args: argparse.Namespace, sets: ImageSets, prompts: List[str], clip: Optional[CLIPScorer],
          frechet: Optional[FeatureExtractor]) -> List[Row]:
    reference_features = None
    if frechet is not None and args.reference_dir is not None:
        reference_features = frechet(load_images(reference_images(args.reference_dir)))
    baseline_features: Dict[str, np.ndarray] = {}
    rows = []
    for setting in [args.baseline] + [name for name in sets if name != args.baseline]:
        for resolution, paths in sets[setting].items():
            names = sorted(paths)
            images = load_images([paths[name] for name in names])
            row = Row(setting, resolution, len(images))
            if clip is not None:
                row.clip_score = float(np.mean(clip(images, [prompts[int(name[:-4])] for name in names])))
            if frechet is not None:
                features = frechet(images)
                if setting == args.baseline:
                    baseline_features[resolution] = features
                reference = reference_features if reference_features is not None else baseline_features[resolution]
                if setting != args.baseline or reference_features is not None:
                    row.fid = fid_from_features(features, reference)
            if setting != args.baseline:
                baselines = load_images([sets[args.baseline][resolution][name] for name in names])
                metrics = mean_pair_metrics(images, baselines)
                row.psnr, row.ssim = metrics["psnr"], metrics["ssim"]
            print(f"scored {setting} {resolution}: {len(images)} images", flush=True)
            rows.append(row)
    return rows


def format_value(value: Optional[float], digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| setting | resolution | images | CLIP score | FID | PSNR (dB) | SSIM |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {row.setting} | {row.resolution} | {row.images} | {format_value(row.clip_score, 2)} | "
              f"{format_value(row.fid, 3)} | {format_value(row.psnr, 2)} | {format_value(row.ssim, 4)} |"
              for row in rows]
    return "\n".join(lines)


def json_value(value):
    """JSON has no inf/nan: a PSNR of identical images (inf) is written as the string "inf"."""
    return str(value) if isinstance(value, float) and not math.isfinite(value) else value


def main(argv: Optional[Sequence[str]] = None) -> List[Row]:
    args = parse_args(argv)
    if not args.images_dir.is_dir():
        raise FileNotFoundError(f"--images_dir {args.images_dir} does not exist")
    sets = find_image_sets(args.images_dir)
    check_image_sets(sets, args.baseline, args.images_dir)
    manifest = read_manifest(args.images_dir, sets)
    if args.clip_model is not None:
        clip_folder(args.clip_model)
    if args.inception_weights is not None and not args.inception_weights.is_file():
        raise FileNotFoundError(f"--inception_weights {args.inception_weights} does not exist")
    if args.inception_weights is not None or args.frechet_features == "clip":
        too_small = [f"{setting}/{resolution}" for setting, resolutions in sets.items()
                     for resolution, images in resolutions.items() if len(images) < 2]
        if too_small:
            raise ValueError(f"FID needs at least 2 images per set (a covariance); {too_small} have 1")
    if args.reference_dir is not None:
        reference_images(args.reference_dir)

    ms.set_context(mode=ms.GRAPH_MODE if args.use_graph_mode else ms.PYNATIVE_MODE, device_target=args.device_target)
    notes = []
    clip = frechet = None
    if args.clip_model is None:
        notes.append("CLIP score skipped: no --clip_model given")
    else:
        clip = CLIPScorer(args.clip_model, args.batch_size)
    reference = f"reference: {args.reference_dir or args.baseline + ' setting'}"
    if args.frechet_features == "clip":
        frechet = clip.image_embeds
        notes.append(f"{CLIP_FRECHET_NOTE}; {reference}")
    elif args.inception_weights is None:
        notes.append("FID skipped: no --inception_weights given")
    else:
        frechet = InceptionFeatureExtractor(args.inception_weights, args.batch_size)
        notes.append(f"{FID_NOTE}; {reference}")
    for note in notes:
        print(f"note: {note}", flush=True)

    rows = score(args, sets, manifest["prompts"], clip, frechet)
    print("\n" + markdown_table(rows))
    if args.json is not None:
        report = {"images_dir": str(args.images_dir), "baseline": args.baseline, "notes": notes,
                  "settings": manifest["settings"], "generation": manifest["generation"],
                  "rows": [{key: json_value(value) for key, value in asdict(row).items()} for row in rows]}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, CheckpointError, ValueError) as error:
        sys.exit(f"error: {error}")
