"""Shared fixtures: MindSpore execution mode and the MindSpore side of parity comparisons."""

import gc
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


@pytest.fixture(scope="module", autouse=True)
def recycle_compiled_graphs():
    """Each test file's compiled graphs and their runtime memory are released when the file ends
    (`ms.ms_memory_recycle`, meant for processes that run many models): a pytest worker runs dozens of
    files in one process, and two full runs had a worker crash inside a MindSpore compile late in its life
    (test_cache_peers_table, test_generate_msrun) while each file passed on its own."""
    yield
    gc.collect()
    ms.ms_memory_recycle()


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
