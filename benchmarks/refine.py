"""The gradient-based second halves against their first (issue #15): refined recipes and PB-LLM QAT, P1.

Each row pairs a run with the unrefined run it starts from, both quantized with P1 calibration (32 x
512, seed 0) on SmolLM2-135M and evaluated exactly as `make bench` does (WikiText-2, P1's 128 windows,
PPL and KL against the fp16 baseline in one pass):

    slim-plus-2bit       vs slim-2bit        goal: PPL <= 0.65x, KL lower
    slim-plus-3bit       vs slim-3bit        goal: PPL lower
    gptq-w2g128-refined  vs gptq-w2g128      goal: PPL < 1,000
    billm-1bit-refined   vs billm-1bit       goal: PPL <= 0.5x
    pbllm-10pct-refined  vs pbllm-10pct      goal: PPL <= 0.5x
    pbllm-10pct-qat      vs pbllm-10pct      goal: PPL below pbllm-10pct-refined's
                         (`llmquant train` from the pbllm-10pct checkpoint; --qat-steps)

Every unrefined run is measured here, on the same machine as its refined run (cpu_model: another
CPU gives other bytes). Every finished run is stored in RUNS/rows/LABEL.json (an interrupted run
resumes; a checkpoint of the same recipe already in RUNS/LABEL is evaluated, not remade).
The table is the `refine` section of docs/results.md; the JSON docs/results-refine.json.

    python benchmarks/refine.py                           # everything (hours on the 2-core CPU)
    python benchmarks/refine.py --only pbllm-10pct-qat    # one row (and its base)

Rows ending in -keep run their recipe with `--set refine.codes=keep` (docs/refine.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [  # (label, base label, goal text, goal test on (row, base, rows))
    ("slim-plus-2bit", "slim-2bit", "PPL <= 0.65x and KL lower"),
    ("slim-plus-3bit", "slim-3bit", "PPL lower"),
    ("gptq-w2g128-refined", "gptq-w2g128", "PPL < 1,000"),
    ("billm-1bit-refined", "billm-1bit", "PPL <= 0.5x"),
    ("pbllm-10pct-refined", "pbllm-10pct", "PPL <= 0.5x"),
    ("pbllm-10pct-qat", "pbllm-10pct", "PPL below pbllm-10pct-refined"),
    # `refine.codes: keep` (docs/refine.md): the method's codes kept, the scales of 2..8-bit groups
    # learned, against the same base and goal as the recipe as shipped (OmniQuant LWC, codes re-derived)
    ("slim-plus-2bit-keep", "slim-2bit", "PPL <= 0.65x and KL lower"),
    ("slim-plus-3bit-keep", "slim-3bit", "PPL lower"),
    ("gptq-w2g128-refined-keep", "gptq-w2g128", "PPL < 1,000"),
    # the moonshot (<= 2.1 code bits, PPL < 100): codes kept, 4 epochs over all 32 calibration windows
    ("slim-plus-2bit-keep-e4w32", "slim-2bit", "PPL < 100 at <= 2.1 code bits"),
]
VARIANTS = {label: (label.removesuffix("-keep"), ["refine.codes=keep"]) for label, _, _ in PAIRS if label.endswith("-keep")}
VARIANTS["slim-plus-2bit-keep-e4w32"] = ("slim-plus-2bit", ["refine.codes=keep", "refine.epochs=4", "refine.windows=32"])


def goal_met(label: str, row: dict, base: dict, rows: dict) -> bool | None:
    ratio = row["ppl"] / base["ppl"]
    if label == "slim-plus-2bit-keep-e4w32":
        return row["ppl"] < 100 and row["bits"]["code"] <= 2.1
    label = label.removesuffix("-keep")  # a variant has its recipe's goal
    if label == "slim-plus-2bit":
        return ratio <= 0.65 and row["kl"] < base["kl"]
    if label == "slim-plus-3bit":
        return ratio < 1
    if label == "gptq-w2g128-refined":
        return row["ppl"] < 1000
    if label in ("billm-1bit-refined", "pbllm-10pct-refined"):
        return ratio <= 0.5
    if label == "pbllm-10pct-qat":
        refined = rows.get("pbllm-10pct-refined")
        return None if refined is None else row["ppl"] < refined["ppl"]
    return None


def _run_all():
    spec = importlib.util.spec_from_file_location("llmquant_bench_run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cpu_model() -> str:
    """The processor's name: another CPU rounds floats differently (other SIMD widths and kernels),
    so the same recipe gives other bytes, and at 1-2 bits a perplexity tens of percent away (PB-LLM
    10%, seed 0: 1,412 in benchmarks/seeds.py's row from an earlier session's machine, 1,672 on this
    session's Intel Xeon, the same code and thread count). A refined run is
    therefore compared with its base measured on the same machine, never with another machine's row."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def stored_row(path: Path) -> dict | None:
    """A row stored by an earlier invocation on this machine (a row from another CPU, e.g. one
    committed to the repository, is measured again rather than paired with this machine's runs)."""
    if not path.is_file():
        return None
    row = json.loads(path.read_text())
    return row if row.get("cpu") == cpu_model() else None


def base_row(bench, label: str, base: Path, runs: Path) -> dict:
    """The unrefined run, measured here (RUNS/rows/LABEL.json; a checkpoint of the same recipe left
    in RUNS/LABEL, e.g. the QAT start, is evaluated, not remade)."""
    stored = runs / "rows" / f"{label}.json"
    row = stored_row(stored)
    if row is not None:
        return row
    row = bench.run_one(label, ROOT / "recipes" / f"{label}.yaml", [], base, runs, reuse=True)
    row["cpu"] = cpu_model()
    stored.write_text(json.dumps(row, indent=2) + "\n")
    return row


def qat_row(bench, base: Path, runs: Path, steps: int, lr: float, seqlen: int, start_dir: Path | None) -> dict:
    """pbllm-10pct quantized here (its checkpoint is needed; or `start_dir`, one made by the same
    recipe), trained with `llmquant train`; both the start and the result evaluated, so the row
    compares the training with exactly the checkpoint it started from."""
    start_dir = start_dir or runs / "pbllm-10pct"
    if not (start_dir / "model.safetensors").is_file():
        bench.llmquant("quantize", "--recipe", str(ROOT / "recipes" / "pbllm-10pct.yaml"), "--protocol", "p1",
                       "--model", str(base), "--output", str(start_dir), "--force")
    start_eval = bench.evaluate(start_dir, base, runs / "kl-cache")
    out = runs / "pbllm-10pct-qat"
    started = time.perf_counter()
    report = bench.llmquant("train", "--model", str(start_dir), "--output", str(out), "--force", "--dataset", "wikitext2",
                            "--steps", str(steps), "--seqlen", str(seqlen), "--batch-size", "1", "--lr", str(lr))
    evaluation = bench.evaluate(out, base, runs / "kl-cache")
    return {
        "label": "pbllm-10pct-qat",
        "recipe": "pbllm-10pct.yaml + llmquant train",
        "train": {k: report[k] for k in ("settings", "steps", "tokens", "loss_first", "loss_last", "trained_parameters")},
        "ppl": evaluation["ppl"], "kl": evaluation.get("kl"), "top1_agreement": evaluation.get("top1_agreement"),
        "eval_seconds": evaluation["seconds"],
        "start": {"checkpoint": str(start_dir), "ppl": start_eval["ppl"], "kl": start_eval.get("kl")},
        "quantize_seconds": report["time_seconds"]["train"],  # the training (the PB-LLM run before it: its own row)
        "peak_rss_bytes": report["peak_memory"]["rss_bytes"],
        "wall_seconds": time.perf_counter() - started,
    }


def table(rows: dict, pairs: list, meta: dict) -> str:
    lines = [
        "## Refinement and QAT against their unrefined runs (protocol P1)",
        "",
        f"Generated by `python benchmarks/refine.py` ({meta['finished']}, {meta['machine']}, commit {meta['commit']}). "
        "SmolLM2-135M, P1 calibration (32 x 512, seed 0) and evaluation (WikiText-2, first 128 windows of 512). "
        "Refined recipes: recipes/*-refined.yaml and slim-plus-*.yaml (their `refine:` blocks; docs/refine.md). "
        "QAT: `llmquant train` from the pbllm-10pct checkpoint (docs/methods/pbllm.md).",
        "",
        "Rows ending in `-keep`: the recipe with `--set refine.codes=keep` (the method's codes kept, the "
        "scales of 2..8-bit groups learned; docs/refine.md); `-keep-e4w32`: also `refine.epochs=4`, "
        "`refine.windows=32` (all calibration windows).",
        "",
        "| run | from | PPL from → to | × | KL from → to | goal | met | quantize/train s | peak RSS GiB |",
        "|---|---|---:|---:|---:|---|---|---:|---:|",
    ]
    for label, base_label, goal in pairs:
        row, base = rows.get(label), rows.get(base_label)
        if row is not None and "start" in row:  # QAT: against the very checkpoint it started from
            base = row["start"]
        if row is None or base is None:
            continue
        met = goal_met(label, row, base, rows)
        lines.append(
            f"| {label} | {base_label} | {base['ppl']:,.2f} → {row['ppl']:,.2f} | {row['ppl'] / base['ppl']:.3f} "
            f"| {base['kl']:.4f} → {row['kl']:.4f} | {goal} | {'—' if met is None else 'yes' if met else '**no**'} "
            f"| {row['quantize_seconds']:.0f} | {row['peak_rss_bytes'] / 2**30:.2f} |"
        )
    qat = rows.get("pbllm-10pct-qat")
    if qat:
        t = qat["train"]
        s = t["settings"]
        lines += ["", f"QAT run: {t['steps']} steps of {s['batch_size']} x {s['seqlen']} tokens of {s['dataset']} "
                  f"({t['tokens']:,} tokens), lr {s['lr']}, warm-up {s['warmup']:.0%} then cosine, "
                  f"{t['trained_parameters']:,} trained parameters; training loss {t['loss_first']:.3f} → {t['loss_last']:.3f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="labels to run (their bases come along)")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "refine")
    parser.add_argument("--qat-steps", type=int, default=300)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--qat-seqlen", type=int, default=512)
    parser.add_argument("--qat-start", type=Path, help="a pbllm-10pct checkpoint to train from (default: quantized here)")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results-refine.json")
    args = parser.parse_args()
    os.environ.setdefault("LLMQUANT_DATA", str(ROOT.parent / "shared" / "data"))
    bench = _run_all()
    bench.with_tasks = False
    runs = args.runs
    (runs / "rows").mkdir(parents=True, exist_ok=True)
    base = bench.baseline_dir(runs)
    bench.baseline_evaluation(base, runs, quick=False)
    pairs = [p for p in PAIRS if not args.only or p[0] in args.only]
    rows: dict[str, dict] = {}
    for label, base_label, _ in pairs:
        if label != "pbllm-10pct-qat":  # QAT's base is its own start checkpoint (qat_row)
            rows[base_label] = rows.get(base_label) or base_row(bench, base_label, base, runs)
        stored = runs / "rows" / f"{label}.json"
        if (row := stored_row(stored)) is not None:
            rows[label] = row
            continue
        print(f"== {label}", flush=True)
        if label == "pbllm-10pct-qat":
            row = qat_row(bench, base, runs, args.qat_steps, args.qat_lr, args.qat_seqlen, args.qat_start)
        else:
            # reuse=True: a checkpoint of this very recipe already in RUNS/LABEL (an interrupted run,
            # or one quantized in another process) is evaluated, not remade
            stem, sets = VARIANTS.get(label, (label, []))
            row = bench.run_one(label, ROOT / "recipes" / f"{stem}.yaml", sets, base, runs, reuse=True)
        row["cpu"] = cpu_model()
        stored.write_text(json.dumps(row, indent=2) + "\n")
        rows[label] = row
        print(f"   ppl {row['ppl']:.3f}, KL {row['kl']:.4f}", flush=True)
    for stored in (runs / "rows").glob("*.json"):  # rows of earlier invocations (on this CPU) count too
        if (row := stored_row(stored)) is not None:
            rows.setdefault(stored.stem, row)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    meta = {
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{bench.machine()}, {cpu_model()}",
        "commit": commit,
    }
    block = table(rows, PAIRS, meta)
    previous = args.md.read_text() if args.md.is_file() else ""
    args.md.write_text(bench.splice(previous, "refine", block))
    args.json.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    print(block)


if __name__ == "__main__":
    sys.exit(main())
