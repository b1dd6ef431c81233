"""Outputs appear only when complete: write into a temporary sibling directory, then rename.

An interrupted run leaves at most a `.NAME.partial-PID` directory, never something that looks like a
finished checkpoint, and never touches an existing output unless the user asked for --force (then
the old directory is replaced only after the new one is complete). Files are fsync'ed before the
rename; leftovers of killed runs (whose PID is gone) are removed by the next write to the same
target. `quantize`'s resumable work directory `.NAME.work` is managed by llmquant/resume.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmquant.errors import UserError


def check_output_free(target: str | Path, force: bool) -> Path:
    path = Path(target)
    if path.exists() and not force:
        raise UserError(f"output {path} already exists; pass --force to replace it")
    if path.exists() and not path.is_dir():
        raise UserError(f"output {path} exists and is not a directory")
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_stale_partials(path: Path) -> None:
    """Removes `.NAME.partial-PID` / `.NAME.old-PID` left by killed runs (their PID is gone)."""
    if not path.parent.is_dir():
        return
    for leftover in path.parent.glob(f".{path.name}.*-*"):
        kind, _, pid = leftover.name.removeprefix(f".{path.name}.").rpartition("-")
        if kind in ("partial", "old") and pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(directory: Path) -> None:
    """Flush the files' data to disk before the rename publishes them (a power cut must not leave a
    complete-looking directory with empty files)."""
    for file in directory.rglob("*"):
        if file.is_file() and not file.is_symlink():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (a rename into it) to disk; a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_output_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    path = check_output_free(target, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
        _fsync_tree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        partial.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(path)


