"""Our First-Block Cache against every peer cache accelerator, on the same shipped weights and prompts.

    python eval/cache_peers_table.py --out outputs/cache_peers --steps 28

Ours runs in MindSpore graph mode (pipeline_flux.FluxPipeline); the peers run in torch on the identical
diffusers folder (eval/peer_caches.py): diffusers' FirstBlockCache, TaylorSeerCache (default: attention
modules; lite: whole blocks) and MagCache (ratios calibrated on this model), and cache-dit's DBCache
(F1B0 and F2B0, with and without its TaylorSeer calibrator, and its steps-computation masks). Every
setting generates the held-out prompts with one fixed noise per prompt, true CFG, 128x128.

Per setting: the fraction of transformer-block FLOPs executed (counted in torch; for ours from the
blocks each step ran, with torch's per-block counts) and its inverse, the compute speedup; steps
computed per CFG branch; the wall-time speedup over the same framework's uncached run (median seconds
per image; compiles land in the first image); PSNR / SSIM against the same framework's uncached image;
the judge's CLIP score; the Frechet distance of the judge's image features to real renders.

Images and per-image records are written as they are made, so an interrupted run resumes where it
stopped. Outputs: steps<N>/results.json and steps<N>/table.md per step count, and psnr_vs_compute.png
in --out with one panel per step count found there (so a later run with other --steps or --settings
adds to the same plot).
"""

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from tqdm import tqdm  # noqa: E402

RESULTS_NAME, TABLE_NAME, PLOT_NAME = "results.json", "table.md", "psnr_vs_compute.png"
RECORDS_NAME = "records.jsonl"
HEIGHT = WIDTH = 128
TRUE_CFG_SCALE = 4.0
THRESHOLDS = (0.05, 0.08, 0.12, 0.16, 0.24, 0.32)
MASK_POLICIES = ("slow", "medium", "fast", "ultra")


@dataclass(frozen=True)
class Setting:
    """One row: `method` names the implementation, `params` its arguments (FBCacheConfig fields for ours)."""

    name: str
    method: str
    params: dict = field(default_factory=dict, hash=False)

    @property
    def framework(self) -> str:
        return "mindspore" if self.method in ("ours", "ours_baseline") else "torch"

    @property
    def is_baseline(self) -> bool:
        return self.method.endswith("baseline")


def threshold_name(prefix: str, threshold: float, suffix: str = "") -> str:
    return f"{prefix}_{threshold:g}{suffix}"


def sweep() -> List[Setting]:
    """The settings compared: thresholds spanning ~1.3x to beyond 4x compute speedup on this model."""
    settings = [Setting("torch_baseline", "torch_baseline"), Setting("ours_baseline", "ours_baseline")]
    settings += [Setting(threshold_name("diffusers_fbc", t), "diffusers_fbc", dict(threshold=t)) for t in THRESHOLDS]
    for lite in (False, True):
        settings += [Setting(f"diffusers_taylorseer{'_lite' if lite else ''}_i{interval}", "diffusers_taylorseer",
                             dict(cache_interval=interval, disable_cache_before_step=3, max_order=1,
                                  use_lite_mode=lite)) for interval in (2, 3, 4, 6)]
    settings += [Setting(threshold_name("magcache", t), "magcache", dict(threshold=t))
                 for t in (0.03, 0.06, 0.12, 0.24, 0.5)]
    for order in (0, 1):
        suffix = f"_ts{order}" if order else ""
        settings += [Setting(threshold_name("cachedit_F1B0", t, suffix), "cachedit",
                             dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=t,
                                  max_warmup_steps=4, taylorseer_order=order)) for t in THRESHOLDS[1:]]
        settings += [Setting(threshold_name("cachedit_F2B0", t, suffix), "cachedit",
                             dict(Fn_compute_blocks=2, Bn_compute_blocks=0, residual_diff_threshold=t,
                                  max_warmup_steps=4, taylorseer_order=order)) for t in (0.12, 0.24)]
    settings += [Setting(f"cachedit_mask_{policy}_ts1", "cachedit",
                         dict(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=0.12,
                              max_warmup_steps=4, taylorseer_order=1, mask_policy=policy))
                 for policy in MASK_POLICIES]
    ours = [("ours", t, dict(taylorseer_derivative=0)) for t in (0.08, 0.12, 0.16, 0.24)]
    ours += [("ours", t, dict(taylorseer_derivative=order)) for order, t in ((1, 0.12), (1, 0.24), (2, 0.12))]
    synced = dict(sync_cfg_branches=True)
    ours += [("ours", t, dict(sync_cfg_branches=True)) for t in (0.08, 0.12, 0.16)]
    ours += [("ours_verify", t, dict(taylorseer_derivative=1, verify_forecast=True, forecast_space=space, **synced))
             for space, thresholds in (("step", (0.04, 0.06, 0.08, 0.12, 0.16, 0.24)), ("sigma", (0.04, 0.06)))
             for t in thresholds]
    ours += [(f"ours_skip{skips}", t, dict(skip_probe_steps=skips, warmup_steps=3, **synced))
             for skips, t in ((1, 0.08), (1, 0.12), (2, 0.12), (2, 0.16), (3, 0.16), (3, 0.24))]
    ours += [(f"ours_verify_skip{skips}", t, dict(taylorseer_derivative=order, verify_forecast=True,
                                                  skip_probe_steps=skips, **synced))
             for skips, order, t in ((1, 1, 0.04), (1, 1, 0.08), (1, 1, 0.12), (2, 1, 0.04), (2, 1, 0.08),
                                     (2, 1, 0.12), (2, 2, 0.08), (3, 1, 0.08), (3, 1, 0.16), (5, 1, 0.16))]
    settings += [Setting(ours_name(prefix, t, params), "ours", dict(residual_diff_threshold=t, **params))
                 for prefix, t, params in ours]
    settings += [Setting(threshold_name("ours_F2B1", t, "_o1"), "ours",
                         dict(residual_diff_threshold=t, taylorseer_derivative=1, fn_compute_blocks=2,
                              bn_compute_blocks=1)) for t in (0.12,)]
    # A fixed schedule (every `interval`-th step computed, the probe run on the step after): TaylorSeer's
    # schedule with our forecast, to tell the forecast's quality apart from the gate's choices.
    settings += [Setting(f"ours_fixed{interval}_o{order}_w{warmup}_sync", "ours",
                         dict(residual_diff_threshold=100.0, taylorseer_derivative=order, warmup_steps=warmup,
                              skip_probe_steps=interval - 2, max_continuous_cached_steps=interval - 1, **synced))
                 for interval, order, warmup in ((3, 0, 3), (3, 1, 3), (3, 2, 3), (4, 0, 3), (5, 0, 3), (6, 0, 3),
                                                 (8, 0, 3), (4, 0, 6), (5, 0, 6), (6, 0, 6))]
    # Probe-free skipping after computed steps (MagCache's and TaylorSeer lite's schedules), with the gate
    # deciding the step after the skips.
    settings += [Setting(f"ours_after{after}_{t:g}_o0_w{warmup}_sync", "ours",
                         dict(residual_diff_threshold=t, warmup_steps=warmup, skips_after_compute=after,
                              max_continuous_cached_steps=after, **synced))
                 for after, t, warmup in ((1, 100.0, 6), (2, 100.0, 6), (3, 100.0, 6), (4, 100.0, 6), (1, 100.0, 3),
                                          (2, 100.0, 3), (3, 100.0, 3), (4, 100.0, 3), (5, 100.0, 3))]
    settings.append(Setting("ours_0.32_o1_w4_mc2", "ours", dict(residual_diff_threshold=0.32, taylorseer_derivative=1,
                                                                 warmup_steps=4, max_continuous_cached_steps=2)))
    return settings


def ours_name(prefix: str, threshold: float, params: dict) -> str:
    """ours_0.12_o1, ours_verify_0.04_o1_sigma_sync, ours_skip2_0.12_o0_w3_sync, ..."""
    parts = [prefix, f"{threshold:g}", f"o{params.get('taylorseer_derivative', 0)}"]
    if params.get("forecast_space") == "sigma":
        parts.append("sigma")
    if params.get("warmup_steps"):
        parts.append(f"w{params['warmup_steps']}")
    if params.get("sync_cfg_branches"):
        parts.append("sync")
    return "_".join(parts)


def method_family(setting: Setting) -> str:
    """The curve a setting belongs to in the plot."""
    if setting.method == "ours":
        p = setting.params
        if setting.name.startswith("ours_after"):
            return "ours probe-free fixed schedule + sync"
        if setting.name.startswith("ours_fixed"):
            return f"ours fixed schedule, order {p['taylorseer_derivative']} + sync"
        if p.get("fn_compute_blocks", 1) != 1 or p.get("max_continuous_cached_steps", -1) >= 0:
            return "ours (other)"
        if p.get("skip_probe_steps"):
            return "ours skip-probe" + (" + verify" if p.get("verify_forecast") else "") + " + sync"
        if p.get("verify_forecast"):
            return f"ours verify order {p['taylorseer_derivative']} ({p.get('forecast_space', 'step')}) + sync"
        return f"ours order {p.get('taylorseer_derivative', 0)}" + (" + sync" if p.get("sync_cfg_branches") else "")
    if setting.method == "diffusers_taylorseer":
        return "diffusers TaylorSeer" + (" lite" if setting.params["use_lite_mode"] else "")
    if setting.method == "cachedit":
        p = setting.params
        kind = "mask" if "mask_policy" in p else f"F{p['Fn_compute_blocks']}B{p['Bn_compute_blocks']}"
        return f"cache-dit {kind}" + (" +TaylorSeer" if p.get("taylorseer_order") else "")
    return {"diffusers_fbc": "diffusers FirstBlockCache", "magcache": "diffusers MagCache"}.get(setting.method,
                                                                                              setting.method)


# ----- generation -----

class SettingRun:
    """Where one setting's images and per-image records live, and which prompts are done."""

    def __init__(self, root: Path, setting: Setting):
        self.folder = root / setting.name
        self.records_path = self.folder / RECORDS_NAME

    def records(self) -> Dict[int, dict]:
        if not self.records_path.is_file():
            return {}
        records = {}
        for line in self.records_path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                records[record["prompt"]] = record
        return records

    def image_path(self, index: int) -> Path:
        return self.folder / f"{index:05d}.png"

    def save(self, index: int, image: np.ndarray, record: dict, keep_float: bool) -> None:
        from generate_clip_score_datas import write_atomically

        self.folder.mkdir(parents=True, exist_ok=True)
        pixels = np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)
        write_atomically(self.image_path(index), lambda partial: Image.fromarray(pixels).save(partial, format="PNG"))
        if keep_float:
            def write_array(partial: Path) -> None:
                with open(partial, "wb") as file:
                    np.save(file, image)
            write_atomically(self.folder / f"{index:05d}.npy", write_array)
        with open(self.records_path, "a") as log:  # the record comes last: a record means a complete image
            log.write(json.dumps(record) + "\n")


def initial_latents(seed: int) -> np.ndarray:
    from pipeline_flux import pack_latents

    noise = np.random.default_rng(seed).standard_normal((1, 16, HEIGHT // 8, WIDTH // 8)).astype(np.float32)
    return pack_latents(noise)


def per_call_fractions(calls: Sequence[Dict[str, float]], full_cost: Dict[str, float]) -> List[float]:
    total = sum(full_cost.values())
    return [sum(call.values()) / total for call in calls]


def generate_torch(settings: Sequence[Setting], root: Path, prompts: Sequence[str], steps: int, folder: str,
                   text_tokens: int) -> Dict[str, float]:
    """Every torch setting; returns the per-block FLOPs of one uncached call (measured on the baseline)."""
    from eval import peer_caches

    cost_path = root / "block_flops.json"
    ratios_path = root / "mag_ratios.json"

    def one_image(pipeline, index: int) -> np.ndarray:
        return peer_caches.generate(pipeline, prompts[index], initial_latents(index), HEIGHT, WIDTH, steps,
                                    TRUE_CFG_SCALE, text_tokens)

    for setting in settings:
        run = SettingRun(root, setting)
        todo = [index for index in range(len(prompts)) if index not in run.records()]
        if not todo:
            continue
        pipeline = peer_caches.load_pipeline(folder)
        pipeline.set_progress_bar_config(disable=True)
        if setting.method == "magcache" and not ratios_path.is_file():
            ratios = peer_caches.calibrate_mag_ratios(pipeline, lambda p: one_image(p, 0), steps)
            ratios_path.write_text(json.dumps(ratios))
        mag_ratios = json.loads(ratios_path.read_text()) if setting.method == "magcache" else None
        if not setting.is_baseline:
            peer_caches.apply_peer(pipeline, setting.method, setting.params, steps, mag_ratios)
        counter = peer_caches.BlockComputeCounter(text_tokens).attach(pipeline.transformer)
        block_cost = None
        for index in tqdm(todo, desc=f"{steps} steps {setting.name}", leave=False):
            counter.calls.clear()
            start = time.perf_counter()
            image = one_image(pipeline, index)
            seconds = time.perf_counter() - start
            if setting.is_baseline and not cost_path.is_file():  # uncached calls price the blocks, once
                cost_path.write_text(json.dumps(counter.full_cost()))
            block_cost = block_cost or json.loads(cost_path.read_text())
            fractions = per_call_fractions(counter.calls, block_cost)
            run.save(index, image, {"prompt": index, "seconds": seconds, "call_fractions": fractions},
                     keep_float=setting.is_baseline)
        counter.detach()
    return json.loads(cost_path.read_text())


def ours_call_fractions(summaries: Dict[str, dict], fn_blocks: int, bn_blocks: int,
                        block_cost: Dict[str, float]) -> List[float]:
    """Per transformer call (cond, uncond interleaved as diffusers calls them): the fraction of block FLOPs
    run. A hit runs the first Fn and last Bn blocks; a probe-skipping step runs none."""
    costs = list(block_cost.values())
    hit_cost = (sum(costs[:fn_blocks]) + sum(costs[len(costs) - bn_blocks:])) / sum(costs)
    branches = [summaries[name] for name in ("cond", "uncond") if name in summaries]

    def cost(summary: dict, step: int) -> float:
        if summary["probe_skipped"][step]:
            return 0.0
        return hit_cost if summary["cached"][step] else 1.0
    return [cost(summary, step) for step in range(len(branches[0]["cached"])) for summary in branches]


def generate_ours(settings: Sequence[Setting], root: Path, prompts: Sequence[str], steps: int, folder: str,
                  block_cost: Dict[str, float]) -> None:
    import mindspore as ms

    from pipeline_flux import FBCacheConfig, FluxPipeline

    ms.set_context(mode=ms.GRAPH_MODE)  # the product; mindone's T5 has no PyNative CPU kernel
    pipeline = None
    for setting in settings:
        run = SettingRun(root, setting)
        todo = [index for index in range(len(prompts)) if index not in run.records()]
        if not todo:
            continue
        pipeline = pipeline or FluxPipeline.from_pretrained(folder)
        cache = None if setting.is_baseline else FBCacheConfig(**setting.params)
        for index in tqdm(todo, desc=f"{steps} steps {setting.name}", leave=False):
            start = time.perf_counter()
            output = pipeline(prompts[index], negative_prompt="", true_cfg_scale=TRUE_CFG_SCALE, height=HEIGHT,
                              width=WIDTH, num_inference_steps=steps, latents=initial_latents(index),
                              output_type="np", cache=cache,
                              batch_cfg=False)  # per-branch calls, as diffusers and cache-dit run true CFG
            seconds = time.perf_counter() - start
            fractions = ([1.0] * 2 * steps if cache is None else
                         ours_call_fractions(output.cache_summaries, cache.fn_compute_blocks,
                                             cache.bn_compute_blocks, block_cost))
            run.save(index, np.asarray(output.images[0], np.float32),
                     {"prompt": index, "seconds": seconds, "call_fractions": fractions}, keep_float=setting.is_baseline)


# ----- scoring -----

def baseline_agreement(root: Path, count: int) -> float:
    """Max |ours - torch| over the uncached images' float pixels."""
    return max(float(np.abs(np.load(root / "ours_baseline" / f"{i:05d}.npy") -
                            np.load(root / "torch_baseline" / f"{i:05d}.npy")).max()) for i in range(count))


def score(settings: Sequence[Setting], root: Path, prompts: Sequence[str], real_dir: Path) -> List[dict]:
    from flux_accuracy_test import load_images, mean_pair_metrics
    from eval.feature_extractors import CLIPScorer
    from eval.image_metrics import fid_from_features
    from models.embedded import SHIPPED_JUDGE

    judge = CLIPScorer(SHIPPED_JUDGE)
    count = len(prompts)
    real_features = judge.image_embeds(load_images(sorted(real_dir.glob("*.png"))[:count]))
    rows, baselines, baseline_seconds = [], {}, {}
    for setting in sorted(settings, key=lambda s: not s.is_baseline):
        run = SettingRun(root, setting)
        records = run.records()
        images = load_images([run.image_path(index) for index in range(count)])
        seconds = statistics.median(records[index]["seconds"] for index in range(count))
        fractions = np.array([records[index]["call_fractions"] for index in range(count)])
        row = {"setting": setting.name, "method": setting.method, "family": method_family(setting),
               "framework": setting.framework, "params": setting.params, "images": count,
               "compute_fraction": float(fractions.mean()), "compute_speedup": float(1 / fractions.mean()),
               "steps_computed": [float((fractions[:, branch::2] > 0.999).sum(1).mean()) for branch in (0, 1)],
               "seconds_per_image": seconds,
               "clip_score": float(np.mean(judge(images, list(prompts)))),
               "frechet_distance": fid_from_features(judge.image_embeds(images), real_features)}
        if setting.is_baseline:
            baselines[setting.framework], baseline_seconds[setting.framework] = images, seconds
            row.update(psnr=None, ssim=None, wall_speedup=1.0)
        else:
            row.update(mean_pair_metrics(images, baselines[setting.framework]),
                       wall_speedup=baseline_seconds[setting.framework] / seconds)
        rows.append(row)
    return rows


def markdown(rows: Sequence[dict], steps: int) -> str:
    lines = [f"| setting ({steps} steps) | framework | block compute | compute speedup | steps computed (cond / uncond) "
             "| wall speedup | PSNR (dB) | SSIM | judge CLIP | Frechet to real |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: (not r["setting"].endswith("baseline"), r["family"], r["compute_speedup"])):
        def value(key: str, digits: int) -> str:
            return "-" if row[key] is None else f"{row[key]:.{digits}f}"
        lines.append(f"| {row['setting']} | {row['framework']} | {row['compute_fraction']:.3f} | "
                     f"{row['compute_speedup']:.2f}x | {row['steps_computed'][0]:.1f} / {row['steps_computed'][1]:.1f} | "
                     f"{row['wall_speedup']:.2f}x | {value('psnr', 2)} | {value('ssim', 4)} | "
                     f"{row['clip_score']:.2f} | {row['frechet_distance']:.2f} |")
    return "\n".join(lines)


def frontier(rows: Sequence[dict]) -> List[dict]:
    """The rows no other row beats on both compute speedup and PSNR, by increasing speedup."""
    best: List[dict] = []
    for row in sorted(rows, key=lambda r: (-r["compute_speedup"], -r["psnr"])):
        if not best or row["psnr"] > best[-1]["psnr"]:
            best.append(row)
    return best[::-1]


def plot(results: Dict[str, List[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {setting.name: setting for setting in sweep()}
    all_families = sorted({method_family(by_name[row["setting"]]) for rows in results.values() for row in rows})
    colours = {family: plt.cm.tab20(index % 20) for index, family in enumerate(all_families)}
    figure, axes = plt.subplots(1, len(results), figsize=(10.5 * len(results), 6), squeeze=False)
    for axis, (steps, rows) in zip(axes[0], sorted(results.items(), key=lambda item: int(item[0]))):
        families: Dict[str, List[dict]] = {}
        for row in rows:
            if row["psnr"] is not None:
                families.setdefault(method_family(by_name[row["setting"]]), []).append(row)
        for family, members in sorted(families.items()):
            members.sort(key=lambda r: r["compute_speedup"])
            ours = family.startswith("ours")
            axis.plot([r["compute_speedup"] for r in members], [r["psnr"] for r in members], "-" if ours else "--",
                      marker="o" if ours else "s", color=colours[family], label=family, linewidth=2.2 if ours else 1.2)
        for side, colour in (("ours", "black"), ("peers", "tab:red")):
            members = frontier([row for row in rows if row["psnr"] is not None
                                and (row["framework"] == "mindspore") == (side == "ours")])
            axis.plot([r["compute_speedup"] for r in members], [r["psnr"] for r in members], color=colour,
                      linewidth=7, alpha=0.25, zorder=1, solid_capstyle="round",
                      label=f"best of {side} (frontier)")
        axis.set_xlabel("compute speedup (transformer-block FLOPs, uncached / cached)")
        axis.set_ylabel("PSNR against the uncached image (dB)")
        axis.set_title(f"shipped emoji Flux, {steps} steps, true CFG {TRUE_CFG_SCALE:g}")
        axis.axvspan(1.5, 4.0, color="0.93", zorder=0)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# ----- command line -----

def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "outputs" / "cache_peers")
    parser.add_argument("--steps", type=int, nargs="+", default=[28], help="denoising step counts (default: 28)")
    parser.add_argument("--num_prompts", type=int, default=32, help="held-out prompts, 2 to 32 (default: 32)")
    parser.add_argument("--settings", nargs="+", help="only these settings (names as in the table; the two "
                        "baselines are always run); default: the whole sweep")
    parser.add_argument("--list", action="store_true", help="print the sweep's setting names and exit")
    args = parser.parse_args(argv)
    known = {setting.name for setting in sweep()}
    unknown = sorted(set(args.settings or ()) - known)
    if unknown:
        parser.error(f"unknown settings {unknown}; --list prints the names")
    if not 2 <= args.num_prompts <= 32:
        parser.error(f"--num_prompts must lie in [2, 32] (a Frechet distance needs 2 images), got {args.num_prompts}")
    if any(steps < 4 for steps in args.steps):
        parser.error(f"--steps must each be >= 4, got {args.steps}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, List[dict]]:
    args = parse_args(argv)
    settings = sweep()
    if args.list:
        print("\n".join(setting.name for setting in settings))
        return {}
    if args.settings:
        settings = [s for s in settings if s.is_baseline or s.name in args.settings]
    from eval.emoji_quality_table import write_real_renders
    from models.embedded import embedded_checkpoint

    folder = str(embedded_checkpoint())
    text_tokens = json.loads((Path(folder) / "tokenizer_2" / "tokenizer_config.json").read_text())["model_max_length"]
    prompts = write_real_renders(args.out / "real", args.num_prompts)
    results: Dict[str, List[dict]] = {}
    for steps in args.steps:
        root = args.out / f"steps{steps}"
        root.mkdir(parents=True, exist_ok=True)
        block_cost = generate_torch([s for s in settings if s.framework == "torch"], root, prompts, steps, folder,
                                    text_tokens)
        generate_ours([s for s in settings if s.framework == "mindspore"], root, prompts, steps, folder, block_cost)
        agreement = baseline_agreement(root, len(prompts))
        print(f"{steps} steps: uncached images, ours vs torch: max |difference| {agreement:.2e}", flush=True)
        # Every setting of the sweep made here, by this run or an earlier one with other --settings.
        complete = [setting for setting in sweep()
                    if set(range(len(prompts))) <= set(SettingRun(root, setting).records())]
        rows = score(complete, root, prompts, args.out / "real")
        results[str(steps)] = rows
        text = markdown(rows, steps)
        print("\n" + text + "\n", flush=True)
        (root / TABLE_NAME).write_text(text + "\n")
        (root / RESULTS_NAME).write_text(json.dumps({"baseline_max_abs_difference": agreement, "rows": rows},
                                                    indent=1))
    plotted = {path.parent.name[len("steps"):]: json.loads(path.read_text())["rows"]
               for path in sorted(args.out.glob(f"steps*/{RESULTS_NAME}"))}
    plot(plotted, args.out / PLOT_NAME)
    print(f"wrote {args.out / PLOT_NAME} ({', '.join(plotted)} steps)")
    return results


if __name__ == "__main__":
    main()
