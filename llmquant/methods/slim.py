"""SliM-LLM (Huang et al., 2024): group-wise mixed precision on GPTQ.

SBA (slim_sba.py) picks N-1 / N / N+1 bits per column group from calibration data; GPTQ then
quantizes the groups with SQC-calibrated grids (slim_sqc.py). See docs/methods/slim.md.

Salience damping: the reference ranks groups for the search with U from H + 0.01 I, an absolute
constant on a Hessian normalised by *sequences*; ours is normalised by tokens (hessian.py), i.e.
seqlen times smaller, so the same constant would be seqlen times stronger here. We use the relative
percdamp damping instead, for the search and the assignment alike: it is scale free, and it is what
the reference itself uses when it assigns the chosen p, so the search scores exactly the allocation
that gets applied (the reference may score one ranking and apply another).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, field_validator, model_validator

from llmquant.core.gptq import gptq_loop
from llmquant.core.groups import ceil_div
from llmquant.core.hessian import prepare_factor
from llmquant.core.record import QuantizedRecord
from llmquant.methods.base import Method, MethodConfig, Observer, register
from llmquant.methods.slim_sba import SBAObserver, allocation_bits, pair_counts
from llmquant.methods.slim_sqc import MixedGroupQuantizer, SQCSettings

log = logging.getLogger(__name__)

# Written next to every SliM-LLM checkpoint; a recipe's `allocation:` may name this file to reuse it.
ALLOCATION_FILE = "allocation.json"


class SliMConfig(MethodConfig):
    name: Literal["slim"] = "slim"
    bits: int = Field(2, ge=2, le=4, description="target bits N; groups get N-1, N or N+1")
    group_size: int = Field(128, ge=1, le=8192, description="columns per group; also the GPTQ block size")
    percdamp: float = Field(0.01, ge=0.0, le=10.0, description="damping as a fraction of mean(diag H)")
    lambda_salience: float = Field(
        1.0, ge=0.0, description="SQC weight of salient elements' error; 1 makes the salient split inert"
    )
    sqc_grid: int = Field(101, ge=1, le=10001, description="number of SQC scale factors tau (odd)")
    sqc_range: tuple[float, float] = Field((0.9, 1.1), description="smallest and largest tau")
    sqc_norm: float = Field(2.4, gt=0.0, le=16.0, description="exponent of the SQC error")
    fidelity: Literal["reference", "default"] = Field(
        "reference", description="reference: pairs p >= 1 as the code; default: also p = 0 (uniform)"
    )
    partial_group: Literal["fixed", "paired"] = Field(
        "fixed",
        description="the partial last group (group_size does not divide the width): fixed keeps it at N bits; "
        "paired lets a half-width one move 2 bits against one more full group moving 1 (average still exactly N)",
    )
    allocation: dict[str, list[Annotated[int, Field(ge=1, le=8)]]] | None = Field(
        None,
        description="linear name -> bits per group, or the path of an allocation.json written by an earlier run; "
        "skips the search for those linears",
    )

    @field_validator("allocation", mode="before")
    @classmethod
    def _read_allocation_file(cls, value: Any) -> Any:
        """A path to a saved allocation (allocation.json) -> its contents."""
        if not isinstance(value, str):
            return value
        file = Path(value).expanduser()
        if not file.is_file():
            raise ValueError(f"file not found: {value}")
        try:
            data = json.loads(file.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"cannot read {value}: {error}") from None
        return data.get("allocation", data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _check(self) -> "SliMConfig":
        if self.sqc_grid % 2 == 0:
            raise ValueError("sqc_grid must be odd: tau = 1 plus the same number of values on each side")
        low, high = self.sqc_range
        if not 0.0 < low <= 1.0 <= high:
            raise ValueError("sqc_range must be (low, high) with 0 < low <= 1 <= high")
        return self

    def sqc_settings(self) -> SQCSettings:
        low, high = self.sqc_range
        return SQCSettings(self.sqc_grid, low, high, self.sqc_norm, self.lambda_salience)


@register
class SliM(Method[SliMConfig]):
    Config = SliMConfig
    layouts = ("mixed",)

    def __init__(self, config: SliMConfig):
        super().__init__(config)
        self.chosen: dict[str, list[int]] = {}

    def check_linears(self, shapes: dict[str, tuple[int, int]]) -> None:
        """A recipe allocation must give every linear it names one width per group."""
        cfg = self.config
        for name, bits in sorted((cfg.allocation or {}).items()):
            if name in shapes:
                groups = ceil_div(shapes[name][1], cfg.group_size)
                if len(bits) != groups:
                    raise ValueError(f"slim allocation for {name}: {len(bits)} groups given, the linear has {groups}")

    def observer(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> Observer | None:
        cfg = self.config
        if cfg.allocation is not None and name in cfg.allocation:
            return None
        W, H = weight.float().clone(), hessian.clone()
        upper, _ = prepare_factor(W, H, cfg.percdamp, name)
        max_pairs = max(pair_counts(W.shape[1] // cfg.group_size, include_uniform=True), default=0)
        return SBAObserver(W, torch.diag(upper), cfg.bits, cfg.group_size, max_pairs, cfg.partial_group == "paired")

    def quantize(self, name, weight, hessian, observer=None) -> QuantizedRecord:
        cfg = self.config
        W, H = weight.float(), hessian
        upper, _ = prepare_factor(W, H, cfg.percdamp, name)
        group_bits, stats = self._allocate(name, W.shape[1], observer)
        quantizer = MixedGroupQuantizer(W, group_bits, cfg.group_size, torch.diag(upper), cfg.sqc_settings())
        result = gptq_loop(W, upper, quantizer, blocksize=cfg.group_size)
        self.chosen[name] = group_bits
        stats["bits_histogram"] = {str(b): n for b, n in sorted(Counter(group_bits).items())}
        return quantizer.record(result.dequantized, result.loss, cfg.bits, stats)

    def _allocate(self, name: str, cols: int, observer: Observer | None) -> tuple[list[int], dict[str, Any]]:
        """Per-group bits: from the recipe's allocation, else the SBA search, else uniform N."""
        cfg = self.config
        groups = ceil_div(cols, cfg.group_size)
        if cfg.allocation is not None and name in cfg.allocation:
            bits = list(cfg.allocation[name])
            if len(bits) != groups:  # check_linears refuses this before the run; a direct caller gets it here
                raise ValueError(f"slim allocation for {name}: {len(bits)} groups given, the linear has {groups}")
            return bits, {"allocation_source": "recipe"}
        if not isinstance(observer, SBAObserver) or observer.sequences == 0:
            log.warning("%s: no SBA observations; every group gets %d bits", name, cfg.bits)
            return [cfg.bits] * groups, {"allocation_source": "uniform (no observations)", "pairs": 0}
        # With fewer than 4 full groups the reference range 1 .. k/2 - 1 is empty: stay uniform.
        candidates = pair_counts(observer.full_groups, include_uniform=cfg.fidelity == "default") or [0]
        pairs, shift = observer.best_allocation(candidates)
        stats = {
            "allocation_source": "search",
            "pairs": pairs,
            "objective": observer.mean_objective().tolist(),  # pair counts 0 .. max
            "sequences": observer.sequences,
        }
        if observer.shifts:  # partial_group: paired, and this linear has a half-width last group
            stats["partial_shift"] = shift
            for s, objective in observer.mean_shift_objective().items():  # the shifted twins of pairs 0 .. max
                stats[f"objective_partial{s:+d}"] = objective.tolist()
        return allocation_bits(observer.ranking, pairs, groups, cfg.bits, shift), stats

    def restore(self, name: str, record: QuantizedRecord) -> None:
        self.chosen[name] = [int(b) for b in record.tensors["group_bits"].tolist()]

    def summary(self) -> dict[str, Any]:
        """The chosen allocation, {linear name: [bits per group]}, in the recipe's `allocation` shape,
        in natural order of the names (layer 2 before layer 10): the same file whatever order the
        linears were quantized in (several devices quantize a layer's linears in parallel)."""
        return {"allocation": {name: self.chosen[name] for name in sorted(self.chosen, key=_natural)}}

    def artifacts(self) -> dict[str, Any]:
        return {ALLOCATION_FILE: self.summary()}


def _natural(name: str) -> list:
    """Sort key: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
