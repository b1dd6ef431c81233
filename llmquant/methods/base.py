"""Method backends: the only per-method code. A backend never touches devices, hooks, files or the CLI.

A backend is a class registered with `@register`. Its `Config` (pydantic, unknown keys forbidden) is
exactly the recipe's `method:` block. The runner calls, per linear layer:

    observer = method.observer(name, weight, hessian)     # optional second calibration pass
    ... runner feeds observer.update(x, y) per calibration sequence, if not None ...
    record = method.quantize(name, weight, hessian, observer)

weight: float32 (rows x cols) on the compute device, a private copy the backend may modify.
hessian: float32/float64 H = 2/N sum x x^T (cols x cols), raw (not damped, dead columns not fixed),
         a private copy; None for a method that declares `needs_calibration = False` (RTN, sign):
         such a method runs without data, and the report then has no output-error figure.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmquant.core.record import QuantizedRecord


class MethodConfig(BaseModel):
    """Base of every method's recipe block. Subclasses add fields with ranges (pydantic Field)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str


class HessianMethodConfig(MethodConfig):
    percdamp: float = Field(0.01, ge=0.0, le=10.0, description="damping as a fraction of mean(diag H)")
    blocksize: int = Field(128, ge=1, le=8192, description="GPTQ lazy-batch block size (columns)")


class Observer:
    """Collects what a method needs from a second pass over the calibration data (SliM-LLM's SBA).

    update() receives, per calibration sequence, the linear's input x (tokens x in_features) and its
    full-precision output y (tokens x out_features, bias included), both float32."""

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class Method:
    name: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    # Layouts this method's records may use (documentation and `llmquant methods`).
    layouts: ClassVar[tuple[str, ...]] = ()
    # False: the method only looks at the weights. quantize() then gets hessian=None, and no
    # calibration data is loaded and no forward pass runs (the recipe's calibration block is unused).
    needs_calibration: ClassVar[bool] = True

    def __init__(self, config: MethodConfig):
        self.config = config

    def observer(self, name: str, weight: torch.Tensor, hessian: torch.Tensor) -> Observer | None:
        return None

    def quantize(
        self,
        name: str,
        weight: torch.Tensor,
        hessian: torch.Tensor | None,
        observer: Observer | None = None,
    ) -> QuantizedRecord:
        raise NotImplementedError

    # Extra recipe-level information a method may want to write into llmquant.json (e.g. SliM-LLM's
    # allocation). Called once after all layers are quantized.
    def summary(self) -> dict[str, Any]:
        return {}

    # Resuming an interrupted run (llmquant/resume.py): called for every record of the layers that
    # were finished before the interruption, in the order they were quantized, instead of
    # quantize(). A method with state across linears (whatever summary() reports) rebuilds it here.
    def restore(self, name: str, record: QuantizedRecord) -> None:
        return None


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    if cls.name in _REGISTRY:
        raise ValueError(f"method {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> dict[str, type[Method]]:
    return dict(sorted(_REGISTRY.items()))


def get_method_class(name: str) -> type[Method]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None


NameField = Literal  # re-exported for method configs: `name: NameField["gptq"] = "gptq"`
