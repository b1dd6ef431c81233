"""llmquant: post-training quantization of LLMs to 1-4 bits with real packed checkpoints."""

from llmquant.version import __version__

__all__ = ["__version__", "load"]


def load(directory, dtype=None, device="cpu"):
    """Loads an llmquant checkpoint (packed or fake-quant) or any causal LM directory."""
    from llmquant.runtime.loader import load_model

    model, _tokenizer, _source = load_model(str(directory), dtype or "auto", device)
    return model
