"""Zero-shot (and few-shot) task accuracy through lm-evaluation-harness, on the model llmquant loaded.

The task definitions are lm-eval's own (prompts, choices, metrics, few-shot sampling); the model is
the object `load_model` returned (a packed checkpoint runs through llmquant's runtime), wrapped in
lm-eval's `HFLM`. The data comes from a local directory laid out like the shared data's `tasks/`
(llmquant/data/tasks.py maps each file to the hub dataset's fields) when it has the task's files,
else from the Hugging Face hub, as lm-eval loads it.

lm-eval is an optional extra (`pip install 'llmquant[tasks]'`), imported only when tasks run.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmquant.data.corpora import data_dir_from
from llmquant.data.tasks import LocalTask, expected_paths, find_local_task, local_task_names
from llmquant.errors import UserError

INSTALL_HINT = "--tasks needs lm-evaluation-harness: pip install 'llmquant[tasks]' (or pip install 'lm_eval>=0.4.13,<0.5')"
# The bench's and the docs' default set: every task with local data in the shared data's layout.
DEFAULT_TASKS = ("arc_challenge", "arc_easy", "boolq", "lambada_openai", "openbookqa", "piqa", "winogrande")
# lm-eval's stderr for acc is closed-form; only perplexity-type metrics (lambada_openai's) are
# bootstrapped. lm-eval's default 100,000 draws take minutes on a CPU; 1,000 give two digits.
BOOTSTRAP_ITERS = 1000
MAIN_METRIC = "acc"


@dataclass(frozen=True)
class TaskSettings:
    tasks: tuple[str, ...]
    num_fewshot: int = 0
    limit: float | None = None  # >= 1: the first N documents per task; < 1: that fraction
    batch_size: int = 1
    data_dir: str | None = None
    bos: str = "auto"  # auto: the tokenizer's default; always / never: forced (as --bos for PPL)

    def check(self) -> None:
        """Everything that can be checked before a model loads (lm-eval installed, task names, flags, data)."""
        if self.num_fewshot < 0:
            raise UserError(f"--num-fewshot: must be 0 or more, got {self.num_fewshot}")
        if self.limit is not None and self.limit <= 0:
            raise UserError(f"--limit: must be positive, got {self.limit}")
        if self.limit is not None and self.limit >= 1 and self.limit != int(self.limit):
            raise UserError(f"--limit: a document count (an integer) or a fraction below 1, got {self.limit}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size: must be at least 1, got {self.batch_size}")
        if not self.tasks:
            raise UserError("--tasks: no task named")
        require_lm_eval()
        for name in self.tasks:  # a name no config mentions: unknown, without lm-eval's whole index
            if name not in TASK_FOLDERS and not _named_in_configs(name):
                raise _unknown_task(name, sorted(TASK_FOLDERS), None)
        if any(name not in TASK_FOLDERS for name in self.tasks):
            known = task_manager(self.tasks).all_subtasks
            for name in self.tasks:
                if name not in known:
                    raise _unknown_task(name, known, len(known))
        data_dir = data_dir_from(self.data_dir)
        for name in self.tasks if self.num_fewshot > 0 else ():
            local = find_local_task(name, data_dir)
            if local is not None:
                raise UserError(
                    f"--num-fewshot {self.num_fewshot}: {name}'s few-shot examples come from its training split, which "
                    f"the local data ({local.describe()}) lacks; use 0, or the hub (no --data-dir/LLMQUANT_DATA)"
                )


def _unknown_task(name: str, candidates: list[str], count: int | None) -> UserError:
    close = difflib.get_close_matches(name, candidates, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    known = f"lm-eval knows {count} tasks" if count else "or any lm-eval task"
    return UserError(
        f"--tasks: unknown task {name!r}{hint}; available with local data: {', '.join(local_task_names())}; "
        f"{known} (python -m lm_eval ls tasks)"
    )


def require_lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return lm_eval


# Where lm-eval keeps the configs of the tasks llmquant has local loaders for (and the default set):
# indexing only these folders takes a second; lm-eval's whole index (13,000 tasks) takes a minute.
TASK_FOLDERS = {
    "arc_challenge": "arc",
    "arc_easy": "arc",
    "boolq": "super_glue/boolq",
    "hellaswag": "hellaswag",
    "lambada_openai": "lambada",
    "openbookqa": "openbookqa",
    "piqa": "piqa",
    "winogrande": "winogrande",
}
_MANAGERS: dict[tuple[str, ...], Any] = {}


def task_manager(names: tuple[str, ...] | None = None):
    """lm-eval's task index, built once per process: only the folders of `names` when all of them
    are in TASK_FOLDERS, else all of lm-eval's tasks."""
    lm_eval = require_lm_eval()
    folders = tuple(sorted({TASK_FOLDERS[n] for n in names})) if names and all(n in TASK_FOLDERS for n in names) else ()
    if folders not in _MANAGERS:
        from lm_eval.tasks import TaskManager

        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        if folders:
            root = Path(lm_eval.__file__).parent / "tasks"
            _MANAGERS[folders] = TaskManager(include_defaults=False, include_path=[str(root / f) for f in folders])
        else:
            _MANAGERS[folders] = TaskManager()
    return _MANAGERS[folders]


def _named_in_configs(name: str) -> bool:
    """Whether any of lm-eval's task configs mentions `name` (a fast negative: a task that none
    mentions is unknown, without building the whole index)."""
    lm_eval = require_lm_eval()
    needle = name.encode()
    root = Path(lm_eval.__file__).parent / "tasks"
    return any(needle in path.read_bytes() for pattern in ("*.yaml", "*.py", "_*") for path in root.rglob(pattern) if path.is_file())


def local_dataset(local: LocalTask):
    """The local documents as the `DatasetDict` lm-eval's task expects from the hub (one split)."""
    import datasets

    return datasets.DatasetDict({local.split: datasets.Dataset.from_list(local.docs)})


def build_task(name: str, local: LocalTask | None):
    """lm-eval's task `name` from its own config; with `local`, its dataset is the local split and
    the other splits are switched off (there is nothing to read for them)."""
    manager = task_manager((name,))
    if local is None:
        return manager.load([name])["tasks"][name]
    from lm_eval.tasks._factory import TaskFactory

    dataset = local_dataset(local)
    overrides: dict[str, Any] = {
        "custom_dataset": lambda **_: dataset,
        "training_split": None,
        "validation_split": local.split if local.split == "validation" else None,
        "test_split": local.split if local.split == "test" else None,
        "fewshot_split": None,
    }
    return TaskFactory().build(manager.task_index[name], overrides=overrides, registry=manager.task_index)


def _hub_error(name: str, error: Exception, data_dir: Path | None) -> UserError:
    reason = " ".join(str(error).split())[:200] or type(error).__name__
    if name in local_task_names():
        where = ", ".join(str(p) for p in expected_paths(name, data_dir or Path("$LLMQUANT_DATA")))
        return UserError(f"{name}: no local data (expected {where}; --data-dir or LLMQUANT_DATA) and the hub failed: {reason}")
    return UserError(f"{name}: no local loader for this task and the hub failed: {reason}")


def make_lm(model, tokenizer, batch_size: int, bos: str, on_batch: Callable[[int, int], None] | None = None):
    """lm-eval's HFLM around the loaded model; `on_batch(done, total)` after every forward of loglikelihood requests."""
    from lm_eval.models.huggingface import HFLM

    class Counted(HFLM):
        """HFLM that reports progress in requests (loglikelihood tasks: every task of the default set)."""

        _done = 0
        _total = 0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            self._done, self._total = 0, len(requests)
            out = super().loglikelihood(requests, disable_tqdm=True)
            if on_batch:
                on_batch(self._total, self._total)
            return out

        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask, labels)
            self._done = min(self._done + int(inps.shape[0]), self._total)
            if on_batch and self._total:
                on_batch(self._done, self._total)
            return logits

    add_bos = {"auto": None, "always": True, "never": False}[bos]
    return Counted(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, add_bos_token=add_bos)


def _split_of(task) -> str:
    return task.config.test_split if task.has_test_docs() else task.config.validation_split


def _metric_names(task) -> list[str]:
    return [m["metric"] for m in task.config.metric_list or []]


def evaluate_tasks(
    model,
    tokenizer,
    settings: TaskSettings,
    on_protocol: Callable[[str], None] | None = None,
    progress: Callable[[str, int], Callable[[int, int], None]] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every task of `settings` on the loaded `model`, one lm-eval `simple_evaluate` per task (its
    seeds, its metrics). Returns one JSON-able entry per task; on_protocol(line) before each task,
    progress(label, total) returns the callback for requests done, on_result(entry) after each."""
    require_lm_eval()
    import lm_eval

    settings.check()
    _silence_lm_eval_bars()
    data_dir = data_dir_from(settings.data_dir)
    state: dict[str, Callable[[int, int], None] | None] = {"bar": None}

    def on_batch(done: int, total: int) -> None:
        if state["bar"] is not None:
            state["bar"](done, total)

    lm = make_lm(model, tokenizer, settings.batch_size, settings.bos, on_batch)
    limit = None if settings.limit is None else (int(settings.limit) if settings.limit >= 1 else settings.limit)
    entries = []
    for name in settings.tasks:
        local = find_local_task(name, data_dir)
        try:
            task = build_task(name, local)
        except UserError:
            raise
        except Exception as error:  # the hub: unreachable, gated, missing dataset
            raise _hub_error(name, error, data_dir) from None
        split = _split_of(task)
        docs = list(task.eval_docs)
        items = len(docs) if limit is None else min(len(docs), limit if isinstance(limit, int) else int(len(docs) * limit))
        source = local.describe() if local else f"hub {task.config.dataset_path}" + (
            f" {task.config.dataset_name}" if task.config.dataset_name else ""
        )
        metrics = _metric_names(task)
        entry: dict[str, Any] = {
            "task": name,
            "split": split,
            "documents": len(docs),
            "items": items,
            "limit": settings.limit,
            "source": source,
            "data_sha256": list(local.sha256) if local else None,
            "num_fewshot": settings.num_fewshot,
            "output_type": task.config.output_type,
            "metrics": metrics,
            "batch_size": settings.batch_size,
            "lm_eval_version": lm_eval.__version__,
        }
        if on_protocol:
            on_protocol(protocol_line(entry))
        state["bar"] = progress(f"task {name}", 1) if progress else None
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # lm-eval print()s notes; stdout is for results (--json)
            output = lm_eval.simple_evaluate(
                model=lm,
                tasks=[task],
                num_fewshot=settings.num_fewshot,
                limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
                task_manager=task_manager((name,)),  # else it indexes all 13,000 of lm-eval's tasks, twice
            )
        seconds = time.perf_counter() - start
        state["bar"] = None
        scores = output["results"][name]
        entry["scores"] = {
            metric: {"value": scores.get(f"{metric},none"), "stderr": _number(scores.get(f"{metric}_stderr,none"))}
            for metric in metrics
        }
        entry["n_samples"] = (output.get("n-samples") or {}).get(name, {}).get("effective", items)
        entry["seconds"] = seconds
        entries.append(entry)
        if on_result:
            on_result(entry)
    return entries


def _silence_lm_eval_bars() -> None:
    """lm-eval's own tqdm bars (building requests) write to stderr even under --quiet and between
    llmquant's lines; llmquant's progress (requests done, ETA) replaces them."""
    import functools

    import lm_eval.api.task as task_module

    if not getattr(task_module.tqdm, "_llmquant_quiet", False):
        quiet = functools.partial(task_module.tqdm, disable=True)
        quiet._llmquant_quiet = True  # type: ignore[attr-defined]
        task_module.tqdm = quiet
    import lm_eval.evaluator as evaluator_module

    # simple_evaluate's environment report (torch's collect_env, seconds per call) is not used here.
    evaluator_module.add_env_info = lambda results: None


def _number(value: Any) -> float | None:
    return value if isinstance(value, (int, float)) else None  # lm-eval writes "N/A" where it has none


def protocol_line(entry: dict[str, Any]) -> str:
    sha = ", ".join(s[:16] for s in entry["data_sha256"]) if entry["data_sha256"] else "n/a (hub)"
    limited = f" (--limit {entry['limit']:g} of {entry['documents']})" if entry["limit"] is not None else ""
    return (
        f"task {entry['task']}: lm-eval {entry['lm_eval_version']}, split {entry['split']}, {entry['items']} items{limited}, "
        f"data {entry['source']} sha256 {sha}, {entry['num_fewshot']}-shot, metric {', '.join(entry['metrics'])}"
    )


def result_line(entry: dict[str, Any]) -> str:
    parts = []
    for metric, score in entry["scores"].items():
        value, stderr = score["value"], score["stderr"]
        if value is None:
            continue
        if metric.startswith("acc"):
            text = f"{metric} {value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")
        else:
            text = f"{metric} {value:.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")
        parts.append(text)
    return f"{entry['task']}: {', '.join(parts)}  ({entry['n_samples']} items, {entry['seconds']:.1f}s)"


def mean_accuracy(entries: list[dict[str, Any]]) -> float | None:
    """The mean `acc` over the tasks that report it (the bench's zero-shot column)."""
    values = [e["scores"][MAIN_METRIC]["value"] for e in entries if e["scores"].get(MAIN_METRIC, {}).get("value") is not None]
    return sum(values) / len(values) if values else None


def parse_task_list(items: list[str]) -> tuple[str, ...]:
    """--tasks values (repeatable, comma-separated; `default` = DEFAULT_TASKS) -> task names, in order, once each."""
    names: list[str] = []
    for item in items:
        for name in (part.strip() for part in item.split(",")):
            for expanded in DEFAULT_TASKS if name == "default" else (name,) if name else ():
                if expanded not in names:
                    names.append(expanded)
    return tuple(names)
