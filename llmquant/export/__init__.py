"""Exports of an llmquant checkpoint to the formats serving engines read: compressed-tensors and GPTQ
(vLLM, SGLang, transformers) and GGUF (llama.cpp, Ollama, transformers' `gguf_file=`).

This package writes files (config.json's quantization_config, tokenizer copies, GGUF metadata);
what each format holds of a layout, and how, is the layout's own (llmquant/layouts/<layout>/export.py).
Every export is exact by default: the same codes, fp16 scales and zero points as the native
checkpoint, or a refusal (one line naming the linear and the reason) before anything is written.
"""

from llmquant.export.plan import EXPORT_FORMATS, export_checkpoint

__all__ = ["EXPORT_FORMATS", "export_checkpoint"]
