"""Binarization primitives of the 1-bit methods (BiLLM; reusable by PB-LLM and others).

Two views of the same operator, the residual binarizer R_o(x; M) (docs/methods-spec.md §2.3):

- `binarize`: the operator itself, explicit and masked. Per row (last dimension), over the row's
  masked entries, `order` times: mu = mean of the residual, alpha = mean |residual - mu|,
  b = sign(residual - mu), reconstruction += alpha * b + mu. It returns the fitted (alpha, mu) and
  sign planes, i.e. what a record stores.
- `residual_sse`: the squared error R_o would leave, in closed form, for many candidate sets at
  once. BiLLM tries 49 salient-column counts and 81 break points per block; doing each as a full
  masked binarization costs (candidates x rows x block) per pass, far too slow on a CPU. Because
  R_o's reconstruction is a non-decreasing step function of the value, every quantity it needs
  (means, absolute deviations, the final squared error) is a sum over value intervals, which a
  sorted copy of each row with prefix sums of (1, x, x^2) answers by binary search.

Sign convention: sign(0) := +1 (an entry equal to the mean gets +alpha). The reference uses
torch.sign, which gives 0 there and reconstructs such an entry as mu; a stored sign plane has no
0, so we deviate. `residual_sse` follows the same convention (x >= threshold is the upper side).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class Binarization:
    """Result of `binarize` on x of shape (..., rows, cols)."""

    reconstruction: torch.Tensor  # the broadcast shape of x and mask; 0 outside the mask
    alpha: torch.Tensor  # (order, ..., rows)
    mu: torch.Tensor  # (order, ..., rows)
    signs: torch.Tensor  # (order, ..., rows, cols) bool, True = +1; False outside the mask


def binarize(
    x: torch.Tensor,
    mask: torch.Tensor,
    order: int = 1,
    centred: bool = True,
    fp16_params: bool = False,
) -> Binarization:
    """Residual binarization of order `order` of x restricted to `mask` (x and mask broadcast, so a
    stack of candidate masks (K, rows, cols) binarizes one x (rows, cols) K ways at once).

    centred=False is the paper's binarizer: mu := 0, alpha = mean |residual|.
    fp16_params rounds each alpha and mu to float16 the moment it is fitted, so the next order's
    residual (and the caller's error feedback) sees exactly the stored value.
    A row with no masked entry gets alpha = mu = 0.
    """
    x, mask = torch.broadcast_tensors(x, mask)
    # Clamping the count only matters for empty rows, whose masked sums are 0 -> mu = alpha = 0.
    count = mask.sum(-1, keepdim=True).clamp_min(1).to(x.dtype)
    reconstruction = torch.zeros_like(x)
    alphas, mus, signs = [], [], []
    for _ in range(order):
        residual = torch.where(mask, x - reconstruction, 0.0)
        mu = residual.sum(-1, keepdim=True) / count if centred else torch.zeros_like(count)
        mu = _stored(mu, fp16_params)
        plus = residual >= mu
        alpha = torch.where(mask, (residual - mu).abs(), 0.0).sum(-1, keepdim=True) / count
        alpha = _stored(alpha, fp16_params)
        reconstruction = reconstruction + torch.where(mask, alpha * (plus.to(x.dtype) * 2 - 1) + mu, 0.0)
        alphas.append(alpha.squeeze(-1))
        mus.append(mu.squeeze(-1))
        signs.append(plus & mask)
    return Binarization(reconstruction, torch.stack(alphas), torch.stack(mus), torch.stack(signs))


def _stored(param: torch.Tensor, fp16: bool) -> torch.Tensor:
    return param.half().to(param.dtype) if fp16 else param


# ---------------------------------------------------------------------------------------------
# Closed-form errors for many candidate sets at once.
#
# A "value set" holds, per row and per candidate, a set of values. It answers below(t): the moments
# (count, sum, sum of squares) of the members < t, as a (rows, K, 3) tensor for thresholds t of shape
# (rows, K). Compute in float64: the squared error comes out as sum x^2 - 2 c sum x + c^2 n, which
# cancels badly in float32 when the error is small next to the values (S-space salient columns).


class ValueSet(Protocol):
    def below(self, threshold: torch.Tensor) -> torch.Tensor: ...

    def total(self) -> torch.Tensor: ...


def _moments(values: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.ones_like(values), values, values * values], dim=-1)


class SortedRows:
    """The members of each row, one set shared by all candidates; below() is a binary search.

    values: (rows, n); member: bool, broadcastable to values (non-members stay in the sorted copy
    with zero weight, so one sort serves any membership, see `with_members`)."""

    def __init__(self, values: torch.Tensor, member: torch.Tensor | None = None):
        self.sorted, self.order = values.sort(dim=-1)
        self._set_members(member)

    def with_members(self, member: torch.Tensor) -> "SortedRows":
        """The same sorted values with another membership (no new sort)."""
        other = copy.copy(self)
        other._set_members(member)
        return other

    def _set_members(self, member: torch.Tensor | None) -> None:
        moments = _moments(self.sorted)
        if member is not None:
            moments = moments * member.expand_as(self.sorted).gather(-1, self.order).unsqueeze(-1)
        self.prefix = F.pad(moments.cumsum(dim=1), (0, 0, 1, 0))  # (rows, n + 1, 3)

    def below(self, threshold: torch.Tensor) -> torch.Tensor:
        # Left insertion point = number of values strictly below the threshold.
        index = torch.searchsorted(self.sorted, threshold.contiguous())
        return self.prefix.gather(1, index.unsqueeze(-1).expand(-1, -1, 3))

    def total(self) -> torch.Tensor:
        return self.prefix[:, -1:, :]


class LeadingColumns:
    """Candidate c holds the first counts[c] columns of values (rows, m), e.g. the top-k columns.

    below() compares every candidate's threshold with every column: rows x K x m work. That is the
    cheapest exact option for the small m (<= 50) it serves: sets that grow by column rank have no
    single sorted order, and a per-candidate prefix table costs more memory traffic to build than
    the handful of queries it would answer."""

    def __init__(self, values: torch.Tensor, counts: torch.Tensor):
        member = torch.arange(values.shape[1], device=values.device) < counts.unsqueeze(1)  # (K, m)
        # Non-members compare as +inf, so `x < threshold` alone selects the members below it.
        self.candidates = torch.where(member, values.unsqueeze(1), torch.inf)  # (rows, K, m)
        self.moments = _moments(values)  # (rows, m, 3)
        self._total = self.moments.cumsum(dim=1)[:, counts - 1, :]  # (rows, K, 3)

    def below(self, threshold: torch.Tensor) -> torch.Tensor:
        inside = self.candidates < threshold.unsqueeze(-1)
        return torch.bmm(inside.to(self.moments.dtype), self.moments)

    def total(self) -> torch.Tensor:
        return self._total


class Difference:
    """Members of `whole` that are not members of `part` (part must be a subset of whole)."""

    def __init__(self, whole: ValueSet, part: ValueSet):
        self.whole, self.part = whole, part

    def below(self, threshold: torch.Tensor) -> torch.Tensor:
        return self.whole.below(threshold) - self.part.below(threshold)

    def total(self) -> torch.Tensor:
        return self.whole.total() - self.part.total()


@dataclass
class _Region:
    """The set's members with value in [low, high), all reconstructed so far as `offset` (rows, K)."""

    low: torch.Tensor
    high: torch.Tensor
    below_low: torch.Tensor  # moments of the set below `low`
    below_high: torch.Tensor
    offset: torch.Tensor

    def residual_sum(self) -> torch.Tensor:
        """sum (x - offset) over the region."""
        m = self.below_high - self.below_low
        return m[..., 1] - self.offset * m[..., 0]

    def residual_squares(self) -> torch.Tensor:
        """sum (x - offset)^2 over the region."""
        m = self.below_high - self.below_low
        return m[..., 2] - 2 * self.offset * m[..., 1] + self.offset**2 * m[..., 0]

    def count(self) -> torch.Tensor:
        return self.below_high[..., 0] - self.below_low[..., 0]


Interval = tuple[torch.Tensor | None, torch.Tensor | None]


def residual_sse(values: ValueSet, intervals: list[Interval], order: int, centred: bool = True) -> torch.Tensor:
    """Per row and candidate, sum (x - R_o(x))^2 over the binarized set, without materialising R_o.

    The binarized set is the value set's members whose value lies in the union of the disjoint
    intervals [low, high) (None = unbounded; bounds broadcastable to (rows, K)). Returns (rows, K).

    R_o splits its set at threshold offset + mu into a lower part (-alpha) and an upper part
    (+alpha); starting from the intervals, each order splits every region in two, so order o on
    j intervals ends with j * 2^o regions, each a value interval with one reconstruction value.
    """
    regions = [_initial_region(values, low, high) for low, high in intervals]
    count = sum(r.count() for r in regions).clamp_min(1)  # empty sets: mu = alpha = 0, as in binarize
    for _ in range(order):
        mu = sum(r.residual_sum() for r in regions) / count if centred else torch.zeros_like(count)
        lower, upper = [], []
        for r in regions:
            cut = torch.minimum(torch.maximum(r.offset + mu, r.low), r.high)
            below_cut = values.below(cut)
            lower.append(_Region(r.low, cut, r.below_low, below_cut, r.offset + mu))
            upper.append(_Region(cut, r.high, below_cut, r.below_high, r.offset + mu))
        # Offsets now hold each region's sign threshold: alpha = mean |x - threshold| over the set.
        alpha = (sum(r.residual_sum() for r in upper) - sum(r.residual_sum() for r in lower)) / count
        for r in lower:
            r.offset = r.offset - alpha
        for r in upper:
            r.offset = r.offset + alpha
        regions = lower + upper
    return sum(r.residual_squares() for r in regions)


def _initial_region(values: ValueSet, low: torch.Tensor | None, high: torch.Tensor | None) -> _Region:
    total = values.total()
    zero = torch.zeros_like(total[..., 0])
    for bound in (low, high):
        if bound is not None:
            zero = zero + torch.zeros_like(bound)
    moments_shape = (*zero.shape, 3)
    if low is None:
        low, below_low = zero - torch.inf, torch.zeros(moments_shape, dtype=total.dtype, device=total.device)
    else:
        low = low + zero
        below_low = values.below(low)
    if high is None:
        high, below_high = zero + torch.inf, total.expand(moments_shape)
    else:
        high = torch.maximum(high + zero, low)  # an interval given upside down is empty
        below_high = values.below(high)
    return _Region(low, high, below_low, below_high, zero)
