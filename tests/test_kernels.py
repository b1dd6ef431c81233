"""The Triton kernels of every layout against the pure-torch reference.

On a machine without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported): the same kernel source, executed block by block with numpy.
Two features of the interpreter are wrong for bfloat16 (its float32 -> bfloat16 cast does not round
to nearest even, and its bfloat16 tl.dot returns garbage); under the interpreter the kernel rounds
the tile to bfloat16 by hand and multiplies in float32, which is what the tensor cores compute for
bfloat16 inputs with a float32 accumulator. So the bf16 cases check the dequantization, the
rounding and the accumulation; the hardware bf16 dot itself is exercised on a GPU only.

The reference is F.linear(x, decode(record).to(dtype), bias) in the activations' dtype: the layout's
definition, rounded to the dtype as a fake-quant checkpoint stores it. The kernel dequantizes with
the same float32 arithmetic (so its tile, rounded to the dtype, is the reference's weight), then
accumulates in float32 in another order and rounds once. The bound tested, per output:

    |y - y_ref| <= ulp(dtype) * |y_ref| + 2 * K * 2^-24 * sum_k |x_k| |w_k|

one unit in the last place of the result's dtype (the two float32 sums round to neighbouring values)
plus twice the float32 accumulation bound of a K-term sum (both sides accumulate in float32).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from layout_cases import KERNEL_CASES, packed_module
from llmquant.runtime import set_backend

if os.environ.get("CI") and not os.environ.get("LLMQUANT_ALLOW_NO_TRITON"):
    import triton  # noqa: F401  (CI must run these tests: a missing triton fails here, loudly)
triton = pytest.importorskip("triton", reason="triton is not installed: pip install 'llmquant[gpu]'")

from llmquant.layouts.kernel_base import launch_config, packed_matmul  # noqa: E402
from llmquant.runtime.kernels import prepared  # noqa: E402

# 257, 100, 7: not multiples of 32, of 8 or of any group size; 1 x 7: a group wider than the row.
SHAPES = [(1, 7), (33, 100), (130, 257)]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}
# Large tiles: the interpreter's cost is per tile, not per element. launch_config's own tiles
# (each layout's TILES, split K at decode) are tested at model scale and on edges below.
INTERPRETER_TILES = {"decode": (16, 128, 256, 1, 4, 1), "prefill": (64, 128, 256, 1, 4, 1)}


def check(y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    dtype = x.dtype
    w = weight.to(dtype)
    reference = F.linear(x, w, bias)
    magnitude = x.float().abs() @ w.float().abs().T
    bound = ULP[dtype] * reference.float().abs() + 2 * x.shape[-1] * 2.0**-24 * magnitude
    if bias is not None:
        bound += ULP[dtype] * bias.float().abs()
    error = (y.float() - reference.float()).abs()
    assert y.dtype == dtype and y.shape == reference.shape
    assert bool((error <= bound).all()), f"max error {error.max():.3g}, bound there {bound.flatten()[error.argmax()]:.3g}"


# fp16 at 1, 7 and 64 tokens on every shape; bf16 at 1 and 64 tokens on the smallest and the largest
# shape (the interpreter's time is the limit; the dequantization is the same code for both dtypes).
RUNS = [(shape, tokens, torch.float16) for shape in SHAPES for tokens in (1, 7, 64)]
RUNS += [(shape, tokens, torch.bfloat16) for shape in (SHAPES[0], SHAPES[-1]) for tokens in (1, 64)]


@pytest.mark.parametrize(("shape", "tokens", "dtype"), RUNS, ids=lambda v: f"{v[0]}x{v[1]}" if isinstance(v, tuple) else str(v))
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_matches_the_reference(case, shape, tokens, dtype):
    module, weight = packed_module(case, *shape)
    x = torch.randn(tokens, shape[1], generator=torch.Generator().manual_seed(tokens)).to(dtype)
    tiles = INTERPRETER_TILES["decode" if tokens <= 16 else "prefill"]
    check(packed_matmul(x, prepared(module), None, tiles), x, weight)


@pytest.mark.parametrize(
    ("case", "tokens"),
    [("uniform-3bit", 1), ("uniform-4bit-g_idx", 64), ("mixed-1to4", 1), ("partial_binary-8bit-0.02", 1), ("binary_residual", 7)],
)
def test_kernel_at_model_scale_with_its_own_launch_configuration(case, tokens):
    """576 x 1536 (SmolLM2's MLP) with the layout's own tiles and the split an H100/H200 (132 SMs)
    would choose: many row blocks, and at decode K split across programs."""
    module, weight = packed_module(case, 576, 1536)
    kernel = prepared(module)
    config = launch_config(tokens, 576, 1536, torch.device("cpu"), kernel.tiles, sms=132)
    if tokens <= 16:
        assert config[3] > 1  # the split-K path is what runs
    x = torch.randn(tokens, 1536, generator=torch.Generator().manual_seed(1)).half()
    check(packed_matmul(x, kernel, None, config), x, weight)


@pytest.mark.parametrize("tokens", [1, 20])
@pytest.mark.parametrize(
    "case", ["uniform-3bit", "uniform-4bit-g_idx", "mixed-1to4", "partial_binary-3bit-0.02", "binary_residual-none-salient"]
)
def test_each_layouts_own_tiles_on_edges(case, tokens):
    """The tiles a GPU launches (each layout's TILES: 16-32 rows, K tiles of 32 at prefill) on widths
    that leave partial tiles in every direction; the other tests use large interpreter tiles."""
    module, weight = packed_module(case, 33, 200)
    kernel = prepared(module)
    config = launch_config(tokens, 33, 200, torch.device("cpu"), kernel.tiles, sms=132)
    assert config[-1] == 1
    x = torch.randn(tokens, 200, generator=torch.Generator().manual_seed(tokens)).half()
    check(packed_matmul(x, kernel, None, config), x, weight)


def test_backend_through_the_module_with_bias_and_leading_dimensions():
    module, weight = packed_module("mixed-1to4", 40, 96)
    bias = torch.randn(40).half()
    module.bias = torch.nn.Parameter(bias, requires_grad=False)
    set_backend(module, "triton")
    x = torch.randn(2, 3, 96).half()
    check(module(x).reshape(6, 40), x.reshape(6, 96), weight, bias)
    assert module(x).shape == (2, 3, 40)


def test_float32_activations_are_multiplied_in_full_precision():
    module, weight = packed_module("uniform-4bit", 24, 200)
    x = torch.randn(5, 200)
    y = packed_matmul(x, prepared(module), None, INTERPRETER_TILES["decode"])
    torch.testing.assert_close(y, x @ weight.T, rtol=1e-5, atol=1e-5)


def test_preparing_keeps_the_module_at_packed_size():
    """A CSR-indexed PB-LLM linear switches to the bitmap encoding of the same weight; the kernel's
    tables are small; the reference path still decodes the same weight afterwards."""
    for case, extra_bits_per_weight in (("partial_binary-8bit-0.02", 1.2), ("binary_residual", 0.1), ("mixed-1to4", 0.1)):
        module, weight = packed_module(case, 130, 257)
        before = module.nbytes
        prepared(module)
        after = module.nbytes + sum(t.nbytes for t in module.cache_tensors())
        assert after - before <= extra_bits_per_weight * 130 * 257 / 8 + 1024, case
        assert torch.equal(module.dequantize(), weight), case
    assert packed_module("partial_binary-8bit-0.02", 130, 257)[0].encoding["index_format"] == "csr"  # stored as CSR


def test_moving_or_switching_releases_what_the_kernel_prepared():
    module, _ = packed_module("binary_residual", 33, 100)
    set_backend(module, "triton")
    module(torch.randn(1, 100).half())
    assert module.__dict__.get("_kernel") is not None
    module.to(torch.float16)  # any _apply: the tables are rebuilt on the next forward
    assert module.__dict__.get("_kernel") is None
    module(torch.randn(1, 100).half())
    set_backend(module, "torch")
    assert module.__dict__.get("_kernel") is None


def test_a_packed_model_runs_end_to_end_through_the_kernels(tmp_path):
    """A tiny LLaMA quantized with every method's layout family, loaded packed, run with the
    triton backend in float32: the logits equal the reference backend's to float32 accuracy."""
    from test_format import quantize_tiny, tiny_llama

    from llmquant.formats import save_packed
    from llmquant.runtime import load_quantized

    model = tiny_llama()
    records = quantize_tiny(model)
    save_packed(model, records, tmp_path, {})
    loaded = load_quantized(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    set_backend(loaded, "torch")
    reference = loaded(ids).logits
    assert set_backend(loaded, "triton") == len(records)
    torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_a_kernel_the_gpu_refuses_falls_back_to_the_reference_with_one_warning(monkeypatch, caplog):
    """What the first H200 run hit (uniform's tiles needed more shared memory than the GPU has):
    now the linear goes on through the packed reference backend, with a warning naming the cause."""
    from triton.runtime.errors import OutOfResources

    import llmquant.layouts.kernel_base as kernel_base

    module, weight = packed_module("uniform-3bit", 33, 100)
    set_backend(module, "triton")

    def refuse(*args, **kwargs):
        raise OutOfResources(286720, 232448, "shared memory")

    monkeypatch.setattr(kernel_base, "packed_matmul", refuse)
    x = torch.randn(3, 100).half()
    with caplog.at_level("WARNING"):
        y = module(x)
    assert module.backend == "torch"
    assert any("cannot run on this GPU" in r.message and "shared memory" in r.message for r in caplog.records)
    check(y, x, weight)


def test_other_kernel_errors_are_not_swallowed(monkeypatch):
    import llmquant.layouts.kernel_base as kernel_base

    module, _ = packed_module("uniform-3bit", 33, 100)
    set_backend(module, "triton")
    monkeypatch.setattr(kernel_base, "packed_matmul", lambda *a, **k: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        module(torch.randn(3, 100).half())
    assert module.backend == "triton"
