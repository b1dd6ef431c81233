"""The GPTQ column loop with lazy-batch blocks (docs/methods-spec.md §1.3), shared by every Hessian method.

A method supplies a `ColumnQuantizer` that says how one column (or, without inside-block
propagation, one whole block) is quantized; the loop owns the error feedback. That is the only
difference between GPTQ, PB-LLM, SliM-LLM (full loop) and BiLLM (block-wise feedback only).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# current(j0, j1) -> the current (error-compensated) values of columns [j0, j1), rows x (j1 - j0).
CurrentColumns = Callable[[int, int], torch.Tensor]


class ColumnQuantizer:
    """How a method quantizes columns inside the GPTQ loop. Subclasses override what they need."""

    def begin_block(self, start: int, end: int, current: CurrentColumns) -> None:
        """Called before columns [start, end) are processed (hook for per-block fitting)."""

    def quantize_column(self, index: int, column: torch.Tensor, current: CurrentColumns) -> torch.Tensor:
        """Returns the dequantized values for absolute column `index` given its current values."""
        raise NotImplementedError

    def quantize_block(self, start: int, end: int, block: torch.Tensor) -> torch.Tensor:
        """Without inside-block propagation: dequantized values for the whole block at once."""
        current = lambda j0, j1: block[:, j0 - start : j1 - start]  # noqa: E731
        return torch.stack(
            [self.quantize_column(start + i, block[:, i], current) for i in range(end - start)], dim=1
        )


@dataclass
class GPTQResult:
    dequantized: torch.Tensor  # float32 (float64 for float64 input), rows x cols, in the loop's order
    loss: float  # sum (w - q)^2 / U_jj^2 / 2 over all elements


def gptq_loop(
    weight: torch.Tensor,
    upper: torch.Tensor,
    quantizer: ColumnQuantizer,
    blocksize: int = 128,
    propagate_within_block: bool = True,
) -> GPTQResult:
    """Quantizes `weight` (rows x cols) column by column with OBS error feedback.

    upper: U, the upper Cholesky factor of the damped inverse Hessian (hessian.inverse_cholesky_upper).
    propagate_within_block=False is BiLLM's variant: a block is quantized from its values at the
    block start and only the block-to-block update W[:, i2:] -= E U[i1:i2, i2:] is applied.
    """
    # float64 stays float64 (tests compare against exact references); anything else runs in float32.
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    U = upper.to(device=W.device, dtype=dtype)
    rows, cols = W.shape
    Q = torch.zeros_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d = torch.diag(U1)
        E1 = torch.zeros_like(W1)
        done = [0]  # columns of this block already quantized

        def current(j0: int, j1: int, W1=W1, E1=E1, done=done, i1=i1, i2=i2) -> torch.Tensor:
            # Columns inside the block come from the working copy (inside-block updates applied).
            # Later columns still miss this block's pending update, which is applied here on the
            # fly, so a group that straddles blocks is fitted on its true current values. (The
            # reference reads the stale W there; with group size = block size it never matters.)
            inside = W1[:, max(j0, i1) - i1 : min(j1, i2) - i1] if j0 < i2 else W1[:, :0]
            if j1 <= i2:
                return inside
            lo = max(j0, i2)
            beyond = W[:, lo:j1] - E1[:, : done[0]] @ U[i1 : i1 + done[0], lo:j1]
            return torch.cat([inside, beyond], dim=1)

        quantizer.begin_block(i1, i2, current)
        if propagate_within_block:
            Q1 = torch.zeros_like(W1)
            for i in range(i2 - i1):
                w = W1[:, i]
                q = quantizer.quantize_column(i1 + i, w, current)
                Q1[:, i] = q
                err = (w - q) / d[i]
                E1[:, i] = err
                done[0] = i + 1
                # OBS update of the rest of the block (column i itself becomes exactly q).
                W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
        else:
            Q1 = quantizer.quantize_block(i1, i2, W1)
            E1 = (W1 - Q1) / d.unsqueeze(0)
        loss += _block_loss(E1)
        Q[:, i1:i2] = Q1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    return GPTQResult(dequantized=Q, loss=float(loss))


def _block_loss(errors: torch.Tensor) -> torch.Tensor:
    # err_j = (w_j - q_j) / U_jj, so (w - q)^2 / U_jj^2 / 2 = err^2 / 2.
    return (errors.double() ** 2).sum() / 2


def relative_output_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """||W X - Q X||^2 / ||W X||^2 from H = 2/N X X^T: a method-independent per-linear error.

    A diagnostic: the products run in float32 (a float64 product of a 1536-wide H cost seconds per
    model), the sums in float64; relative precision ~1e-6."""
    W = weight.float()
    D = W - dequantized.float()
    H = hessian.float()
    num = ((D @ H) * D).double().sum()
    den = ((W @ H) * W).double().sum()
    return float(num / den) if den > 0 else 0.0
