"""Quantizing with more than one device: `--device cuda:0,cuda:1,...` (issue #17; docs/scale.md).

One process per device, joined by torch.distributed (NCCL on GPUs, gloo on CPUs: `cpu,cpu` is how
the tests run it). Every rank holds the model (streamed or whole), builds the same calibration
windows and walks the same decoder layers. Within a layer, the Hessians (and SliM-LLM's observers)
are computed by every rank from the same inputs; the expensive part, each linear's method call (the
GPTQ column loop, BiLLM's and SliM-LLM's searches), is split: linear i of the layer goes to rank
i mod world. Every record is then broadcast from its owner and installed everywhere, and the next
layer's inputs are broadcast from rank 0, so every rank continues from rank 0's exact state.

The result is the single-device result: each linear is quantized from the same weight and Hessian by
the same code, only on another device of the same kind (tests/test_parallel.py checks the bytes on
CPUs). Rank 0 is the calling process: it owns the progress display, the work directory (resume), the
method's cross-linear state (records from other ranks reach it through `Method.restore`, as on a
resume) and the output; the other ranks are spawned processes that write nothing.

A failure on any rank (a numerical error in one linear, a bad input) is agreed on at the next
exchange and raised on every rank with its message, so no rank is left waiting.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from llmquant.errors import LLMQuantError, NumericalError, UserError

log = logging.getLogger(__name__)

_ERRORS = {"UserError": UserError, "NumericalError": NumericalError}


@dataclass
class Parallel:
    """This process' place in a multi-device run (torch.distributed is initialised by the caller)."""

    rank: int
    world: int
    device: torch.device

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def owner(self, position: int) -> int:
        """The rank that quantizes the layer's `position`-th linear."""
        return position % self.world

    def share(self, obj: Any, src: int) -> Any:
        """`obj` from rank `src`, on every rank (tensors arrive on the CPU)."""
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, device=self._object_device())
        return box[0]

    def share_tensor(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Every rank's `tensor` (same shape and dtype everywhere) overwritten by rank `src`'s."""
        import torch.distributed as dist

        dist.broadcast(tensor, src=src)
        return tensor

    def check(self, error: BaseException | None) -> None:
        """Collective: raises on every rank if any rank passes an error (the first rank's, by rank)."""
        import torch.distributed as dist

        mine = None if error is None else (type(error).__name__, str(error), isinstance(error, LLMQuantError))
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, mine, group=None)
        failed = [(rank, e) for rank, e in enumerate(every) if e is not None]
        if not failed:
            return
        if error is None:
            rank, (kind, message, known) = failed[0]
            error = _ERRORS[kind](message) if known and kind in _ERRORS else RuntimeError(f"rank {rank} ({kind}): {message}")
        error.agreed = True  # every rank raises it: the spawned ranks end quietly, rank 0 reports it
        raise error

    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def backend_for(devices: list[torch.device]) -> str:
    return "nccl" if all(d.type == "cuda" for d in devices) else "gloo"


def init(rank: int, world: int, devices: list[torch.device], rendezvous: str) -> Parallel:
    """Joins the process group (a file rendezvous: no ports to pick) and returns this rank's place."""
    import torch.distributed as dist

    device = devices[rank]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(devices), init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    return Parallel(rank, world, device)


def finish() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
