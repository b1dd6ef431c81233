"""Markdown table of `llmquant eval --tasks --json` outputs: one row per model, acc ± stderr per task,
the mean acc, items and seconds per task. Files of one model (NAME-limitL.json, or one per task,
NAME-limitL-TASK.json, as benchmarks/measure_tasks.sh writes them) are merged into one row; a dash
marks a task a row lacks, and its mean (a mean over fewer tasks would not compare). Usage:

    python benchmarks/tasks_table.py runs/tasks/fp16-limit100.json runs/tasks/gptq-w3g128-s8-limit100.json
    python benchmarks/tasks_table.py runs/tasks/*-limitall-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def model_name(path: Path, report: dict) -> str:
    """NAME-limitL from NAME-limitL.json or NAME-limitL-TASK.json."""
    stem = path.stem
    tasks = [e["task"] for e in report["tasks"]]
    if len(tasks) == 1 and stem.endswith("-" + tasks[0]):
        return stem[: -len(tasks[0]) - 1]
    return stem


def main(paths: list[str]) -> None:
    merged: dict[str, dict] = {}
    for p in paths:
        report = json.loads(Path(p).read_text())
        merged.setdefault(model_name(Path(p), report), {"tasks": []})["tasks"].extend(report["tasks"])
    reports = list(merged.items())
    tasks = list(dict.fromkeys(e["task"] for _, r in reports for e in r["tasks"]))
    print("| model | " + " | ".join(f"{t} acc" for t in tasks) + " | mean acc |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for name, report in reports:
        by_task = {e["task"]: e for e in report["tasks"]}
        cells = []
        for t in tasks:
            score = by_task[t]["scores"]["acc"] if t in by_task else None
            cells.append(f"{100 * score['value']:.1f} ± {100 * (score['stderr'] or 0):.1f}" if score else "—")
        values = [by_task[t]["scores"]["acc"]["value"] for t in tasks if t in by_task]
        # a mean over fewer tasks than the other rows' would not compare with them
        mean = f"{100 * sum(values) / len(values):.1f}" if len(values) == len(tasks) else "—"
        print(f"| {name} | " + " | ".join(cells) + f" | {mean} |")
    print()
    print("| model | " + " | ".join(f"{t} items, s" for t in tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    for name, report in reports:
        by_task = {e["task"]: e for e in report["tasks"]}
        cells = [f"{by_task[t]['items']}, {by_task[t]['seconds']:.0f}" if t in by_task else "—" for t in tasks]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
