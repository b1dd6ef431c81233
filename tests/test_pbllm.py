"""PB-LLM (partial binarization, PTQ): mask selection, binarizer statistics, GPTQ loop, record, bits."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from llmquant.layouts.partial_binary import csr_index_bits, partial_binary_bits
from llmquant.core.gptq import relative_output_error
from llmquant.core.hessian import inverse_cholesky_upper
from llmquant.layouts import check_tensors, decode
from llmquant.core.uniform import minmax_params
from llmquant.methods import get_method_class
from llmquant.methods.pbllm import (
    PBLLM,
    PartialBinaryQuantizer,
    PBLLMConfig,
    fit_binary_params,
    fit_high_quantizer,
    salience_scores,
    select_salient,
)


def correlated_problem(seed: int, rows: int, cols: int, tokens: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Heavy-tailed weights and strongly correlated inputs; returns (W, H = 2/N X^T X)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols, generator=g) ** 2
    mix = torch.randn(cols, cols // 4, generator=g) @ torch.randn(cols // 4, cols, generator=g) / cols**0.5
    X = torch.randn(tokens, cols, generator=g) @ (torch.eye(cols) + mix)
    return W, 2.0 / tokens * X.T @ X


# ---------------------------------------------------------------------------------------------- config


def test_config_defaults_and_registry():
    cfg = PBLLMConfig()
    assert (cfg.salient_fraction, cfg.high_bit, cfg.salient_metric, cfg.group_size, cfg.stats_mode) == (
        0.1, 8, "hessian", -1, "reference",
    )
    assert (cfg.percdamp, cfg.blocksize) == (0.01, 128)
    assert get_method_class("pbllm") is PBLLM


@pytest.mark.parametrize(
    "bad",
    [
        {"salient_fraction": 0.0},
        {"salient_fraction": 1.0},
        {"salient_fraction": 1.5},
        {"high_bit": 1},
        {"high_bit": 9},
        {"group_size": 0},
        {"group_size": -2},
        {"salient_metric": "random"},
        {"stats_mode": "paper"},
        {"low_frac": 0.9},
    ],
)
def test_config_rejects(bad):
    with pytest.raises(ValidationError):
        PBLLMConfig(**bad)


def test_config_error_names_the_field():
    with pytest.raises(ValidationError, match="salient_fraction"):
        PBLLMConfig(salient_fraction=0)


# -------------------------------------------------------------------------------------- mask selection


def test_select_salient_keeps_the_largest_scores_exactly():
    scores = torch.randperm(60, generator=torch.Generator().manual_seed(0)).float().view(6, 10)
    salient = select_salient(scores, group_size=10, salient_fraction=0.1)
    # floor(0.9 * 60) = 54 binarized, 6 salient: exactly the scores 54..59.
    assert int(salient.sum()) == 6
    assert torch.equal(salient, scores >= 54)


def test_select_salient_ties_give_exact_count_in_row_major_order():
    scores = torch.ones(3, 4)
    salient = select_salient(scores, group_size=4, salient_fraction=0.25)
    # 12 equal scores: floor(0.75 * 12) = 9 binarized, taken first in row-major order.
    expected = torch.zeros(3, 4, dtype=torch.bool)
    expected[2, 1:] = True
    assert torch.equal(salient, expected)


def test_select_salient_pools_rows_per_group_with_ragged_last_group():
    # 2 x 10, groups of 4 columns: [0, 4), [4, 8), [8, 10) with 8, 8 and 4 entries.
    scores = torch.arange(20.0).view(2, 10)
    salient = select_salient(scores, group_size=4, salient_fraction=0.3)
    # floor(0.7 * 8) = 5 binarized -> 3 salient in each full group; floor(0.7 * 4) = 2 -> 2 salient.
    expected = torch.zeros(2, 10, dtype=torch.bool)
    expected[1, 1:4] = True  # scores 11, 12, 13 (the row-1 entries of group 0 except 10)
    expected[1, 5:8] = True  # scores 15, 16, 17
    expected[1, 8:10] = True  # scores 18, 19 (the whole second row of the last group)
    assert torch.equal(salient, expected)
    # Salient share per group is pooled: row 0 gets none, row 1 gets all of them.
    assert salient[0].sum() == 0


def test_salience_scores_by_hand():
    W = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    upper = torch.tensor([[0.5, 0.3], [0.0, 2.0]])
    assert torch.equal(salience_scores(W, upper, "magnitude"), W.abs())
    expected = torch.tensor([[1.0 / 0.25, 4.0 / 4.0], [9.0 / 0.25, 0.25 / 4.0]])
    assert torch.allclose(salience_scores(W, upper, "hessian"), expected)


def test_hessian_and_magnitude_metrics_pick_different_entries():
    # Column 0 is cheap to perturb (large U_00) and holds the larger weights; column 1 is expensive.
    W = torch.tensor([[4.0, 1.0], [3.0, 1.5], [5.0, 0.5], [2.0, 1.2]])
    upper = torch.diag(torch.tensor([10.0, 0.1]))
    by_magnitude = select_salient(salience_scores(W, upper, "magnitude"), 2, 0.25)
    by_hessian = select_salient(salience_scores(W, upper, "hessian"), 2, 0.25)
    # 8 entries: floor(0.75 * 8) = 6 binarized, 2 salient.
    assert torch.nonzero(by_magnitude).tolist() == [[0, 0], [2, 0]]  # |w| = 4, 5
    assert torch.nonzero(by_hessian).tolist() == [[1, 1], [3, 1]]  # w^2 / 0.01 = 225, 144


# ----------------------------------------------------------------------------------- binarizer params


W_SMALL = torch.tensor([[1.0, -3.0, 2.0, 8.0], [-1.0, -2.0, 0.5, 0.5]])
SALIENT_SMALL = torch.tensor([[False, False, False, True], [True, True, True, True]])


def test_binary_params_reference_mode_dilutes_with_salient_zeros():
    alpha, mu = fit_binary_params(W_SMALL, SALIENT_SMALL, group_size=4, stats_mode="reference")
    # Row 0 pool = [1, -3, 2, 0]: mu = 0, alpha = (1 + 3 + 2 + 0) / 4 = 1.5. Row 1: nothing binarized.
    assert torch.equal(mu, torch.tensor([[0.0], [0.0]]))
    assert torch.equal(alpha, torch.tensor([[1.5], [0.0]]))


def test_binary_params_corrected_mode_uses_binarized_entries_only():
    alpha, mu = fit_binary_params(W_SMALL, SALIENT_SMALL, group_size=4, stats_mode="corrected")
    # Row 0 binarized = [1, -3, 2]: mu = 0, alpha = 6 / 3 = 2.
    assert torch.equal(mu, torch.tensor([[0.0], [0.0]]))
    assert torch.equal(alpha, torch.tensor([[2.0], [0.0]]))


def test_binary_params_per_group_with_nonzero_mean_and_fp16_rounding():
    W = torch.tensor([[1.0, 2.0, 4.0, 0.1, 0.2, 0.3, 9.0]])
    salient = torch.tensor([[False, False, True, False, False, True, False]])
    alpha, mu = fit_binary_params(W, salient, group_size=3, stats_mode="corrected")
    # Groups [1, 2 | 4*], [0.1, 0.2 | 0.3*], [9]: mu = 1.5, 0.15, 9; alpha = 0.5, 0.05, 0.
    assert mu[0, 0] == 1.5 and alpha[0, 0] == 0.5
    assert mu[0, 1] == torch.tensor(0.15).half().float() and abs(alpha[0, 1] - 0.05) < 1e-4
    assert mu[0, 2] == 9.0 and alpha[0, 2] == 0.0
    assert torch.equal(alpha, alpha.half().float()) and torch.equal(mu, mu.half().float())
    ref_alpha, ref_mu = fit_binary_params(W, salient, group_size=3, stats_mode="reference")
    # Reference pools the salient zero: group 0 = [1, 2, 0] -> mu = 1, alpha = (0 + 1 + 1) / 3.
    assert ref_mu[0, 0] == 1.0 and ref_alpha[0, 0] == torch.tensor(2 / 3).half().float()


def test_column_quantizer_sign_of_zero_is_plus_one_and_high_bit_grid():
    salient = torch.tensor([[False], [False], [True]])
    scale, zero = torch.tensor([0.5, 0.5, 0.5]), torch.tensor([4.0, 4.0, 4.0])
    alpha, mu = torch.tensor([[2.0], [2.0], [2.0]]), torch.tensor([[1.0], [1.0], [1.0]])
    quantizer = PartialBinaryQuantizer(salient, scale, zero, 3, alpha, mu, group_size=1)
    q = quantizer.quantize_column(0, torch.tensor([1.0, 0.9, 1.3]), lambda a, b: None)
    # w = mu -> +1 -> mu + alpha; w < mu -> mu - alpha; salient 1.3 -> code round(2.6) + 4 = 7 -> 1.5.
    assert q.tolist() == [3.0, -1.0, 1.5]
    assert quantizer.signs[:, 0].tolist() == [True, False, False]
    assert quantizer.codes[:, 0].tolist() == [0, 0, 7]


def test_high_quantizer_is_per_row_minmax_with_fp16_scale():
    W = torch.tensor([[0.3, -1.7, 2.2], [0.5, 0.25, 1.0]])
    scale, zero = fit_high_quantizer(W, 8)
    ref_scale, ref_zero = minmax_params(W, 8, sym=False)
    assert torch.equal(scale, ref_scale.half().float()) and torch.equal(zero, ref_zero)
    # Row 1 is all positive: the range still includes 0 (zero point 0).
    assert zero[1] == 0 and torch.isclose(scale[1], torch.tensor(1.0 / 255), rtol=1e-3)


# --------------------------------------------------------------------------------- the whole method


def slow_pbllm(W: torch.Tensor, H: torch.Tensor, frac: float, high_bit: int, group_size: int, mode: str):
    """Independent element-wise implementation: loops everywhere, full OBS update per column."""
    W = W.clone().double()
    rows, cols = W.shape
    U, _ = inverse_cholesky_upper(H.double(), 0.01)
    maxq = 2**high_bit - 1
    lo = torch.clamp(W.min(dim=1).values, max=0)
    hi = torch.clamp(W.max(dim=1).values, min=0)
    scale = ((hi - lo) / maxq).half().double()
    zero = torch.round(-lo / ((hi - lo) / maxq))
    salient = torch.zeros(rows, cols, dtype=torch.bool)
    for g0 in range(0, cols, group_size):
        g1 = min(g0 + group_size, cols)
        # (score, row-major position in the group): ties go to the earlier entry.
        entries = sorted(
            (float(W[r, c] ** 2 / U[c, c] ** 2), r * (g1 - g0) + (c - g0), r, c)
            for r in range(rows)
            for c in range(g0, g1)
        )
        for _, _, r, c in entries[math.floor((1 - frac) * len(entries)) :]:
            salient[r, c] = True
    groups = -(-cols // group_size)
    alpha, mu = torch.zeros(rows, groups, dtype=torch.float64), torch.zeros(rows, groups, dtype=torch.float64)
    for r in range(rows):
        for g in range(groups):
            cs = range(g * group_size, min((g + 1) * group_size, cols))
            binary = [float(W[r, c]) for c in cs if not salient[r, c]]
            if not binary:
                continue
            pool = binary if mode == "corrected" else [0.0 if salient[r, c] else float(W[r, c]) for c in cs]
            m = float(torch.tensor(sum(pool) / len(pool)).half())
            mu[r, g] = m
            alpha[r, g] = float(torch.tensor(sum(abs(v - m) for v in pool) / len(pool)).half())
    Q = torch.zeros_like(W)
    for c in range(cols):
        g = c // group_size
        for r in range(rows):
            w = W[r, c]
            if salient[r, c]:
                code = min(max(torch.round(w / scale[r]) + zero[r], 0), maxq)
                Q[r, c] = scale[r] * (code - zero[r])
            else:
                Q[r, c] = mu[r, g] + alpha[r, g] * (1 if w >= mu[r, g] else -1)
        err = (W[:, c] - Q[:, c]) / U[c, c]
        W[:, c:] -= err.unsqueeze(1) * U[c, c:].unsqueeze(0)
    return Q.float(), salient


@pytest.mark.parametrize("mode", ["reference", "corrected"])
def test_method_matches_independent_slow_implementation(mode):
    W, H = correlated_problem(1, rows=6, cols=10)
    cfg = PBLLMConfig(salient_fraction=0.2, high_bit=4, group_size=4, stats_mode=mode, blocksize=3)
    record = PBLLM(cfg).quantize("t", W.clone(), H.clone())
    expected, expected_salient = slow_pbllm(W, H, 0.2, 4, 4, mode)
    assert torch.equal(record.tensors["salient_mask"], expected_salient)
    # float32 lazy batching vs float64 full updates: equal up to rounding (no sign flips on this seed).
    assert torch.allclose(record.dequantized, expected, atol=1e-3)


@pytest.mark.parametrize("group_size", [-1, 24])  # 24 does not divide 100 columns
def test_record_decodes_exactly_and_matches_the_layout(group_size):
    W, H = correlated_problem(2, rows=16, cols=100)
    record = PBLLM(PBLLMConfig(group_size=group_size, blocksize=32)).quantize("t", W.clone(), H.clone())
    gs = 100 if group_size == -1 else group_size
    assert record.layout == "partial_binary" and record.meta == {"high_bit": 8, "group_size": gs}
    check_tensors("partial_binary", record.tensors, record.meta, 16, 100)
    assert torch.equal(decode(record.layout, record.tensors, record.meta), record.dequantized)
    mask = record.tensors["salient_mask"]
    # Unused entries are zero: no signs under the mask, no codes outside it.
    assert not (record.tensors["signs"] & mask).any() and (record.tensors["salient_codes"][~mask] == 0).all()
    groups = [(g0, min(g0 + gs, 100)) for g0 in range(0, 100, gs)]
    expected_salient = sum(16 * (g1 - g0) - math.floor(0.9 * 16 * (g1 - g0)) for g0, g1 in groups)
    assert int(mask.sum()) == record.stats["salient_count"] == expected_salient
    assert record.loss > 0 and math.isfinite(record.loss)
    assert record.bits.as_dict() == {
        "paper": record.stats["bits_convention"],
        "code": record.stats["bits_eq3"],
        "storage": record.stats["bits_storage"],
    }


def test_gptq_feedback_beats_plain_partial_binarization():
    W, H = correlated_problem(3, rows=64, cols=96)
    cfg = PBLLMConfig(blocksize=32)
    record = PBLLM(cfg).quantize("t", W.clone(), H.clone())
    # The same fixed mask and parameters, applied without error feedback (the paper's "RTN" rows).
    t = record.tensors
    plain = PartialBinaryQuantizer(
        t["salient_mask"], t["high_scales"].float(), t["high_zeros"].float(), 8,
        t["alpha"].float(), t["mu"].float(), group_size=96,
    ).quantize_block(0, 96, W)
    with_feedback = relative_output_error(W, record.dequantized, H)
    without = relative_output_error(W, plain, H)
    assert with_feedback < 0.8 * without


def test_binarized_entries_take_two_values_per_row_and_group():
    W, H = correlated_problem(4, rows=8, cols=64)
    record = PBLLM(PBLLMConfig(salient_fraction=0.05, group_size=32)).quantize("t", W.clone(), H.clone())
    t, binary = record.tensors, ~record.tensors["salient_mask"]
    alpha = t["alpha"].float().repeat_interleave(32, dim=1)
    mu = t["mu"].float().repeat_interleave(32, dim=1)
    plus, minus = (mu + alpha)[binary], (mu - alpha)[binary]
    values = record.dequantized[binary]
    assert ((values == plus) | (values == minus)).all()


# ------------------------------------------------------------------------------------------------ bits


def test_bits_by_hand_bitmap_wins():
    fig = partial_binary_bits(rows=4, cols=8, salient=3, high_bit=8, group_size=8)
    assert fig.figures.paper == pytest.approx((29 * 1 + 3 * 8) / 32)  # 1.65625
    assert fig.figures.code == pytest.approx((29 + 24) / 32 + 1)
    # bitmap 32 bits vs CSR 3 * 3 + 4 * 32 = 137 bits
    assert (fig.index_format, fig.index_bits) == ("bitmap", 32)
    # signs 29 + codes 24 + bitmap 32 + per row (16 + 8) + per row and group 2 * 16
    assert fig.figures.storage == pytest.approx((29 + 24 + 32 + 4 * 24 + 4 * 32) / 32)


def test_bits_by_hand_csr_wins_and_ten_percent_convention():
    assert csr_index_bits(rows=2, cols=1024, salient=10) == 10 * 10 + 2 * 32
    fig = partial_binary_bits(rows=2, cols=1024, salient=10, high_bit=8, group_size=128)
    assert (fig.index_format, fig.index_bits) == ("csr", 164)
    side = 2 * (16 + 8) + 2 * 8 * 32
    assert fig.figures.storage == pytest.approx((2038 + 80 + 164 + side) / 2048)
    ten = partial_binary_bits(rows=10, cols=100, salient=100, high_bit=8, group_size=100).figures
    assert (ten.paper, ten.code) == (pytest.approx(1.7), pytest.approx(2.7))
