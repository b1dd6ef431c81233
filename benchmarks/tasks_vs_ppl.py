"""Zero-shot accuracy beside WikiText-2 PPL and KL for every checkpoint measured on this machine, and
whether the two rank the checkpoints alike (Spearman's rank correlation; docs/results-tasks.md).

    python benchmarks/tasks_vs_ppl.py --limit 100 [--json out.json]   # the bench's task set, 100 documents
    python benchmarks/tasks_vs_ppl.py --limit all                      # full splits

Task scores: runs/tasks/NAME-limitL-TASK.json (benchmarks/measure_tasks.sh). PPL and KL (protocol
P1, against the fp16 baseline) come from runs on the same machine: docs/results-refine.json's rows
(benchmarks/refine.py) and runs/refine/evals/NAME.json (`llmquant eval --ppl wikitext2 --protocol p1
--kl --json`). A checkpoint without both is listed with dashes and left out of the correlations.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Task-run names whose refine-table row has another label.
REFINE_LABELS = {"slim-2bit-refined": "slim-plus-2bit-keep", "slim-3bit-refined": "slim-plus-3bit-keep"}
FP16 = {"ppl": 30.475715847789367, "kl": 0.0}  # the P1 baseline's own PPL (every eval JSON's reference_ppl)


def quality(name: str) -> dict | None:
    if name == "fp16":
        return FP16
    rows = json.loads((ROOT / "docs" / "results-refine.json").read_text())["rows"]
    row = rows.get(REFINE_LABELS.get(name, name))
    if row is not None:
        return {"ppl": row["ppl"], "kl": row["kl"]}
    path = ROOT / "runs" / "refine" / "evals" / f"{name}.json"
    if path.is_file():
        result = json.loads(path.read_text())["results"][0]
        return {"ppl": result["ppl"], "kl": result["kl"]}
    return None


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--limit", default="100")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    models: dict[str, dict] = {}
    for path in sorted((ROOT / "runs" / "tasks").glob(f"*-limit{args.limit}-*.json")):
        report = json.loads(path.read_text())
        for entry in report["tasks"]:
            name = path.stem[: -len(f"-limit{args.limit}-{entry['task']}")]
            models.setdefault(name, {})[entry["task"]] = entry
    tasks = sorted({t for scores in models.values() for t in scores})
    rows = []
    for name, scores in models.items():
        complete = all(t in scores for t in tasks)
        mean = sum(scores[t]["scores"]["acc"]["value"] for t in tasks) / len(tasks) if complete else None
        rows.append({"model": name, "mean_acc": mean, **(quality(name) or {"ppl": None, "kl": None}),
                     "acc": {t: scores[t]["scores"]["acc"]["value"] for t in scores},
                     "stderr": {t: scores[t]["scores"]["acc"]["stderr"] for t in scores},
                     "seconds": {t: scores[t]["seconds"] for t in scores}})  # fmt: skip
    rows.sort(key=lambda r: (r["kl"] is None, r["kl"] if r["kl"] is not None else 0.0))
    print("| model | PPL | KL | " + " | ".join(f"{t} acc" for t in tasks) + " | mean acc |")
    print("|---|---:|---:|" + "---:|" * (len(tasks) + 1))
    for r in rows:
        cells = [f"{100 * r['acc'][t]:.1f}" if t in r["acc"] else "—" for t in tasks]
        ppl = f"{r['ppl']:,.1f}" if r["ppl"] is not None else "—"
        kl = f"{r['kl']:.3f}" if r["kl"] is not None else "—"
        mean = f"{100 * r['mean_acc']:.1f}" if r["mean_acc"] is not None else "—"
        print(f"| {r['model']} | {ppl} | {kl} | " + " | ".join(cells) + f" | {mean} |")
    usable = [r for r in rows if r["kl"] is not None and r["mean_acc"] is not None]
    correlations = {}
    if len(usable) >= 3:
        correlations["mean_acc_vs_kl"] = spearman([r["mean_acc"] for r in usable], [-r["kl"] for r in usable])
        correlations["mean_acc_vs_ppl"] = spearman([r["mean_acc"] for r in usable], [-r["ppl"] for r in usable])
        for t in tasks:
            correlations[f"{t}_vs_kl"] = spearman([r["acc"][t] for r in usable], [-r["kl"] for r in usable])
        print(f"\nSpearman rank correlation over {len(usable)} models (1 = the same order as lower KL / PPL):")
        for key, value in correlations.items():
            print(f"- {key}: {value:+.2f}")
    if args.json:
        args.json.write_text(json.dumps({"limit": args.limit, "tasks": tasks, "rows": rows, "spearman": correlations}, indent=1) + "\n")


if __name__ == "__main__":
    main()
