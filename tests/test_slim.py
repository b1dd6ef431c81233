"""SliM-LLM backend: SBA candidates and objective, SQC, records, allocation override, end to end.

Independent slow implementations (explicit loops) live in this file; the backend is vectorised."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError

from llmquant.layouts.mixed import mixed_bits
from llmquant.core.gptq import relative_output_error
from llmquant.core.hessian import inverse_cholesky_upper
from llmquant.layouts import check_tensors, decode
from llmquant.methods import get_method_class
from llmquant.methods import slim_sba
from llmquant.methods.rtn import RTN, RTNConfig
from llmquant.methods.slim import SliM, SliMConfig
from llmquant.methods.slim_sba import (
    SBAObserver,
    allocation_bits,
    group_salience,
    kl_to_target,
    pair_counts,
    partial_shifts,
    rank_full_groups,
)
from llmquant.methods.slim_sqc import SQCSettings, salient_mask, sqc_fit, tau_grid

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
REFERENCE_SQC = SQCSettings(points=101, low=0.9, high=1.1, norm=2.4, lambda_salience=1.0)


# ---------------------------------------------------------------- slow reference implementations


def slow_rtn(values: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Per row, per group: min-max asymmetric grid (b >= 2) or mu + mean|w| sign(w - mu) (b = 1)."""
    out = torch.empty_like(values)
    maxq = 2**bits - 1
    for r in range(values.shape[0]):
        for start in range(0, values.shape[1], group_size):
            w = values[r, start : start + group_size]
            if bits == 1:
                mu, alpha = w.mean(), w.abs().mean()
                out[r, start : start + group_size] = torch.where(w >= mu, mu + alpha, mu - alpha)
                continue
            lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
            if lo == 0 and hi == 0:
                lo, hi = -1.0, 1.0
            scale = torch.tensor((hi - lo) / maxq)
            zero = torch.round(-lo / scale)
            q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
            out[r, start : start + group_size] = scale * (q - zero)
    return out


def slow_salience_ranking(weight: torch.Tensor, u_diag: torch.Tensor, group_size: int) -> list[int]:
    full = weight.shape[1] // group_size
    sal = [sum((weight[:, j] ** 2 / u_diag[j] ** 2).sum().item() for j in range(g * group_size, (g + 1) * group_size))
           for g in range(full)]
    return sorted(range(full), key=lambda g: sal[g])


def slow_mask(salience: torch.Tensor) -> torch.Tensor:
    flat = salience.flatten().tolist()
    n = len(flat)
    mean = sum(flat) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in flat) / (n - 1))
    outliers = [v for v in flat if std > 0 and abs(v - mean) / std > 2]
    if not outliers:
        return torch.zeros_like(salience, dtype=torch.bool)
    return salience >= min(outliers)


def slow_sqc(values: torch.Tensor, u_diag: torch.Tensor, bits: int, s: SQCSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference loop: taus in order 1, up, down; keep a tau only if strictly better. (scales, zeros)"""
    maxq = 2**bits - 1
    side = (s.points - 1) // 2
    taus = [1.0] + [1 + (s.high - 1) * i / side for i in range(1, side + 1)]
    taus += [1 - (1 - s.low) * i / side for i in range(1, side + 1)]
    mask = slow_mask(values**2 / u_diag**2)
    weights = torch.where(mask, s.lambda_salience, 1.0).double()
    chosen, zeros = [], []
    for r in range(values.shape[0]):
        w = values[r]
        lo, hi = min(w.min().item(), 0.0), max(w.max().item(), 0.0)
        base = (hi - lo) / maxq
        zero = round(-lo / base)
        best, best_scale = math.inf, None
        for tau in taus:
            scale = torch.tensor(tau * base, dtype=torch.float32).half().float()
            q = scale * (torch.clamp(torch.round(w / scale) + zero, 0, maxq) - zero)
            err = (weights[r] * (q - w).abs().double() ** s.norm).sum().item()
            if err < best:
                best, best_scale = err, scale.item()
        chosen.append(best_scale)
        zeros.append(float(zero))
    return torch.tensor(chosen), torch.tensor(zeros)


def correlated_problem(rows=48, cols=576, tokens=96, sequences=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    channel_scale = torch.rand(cols, generator=g) * 3 + 0.2
    xs = [(torch.randn(tokens, cols, generator=g) @ mix) * channel_scale for _ in range(sequences)]
    X = torch.cat(xs)
    hessian = 2 / X.shape[0] * X.T @ X
    weight = torch.randn(rows, cols, generator=g) * 0.05
    bias = torch.randn(rows, generator=g) * 0.1
    return weight, hessian, xs, bias


def run_slim(config: SliMConfig, weight, hessian, xs, bias, name="layer"):
    method = SliM(config)
    observer = method.observer(name, weight.clone(), hessian.clone())
    if observer is not None:
        for x in xs:
            observer.update(x, x @ weight.T + bias)
    return method, method.quantize(name, weight.clone(), hessian.clone(), observer)


# ---------------------------------------------------------------- SBA: candidates


@pytest.mark.parametrize("cols", [576, 640, 1024, 1536, 2048 + 100])
@pytest.mark.parametrize("target", [2, 3, 4])
def test_every_candidate_averages_exactly_n_bits(cols, target):
    group_size = 128
    full, groups = cols // group_size, -(-cols // group_size)
    widths = [min(group_size, cols - s) for s in range(0, cols, group_size)]
    ranking = torch.randperm(full, generator=torch.Generator().manual_seed(cols))
    candidates = pair_counts(full, include_uniform=True)
    assert candidates == list(range(0, full // 2))
    for pairs in candidates:
        bits = allocation_bits(ranking, pairs, groups, target)
        assert sum(w * b for w, b in zip(widths, bits)) == target * cols  # exact, integer arithmetic
        assert bits.count(target - 1) == pairs and bits.count(target + 1) == pairs
        if groups > full:
            assert bits[-1] == target  # the partial group never moves
        assert mixed_bits(4, cols, bits, group_size).code == target


@pytest.mark.parametrize("cols", [576, 1088, 960])
@pytest.mark.parametrize("target", [2, 3, 4])
def test_paired_partial_candidates_average_exactly_n_bits(cols, target):
    group_size = 128
    full, groups = cols // group_size, -(-cols // group_size)
    widths = [min(group_size, cols - s) for s in range(0, cols, group_size)]
    ranking = torch.randperm(full, generator=torch.Generator().manual_seed(cols))
    shifts = partial_shifts(cols, group_size, target, max_pairs=full // 2 - 1)
    assert shifts == ([2] if target == 2 else [2, -2])  # N - 2 = 0 bits is no width
    for pairs in pair_counts(full, include_uniform=True):
        for shift in shifts:
            bits = allocation_bits(ranking, pairs, groups, target, shift)
            assert sum(w * b for w, b in zip(widths, bits)) == target * cols  # exact, integer arithmetic
            assert bits[-1] == target + shift
            # The partner is the next group of the ranking from the matching end, one bit the other way.
            moved = [g for g in range(full) if bits[g] != target]
            assert len(moved) == 2 * pairs + 1
            partner = ranking[pairs] if shift > 0 else ranking[full - 1 - pairs]
            assert bits[int(partner)] == target - (1 if shift > 0 else -1)
            assert mixed_bits(4, cols, bits, group_size).code == target


def test_partial_shifts_only_for_a_half_width_group():
    assert partial_shifts(576, 128, 3, max_pairs=1) == [2, -2]
    assert partial_shifts(640, 128, 3, max_pairs=1) == []  # no partial group
    assert partial_shifts(600, 128, 3, max_pairs=1) == []  # 88 columns: no whole number of bits balances it
    assert partial_shifts(576, 128, 3, max_pairs=2) == []  # 2 pairs + a partner need 5 full groups
    assert partial_shifts(576, 128, 7, max_pairs=1) == [-2]  # 9 bits is no width
    with pytest.raises(ValueError, match="partial"):
        allocation_bits(torch.arange(4), 2, 5, 3, 2)


def test_pair_ranges_follow_the_reference():
    assert pair_counts(32, include_uniform=False) == list(range(1, 16))  # LLaMA-7B attention: 1..15
    assert pair_counts(86, include_uniform=False) == list(range(1, 43))  # down_proj 11008: 1..42
    assert pair_counts(4, include_uniform=False) == [1]  # SmolLM2 576 wide at g = 128
    assert pair_counts(3, include_uniform=False) == []
    assert pair_counts(4, include_uniform=True) == [0, 1]


def test_partial_group_is_left_out_of_the_ranking():
    salience = torch.tensor([5.0, 1.0, 3.0, 4.0, 0.1])  # last = the 64-column group of a 576-wide matrix
    assert rank_full_groups(salience, 576, 128).tolist() == [1, 2, 3, 0]
    assert allocation_bits(rank_full_groups(salience, 576, 128), 1, 5, 2) == [3, 1, 2, 2, 2]


def test_group_salience_matches_a_loop():
    weight = torch.randn(5, 20)
    u_diag = torch.rand(20) + 0.5
    got = group_salience(weight, u_diag, 8)
    want = [sum((weight[r, j] ** 2 / u_diag[j] ** 2).item() for r in range(5) for j in range(s, min(s + 8, 20)))
            for s in range(0, 20, 8)]
    assert torch.allclose(got, torch.tensor(want), rtol=1e-5)


# ---------------------------------------------------------------- SBA: objective


def test_kl_hand_checked():
    # softmax([0, 0]) = (1/2, 1/2) against softmax([ln 3, 0]) = (3/4, 1/4): KL = ln(4/3) / 2.
    out = torch.zeros(1, 2)
    log_target = torch.log(torch.tensor([[0.75, 0.25]]))
    assert kl_to_target(out, log_target).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # Clamp: softmax([0, -100]) = (1, ~4e-44) -> (1, 1e-6), not renormalised; target (1/2, 1/2).
    out = torch.tensor([[0.0, -100.0]])
    log_target = torch.log(torch.tensor([[0.5, 0.5]]))
    want = math.log(2) + 1e-6 * math.log(1e-6 / 0.5)
    assert kl_to_target(out, log_target).item() == pytest.approx(want, rel=1e-6)
    # Tokens are summed; a batch of candidates gives one value each.
    two = torch.stack([torch.zeros(2, 2), torch.tensor([[0.0, -100.0], [0.0, 0.0]])])
    got = kl_to_target(two, torch.log(torch.tensor([[0.75, 0.25], [0.5, 0.5]])))
    second = math.log(1 / 0.75) + 1e-6 * math.log(1e-6 / 0.25)  # token 1; token 2 matches its target
    assert got.tolist() == pytest.approx([0.5 * math.log(4 / 3), second], rel=1e-6)


@pytest.mark.parametrize("target", [2, 3])
def test_observer_objective_matches_direct_computation(monkeypatch, target):
    # One candidate per chunk, so the carried running sum across chunks is exercised too.
    monkeypatch.setattr(slim_sba, "KL_CHUNK_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(1)
    rows, cols, group_size = 6, 76, 8  # 9 full groups + a 4-column partial group -> pairs 0..3
    weight = torch.randn(rows, cols, generator=gen)
    u_diag = torch.rand(cols, generator=gen) + 0.5
    xs = [torch.randn(5, cols, generator=gen) for _ in range(3)]
    ys = [x @ weight.T + 0.3 for x in xs]
    observer = SBAObserver(weight, u_diag, target, group_size, max_pairs=3)
    for x, y in zip(xs, ys):
        observer.update(x, y)

    ranking = slow_salience_ranking(weight, u_diag, group_size)
    assert observer.ranking.tolist() == ranking
    quantized = {b: slow_rtn(weight, b, group_size) for b in (target - 1, target, target + 1)}
    for pairs in range(4):
        candidate = quantized[target].clone()
        for g in ranking[:pairs]:
            candidate[:, g * 8 : g * 8 + 8] = quantized[target - 1][:, g * 8 : g * 8 + 8]
        for g in ranking[len(ranking) - pairs :]:
            candidate[:, g * 8 : g * 8 + 8] = quantized[target + 1][:, g * 8 : g * 8 + 8]
        per_sequence = []
        for x, y in zip(xs, ys):
            p_hat = F.softmax(x @ candidate.T, dim=-1).clamp(min=1e-6)
            p = F.softmax(y, dim=-1).clamp(min=1e-6)
            per_sequence.append(F.kl_div(p.log(), p_hat, reduction="sum").item())
        assert observer.mean_objective()[pairs].item() == pytest.approx(sum(per_sequence) / 3, rel=1e-4)


@pytest.mark.parametrize("target", [2, 3])
def test_shifted_partial_objective_matches_direct_computation(monkeypatch, target):
    monkeypatch.setattr(slim_sba, "KL_CHUNK_ELEMENTS", 1)  # one candidate per chunk
    gen = torch.Generator().manual_seed(2)
    rows, cols, group_size = 6, 76, 8  # 9 full groups + a 4-column (half-width) partial group
    weight = torch.randn(rows, cols, generator=gen)
    u_diag = torch.rand(cols, generator=gen) + 0.5
    xs = [torch.randn(5, cols, generator=gen) for _ in range(3)]
    ys = [x @ weight.T + 0.3 for x in xs]
    observer = SBAObserver(weight, u_diag, target, group_size, max_pairs=3, paired_partial=True)
    for x, y in zip(xs, ys):
        observer.update(x, y)
    assert observer.shifts == ([2] if target == 2 else [2, -2])
    ranking = slow_salience_ranking(weight, u_diag, group_size)
    quantized = {b: slow_rtn(weight, b, group_size) for b in range(max(1, target - 2), target + 3)}
    for shift in observer.shifts:
        for pairs in range(4):
            bits = allocation_bits(torch.tensor(ranking), pairs, 10, target, shift)
            candidate = torch.cat([quantized[b][:, g * 8 : g * 8 + 8] for g, b in enumerate(bits)], dim=1)
            per_sequence = []
            for x, y in zip(xs, ys):
                p_hat = F.softmax(x @ candidate.T, dim=-1).clamp(min=1e-6)
                p = F.softmax(y, dim=-1).clamp(min=1e-6)
                per_sequence.append(F.kl_div(p.log(), p_hat, reduction="sum").item())
            got = observer.mean_shift_objective()[shift][pairs].item()
            assert got == pytest.approx(sum(per_sequence) / 3, rel=1e-4)
    # The plain candidates are unchanged by the extra bookkeeping.
    plain = SBAObserver(weight, u_diag, target, group_size, max_pairs=3)
    for x, y in zip(xs, ys):
        plain.update(x, y)
    assert torch.allclose(plain.mean_objective(), observer.mean_objective())


def test_paired_partial_group_competes_and_keeps_n_bits():
    weight, hessian, xs, bias = correlated_problem(rows=24, cols=576, tokens=48, sequences=3)
    weight[:, 512:] *= 6  # a salient partial group: it should win the two extra bits
    for target in (2, 3):
        _, fixed = run_slim(SliMConfig(bits=target, group_size=128), weight, hessian, xs, bias)
        method, paired = run_slim(SliMConfig(bits=target, group_size=128, partial_group="paired"), weight, hessian, xs, bias)
        assert "partial_shift" not in fixed.stats
        assert paired.stats["partial_shift"] == 2
        group_bits = paired.tensors["group_bits"].tolist()
        assert group_bits[-1] == target + 2
        assert mixed_bits(24, 576, group_bits, 128).code == target  # the average is still exactly N
        chosen = paired.stats["objective_partial+2"][paired.stats["pairs"]]
        assert chosen < min(paired.stats["objective"][p] for p in pair_counts(4, include_uniform=False))
        check_tensors("mixed", paired.tensors, paired.meta, 24, 576)
        assert torch.equal(decode("mixed", paired.tensors, paired.meta), paired.dequantized)
        assert method.summary()["allocation"]["layer"] == group_bits


def test_default_fidelity_is_never_worse_than_uniform():
    weight, hessian, xs, bias = correlated_problem(rows=16, cols=512, tokens=32, sequences=3)
    for target in (2, 3):
        uniform = slow_rtn(weight, target, 64)
        uniform_kl = sum(
            F.kl_div(F.softmax(x @ weight.T + bias, -1).clamp(min=1e-6).log(),
                     F.softmax(x @ uniform.T, -1).clamp(min=1e-6), reduction="sum").item()
            for x in xs
        ) / len(xs)
        _, ref = run_slim(SliMConfig(bits=target, group_size=64), weight, hessian, xs, bias)
        _, default = run_slim(SliMConfig(bits=target, group_size=64, fidelity="default"), weight, hessian, xs, bias)
        assert ref.stats["pairs"] >= 1  # the reference never evaluates uniform
        objective = default.stats["objective"]
        assert objective[0] == pytest.approx(uniform_kl, rel=1e-4)
        assert objective[default.stats["pairs"]] == min(objective) <= objective[0]


def test_best_pairs_choice_per_fidelity():
    observer = SBAObserver(torch.randn(4, 64), torch.ones(64), 2, 8, max_pairs=3)
    observer.objective_sum = torch.tensor([1.0, 2.0, 1.5, 1.5], dtype=torch.float64)
    observer.sequences = 2
    assert observer.best_pairs(pair_counts(8, include_uniform=True)) == 0
    assert observer.best_pairs(pair_counts(8, include_uniform=False)) == 2  # first of the tie 2/3


# ---------------------------------------------------------------- SQC


def test_tau_grid_is_the_reference_set_in_reference_order():
    taus = tau_grid(REFERENCE_SQC)
    assert taus.shape == (101,) and taus[0] == 1.0
    assert torch.allclose(taus[1:51], 1 + 0.1 * torch.arange(1, 51) / 50)
    assert torch.allclose(taus[51:], 1 - 0.1 * torch.arange(1, 51) / 50)


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("lam", [1.0, 4.0])
def test_sqc_picks_the_best_tau_like_the_loop(bits, lam):
    gen = torch.Generator().manual_seed(bits * 10 + int(lam))
    values = torch.randn(6, 16, generator=gen)
    # Planted rows: most points on a grid 0.95 times the min-max step, one point at the max.
    values[0] = torch.tensor([0.0, 0.95, 1.9] * 5 + [3.0])
    values[1] = -values[0]
    values[2, 3] = 8.0  # a salience outlier so the mask is not empty
    u_diag = torch.rand(16, generator=gen) + 0.5
    settings = SQCSettings(points=101, low=0.9, high=1.1, norm=2.4, lambda_salience=lam)
    scale, zero = sqc_fit(values, u_diag, bits, settings)
    want_scale, want_zero = slow_sqc(values, u_diag, bits, settings)
    assert torch.equal(scale, want_scale) and torch.equal(zero, want_zero)
    if bits == 2:  # the planted rows' best scale is well below the min-max step of 1.0
        assert scale[0] < 0.97 and scale[1] < 0.97


def test_salient_mask_matches_the_rule_and_survives_no_outliers():
    salience = torch.rand(8, 16, generator=torch.Generator().manual_seed(3))
    salience[0, 0] = 50.0
    assert torch.equal(salient_mask(salience), slow_mask(salience))
    assert salient_mask(salience).sum() >= 1
    flat = torch.ones(4, 8)  # std 0: no outliers (the reference crashes here)
    assert not salient_mask(flat).any()
    assert not salient_mask(torch.tensor([[1.0, 2.0, 3.0, 4.0]])).any()  # no |z| > 2


# ---------------------------------------------------------------- records, bits, override, end to end


def test_mixed_bits_by_hand():
    fig = mixed_bits(rows=2, cols=576, group_bits=[1, 2, 3, 2, 2], group_size=128)
    assert fig.code == fig.paper == (128 * 1 + 128 * 2 + 128 * 3 + 128 * 2 + 64 * 2) / 576
    side = 2 * (5 * 16 + 16 + 2 + 3 + 2 + 2) + 5 * 8  # scales, zeros (fp16 mu for 1 bit), tags
    assert fig.storage == pytest.approx(fig.code + side / (2 * 576))


@pytest.mark.parametrize("target", [2, 3])
def test_end_to_end_record_is_consistent_and_beats_rtn(target):
    weight, hessian, xs, bias = correlated_problem()
    method, record = run_slim(SliMConfig(bits=target, group_size=128), weight, hessian, xs, bias)
    rows, cols = weight.shape
    check_tensors(record.layout, record.tensors, record.meta, rows, cols)
    assert torch.equal(decode(record.layout, record.tensors, record.meta), record.dequantized)

    group_bits = record.tensors["group_bits"].tolist()
    assert group_bits == method.summary()["allocation"]["layer"]
    assert record.stats["pairs"] == 1 and record.stats["allocation_source"] == "search"
    assert record.stats["bits_histogram"] == {str(target - 1): 1, str(target): 3, str(target + 1): 1}
    assert group_bits[-1] == target and record.bits.code == target
    for g, b in enumerate(group_bits):
        codes = record.tensors["codes"][:, g * 128 : (g + 1) * 128]
        assert int(codes.max()) < 2**b
        if b == 1:  # every row of a 1-bit group holds at most mu - alpha and mu + alpha
            assert all(len(torch.unique(r)) <= 2 for r in record.dequantized[:, g * 128 : (g + 1) * 128])
    assert record.loss > 0

    rtn = RTN(RTNConfig(bits=target, group_size=128)).quantize("layer", weight.clone(), hessian.clone())
    X = torch.cat(xs)
    slim_err = ((X @ (weight - record.dequantized).T) ** 2).sum()
    rtn_err = ((X @ (weight - rtn.dequantized).T) ** 2).sum()
    assert slim_err < 0.8 * rtn_err
    assert relative_output_error(weight, record.dequantized, hessian) < relative_output_error(
        weight, rtn.dequantized, hessian
    )


def test_allocation_override_skips_the_search_and_reproduces():
    weight, hessian, xs, bias = correlated_problem(rows=16, cols=512, tokens=32, sequences=2)
    searched_method, searched = run_slim(SliMConfig(bits=2, group_size=64), weight, hessian, xs, bias)
    allocation = searched_method.summary()["allocation"]
    method = SliM(SliMConfig(bits=2, group_size=64, allocation=allocation))
    assert method.observer("layer", weight.clone(), hessian.clone()) is None
    replay = method.quantize("layer", weight.clone(), hessian.clone(), None)
    assert torch.equal(replay.dequantized, searched.dequantized)
    assert replay.stats["allocation_source"] == "recipe"

    unbalanced = SliM(SliMConfig(bits=2, group_size=64, allocation={"layer": [3] * 8}))
    record = unbalanced.quantize("layer", weight.clone(), hessian.clone(), None)
    assert record.bits.code == 3.0  # reported as it is, not as the nominal N
    short = SliM(SliMConfig(bits=2, group_size=64, allocation={"layer": [2] * 7}))
    # Refused before any work (run_quantize turns this into a one-line UserError, exit 2) ...
    with pytest.raises(ValueError, match="7 groups given, the linear has 8"):
        short.check_linears({"layer": (16, 512), "other": (16, 64)})
    short.check_linears({"other": (16, 512)})  # linears the allocation does not name are not its business
    # ... and by quantize itself, for a caller that skipped the check.
    with pytest.raises(ValueError, match="7 groups given"):
        short.quantize("layer", weight.clone(), hessian.clone(), None)


def test_every_group_is_asymmetric_even_before_the_first_n_bit_group():
    # The reference quantizes (N-1)-bit groups met before any N / N+1 group with a symmetric zero
    # point ((2^b)/2); ours is always min-max asymmetric, so the first group (fitted on the original,
    # all-positive weights) gets zero point 0 instead of 2.
    gen = torch.Generator().manual_seed(4)
    weight = torch.rand(8, 192, generator=gen) + 0.1
    x = torch.randn(64, 192, generator=gen)
    hessian = 2 / 64 * x.T @ x
    method = SliM(SliMConfig(bits=3, group_size=64, allocation={"layer": [2, 4, 3]}))
    record = method.quantize("layer", weight.clone(), hessian, None)
    assert torch.all(record.tensors["zeros"][:, 0] == 0)
    assert record.bits.code == 3.0


def test_dead_columns_and_missing_observations():
    weight, hessian, xs, bias = correlated_problem(rows=8, cols=256, tokens=16, sequences=1)
    hessian[5, :] = 0
    hessian[:, 5] = 0
    record = SliM(SliMConfig(bits=3, group_size=64)).quantize("layer", weight.clone(), hessian.clone(), None)
    assert record.stats["allocation_source"].startswith("uniform")
    assert record.tensors["group_bits"].tolist() == [3, 3, 3, 3]
    # The dead input is zeroed and receives no GPTQ update, and 0 is on every min-max grid.
    assert torch.all(record.dequantized[:, 5] == 0)
    assert torch.isfinite(record.dequantized).all()


@pytest.mark.parametrize("recipe, target", [("slim-2bit.yaml", 2), ("slim-3bit.yaml", 3)])
def test_recipes_are_valid_configs(recipe, target):
    block = yaml.safe_load((RECIPES / recipe).read_text())["method"]
    cfg = SliMConfig.model_validate(block)
    assert cfg.bits == target and cfg.group_size == 128 and cfg.fidelity == "reference"


def test_config_validation_and_registration():
    assert get_method_class("slim") is SliM
    cfg = SliMConfig()
    assert (cfg.bits, cfg.group_size, cfg.percdamp, cfg.sqc_grid, cfg.sqc_range, cfg.sqc_norm) == (
        2, 128, 0.01, 101, (0.9, 1.1), 2.4)
    assert cfg.lambda_salience == 1.0 and cfg.fidelity == "reference" and cfg.allocation is None
    for bad in ({"bits": 5}, {"sqc_grid": 100}, {"sqc_range": (1.1, 1.2)}, {"unknown": 1},
                {"allocation": {"x": [0, 2]}}, {"fidelity": "paper"}):
        with pytest.raises(ValidationError):
            SliMConfig(**bad)
