"""The `cpu` backend: the layouts' C row decoders (llmquant/layouts/*/cpu.c), compiled once per
machine with the system's C compiler and called through ctypes on the module's own tensors.

A packed model then runs on a CPU at packed memory without decoding whole weights: for a few tokens
each thread decodes one weight row at a time and takes its dot products (llmquant_gemv); for more
tokens, blocks of rows are decoded into a small buffer and multiplied with torch.mm (BLAS), block by
block. The rows are the layout's `decode`, bit for bit (float32, no fused multiply-add).

The library is built with `cc -O3 -fopenmp -ffp-contract=off` into the user's cache
($XDG_CACHE_HOME or ~/.cache, then llmquant/), named after a hash of the sources and flags, written
under a temporary name and renamed (concurrent builds are safe). No compiler, no backend: `auto`
then falls back to the `torch` reference, with one warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LAYOUTS = ("uniform", "mixed", "partial_binary", "binary_residual")  # the order of cpu_matmul.c's DECODERS
SOURCE_ROOT = Path(__file__).resolve().parents[1] / "layouts"
SOURCES = [SOURCE_ROOT / "cpu_matmul.c", *(SOURCE_ROOT / layout / "cpu.c" for layout in LAYOUTS)]
HEADERS = [SOURCE_ROOT / "cpu_kernel.h"]
FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off"]
GEMV_TOKENS = 8  # up to this many tokens, decode-and-dot per row; beyond, row blocks + torch.mm
BLOCK_ROWS = 256  # rows decoded per block for torch.mm


class KernelArgs(ctypes.Structure):
    _fields_ = [
        ("p", ctypes.c_void_p * 8),
        ("v", ctypes.c_int64 * 16),
        ("spec", ctypes.c_int64),
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
    ]


_LIBRARY: ctypes.CDLL | None = None
_PROBLEM: str | None = None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "llmquant"


def library() -> ctypes.CDLL:
    """The compiled kernels (built on first use); RuntimeError saying why not."""
    global _LIBRARY, _PROBLEM
    if _LIBRARY is not None:
        return _LIBRARY
    if _PROBLEM is not None:
        raise RuntimeError(_PROBLEM)
    try:
        _LIBRARY = _load()
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _PROBLEM = f"the CPU kernels could not be built ({' '.join(str(error).split())[:300]})"
        raise RuntimeError(_PROBLEM) from None
    return _LIBRARY


def cpu_available() -> str | None:
    """None if the cpu backend can run here, else why not (one line)."""
    try:
        library()
    except RuntimeError as error:
        return str(error)
    return None


def _load() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc or gcc) on PATH")
    digest = hashlib.sha256(" ".join([compiler, *FLAGS]).encode())
    for path in [*HEADERS, *SOURCES]:
        digest.update(path.read_bytes())
    target = _cache_dir() / f"llmquant_cpu_{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            partial = Path(tmp) / target.name
            done = subprocess.run(
                [compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES)], capture_output=True, text=True, timeout=300
            )
            if done.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
            os.replace(partial, target)  # atomic: a concurrent build writes the same bytes
    lib = ctypes.CDLL(str(target))
    lib.llmquant_gemv.argtypes = [ctypes.c_int, ctypes.POINTER(KernelArgs), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.llmquant_gemv.restype = ctypes.c_int
    lib.llmquant_rows.argtypes = [ctypes.c_int, ctypes.POINTER(KernelArgs), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.llmquant_rows.restype = None
    return lib


def kernel_args(prepared) -> KernelArgs:
    """A prepared linear (layouts.kernel_weights.KernelWeights, CPU tensors) as the C struct: its
    tensors' data pointers and its integers, each in the layout's order."""
    args = KernelArgs()
    tensors = [w for w in prepared.weights if isinstance(w, torch.Tensor)]
    integers = [w for w in prepared.weights if not isinstance(w, torch.Tensor)]
    if len(tensors) > 8 or len(integers) > 16:
        raise ValueError(f"{prepared.layout}: {len(tensors)} tensors and {len(integers)} integers do not fit the C struct")
    for i, tensor in enumerate(tensors):
        if tensor.device.type != "cpu" or not tensor.is_contiguous():
            raise ValueError(f"{prepared.layout}: the CPU kernels need contiguous CPU tensors")
        args.p[i] = tensor.data_ptr()
    for i, value in enumerate(integers):
        args.v[i] = int(value)
    args.spec, args.rows, args.cols = prepared.spec, prepared.rows, prepared.cols
    return args


def packed_linear(module, x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> x W^T + bias, on the CPU, from the module's packed tensors."""
    from llmquant.runtime.kernels import prepared

    lib = library()
    kernel = prepared(module)
    cached = module.__dict__.get("_cpu_args")
    if cached is None or cached[0] is not kernel:
        cached = (kernel, kernel_args(kernel))
        module.__dict__["_cpu_args"] = cached
    args = cached[1]
    rows, cols = kernel.rows, kernel.cols
    x2 = x.reshape(-1, cols).to(torch.float32).contiguous()
    m, threads = x2.shape[0], torch.get_num_threads()
    layout = LAYOUTS.index(kernel.layout)
    if m <= GEMV_TOKENS:
        y = torch.empty(m, rows, dtype=torch.float32)
        if lib.llmquant_gemv(layout, ctypes.byref(args), x2.data_ptr(), m, y.data_ptr(), threads):
            raise MemoryError("the CPU kernel could not allocate its row buffers")
    else:
        y = torch.empty(m, rows, dtype=torch.float32)
        block = torch.empty(min(BLOCK_ROWS, rows), cols, dtype=torch.float32)
        for n0 in range(0, rows, BLOCK_ROWS):
            n1 = min(n0 + BLOCK_ROWS, rows)
            lib.llmquant_rows(layout, ctypes.byref(args), n0, n1, block.data_ptr(), threads)
            y[:, n0:n1] = x2 @ block[: n1 - n0].T
    if module.bias is not None:
        y += module.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], rows)
