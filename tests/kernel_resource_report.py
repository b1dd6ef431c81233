"""Run as a script (never imported under Triton's interpreter): compile the fused kernel for sm_90
for each request read as JSON from stdin, print the resources as JSON. tests/test_kernel_resources.py
runs it in a subprocess because the test session sets TRITON_INTERPRET=1, under which triton.jit
returns interpreter functions that cannot be compiled.

A request: {"case": layout_cases name, "shape": [rows, cols], "tokens": m, "dtype": "float16",
"config": null or the 6 launch numbers}."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

assert os.environ.get("TRITON_INTERPRET") != "1", "compiling needs the real Triton, not the interpreter"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from layout_cases import packed_module  # noqa: E402

from llmquant.layouts.kernel_resources import compile_for_target  # noqa: E402
from llmquant.runtime.kernels import prepared  # noqa: E402


def main() -> None:
    results, weights = [], {}
    for request in json.load(sys.stdin):
        key = (request["case"], *request["shape"])
        if key not in weights:
            weights[key] = prepared(packed_module(request["case"], *request["shape"])[0])
        found = compile_for_target(weights[key], request["tokens"], getattr(torch, request["dtype"]), config=tuple(request["config"]) if request.get("config") else None)
        requested = request.pop("config", None)
        results.append({**request, **asdict(found), "requested_config": requested})
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
