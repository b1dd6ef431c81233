"""BiLLM (Huang et al., ICML 2024): 1-bit PTQ with residual-binarized salient columns, a two-group
("concentrated" / "sparse") binarization of the rest, and block-wise OBS error feedback.

Per block of `blocksize` columns of the current (error-compensated) weights:
1. search the number k of salient columns (top-k by column salience),
2. search the break point p splitting the other weights into |x| < p and |x| >= p,
3. binarize the weights: 2nd-order residual on the salient columns, 1st order on each split group,
4. feed the block's error forward to the later columns (docs/methods-spec.md §2.2, 2.6).
`fidelity` chooses between the reference code's searches and the paper's; docs/methods/billm.md
lists every difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from llmquant.core.gptq import ColumnQuantizer, CurrentColumns, gptq_loop
from llmquant.core.groups import ceil_div
from llmquant.core.hessian import prepare_factor
from llmquant.core.record import QuantizedRecord
from llmquant.layouts import decode, make_record
from llmquant.methods.base import HessianMethodConfig, Method, register
from llmquant.methods.binarize import Difference, LeadingColumns, SortedRows, binarize, residual_sse

# Paper, Appendix C: "the number of salient columns is searched from 3 to 30".
PAPER_COLUMN_RANGE = (3, 30)
SALIENT_ORDER = 2  # orders=(1, 1, 2) in the reference: concentrated, sparse, salient
SPLIT_ORDER = 1
COUNT_SEARCH_ROWS = 256


class BiLLMConfig(HessianMethodConfig):
    name: Literal["billm"] = "billm"
    salient_metric: Literal["hessian", "magnitude"] = Field(
        "hessian",
        description="column salience: w^2 / U_jj^2 (README/run.sh) or the weights themselves "
        "(the reference's argparse default)",
    )
    max_salient_columns: int = Field(
        50,
        ge=2,
        le=8192,
        description="the reference's up_lim: k = 1 .. max-1 salient columns are tried per block "
        "(paper fidelity: 3 .. min(30, max-1))",
    )
    split_min: float = Field(0.10, ge=0.0, le=1.0, description="first break-point grid value")
    split_max: float = Field(0.90, ge=0.0, le=1.0, description="last break-point grid value")
    split_points: int = Field(
        81,
        ge=1,
        le=10_000,
        description="break-point grid size; the grid is quantile probabilities of |S| (reference) "
        "or fractions of max |W| (paper)",
    )
    fidelity: Literal["reference", "paper"] = Field(
        "reference", description="reproduce the reference code's searches, or the paper's formulas"
    )
    gptq_within_block: bool = Field(
        False,
        description="full GPTQ propagation inside each block (masks and parameters fixed at block "
        "start, signs chosen column by column); BiLLM itself uses block-wise feedback only",
    )

    @model_validator(mode="after")
    def _check(self) -> "BiLLMConfig":
        if self.split_min > self.split_max:
            raise ValueError(f"split_min ({self.split_min}) must not exceed split_max ({self.split_max})")
        return self

    @property
    def paper(self) -> bool:
        return self.fidelity == "paper"

    def split_grid(self) -> torch.Tensor:
        return torch.linspace(self.split_min, self.split_max, self.split_points, dtype=torch.float64)

    def candidate_counts(self, width: int) -> torch.Tensor:
        """Salient column counts tried in a block of `width` columns.

        At most width - 1, so that a non-salient part remains (a full 128-wide block never reaches
        this cap; a narrow last block can). A 1-column block is all salient."""
        low, high = PAPER_COLUMN_RANGE if self.paper else (1, self.max_salient_columns - 1)
        high = max(1, min(high, self.max_salient_columns - 1, width - 1))
        return torch.arange(min(low, high), high + 1)


# ---------------------------------------------------------------------------------------------
# The two searches. `values` are what the errors are measured on: the salience matrix S in
# reference fidelity, the weights in paper fidelity.


def search_salient_count(
    values: torch.Tensor,
    scores: torch.Tensor,
    counts: torch.Tensor,
    rest_order: int,
    centred: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error of every candidate salient column count, all at once.

    Candidate k marks the k highest-scoring columns salient, binarizes them with the 2nd-order
    residual binarizer and the other columns with order `rest_order` (reference 2, paper Eq. 5: 1),
    and scores mean((values - reconstruction)^2) over the block.
    Returns (columns ranked by descending score, errors (K,)).
    """
    ranked = torch.argsort(scores, descending=True, stable=True)
    leading = ranked[: int(counts.max())]
    counts = counts.to(values.device)
    # Rows are independent; chunks bound the (rows, K, m) comparison tensors of LeadingColumns.
    sse = sum(
        _count_search_sse(chunk, leading, counts, rest_order, centred).sum(0)
        for chunk in values.double().split(COUNT_SEARCH_ROWS)
    )
    return ranked, sse / values.numel()


def _count_search_sse(
    x: torch.Tensor, leading: torch.Tensor, counts: torch.Tensor, rest_order: int, centred: bool
) -> torch.Tensor:
    salient = LeadingColumns(x[:, leading], counts)
    rest = Difference(SortedRows(x), salient)
    sse = residual_sse(salient, [(None, None)], SALIENT_ORDER, centred)
    return sse + residual_sse(rest, [(None, None)], rest_order, centred)


def linear_quantiles(values: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    """numpy.quantile's default (linear interpolation between order statistics), one sort, any size."""
    ordered = values.flatten().sort().values
    position = probabilities.to(values.device, torch.float64) * (ordered.numel() - 1)
    low = position.floor().long()
    high = (low + 1).clamp_max(ordered.numel() - 1)
    fraction = (position - low).to(values.dtype)
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


def search_break_point(
    values: torch.Tensor,
    salient: torch.Tensor,
    grid: torch.Tensor,
    by_quantile: bool,
    centred: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Error of every candidate break point, all at once.

    The non-salient entries split into concentrated (|x| < p) and sparse (|x| >= p), each binarized
    with first order; the salient columns keep their 2nd-order reconstruction. Candidates are the
    `grid` quantiles of |values| with the salient columns zeroed (reference: the zeros stay in the
    pool) or grid * max |values| over the non-salient entries (paper).
    Returns (thresholds p (P,), errors (P,) = mean((values - reconstruction)^2) over the block).
    """
    pool = values.abs() * ~salient
    if by_quantile:
        thresholds = linear_quantiles(pool, grid)
    else:
        thresholds = (grid.to(values.device) * pool.max().double()).to(values.dtype)
    p = thresholds.double().unsqueeze(0).expand(values.shape[0], -1)
    # |x| < p  <=>  nextafter(-p, +inf) <= x < p: intervals here are closed below, open above.
    concentrated_low = torch.nextafter(-p, torch.full_like(p, torch.inf))
    nonsalient = SortedRows(values.double(), ~salient)
    concentrated = [(concentrated_low, p)]
    sparse = [(None, torch.minimum(concentrated_low, p)), (p, None)]  # min(): p = 0 must not count 0 twice
    sse = residual_sse(nonsalient, concentrated, SPLIT_ORDER, centred)
    sse = sse + residual_sse(nonsalient, sparse, SPLIT_ORDER, centred)
    salient_sse = residual_sse(nonsalient.with_members(salient), [(None, None)], SALIENT_ORDER, centred)
    return thresholds, (sse.sum(0) + salient_sse.sum()) / values.numel()


@dataclass
class BlockMasks:
    salient: torch.Tensor  # (B,) bool: salient columns
    sparse: torch.Tensor  # (rows, B) bool: non-salient entries in the sparse (large) group
    split: float  # the chosen grid value (quantile probability or fraction of max |W|)


def choose_block_masks(block: torch.Tensor, inverse_diag: torch.Tensor, cfg: BiLLMConfig) -> BlockMasks:
    """Runs both searches on one block of current weights; inverse_diag = U_jj of its columns."""
    salience = block**2 / inverse_diag.unsqueeze(0) ** 2 if cfg.salient_metric == "hessian" else block
    # The reference searches on S itself (hessian: w^2/U^2; magnitude: W, signed); the paper ranks
    # by S but measures on W.
    searched = block if cfg.paper else salience
    counts = cfg.candidate_counts(block.shape[1])
    ranked, count_errors = search_salient_count(
        searched, salience.abs().sum(0), counts, rest_order=1 if cfg.paper else 2, centred=not cfg.paper
    )
    salient = torch.zeros(block.shape[1], dtype=torch.bool, device=block.device)
    salient[ranked[: int(counts[int(count_errors.argmin())])]] = True
    grid = cfg.split_grid()
    thresholds, split_errors = search_break_point(
        searched, salient, grid, by_quantile=not cfg.paper, centred=not cfg.paper
    )
    best = int(split_errors.argmin())
    sparse = ~salient & (searched.abs() >= thresholds[best])
    return BlockMasks(salient, sparse, float(grid[best]))


# ---------------------------------------------------------------------------------------------
# Parameters and signs of one block, in the layout's terms.


def fit_block_params(block: torch.Tensor, masks: BlockMasks, centred: bool) -> torch.Tensor:
    """Per row the 8 layout parameters (rows, 8), fp16-rounded as they are fitted."""
    salient = masks.salient.expand_as(block)
    high = binarize(block, salient, SALIENT_ORDER, centred, fp16_params=True)
    concentrated = binarize(block, ~salient & ~masks.sparse, SPLIT_ORDER, centred, fp16_params=True)
    sparse = binarize(block, masks.sparse, SPLIT_ORDER, centred, fp16_params=True)
    # Order of the layout's params: (sal_alpha1, sal_mu1, sal_alpha2, sal_mu2, conc_alpha, conc_mu,
    # sparse_alpha, sparse_mu).
    per_group = [high.alpha[0], high.mu[0], high.alpha[1], high.mu[1]]
    per_group += [concentrated.alpha[0], concentrated.mu[0], sparse.alpha[0], sparse.mu[0]]
    return torch.stack(per_group, dim=-1)


def choose_signs(
    values: torch.Tensor, salient: torch.Tensor, sparse: torch.Tensor, params: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sign planes (signs, signs2) of `values` under fixed masks and parameters (rows, 8).

    The same rule `binarize` applies while fitting (x >= mu is +1, the 2nd order binarizes the
    1st order's residual), so on the values the parameters were fitted to it reproduces the
    fitted signs; with inside-block propagation it re-chooses them for the updated values."""
    a1, m1, a2, m2, conc_alpha, conc_mu, sparse_alpha, sparse_mu = params.unsqueeze(1).unbind(-1)
    first = values >= m1
    second = values - (a1 * (first.to(values.dtype) * 2 - 1) + m1) >= m2
    rest = values >= torch.where(sparse, sparse_mu, conc_mu)
    return torch.where(salient, first, rest), second & salient


class BinaryResidualQuantizer(ColumnQuantizer):
    """BiLLM as a GPTQ column quantizer.

    begin_block searches the masks and fits the parameters from the block's values at block start.
    Block-wise feedback (the reference): quantize_block binarizes the block from those same values.
    gptq_within_block: the loop quantizes column by column after the inside-block OBS updates;
    masks and parameters stay as fitted at block start (the searches need the whole block), only
    the signs follow the updated values.
    """

    def __init__(self, rows: int, cols: int, inverse_diag: torch.Tensor, cfg: BiLLMConfig):
        device = inverse_diag.device
        self.cfg = cfg
        self.inverse_diag = inverse_diag
        self.blocksize = cfg.blocksize
        blocks = ceil_div(cols, cfg.blocksize)
        self.salient_columns = torch.zeros(cols, dtype=torch.bool, device=device)
        self.sparse_mask = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        self.signs = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        self.signs2 = torch.zeros(rows, cols, dtype=torch.bool, device=device)
        self.params = torch.zeros(rows, blocks, 8, dtype=torch.float32, device=device)
        self.splits: list[float] = []

    def begin_block(self, start: int, end: int, current: CurrentColumns) -> None:
        block = current(start, end)
        masks = choose_block_masks(block, self.inverse_diag[start:end], self.cfg)
        self.salient_columns[start:end] = masks.salient
        self.sparse_mask[:, start:end] = masks.sparse
        self.params[:, start // self.blocksize] = fit_block_params(block, masks, centred=not self.cfg.paper)
        self.splits.append(masks.split)

    def quantize_block(self, start: int, end: int, block: torch.Tensor) -> torch.Tensor:
        return self._encode(start, block)

    def quantize_column(self, index: int, column: torch.Tensor, current: CurrentColumns) -> torch.Tensor:
        return self._encode(index, column.unsqueeze(1)).squeeze(1)

    def _encode(self, start: int, values: torch.Tensor) -> torch.Tensor:
        """Chooses and stores the signs of columns [start, start + width); returns their decoded values."""
        end = start + values.shape[1]
        block = start // self.blocksize
        params = self.params[:, block]
        signs, signs2 = choose_signs(values, self.salient_columns[start:end], self.sparse_mask[:, start:end], params)
        self.signs[:, start:end] = signs
        self.signs2[:, start:end] = signs2
        # Decoding is the definition of the layout: the error feedback sees exactly what is stored.
        tensors = {
            "salient_columns": self.salient_columns[start:end],
            "sparse_mask": self.sparse_mask[:, start:end],
            "signs": signs,
            "signs2": signs2,
            "params": params.unsqueeze(1),
        }
        return decode("binary_residual", tensors, {"blocksize": end - start})

    def record(self, dequantized: torch.Tensor, loss: float) -> QuantizedRecord:
        tensors = {
            "salient_columns": self.salient_columns,
            "sparse_mask": self.sparse_mask,
            "signs": self.signs,
            "signs2": self.signs2,
            "params": self.params.half(),
        }
        meta = {"blocksize": self.blocksize}
        return make_record("binary_residual", tensors, meta, loss, self._stats(), expected=dequantized)

    def _stats(self) -> dict[str, object]:
        per_block = self.salient_columns.split(self.blocksize)
        counts = torch.tensor([int(b.sum()) for b in per_block], dtype=torch.float64)
        splits = torch.tensor(self.splits, dtype=torch.float64)
        return {
            "fidelity": self.cfg.fidelity,
            "salient_columns_per_block": _summary(counts),
            "break_point": _summary(splits),
        }


def _summary(values: torch.Tensor) -> dict[str, float]:
    return {"mean": float(values.mean()), "min": float(values.min()), "max": float(values.max())}


@register
class BiLLM(Method[BiLLMConfig]):
    Config = BiLLMConfig
    layouts = ("binary_residual",)

    def quantize(self, name, weight, hessian, observer=None) -> QuantizedRecord:
        cfg = self.config
        W, H = weight.float(), hessian
        upper, _ = prepare_factor(W, H, cfg.percdamp, name)
        rows, cols = W.shape
        quantizer = BinaryResidualQuantizer(rows, cols, torch.diag(upper).to(W), cfg)
        result = gptq_loop(W, upper, quantizer, cfg.blocksize, propagate_within_block=cfg.gptq_within_block)
        return quantizer.record(result.dequantized, result.loss)
