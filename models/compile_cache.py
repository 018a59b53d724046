"""A persistent compile cache: each graph compiles once per machine, not once per run.

MindSpore can store compiled graphs (`enable_compile_cache`), but it names them only by their position
in the process (`compile_cache_0.mindir`, `_1`, ...: a static counter of the compiles done while the cache
is on), fixes the folder at the first compile, and checks no more than the entry script's own imports.
A run that compiles its graphs in another order loads the wrong graph (an earlier experiment got NaN
images); a source file on `sys.path` (all of ours) can change without any check; two processes writing
one folder race on the same file names.

This module makes those cases impossible instead of unlikely:

- **Folder per run plan.** The folder is keyed on everything that shapes a graph: MindSpore and Python
  versions, device target, the content of every source file of the project and of the entry script's
  imports, the model's configs, weight files (name, size, modification time) and dtype, and the
  arguments of the first call that compiles (shapes, cache block split, CFG mode). Same key, same code,
  same first call: the same graphs in the same order.
- **Every position checked.** A manifest records each position's graph signature (component, class,
  input shapes and dtypes, graph-shaping settings) and the SHA-256 of its file. The cache is switched on
  only around the pipeline's own compiles, so MindSpore's counter counts exactly those; before each, the
  signature at that position must equal the manifest's (or the position must be new), else the cache is
  switched off for the rest of the process and the graph compiles normally.
- **Private working copy.** MindSpore reads and writes a folder private to the process, filled with the
  verified entries (a truncated or corrupted file fails its SHA-256 and is left out, so it is compiled
  again); new entries are published into the shared folder under a file lock, by atomic rename.
- **Never in the way.** An unwritable cache folder gives one warning and a normal run.
"""

import atexit
import fcntl
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import mindspore as ms

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# What the project's graphs are built from: a change to any of these compiles anew.
SOURCE_GLOBS = ("*.py", "models/*.py")
MANIFEST = "manifest.json"
ENTRY_PREFIX = "compile_cache_"
ENTRY_SUFFIX = ".mindir"
DEPENDENCY_HASH = "compile_dependency.hash"
# MindSpore stores a process's graphs under <path>/rank_<id>/graph_cache/.
GRAPH_FOLDER = Path("rank_0") / "graph_cache"


def default_cache_root() -> Path:
    """`$FLUX_MS_COMPILE_CACHE`, else `$XDG_CACHE_HOME/flux-fbcache-ms`, else `~/.cache/flux-fbcache-ms`."""
    if os.environ.get("FLUX_MS_COMPILE_CACHE"):
        return Path(os.environ["FLUX_MS_COMPILE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flux-fbcache-ms"


def digest(values: Iterable[object]) -> str:
    hasher = hashlib.sha256()
    for value in values:
        hasher.update(json.dumps(value, sort_keys=True, default=str).encode())
        hasher.update(b"\0")
    return hasher.hexdigest()


def file_sha256(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def intact(path: Path, sha256: Optional[str]) -> bool:
    """The file exists and has the content the manifest recorded."""
    try:
        return file_sha256(path) == sha256
    except OSError:
        return False


def source_files() -> List[Path]:
    """The project's sources and the files MindSpore itself checks (the entry script and its imports)."""
    from mindspore.graph.api import _get_compile_cache_dep_files

    files = {path.resolve() for pattern in SOURCE_GLOBS for path in PROJECT_ROOT.glob(pattern)}
    files.update(Path(path).resolve() for path in _get_compile_cache_dep_files())
    return sorted(files)


def environment_key() -> List[object]:
    return [ms.__version__, platform.python_version(), ms.get_context("device_target"),
            [(str(path), file_sha256(path)) for path in source_files()]]


def weights_identity(folder: Path) -> List[object]:
    """Configs by content, weights by name, size and modification time (hashing 24 GB would take minutes)."""
    identity = []
    for path in sorted(folder.rglob("*")):
        if path.suffix == ".json":
            identity.append((str(path.relative_to(folder)), file_sha256(path)))
        elif path.suffix == ".safetensors":
            stat = path.stat()
            identity.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
    return identity


def folder_key(run_key: Mapping[str, object]) -> str:
    """The folder of a run: this environment and sources, and the run's own graph-shaping key."""
    return digest([environment_key(), run_key])[:32]


class CompileCache:
    """The compile cache of one process: `activate` once, then `compiling(signature)` around each compile."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.shared: Optional[Path] = None
        self.working: Optional[Path] = None
        self.position = 0
        self.expected: Dict[int, str] = {}
        self.stored = 0  # verified graphs found in the shared folder at activation
        self.mindspore_cache_used = False
        self.enabled = True
        self.note = "not used yet"

    def activate(self, run_key: Mapping[str, object]) -> None:
        """Choose the folder for this process's graphs and copy its verified entries to a private folder.
        Called once, before the process's first compile (MindSpore fixes the folder then)."""
        if self.shared is not None or not self.enabled:
            return
        from mindspore.graph import api

        if not (api.entry_script_path and os.path.isfile(api.entry_script_path)):
            self.disable("MindSpore's compile cache reads the entry script's imports, and this process has no script "
                         f"file (sys.argv[0] is {sys.argv[0] if sys.argv else None!r}: python -c or an interactive "
                         "session); compiling as usual", warn=True)
            return
        try:
            self.shared = self.root / folder_key(run_key)
            self.shared.mkdir(parents=True, exist_ok=True)
            self.working = Path(tempfile.mkdtemp(prefix="work-", dir=self.root))
            (self.working / GRAPH_FOLDER).mkdir(parents=True)
            self.stored = self._copy_verified_entries()
        except OSError as error:
            self.disable(f"the compile cache folder {self.root} cannot be used ({error}); compiling as usual "
                         "(--no_compile_cache silences this)", warn=True)
            return
        atexit.register(self.close)
        self.note = f"{self.shared} ({self.stored} graphs stored)"

    def _manifest(self) -> dict:
        try:
            manifest = json.loads((self.shared / MANIFEST).read_text())
            return manifest if isinstance(manifest, dict) else {}
        except (OSError, ValueError):
            return {}

    def _copy_verified_entries(self) -> int:
        """Copy the entries whose content matches the manifest; a damaged one is left to compile again."""
        manifest = self._manifest()
        source, target = self.shared / GRAPH_FOLDER, self.working / GRAPH_FOLDER
        copied = 0
        for position, entry in manifest.get("entries", {}).items():
            try:
                position, signature, sha256 = int(position), str(entry["signature"]), entry["sha256"]
            except (ValueError, KeyError, TypeError):
                continue  # a manifest line no version of this module wrote: its file is not used
            name = f"{ENTRY_PREFIX}{position}{ENTRY_SUFFIX}"
            # The position keeps its signature either way: only that graph may be compiled there.
            self.expected[position] = signature
            if intact(source / name, sha256):
                shutil.copyfile(source / name, target / name)
                copied += 1
            else:
                warnings.warn(f"compile cache entry {source / name} is damaged or missing; that graph compiles "
                              "again", UserWarning, stacklevel=4)
        if copied and (source / DEPENDENCY_HASH).is_file():
            shutil.copyfile(source / DEPENDENCY_HASH, target / DEPENDENCY_HASH)
        return copied

    def switch_mindspore_cache(self, on: bool) -> None:
        """MindSpore's own compile cache, on (into the working folder) or off; the only place that touches it,
        and only once this process has switched it on (a process that never uses it keeps MindSpore's
        context as it found it)."""
        if on:
            ms.set_context(enable_compile_cache=True, compile_cache_path=str(self.working))
            self.mindspore_cache_used = True
        elif self.mindspore_cache_used:
            ms.set_context(enable_compile_cache=False)

    def disable(self, reason: str, warn: bool = False) -> None:
        self.enabled = False
        self.note = f"off: {reason}"
        self.switch_mindspore_cache(False)
        if warn:
            warnings.warn(reason, UserWarning, stacklevel=3)

    def begin(self, signature: str) -> None:
        """Switch MindSpore's cache on for the compile at this position, if its stored graph (if any) is this
        signature's; otherwise off for good."""
        if not self.enabled or self.working is None:
            return
        expected = self.expected.get(self.position)
        if expected is not None and expected != signature:
            self.disable(f"graph {self.position} of this run ({signature}) differs from the stored one "
                         f"({expected}); compiling the rest without the cache")
            return
        self.switch_mindspore_cache(True)

    def end(self, signature: str, compiled: bool) -> None:
        """The call is done: the cache goes off, so that no one else's compile moves MindSpore's count. If
        the call compiled (loaded or built) a graph, that graph took this position."""
        if not self.enabled or self.working is None:
            return
        self.switch_mindspore_cache(False)
        if compiled:
            self.expected.setdefault(self.position, signature)
            self.position += 1

    def publish(self) -> None:
        """Move this process's new entries into the shared folder, under a lock, by atomic rename."""
        if self.working is None or self.shared is None:
            return
        source, target = self.working / GRAPH_FOLDER, self.shared / GRAPH_FOLDER
        try:
            target.mkdir(parents=True, exist_ok=True)
            with open(self.shared / "lock", "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                manifest = self._manifest()
                entries = manifest.setdefault("entries", {})
                for position, signature in sorted(self.expected.items()):
                    name = f"{ENTRY_PREFIX}{position}{ENTRY_SUFFIX}"
                    stored = entries.get(str(position))
                    if (stored and stored.get("signature") != signature) or not (source / name).is_file():
                        continue
                    if stored and intact(target / name, stored.get("sha256")):
                        continue
                    self._place(source / name, target / name)
                    entries[str(position)] = {"signature": signature, "sha256": file_sha256(target / name)}
                if (source / DEPENDENCY_HASH).is_file() and not (target / DEPENDENCY_HASH).is_file():
                    self._place(source / DEPENDENCY_HASH, target / DEPENDENCY_HASH)
                partial = self.shared / f".{MANIFEST}.{os.getpid()}"
                partial.write_text(json.dumps(manifest, indent=1))
                os.replace(partial, self.shared / MANIFEST)
        except OSError as error:
            warnings.warn(f"could not store compiled graphs in {self.shared} ({error}); the next run compiles "
                          "them again", UserWarning, stacklevel=2)

    @staticmethod
    def _place(source: Path, target: Path) -> None:
        partial = target.with_name(f".{target.name}.{os.getpid()}")
        shutil.copyfile(source, partial)
        os.chmod(partial, 0o644)
        os.replace(partial, target)

    def close(self) -> None:
        if self.working is not None:
            self.publish()
            shutil.rmtree(self.working, ignore_errors=True)
            self.working = None


_PROCESS_CACHE: Optional[CompileCache] = None


def process_compile_cache(root: Optional[Path] = None) -> CompileCache:
    """The one compile cache of this process (MindSpore's counter and folder are per process)."""
    global _PROCESS_CACHE
    if _PROCESS_CACHE is None:
        _PROCESS_CACHE = CompileCache(root or default_cache_root())
    return _PROCESS_CACHE
