"""Ship the trained runs: copy the pipeline folder and the judge into assets/, weights stored as fp16
(half the bytes; the loaders upcast to the dtype asked for), and collect the training statistics.

    python -m train.ship        # after train.vae, train.flux and train.judge
"""

import argparse
import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file

from models.embedded import SHIPPED_JUDGE, SHIPPED_PIPELINE
from train.common import REPO_ROOT, RUNS_DIR

TRAINING_STATS = REPO_ROOT / "assets" / "training_stats.json"


def copy_as_fp16(source: Path, target: Path) -> int:
    """Copy a model folder, floating-point safetensors converted to fp16; returns the bytes written."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(source, partial)
    for weights in partial.rglob("*.safetensors"):
        tensors = {name: tensor.half() if tensor.is_floating_point() else tensor
                   for name, tensor in load_file(weights).items()}
        save_file(tensors, weights, metadata={"format": "pt"})
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    return sum(path.stat().st_size for path in target.rglob("*") if path.is_file())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=RUNS_DIR)
    args = parser.parse_args(argv)
    sources = {"pipeline": args.runs / "flux" / "pipeline", "judge": args.runs / "judge" / "judge"}
    for name, source in sources.items():
        if not source.is_dir():
            parser.error(f"{source} is missing: run `python -m train.{'flux' if name == 'pipeline' else name}` first")
    sizes = {"pipeline_bytes": copy_as_fp16(sources["pipeline"], SHIPPED_PIPELINE),
             "judge_bytes": copy_as_fp16(sources["judge"], SHIPPED_JUDGE)}
    stats = {name: json.loads((args.runs / run / file).read_text()) for name, run, file in (
        ("vae", "vae", "vae_stats.json"), ("flux", "flux", "train_stats.json"), ("judge", "judge", "judge_stats.json"))}
    stats["shipped"] = sizes
    TRAINING_STATS.write_text(json.dumps(stats, indent=1) + "\n")
    print(f"shipped {SHIPPED_PIPELINE} ({sizes['pipeline_bytes'] / 1e6:.1f} MB) and {SHIPPED_JUDGE} "
          f"({sizes['judge_bytes'] / 1e6:.1f} MB); statistics in {TRAINING_STATS}")


if __name__ == "__main__":
    main()
