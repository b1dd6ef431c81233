"""Outputs appear only when complete: write into a temporary sibling directory, then rename.

An interrupted run leaves at most a `.NAME.partial-PID` directory, never something that looks like a
finished checkpoint, and never touches an existing output unless the user asked for --force (then
the old directory is replaced only after the new one is complete).
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


@contextmanager
def atomic_output_dir(target: str | Path, force: bool = False) -> Iterator[Path]:
    path = check_output_free(target, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.parent / f".{path.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
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


def atomic_write_text(target: str | Path, text: str) -> None:
    path = Path(target)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
