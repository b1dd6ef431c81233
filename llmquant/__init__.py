"""llmquant: post-training quantization of LLMs to 1-4 bits with real packed checkpoints."""

from llmquant.version import __version__

__all__ = ["__version__", "load"]


def load(directory, dtype=None, device="cpu", backend="auto"):
    """Loads an llmquant checkpoint (packed or fake-quant) or any causal LM directory onto `device`.

    A packed checkpoint stays packed in memory: its linears run with the Triton kernels on CUDA and
    with the packed PyTorch reference elsewhere (`backend="auto"`); `backend="torch-cached"` trades
    memory for speed (each weight decoded once and kept)."""
    from llmquant.devices import resolve_device
    from llmquant.runtime.loader import load_model
    from llmquant.runtime.qlinear import resolve_backend, set_backend

    target = resolve_device(str(device))
    model, _tokenizer, _source = load_model(str(directory), dtype or "auto", str(device))
    set_backend(model, resolve_backend(backend, target))
    return model.to(target)
