"""The embedded checkpoints every entry point runs without --ckpt, and their generation defaults.

- `emoji` (the default): the shipped small Flux trained on the emoji world (`train/`), committed under
  `assets/flux-emoji/`; it draws the backgrounds, colours and rough layout its prompts ask for (emoji as
  soft blobs), and its cache skips steps at realistic thresholds.
- `demo` and `mid`: RANDOM-weight pipelines in the same layout, created on first use under
  `checkpoints/` (parity tests, and `mid` for compute benchmarks); they draw noise.
"""

from pathlib import Path
from typing import Dict

from models.demo_configs import TRANSFORMER_CONFIGS

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_PIPELINE = REPO_ROOT / "assets" / "flux-emoji"
SHIPPED_JUDGE = REPO_ROOT / "assets" / "emoji-judge"
TRAINED = "emoji"
EMBEDDED = (TRAINED, *sorted(TRANSFORMER_CONFIGS))

# What each kind of checkpoint generates by default. The trained model was trained at 128x128 on 32
# padded T5 tokens (its tokenizer's model_max_length) with caption dropout, so it is guided by true CFG
# against the empty prompt (the CLI's negative prompt whenever true CFG is asked for without one).
GENERATION_DEFAULTS: Dict[str, dict] = {
    TRAINED: dict(image_size=(128, 128), num_inference_steps=28, true_cfg_scale=4.0,
                  prompt=["a large red apple in the center, on a white background"]),
    "random": dict(image_size=(256, 256), num_inference_steps=8, true_cfg_scale=1.0,
                   prompt=["A cat holding a sign that says hello world"]),
    "flux": dict(image_size=(1024, 1024), num_inference_steps=28, true_cfg_scale=1.0,
                 prompt=["A cat holding a sign that says hello world"]),
}


def embedded_checkpoint(name: str = TRAINED) -> Path:
    """The folder of the named embedded checkpoint (random ones are created on first use)."""
    if name == TRAINED:
        if not (SHIPPED_PIPELINE / "model_index.json").is_file():
            raise FileNotFoundError(f"the shipped trained checkpoint {SHIPPED_PIPELINE} is missing: restore it with "
                                    "`git checkout -- assets/`")
        return SHIPPED_PIPELINE
    if name not in TRANSFORMER_CONFIGS:
        raise ValueError(f"unknown embedded checkpoint {name!r}; choose one of {', '.join(EMBEDDED)}")
    from models.demo_checkpoint import ensure_demo_checkpoint  # imports MindSpore: only when one is needed

    return ensure_demo_checkpoint(REPO_ROOT / "checkpoints" / f"flux-{name}", name)


def generation_defaults(ckpt_given: bool, name: str = TRAINED) -> dict:
    """Defaults for --ckpt (FLUX.1 sizes), the trained embedded model, or a random embedded one."""
    if ckpt_given:
        return GENERATION_DEFAULTS["flux"]
    return GENERATION_DEFAULTS[TRAINED if name == TRAINED else "random"]
