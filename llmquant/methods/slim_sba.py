"""SliM-LLM's salience-determined bit allocation (SBA, docs/methods-spec.md §4.3).

Groups are ranked by salience S_t = sum over the group of w^2 / U_jj^2. Candidate p gives the p
least salient groups N-1 bits and the p most salient N+1 bits ("pairing"), every other group N.
The candidates are scored on the calibration data by KL(softmax(x W_p^T) || softmax(y)) over the
output features of each token, and the best p is applied.

Partial group rule: when group_size does not divide the width, the last (narrower) group never
takes part in the ranking and always keeps N bits. A pair must move equal column counts up and
down for the code-weight average to stay exactly N, and the narrower group has no partner of its
width; so the ranking is over the full groups only.
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


def allocation_bits(ranking: torch.Tensor, pairs: int, groups: int, target_bits: int) -> list[int]:
    """Per-group bit widths: the `pairs` first ranked groups at N-1, the `pairs` last at N+1."""
    bits = torch.full((groups,), target_bits, dtype=torch.int64)
    order = ranking.cpu()
    bits[order[:pairs]] -= 1
    bits[order[len(order) - pairs :]] += 1
    return bits.tolist()


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

    def __init__(self, weight: torch.Tensor, u_diag: torch.Tensor, target_bits: int, group_size: int, max_pairs: int):
        cols = weight.shape[1]
        self.group_size, self.full_groups = group_size, cols // group_size
        self.ranking = rank_full_groups(group_salience(weight, u_diag, group_size), cols, group_size)
        self.base = map_groups(lambda v: rtn_group_quantize(v, target_bits), weight, group_size)
        self.low_groups = self.ranking[:max_pairs]
        self.high_groups = self.ranking.flip(0)[:max_pairs]
        self.low_steps = self._steps(weight, target_bits - 1, self.low_groups)
        self.high_steps = self._steps(weight, target_bits + 1, self.high_groups)
        self.objective_sum = torch.zeros(max_pairs + 1, dtype=torch.float64, device=weight.device)
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
        objectives = [kl_to_target(running, log_target).unsqueeze(0)]
        x_groups = x[:, : self.full_groups * self.group_size].reshape(x.shape[0], self.full_groups, self.group_size)
        chunk = max(1, KL_CHUNK_ELEMENTS // max(running.numel(), 1))
        for start in range(0, len(self.low_groups), chunk):
            stop = start + chunk
            step_outputs = self._step_outputs(x_groups, self.low_groups[start:stop], self.low_steps[start:stop])
            step_outputs += self._step_outputs(x_groups, self.high_groups[start:stop], self.high_steps[start:stop])
            candidate_outputs = running + step_outputs.cumsum(dim=0)
            running = candidate_outputs[-1]
            objectives.append(kl_to_target(candidate_outputs, log_target))
        self.objective_sum += torch.cat(objectives).double()
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
