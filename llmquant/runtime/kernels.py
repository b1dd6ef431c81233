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

    return packed_matmul(x, prepared(module), module.bias)
