"""Packed checkpoints run exactly like their fake-quant twins (docs/format.md).

For every run directory that `make bench` left under runs/bench/: convert it with `llmquant pack
--format fake --dtype float32`, load both in float32 (the packed one through llmquant's loader, the fake one with plain
transformers), and compare logits (torch.equal) and perplexity on the first WINDOWS windows of the
P1 WikiText-2 stream. Prints a table and writes runs/bench/packed_vs_fake.json.

    python benchmarks/packed_vs_fake.py [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "bench")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--only", nargs="*", help="run directory names")
    args = parser.parse_args()
    os.environ.setdefault("LLMQUANT_DATA", str(ROOT.parent / "shared" / "data"))

    from transformers import AutoModelForCausalLM

    from llmquant.data.streams import build_eval_stream
    from llmquant.evaluate import perplexity
    from llmquant.formats import is_packed_checkpoint
    from llmquant.runtime import load_quantized
    from llmquant.models.loading import load_tokenizer

    rows = []
    runs = [p for p in args.runs.iterdir() if p.is_dir() and not p.name.startswith(".") and is_packed_checkpoint(p)]
    if args.only:
        runs = [p for p in runs if p.name in args.only]
    for run in sorted(runs):
        fake = args.runs / f"{run.name}.fake"
        if not fake.exists():
            subprocess.run(
                # float32: the decoded weights unrounded, so both models compute on identical weights
                # (an fp16 fake copy equals the packed model run in fp16, not in fp32).
                [sys.executable, "-m", "llmquant.cli", "pack", "--model", str(run), "--format", "fake",
                 "--dtype", "float32", "--output", str(fake)],
                check=True, cwd=ROOT, capture_output=True,
            )
        t0 = time.perf_counter()
        packed_model = load_quantized(run, dtype=torch.float32)
        packed_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        fake_model = AutoModelForCausalLM.from_pretrained(fake, dtype=torch.float32).eval()
        fake_load = time.perf_counter() - t0
        stream = build_eval_stream("wikitext2", load_tokenizer(str(run)), 512)  # windows under the BOS rule
        ids, bos = stream.ids, stream.bos_token_id
        with torch.no_grad():
            window = stream.windows(512, 1)
            same_logits = torch.equal(packed_model(window).logits, fake_model(window).logits)
        ppl_packed = perplexity(packed_model, ids, 512, args.windows, bos_token_id=bos).ppl
        ppl_fake = perplexity(fake_model, ids, 512, args.windows, bos_token_id=bos).ppl
        row = {
            "run": run.name,
            "packed_bytes": (run / "model.safetensors").stat().st_size,
            "fake_fp32_bytes": (fake / "model.safetensors").stat().st_size,
            "logits_identical": same_logits,
            "ppl_packed": ppl_packed,
            "ppl_fake": ppl_fake,
            "windows": args.windows,
            "load_seconds_packed": packed_load,
            "load_seconds_fake": fake_load,
        }
        rows.append(row)
        print(
            f"{run.name:24s} packed {row['packed_bytes'] / 2**20:6.1f} MiB  fake(fp32) {row['fake_fp32_bytes'] / 2**20:6.1f} MiB  "
            f"logits identical: {same_logits}  ppl {ppl_packed:.4f} vs {ppl_fake:.4f}  "
            f"load {packed_load:.2f}s vs {fake_load:.2f}s",
            flush=True,
        )
    (args.runs / "packed_vs_fake.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
