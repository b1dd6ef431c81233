"""Every layout's fused kernel, compiled for an H100/H200 (sm_90) on this CPU, fits the GPU.

Triton's interpreter (tests/test_kernels.py) checks the arithmetic but has no shared memory and no
registers: the first H200 run (docs/results-kernels.md) found uniform and partial_binary kernels that
passed every interpreter test and could not launch ("out of resource: shared memory, Required:
286720, Hardware limit: 232448"), and mixed / binary_residual kernels that spilled 5-8 KB per thread
and ran 100-300x slower than cuBLAS. Here each layout is compiled ahead of time with Triton's own
compiler and the ptxas its wheel ships (llmquant/layouts/kernel_resources.py) at launch_config's
tiles, and its shared memory and spill stack are read from the cubin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

if os.environ.get("CI") and not os.environ.get("LLMQUANT_ALLOW_NO_TRITON"):
    import triton  # noqa: F401  (CI must run these tests: a missing triton fails here, loudly)
pytest.importorskip("triton", reason="triton is not installed: pip install 'llmquant[gpu]'")

from llmquant.layouts.kernel_resources import SM90_SHARED_LIMIT  # noqa: E402

CASES = [
    "uniform-2bit", "uniform-3bit", "uniform-4bit", "uniform-8bit", "uniform-3bit-sym", "uniform-4bit-g_idx",
    "mixed-1to4", "mixed-2and8", "partial_binary-8bit-0.02", "partial_binary-3bit-0.02", "partial_binary-5bit-0.3",
    "binary_residual", "binary_residual-all-salient",
]  # fmt: skip
ODD_CASES = ["uniform-3bit", "mixed-1to4", "partial_binary-3bit-0.02", "binary_residual"]
# A model-like shape: Triton specializes integer arguments on divisibility by 16, so 1024 x 2048
# compiles to the same code as LLaMA's 4096 x 11008 (the split-K count is a run-time argument).
MODEL_SHAPE = [1024, 2048]
ODD_SHAPE = [130, 257]
# The tiles the kernels shipped with before the H200 run: 16 x 64 x 128, three pipeline stages.
BEFORE_H200 = [16, 64, 128, 8, 4, 3]


def requests() -> list[dict]:
    found = [{"case": c, "shape": MODEL_SHAPE, "tokens": t, "dtype": d} for c in CASES for t in (1, 64) for d in ("float16", "bfloat16")]
    found += [{"case": c, "shape": ODD_SHAPE, "tokens": t, "dtype": d} for c in ODD_CASES for t in (1, 64) for d in ("float16", "float32")]
    found += [{"case": c, "shape": MODEL_SHAPE, "tokens": 1, "dtype": "float16", "config": BEFORE_H200} for c in ("uniform-2bit", "mixed-1to4")]
    return found


@pytest.fixture(scope="module")
def report() -> dict:
    """All compiles in one subprocess without TRITON_INTERPRET (about half a second each)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is what it does by default
    script = Path(__file__).with_name("kernel_resource_report.py")
    done = subprocess.run([sys.executable, str(script)], input=json.dumps(requests()), capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return {(r["case"], tuple(r["shape"]), r["tokens"], r["dtype"], tuple(r["requested_config"] or ())): r for r in json.loads(done.stdout)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("tokens", [1, 64], ids=["decode", "prefill"])
@pytest.mark.parametrize("case", CASES)
def test_kernel_fits_an_sm90_gpu_without_spilling(report, case, tokens, dtype):
    found = report[(case, tuple(MODEL_SHAPE), tokens, dtype, ())]
    assert found["config"][-1] == 1  # one stage: gathers are not software-pipelined (see launch_config)
    assert found["shared"] <= SM90_SHARED_LIMIT, f"{found}: over the shared memory of an H100/H200"
    assert found["stack"] == 0, f"{found}: the tile spills to local memory"


@pytest.mark.parametrize("case", ODD_CASES)
def test_odd_widths_and_fp32_still_fit_in_shared_memory(report, case):
    """Widths that are multiples of nothing lose the alignment specializations and may spill a few
    hundred bytes (slower, still exact); they must still launch."""
    for tokens in (1, 64):
        for dtype in ("float16", "float32"):
            assert report[(case, tuple(ODD_SHAPE), tokens, dtype, ())]["shared"] <= SM90_SHARED_LIMIT


def test_the_check_sees_what_failed_on_the_h200(report):
    """The earlier tiles: over the shared memory the H200 refused (it reported 286,720 bytes needed
    for uniform), and a spill stack in kilobytes for mixed."""
    uniform = report[("uniform-2bit", tuple(MODEL_SHAPE), 1, "float16", tuple(BEFORE_H200))]
    assert uniform["shared"] > SM90_SHARED_LIMIT
    assert report[("mixed-1to4", tuple(MODEL_SHAPE), 1, "float16", tuple(BEFORE_H200))]["stack"] > 1024
