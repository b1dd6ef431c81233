"""GPTQ core: against RTN, against a slow column-by-column OBS implementation, partial groups."""

from __future__ import annotations

import pytest
import torch

from llmquant.core.hessian import HessianAccumulator, fix_dead_columns, inverse_cholesky_upper
from llmquant.layouts import check_tensors, decode
from llmquant.core.uniform import minmax_params
from llmquant.errors import NumericalError
from llmquant.methods import get_method_class


def correlated_problem(rows=48, cols=96, tokens=2048, seed=0, dtype=torch.float32):
    """Inputs with strongly correlated channels and a few outlier channels, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    X = torch.randn(tokens, cols, generator=g) @ mixing
    X[:, :3] *= 8
    W = torch.randn(rows, cols, generator=g) * 0.05
    acc = HessianAccumulator(cols)
    acc.add_batch(X)
    return W.to(dtype), acc.finalize().to(dtype), X.to(dtype)


def quantize(name, W, H, **cfg):
    cls = get_method_class(name)
    return cls(cls.Config(name=name, **cfg)).quantize("test", W.clone(), H.clone())


def output_error(W, Q, X):
    return ((W.double() - Q.double()) @ X.double().T).pow(2).sum().item()


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_gptq_beats_rtn_on_output_error(bits, group_size):
    W, H, X = correlated_problem()
    rtn = quantize("rtn", W, H, bits=bits, group_size=group_size)
    gptq = quantize("gptq", W, H, bits=bits, group_size=group_size)
    assert output_error(W, gptq.dequantized, X) < 0.9 * output_error(W, rtn.dequantized, X)


def slow_obs(W, H, bits, group_size, percdamp=0.01):
    """Column-by-column OBS with an explicitly updated inverse Hessian (no Cholesky, no blocks)."""
    W = W.clone().double()
    H = H.clone().double()
    fix_dead_columns(W, H)
    rows, cols = W.shape
    H += percdamp * torch.diag(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Q = torch.zeros_like(W)
    scale = zero = None
    for j in range(cols):
        if j % group_size == 0:
            scale, zero = minmax_params(W[:, j : j + group_size], bits, sym=False)
            scale = scale.half().double()
        q = scale * (torch.clamp(torch.round(W[:, j] / scale) + zero, 0, 2**bits - 1) - zero)
        Q[:, j] = q
        err = (W[:, j] - q) / Hinv[j, j]
        W[:, j + 1 :] -= err.unsqueeze(1) * Hinv[j, j + 1 :].unsqueeze(0)
        # Remove column j from the remaining problem: Gaussian elimination of the inverse.
        Hinv = Hinv - Hinv[:, j : j + 1] @ Hinv[j : j + 1, :] / Hinv[j, j]
    return Q


@pytest.mark.parametrize("blocksize", [128, 16, 7])
def test_gptq_equals_slow_obs(blocksize):
    W, H, _ = correlated_problem(rows=24, cols=72, dtype=torch.float64)
    fast = quantize("gptq", W, H, bits=3, group_size=24, blocksize=blocksize).dequantized
    reference = slow_obs(W, H, bits=3, group_size=24)
    assert torch.allclose(fast.double(), reference, atol=1e-5, rtol=0)


def test_partial_last_group_576_wide():
    # SmolLM2's width: 576 = 4 * 128 + 64, so the last group has 64 columns.
    W, H, X = correlated_problem(rows=16, cols=576, tokens=1200)
    record = quantize("gptq", W, H, bits=2, group_size=128)
    check_tensors(record.layout, record.tensors, record.meta, 16, 576)
    assert record.tensors["scales"].shape == (16, 5)
    assert torch.equal(decode(record.layout, record.tensors, record.meta), record.dequantized)
    # The last group's scale is fitted on its own 64 columns: its codes span the 2-bit grid.
    assert int(record.tensors["codes"][:, 512:].max()) == 3
    assert output_error(W, record.dequantized, X) < output_error(W, quantize("rtn", W, H, bits=2).dequantized, X)


def test_act_order_and_static_groups_round_trip():
    W, H, X = correlated_problem(rows=16, cols=64)
    for cfg in ({"act_order": True}, {"act_order": True, "static_groups": True}):
        record = quantize("gptq", W, H, bits=3, group_size=16, **cfg)
        check_tensors(record.layout, record.tensors, record.meta, 16, 64)
        assert torch.equal(decode(record.layout, record.tensors, record.meta), record.dequantized)
        # Static groups keep natural group membership, so no g_idx is stored.
        assert ("g_idx" in record.tensors) == (not cfg.get("static_groups", False))


def test_rtn_symmetric_grid_is_centred():
    W = torch.tensor([[-1.0, -0.5, 0.0, 0.25, 1.0]])
    record = quantize("rtn", W, torch.eye(5), bits=2, group_size=-1, sym=True)
    assert int(record.tensors["zeros"][0, 0]) == 2  # (maxq + 1) / 2
    scale = float(record.tensors["scales"][0, 0])
    assert scale == pytest.approx(2 / 3, rel=1e-3)  # range [-1, 1] on 3 steps


def test_dead_columns_are_zeroed():
    W, H, _ = correlated_problem(rows=8, cols=32)
    H[5, :] = 0
    H[:, 5] = 0
    record = quantize("gptq", W, H, bits=4, group_size=-1)
    assert torch.all(record.dequantized[:, 5] == 0)


def test_hessian_normalises_by_tokens():
    X = torch.randn(100, 8)
    acc = HessianAccumulator(8)
    acc.add_batch(X[:30])
    acc.add_batch(X[30:].reshape(10, 7, 8))  # any leading shape: every row is a token
    assert acc.tokens == 100
    assert torch.allclose(acc.finalize(), 2 * X.T @ X / 100, atol=1e-5)


def test_non_finite_hessian_is_a_numerical_error():
    acc = HessianAccumulator(4)
    acc.add_batch(torch.tensor([[1.0, float("inf"), 0.0, 0.0]]))
    with pytest.raises(NumericalError, match="layers.3.mlp"):
        acc.finalize("layers.3.mlp")


def test_damping_escalates_for_indefinite_hessian(caplog):
    H = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5]))
    upper, damp = inverse_cholesky_upper(H, percdamp=0.01, name="lin")
    assert damp > 0.01 and torch.isfinite(upper).all()
    assert "damping" in caplog.text


@pytest.mark.parametrize(("shape", "group_size"), [((64, 300), 128), ((300,), 7), ((5, 96), 96), ((3, 4, 40), 16)])
def test_group_sums_make_index_adds_additions_in_its_order(shape, group_size):
    """core.groups replaces index_add_ (atomics on CUDA): on a CPU the result must be bit-identical."""
    from llmquant.core.groups import group_sums

    values = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    cols = shape[-1]
    index = torch.arange(cols) // group_size
    expected = torch.zeros(*shape[:-1], -(-cols // group_size)).index_add_(len(shape) - 1, index, values)
    assert torch.equal(group_sums(values, group_size), expected)
