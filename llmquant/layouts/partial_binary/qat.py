"""PB-LLM's quantization-aware training of one `partial_binary` linear (llmquant/train.py runs it).

What trains and what stays (docs/methods/pbllm.md, "QAT"; docs/methods-spec.md §3.4):

- frozen: the salient mask and the salient weights on their 8-bit grid (codes, row scales, zeros);
- trained: a latent float weight behind every binarized entry, binarized with a straight-through
  sign around the row's (group's) mean mu, and mu itself;
- computed, not trained: alpha, the paper's optimal scale for fixed signs, alpha = mean |w - mu| over
  the binarized entries of each row (group), per output channel. The reference's QAT code uses one
  per-tensor scale over the whole matrix instead; the paper derives the per-channel one.

The latents start at the checkpoint's own binarized values (mu + alpha * sign), so step 0 computes
exactly the PB-LLM model it starts from: the signs reproduce, the analytic alpha equals the stored
alpha, mu is the stored mu. alpha and mu are rounded to float16 in the forward (straight through),
so the trained model is exactly the packed checkpoint `export` writes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llmquant.core.refine import fp16_ste, spread
from llmquant.layouts.base import FP16, signs_of


class _SignSTE(torch.autograd.Function):
    """+1 where x >= 0 else -1 forward (the layout's sign convention: a sign bit set = +1); the
    straight-through gradient backward, passed where |x| <= clip (hard-tanh STE) and zero beyond,
    so a latent far past the threshold stops drifting."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, clip)
        return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, clip = ctx.saved_tensors
        return grad * (x.abs() <= clip).to(grad.dtype), None


class PartialBinaryQAT(nn.Module):
    """Drop-in replacement for a `partial_binary` QuantizedLinear during training."""

    def __init__(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any], bias: torch.Tensor | None = None):
        super().__init__()
        self.meta = dict(meta)
        self.group_size = int(meta["group_size"])
        self.frozen = {k: v.detach().clone() for k, v in tensors.items()}
        mask = tensors["salient_mask"].bool()
        rows, cols = mask.shape
        self.out_features, self.in_features = rows, cols
        high = tensors["high_scales"].float().unsqueeze(1) * (
            tensors["salient_codes"].float() - tensors["high_zeros"].float().unsqueeze(1)
        )
        alpha0, mu0 = tensors["alpha"].float(), tensors["mu"].float()
        binary0 = spread(mu0, cols, self.group_size) + spread(alpha0, cols, self.group_size) * signs_of(tensors["signs"])
        self.register_buffer("salient_mask", mask)
        self.register_buffer("high", torch.where(mask, high, 0.0))
        self.register_buffer("binary_count", self._group_sum((~mask).float()).clamp_min(1.0))
        self.latent = nn.Parameter(torch.where(mask, 0.0, binary0))
        self.mu = nn.Parameter(mu0.clone())
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None

    def _group_sum(self, values: torch.Tensor) -> torch.Tensor:
        """[rows, cols] -> [rows, groups]: sums over each group's columns (the last may be cut)."""
        rows, cols = values.shape
        groups = -(-cols // self.group_size)
        padded = F.pad(values, (0, groups * self.group_size - cols))
        return padded.view(rows, groups, self.group_size).sum(dim=2)

    def quantizer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(signs, alpha, mu): the STE signs of latent - mu, and the stored-precision alpha and mu."""
        mu = fp16_ste(self.mu)
        centered = self.latent - spread(mu, self.in_features, self.group_size)
        binary = ~self.salient_mask
        alpha = fp16_ste(self._group_sum(centered.abs() * binary) / self.binary_count)
        clip = spread(alpha.detach(), self.in_features, self.group_size)
        return _SignSTE.apply(centered, clip), alpha, mu

    def weight(self) -> torch.Tensor:
        signs, alpha, mu = self.quantizer()
        binary = spread(mu, self.in_features, self.group_size) + spread(alpha, self.in_features, self.group_size) * signs
        return torch.where(self.salient_mask, self.high, binary)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight()
        return F.linear(x, weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def export(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The layer as a `partial_binary` record's tensors: trained signs, alpha and mu; everything
        salient as it came in."""
        signs, alpha, mu = self.quantizer()
        tensors = dict(self.frozen)
        stored = tensors["signs"]  # salient positions keep whatever the checkpoint had (unused there)
        tensors["signs"] = torch.where(self.salient_mask, stored.bool(), signs > 0).to(stored.dtype)
        tensors["alpha"] = alpha.to(FP16)
        tensors["mu"] = mu.to(FP16)
        return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, dict(self.meta)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"
