"""Markdown table of `llmquant eval --tasks --json` outputs: one row per model, acc ± stderr per task,
the mean acc, items and seconds per task. Usage:

    python benchmarks/tasks_table.py runs/tasks/fp16-limit100.json runs/tasks/gptq-w3g128-s8-limit100.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(paths: list[str]) -> None:
    reports = [(Path(p).stem, json.loads(Path(p).read_text())) for p in paths]
    tasks = [e["task"] for e in reports[0][1]["tasks"]]
    print("| model | " + " | ".join(f"{t} acc" for t in tasks) + " | mean acc |")
    print("|---|" + "---:|" * (len(tasks) + 1))
    for name, report in reports:
        by_task = {e["task"]: e for e in report["tasks"]}
        cells = []
        for t in tasks:
            score = by_task[t]["scores"]["acc"] if t in by_task else None
            cells.append(f"{100 * score['value']:.1f} ± {100 * (score['stderr'] or 0):.1f}" if score else "—")
        values = [by_task[t]["scores"]["acc"]["value"] for t in tasks if t in by_task]
        print(f"| {name} | " + " | ".join(cells) + f" | {100 * sum(values) / len(values):.1f} |")
    print()
    print("| model | " + " | ".join(f"{t} items, s" for t in tasks) + " |")
    print("|---|" + "---:|" * len(tasks))
    for name, report in reports:
        by_task = {e["task"]: e for e in report["tasks"]}
        print(f"| {name} | " + " | ".join(f"{by_task[t]['items']}, {by_task[t]['seconds']:.0f}" for t in tasks if t in by_task) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
