"""Outputs appear only when complete: write into a temporary sibling directory, then rename.

An interrupted run leaves at most a `.NAME.partial-PID` directory, never something that looks like a
finished checkpoint, and never touches an existing output unless the user asked for --force (then
the old directory is replaced only after the new one is complete). Files are fsync'ed before the
rename; leftovers of killed runs (whose PID is gone) are removed by the next write to the same
target. `quantize`'s resumable work directory `.NAME.work` is managed by llmquant/resume.py.

Nothing the user had is lost: every output directory gets a manifest (`llmquant-manifest.json`,
the files llmquant wrote there), and --force replaces only a directory that has one and holds
nothing else, never one that holds (or is) an input of the run. `check_output_path` says all of
this, and whether the place can be written at all, before any expensive work starts.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from llmquant.errors import UserError

MANIFEST_FILE = "llmquant-manifest.json"  # in every output directory: the files llmquant wrote there
MANIFEST_FORMAT = "llmquant-output/1"


def _absolute(path: str | Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


def _inside(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_writable_place(target: str | Path) -> None:
    """UserError unless `target` could be created: its nearest existing ancestor must be a directory
    this process can create entries in (probed by creating and removing one, which also catches
    read-only mounts, immutable directories and pseudo-filesystems, which permission bits do not
    show to root)."""
    path = _absolute(target)
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"output {target}: {ancestor} is a file, not a directory")
    try:
        probe = tempfile.mkdtemp(prefix=".llmquant-probe-", dir=ancestor)
        os.rmdir(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            reason = "entries cannot be created there"
        raise UserError(f"output {target}: cannot write in {ancestor} ({reason})") from None


def manifest_problem(path: Path) -> str | None:
    """None if the directory `path` is an llmquant output that can be replaced without losing
    anything: it has a manifest and holds only the files listed in it; else why not."""
    try:
        data = json.loads((path / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("files"), list):
        return f"it has no valid {MANIFEST_FILE}, so llmquant did not write it (or an older llmquant did)"
    listed = set(data["files"]) | {MANIFEST_FILE}
    extra = sorted(name for name in _relative_entries(path) if name not in listed)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        return f"it holds {extra[0]}{more}, which llmquant did not write"
    return None


def _relative_entries(path: Path) -> list[str]:
    """Every file and directory below `path`, as POSIX paths relative to it (a directory counts only
    through its files; an empty one counts itself)."""
    out = []
    for entry in sorted(path.rglob("*")):
        if entry.is_dir() and not entry.is_symlink():
            if not any(entry.iterdir()):
                out.append(entry.relative_to(path).as_posix() + "/")
            continue
        out.append(entry.relative_to(path).as_posix())
    return out


def check_output_path(
    target: str | Path,
    force: bool,
    inputs: Iterable[str | Path] = (),
    kind: str = "directory",
    ours: Callable[[Path], str | None] | None = None,
) -> Path:
    """Everything about an output path that can be known before any work: it is free (or, with
    `force`, replaceable: llmquant's own output, holding no input of this run), and it can be
    written. kind "directory" (a checkpoint) or "file"; `ours(path)` says why an existing file is
    not llmquant's (None: it is), for files."""
    path = Path(target)
    absolute = _absolute(path)
    for given in inputs:
        source = _absolute(given)
        if _inside(source, absolute):
            what = "is" if source == absolute else "holds"
            raise UserError(f"output {path} {what} an input of this run ({given}); choose another output")
    if path.exists() or path.is_symlink():
        if kind == "directory" and not path.is_dir():
            raise UserError(f"output {path} exists and is not a directory")
        if kind == "file" and (path.is_dir() or not path.is_file()):
            raise UserError(f"output {path} exists and is not a regular file")
        if not force:
            raise UserError(f"output {path} already exists; pass --force to replace it")
        problem = manifest_problem(path) if kind == "directory" else (ours(path) if ours else None)
        if problem is not None:
            raise UserError(f"output {path} exists and --force replaces only llmquant's own outputs: {problem}")
    check_writable_place(path)
    return path


def check_output_free(target: str | Path, force: bool) -> Path:
    """check_output_path for a directory output with no inputs to protect (kept for callers of the
    old name)."""
    return check_output_path(target, force)


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


def write_manifest(directory: Path) -> None:
    """Lists every file of `directory` (what llmquant wrote there) in its manifest."""
    files = [name for name in _relative_entries(directory) if name != MANIFEST_FILE]
    text = json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n"
    (directory / MANIFEST_FILE).write_text(text)


@contextmanager
def atomic_output_dir(target: str | Path, force: bool = False, inputs: Iterable[str | Path] = ()) -> Iterator[Path]:
    """Yields a temporary sibling directory of `target` to write into; on success, writes its
    manifest, flushes it and renames it to `target` (replacing an existing one only with `force`,
    and only if it is llmquant's own output holding no input)."""
    inputs = list(inputs)
    path = check_output_path(target, force, inputs)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path)
        partial = path.parent / f".{path.name}.partial-{os.getpid()}"
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir()
    except OSError as error:
        raise UserError(f"output {target}: cannot create it ({error.strerror or error})") from None
    try:
        yield partial
        write_manifest(partial)
        _fsync_tree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        try:
            check_output_path(path, force, inputs)  # unchanged while the work ran?
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        path.rename(old)
        partial.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        partial.rename(path)
