"""Streaming Hessian accumulation and the inverse-Cholesky factor every method builds on.

H = 2/N * sum_t x_t x_t^T over the N calibration *tokens* a linear saw. The GPTQ-family reference
code divides by the number of *sequences* instead (docs/methods-spec.md §1.1). The two differ by the constant
factor seqlen, which changes nothing in GPTQ: damping is relative to mean(diag H), and the GPTQ
update e * U[i, i:] / U_ii is invariant to scaling H. Dividing by tokens makes H independent of how
the calibration set is cut into windows, and makes absolute constants (SliM-LLM's salience damping)
mean the same thing for every seqlen.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from llmquant.errors import NumericalError

log = logging.getLogger(__name__)

# Damping escalations (name, percdamp asked, percdamp used) seen inside `record_damping()`; the runner
# puts them into the per-linear report without the methods having to pass them along.
_ESCALATIONS: ContextVar[list[tuple[str, float, float]] | None] = ContextVar("llmquant_damping", default=None)


@contextmanager
def record_damping() -> Iterator[list[tuple[str, float, float]]]:
    """Collects every damping escalation of `inverse_cholesky_upper` called inside the block."""
    seen: list[tuple[str, float, float]] = []
    token = _ESCALATIONS.set(seen)
    try:
        yield seen
    finally:
        _ESCALATIONS.reset(token)


class HessianAccumulator:
    """Accumulates sum(x x^T) over tokens; one instance per distinct linear input."""

    def __init__(self, columns: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.columns = columns
        self.dtype = dtype
        self.sum = torch.zeros(columns, columns, device=device, dtype=dtype)
        self.tokens = 0
        self.finalized = False

    def add_batch(self, inputs: torch.Tensor) -> None:
        """inputs: (..., columns) activations; every leading index is one token."""
        if self.finalized:
            raise RuntimeError("add_batch after finalize: the sum has been scaled into the Hessian")
        x = inputs.detach().reshape(-1, inputs.shape[-1])
        if x.shape[-1] != self.columns:
            raise ValueError(f"expected {self.columns} input features, got {x.shape[-1]}")
        if x.shape[0] == 0:
            return
        x = x.to(device=self.sum.device, dtype=self.dtype)
        self.sum.addmm_(x.t(), x)
        self.tokens += x.shape[0]

    def finalize(self, name: str = "") -> torch.Tensor:
        """Returns H = 2/N * sum(x x^T), scaled in place (a 70B MLP's H is 3.3 GB in float32: no second
        copy); later calls return the same tensor and add_batch is closed. Raises NumericalError on
        NaN/Inf (e.g. fp16 overflow)."""
        if self.finalized:
            return self.sum
        if not torch.isfinite(self.sum).all():
            raise NumericalError(
                f"{name or 'a linear'}: the Hessian contains NaN/Inf (an input activation overflowed?); "
                "compute in float32 (recipe `dtype: float32`, or `--set dtype=float32`) or check the model's weights"
            )
        if self.tokens:
            self.sum.mul_(2.0 / self.tokens)
        self.finalized = True
        return self.sum


def fix_dead_columns(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """Inputs that were always zero carry no information: H_jj := 1 and W[:, j] := 0 (in place).

    Returns the boolean mask of dead columns."""
    dead = torch.diag(hessian) == 0
    if dead.any():
        hessian[dead, dead] = 1.0
        weight[:, dead] = 0.0
    return dead


def inverse_cholesky_upper(
    hessian: torch.Tensor,
    percdamp: float = 0.01,
    absdamp: float = 0.0,
    name: str = "",
    max_tries: int = 6,
) -> tuple[torch.Tensor, float]:
    """U, the upper Cholesky factor of (H + lambda I)^-1, with lambda = percdamp * mean(diag H) + absdamp.

    U_jj^2 is the inverse-Hessian diagonal restricted to the not-yet-quantized columns j.. (the OBS
    denominator); GPTQ and all three methods use U, never H^-1 itself. If Cholesky fails, the damping
    is escalated x10 per try and each escalation is logged. Returns (U, percdamp actually used).
    """
    if not torch.isfinite(hessian).all():
        raise NumericalError(f"{name or 'a linear'}: the Hessian contains NaN/Inf")
    diag_mean = torch.mean(torch.diag(hessian)).item()
    damp = percdamp
    # At most the caller's H and two more n x n matrices live at once (each step frees its input):
    # the down_proj H of a 70B model is 3.3 GB in float32. Adding lambda on the diagonal in place
    # gives the same values as H + lambda I.
    for attempt in range(max_tries):
        damped = hessian.clone()
        damped.diagonal().add_(damp * diag_mean + absdamp)
        chol, info = torch.linalg.cholesky_ex(damped)
        del damped
        if info.item() == 0:
            inverse = torch.cholesky_inverse(chol)
            del chol
            upper, info2 = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if info2.item() == 0 and torch.isfinite(upper).all():
                if attempt:
                    log.warning(
                        "%s: Hessian not positive definite; Cholesky needed damping %.3g (asked %.3g)",
                        name or "linear",
                        damp,
                        percdamp,
                    )
                    escalations = _ESCALATIONS.get()
                    if escalations is not None:
                        escalations.append((name, percdamp, damp))
                return upper, damp
        damp = damp * 10 if damp > 0 else 1e-4
    raise NumericalError(
        f"{name or 'a linear'}: Hessian is not positive definite even with damping {damp / 10:.3g}; "
        "use more calibration samples or a larger percdamp"
    )


def prepare_factor(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float, name: str = "") -> tuple[torch.Tensor, float]:
    """What every Hessian method starts from: dead columns fixed in W and H (in place), then U.

    Returns (U, percdamp actually used)."""
    fix_dead_columns(weight, hessian)
    return inverse_cholesky_upper(hessian, percdamp, name=name)
