"""llmquant: post-training quantization of LLMs to 1-4 bits with real packed checkpoints."""

import importlib.abc
import importlib.util
import sys

from llmquant.version import __version__

__all__ = ["__version__", "load"]

# transformers integration (llmquant/hf_quantizer.py): quant_method "llmquant" is registered
# with transformers as soon as its quantizer table exists, so that after `import llmquant`,
# `AutoModelForCausalLM.from_pretrained(native_dir)` returns the packed model. Importing llmquant
# alone never imports transformers (the command line starts without it).
_HF_TABLE = "transformers.quantizers.auto"


def _register_with_transformers() -> None:
    from llmquant.hf_quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' quantizer table is imported, wraps its loader so
    that llmquant registers right after the module has run."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != _HF_TABLE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]
            _register_with_transformers()

        loader.exec_module = exec_and_register
        return spec


if _HF_TABLE in sys.modules:
    _register_with_transformers()
elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())


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
