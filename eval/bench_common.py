"""Inputs, timing, memory sampling and the ideal cached step, shared by the benchmark scripts."""

import os
import statistics
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import mindspore as ms
from mindspore import nn

from models.transformer_flux import embed_inputs, num_blocks, run_blocks
from pipeline_flux import latent_image_ids

STATM = Path("/proc/self/statm")
STATUS = Path("/proc/self/status")


def flux_inputs(config: dict, image_size: Tuple[int, int], text_tokens: int, batch_size: int,
                seed: int = 0) -> Dict[str, Optional[np.ndarray]]:
    """Random packed latents and text features with Flux's position ids for an image size in pixels
    (8x VAE downsampling, 2x2 packing: one token per 16x16 pixels)."""
    rng = np.random.default_rng(seed)
    rows, cols = image_size[0] // 16, image_size[1] // 16
    inputs = dict(
        hidden_states=rng.standard_normal((batch_size, rows * cols, config["in_channels"])),
        encoder_hidden_states=rng.standard_normal((batch_size, text_tokens, config["joint_attention_dim"])),
        pooled_projections=rng.standard_normal((batch_size, config["pooled_projection_dim"])),
        timestep=np.full(batch_size, 0.5),
        img_ids=latent_image_ids(rows, cols),
        txt_ids=np.zeros((text_tokens, 3)),
        guidance=np.full(batch_size, 3.5) if config.get("guidance_embeds") else None,
    )
    return {name: None if value is None else value.astype(np.float32) for name, value in inputs.items()}


def to_mindspore(inputs: Dict[str, Optional[np.ndarray]]) -> Dict[str, Optional[ms.Tensor]]:
    return {name: None if value is None else ms.Tensor(value) for name, value in inputs.items()}


def timed(call: Callable[[], object]) -> float:
    """Seconds for one call; the call must block until its result is on the host (e.g. `.asnumpy()`)."""
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def time_calls(call: Callable[[], object], repeats: int, label: str) -> dict:
    """First call (compile + run) and the median of `repeats` further calls, with progress lines."""
    first = timed(call)
    print(f"  {label}: first call (compile + run) {first:.2f} s", flush=True)
    times: List[float] = []
    for index in range(repeats):
        times.append(timed(call))
        print(f"  {label}: call {index + 1}/{repeats} {times[-1]:.3f} s", flush=True)
    return {"first_call_s": first, "median_s": statistics.median(times)}


class AlwaysComputedPart(nn.Cell):
    """The part of a cached step that no cache can skip: embeddings, first Fn and last Bn blocks, head."""

    def __init__(self, model, fn_compute_blocks: int, bn_compute_blocks: int):
        super().__init__()
        self.model = model
        self.fn, self.bn = fn_compute_blocks, bn_compute_blocks

    def construct(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                  guidance=None):
        model = self.model
        hidden_states, encoder_hidden_states, temb, rotary = embed_inputs(
            model, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids, guidance)
        end = num_blocks(model)
        encoder_hidden_states, hidden_states = run_blocks(
            model, 0, self.fn, hidden_states, encoder_hidden_states, temb, rotary)
        encoder_hidden_states, hidden_states = run_blocks(
            model, end - self.bn, end, hidden_states, encoder_hidden_states, temb, rotary)
        return (model.proj_out(model.norm_out(hidden_states, temb)),)


class PeakHostMemory:
    """Peak resident memory of this process while the `with` block runs, sampled by a thread.

    getrusage's maxrss only ever grows over the whole process, so it cannot tell one benchmark row's
    peak from an earlier one's; sampling /proc/self/statm (Linux, which Ascend hosts run) can.
    """

    def __init__(self, interval_s: float = 0.01):
        if not STATM.is_file():
            raise RuntimeError(f"{STATM} is missing: peak host memory sampling needs Linux /proc")
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def resident_bytes() -> int:
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    @staticmethod
    def high_water_bytes() -> int:
        """The whole process's peak resident set so far (VmHWM): for a script that measures one process
        from its start, where no sampling thread could miss a short peak."""
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError(f"{STATUS} has no VmHWM line: peak memory needs Linux /proc")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.resident_bytes())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakHostMemory":
        self.peak_bytes = self.resident_bytes()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self.resident_bytes())
