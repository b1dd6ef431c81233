"""The compiled Triton kernels against the reference, on a GPU: what tests/test_kernels.py checks in
Triton's CPU interpreter, run on the hardware (where the bfloat16 `tl.dot` and the launch rules'
own tile shapes run for real). Writes JSON; a few seconds of GPU, the compiles spread over processes.

    python benchmarks/kernel_check.py --output check.json          # on a CUDA machine
    python benchmarks/kernel_check.py --smoke                      # CPU, interpreter, 2 cases (checks the script)

Every case of tests/layout_cases.py (17 records of the four layouts) x shapes (1x7, 33x100, 130x257:
widths that are multiples of neither 32, 8 nor the group; 576x1536 and 1024x4096, where decode
splits K) x tokens (1, 7, 16, 17, 64, 200: decode, the decode/prefill border, both prefill tiles) x
fp16 and bf16 (fp32 on the small shapes), each through `packed_matmul` with `launch_config`'s tiles.
The bound per output is the tests' own: ulp(dtype)|y_ref| + 2 K 2^-24 sum_k |x_k w_k|.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # layout_cases: the records the kernel tests use

SMALL = [(1, 7), (33, 100), (130, 257)]
LARGE = [(576, 1536), (1024, 4096)]
TOKENS = [1, 7, 16, 17, 64, 200]


def check_case(args: tuple[str, bool]) -> dict:
    case, smoke = args
    if smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch
    import torch.nn.functional as F
    from layout_cases import packed_module

    from llmquant.layouts.kernel_base import launch_config, packed_matmul
    from llmquant.runtime.kernels import prepared

    device = torch.device("cpu" if smoke else "cuda")
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}
    result = {"case": case, "runs": 0, "failed": [], "worst_error_over_bound": 0.0}
    shapes = SMALL[:2] if smoke else SMALL + LARGE
    tokens_list = [1, 17] if smoke else TOKENS
    for rows, cols in shapes:
        module, weight = packed_module(case, rows, cols, seed=rows)
        module, weight = module.to(device), weight.to(device)
        kernel = prepared(module)
        dtypes = [torch.float16, torch.bfloat16] + ([torch.float32] if (rows, cols) in SMALL else [])
        for tokens in tokens_list:
            for dtype in dtypes:
                label = f"{rows}x{cols} {tokens} tok {str(dtype).removeprefix('torch.')}"
                try:
                    x = torch.randn(tokens, cols, generator=torch.Generator().manual_seed(tokens + rows)).to(device, dtype)
                    y = packed_matmul(x, kernel, None)
                    w = weight.to(dtype)
                    reference = F.linear(x, w) if dtype != torch.float32 else (x.double() @ w.double().T)
                    magnitude = x.float().abs() @ w.float().abs().T
                    bound = ulp[dtype] * reference.float().abs() + 2 * cols * 2.0**-24 * magnitude + 1e-30
                    error = (y.float() - reference.float()).abs()
                    ratio = float((error / bound).max()) if bool(torch.isfinite(y).all()) else float("inf")
                    result["runs"] += 1
                    result["worst_error_over_bound"] = max(result["worst_error_over_bound"], ratio)
                    if not ratio <= 1.0:
                        result["failed"].append({"run": label, "config": list(launch_config(tokens, rows, cols, device, kernel.tiles)),
                                                 "error_over_bound": ratio, "max_error": float(error.max())})  # fmt: skip
                except Exception as error:  # noqa: BLE001 - recorded, the check goes on
                    result["runs"] += 1
                    result["failed"].append({"run": label, "exception": f"{type(error).__name__}: {error}"[:300],
                                             "traceback": traceback.format_exc(limit=4)[-1500:]})  # fmt: skip
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("kernel-check.json"))
    parser.add_argument("--processes", type=int, default=8, help="compiles run in parallel (the GPU work is tiny)")
    parser.add_argument("--smoke", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    from layout_cases import KERNEL_CASES

    cases = KERNEL_CASES[:2] if args.smoke else KERNEL_CASES
    results = []
    with multiprocessing.get_context("spawn").Pool(min(args.processes, len(cases))) as pool:
        for result in pool.imap_unordered(check_case, [(case, args.smoke) for case in cases]):
            results.append(result)  # written after every case: a run stopped by its lease keeps them
            runs = sum(r["runs"] for r in results)
            failed = sum(len(r["failed"]) for r in results)
            summary = {"runs": runs, "failed": failed, "seconds": time.perf_counter() - started, "smoke": args.smoke,
                       "cases_done": len(results), "cases": sorted(results, key=lambda r: cases.index(r["case"]))}  # fmt: skip
            args.output.write_text(json.dumps(summary, indent=1))
    results = summary["cases"]
    for r in results:
        print(f"{r['case']:30s} runs {r['runs']:3d} failed {len(r['failed']):3d} worst error/bound {r['worst_error_over_bound']:.3g}")
    print(f"kernel check: {runs - failed}/{runs} within the bound, {summary['seconds']:.0f} s")


if __name__ == "__main__":
    main()
