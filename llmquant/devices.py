"""The device and dtype vocabulary, one rule for the recipe, the CLI and the loaders.

Devices: `auto` (CUDA when available, else the CPU), `cpu`, `cuda`, `cuda:N`, `mps`, `xpu`, `xpu:N`.
`quantize` also takes a comma-separated list of devices of one kind, `cuda:0,cuda:1,...` (one process
per device, llmquant/core/parallel.py); `cpu,cpu` runs two CPU processes (what the tests use).
Dtypes: `auto`, `float16`, `bfloat16`, `float32` (also spelled fp16/half, bf16, fp32/float).
`auto` as a compute dtype means float32 on a CPU (half-precision matmuls there are slow and less
accurate) and the checkpoint's own dtype elsewhere.
"""

from __future__ import annotations

import re

import torch

from llmquant.errors import UserError

DTYPES = ("auto", "float16", "bfloat16", "float32")
_DTYPE_ALIASES = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32", "float": "float32"}
_DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


def check_device(name: str) -> str:
    """`name` if it is a device llmquant accepts; ValueError (one line) otherwise."""
    if not isinstance(name, str) or not _DEVICE.fullmatch(name):
        raise ValueError(f"expected auto, cpu, cuda or cuda:N (or mps, xpu), got {name!r}")
    return name


def check_devices(spec: str) -> str:
    """`spec` if it is one device, or a list of two or more devices of one kind (`cuda:0,cuda:1`,
    `cpu,cpu`) where no CUDA device appears twice; ValueError (one line) otherwise."""
    if not isinstance(spec, str) or "," not in spec:
        return check_device(spec)
    names = [part.strip() for part in spec.split(",")]
    for name in names:
        check_device(name)
    kinds = {torch.device(n).type if n != "auto" else "auto" for n in names}
    if "auto" in kinds or len(kinds) != 1 or kinds == {"mps"}:
        raise ValueError(f"a device list names devices of one kind, cuda:N or cpu (not auto, not mixed), got {spec!r}")
    if kinds != {"cpu"}:
        indexed = [torch.device(n).index for n in names]
        if None in indexed or len(set(indexed)) != len(indexed):
            raise ValueError(f"a device list names each device once with its index (cuda:0,cuda:1), got {spec!r}")
    return ",".join(names)


def resolve_devices(spec: str) -> list[torch.device]:
    """A device or device list -> torch.devices; UserError for a bad one or a CUDA device that is absent."""
    try:
        check_devices(spec)
    except ValueError as error:
        raise UserError(f"device: {error}") from None
    devices = [resolve_device(name.strip()) for name in spec.split(",")]
    for device in devices:
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    return devices


def check_dtype(name: str, allow_auto: bool = True) -> str:
    """The canonical name of a dtype llmquant accepts; ValueError (one line) otherwise."""
    canonical = _DTYPE_ALIASES.get(name, name) if isinstance(name, str) else name
    choices = DTYPES if allow_auto else DTYPES[1:]
    if canonical not in choices:
        raise ValueError(f"expected {', '.join(choices[:-1])} or {choices[-1]}, got {name!r}")
    return canonical


def resolve_device(name: str) -> torch.device:
    """A device name -> torch.device; UserError if CUDA is asked for but absent."""
    try:
        check_device(name)
    except ValueError as error:
        raise UserError(f"device: {error}") from None
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: torch.dtype | str | None, device: torch.device | None = None) -> torch.dtype | str | None:
    """A dtype, its name or alias, or None -> torch dtype (None stays None).

    `auto` is float32 on a CPU `device`; elsewhere (or without a device) it stays the string "auto":
    the checkpoint's own dtype, resolved by whoever reads the checkpoint. UserError for anything else."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        name = check_dtype(dtype)
    except ValueError as error:
        raise UserError(f"dtype: {error}") from None
    if name == "auto":
        return torch.float32 if device is not None and device.type == "cpu" else "auto"
    return getattr(torch, name)
