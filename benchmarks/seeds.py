"""Honest spread (`make bench-seeds`): the calibration-seed spread of the low-bit recipes on SmolLM2-135M, P1.

At <= 3 bits this 135M model is chaotic: float-level perturbations move its PPL by 10-15%, so one run
cannot tell apart two methods that close. This script quantizes each recipe with calibration seeds
0, 1, 2 (P1: 32 x 512 tokens; only the seed changes which windows are drawn), evaluates every
checkpoint exactly as `make bench` does (WikiText-2, P1's 128 windows, PPL and KL against the fp16
baseline in the same pass) and reports PPL and KL as mean, min and max. It then says, for every
pair of recipes, whether their ranges overlap: a difference is called larger than the spread only
where the worst seed of the better recipe beats the best seed of the worse one.

Each finished run is stored in RUNS/rows/LABEL.json, so an interrupted run resumes where it stopped
(delete a row's file to measure it again). The table is the `seeds` section of docs/results.md;
everything else in that file is kept. The JSON goes to docs/results-seeds.json.

    python benchmarks/seeds.py                                   # the five recipes x seeds 0 1 2
    python benchmarks/seeds.py --only slim-2bit --seeds 0 1      # a subset
    python benchmarks/seeds.py --variant slim-2bit-paired slim-2bit method.partial_group=paired
                                                                 # plus an ablation row over the same seeds
Several processes may share one RUNS (e.g. one per core with OMP_NUM_THREADS=1): each run is claimed
(RUNS/rows/LABEL.claim) by the first to reach it.

Time on the 2-core CPU: about 30 minutes per seed for the five recipes (quantize 100-350 s and a P1
eval of about 150 s per run), so about 1.5 hours for the whole table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ("gptq-w3g128", "slim-3bit", "slim-2bit", "billm-1bit", "pbllm-10pct")
SEEDS = (0, 1, 2)


def _run_all():
    """benchmarks/run_all.py as a module (it is a script, not part of the package): the same
    quantize + eval pipeline and the same results.md splicing as `make bench`."""
    spec = importlib.util.spec_from_file_location("llmquant_bench_run_all", ROOT / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def claim(path: Path) -> bool:
    """Takes a run for this process (several `seeds.py` may share one RUNS as a work queue, one per
    core): False if another took it first. A killed process leaves its claim: delete it to rerun."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values)}


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per recipe (or variant): its seeds' PPL, KL and top-1 as mean/min/max."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    out = []
    for group, members in groups.items():
        members.sort(key=lambda r: r["seed"])
        out.append({
            "group": group,
            "recipe": members[0]["recipe"],
            "overrides": members[0]["extra_overrides"],
            "seeds": [r["seed"] for r in members],
            "ppl": spread([r["ppl"] for r in members]),
            "kl": spread([r["kl"] for r in members]),
            "top1_agreement": spread([r["top1_agreement"] for r in members]),
            "bits": members[0]["bits"],
            "per_seed": {str(r["seed"]): {"ppl": r["ppl"], "kl": r["kl"], "top1_agreement": r["top1_agreement"]} for r in members},
        })
    return out


def separated(a: dict, b: dict, metric: str) -> str | None:
    """'a' or 'b' where that recipe's worst seed beats the other's best seed on `metric` (lower is
    better), None where their ranges overlap."""
    if a[metric]["max"] < b[metric]["min"]:
        return "a"
    if b[metric]["max"] < a[metric]["min"]:
        return "b"
    return None


def comparisons(summary: list[dict]) -> list[str]:
    lines = []
    for i, a in enumerate(summary):
        for b in summary[i + 1:]:
            verdicts = {m: separated(a, b, m) for m in ("ppl", "kl")}
            if verdicts["ppl"] is None and verdicts["kl"] is None:
                lines.append(f"- `{a['group']}` vs `{b['group']}`: **within the spread** (PPL and KL ranges overlap)")
                continue
            parts = []
            for metric, name in (("ppl", "PPL"), ("kl", "KL")):
                winner = verdicts[metric]
                if winner is None:
                    parts.append(f"{name} ranges overlap")
                else:
                    better, worse = (a, b) if winner == "a" else (b, a)
                    ratio = worse[metric]["mean"] / better[metric]["mean"]
                    parts.append(f"{name}: `{better['group']}` better beyond the spread (means {ratio:.2f}x apart)")
            lines.append(f"- `{a['group']}` vs `{b['group']}`: " + "; ".join(parts))
    return lines


def loss_ratios(reports: Path, variant: str, base: str, seeds: list[int]) -> list[str]:
    """Markdown lines comparing two groups' quantize reports seed by seed: per linear, the variant's
    output loss over the base's (layer 0 sees identical inputs in both runs; later layers see the
    outputs of already different earlier layers, so their ratios are indicative), geometric means
    over the linears whose choice differs, and how many linears chose a partial shift."""
    lines = []
    for seed in seeds:
        files = [reports / f"{group}-seed{seed}.json" for group in (variant, base)]
        if not all(f.is_file() for f in files):
            continue
        runs = [json.loads(f.read_text()) for f in files]
        linears = [{x["name"]: x for layer in r["layers"] for x in layer["linears"]} for r in runs]
        shifted = [n for n, x in linears[0].items() if x.get("stats", {}).get("partial_shift")]
        layer0 = {n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1]: linears[0][n]["loss"] / linears[1][n]["loss"]
                  for n in linears[0] if ".layers.0." in n and linears[1][n]["loss"] > 0}
        differing = [n for n in linears[0] if linears[0][n]["loss"] != linears[1][n]["loss"] and linears[1][n]["loss"] > 0]
        geo = math.exp(sum(math.log(linears[0][n]["loss"] / linears[1][n]["loss"]) for n in differing) / max(len(differing), 1))
        total = sum(x["loss"] for x in linears[0].values()) / sum(x["loss"] for x in linears[1].values())
        lines.append(
            f"- seed {seed}: {len(shifted)} of {len(linears[0])} linears took a partial shift; layer 0 loss "
            f"`{variant}`/`{base}`: " + ", ".join(f"{k} {v:.3f}" for k, v in layer0.items())
            + f"; over all {len(differing)} linears whose result differs, geometric mean {geo:.3f}; summed loss ratio {total:.3f}"
        )
    return lines


def table(summary: list[dict], baseline: dict, meta: dict) -> str:
    def rng(s: dict, spec: str) -> str:
        return f"{s['mean']:{spec}} [{s['min']:{spec}}, {s['max']:{spec}}]"

    def seeds_of(entry: dict, metric: str, spec: str) -> str:
        return " / ".join(f"{entry['per_seed'][str(s)][metric]:{spec}}" for s in entry["seeds"])

    lines = [
        "## Calibration-seed spread (protocol P1)",
        "",
        f"Generated by `python benchmarks/seeds.py` ({meta['finished']}, {meta['machine']}, commit {meta['commit']}). "
        f"Model: SmolLM2-135M as in the table above; every run is P1 (calibration 32 x 512 tokens, eval on "
        f"WikiText-2's first 128 windows of 512, PPL and KL in one pass), only the calibration seed changes. "
        f"Threads per process (OMP_NUM_THREADS): {meta['threads']}; the thread count changes float reductions and "
        f"so the bits, which is why a seed-0 row can differ from `make bench`'s 2-thread row above. "
        f"Full precision: PPL {baseline['ppl']:.2f}.",
        "",
        "Mean [min, max] over the seeds; the last two columns give each seed's figure in seed order.",
        "",
        "| recipe | overrides | seeds | PPL mean [min, max] | KL mean [min, max] | top-1 mean | PPL per seed | KL per seed | code bits |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in summary:
        overrides = " ".join(f"`{o}`" for o in e["overrides"]) or "—"
        lines.append(
            f"| {e['group']} | {overrides} | {', '.join(map(str, e['seeds']))} | {rng(e['ppl'], ',.2f')} | {rng(e['kl'], '.4f')} "
            f"| {e['top1_agreement']['mean']:.1%} | {seeds_of(e, 'ppl', ',.1f')} | {seeds_of(e, 'kl', '.3f')} | {e['bits'].get('code', 0):.3f} |"
        )
    lines += ["", "Which differences are larger than the seed spread (the better recipe's worst seed beats the "
              "other's best seed):", "", *comparisons(summary)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="recipe stems or variant labels to run (default: all)")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS))
    parser.add_argument("--variant", nargs="+", action="append", default=[], metavar=("LABEL RECIPE", "SET"),
                        help="an extra row: label, recipe stem and --set overrides, over the same seeds")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "seeds")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each run's packed checkpoint (about 90 MB each)")
    parser.add_argument("--md", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--json", type=Path, default=ROOT / "docs" / "results-seeds.json")
    args = parser.parse_args()
    os.environ.setdefault("LLMQUANT_DATA", str(ROOT.parent / "shared" / "data"))
    bench = _run_all()
    bench.with_tasks = False  # the spread is measured on PPL and KL; the zero-shot column is make bench's

    plan = [(stem, stem, []) for stem in RECIPES]
    for variant in args.variant:
        if len(variant) < 2:
            parser.error("--variant needs LABEL RECIPE [SET ...]")
        plan.append((variant[0], variant[1], variant[2:]))
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    rows_dir = args.runs / "rows"
    rows_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    base = bench.baseline_dir(args.runs)
    fp = bench.baseline_evaluation(base, args.runs, quick=False)
    baseline = {"ppl": fp["ppl"]}
    print(f"full precision: ppl {fp['ppl']:.3f}", flush=True)
    for group, stem, sets in plan:
        for seed in args.seeds:
            label = f"{group}-seed{seed}"
            stored = rows_dir / f"{label}.json"
            if stored.is_file():
                print(f"== {label}: kept from {stored}", flush=True)
                continue
            if not claim(rows_dir / f"{label}.claim"):
                print(f"== {label}: claimed by another process (delete {label}.claim if none runs)", flush=True)
                continue
            print(f"== {label}", flush=True)
            # reuse=True: a checkpoint of this very recipe left by an interrupted run is evaluated, not remade
            row = bench.run_one(label, ROOT / "recipes" / f"{stem}.yaml", [*sets, f"calibration.seed={seed}"], base, args.runs, reuse=True)
            # The thread count changes float reductions, hence the bits (docs/reliability.md): recorded
            row.update(group=group, seed=seed, extra_overrides=sets, omp_num_threads=os.environ.get("OMP_NUM_THREADS"))
            stored.write_text(json.dumps(row, indent=2) + "\n")
            print(f"   ppl {row['ppl']:.3f}, KL {row['kl']:.4f}, quantize {row['quantize_seconds']:.0f}s, eval {row['eval_seconds']:.0f}s",
                  flush=True)
            # The quantize report (per-linear losses and stats) outlives the checkpoint: RUNS/reports/.
            (args.runs / "reports").mkdir(exist_ok=True)
            shutil.copyfile(args.runs / label / "llmquant.json", args.runs / "reports" / f"{label}.json")
            if not args.keep_checkpoints:
                shutil.rmtree(args.runs / label, ignore_errors=True)
    # Every stored row counts (earlier invocations' too), in the plan's order, then any others.
    order = {group: i for i, (group, _, _) in enumerate(plan)}
    rows = [json.loads(p.read_text()) for p in sorted(rows_dir.glob("*.json"))]
    rows.sort(key=lambda r: (order.get(r["group"], len(order)), r["group"], r["seed"]))
    summary = summarize(rows)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    threads = sorted({str(r.get("omp_num_threads") or "not recorded") for r in rows})
    meta = {"finished": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": bench.machine(), "commit": commit or "?",
            "threads": ", ".join(threads)}
    block = table(summary, baseline, meta)
    for group, stem, sets in plan:  # a variant row: its per-linear losses against its recipe's plain row
        lines = loss_ratios(args.runs / "reports", group, stem, args.seeds) if sets else []
        if lines:
            block += f"\n\nPer-linear output loss of `{group}` against `{stem}` (quantize reports, same seed):\n\n" + "\n".join(lines)
    previous = args.md.read_text() if args.md.is_file() else ""
    args.md.write_text(bench.splice(previous, "seeds", block))
    args.json.write_text(json.dumps({**meta, "baseline": baseline, "summary": summary, "runs": rows}, indent=2) + "\n")
    print(block)
    print(f"wrote {args.md} and {args.json} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
