"""Launch a script under MindSpore's msrun from a test: local CPU workers, a free port, logs kept."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import psutil

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


def start_msrun(script: Path, args: Sequence[str], workers: int, log_dir: Path) -> subprocess.Popen:
    """msrun in a session of its own (so that `kill_tree` can end it), its own output in `<log_dir>.out`."""
    Path(log_dir).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(log_dir).with_name(Path(log_dir).name + ".out"), "w") as output:
        return subprocess.Popen(msrun_command(script, args, workers, log_dir), env=msrun_env(), stdout=output,
                                stderr=subprocess.STDOUT, start_new_session=True)


def worker_log(log_dir: Path, rank: int) -> str:
    path = Path(log_dir) / f"worker_{rank}.log"
    return path.read_text(errors="replace") if path.is_file() else f"(no {path})"


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL msrun (started by `start_msrun`) and every process under it (the workers are in sessions of
    their own, so ending msrun's process group alone would leave them running)."""
    try:
        tree = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    for member in tree:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)   # msrun, its scheduler and its `tail -f`s
    except ProcessLookupError:
        pass
    process.wait()
