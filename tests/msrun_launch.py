"""Launch a script under MindSpore's msrun from a test: local CPU workers, a free port, logs kept."""

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

# msrun is installed beside the interpreter (by the mindspore package of requirements.txt).
MSRUN = Path(sys.executable).parent / "msrun"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def msrun_command(script: Path, args: Sequence[str], workers: int, log_dir: Path) -> list:
    return [str(MSRUN), "--worker_num", str(workers), "--local_worker_num", str(workers), "--master_port",
            str(free_port()), "--log_dir", str(log_dir), "--join", "True", str(script), *map(str, args)]


def msrun_env() -> dict:
    """msrun starts `python` from PATH: put this interpreter's first."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def run_msrun(script: Path, args: Sequence[str], workers: int, log_dir: Path,
              timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(msrun_command(script, args, workers, log_dir), capture_output=True, text=True,
                          env=msrun_env(), timeout=timeout)


def worker_log(log_dir: Path, rank: int) -> str:
    path = Path(log_dir) / f"worker_{rank}.log"
    return path.read_text(errors="replace") if path.is_file() else f"(no {path})"
