"""Checkpoint formats (docs/format.md): bit packing, layout codecs, writers, reader, loader.

The public functions are re-exported here lazily, so that importing the light modules (bitpack,
packers, which runtime.qlinear needs) neither pulls in transformers nor closes the import cycle
loader -> runtime.qlinear -> packers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "save_packed": "checkpoint",
    "save_fake": "checkpoint",
    "convert": "checkpoint",
    "is_packed_checkpoint": "checkpoint",
    "read_checkpoint": "checkpoint",
    "load_quantized": "loader",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
