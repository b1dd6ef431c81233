"""transformers integration: `AutoModelForCausalLM.from_pretrained(native_dir)` returns the packed
model (QuantizedLinear modules, the runtime's default backend for the device), and
`save_pretrained` of that model writes a native checkpoint again.

transformers dispatches on config.json's `quantization_config.quant_method`; `register()` adds
"llmquant" to its tables (`register_quantization_config` / `register_quantizer`). `import llmquant`
calls it once transformers' quantizer table is imported (llmquant/__init__.py), so importing
llmquant alone never imports transformers; this module imports nothing of transformers' models at
registration (transformers may be importing them at that moment): the runtime (whose package
imports the loader, which imports transformers' models) is imported inside the methods, and this
module sits outside llmquant/runtime/ for that reason.

Loading: before transformers reads the weights, the quantizer reads the checkpoint the way
`llmquant.load` does (structure, checksums, binding to config.json: llmquant/formats/checkpoint.py)
and swaps each quantized nn.Linear (still on the meta device) for a QuantizedLinear built from its
stored tensors; transformers then loads every other tensor itself, and is told that the stored
tensors in the file (`<linear>.codes`, ...) and the modules' buffers are llmquant's.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from llmquant.errors import UserError
from llmquant.formats.checkpoint import QUANT_METHOD, WEIGHTS_FILE, packed_state, read_checkpoint


class LlmquantConfig(QuantizationConfigMixin):
    """config.json's llmquant quantization_config, kept as written (docs/format.md)."""

    def __init__(self, **fields: Any):
        self.quant_method = QUANT_METHOD
        self.fields = {key: value for key, value in fields.items() if key != "quant_method"}

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, **copy.deepcopy(self.fields)}

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class LlmquantHfQuantizer(HfQuantizer):
    """Loads native llmquant checkpoints; cannot quantize (use `llmquant quantize`)."""

    requires_calibration = True

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError("llmquant quantizes with `llmquant quantize`; from_pretrained only loads its checkpoints")

    def update_dtype(self, dtype):
        return dtype

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, dtype=None, **kwargs) -> None:
        from llmquant.runtime.loader import install_linears  # imports transformers' models: not at registration

        files = [Path(f) for f in checkpoint_files or []]
        if len(files) != 1 or files[0].name != WEIGHTS_FILE:
            raise UserError(f"an llmquant checkpoint is one {WEIGHTS_FILE}, found {[str(f) for f in files]}")
        directory = files[0].parent
        checkpoint = read_checkpoint(directory, packed_only=True)
        install_linears(model, checkpoint, dtype if isinstance(dtype, torch.dtype) else checkpoint.model_dtype, files[0])
        self.packed = checkpoint.linears
        # The stored tensors are read above; the modules' buffers come from them (after loading:
        # transformers replaces the buffers it did not find in the file with empty ones).
        stored = "|".join(re.escape(name) for name in sorted(self.packed))
        unexpected = rf"^({stored})\.[A-Za-z_]+$"
        missing = rf"^({stored})\.(blob|stored_[A-Za-z_]+)$"
        model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | {unexpected}
        model._keys_to_ignore_on_load_missing = set(model._keys_to_ignore_on_load_missing or ()) | {missing}

    def _process_model_after_weight_loading(self, model, **kwargs):
        from llmquant.runtime.qlinear import resolve_backend, set_backend

        for name, packed in self.packed.items():
            module = model.get_submodule(name)
            module.replace_stored({k: t.to(module.blob.device) for k, t in packed.tensors.items()}, packed.encoding)
        self.packed = {}
        device = next((b.device for b in model.buffers() if b.device.type != "meta"), torch.device("cpu"))
        set_backend(model, resolve_backend("auto", device))
        return model

    def get_state_dict_and_metadata(self, model):
        """save_pretrained: the native checkpoint's tensors and header; config.json's
        quantization_config is bound to them (its weights_checksum)."""
        from llmquant.runtime.qlinear import QuantizedLinear

        packed = {name: m.packed() for name, m in model.named_modules() if isinstance(m, QuantizedLinear)}
        tensors, header, quantization = packed_state(model, packed, model.config.quantization_config.to_dict())
        model.config.quantization_config = LlmquantConfig(**quantization)
        return tensors, header

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Make quant_method "llmquant" known to transformers (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(LlmquantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(LlmquantHfQuantizer)
