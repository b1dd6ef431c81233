"""What the layouts' Triton kernels share: one fused dequantize-and-multiply kernel, and the bit reader.

y[M, N] = x[M, K] @ W[N, K]^T, where W is never materialised: the kernel walks K in tiles, asks the
layout's `dequant` function for the float32 tile W[n, k] (n, k the tile's rows and columns of W, in
W's row-major order, which is the order of every stored stream) straight from the packed tensors,
and multiplies it with the activation tile on the tensor cores (`tl.dot`, float32 accumulation).
Each layout supplies that one device function (llmquant/layouts/<layout>/gpu.py, found by the
layout's name) and a `prepare` that says where its tensors are (layouts/<layout>/kernels.py).

Two launch shapes of the same kernel:
- decode (M <= 16 tokens, a GEMV in all but name): 16-row activation tiles, K split across programs
  (SPLIT_K partial sums in a float32 workspace, added in a fixed order: deterministic, no atomics),
  so that a 4096-row matrix still spreads over every SM;
- prefill (more tokens): 64-row tiles, no split; the dequantized tile stays in registers.
Each layout gives its tile shapes (KernelWeights.tiles, in layouts/<layout>/kernels.py): its
dequantization decides how many weights a thread can hold in registers.

Bit streams (codes, signs, flags, zero points) are read where they are stored: every stream of a
QuantizedLinear lives in one uint8 blob, 16-byte aligned, which the kernel reads as 32-bit words
(little-endian, so stream bit p is bit p % 32 of word p // 32, exactly the packed format's order).
A value of `width` bits at bit offset p is (word[p >> 5] >> (p & 31)), completed from the next word
when it straddles two. Neighbouring lanes read the same word, which the hardware serves once.

Everything here is device code or its launcher; it imports triton, an optional extra
(`pip install llmquant[gpu]`). On a CPU, tests run it through Triton's interpreter
(TRITON_INTERPRET=1 before triton is imported).
"""

from __future__ import annotations

import importlib
import os

import torch
import triton
import triton.language as tl

from llmquant.layouts.kernel_weights import KernelWeights, Tiles


@triton.jit
def read_bits(words, bit, width, mask):
    """`width`-bit values (width <= 25: a python int or an int32 tensor shaped like `bit`) at the int64
    bit offsets `bit` of a little-endian 32-bit word stream, as int32; 0 where `mask` is False.

    (Written with `x * 0 + c` rather than tl.zeros_like/tl.full: the same code compiled, and in
    Triton's interpreter every call of a library device function costs milliseconds.)"""
    index = bit >> 5
    shift = (bit & 31).to(tl.int32)
    width_i = shift * 0 + width
    low = tl.load(words + index, mask=mask, other=0).to(tl.uint32, bitcast=True)
    straddles = mask & (shift + width_i > 32)
    high = tl.load(words + index + 1, mask=straddles, other=0).to(tl.uint32, bitcast=True)
    # A shift by 32 is undefined: the high word only contributes when the value straddles two words.
    high_part = tl.where(straddles, high << ((32 - shift) & 31).to(tl.uint32), high * 0)
    value = (low >> shift.to(tl.uint32)) | high_part
    ones = ((value * 0 + 1) << width_i.to(tl.uint32)) - 1
    return (value & ones).to(tl.int32)


@triton.jit
def packed_matmul_kernel(
    x_ptr,
    out_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_om,
    stride_os,
    k_per_split,
    weights,
    DEQUANT: tl.constexpr,
    SPEC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
    EMULATE_BF16: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    for k0 in range(k_start, k_end, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < k_end), other=0.0)
        # [BLOCK_N, BLOCK_K]: W's own row-major order, so neighbouring lanes read neighbouring bits.
        w = DEQUANT(weights, rk, rn, K, N, SPEC)
        w = tl.where(rk[None, :] < k_end, w, 0.0)
        if EMULATE_BF16:
            # Triton's interpreter rounds float32 -> bfloat16 wrongly and multiplies bfloat16 tiles
            # wrongly; round to nearest even by hand and multiply exactly in float32, which is what
            # the tensor cores do with bfloat16 inputs and a float32 accumulator.
            bits = w.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            acc = tl.dot(x.to(tl.float32), tl.trans(bits.to(tl.float32, bitcast=True)), acc, input_precision="ieee")
        elif IEEE:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc)
    out = out_ptr + pid_k * stride_os + rm[:, None] * stride_om + rn[None, :]
    tl.store(out, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def interpreted() -> bool:
    """Whether kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(
    m: int, n: int, k: int, device: torch.device, tiles: Tiles | None = None, sms: int | None = None
) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for an [m, k] x [k, n] product
    with the layout's `tiles` (KernelWeights.tiles; the default Tiles without one).

    Fixed rules rather than autotuning (autotuning would make the first forward of every shape
    slow and the choice machine-dependent): decode splits K until there are about four programs
    per SM (`sms`: the device's multiprocessors, 8 off a GPU); prefill takes the layout's tile.
    One stage, no software pipelining: the dequantization's loads are gathers (each lane its own
    word), which Triton's pipeliner turns into per-element asynchronous copies staged in shared
    memory: 3 stages needed 287-918 KB of it for uniform and partial_binary (H200: 227 KB; the
    kernels failed to launch there), and the larger tiles spilled up to 15 KB per thread
    (docs/results-kernels.md)."""
    tiles = tiles or Tiles()
    if m <= 16:
        block_n, block_k, warps = tiles.decode
        programs = -(-n // block_n)
        if sms is None:
            sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
        split = 1
        while programs * split < 4 * sms and k // (split * 2) >= 4 * block_k:
            split *= 2
        return 16, block_n, block_k, split, warps, 1
    block_m, block_n, block_k, warps = tiles.prefill
    return block_m, block_n, block_k, 1, warps, 1


def kernel_launch(x2: torch.Tensor, prepared: KernelWeights, config: tuple[int, ...]) -> tuple[torch.Tensor, tuple, tuple, dict]:
    """(the float32 split-K workspace, grid, arguments, keyword arguments) of packed_matmul_kernel
    for x2 [M, K] and `config` (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages): what
    packed_matmul launches and kernel_resources.compile_for_target compiles."""
    n, k = prepared.rows, prepared.cols
    m = x2.shape[0]
    block_m, block_n, block_k, split, warps, stages = config
    if prepared.block_k is not None:
        block_k = prepared.block_k
    k_per_split = -(-k // (split * block_k)) * block_k
    split = -(-k // k_per_split)
    out = torch.empty((split, m, n), dtype=torch.float32, device=x2.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), split)
    args = (x2, out, m, n, k, x2.stride(0), out.stride(1), out.stride(0), k_per_split, prepared.weights)
    kwargs = dict(
        DEQUANT=importlib.import_module(f"llmquant.layouts.{prepared.layout}.gpu").dequant, SPEC=prepared.spec,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        IEEE=x2.dtype == torch.float32, EMULATE_BF16=x2.dtype == torch.bfloat16 and interpreted(),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out, grid, args, kwargs


def packed_matmul(
    x: torch.Tensor, prepared: KernelWeights, bias: torch.Tensor | None, config: tuple[int, ...] | None = None
) -> torch.Tensor:
    """x [..., K] (fp16, bf16 or fp32) -> x @ W^T + bias [..., N] in x's dtype, from packed weights.
    `config`: (BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) instead of launch_config's."""
    n, k = prepared.rows, prepared.cols
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out, grid, args, kwargs = kernel_launch(x2, prepared, config or launch_config(x2.shape[0], n, k, x.device, prepared.tiles))
    packed_matmul_kernel[grid](*args, **kwargs)
    split = out.shape[0]
    y = out[0] if split == 1 else out.sum(dim=0)  # a fixed order of the partial sums: deterministic
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
