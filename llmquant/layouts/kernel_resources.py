"""What the fused kernel costs on a GPU, read without one: compile it ahead of time for a target
(sm_90: H100/H200) with Triton's own compiler and the ptxas it ships, and read the result's shared
memory, registers and spill stack.

Why: Triton's CPU interpreter (where CI runs the kernels) has no shared memory and no registers, so
a kernel can pass every test there and still fail to launch on the GPU ("out of resource: shared
memory"), or spill its tiles to local memory and run a hundred times slower. Both happened: the first
H200 run (docs/results-kernels.md). tests/test_kernel_resources.py compiles every layout this way.

Uses Triton's compile pipeline below `JITFunction.run` (binder, argument packing, `triton.compile`
with an explicit target), which has moved between Triton releases; `compile_for_target` raises
`RuntimeError` naming what is missing where it has.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.layouts.kernel_weights import KernelWeights

# Shared memory one block may use on an H100/H200 (sm_90): the launch error's "Hardware limit".
SM90_SHARED_LIMIT = 232_448
SM90_MULTIPROCESSORS = 132  # H100 SXM and H200 (the split-K rule's count; it changes no compiled code)


@dataclass(frozen=True)
class Resources:
    shared: int  # bytes of shared memory per block
    registers: int  # per thread
    stack: int  # bytes of local-memory stack frame per thread (spills), 0 when all stays in registers
    config: tuple[int, ...]  # (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages)


def _cuobjdump() -> str:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    found = str(bundled) if bundled.is_file() else shutil.which("cuobjdump")
    if not found:
        raise RuntimeError("cuobjdump not found (neither in the triton wheel nor on PATH)")
    return found


def compile_for_target(
    prepared: KernelWeights, tokens: int, dtype: torch.dtype, capability: int = 90, config: tuple[int, ...] | None = None
) -> Resources:
    """Compile the fused kernel for `prepared` (a layout's KernelWeights, on any device) at `tokens`
    activation rows in `dtype`, with launch_config's tiles (or `config`), for an sm_`capability` GPU."""
    import triton
    from triton.backends.compiler import GPUTarget

    from llmquant.layouts.kernel_base import kernel_launch, launch_config, packed_matmul_kernel

    try:
        from triton.compiler import ASTSource
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as error:
        raise RuntimeError(f"this triton ({triton.__version__}) lacks an internal this check uses: {error}") from error

    n, k = prepared.rows, prepared.cols
    config = config or launch_config(tokens, n, k, torch.device("cuda"), prepared.tiles, sms=SM90_MULTIPROCESSORS)
    out, _, args, kwargs = kernel_launch(torch.zeros(tokens, k, dtype=dtype), prepared, config)
    kernel = packed_matmul_kernel
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        report = subprocess.run([_cuobjdump(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", report)
    if found is None:
        raise RuntimeError(f"no resource line in cuobjdump's report: {report[:200]!r}")
    launched = (kwargs["BLOCK_M"], kwargs["BLOCK_N"], kwargs["BLOCK_K"], out.shape[0], kwargs["num_warps"], kwargs["num_stages"])
    return Resources(int(compiled.metadata.shared), int(found.group(1)), int(found.group(2)), launched)
