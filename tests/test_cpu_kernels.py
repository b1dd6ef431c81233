"""The CPU kernels (backend `cpu`, the default for packed models on a CPU): the layouts' C row
decoders, compiled with the system's C compiler, against the layout's `decode`.

A decoded row must equal the reference bit for bit (same float32 arithmetic, no fused multiply-add);
the products then differ from F.linear only by the order of the float32 sums, which the bound of
tests/test_kernels.py covers.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
import torch.nn.functional as F

from layout_cases import CASES, build
from llmquant.formats import packers
from llmquant.runtime import QuantizedLinear, cpu_kernels, set_backend
from llmquant.runtime.kernels import prepared

_PROBLEM = cpu_kernels.cpu_available()
if _PROBLEM is not None and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the CPU kernel tests: {_PROBLEM}")
pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"CPU kernels unavailable: {_PROBLEM}")

SHAPES = [(1, 7), (33, 100), (130, 257), (64, 256)]


def module_of(case: str, rows: int, cols: int) -> tuple[QuantizedLinear, torch.Tensor]:
    layout, tensors, meta, _, _ = build(case, rows, cols)
    return QuantizedLinear(packers.pack(layout, tensors, meta)), packers.dequantize(packers.pack(layout, tensors, meta))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_decoded_rows_equal_the_reference_bit_for_bit(case, shape):
    module, weight = module_of(case, *shape)
    kernel = prepared(module)
    out = torch.full(shape, float("nan"))
    cpu_kernels.library().llmquant_rows(
        cpu_kernels.LAYOUTS.index(kernel.layout), ctypes.byref(cpu_kernels.kernel_args(kernel)), 0, shape[0], out.data_ptr(), 2
    )
    assert torch.equal(out, weight)


@pytest.mark.parametrize("tokens", [1, 5, 40])  # 40: row blocks + torch.mm
@pytest.mark.parametrize("case", ["uniform-3bit", "uniform-4bit-g_idx", "mixed-1to4", "partial_binary-8bit-0.3", "binary_residual"])
def test_products_within_the_accumulation_bound(case, tokens):
    module, weight = module_of(case, 130, 257)
    module.bias = torch.nn.Parameter(torch.randn(130), requires_grad=False)
    set_backend(module, "cpu")
    x = torch.randn(2, tokens, 257)
    y = module(x)
    reference = F.linear(x, weight, module.bias)
    bound = 2 * 257 * 2.0**-24 * (x.abs() @ weight.abs().T + module.bias.abs())
    assert y.shape == reference.shape and bool(((y - reference).abs() <= bound + 2.0**-23 * reference.abs()).all())


def test_half_precision_activations_and_the_default_backend_on_a_cpu():
    from llmquant.runtime.qlinear import resolve_backend

    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    module, weight = module_of("uniform-4bit", 24, 64)
    set_backend(module, "cpu")
    x = torch.randn(3, 64).to(torch.bfloat16)
    y = module(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), x.float() @ weight.T, rtol=2e-2, atol=2e-2)


def test_a_packed_model_runs_end_to_end_on_the_cpu_kernels(tmp_path):
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
    assert set_backend(loaded, "cpu") == len(records)
    torch.testing.assert_close(loaded(ids).logits, reference, rtol=1e-4, atol=1e-4)
    assert sum(m.resident_bytes for m in loaded.modules() if isinstance(m, QuantizedLinear)) < sum(
        r.numel * 4 for r in records.values()
    ) / 4  # packed, not a dense copy


def test_the_library_is_built_once_and_cached(monkeypatch):
    first = cpu_kernels.library()
    assert cpu_kernels.library() is first
    built = list(cpu_kernels._cache_dir().glob("llmquant_cpu_*.so"))
    assert built, "the compiled library lives in the user's cache"
