"""SliM-LLM's salience-determined bit allocation (SBA, docs/methods-spec.md §4.3).

Groups are ranked by salience S_t = sum over the group of w^2 / U_jj^2. Candidate p gives the p
least salient groups N-1 bits and the p most salient N+1 bits ("pairing"), every other group N.
The candidates are scored on the calibration data by KL(softmax(x W_p^T) || softmax(y)) over the
output features of each token, and the best p is applied.

Partial group rule: when group_size does not divide the width, the last (narrower) group never
takes part in the ranking. A pair must move equal column counts up and down for the code-weight
average to stay exactly N, and the narrower group has no partner of its width. By default
(`partial_group: fixed`) it keeps N bits. With `partial_group: paired`, a group exactly half as wide
(576 = 4 x 128 + 64: every hidden-size input of SmolLM2) may also move two bits, against one more
full group moving one bit the other way (2 x 64 = 1 x 128 columns, so the average stays exactly N):
candidate (p, +2) is candidate p plus the partial group at N+2 and the next least salient full group
at N-1; (p, -2) the partial group at N-2 and the next most salient full group at N+1. The search
scores them with the same objective as the plain candidates and keeps the best (ties: the plain one).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from llmquant.core.groups import group_sums
from llmquant.core.uniform import fake_quantize, minmax_params
from llmquant.core.method import Observer
from llmquant.methods.slim_sqc import binary_codes, binary_dequantize, binary_params

# Softmax probabilities are clamped here before the logarithm (reference value).
PROBABILITY_FLOOR = 1e-6
# Upper bound on candidates x tokens x out_features elements of candidate outputs held at once.
KL_CHUNK_ELEMENTS = 1 << 26
# How far the half-width partial group moves under `partial_group: paired` (2 x half = 1 x full).
PARTIAL_SHIFT = 2
MAX_GROUP_BITS = 8  # the mixed layout's widest group


def group_salience(weight: torch.Tensor, u_diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """S_t per group (the partial last group included): sum of w_ij^2 / U_jj^2 over its entries."""
    column_salience = (weight.square() / u_diag.square().unsqueeze(0)).sum(dim=0)
    return group_sums(column_salience, group_size)  # deterministic on CUDA too (core/groups.py)


def rank_full_groups(salience: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Indices of the full-width groups, least salient first (the partial group is left out)."""
    return torch.argsort(salience[: cols // group_size], stable=True)


def pair_counts(full_groups: int, include_uniform: bool) -> list[int]:
    """Candidate numbers of (N-1, N+1) pairs: the reference's 1 .. floor(k/2) - 1, plus 0 (uniform)
    when asked. k/2 itself is excluded as in the reference (it would leave no group at N)."""
    return list(range(0 if include_uniform else 1, full_groups // 2))


def allocation_bits(ranking: torch.Tensor, pairs: int, groups: int, target_bits: int, partial_shift: int = 0) -> list[int]:
    """Per-group bit widths: the `pairs` first ranked groups at N-1, the `pairs` last at N+1; with a
    partial shift (+-2, module docstring) the partial last group at N + shift and one more full group,
    the next in the ranking from the matching end, one bit the other way."""
    bits = torch.full((groups,), target_bits, dtype=torch.int64)
    order = ranking.cpu()
    bits[order[:pairs]] -= 1
    bits[order[len(order) - pairs :]] += 1
    if partial_shift:
        if groups != len(order) + 1 or 2 * pairs + 1 > len(order):
            raise ValueError(f"a partial shift needs one partial group and {2 * pairs + 1} full groups")
        bits[-1] += partial_shift
        if partial_shift > 0:
            bits[order[pairs]] -= 1
        else:
            bits[order[len(order) - 1 - pairs]] += 1
    return bits.tolist()


def partial_shifts(cols: int, group_size: int, target_bits: int, max_pairs: int) -> list[int]:
    """The moves (+2 / -2) the partial last group may make under `partial_group: paired`: only a
    group exactly half as wide as the others, only to widths 1..8, and only where every candidate
    has a further full group to pair with (2 * max_pairs + 1 <= full groups)."""
    full, partial = divmod(cols, group_size)
    if partial == 0 or PARTIAL_SHIFT * partial != group_size or 2 * max_pairs + 1 > full:
        return []
    return [s for s in (PARTIAL_SHIFT, -PARTIAL_SHIFT) if 1 <= target_bits + s <= MAX_GROUP_BITS]


def rtn_group_quantize(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The search's candidate quantizer on rows x width (no GPTQ, no SQC): asymmetric min-max per
    row for b >= 2, mu + mean|w| * sign(w - mu) for b = 1."""
    if bits == 1:
        alpha, mu = binary_params(values)
        alpha, mu = alpha.unsqueeze(1), mu.unsqueeze(1)
        return binary_dequantize(binary_codes(values, mu), alpha, mu)
    scale, zero = minmax_params(values, bits, sym=False)
    return fake_quantize(values, scale.unsqueeze(1), zero.unsqueeze(1), bits)


def map_groups(fn: Callable[[torch.Tensor], torch.Tensor], weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Applies a per-row function to every column group at once (full groups as one batch of rows)."""
    rows, cols = weight.shape
    full = cols // group_size * group_size
    parts = [fn(weight[:, :full].reshape(-1, group_size)).reshape(rows, full)]
    if full < cols:
        parts.append(fn(weight[:, full:]))
    return torch.cat(parts, dim=1)


def kl_to_target(outputs: torch.Tensor, log_target: torch.Tensor) -> torch.Tensor:
    """sum over tokens of KL(P_hat || P), P_hat = softmax(outputs) over output features.

    outputs: (..., tokens, features); log_target: log of the clamped target probabilities.
    Both distributions are clamped at 1e-6 and not renormalised, as the reference computes it."""
    probs = F.softmax(outputs, dim=-1).clamp_min(PROBABILITY_FLOOR)
    return (probs * (probs.log() - log_target)).sum(dim=(-2, -1))


class SBAObserver(Observer):
    """Accumulates the KL objective of every pair count 0 .. max_pairs over calibration sequences.

    Candidate p's weight is the N-bit RTN weight with the p least salient full groups replaced by
    their (N-1)-bit and the p most salient by their (N+1)-bit versions. So its output is the N-bit
    output plus the first p "steps" of per-group output changes; a cumulative sum over steps gives
    every candidate's output from one matmul of the base plus one batched matmul per group pair.
    """

    def __init__(
        self, weight: torch.Tensor, u_diag: torch.Tensor, target_bits: int, group_size: int, max_pairs: int,
        paired_partial: bool = False,
    ):
        cols = weight.shape[1]
        self.group_size, self.full_groups = group_size, cols // group_size
        self.ranking = rank_full_groups(group_salience(weight, u_diag, group_size), cols, group_size)
        self.base = map_groups(lambda v: rtn_group_quantize(v, target_bits), weight, group_size)
        self.shifts = partial_shifts(cols, group_size, target_bits, max_pairs) if paired_partial else []
        # One more group at each end than the pairs use: the partner of a shifted partial group.
        extra = 1 if self.shifts else 0
        self.low_groups = self.ranking[: max_pairs + extra]
        self.high_groups = self.ranking.flip(0)[: max_pairs + extra]
        self.low_steps = self._steps(weight, target_bits - 1, self.low_groups)
        self.high_steps = self._steps(weight, target_bits + 1, self.high_groups)
        self.max_pairs = max_pairs
        full = self.full_groups * group_size
        # Weight change of the partial group moving by each shift, and where its partner comes from.
        self.partial_steps = {
            s: rtn_group_quantize(weight[:, full:], target_bits + s) - self.base[:, full:] for s in self.shifts
        }
        self.objective_sum = torch.zeros(max_pairs + 1, dtype=torch.float64, device=weight.device)
        self.shift_objective_sum = {
            s: torch.zeros(max_pairs + 1, dtype=torch.float64, device=weight.device) for s in self.shifts
        }
        self.sequences = 0

    def _steps(self, weight: torch.Tensor, bits: int, groups: torch.Tensor) -> torch.Tensor:
        """(steps, rows, group_size): weight change when each listed group moves from N to `bits`."""
        full = self.full_groups * self.group_size
        requantized = map_groups(lambda v: rtn_group_quantize(v, bits), weight[:, :full], self.group_size)
        delta = (requantized - self.base[:, :full]).reshape(weight.shape[0], self.full_groups, self.group_size)
        return delta[:, groups].permute(1, 0, 2).contiguous()

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(self.base.dtype)
        y = outputs.reshape(-1, outputs.shape[-1]).to(self.base.dtype)
        log_target = F.softmax(y, dim=-1).clamp_min(PROBABILITY_FLOOR).log()
        running = x @ self.base.T
        full = self.full_groups * self.group_size
        x_groups = x[:, :full].reshape(x.shape[0], self.full_groups, self.group_size)
        # Candidate (p, s) = candidate p + the partial group's move + its partner group's step p.
        partial_outputs = {s: x[:, full:] @ step.T for s, step in self.partial_steps.items()}
        partners = {s: (self.low_groups, self.low_steps) if s > 0 else (self.high_groups, self.high_steps) for s in self.shifts}

        def shifted(outputs: torch.Tensor, first: int, count: int) -> dict[int, torch.Tensor]:
            """Objectives of the shifted twins of candidates first .. first + count - 1."""
            result = {}
            for s, (groups, steps) in partners.items():
                partner = self._step_outputs(x_groups, groups[first : first + count], steps[first : first + count])
                result[s] = kl_to_target(outputs + partial_outputs[s] + partner, log_target)
            return result

        objectives = [kl_to_target(running, log_target).unsqueeze(0)]
        shift_objectives = {s: [v] for s, v in shifted(running.unsqueeze(0), 0, 1).items()}
        chunk = max(1, KL_CHUNK_ELEMENTS // max(running.numel() * (1 + len(self.shifts)), 1))
        for start in range(0, self.max_pairs, chunk):
            stop = min(start + chunk, self.max_pairs)
            step_outputs = self._step_outputs(x_groups, self.low_groups[start:stop], self.low_steps[start:stop])
            step_outputs += self._step_outputs(x_groups, self.high_groups[start:stop], self.high_steps[start:stop])
            candidate_outputs = running + step_outputs.cumsum(dim=0)
            running = candidate_outputs[-1]
            objectives.append(kl_to_target(candidate_outputs, log_target))
            for s, value in shifted(candidate_outputs, start + 1, stop - start).items():
                shift_objectives[s].append(value)
        self.objective_sum += torch.cat(objectives).double()
        for s, values in shift_objectives.items():
            self.shift_objective_sum[s] += torch.cat(values).double()
        self.sequences += 1

    @staticmethod
    def _step_outputs(x_groups: torch.Tensor, groups: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """(steps, tokens, out): each step's output change x_g (delta W_g)^T."""
        return torch.bmm(x_groups[:, groups].permute(1, 0, 2), steps.transpose(1, 2))

    def mean_objective(self) -> torch.Tensor:
        """Mean over sequences of the objective of pair counts 0 .. max_pairs."""
        return self.objective_sum / max(self.sequences, 1)

    def best_pairs(self, candidates: list[int]) -> int:
        """argmin over the given pair counts (the first on ties)."""
        scores = self.mean_objective()[candidates]
        return candidates[int(torch.argmin(scores))]

    def mean_shift_objective(self) -> dict[int, torch.Tensor]:
        """Per partial shift, the mean objective of its twins of pair counts 0 .. max_pairs."""
        return {s: total / max(self.sequences, 1) for s, total in self.shift_objective_sum.items()}

    def best_allocation(self, candidates: list[int]) -> tuple[int, int]:
        """(pairs, partial shift) with the lowest objective over the given pair counts and every
        allowed shift; on ties the unshifted candidate, then the fewer pairs."""
        pairs = self.best_pairs(candidates)
        best, best_score = (pairs, 0), float(self.mean_objective()[pairs])
        for s, objective in self.mean_shift_objective().items():
            for p in candidates:
                if float(objective[p]) < best_score:
                    best, best_score = (p, s), float(objective[p])
        return best
