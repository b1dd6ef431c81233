"""The `triton` backend: a QuantizedLinear's forward through its layout's fused kernel; and the
preparation the `triton` and `cpu` backends share.

The first forward on a device prepares the module (`prepare` in llmquant/layouts/<layout>/kernels.py:
where its tensors are, small index tables; for PB-LLM's CSR index, a one-time switch to the bitmap
encoding) and keeps that on the module until it moves or changes backend; every forward then
launches one kernel (plus a deterministic sum of split-K partials for few tokens).
"""

from __future__ import annotations

import importlib
import os

import torch

from llmquant.errors import UserError
from llmquant.ui import warn_once


def triton_available() -> str | None:
    """None if the triton backend can run here, else why not (one line)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install 'llmquant[gpu]')"
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return "the triton backend needs a CUDA device (or TRITON_INTERPRET=1, Triton's CPU interpreter, for tests)"
    return None


def prepared(module):
    """The module's KernelWeights for its current device, made on first use."""
    kernel = module.__dict__.get("_kernel")
    if kernel is None:
        kernels = importlib.import_module(f"llmquant.layouts.{module.layout}.kernels")
        kernel = kernels.prepare(module)
        module.__dict__["_kernel"] = kernel  # not a buffer: rebuilt after a move (QuantizedLinear._apply)
    return kernel


def packed_linear(module, x: torch.Tensor) -> torch.Tensor:
    if "_kernel" not in module.__dict__:
        problem = triton_available()
        if problem:
            raise UserError(f"backend triton: {problem}")
    from llmquant.layouts.kernel_base import packed_matmul

    try:
        return packed_matmul(x, prepared(module), module.bias)
    except Exception as error:
        if not _cannot_launch_here(error):
            raise
        # A GPU the tiles were not sized for (docs/kernels.md): this linear goes on at packed memory
        # through the reference backend rather than stopping the run; said once per cause.
        reason = " ".join(str(error).split())[:160]
        warn_once(f"the triton kernel of layout {module.layout} cannot run on this GPU ({type(error).__name__}: {reason}); "
                  "those linears fall back to the pure-PyTorch backend (packed memory, slow)", __name__)  # fmt: skip
        module.backend = "torch"
        module.release_caches()
        return module(x)


def _cannot_launch_here(error: Exception) -> bool:
    """Triton's refusals of a kernel for this device (too much shared memory or registers, a
    compilation the target does not support), as opposed to a wrong input or a bug."""
    try:
        from triton.compiler.errors import CompilationError
        from triton.runtime.errors import OutOfResources
    except ImportError:
        return False
    return isinstance(error, (OutOfResources, CompilationError))
