"""Where a result comes from and what it cost: software versions, the device, and memory probes.

Shared by quantize (its report), eval and bench, so that no command borrows these from another.
"""

from __future__ import annotations

import ctypes
import gc
import platform
import resource
import sys

import torch

from llmquant.version import __version__


def versions() -> dict[str, str]:
    import transformers

    return {
        "llmquant": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def process_peak_rss() -> int:
    """Peak resident memory of this process since it started, in bytes: VmHWM where Linux has it.
    Not getrusage's ru_maxrss there: Linux carries it over from the parent through fork and execve,
    so a run started by a large process (a benchmark harness holding a model) would report the
    parent's size as its own peak."""
    own = peak_rss()
    if own is not None:
        return own
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory() -> dict[str, int]:
    """Peak resident memory of this process (and of the CUDA allocator, when used), in bytes."""
    usage = {"rss_bytes": process_peak_rss()}
    if torch.cuda.is_available():
        usage["cuda_bytes"] = int(torch.cuda.max_memory_allocated())
    return usage


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return peak_rss() is not None
    except OSError:
        return False


def peak_rss() -> int | None:
    """VmHWM of /proc/self/status in bytes (the peak RSS since the process started or the last reset)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def large_allocations_unmapped() -> None:
    """Make glibc serve every allocation of 1 MiB or more with its own mapping, returned to the system
    when freed (a fixed M_MMAP_THRESHOLD; glibc otherwise raises the threshold after the first frees
    and serves later large blocks from a heap that fragments and only grows). Streaming quantization
    allocates and frees a layer's worth of large tensors per layer; without this its address space
    grew ~20 MB per layer (what an RLIMIT_DATA cap counts), with it ~1 MB. No-op off glibc."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        except (OSError, AttributeError):
            pass


def release_memory() -> None:
    """Free what earlier models left behind and hand glibc's free heap back to the system, so that the
    next model's RSS figures start from a clean floor."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
