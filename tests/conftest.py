"""Shared fixtures: MindSpore execution mode and the MindSpore side of parity comparisons."""

import os

# No model hub here: tokenizers and models must load from local folders only. Set before
# huggingface_hub is first imported (it reads the variable once, at import).
os.environ["HF_HUB_OFFLINE"] = "1"
# The pipelines' persistent compile cache (models/compile_cache.py) goes to a folder of this run, shared by
# the workers and the CLI processes the tests start, never to the user's ~/.cache.
if "FLUX_MS_COMPILE_CACHE" not in os.environ:
    import tempfile
    os.environ["FLUX_MS_COMPILE_CACHE"] = os.path.join(tempfile.gettempdir(), f"flux-ms-test-cache-{os.getppid()}")

from typing import Dict, Optional

import numpy as np
import pytest

import mindspore as ms

MODES = {"graph": ms.GRAPH_MODE, "pynative": ms.PYNATIVE_MODE}


@pytest.fixture(autouse=True)
def cpu_graph_mode():
    """Every test starts in graph mode on CPU; tests that need PyNative switch explicitly."""
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    yield


def set_mode(name: str) -> None:
    ms.set_context(mode=MODES[name])


def ms_forward(model, inputs: Dict[str, Optional[np.ndarray]]) -> np.ndarray:
    """Run a MindSpore Flux transformer on numpy inputs; fp32 numpy output."""
    tensors = {name: None if value is None else ms.Tensor(value) for name, value in inputs.items()}
    (sample,) = model(**tensors)
    return sample.astype(ms.float32).asnumpy()
