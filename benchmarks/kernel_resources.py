"""Shared memory, registers and spill stack of every layout's fused kernel compiled for an H100/H200
(sm_90) on this CPU, at the tiles the kernels use now and at the tiles they had before the first H200
run (16 x 64 x 128 decode, 128 x 128 x 64 prefill, three pipeline stages). No GPU needed: Triton's
own compiler and the ptxas in its wheel (llmquant/layouts/kernel_resources.py).

    python benchmarks/kernel_resources.py [--json out.json]      # prints a markdown table
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # layout_cases: the records the kernel tests use

import torch  # noqa: E402
from layout_cases import packed_module  # noqa: E402

from llmquant.layouts.kernel_resources import SM90_SHARED_LIMIT, compile_for_target  # noqa: E402
from llmquant.runtime.kernels import prepared  # noqa: E402

CASES = {"uniform": "uniform-3bit", "mixed": "mixed-1to4", "partial_binary": "partial_binary-8bit-0.02", "binary_residual": "binary_residual"}
BEFORE = {1: (16, 64, 128, 8, 4, 3), 64: (64, 128, 64, 1, 4, 3), 512: (128, 128, 64, 1, 8, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    for layout, case in CASES.items():
        weights = prepared(packed_module(case, 4096, 4096)[0])
        for tokens in (1, 64, 512):
            for label, config in (("before", BEFORE[tokens]), ("now", None)):
                found = compile_for_target(weights, tokens, torch.float16, config=config)
                rows.append({"layout": layout, "case": case, "tokens": tokens, "tiles": label, **asdict(found),
                             "launches": found.shared <= SM90_SHARED_LIMIT})  # fmt: skip
    print("| layout | tokens | tiles | (BM, BN, BK, split, warps, stages) | shared memory B | registers | spill stack B/thread | launches on sm_90 |")
    print("|---|---:|---|---|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['layout']} | {r['tokens']} | {r['tiles']} | {tuple(r['config'])} | {r['shared']:,} | {r['registers']} | {r['stack']:,} | {'yes' if r['launches'] else '**no**'} |")
    if args.json:
        args.json.write_text(json.dumps({"target": "sm_90", "shape": [4096, 4096], "dtype": "float16", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
