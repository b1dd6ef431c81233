"""Local copies of the zero-shot tasks' evaluation splits, as the documents lm-eval's task configs read.

lm-evaluation-harness loads these tasks from the Hugging Face hub; the upstream files (the layout of
the project's shared data, `tasks/README.md` there: provenance, checksums, licences) have other
field names. Each loader here turns one task's file(s) into the rows of the hub dataset lm-eval's
YAML names, with the fields that YAML reads (and only values derived from the file):

    task            files under <data-dir>/tasks/            split       hub dataset lm-eval reads
    piqa            piqa/valid.jsonl + valid-labels.lst      validation  baber/piqa
    arc_easy        arc_easy/ARC-Easy-Test.jsonl             test        allenai/ai2_arc ARC-Easy
    arc_challenge   arc_challenge/ARC-Challenge-Test.jsonl   test        allenai/ai2_arc ARC-Challenge
    winogrande      winogrande/dev.jsonl                     validation  allenai/winogrande winogrande_xl
    boolq           boolq/val.jsonl (else boolq/dev.jsonl)   validation  aps/super_glue boolq
    lambada_openai  lambada_openai/lambada_test.jsonl        test        EleutherAI/lambada_openai
    openbookqa      openbookqa/test.jsonl                    test        allenai/openbookqa main

HellaSwag has no local loader: the shared data holds only llama.cpp's derived text, whose prompts
cannot be rebuilt exactly (its README), so `hellaswag` needs the hub.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmquant.errors import UserError

TASKS_SUBDIR = "tasks"


@dataclass(frozen=True)
class LocalTask:
    """One task's local split: its documents (hub field names) and the files they came from."""

    task: str
    split: str
    docs: list[dict[str, Any]]
    files: tuple[Path, ...]
    sha256: tuple[str, ...]

    def describe(self) -> str:
        return ", ".join(str(f) for f in self.files)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return rows


def _labels(path: Path, count: int, data: Path) -> list[int]:
    labels = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(labels) != count:
        raise UserError(f"{path}: {len(labels)} labels for the {count} documents of {data}")
    try:
        return [int(label) for label in labels]
    except ValueError:
        raise UserError(f"{path}: labels must be integers") from None


def _choices(question: dict[str, Any]) -> dict[str, list[str]]:
    """ARC/OpenBookQA `question.choices` [{text, label}, ...] -> the hub's {"text": [...], "label": [...]}."""
    options = question["choices"]
    return {"text": [c["text"] for c in options], "label": [c["label"] for c in options]}


def _piqa(paths: list[Path]) -> list[dict[str, Any]]:
    rows = _jsonl(paths[0])
    labels = _labels(paths[1], len(rows), paths[0])
    return [{"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": label} for r, label in zip(rows, labels)]


def _arc(paths: list[Path]) -> list[dict[str, Any]]:
    return [
        {"id": r["id"], "question": r["question"]["stem"], "choices": _choices(r["question"]), "answerKey": r["answerKey"]}
        for r in _jsonl(paths[0])
    ]


def _winogrande(paths: list[Path]) -> list[dict[str, Any]]:
    return [
        {"sentence": r["sentence"], "option1": r["option1"], "option2": r["option2"], "answer": str(r["answer"])}
        for r in _jsonl(paths[0])
    ]


def _boolq_superglue(paths: list[Path]) -> list[dict[str, Any]]:
    return [{"question": r["question"], "passage": r["passage"], "idx": r["idx"], "label": int(r["label"])} for r in _jsonl(paths[0])]


def _boolq_google(paths: list[Path]) -> list[dict[str, Any]]:
    """The Google release: SuperGLUE's passage is `title -- passage`, its label the boolean answer."""
    return [
        {"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(_jsonl(paths[0]))
    ]


def _lambada(paths: list[Path]) -> list[dict[str, Any]]:
    return [{"text": r["text"]} for r in _jsonl(paths[0])]


def _openbookqa(paths: list[Path]) -> list[dict[str, Any]]:
    return [
        {"id": r["id"], "question_stem": r["question"]["stem"], "choices": _choices(r["question"]), "answerKey": r["answerKey"]}
        for r in _jsonl(paths[0])
    ]


@dataclass(frozen=True)
class Layout:
    split: str
    alternatives: tuple[tuple[tuple[str, ...], Callable[[list[Path]], list[dict[str, Any]]]], ...]  # first complete one wins
    fields: tuple[str, ...]  # the fields lm-eval's task config reads


LAYOUTS: dict[str, Layout] = {
    "piqa": Layout("validation", ((("piqa/valid.jsonl", "piqa/valid-labels.lst"), _piqa),), ("goal", "sol1", "sol2", "label")),
    "arc_easy": Layout("test", ((("arc_easy/ARC-Easy-Test.jsonl",), _arc),), ("question", "choices", "answerKey")),
    "arc_challenge": Layout("test", ((("arc_challenge/ARC-Challenge-Test.jsonl",), _arc),), ("question", "choices", "answerKey")),
    "winogrande": Layout("validation", ((("winogrande/dev.jsonl",), _winogrande),), ("sentence", "option1", "option2", "answer")),
    "boolq": Layout(
        "validation",
        ((("boolq/val.jsonl",), _boolq_superglue), (("boolq/dev.jsonl",), _boolq_google)),
        ("passage", "question", "label"),
    ),
    "lambada_openai": Layout("test", ((("lambada_openai/lambada_test.jsonl",), _lambada),), ("text",)),
    "openbookqa": Layout("test", ((("openbookqa/test.jsonl",), _openbookqa),), ("question_stem", "choices", "answerKey")),
}


def local_task_names() -> list[str]:
    return sorted(LAYOUTS)


def tasks_root(data_dir: Path) -> Path:
    """`<data-dir>/tasks` (the shared data's layout), or `data_dir` itself when it holds the task folders."""
    nested = data_dir / TASKS_SUBDIR
    return nested if nested.is_dir() else data_dir


def expected_paths(task: str, data_dir: Path) -> list[Path]:
    """Where the local files of `task` are looked for (the first alternative's files)."""
    root = tasks_root(data_dir)
    return [root / name for name in LAYOUTS[task].alternatives[0][0]]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_local_task(task: str, data_dir: Path | None) -> LocalTask | None:
    """The task's documents from `data_dir`, or None when it has no local loader or no files there."""
    layout = LAYOUTS.get(task)
    if layout is None or data_dir is None:
        return None
    root = tasks_root(data_dir)
    for names, reader in layout.alternatives:
        paths = [root / name for name in names]
        if all(p.is_file() for p in paths):
            docs = reader(paths)
            missing = [f for f in layout.fields if docs and f not in docs[0]]
            assert not missing, f"{task}: loader lacks {missing}"
            return LocalTask(task, layout.split, docs, tuple(paths), tuple(file_sha256(p) for p in paths))
    return None
