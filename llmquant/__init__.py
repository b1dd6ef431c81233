"""llmquant: post-training quantization of LLMs to 1-4 bits with real packed checkpoints."""

__version__ = "0.1.0"


def load(directory, dtype=None, device="cpu"):
    """Loads an llmquant checkpoint (packed or fake-quant) or any causal LM directory."""
    from llmquant.models.loading import load_model

    model, _tokenizer, _source = load_model(str(directory), dtype or "auto", device)
    return model
