"""What every training script here shares: device choice, seeding, resumable checkpoints, progress."""

import argparse
import os
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]
RUNS_DIR = REPO_ROOT / "train" / "runs"
EMA_DECAY = 0.998


def add_common_arguments(parser: argparse.ArgumentParser, steps: int, batch_size: int, lr: float) -> None:
    parser.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    parser.add_argument("--batch_size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda where there is one, else cpu)")
    parser.add_argument("--checkpoint_every", type=int, default=200, help="steps between resumable checkpoints")
    parser.add_argument("--until", type=int,
                        help="stop after this step with a checkpoint (the same command without it resumes there)")


def check_common_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("steps", "batch_size", "checkpoint_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.until is not None and not 1 <= args.until <= args.steps:
        parser.error(f"--until must lie in [1, --steps {args.steps}], got {args.until}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    try:
        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        parser.error(f"--device {args.device} is not usable here ({error}); use --device cpu")


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of one training step: resuming at step k draws what an unbroken run drew."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def save_checkpoint(path: Path, state: Dict) -> None:
    """Written beside and renamed over, so an interrupted save never corrupts the last good checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: Path) -> Dict:
    return torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else {}


def train_loop(name: str, args: argparse.Namespace, start_step: int, step_fn: Callable[[int], Dict[str, float]],
               save_fn: Callable[[int], None]) -> Optional[float]:
    """Run steps start..args.steps-1 with a progress bar (loss, ETA), saving every --checkpoint_every steps
    and at the end. Returns the seconds spent, or None when --until stopped the run early."""
    started = time.perf_counter()
    end = args.steps if args.until is None else args.until
    bar = tqdm(range(start_step, end), desc=name, initial=start_step, total=args.steps, dynamic_ncols=True,
               mininterval=5)
    averages: Dict[str, float] = {}
    for step in bar:
        for key, value in step_fn(step).items():
            averages[key] = value if key not in averages else 0.95 * averages[key] + 0.05 * value
        bar.set_postfix({key: f"{value:.4f}" for key, value in averages.items()}, refresh=False)
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == end:
            save_fn(step + 1)
    bar.close()
    if end < args.steps:
        print(f"{name}: stopped after step {end} of {args.steps} (--until); run again without --until to resume")
        return None
    return time.perf_counter() - started


def train(name: str, args: argparse.Namespace, model: torch.nn.Module,
          loss_fn: Callable[[int], Tuple[torch.Tensor, Dict[str, float]]], weight_decay: float,
          max_grad_norm: Optional[float] = None, ema: Optional[torch.nn.Module] = None) -> Optional[float]:
    """AdamW with a one-cycle schedule (5% warm-up, cosine decay) over --steps, resumable from
    `<--out>/state.pt`; `loss_fn(step)` gives the step's loss and the numbers to show. With `ema`, an
    exponential moving average of the weights is kept and saved too. Returns train_loop's result."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, args.lr, total_steps=args.steps, pct_start=0.05)
    stateful = {"model": model, "optimizer": optimizer, "schedule": schedule}
    if ema is not None:
        stateful["ema"] = ema
    state_path = args.out / "state.pt"
    state = load_checkpoint(state_path)
    if state:
        for key, holder in stateful.items():
            holder.load_state_dict(state[key])
        print(f"resuming {state_path} at step {state['step']}")

    def step_fn(step: int) -> Dict[str, float]:
        loss, shown = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        schedule.step()
        if ema is not None:
            update_ema(ema, model, step)
        return shown

    def save_fn(step: int) -> None:
        save_checkpoint(state_path, {**{key: holder.state_dict() for key, holder in stateful.items()}, "step": step})

    return train_loop(name, args, state.get("step", 0), step_fn, save_fn)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, step: int) -> None:
    """EMA with decay min(EMA_DECAY, (1 + step) / (10 + step)): early steps are not averaged with the init."""
    decay = min(EMA_DECAY, (1 + step) / (10 + step))
    for ema_param, param in zip(ema.parameters(), model.parameters()):
        ema_param.lerp_(param, 1 - decay)


def batches(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))
