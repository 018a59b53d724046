"""eval/bench_pipeline_memory.py: stages, forced pattern and the needed-bytes arithmetic, and its input errors."""

import numpy as np
import pytest

from eval import bench_pipeline_memory
from models.demo_configs import TRANSFORMER_CONFIGS

STEPS, COMPUTED_STEPS, IMAGE_SIZE = 3, 1, 64


def demo_transformer_bytes() -> int:
    """fp32 bytes of the demo transformer's weights, counted independently of the script (numpy shapes of a
    freshly built model)."""
    from models.transformer_flux import FluxTransformer2DModel

    model = FluxTransformer2DModel(**TRANSFORMER_CONFIGS["demo"])
    return sum(int(np.prod(parameter.shape)) * 4 for parameter in model.get_parameters())


def test_stages_pattern_and_arithmetic(capsys):
    row = bench_pipeline_memory.main(["--config", "demo", "--image_size", str(IMAGE_SIZE), "--steps", str(STEPS),
                                      "--computed_steps", str(COMPUTED_STEPS)])
    printed = capsys.readouterr().out
    assert row["cached"] == [False] * COMPUTED_STEPS + [True] * (STEPS - COMPUTED_STEPS)
    resident = row["resident"]
    assert list(resident) == list(bench_pipeline_memory.STAGES)
    values = [resident[stage] for stage in bench_pipeline_memory.STAGES]
    assert row["peak"] >= max(values)
    assert row["weights"]["transformer"] == demo_transformer_bytes()
    assert row["cache_state"] > 0 and all(size > 0 for size in row["activations"].values())
    needed = sum(row["weights"].values()) + max(row["activations"].values()) + row["cache_state"]
    assert f"peak / needed = {row['peak'] / needed:.2f}" in printed
    for stage in bench_pipeline_memory.STAGES:
        assert f"| {stage} | {resident[stage] / bench_pipeline_memory.GIB:.2f} |" in printed


@pytest.mark.parametrize("steps, computed_steps", [(4, 0), (4, 3), (3, 2)])
def test_computed_steps_must_leave_a_later_cached_step(steps, computed_steps, capsys):
    with pytest.raises(SystemExit):
        bench_pipeline_memory.parse_args(["--steps", str(steps), "--computed_steps", str(computed_steps)])
    assert "--computed_steps must be at least 1 and below --steps - 1" in capsys.readouterr().err


def test_image_size_must_fit_the_latent_grid(capsys):
    with pytest.raises(SystemExit):
        bench_pipeline_memory.parse_args(["--image_size", "100"])
    err = capsys.readouterr().err
    assert "--image_size must be positive multiples of 16" in err and "got 100 100" in err
