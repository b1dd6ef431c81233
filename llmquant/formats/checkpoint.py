"""Packed and fake-quant checkpoints: writing, reading and converting between them.

The format is specified in docs/format.md. In short, both are a directory with config.json and
model.safetensors:

packed  model.safetensors holds every non-quantized tensor in the model dtype plus, for each
        quantized linear, its stored tensors as `<module>.<stored name>`; the safetensors header
        says how to unpack them (one JSON descriptor per linear), and config.json carries
        `quantization_config` (quant_method "llmquant").
fake    a plain transformers checkpoint whose quantized linears hold the decoded weights, plus the
        packed stored tensors in the sidecar llmquant-records.safetensors so it can be re-packed.

Only safetensors and JSON are read; nothing in a checkpoint is executed. Every problem with a
user's file is raised as one UserError naming the file and what is wrong.

Integrity (docs/format.md, "Checksums"): every safetensors file records an xxh3-64 digest of each
tensor, and the file that refers to a weights file records a digest of its header (config.json's
`quantization_config.weights_checksum` for a packed checkpoint, the sidecar's
`llmquant.weights_checksum` for a fake one), so a damaged tensor and another checkpoint's
model.safetensors copied in are both refused. Reading checks structure without decoding (sizes,
dtypes and the few index values a decode could trip on, per layout), then the checksums; it never
unpacks a linear, so loading costs about what reading the bytes costs.
"""

from __future__ import annotations

import copy
import json
import re
import logging
import shutil
from dataclasses import dataclass, field
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from torch import nn

from llmquant.core.record import QuantizedRecord, combine
from llmquant.devices import resolve_dtype
from llmquant.errors import UserError
from llmquant.formats import packers
from llmquant.formats.packers import PackedLinear
from llmquant.output import MANIFEST_FILE, atomic_output_dir, check_output_path
from llmquant.safetensors_io import (
    CHECKSUMS_KEY,
    LazyTensor,
    checksums_of,
    content_digest,
    read_header,
    verify_checksums,
    write_safetensors,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANT_METHOD = "llmquant"
CONFIG_FILE = "config.json"
REPORT_FILE = "llmquant.json"  # what quantize measured (written next to the checkpoint, never read back by loaders)
WEIGHTS_FILE = "model.safetensors"
RECORDS_FILE = "llmquant-records.safetensors"  # the fake format's sidecar

# Keys of the safetensors header (string -> string) of model.safetensors (packed) / the sidecar.
HEADER_VERSION = "llmquant.format_version"
HEADER_LINEARS = "llmquant.linears"  # JSON {module name: descriptor}
HEADER_QUANTIZATION = "llmquant.quantization_config"  # sidecar only: the packed quantization_config
HEADER_WEIGHTS_CHECKSUM = "llmquant.weights_checksum"  # sidecar only: binds model.safetensors (weights_digest)
WEIGHTS_CHECKSUM = "weights_checksum"  # quantization_config key (packed): binds model.safetensors
# What the binding digest covers: every tensor's checksum and the linears' descriptors.
_BOUND_KEYS = (CHECKSUMS_KEY, HEADER_LINEARS)

INDEX_FILE = "model.safetensors.index.json"  # a sharded packed checkpoint: which shard holds each tensor
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' default max_shard_size ("5GB")
SHARD_PATTERN = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

FORMATS = ("packed", "fake")
_WRITTEN_FILES = {CONFIG_FILE, WEIGHTS_FILE, RECORDS_FILE, INDEX_FILE}


# --------------------------------------------------------------------------------------------------
# Writing from a model and its records


def save_packed(
    model: "PreTrainedModel",
    records: dict[str, QuantizedRecord],
    directory: str | Path,
    quantization_info: dict[str, Any],
    streamed: "Streamed | None" = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write the packed checkpoint (config.json, model.safetensors, generation_config.json)
    into the existing `directory`. The quantized linears' own weights are ignored. `streamed`:
    the stored linears and the plain tensors come from files (streaming quantization), not from
    `records`' tensors and the model's memory. Above `max_shard_bytes` the weights are written as
    shards with an index (`_write_weights`)."""
    directory = Path(directory)
    packed, tensors = _sources(model, records, streamed)
    digest = _write_weights(directory, tensors, packed, max_shard_bytes)
    config = _model_config(model, streamed.dtype if streamed else None)
    config["quantization_config"] = {**_quantization_config(records, quantization_info), WEIGHTS_CHECKSUM: digest}
    _write_json(directory / CONFIG_FILE, config)
    _save_generation_config(model, directory)


def save_fake(
    model: "PreTrainedModel",
    records: dict[str, QuantizedRecord],
    directory: str | Path,
    quantization_info: dict[str, Any] | None = None,
    streamed: "Streamed | None" = None,
) -> None:
    """Write a plain transformers checkpoint whose quantized linears hold the decoded weights (in
    the model dtype), plus the records' stored tensors in the sidecar for `convert(..., "packed")`."""
    directory = Path(directory)
    packed, tensors = _sources(model, records, streamed)
    for name, record in records.items():
        if streamed is None:
            tensors[f"{name}.weight"] = record.dequantized.detach().to("cpu", model.dtype).contiguous()
        else:
            tensors[f"{name}.weight"] = LazyTensor(streamed.dtype, tuple(record.dequantized.shape), _decoder(packed[name], record.dequantized.dtype, streamed.dtype))
    digest = _write_tensors(directory / WEIGHTS_FILE, tensors, {"format": "pt"})
    quantization = _quantization_config(records, quantization_info or {})
    _write_tensors(directory / RECORDS_FILE, _stored_tensors(packed), _header(packed, quantization, digest))
    _write_json(directory / CONFIG_FILE, _model_config(model, streamed.dtype if streamed else None))
    _save_generation_config(model, directory)


def packed_state(
    model: nn.Module, packed: dict[str, PackedLinear], quantization: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, Any]]:
    """What save_packed writes, for another writer (transformers' save_pretrained of a loaded packed
    model): the tensors of model.safetensors, its header (with the tensors' checksums) and the
    quantization_config bound to it. `packed`: the model's quantized linears in stored form; their
    modules' own state (a QuantizedLinear's blob and buffers, a weight) is left out, biases kept."""
    skip = {
        f"{name}.{key}"
        for name in packed
        for key in model.get_submodule(name).state_dict()
        if key != "bias"
    }
    tensors = _plain_tensors(model, skip=skip)
    tensors.update(_stored_tensors(packed))
    header = _header(packed)
    header[CHECKSUMS_KEY] = checksums_of(tensors)
    unbound = {key: value for key, value in quantization.items() if key != WEIGHTS_CHECKSUM}
    return tensors, header, {**unbound, WEIGHTS_CHECKSUM: weights_digest(header)}


@dataclass
class Streamed:
    """A streamed run's sources for writing (llmquant/models/streaming.py): the stored linears (lazy,
    from the work directory), the plain tensors (lazy, from the model's files, cast to `dtype`), and
    `dtype`, the dtype the checkpoint declares (the save dtype)."""

    linears: dict[str, PackedLinear]
    plain: dict[str, Any]
    dtype: torch.dtype


def _sources(model: nn.Module, records: dict[str, QuantizedRecord], streamed: Streamed | None) -> tuple[dict[str, PackedLinear], dict[str, Any]]:
    if streamed is None:
        return _pack_records(model, records), _plain_tensors(model, skip={f"{name}.weight" for name in records})
    if set(streamed.linears) != set(records):
        raise ValueError(f"the work directory holds {len(streamed.linears)} linears, the run {len(records)}")
    return dict(sorted(streamed.linears.items())), dict(streamed.plain)


def _decoder(packed: PackedLinear, compute: torch.dtype, target: torch.dtype) -> Callable[[], torch.Tensor]:
    """A fake checkpoint's weight from its stored form: decoded (float32), as the run held it (the
    compute dtype), then in the checkpoint's dtype, exactly the values a run on the whole model writes."""

    def load() -> torch.Tensor:
        stored = {key: t.load() if isinstance(t, LazyTensor) else t for key, t in packed.tensors.items()}
        linear = PackedLinear(packed.layout, packed.shape, packed.meta, stored, packed.encoding)
        return packers.dequantize(linear).to(compute).to(target).contiguous()

    return load


def _pack_records(model: nn.Module, records: dict[str, QuantizedRecord]) -> dict[str, PackedLinear]:
    modules = dict(model.named_modules())
    parameters = list(model.named_parameters(remove_duplicate=False))
    packed = {}
    for name, record in sorted(records.items()):
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{name}: the model has no nn.Linear of that name")
        if tuple(record.dequantized.shape) != (module.out_features, module.in_features):
            raise ValueError(f"{name}: record of shape {tuple(record.dequantized.shape)} for {module}")
        tied = [other for other, p in parameters if p is module.weight and other != f"{name}.weight"]
        if tied:
            # A tied weight is one tensor in two roles; quantizing one role silently changes the other.
            raise ValueError(f"{name}.weight is tied to {tied[0]}; untie it before quantizing it")
        try:
            packed[name] = packers.pack(record.layout, record.tensors, record.meta)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return packed


def _plain_tensors(model: nn.Module, skip: set[str]) -> dict[str, torch.Tensor]:
    """The model's state minus `skip`, on CPU, each tied tensor once (safetensors refuses shared
    storage; the loader re-ties). The kept copy of a tied pair is the tie source (e.g.
    embed_tokens, not lm_head), which is what transformers' `tie_weights` expects to find."""
    tie_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    state = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    for key in sorted(state, key=lambda k: k in tie_targets):  # stable: sources first
        if key in skip:
            continue
        tensor = state[key]
        if tensor.is_meta:
            raise ValueError(f"{key} is on the meta device (offloaded?) and cannot be saved")
        storage = tensor.untyped_storage().data_ptr()
        identity = (tensor.device, storage, tensor.storage_offset(), tensor.shape, tensor.stride())
        if identity in seen:
            continue
        seen.add(identity)
        tensors[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return tensors


def _stored_tensors(packed: dict[str, PackedLinear]) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": t for name, linear in packed.items() for key, t in linear.tensors.items()}


def _header(
    packed: dict[str, PackedLinear], quantization: dict[str, Any] | None = None, weights_digest: str | None = None
) -> dict[str, str]:
    """The llmquant header of a file holding packed linears; for a fake checkpoint's sidecar also
    the packed quantization_config and the digest of the model.safetensors it belongs to."""
    header = {
        "format": "pt",
        HEADER_VERSION: str(FORMAT_VERSION),
        HEADER_LINEARS: json.dumps({name: p.descriptor() for name, p in packed.items()}, sort_keys=True),
    }
    if quantization is not None:
        unbound = {key: value for key, value in quantization.items() if key != WEIGHTS_CHECKSUM}
        header[HEADER_QUANTIZATION] = json.dumps(unbound, sort_keys=True)
    if weights_digest is not None:
        header[HEADER_WEIGHTS_CHECKSUM] = weights_digest
    return header


def _quantization_config(records: dict[str, QuantizedRecord], info: dict[str, Any]) -> dict[str, Any]:
    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "modules": {name: records[name].layout for name in sorted(records)},
        "bits": combine((r.bits, r.numel) for r in records.values()).as_dict(),
        "info": info,
    }


def _model_config(model: "PreTrainedModel", dtype: torch.dtype | None = None) -> dict[str, Any]:
    """config.json contents as transformers' save_pretrained writes them, without any
    quantization_config (the caller adds llmquant's where it belongs). `dtype`: the dtype the
    tensors are written in, when the model in memory holds another (streaming)."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = dtype or model.dtype
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return json.loads(config.to_json_string())


def _save_generation_config(model: "PreTrainedModel", directory: Path) -> None:
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(directory)


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str:
    """Writes the file with every tensor's checksum; returns its binding digest (weights_digest).
    Not safetensors' save_file: its metadata order varies between processes (docs/reliability.md)."""
    return weights_digest(write_safetensors(path, tensors, header, checksums=True))


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


def _nbytes(tensor: Any) -> int:
    return tensor.numel() * tensor.element_size()


def _write_weights(directory: Path, plain: dict[str, Any], packed: dict[str, PackedLinear], max_shard_bytes: int | None) -> str:
    """A packed checkpoint's weights: model.safetensors when they fit `max_shard_bytes` (None: no
    limit), else shards `model-0000i-of-0000n.safetensors` plus model.safetensors.index.json, each
    quantized linear's tensors in one shard, with that shard's header holding its descriptor, so
    every shard is self-describing. Returns the digest config.json records (weights_checksum): the
    file's weights_digest, or for shards `sharded_digest` over theirs."""
    units: list[tuple[str, dict[str, Any], dict[str, PackedLinear]]] = [(k, {k: t}, {}) for k, t in plain.items()]
    units += [(name, {f"{name}.{k}": t for k, t in linear.tensors.items()}, {name: linear}) for name, linear in packed.items()]
    units.sort(key=lambda unit: unit[0])
    total = sum(_nbytes(t) for _, tensors, _ in units for t in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        tensors = dict(plain)
        tensors.update(_stored_tensors(packed))
        return _write_tensors(directory / WEIGHTS_FILE, tensors, _header(packed))
    shards: list[tuple[dict[str, Any], dict[str, PackedLinear]]] = []
    size = 0
    for _, tensors, linears in units:
        unit_bytes = sum(_nbytes(t) for t in tensors.values())
        if not shards or (size + unit_bytes > max_shard_bytes and size > 0):
            shards.append(({}, {}))
            size = 0
        shards[-1][0].update(tensors)
        shards[-1][1].update(linears)
        size += unit_bytes
    weight_map: dict[str, str] = {}
    digests = []
    for number, (tensors, linears) in enumerate(shards, start=1):
        name = shard_name(number, len(shards))
        digests.append([name, _write_tensors(directory / name, tensors, _header(dict(sorted(linears.items()))))])
        weight_map.update({key: name for key in tensors})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    _write_json(directory / INDEX_FILE, index)
    return sharded_digest(digests)


def sharded_digest(digests: list[list[str]]) -> str:
    """What binds a sharded checkpoint's weights to config.json: a digest over every shard's name
    and weights_digest, in order (so a shard from another checkpoint, a missing or a renamed shard
    are refused)."""
    return "xxh3_64:" + xxhash.xxh3_64(json.dumps(digests, separators=(",", ":")).encode()).hexdigest()


def weights_digest(metadata: dict[str, str]) -> str:
    """What binds a weights file to config.json (packed) or to its sidecar (fake): a digest over its
    tensors' checksums and its linears' descriptors, as recorded in its header."""
    return "xxh3_64:" + content_digest(metadata, _BOUND_KEYS)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------------
# Reading


@dataclass
class Checkpoint:
    """A packed or fake llmquant checkpoint, read and validated.

    config:       config.json without quantization_config.
    quantization: the packed quantization_config (for a fake checkpoint: the sidecar's copy).
    plain:        every tensor that is not a quantized linear's weight, in the stored dtype.
    linears:      module name -> stored form of each quantized linear.
    fmt:          "packed" or "fake".
    files:        per safetensors file read: name, tensors, bytes, and whether its checksums
                  were verified ("verified") or it has none ("absent", an older llmquant's).
    """

    config: dict[str, Any]
    quantization: dict[str, Any]
    plain: dict[str, torch.Tensor]
    linears: dict[str, PackedLinear]
    fmt: str
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Whether every file's checksums were recorded and verified."""
        return bool(self.files) and all(f["checksums"] == "verified" for f in self.files)

    @property
    def model_dtype(self) -> torch.dtype:
        """The dtype the non-quantized tensors (and a fake checkpoint's weights) are stored in."""
        name = self.config.get("dtype") or self.config.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        floating = [t.dtype for t in self.plain.values() if t.is_floating_point()]
        return floating[0] if floating else torch.float32


def is_packed_checkpoint(directory: str | Path) -> bool:
    """True if `directory` holds a packed llmquant checkpoint (judged by config.json alone; a
    damaged config is not one, and the loader that runs next reports the damage)."""
    try:
        data = json.loads((Path(directory) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    quantization = data.get("quantization_config") if isinstance(data, dict) else None
    return isinstance(quantization, dict) and quantization.get("quant_method") == QUANT_METHOD


def read_checkpoint(directory: str | Path, packed_only: bool = False) -> Checkpoint:
    """Read a packed checkpoint, or (unless packed_only) a fake one with its sidecar; UserError for
    anything else."""
    directory = Path(directory)
    config_path = directory / CONFIG_FILE
    config = _read_json(config_path)
    quantization = config.pop("quantization_config", None)
    if quantization is None and packed_only:
        raise UserError(
            f"{config_path}: no llmquant quantization_config, so not a packed checkpoint (a plain or fake-quant "
            "one loads with transformers; `llmquant pack` turns a fake one with its records into a packed one)"
        )
    if quantization is not None:
        if not isinstance(quantization, dict) or quantization.get("quant_method") != QUANT_METHOD:
            method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
            raise UserError(f"{config_path}: quantization_config is for {method!r}, not an llmquant checkpoint")
        _check_version(quantization.get("format_version"), config_path)
        weights_path = directory / WEIGHTS_FILE
        if not weights_path.is_file() and (directory / INDEX_FILE).is_file():
            return _read_sharded(directory, config, quantization)
        tensors, header = _read_tensors(weights_path)
        linears = _take_linears(tensors, header, weights_path)
        _check_modules(quantization, linears, config_path)
        files = [_verify(weights_path, quantization.get(WEIGHTS_CHECKSUM), config_path, f"quantization_config.{WEIGHTS_CHECKSUM}")]
        _check_finite(tensors, weights_path)
        return Checkpoint(config, quantization, tensors, linears, "packed", files)

    records_path = directory / RECORDS_FILE
    if not records_path.is_file():
        raise UserError(
            f"{directory}: a plain checkpoint without {RECORDS_FILE}; only llmquant checkpoints (packed, "
            "or fake ones saved with their records) can be packed or loaded as packed"
        )
    stored, header = _read_tensors(records_path)
    linears = _take_linears(stored, header, records_path)
    files = [_verify(records_path)]
    _check_finite(stored, records_path)
    quantization = _parse_json(header.get(HEADER_QUANTIZATION), f"{records_path}: header {HEADER_QUANTIZATION}")
    _check_modules(quantization, linears, records_path)
    weights_path = directory / WEIGHTS_FILE
    plain, weights_header = _read_tensors(weights_path)
    binding = header.get(HEADER_WEIGHTS_CHECKSUM)
    if binding is not None and CHECKSUMS_KEY in weights_header and weights_digest(weights_header) != binding:
        # Another checkpoint's weights: said before comparing them with the records, which would
        # only find that they differ. The full check (_verify, below) says the same of any mismatch.
        _verify(weights_path, binding, records_path, f"header {HEADER_WEIGHTS_CHECKSUM}")
    for name, linear in linears.items():
        weight = plain.pop(f"{name}.weight", None)
        if weight is None or tuple(weight.shape) != linear.shape:
            found = "missing" if weight is None else f"of shape {tuple(weight.shape)}"
            raise UserError(f"{weights_path}: {name}.weight is {found}, the records say {list(linear.shape)}")
        # Re-packing reproduces the records, so it would silently drop any later edit of the
        # decoded weights (a merged adapter, say): refuse instead.
        try:
            decoded = packers.dequantize(linear)  # pack's input is checked in full: every code decoded
        except ValueError as exc:
            raise UserError(f"{records_path}: {name}: {_one_line(exc)}") from None
        if not torch.equal(decoded.to(weight.dtype), weight):
            raise UserError(
                f"{weights_path}: {name}.weight differs from its packed record in {RECORDS_FILE} "
                "(edited or damaged after saving?); re-quantize instead of re-packing"
            )
    if files[0]["checksums"] == "verified" or binding is not None:
        files.append(_verify(weights_path, binding, records_path, f"header {HEADER_WEIGHTS_CHECKSUM}"))
    else:
        files.append(_verify(weights_path))
    _check_finite(plain, weights_path)
    return Checkpoint(config, quantization, plain, linears, "fake", files)


def shard_files(directory: Path) -> list[Path]:
    """The shards model.safetensors.index.json lists, in order; UserError if it is damaged."""
    index_path = directory / INDEX_FILE
    index = _read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise UserError(f"{index_path}: no weight_map object of tensor name -> shard file")
    names = sorted(set(weight_map.values()))
    if not names or not all(SHARD_PATTERN.match(name) for name in names):
        raise UserError(f"{index_path}: shard names must be model-NNNNN-of-NNNNN.safetensors, found {names[:2]}")
    return [directory / name for name in names]


def _read_sharded(directory: Path, config: dict[str, Any], quantization: dict[str, Any]) -> Checkpoint:
    """A packed checkpoint written as shards: every shard's tensors, checksums and linears, the
    index's map checked against the shards' contents, and the shards bound to config.json."""
    index_path, config_path = directory / INDEX_FILE, directory / CONFIG_FILE
    weight_map = _read_json(index_path)["weight_map"]
    tensors: dict[str, torch.Tensor] = {}
    linears: dict[str, PackedLinear] = {}
    files, digests = [], []
    for path in shard_files(directory):
        shard, header = _read_tensors(path)
        for key in shard:
            if weight_map.get(key) != path.name or key in tensors:
                raise UserError(f"{path}: holds {key}, which {index_path.name} places in {weight_map.get(key)!r}")
        entry = _verify(path)
        if entry["checksums"] != "verified":
            raise UserError(f"{path}: a shard without checksums (not written by llmquant?)")
        files.append(entry)
        digests.append([path.name, weights_digest(header)])
        found = _take_linears(shard, header, path)
        linears.update(found)
        for name, linear in found.items():
            tensors.update({f"{name}.{key}": t for key, t in linear.tensors.items()})
        _check_finite(shard, path)
        tensors.update(shard)
    listed = set(weight_map) - set(tensors)
    if listed:
        raise UserError(f"{index_path}: lists {sorted(listed)[0]} ({len(listed)} in all), which no shard holds")
    expected, actual = quantization.get(WEIGHTS_CHECKSUM), sharded_digest(digests)
    if expected != actual:
        raise UserError(
            f"{directory}: the shards are not those {config_path.name} was written with (quantization_config."
            f"{WEIGHTS_CHECKSUM} is {expected}, the shards' is {actual}): a shard from another checkpoint?"
        )
    for name, linear in linears.items():  # the stored tensors were only collected for the map check
        for key in linear.tensors:
            tensors.pop(f"{name}.{key}")
    _check_modules(quantization, linears, config_path)
    return Checkpoint(config, quantization, tensors, linears, "packed", files)


def verify_weights(directory: str | Path) -> dict[str, Any] | None:
    """Before a fake-quant (or any llmquant-written plain) checkpoint is handed to transformers:
    its model.safetensors' checksums and, with a sidecar, its binding to the sidecar. Reads only
    headers and hashes the bytes; None for a directory without llmquant-written weights (a plain
    model's files are transformers' to judge)."""
    directory = Path(directory)
    weights_path, records_path = directory / WEIGHTS_FILE, directory / RECORDS_FILE
    if not weights_path.is_file():
        return None
    if not records_path.is_file():
        try:
            with safe_open(str(weights_path), framework="pt") as file:
                metadata = file.metadata() or {}
        except (SafetensorError, OSError, ValueError, RuntimeError, TypeError):
            return None
        return _verify(weights_path) if CHECKSUMS_KEY in metadata else None
    try:
        sidecar = read_header(records_path).metadata
    except OSError as exc:
        raise UserError(f"{records_path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise UserError(f"{records_path}: not a readable safetensors file ({_one_line(exc)})") from None
    binding = sidecar.get(HEADER_WEIGHTS_CHECKSUM)
    if binding is None:
        return _verify(weights_path)  # an older llmquant's fake checkpoint: warns once
    return _verify(weights_path, binding, records_path, f"header {HEADER_WEIGHTS_CHECKSUM}")


_warned_unverified: set[str] = set()


def _verify(path: Path, expected: Any = None, owner: Path | None = None, key: str = "") -> dict[str, Any]:
    """Checks the file's recorded checksums against its bytes and, when `owner` is given, that the
    file is the one `owner` (config.json, a sidecar) was written with: `expected` must be its
    weights_digest. A file without checksums (an older llmquant's) is read unverified, with a
    warning, unless its owner records a digest. Returns the file's entry for Checkpoint.files."""
    try:
        header = read_header(path)
        checked = verify_checksums(path, header)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except ValueError as exc:
        if not path.is_file():
            raise UserError(f"{path}: missing") from None
        raise UserError(f"{path}: {_one_line(exc)}") from None
    entry = {"file": path.name, "tensors": len(header.entries), "bytes": header.size, "checksums": "verified"}
    if checked is None:
        if owner is not None and expected is not None:
            raise UserError(f"{path}: records no checksums, but {owner.name} records its {key} (replaced by another file?)")
        if str(path) not in _warned_unverified:
            _warned_unverified.add(str(path))
            log.warning(
                "%s has no checksums (written by an llmquant before they were recorded): read unverified; "
                "`llmquant pack` rewrites it with checksums",
                path,
            )
        return {**entry, "checksums": "absent"}
    if owner is not None:
        actual = weights_digest(header.metadata)
        if expected is None:
            raise UserError(f"{owner}: records no {key} for {path.name}, whose tensors carry checksums (edited?)")
        if actual != expected:
            raise UserError(
                f"{path}: not the file {owner.name} was written with ({key} is {expected}, the file's is {actual}): "
                "a model.safetensors from another checkpoint?"
            )
    return entry


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return _parse_json(text, str(path))


def _parse_json(text: str | None, where: str) -> dict[str, Any]:
    if text is None:
        raise UserError(f"{where}: missing")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise UserError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object")
    return data


def _check_version(version: Any, where: Path) -> None:
    if str(version) != str(FORMAT_VERSION):
        raise UserError(
            f"{where}: llmquant format_version {version!r} is not supported (this llmquant reads "
            f"format_version {FORMAT_VERSION})"
        )


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise UserError(f"{path}: missing")
    try:
        with safe_open(str(path), framework="pt") as file:
            header = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({_one_line(exc)})") from None
    return tensors, header


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel():
            # min and max propagate NaN and hold any Inf; 15x faster than isfinite().all() on CPU fp16.
            low, high = torch.aminmax(tensor)
            if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                raise UserError(f"{path}: tensor {key} contains NaN/Inf")


def _take_linears(tensors: dict[str, torch.Tensor], header: dict[str, str], path: Path) -> dict[str, PackedLinear]:
    """Move each quantized linear's stored tensors out of `tensors` into a validated PackedLinear."""
    if HEADER_VERSION not in header:
        raise UserError(f"{path}: no llmquant header (not written by llmquant?)")
    _check_version(header[HEADER_VERSION], path)
    descriptors = _parse_json(header.get(HEADER_LINEARS), f"{path}: header {HEADER_LINEARS}")
    linears = {}
    for name, descriptor in sorted(descriptors.items()):
        declared = descriptor.get("tensors") if isinstance(descriptor, dict) else None
        if not isinstance(declared, list) or not all(isinstance(key, str) for key in declared):
            raise UserError(f"{path}: {name}: descriptor has no list of stored tensors")
        stored = {key: tensors.pop(f"{name}.{key}") for key in declared if f"{name}.{key}" in tensors}
        try:
            linear = PackedLinear.from_descriptor(descriptor, stored)
            # Sizes, dtypes and the index values a decode reads, without decoding (fast loading).
            packers.check(linear)
        except ValueError as exc:
            raise UserError(f"{path}: {name}: {_one_line(exc)}") from None
        linears[name] = linear
    return linears


def _check_modules(quantization: dict[str, Any], linears: dict[str, PackedLinear], where: Path) -> None:
    modules = quantization.get("modules")
    if not isinstance(modules, dict):
        raise UserError(f"{where}: quantization_config has no 'modules' object")
    found = {name: linear.layout for name, linear in linears.items()}
    differing = sorted(name for name in set(modules) | set(found) if modules.get(name) != found.get(name))
    if differing:
        name = differing[0]
        raise UserError(
            f"{where}: quantization_config.modules says {name} is {modules.get(name)!r}, "
            f"the tensors file has {found.get(name)!r} ({len(differing)} module(s) disagree)"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


# --------------------------------------------------------------------------------------------------
# Converting


def read_pack_source(src_dir: str | Path, dst_dir: str | Path, force: bool, verb: str) -> tuple[Path, Path, Checkpoint]:
    """The start of every rewrite of a checkpoint (convert, the exports): a destination other than
    the source, checked (free, or replaceable with --force) before anything is read, then the source
    read and verified (read_checkpoint)."""
    src, dst = Path(src_dir), Path(dst_dir)
    if src.resolve() == dst.resolve():
        raise UserError(f"{dst}: {verb} needs a destination different from its source")
    check_output_path(dst, force, inputs=[src])  # before reading anything
    return src, dst, read_checkpoint(src)


def convert(
    src_dir: str | Path,
    dst_dir: str | Path,
    fmt: str,
    dtype: torch.dtype | str | None = None,
    force: bool = False,
    check: Callable[[Checkpoint, Path], None] | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Rewrite an llmquant checkpoint as `fmt` ("packed" or "fake") in `dst_dir`, optionally casting
    the non-quantized tensors (and fake weights) to `dtype`. Every other file of the source
    (tokenizer, generation config, llmquant.json) is copied unchanged. `dst_dir` appears only when
    complete; an existing one is replaced only with `force`, and only if llmquant wrote it.
    packed -> fake always works; fake -> packed needs the sidecar written by save_fake.

    The source is checked as strictly as loading it would be, and more: structure, checksums and
    the binding of its files (read_checkpoint), every linear decoded, and `check(checkpoint, src)`
    (the runtime's check that it builds the model of its config.json), so that nothing broken is
    ever written."""
    if fmt not in FORMATS:
        raise UserError(f"unknown checkpoint format {fmt!r}; choose one of {', '.join(FORMATS)}")
    src, dst, checkpoint = read_pack_source(src_dir, dst_dir, force, "convert")
    for name, linear in checkpoint.linears.items():
        try:
            packers.unpack(linear)
        except ValueError as exc:
            raise UserError(f"{src}: {name}: {_one_line(exc)}") from None
    if check is not None:
        check(checkpoint, src)
    resolved = resolve_dtype(dtype)
    target = resolved if isinstance(resolved, torch.dtype) else checkpoint.model_dtype
    config = dict(checkpoint.config)
    config["dtype"] = str(target).removeprefix("torch.")
    plain = {k: t.to(target) if t.is_floating_point() else t for k, t in checkpoint.plain.items()}
    unbound = {key: value for key, value in checkpoint.quantization.items() if key != WEIGHTS_CHECKSUM}
    with atomic_output_dir(dst, force, inputs=[src]) as partial:
        if fmt == "packed":
            digest = _write_weights(partial, plain, checkpoint.linears, max_shard_bytes)
            config["quantization_config"] = {**unbound, WEIGHTS_CHECKSUM: digest}
        else:
            for name, linear in checkpoint.linears.items():
                plain[f"{name}.weight"] = packers.dequantize(linear).to(target)
            digest = _write_tensors(partial / WEIGHTS_FILE, plain, {"format": "pt"})
            records = _stored_tensors(checkpoint.linears)
            _write_tensors(partial / RECORDS_FILE, records, _header(checkpoint.linears, unbound, digest))
        _write_json(partial / CONFIG_FILE, config)
        _copy_other_files(src, partial)


def _copy_other_files(src: Path, partial: Path, skip: set[str] = frozenset()) -> None:
    """Every file of a rewritten checkpoint that the rewrite does not write itself (tokenizer,
    generation config, llmquant.json), copied unchanged."""
    for path in src.iterdir():
        written = path.name in _WRITTEN_FILES or SHARD_PATTERN.match(path.name)
        if path.is_file() and not written and path.name != MANIFEST_FILE and path.name not in skip:
            shutil.copy2(path, partial / path.name)


def rewrite_packed(
    src: Path,
    checkpoint: Checkpoint,
    dst: Path,
    linears: dict[str, PackedLinear],
    info: dict[str, Any],
    force: bool = False,
    report: dict[str, Any] | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """A packed checkpoint of `checkpoint` (read from `src`) with its linears replaced by `linears`
    (same names, same layouts: what training changes is the codes and side parameters, not the
    structure), `info` merged into quantization_config.info, the plain tensors and the other files
    as they were; `report`, if given, replaces llmquant.json. Written as every output is (temporary
    directory, then rename)."""
    if set(linears) != set(checkpoint.linears):
        raise ValueError("rewrite_packed: the linears must be the checkpoint's own")
    for name, linear in linears.items():
        if linear.layout != checkpoint.linears[name].layout or tuple(linear.shape) != tuple(checkpoint.linears[name].shape):
            raise ValueError(f"rewrite_packed: {name} changed layout or shape")
    quantization = {key: value for key, value in checkpoint.quantization.items() if key != WEIGHTS_CHECKSUM}
    quantization["info"] = {**(quantization.get("info") or {}), **info}
    config = dict(checkpoint.config)
    with atomic_output_dir(dst, force, inputs=[src]) as partial:
        digest = _write_weights(partial, dict(checkpoint.plain), dict(sorted(linears.items())), max_shard_bytes)
        config["quantization_config"] = {**quantization, WEIGHTS_CHECKSUM: digest}
        _write_json(partial / CONFIG_FILE, config)
        _copy_other_files(src, partial, skip={REPORT_FILE} if report is not None else set())
        if report is not None:
            _write_json(partial / REPORT_FILE, report)
