"""The method contract: what the runner calls, and what a method may see. A method never touches
devices, hooks, files or the CLI.

A method is a `Method` subclass whose `Config` (pydantic, unknown keys forbidden) is exactly the
recipe's `method:` block; its name is written once, as the config's `name: Literal["..."]`, and the
class takes it from there. The runner calls, per linear layer:

    observer = method.observer(name, weight, hessian)     # optional second calibration pass
    ... runner feeds observer.update(x, y) per calibration sequence, if not None ...
    record = method.quantize(name, weight, hessian, observer)

name: the linear's full module name (for a per-linear recipe setting such as SliM-LLM's allocation,
      and to label warnings).
weight: float32 (rows x cols) on the compute device, a private copy the backend may modify.
hessian: float32/float64 H = 2/N sum x x^T (cols x cols), raw (not damped, dead columns not fixed),
         a private copy; None for a method that declares `needs_calibration = False` (RTN, sign):
         such a method runs without data, and the report then has no output-error figure.

Beyond (W, H), the contract has four optional hooks: `check_linears` (refuse a recipe that does not
fit the model, before any work), `summary` (what goes into llmquant.json), `artifacts` (extra files
next to the checkpoint) and `restore` (rebuild cross-linear state when a run resumes). Damping
escalations reach the report through one channel, `core.hessian.record_damping`, never through a
method's stats.
"""

from __future__ import annotations

from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from llmquant.core.record import QuantizedRecord


class MethodConfig(BaseModel):
    """Base of every method's recipe block. Subclasses add fields with ranges (pydantic Field) and
    declare their name as `name: Literal["..."] = "..."`."""

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


ConfigT = TypeVar("ConfigT", bound=MethodConfig)


class Method(Generic[ConfigT]):
    name: ClassVar[str]  # from Config's `name` default (__init_subclass__)
    Config: ClassVar[type[MethodConfig]]
    # Layouts this method's records may use (documentation and `llmquant methods`).
    layouts: ClassVar[tuple[str, ...]] = ()
    # False: the method only looks at the weights. quantize() then gets hessian=None, and no
    # calibration data is loaded and no forward pass runs (the recipe's calibration block is unused).
    needs_calibration: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        config = cls.__dict__.get("Config")
        if config is not None:
            default = config.model_fields["name"].default
            if not isinstance(default, str):
                raise TypeError(f"{config.__name__}.name needs a default: name: Literal['x'] = 'x'")
            cls.name = default

    def __init__(self, config: ConfigT):
        self.config: ConfigT = config

    def check_linears(self, shapes: dict[str, tuple[int, int]]) -> None:
        """Called once before any work with every linear to quantize ({full name: (rows, cols)});
        raise ValueError (one line) if the recipe cannot apply to them."""
        return None

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

    def summary(self) -> dict[str, Any]:
        """Extra recipe-level information for llmquant.json (e.g. SliM-LLM's allocation), called once
        after all layers are quantized."""
        return {}

    def artifacts(self) -> dict[str, Any]:
        """Extra JSON files written next to the checkpoint ({file name: JSON data}), called once after
        all layers are quantized (e.g. SliM-LLM's allocation.json, reusable as a recipe's allocation)."""
        return {}

    def restore(self, name: str, record: QuantizedRecord) -> None:
        """Resuming an interrupted run (llmquant/resume.py): called for every record of the layers that
        were finished before the interruption, in the order they were quantized, instead of
        quantize(). A method with state across linears (whatever summary() reports) rebuilds it here."""
        return None
