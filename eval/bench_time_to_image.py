"""Our main job against what a user would otherwise run (torch diffusers), side by side.

    python eval/bench_time_to_image.py [--repeats 3] [--images 8] [--out eval/results/time_to_image]

The main job is eval/run_flux_withFBCache_pipeline.py with no arguments: the shipped emoji Flux
(assets/flux-emoji), 128x128, 28 steps, true CFG 4 against "", seed 0, First-Block Cache threshold
0.08. The torch side is eval/diffusers_main_job.py: the same job in diffusers' FluxPipeline (float32,
the same T5 length and the same initial noise), with or without diffusers' own First Block Cache at
the same threshold.

1. Whole processes, time to the first image: wall time from spawning the process to its exit (the PNG
   written), round-robin over four runs for --repeats rounds (each round starts one run later):
   ours with a cold compile cache (a fresh empty $FLUX_MS_COMPILE_CACHE per run), ours with a warm one
   (filled by one untimed run first), diffusers without a cache and with FirstBlockCache. One untimed
   diffusers run comes first as well, so both sides start with their files in the page cache.
2. Images per minute in one warm process: each side in its own subprocess (`--worker ours|diffusers`)
   generates one untimed image per setting (ours compiles its graphs there), then --images prompts of
   the emoji world one by one (prompt i with seed i), cached and uncached alternately.

Both sides keep their framework's default thread count (what a user gets); the table says how many.
Prints a markdown table and writes it to <--out>.md, and every raw sample to <--out>.json. Progress
goes to stderr as each sample finishes.
"""

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from cache_config import FBCacheConfig  # noqa: E402 (imports no MindSpore)

CLI = REPO_ROOT / "eval" / "run_flux_withFBCache_pipeline.py"
DIFFUSERS_JOB = REPO_ROOT / "eval" / "diffusers_main_job.py"
DEFAULT_OUT = REPO_ROOT / "eval" / "results" / "time_to_image"
# The CLI's default threshold (a test keeps them equal): the main job runs the CLI without arguments.
THRESHOLD = FBCacheConfig().residual_diff_threshold
PROCESS_TIMEOUT_S = 1800
# Captions of the emoji world the shipped model was trained on (train/scenes.py: emoji, size, position,
# plain or gradient background); the first is the CLI's default prompt.
PROMPTS = (
    "a large red apple in the center, on a white background",
    "a small fox at the top right, on a yellow background",
    "a penguin on the left, on a light blue background",
    "a large sun at the top left, on a dark blue background",
    "a watermelon at the bottom, on a pink background",
    "a small rocket in the center and a star at the top right, on a black background",
    "a cactus at the bottom left, on an orange background",
    "a large frog in the center, on a white to green gradient background",
)
# Whole-process runs: key -> label.
PROCESS_RUNS = {
    "ours_cold": "ours, cold compile cache",
    "ours_warm": "ours, warm compile cache",
    "diffusers": "diffusers, no cache",
    "diffusers_fbcache": f"diffusers + FirstBlockCache {THRESHOLD:g}",
}
# In-process settings: (side, mode) -> label.
WORKER_SETTINGS = {
    ("ours", "cached"): f"ours, First-Block Cache {THRESHOLD:g}",
    ("ours", "uncached"): "ours, no cache",
    ("diffusers", "cached"): f"diffusers, FirstBlockCache {THRESHOLD:g}",
    ("diffusers", "uncached"): "diffusers, no cache",
}
MODES = ("cached", "uncached")


def progress(message: str) -> None:
    print(f"[time-to-image] {message}", file=sys.stderr, flush=True)


# ----- arguments -----

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds of the four whole-process runs (median and min per run; default 3)")
    parser.add_argument("--images", type=int, default=8,
                        help=f"timed images per setting in the warm processes (default 8; the {len(PROMPTS)} "
                             "prompts repeat beyond that)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="path without suffix: writes <out>.md (the table) and <out>.json (all samples); "
                             "default eval/results/time_to_image")
    parser.add_argument("--worker", choices=("ours", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", type=Path, help=argparse.SUPPRESS)
    return parser


def output_paths(out: Path) -> Dict[str, Path]:
    stem = out.with_suffix("") if out.suffix in (".md", ".json") else out
    return {"md": stem.with_name(stem.name + ".md"), "json": stem.with_name(stem.name + ".json")}


def check_writable(parser: argparse.ArgumentParser, out: Path) -> None:
    paths = output_paths(out)
    folder = paths["md"].parent
    if folder.exists() and not folder.is_dir():
        parser.error(f"--out {out}: {folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as error:
        parser.error(f"--out {out}: cannot write to {folder}: {error.strerror or error}")
    for path in paths.values():
        if path.is_dir():
            parser.error(f"--out {out}: {path} is a folder")


def parse_args(argv=None) -> argparse.Namespace:
    """Every argument checked before any work."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    if args.worker is not None:
        if args.worker_out is None:
            parser.error("--worker needs --worker_out")
    else:
        check_writable(parser, args.out)
    return args


# ----- parsing what the processes print -----

TIME_LINE = re.compile(r"^time: (?P<rest>.*)$", re.M)
TIME_PART = re.compile(r"^(?P<name>[a-z +]+?) (?P<seconds>-?[\d.]+) s$")
FBCACHE_LINE = re.compile(r"^FBCache (?P<branch>\S+): (?P<steps>\d+) steps, (?P<computed>\d+) computed, "
                          r"(?P<cached>\d+) cached", re.M)
TOTAL_LINE = re.compile(r"^\[(?P<label>[^\]]+)\] total (?P<seconds>[\d.]+) s$", re.M)
WROTE_LINE = re.compile(r"^wrote (?P<path>.+)$", re.M)


def parse_cli_stdout(text: str) -> dict:
    """The phase times (`time: import + load 1.75 s, compile ...` -> {"import + load": 1.75, ...}), the
    cache's step counts per branch, the generation's total and the PNGs written, from our CLI's stdout."""
    match = TIME_LINE.search(text)
    if match is None:
        raise ValueError(f"no 'time: ...' line in the CLI's output: {text[-800:]!r}")
    times = {}
    for part in match["rest"].split(", "):
        found = TIME_PART.match(part.strip())
        if found is None:
            raise ValueError(f"cannot read {part!r} of the CLI's line {match[0]!r}")
        times[found["name"]] = float(found["seconds"])
    return dict(
        times_s=times,
        fbcache={found["branch"]: {key: int(found[key]) for key in ("steps", "computed", "cached")}
                 for found in FBCACHE_LINE.finditer(text)},
        generate_s={found["label"]: float(found["seconds"]) for found in TOTAL_LINE.finditer(text)},
        wrote=[found["path"].strip() for found in WROTE_LINE.finditer(text)],
    )


def parse_job_stdout(text: str) -> dict:
    """The JSON line eval/diffusers_main_job.py prints last."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON line in diffusers_main_job's output: {text[-800:]!r}")


# ----- whole processes -----

def process_command(run: str, save_path: Path) -> List[str]:
    if run.startswith("ours"):
        return [sys.executable, str(CLI), "--save_path", str(save_path), "--overwrite"]
    command = [sys.executable, str(DIFFUSERS_JOB), "--save_path", str(save_path)]
    return command + (["--fbcache", f"{THRESHOLD:g}"] if run == "diffusers_fbcache" else [])


def base_environment() -> Dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("FLUX_MS_COMPILE_CACHE", None)
    return env


def run_process(run: str, scratch: Path, compile_cache: Optional[Path]) -> dict:
    """Spawn one run, wait for its exit; wall seconds from spawn to exit, and what it printed, parsed."""
    save_path = Path(tempfile.mkdtemp(prefix="png-", dir=scratch))
    env = base_environment()
    if compile_cache is not None:
        env["FLUX_MS_COMPILE_CACHE"] = str(compile_cache)
    command = process_command(run, save_path)
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                            timeout=PROCESS_TIMEOUT_S)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} exited with {result.returncode}:\n"
                         f"{result.stdout[-2000:]}\n{result.stderr[-3000:]}")
    pngs = sorted(path.name for path in save_path.glob("*.png"))
    if not pngs:
        raise SystemExit(f"error: {' '.join(command)} wrote no PNG into {save_path}:\n{result.stdout[-2000:]}")
    parsed = parse_cli_stdout(result.stdout) if run.startswith("ours") else parse_job_stdout(result.stdout)
    shutil.rmtree(save_path, ignore_errors=True)
    return dict(run=run, wall_s=wall, pngs=pngs, parsed=parsed)


def describe_process(sample: dict) -> str:
    parsed = sample["parsed"]
    times = parsed["times_s"]
    counts = next(iter((parsed.get("fbcache") or parsed.get("fbcache_steps") or {}).values()), None)
    inside = ", ".join(f"{name} {value:.2f}" for name, value in times.items() if name not in ("total", "save"))
    computed = f"; {counts['computed']}/{counts['steps']} steps computed" if counts else ""
    return f"{sample['wall_s']:.2f} s ({inside}{computed})"


def time_processes(repeats: int, scratch: Path) -> List[dict]:
    """Untimed warm-ups (ours fills the warm compile cache), then `repeats` round-robin rounds."""
    warm_cache = scratch / "warm-compile-cache"
    warm_cache.mkdir()
    progress("untimed: ours once, filling the warm compile cache ...")
    warm_up = run_process("ours_warm", scratch, warm_cache)
    progress(f"untimed: ours (filling the cache) {describe_process(warm_up)}")
    progress("untimed: diffusers once, so both sides start with their files in the page cache ...")
    warm_up = run_process("diffusers", scratch, None)
    progress(f"untimed: diffusers {describe_process(warm_up)}")
    runs, samples = list(PROCESS_RUNS), []
    for round_index in range(repeats):
        start = round_index % len(runs)
        for run in runs[start:] + runs[:start]:
            cache = None
            if run == "ours_cold":
                cache = Path(tempfile.mkdtemp(prefix="cold-compile-cache-", dir=scratch))
            elif run == "ours_warm":
                cache = warm_cache
            sample = dict(round=round_index + 1, **run_process(run, scratch, cache))
            if run == "ours_cold":
                shutil.rmtree(cache, ignore_errors=True)
            samples.append(sample)
            progress(f"round {round_index + 1}/{repeats}: {PROCESS_RUNS[run]}: {describe_process(sample)}")
    return samples


# ----- images per minute in one process (workers) -----

def worker_ours(images: int) -> dict:
    """Our pipeline in graph mode, as the CLI loads it (its compile cache in the fresh folder the parent
    gives in $FLUX_MS_COMPILE_CACHE: the warm-up compiles every graph)."""
    from eval.cli_common import quiet_imports
    from eval.diffusers_main_job import generation_settings
    from models.embedded import SHIPPED_PIPELINE

    with quiet_imports(False):
        import mindspore as ms
        from pipeline_flux import FluxPipeline
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    pipeline = FluxPipeline.from_pretrained(str(SHIPPED_PIPELINE))
    caches = {"cached": FBCacheConfig(residual_diff_threshold=THRESHOLD), "uncached": None}
    settings = generation_settings()

    def generate(mode: str, index: int, seed: int) -> dict:
        started = time.perf_counter()
        output = pipeline(PROMPTS[index % len(PROMPTS)], seed=seed, cache=caches[mode], **settings)
        seconds = time.perf_counter() - started
        steps = {branch: dict(steps=summary["steps"], computed=summary["steps_computed"],
                              cached=summary["steps_cached"]) for branch, summary in output.cache_summaries.items()}
        return dict(seconds=seconds, steps=steps, phases_s=dict(pipeline.timings))

    report = worker_loop("ours", images, generate)
    report.update(threads=ms.get_context("runtime_num_threads"), thread_setting="MindSpore runtime_num_threads",
                  versions={"mindspore": ms.__version__})
    return report


def worker_diffusers(images: int) -> dict:
    """diffusers' FluxPipeline, FirstBlockCache switched on and off between images."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    import diffusers
    import torch
    from diffusers import FirstBlockCacheConfig

    from eval.diffusers_main_job import ComputedStepCounter, PhaseTimer, generate as generate_image, load_pipeline

    pipeline = load_pipeline()
    counter, phases = ComputedStepCounter(pipeline.transformer), PhaseTimer(pipeline)

    def generate(mode: str, index: int, seed: int) -> dict:
        if mode == "cached":
            pipeline.transformer.enable_cache(FirstBlockCacheConfig(threshold=THRESHOLD))
        counter.reset()
        phases.reset()
        try:
            started = time.perf_counter()
            generate_image(pipeline, PROMPTS[index % len(PROMPTS)], seed)
            seconds = time.perf_counter() - started
        finally:
            if mode == "cached":
                pipeline.transformer.disable_cache()
        times = dict(phases.seconds, denoise=seconds - sum(phases.seconds.values()))
        return dict(seconds=seconds, steps=counter.summary() if mode == "cached" else {}, phases_s=times)

    report = worker_loop("diffusers", images, generate)
    report.update(threads=torch.get_num_threads(), thread_setting="torch.get_num_threads()",
                  versions={"torch": torch.__version__, "diffusers": diffusers.__version__})
    return report


def worker_loop(side: str, images: int, generate) -> dict:
    """One untimed image per setting, then `images` timed ones per setting, alternating which goes first."""
    warmup = {}
    for mode in MODES:
        warmup[mode] = generate(mode, 0, 0)["seconds"]
        progress(f"{WORKER_SETTINGS[side, mode]}: untimed warm-up image {warmup[mode]:.2f} s")
    samples = []
    for index in range(images):
        for mode in (MODES if index % 2 == 0 else MODES[::-1]):
            sample = dict(side=side, mode=mode, index=index, seed=index, prompt=PROMPTS[index % len(PROMPTS)],
                          **generate(mode, index, index))
            samples.append(sample)
            computed = next(iter(sample["steps"].values()), None)
            counts = f" ({computed['computed']}/{computed['steps']} steps computed)" if computed else ""
            inside = ", ".join(f"{name} {value:.2f}" for name, value in sample["phases_s"].items())
            progress(f"{WORKER_SETTINGS[side, mode]}: image {index + 1}/{images} {sample['seconds']:.2f} s "
                     f"({inside}){counts}")
    return dict(warmup_s=warmup, samples=samples)


def run_worker(side: str, images: int, scratch: Path) -> dict:
    out = scratch / f"worker-{side}.json"
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--images", str(images),
               "--worker_out", str(out)]
    progress(f"{side}: one process, {images} image(s) per setting after a warm-up ...")
    env = base_environment()
    if side == "ours":
        env["FLUX_MS_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="worker-compile-cache-", dir=scratch)
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT,
                            timeout=PROCESS_TIMEOUT_S + 120 * images)
    if result.returncode != 0 or not out.is_file():
        raise SystemExit(f"error: the {side} worker exited with {result.returncode}:\n{result.stdout[-2000:]}")
    return json.loads(out.read_text())


# ----- the table -----

def stats(values: Sequence[float]) -> dict:
    return dict(median=statistics.median(values), min=min(values), n=len(values))


def summarise(processes: List[dict], workers: Dict[str, dict]) -> dict:
    """Medians and mins per whole-process run, seconds per image and images per minute per setting, and
    the ratios: time ratios ours / diffusers (< 1: ours is faster), images-per-minute ratios ours /
    diffusers (> 1: ours is faster), cache speedups uncached / cached seconds per image."""
    time_to_image = {run: stats([s["wall_s"] for s in processes if s["run"] == run])
                     for run in PROCESS_RUNS if any(s["run"] == run for s in processes)}
    per_image = {}
    for (side, mode) in WORKER_SETTINGS:
        seconds = [s["seconds"] for s in workers.get(side, {}).get("samples", []) if s["mode"] == mode]
        if seconds:
            per_image[f"{side}_{mode}"] = dict(seconds_per_image=stats(seconds),
                                               images_per_minute=60.0 / statistics.median(seconds))
    ratios = {}

    def time_ratio(name: str, ours: str, theirs: str) -> None:
        if ours in time_to_image and theirs in time_to_image:
            ratios[name] = time_to_image[ours]["median"] / time_to_image[theirs]["median"]

    time_ratio("ours_cold_over_diffusers", "ours_cold", "diffusers")
    time_ratio("ours_cold_over_diffusers_fbcache", "ours_cold", "diffusers_fbcache")
    time_ratio("ours_warm_over_diffusers", "ours_warm", "diffusers")
    time_ratio("ours_warm_over_diffusers_fbcache", "ours_warm", "diffusers_fbcache")

    def ipm(key: str) -> Optional[float]:
        return per_image[key]["images_per_minute"] if key in per_image else None

    for name, ours, theirs in (("ipm_ours_cached_over_diffusers_cached", "ours_cached", "diffusers_cached"),
                               ("ipm_ours_uncached_over_diffusers_uncached", "ours_uncached", "diffusers_uncached"),
                               ("ipm_ours_cached_over_diffusers_uncached", "ours_cached", "diffusers_uncached"),
                               ("cache_speedup_ours", "ours_cached", "ours_uncached"),
                               ("cache_speedup_diffusers", "diffusers_cached", "diffusers_uncached")):
        if ipm(ours) is not None and ipm(theirs) is not None:
            ratios[name] = ipm(ours) / ipm(theirs)
    return dict(time_to_image=time_to_image, per_image=per_image, ratios=ratios)


def faster(ratio: float, lower_is_ours: bool) -> str:
    """`ratio` with who is faster by how much, for a time ratio (ours / theirs) or a rate ratio."""
    ours_faster = ratio < 1 if lower_is_ours else ratio > 1
    factor = 1 / ratio if (ratio < 1) else ratio
    if abs(factor - 1) < 0.005:
        return f"{ratio:.2f} (even)"
    return f"{ratio:.2f} ({'ours' if ours_faster else 'diffusers'} {factor:.2f}x faster)"


def steps_text(steps: Optional[dict]) -> str:
    if not steps:
        return "-"
    return ", ".join(f"{branch} {counts['computed']}/{counts['steps']}" for branch, counts in steps.items())


def process_steps(samples: List[dict], run: str) -> Optional[dict]:
    for sample in samples:
        if sample["run"] == run:
            parsed = sample["parsed"]
            return parsed["fbcache"] if run.startswith("ours") else parsed.get("fbcache_steps")
    return None


def inside_medians(samples: List[dict], run: str) -> str:
    """Median of each phase the process reported for itself."""
    chosen = [s["parsed"]["times_s"] for s in samples if s["run"] == run]
    if not chosen:
        return "-"
    names = [name for name in chosen[0] if name not in ("total",)]
    return ", ".join(f"{name} {statistics.median(times[name] for times in chosen):.2f}" for name in names)


def render_markdown(report: dict) -> str:
    summary, machine = report["summary"], report["machine"]
    workers, processes = report["workers"], report["processes"]
    ours_threads = workers.get("ours", {}).get("threads", "?")
    torch_threads = workers.get("diffusers", {}).get("threads", "?")
    versions = {**workers.get("ours", {}).get("versions", {}), **workers.get("diffusers", {}).get("versions", {})}
    lines = [
        "# Time to image: ours (MindSpore graph mode + First-Block Cache) against torch diffusers",
        "",
        f"- Machine: {machine['cpu_count']} CPUs (`os.cpu_count()`), {machine['platform']}, Python "
        f"{machine['python']}; load average {machine['loadavg_start']} at the start, {machine['loadavg_end']} "
        "at the end",
        f"- Date: {report['date']}; commit {report['commit']}",
        f"- Command: `{report['command']}`",
        f"- Job: the shipped emoji Flux (assets/flux-emoji), 128x128, 28 steps, true CFG 4 against \"\", "
        f"threshold {THRESHOLD:g} on both sides, the same initial noise per seed; "
        + ", ".join(f"{name} {version}" for name, version in versions.items()),
        f"- Threads: ours {ours_threads} (MindSpore's default `runtime_num_threads`, read in the worker; the "
        f"CLI sets none), diffusers {torch_threads} (torch's default `torch.get_num_threads()`)",
        "",
        f"## Whole process, time to the first image ({report['repeats']} round(s), round-robin)",
        "",
        "Wall time from spawning the process to its exit, the PNG written. Inside: the phases the process "
        "reports for itself (medians, s).",
        "",
        "| run | median s | min s | runs | inside the process | steps computed |",
        "|---|---:|---:|---:|---|---|",
    ]
    for run, row in summary["time_to_image"].items():
        lines.append(f"| {PROCESS_RUNS[run]} | {row['median']:.2f} | {row['min']:.2f} | {row['n']} | "
                     f"{inside_medians(processes, run)} | {steps_text(process_steps(processes, run))} |")
    images = report["images"]
    lines += [
        "",
        f"## Images per minute in one warm process ({images} image(s) per setting)",
        "",
        "One process per side; one untimed image per setting first (ours compiles its graphs there), then "
        "prompt i with seed i, cached and uncached alternately. Each image is a whole pipeline call "
        "(encode, denoise, decode).",
        "",
        "| setting | median s/image | min s/image | images/min | steps computed (first image) |",
        "|---|---:|---:|---:|---|",
    ]
    for (side, mode), label in WORKER_SETTINGS.items():
        row = summary["per_image"].get(f"{side}_{mode}")
        if row is None:
            continue
        first = next((s for s in workers[side]["samples"] if s["mode"] == mode), {})
        lines.append(f"| {label} | {row['seconds_per_image']['median']:.3f} | {row['seconds_per_image']['min']:.3f} "
                     f"| {row['images_per_minute']:.1f} | {steps_text(first.get('steps'))} |")
    ratios = summary["ratios"]
    rows = [
        ("ours_cold_over_diffusers", "time to first image: ours cold / diffusers, no cache", True),
        ("ours_cold_over_diffusers_fbcache", "time to first image: ours cold / diffusers + FirstBlockCache", True),
        ("ours_warm_over_diffusers", "time to first image: ours warm / diffusers, no cache", True),
        ("ours_warm_over_diffusers_fbcache", "time to first image: ours warm / diffusers + FirstBlockCache", True),
        ("ipm_ours_cached_over_diffusers_cached", "images/min: ours cached / diffusers FirstBlockCache", False),
        ("ipm_ours_uncached_over_diffusers_uncached", "images/min: ours uncached / diffusers uncached", False),
        ("ipm_ours_cached_over_diffusers_uncached", "images/min: ours cached / diffusers uncached", False),
    ]
    lines += ["", "## Ratios", "", "| comparison | ratio |", "|---|---|"]
    lines += [f"| {label} | {faster(ratios[key], lower)} |" for key, label, lower in rows if key in ratios]
    for key, label in (("cache_speedup_ours", "our cache: cached / uncached images per minute"),
                       ("cache_speedup_diffusers", "diffusers' cache: cached / uncached images per minute")):
        if key in ratios:
            lines.append(f"| {label} | {ratios[key]:.2f}x |")
    return "\n".join(lines) + "\n"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=REPO_ROOT, timeout=30).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker is not None:
        report = (worker_ours if args.worker == "ours" else worker_diffusers)(args.images)
        args.worker_out.write_text(json.dumps(report))
        return
    paths = output_paths(args.out)
    arguments = sys.argv[1:] if argv is None else list(argv)
    command = shlex.join(["python", "eval/bench_time_to_image.py", *arguments])
    report = dict(command=command, date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  commit=git_commit(), repeats=args.repeats, images=args.images, threshold=THRESHOLD,
                  machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
                               loadavg_start=loadavg(), omp_num_threads=os.environ.get("OMP_NUM_THREADS")))
    with tempfile.TemporaryDirectory(prefix="time-to-image-") as scratch:
        report["processes"] = time_processes(args.repeats, Path(scratch))
        report["workers"] = {side: run_worker(side, args.images, Path(scratch)) for side in ("ours", "diffusers")}
    report["machine"]["loadavg_end"] = loadavg()
    report["summary"] = summarise(report["processes"], report["workers"])
    table = render_markdown(report)
    paths["json"].write_text(json.dumps(report, indent=1))
    paths["md"].write_text(table)
    print(table)
    progress(f"wrote {paths['md']} and {paths['json']}")


if __name__ == "__main__":
    main()
