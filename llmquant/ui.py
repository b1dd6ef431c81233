"""Terminal output: progress bars and logs go to stderr, results (and --json) to stdout, so that
`llmquant eval --json ... | jq` works in pipelines.

Progress: a rich bar on a terminal; anywhere else (a pipe, a job log, `make demo > log`), where
a live bar draws nothing until the end, a plain line every PLAIN_STEP of the work or every
PLAIN_INTERVAL seconds, whichever comes first. Nothing user-supplied is read as rich markup: the
error line and bar labels are escaped (a path or recipe key holding "[/]" used to crash the
printer itself).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True)

PLAIN_STEP = 0.05  # a plain progress line at least every 5% of the work ...
PLAIN_INTERVAL = 30.0  # ... or every 30 seconds of it


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        handlers=[RichHandler(console=stderr, show_path=False, show_time=False, markup=False)],
        force=True,
    )
    for noisy in ("transformers", "datasets", "huggingface_hub", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if quiet:
        # transformers sets its own loggers' level when it is imported (after this), and reports a
        # load ("... LOAD REPORT") at warning level; its and the hub's tqdm bars ("Loading weights",
        # GGUF conversion) ignore logging levels. All of them read these variables.
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TQDM_DISABLE", "1")
        if "transformers" in sys.modules:
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            hf_logging.set_verbosity_error()


_WARNED: set[str] = set()


def warn_once(message: str, logger: str = "llmquant") -> None:
    """A warning printed once per process per message (a fallback hit by every linear says it once)."""
    if message not in _WARNED:
        _WARNED.add(message)
        logging.getLogger(logger).warning(message)


def error_line(message: object) -> None:
    """The one line every failure ends in: `error: MESSAGE` on stderr, MESSAGE taken literally."""
    stderr.print(f"[bold red]error:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


class PlainProgress:
    """The part of rich's Progress that llmquant uses, printing plain lines for logs and pipes:
    `label: done/total (pct), elapsed, eta` at every PLAIN_STEP of the total or PLAIN_INTERVAL
    seconds, and when a task completes."""

    def __init__(self, stream: Any = None, step: float = PLAIN_STEP, interval: float = PLAIN_INTERVAL):
        self._stream = stream
        self._step, self._interval = step, interval
        self._tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_: Any) -> int:
        task = len(self._tasks)
        now = time.monotonic()
        self._tasks[task] = {
            "label": description, "total": total, "done": completed, "start": now, "last": now, "shown": None,
        }
        return task

    def update(self, task: int, total: float | None = None, completed: float | None = None, advance: float | None = None, **_: Any) -> None:
        state = self._tasks[task]
        if total is not None:
            state["total"] = total
        if completed is not None:
            state["done"] = completed
        if advance is not None:
            state["done"] += advance
        self._maybe_print(state)

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, advance=advance)

    def _maybe_print(self, state: dict[str, Any]) -> None:
        now = time.monotonic()
        done, total, shown = state["done"], state["total"], state["shown"]
        if shown is not None and done == shown:
            return
        finished = total is not None and done >= total
        if total:
            due = shown is None and done > 0 or (done - (shown or 0)) / total >= self._step
        else:
            due = shown is None
        if not (finished or due or now - state["last"] >= self._interval):
            return
        state["shown"], state["last"] = done, now
        elapsed = now - state["start"]
        if total:
            text = f"{state['label']}: {done:g}/{total:g} ({done / total:.0%}), {_clock(elapsed)} elapsed"
            if 0 < done < total:
                text += f", eta {_clock(elapsed / done * (total - done))}"
        else:
            text = f"{state['label']}: {done:g} done, {_clock(elapsed)} elapsed"
        stream = self._stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class _EscapedProgress(Progress):
    """rich's Progress whose task labels are plain text (a dataset path may hold '[/]')."""

    def add_task(self, description: str, *args: Any, **kwargs: Any):  # type: ignore[override]
        return super().add_task(escape(description), *args, **kwargs)


def progress(quiet: bool = False) -> Progress | PlainProgress:
    """A progress display on stderr: a live bar on a terminal, plain lines elsewhere, nothing when quiet."""
    if not quiet and not stderr.is_terminal:
        return PlainProgress()
    return _EscapedProgress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=stderr,
        disable=quiet,
    )
