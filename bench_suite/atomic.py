"""Atomic writes: write to a temporary sibling, then rename, so no reader ever sees half a file.

A temporary sibling is named ``.<name>.tmp.<pid>.<host>.<random>``: a process killed mid-write (SIGKILL, a
node failure) leaves it behind, and the next write of the same path removes it once its process is gone
(``sweep_stale``), so interrupted runs do not pile up half-written shard folders and checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (a process we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tmp_prefix(path: Path) -> str:
    return f".{path.name}.tmp.{os.getpid()}.{socket.gethostname()}."


def sweep_stale(path: Path) -> list[Path]:
    """Remove the temporary siblings of ``path`` that a process of this host, now gone, left behind."""
    stem = f".{path.name}.tmp."
    removed = []
    try:
        siblings = [p for p in path.parent.iterdir() if p.name.startswith(stem)]
    except FileNotFoundError:
        return removed
    for p in siblings:
        pid, _, rest = p.name[len(stem):].partition(".")
        host = rest.removesuffix(".tmp").rpartition(".")[0]
        if not pid.isdigit() or host != socket.gethostname() or process_alive(int(pid)):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def save_npy(path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, array)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a whole directory under a temporary name; swap it into place at the end."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_dir(path: str | os.PathLike) -> None:
    """Delete a directory so that no reader sees it half gone: it is renamed to a temporary sibling first, which
    a kill leaves behind for ``sweep_stale`` (of this path, or of a folder of such: ``sweep_stale_in``)."""
    path = Path(path)
    trash = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), dir=path.parent))
    try:
        os.replace(path, trash)  # onto the empty temporary folder
    except OSError:
        trash.rmdir()
        raise
    shutil.rmtree(trash)


def sweep_stale_in(folder: str | os.PathLike) -> list[Path]:
    """``sweep_stale`` for every path of ``folder`` that has temporary siblings there."""
    folder, removed = Path(folder), []
    names = {p.name[1:].partition(".tmp.")[0] for p in folder.glob(".*.tmp.*")} if folder.is_dir() else set()
    for name in sorted(names):
        removed += sweep_stale(folder / name)
    return removed


def _json_default(obj):
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
