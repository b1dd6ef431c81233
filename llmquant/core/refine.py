"""The refinement engine: after a decoder layer has been quantized by any method, learn its
quantizers' parameters by gradient so that the quantized layer reproduces the full-precision
layer's outputs on the calibration inputs (block-wise output reconstruction, as OmniQuant and
SliM-LLM+ do), then install the refined records and continue.

The engine knows no layout. Each layout's room says what is learnable in its records
(`llmquant/layouts/<layout>/refine.py`): a `Learnable` built from a record and the linear's
full-precision weight holds the learned tensors, decodes them differentiably (straight-through
rounding and signs) and writes them back as an exact record of its layout. The structure of the
codes stays fixed: bit allocation, salient masks and sets, split masks.

What the engine guarantees:
- the layer's reconstruction loss (mean squared error of the layer's outputs against the
  full-precision layer's, on all calibration inputs, computed with the exported records exactly as
  they will be stored) never increases: it is measured for the unrefined records first, after every
  epoch for the refined ones, and the best set is kept (the unrefined records when nothing beat them);
- determinism: the sample order comes from a generator seeded by (seed, layer index) only, so a
  resumed run (which restarts at a layer boundary) refines every remaining layer exactly as an
  uninterrupted run does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.func import functional_call

from llmquant.core.record import QuantizedRecord

CLIP_MIN = 1e-5  # smallest scale a clipped range may give (OmniQuant's CLIPMIN)


class RefineConfig(BaseModel):
    """The recipe's `refine:` block (validated with the recipe, before any model loads)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    epochs: int = Field(2, ge=0, le=10_000, description="passes over the calibration windows per decoder layer")
    lr: float = Field(1e-2, gt=0.0, le=10.0, description="AdamW learning rate of the clipping logits (OmniQuant LWC)")
    scale_lr: float = Field(
        2e-3, gt=0.0, le=10.0, description="AdamW learning rate of binary scales/means, as offsets relative to the initial scale"
    )
    batch_size: int = Field(1, ge=1, le=100_000, description="calibration windows per optimizer step")
    windows: int | None = Field(
        None, ge=1, le=100_000, description="refine on the first N calibration windows only (None: all of them)"
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)
    clip_init: float = Field(4.0, ge=-20.0, le=20.0, description="initial clipping logit: sigmoid(4) = 0.982 of the range")
    seed: int = Field(0, ge=0, description="seed of the sample order (with the layer index)")
    codes: Literal["rederive", "keep"] = Field(
        "rederive",
        description=(
            "groups of 2..8 bits (uniform, mixed): 'rederive' = OmniQuant LWC, the clipping learned and the codes "
            "re-derived from the full-precision weight (SliM-LLM+); 'keep' = the method's codes and zeros kept, "
            "each (row, group)'s scale learned (relative offset, scale_lr)"
        ),
    )


# ---- helpers the layouts' learnables share -------------------------------------------------------


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 (the storage precision of side parameters) forward, identity backward."""
    return x + (x.detach().to(torch.float16).to(x.dtype) - x.detach())


def relative(base: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """A scale learned relative to its initial value: base * (1 + offset), offset starting at 0."""
    return base * (1 + offset)


def spread(per_group: torch.Tensor, cols: int, size: int) -> torch.Tensor:
    """[..., groups] -> [..., cols], each group's value over its `size` columns (the last group may
    be cut), by broadcasting: repeat_interleave's and a gather's backward are slow on the CPU."""
    *lead, groups = per_group.shape
    wide = per_group.unsqueeze(-1).expand(*lead, groups, size).reshape(*lead, groups * size)
    return wide[..., :cols]


def spread_to_columns(per_group: torch.Tensor, col_group: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """[rows, groups] -> [rows, cols]: each column gets its group's value; contiguous groups of
    `group_size` columns by broadcasting (`spread`), act-order's `col_group` index (group_size None)
    by indexing."""
    if group_size is None:
        return per_group[:, col_group]
    return spread(per_group, col_group.numel(), group_size)


class Learnable(Protocol):
    """One linear's learnable quantizer parameters (a layout's room builds it from a record)."""

    clip_params: list[torch.Tensor]  # clipping logits (lr = RefineConfig.lr)
    scale_params: list[torch.Tensor]  # relative offsets of binary scales/means (lr = RefineConfig.scale_lr)

    def weight(self) -> torch.Tensor:
        """The dequantized weight, differentiable in the parameters (float32, rows x cols)."""
        ...

    def export(self) -> QuantizedRecord:
        """The current parameters as an exact record of the layout (its decode is what weight() gave,
        up to the straight-through parts, which are exact in the forward direction)."""
        ...


# (record, full-precision weight float32 on the compute device, config) -> Learnable, or None when
# the record's layout (or this record's variant of it) has nothing to learn.
LearnableFactory = Callable[[QuantizedRecord, torch.Tensor, RefineConfig], "Learnable | None"]


@dataclass
class RefineResult:
    records: dict[str, QuantizedRecord]  # the refined records (local module name -> record); empty if none won
    loss_before: float  # reconstruction MSE with the unrefined records
    loss_after: float  # with the records kept (<= loss_before)
    epoch_losses: list[float] = field(default_factory=list)  # exact loss after each epoch
    best_epoch: int = 0  # 0 = the unrefined records were kept
    seconds: float = 0.0

    def stats(self) -> dict[str, Any]:
        return {
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "epochs": len(self.epoch_losses),
            "best_epoch": self.best_epoch,
        }


def layer_seed(seed: int, index: int) -> int:
    return (seed * 1_000_003 + index) % (2**63 - 1)


def _call(layer: nn.Module, weights: dict[str, torch.Tensor], x: torch.Tensor, kwargs: dict, returns_tuple: bool) -> torch.Tensor:
    # The layer computes in its own dtype (fp16/bf16 on a GPU); the cast passes gradients through.
    dtype = x.dtype
    params = {f"{name}.weight": w.to(dtype) for name, w in weights.items()}
    out = functional_call(layer, params, (x,), kwargs, strict=False)
    return out[0] if returns_tuple else out


@torch.no_grad()
def reconstruction_loss(
    layer: nn.Module,
    weights: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict,
    returns_tuple: bool,
) -> float:
    """Mean squared error of the layer's outputs (with `weights` in place of those linears' weights)
    against `targets`, over every calibration sequence; float64 accumulation."""
    total = 0.0
    for s in range(inputs.shape[0]):
        out = _call(layer, weights, inputs[s : s + 1], kwargs, returns_tuple)
        total += float((out.float() - targets[s : s + 1].float()).pow(2).sum(dtype=torch.float64))
    return total / targets.numel()


def refine_layer(
    layer: nn.Module,
    records: dict[str, QuantizedRecord],
    fp_weights: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    kwargs: dict,
    returns_tuple: bool,
    config: RefineConfig,
    factory: LearnableFactory,
    index: int = 0,
    on_epoch: Callable[[int, int, float], None] | None = None,
) -> RefineResult:
    """Refines one decoder layer's quantized linears (module names local to `layer`).

    records: the unrefined records; their `dequantized` weights are the starting point and the
    fallback. fp_weights: the full-precision weights (float32). inputs: the layer's calibration
    inputs [n, seq, hidden]; targets: the full-precision layer's outputs on them. The layer's own
    parameters are never modified (the weights are substituted with torch.func.functional_call).
    With `config.windows`, only the first N windows are used, for training and for the loss."""
    import time

    begin = time.perf_counter()
    if config.windows is not None:
        inputs, targets = inputs[: config.windows], targets[: config.windows]
    device = inputs.device
    current = {name: r.dequantized.to(device, torch.float32) for name, r in records.items()}
    loss_before = reconstruction_loss(layer, current, inputs, targets, kwargs, returns_tuple)
    learnables: dict[str, Learnable] = {}
    for name, record in records.items():
        learnable = factory(record, fp_weights[name].to(device, torch.float32), config)
        if learnable is not None:
            learnables[name] = learnable
    result = RefineResult({}, loss_before, loss_before)
    if not learnables or config.epochs == 0:
        result.seconds = time.perf_counter() - begin
        return result

    groups = []
    clip = [p for l in learnables.values() for p in l.clip_params]
    scale = [p for l in learnables.values() for p in l.scale_params]
    if clip:
        groups.append({"params": clip, "lr": config.lr})
    if scale:
        groups.append({"params": scale, "lr": config.scale_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(layer_seed(config.seed, index))
    frozen = _freeze(layer.parameters())
    best = loss_before
    try:
        for epoch in range(1, config.epochs + 1):
            order = torch.randperm(inputs.shape[0], generator=generator)
            diverged = False
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size].to(device)
                with torch.enable_grad():
                    weights = dict(current)
                    weights.update({name: l.weight() for name, l in learnables.items()})
                    out = _call(layer, weights, inputs[batch], kwargs, returns_tuple)
                    loss = torch.nn.functional.mse_loss(out.float(), targets[batch].float())
                    if not math.isfinite(float(loss.detach())):
                        diverged = True
                        break
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                optimizer.step()
            if diverged:
                break
            with torch.no_grad():
                exported = {name: l.export() for name, l in learnables.items()}
                weights = dict(current)
                weights.update({name: r.dequantized.to(device, torch.float32) for name, r in exported.items()})
                loss_epoch = reconstruction_loss(layer, weights, inputs, targets, kwargs, returns_tuple)
            result.epoch_losses.append(loss_epoch)
            if loss_epoch < best:
                best, result.best_epoch, result.records = loss_epoch, epoch, exported
            if on_epoch:
                on_epoch(epoch, config.epochs, loss_epoch)
    finally:
        _unfreeze(frozen)
    result.loss_after = best
    result.seconds = time.perf_counter() - begin
    return result


def _freeze(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    frozen = [p for p in params if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    return frozen


def _unfreeze(frozen: list[nn.Parameter]) -> None:
    for p in frozen:
        p.requires_grad_(True)


class ClippedGrid:
    """OmniQuant's learnable weight clipping on an integer grid, per (row, group):

        xmax = sigmoid(up) * max(w_g, 0),  xmin = sigmoid(low) * min(w_g, 0)   (the range holds 0, as
        scale = (xmax - xmin) / maxq, rounded to float16                        in GPTQ's quantizer)
        zero = round(-xmin / scale) in [0, maxq]
        codes = clamp(round(w / scale) + zero, 0, maxq)
        symmetric: xmax = sigmoid(up) * max|w_g|, scale = 2 xmax / maxq, zero = (maxq + 1) / 2

    `weight` (rows x cols, float32) is the full-precision weight the codes are derived from;
    `col_group` (long [cols]) each column's group; `maxq` per group ([groups], float); `group_size`
    when the groups are contiguous runs of that many columns (None: act-order's g_idx). Rounding is
    straight-through, so the clipping logits get gradients through scale and zero."""

    def __init__(
        self,
        weight: torch.Tensor,
        col_group: torch.Tensor,
        groups: int,
        maxq: torch.Tensor,
        sym: bool,
        init: float,
        group_size: int | None = None,
    ):
        rows = weight.shape[0]
        self.weight = weight
        self.col_group = col_group
        # contiguous groups of `group_size` columns (everything but act-order's g_idx): fused path
        self.group_size = group_size
        self.sym = sym
        self.maxq = maxq.to(weight.device, torch.float32).unsqueeze(0)  # [1, groups]
        index = col_group.unsqueeze(0).expand_as(weight)
        empty = torch.zeros(rows, groups, device=weight.device, dtype=torch.float32)
        wmax = empty.scatter_reduce(1, index, weight, "amax", include_self=False).clamp(min=0)
        wmin = empty.scatter_reduce(1, index, weight, "amin", include_self=False).clamp(max=0)
        if sym:
            wmax = torch.maximum(wmax, -wmin)
        self.wmax, self.wmin = wmax, wmin
        self.up = torch.full((rows, groups), init, device=weight.device, requires_grad=True)
        self.low = None if sym else torch.full((rows, groups), init, device=weight.device, requires_grad=True)

    @property
    def params(self) -> list[torch.Tensor]:
        return [self.up] if self.low is None else [self.up, self.low]

    def scale_zero(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (row, group): the float16-valued scale and the integer zero point (float32)."""
        xmax = torch.sigmoid(self.up) * self.wmax
        if self.sym:
            scale = fp16_ste((2 * xmax / self.maxq).clamp(min=CLIP_MIN))
            zero = ((self.maxq + 1) / 2).expand_as(scale)
            return scale, zero
        assert self.low is not None
        xmin = torch.sigmoid(self.low) * self.wmin
        scale = fp16_ste(((xmax - xmin) / self.maxq).clamp(min=CLIP_MIN))
        zero = torch.clamp(round_ste(-xmin / scale), min=torch.zeros_like(self.maxq), max=self.maxq)
        return scale, zero

    def quantize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dequantized weight, codes, scale, zero), the first differentiable; codes float32."""
        scale, zero = self.scale_zero()
        if self.group_size is not None:
            # One fused straight-through fake-quant per (row, group) block: a few full-size
            # operations forward and backward instead of a dozen (the weights' graph, not the
            # layer, dominated a step on the CPU).
            dequantized, codes = _GroupFakeQuant.apply(self.weight, scale, zero, self.maxq, self.group_size)
            return dequantized, codes, scale, zero
        s, z, maxq = self.spread(scale), self.spread(zero), self.spread(self.maxq)
        codes = torch.clamp(round_ste(self.weight / s) + z, min=torch.zeros_like(maxq), max=maxq)
        return s * (codes - z), codes, scale, zero

    def spread(self, per_group: torch.Tensor) -> torch.Tensor:
        """[r, groups] -> [r, cols]: each column gets its group's value."""
        return spread_to_columns(per_group, self.col_group, self.group_size)


class _GroupFakeQuant(torch.autograd.Function):
    """q = s (clamp(round(w / s) + z, 0, maxq) - z) per (row, group) of contiguous columns, with the
    straight-through round: dq/ds = (codes - z) - [inside] w / s, dq/dz = -s [outside], where
    inside = round(w / s) + z lies in [0, maxq] (the clamp passes it). Returns (q, codes); codes
    carry no gradient."""

    @staticmethod
    def forward(ctx, weight, scale, zero, maxq, size):  # type: ignore[override]
        rows, cols = weight.shape
        groups = scale.shape[1]
        padded = torch.nn.functional.pad(weight, (0, groups * size - cols)).view(rows, groups, size)
        s, z, mq = scale.unsqueeze(-1), zero.unsqueeze(-1), maxq.unsqueeze(-1)
        raw = torch.round(padded / s).add_(z)
        inside = (raw >= 0) & (raw <= mq)
        codes = torch.minimum(raw.clamp_(min=0), mq)
        q = (codes - z).mul_(s)
        ctx.save_for_backward(padded, scale, zero, codes, inside)
        ctx.cols = cols
        ctx.mark_non_differentiable(codes)
        return q.view(rows, -1)[:, :cols], codes.view(rows, -1)[:, :cols]

    @staticmethod
    def backward(ctx, grad_q, grad_codes):  # type: ignore[override]
        padded, scale, zero, codes, inside = ctx.saved_tensors
        rows, groups, size = padded.shape
        g = torch.nn.functional.pad(grad_q, (0, groups * size - ctx.cols)).view(rows, groups, size)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        grad_scale = (g * ((codes - z) - inside * (padded / s))).sum(-1)
        grad_zero = -(g * (~inside)).sum(-1) * scale
        return None, grad_scale, grad_zero, None, None


@dataclass
class LayerRefiner:
    """What the runner needs to refine each decoder layer: the settings, the layouts' learnables
    (llmquant.layouts.refine.learnable) and an optional progress callback
    on_epoch(layer index, epoch, epochs, exact loss after the epoch)."""

    config: RefineConfig
    factory: LearnableFactory
    on_epoch: Callable[[int, int, int, float], None] | None = None
