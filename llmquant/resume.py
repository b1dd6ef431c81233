"""Resume after a crash: `quantize` checkpoints every finished decoder layer (docs/reliability.md).

The work directory is `.NAME.work/`, a sibling of the output NAME (not inside the output's
temporary directory, which is deleted when a run fails):

    fingerprint.json          what the run is: sha256 over the recipe (minus `output`), the model's
                              identity, the calibration windows and llmquant's version
    layer-0000.safetensors    layer 0's records in their packed form, exactly as the checkpoint
                              stores them (`<linear>.<stored name>`, docs/format.md); the header holds
                              each record's descriptor, bits, loss and stats, and the layer's report
    hidden-0001.safetensors   the hidden states that feed layer 1, saved verbatim: recomputing them
                              from the restored weights is not bit-identical to the live chain, so
                              they are never regenerated. Only the newest one is kept.
    lock                      flock'ed by the process using the directory

After layer i: write layer-i, then hidden-(i+1) (each to a temporary name, fsync, rename: a kill
mid-write leaves no damaged file under a final name), then delete hidden-i. On resume the first
layer to run is the largest s such that layer-0 .. layer-(s-1) exist and hidden-s exists (s = 0
needs nothing, s = the number of layers needs no hidden states); later files are stale and removed.
The restored layers get their weights from the layout's `decode` of the unpacked records (exactly
what the method produced: the codecs round-trip exactly), the method rebuilds its cross-layer state
through `Method.restore`, and the runner continues from hidden-s. The result is bit-identical to an uninterrupted run on the same
machine and software (tests/test_reliability.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from llmquant.version import __version__
from llmquant.core.method import Method
from llmquant.core.record import BitFigures, QuantizedRecord
from llmquant.core.runner import LayerReport, LinearReport, ResumePoint
from llmquant.errors import UserError
from llmquant.formats.packers import PackedLinear, pack, unpack
from llmquant.layouts import decode
from llmquant.models.layer_maps import ResolvedLayers
from llmquant.output import fsync_dir
from llmquant.safetensors_io import DTYPES, LazyTensor, read_header, write_safetensors

if TYPE_CHECKING:
    from llmquant.data.calibration import CalibrationSet
    from llmquant.recipe import Recipe

log = logging.getLogger(__name__)

WORK_VERSION = 2  # 2: layer files hold the checkpoint's packed tensors and descriptors
FINGERPRINT_FILE = "fingerprint.json"
LOCK_FILE = "lock"
META_KEY = "llmquant.resume"


def work_dir_for(output: str | Path) -> Path:
    path = Path(os.path.abspath(Path(output).expanduser()))
    return path.parent / f".{path.name}.work"


def layer_file(index: int) -> str:
    return f"layer-{index:04d}.safetensors"


def hidden_file(index: int) -> str:
    return f"hidden-{index:04d}.safetensors"


def finished_layers(work: Path) -> int:
    """Number of consecutive layer files from layer 0."""
    count = 0
    while (work / layer_file(count)).is_file():
        count += 1
    return count


def check_work_dir(output: str | Path, resume: bool, force: bool) -> None:
    """Cheap check before anything loads: an unfinished run's work directory is never silently
    discarded or reused."""
    work = work_dir_for(output)
    if _locked(work / LOCK_FILE):
        raise UserError(f"{work} is in use by another llmquant process (writing {output})")
    if work.exists() and not resume and not force:
        raise UserError(
            f"{work} holds an unfinished run for {output} ({finished_layers(work)} layer(s) done); "
            "pass --resume to continue it, or --force to discard it and start over"
        )
    if work.exists() and not work.is_dir():
        raise UserError(f"{work} exists and is not a directory")


def _locked(lock: Path) -> bool:
    """True if another process holds the work directory's lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return False
    if not lock.is_file():
        return False
    try:
        handle = open(lock, "a")
    except OSError:
        return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        handle.close()  # closing releases our probe lock
    return False


# --------------------------------------------------------------------------------------------------
# Fingerprint


def _sha256_json(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def model_identity(source_description: str, model: nn.Module) -> dict[str, str]:
    """Where the model came from, its config, and a sha256 over a strided sample (4096 values) of
    every tensor as loaded, in float32 (so the compute dtype does not matter). Cheap for any size,
    and it changes when the weights do (a different fine-tune at the same path)."""
    config = json.loads(model.config.to_json_string()) if hasattr(model, "config") else {}
    config.pop("transformers_version", None)
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)]
        sample = sample.to("cpu", torch.float32) if sample.is_floating_point() else sample.to("cpu", torch.int64)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(sample.contiguous().numpy().tobytes())
    return {"source": source_description, "config_sha256": _sha256_json(config), "weights_sample_sha256": digest.hexdigest()}


def make_fingerprint(recipe: dict[str, Any], model: dict[str, str], windows: torch.Tensor, windows_sha256: str) -> dict[str, Any]:
    """`recipe`: the recipe's settings without `output` (Recipe.settings())."""
    components = {
        "llmquant": __version__,
        "recipe": recipe,
        "model": model,
        "calibration": {"windows_sha256": windows_sha256, "shape": list(windows.shape)},
    }
    return {"version": WORK_VERSION, "sha256": _sha256_json(components), "components": components}


def environment(device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """What bit-identity also depends on; a resume under another environment is allowed, with a warning."""
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "compute_dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): data}


def describe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints' components."""
    differences = []
    for key in ("llmquant", "recipe", "model", "calibration"):
        old, new = saved.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            a, b = _flatten(old), _flatten(new)
            keys = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
            shown = ", ".join(f"{k}: {_short(a.get(k, '<absent>'))} -> {_short(b.get(k, '<absent>'))}" for k in keys[:3])
            more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
            differences.append(f"{key} differs ({shown}{more})")
        else:
            differences.append(f"{key} differs ({_short(old)} -> {_short(new)})")
    return differences


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:28] + "..." + text[-28:]


# --------------------------------------------------------------------------------------------------
# Files


def _lazy(path: Path, entry: Any) -> LazyTensor:
    dtype = {name: dtype for dtype, name in DTYPES.items()}[entry.dtype]

    def load() -> torch.Tensor:
        nbytes = entry.end - entry.begin
        buffer = bytearray(nbytes)
        with open(path, "rb") as handle:
            handle.seek(entry.begin)
            handle.readinto(buffer)
        if not nbytes:
            return torch.empty(entry.shape, dtype=dtype)
        return torch.frombuffer(buffer, dtype=dtype).reshape(entry.shape)

    return LazyTensor(dtype, entry.shape, load)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(META_KEY)
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        meta = json.loads(raw) if raw is not None else None
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: unreadable ({' '.join(str(error).split())}); pass --force to start over") from None
    if not isinstance(meta, dict) or meta.get("version") != WORK_VERSION:
        raise UserError(f"{path}: not a work file of this llmquant version; pass --force to start over")
    return tensors, meta


# --------------------------------------------------------------------------------------------------
# The work directory


class WorkDir:
    """One run's checkpoints. `save_layer` is the runner's LayerSink."""

    def __init__(self, path: Path):
        self.path = path
        self.finished = 0
        self._lock: Any = None

    @classmethod
    def open(
        cls,
        recipe: "Recipe",
        model: nn.Module,
        source: str,
        calibration: "CalibrationSet",
        device: torch.device,
        resume: bool,
        force: bool,
    ) -> "WorkDir":
        """Creates the work directory of `recipe.output`, or (resume) validates an existing one against
        this run's fingerprint (recipe settings, model identity, calibration windows, version)."""
        fingerprint = make_fingerprint(recipe.settings(), model_identity(source, model), calibration.windows, calibration.sha256)
        return cls.open_at(recipe.output, fingerprint, environment(device, model.dtype), resume, force)

    @classmethod
    def open_at(
        cls, output: str | Path, fingerprint: dict[str, Any], env: dict[str, Any], resume: bool, force: bool
    ) -> "WorkDir":
        """`open` with the fingerprint and environment already computed."""
        path = work_dir_for(output)
        existed = path.is_dir() and any(p.name != LOCK_FILE for p in path.iterdir())
        if existed and not resume and not force:
            check_work_dir(output, resume, force)
        path.mkdir(parents=True, exist_ok=True)
        work = cls(path)
        work._acquire()
        try:
            saved = work._read_fingerprint() if existed and resume else None
            if saved is not None:
                if saved.get("sha256") != fingerprint["sha256"]:
                    differences = describe_differences(saved.get("components", {}), fingerprint["components"])
                    raise UserError(
                        f"{path} was made by a different run: {'; '.join(differences) or 'fingerprint differs'}; "
                        "pass --force (without --resume) to discard it and start over"
                    )
                old_env = saved.get("environment", {})
                changed = {k: (old_env.get(k), v) for k, v in env.items() if old_env.get(k) != v}
                if changed:
                    log.warning(
                        "resuming under a different environment (%s): the result is a valid quantization, but not "
                        "guaranteed bit-identical to an uninterrupted run",
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
                    )
            else:
                if resume:
                    log.info("nothing to resume in %s; starting from layer 0", path)
                work._clear()
                (path / FINGERPRINT_FILE).write_text(json.dumps({**fingerprint, "environment": env}, indent=1, sort_keys=True))
                fsync_dir(path)
        except BaseException:
            work.close()
            raise
        return work

    def _acquire(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: no protection against a second process
            return
        handle = open(self.path / LOCK_FILE, "a")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise UserError(f"{self.path} is in use by another llmquant process") from None
        self._lock = handle

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)

    def abandon(self) -> int:
        """After a failed or interrupted run: keep the directory if a layer finished (it can be
        resumed), else remove it, leaving nothing behind. Returns the number of layers kept."""
        kept = finished_layers(self.path)
        if kept == 0:
            self.remove()
        else:
            self.close()
            log.warning("%d finished layer(s) are kept in %s; rerun with --resume to continue from there", kept, self.path)
        return kept

    def _clear(self) -> None:
        for entry in self.path.iterdir():
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def _read_fingerprint(self) -> dict[str, Any] | None:
        file = self.path / FINGERPRINT_FILE
        if not file.is_file():
            if finished_layers(self.path) == 0:
                return None  # killed before the first layer: nothing to resume
            raise UserError(f"{self.path}: {FINGERPRINT_FILE} is missing; pass --force to start over")
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as error:
            raise UserError(f"{file}: unreadable ({error}); pass --force to start over") from None
        if not isinstance(data, dict) or data.get("version") != WORK_VERSION:
            raise UserError(f"{file}: not a work directory of this llmquant version; pass --force to start over")
        return data

    # Writing -----------------------------------------------------------------------------------

    def save_layer(
        self, report: LayerReport, records: dict[str, QuantizedRecord], next_inputs: torch.Tensor | None
    ) -> None:
        index = report.index
        tensors: dict[str, torch.Tensor] = {}
        entries = []
        for name, record in records.items():
            packed = pack(record.layout, record.tensors, record.meta)
            for key, tensor in packed.tensors.items():
                tensors[f"{name}.{key}"] = tensor
            entries.append(
                {
                    "name": name,
                    "descriptor": packed.descriptor(),
                    "bits": record.bits.as_dict(),
                    "loss": record.loss,
                    "stats": record.stats,
                }
            )
        meta = {"version": WORK_VERSION, "layer": index, "records": entries, "report": asdict(report)}
        write_safetensors(self.path / layer_file(index), tensors, {META_KEY: json.dumps(meta)})
        if next_inputs is not None:
            hidden_meta = {"version": WORK_VERSION, "layer": index + 1}
            write_safetensors(self.path / hidden_file(index + 1), {"hidden": next_inputs}, {META_KEY: json.dumps(hidden_meta)})
        (self.path / hidden_file(index)).unlink(missing_ok=True)
        self.finished = index + 1

    # Reading -----------------------------------------------------------------------------------

    def stored_linears(self, count: int) -> dict[str, PackedLinear]:
        """The stored form of every linear of layers 0..count-1, as the checkpoint stores them, with
        tensors read from the layer files only when the writer reaches them (streaming: the packed
        model is never held in memory)."""
        linears: dict[str, PackedLinear] = {}
        for index in range(count):
            path = self.path / layer_file(index)
            try:
                header = read_header(path)
                meta = json.loads(header.metadata[META_KEY])
                for entry in meta["records"]:
                    name, descriptor = entry["name"], entry["descriptor"]
                    stored = {key: _lazy(path, header.entries[f"{name}.{key}"]) for key in descriptor["tensors"]}
                    linears[name] = PackedLinear.from_descriptor(descriptor, stored)
            except (OSError, KeyError, TypeError, ValueError) as error:
                raise UserError(f"{path}: unreadable work file ({' '.join(str(error).split())}); pass --force to start over") from None
        return linears

    def load(self, model: nn.Module, resolved: ResolvedLayers, method: Method, data_free: bool = False) -> ResumePoint | None:
        """Restores the finished layers into `model` and `method`; None when there are none. A
        data-free run (no calibration, so no hidden states) continues after its last finished layer."""
        total = len(resolved.layers)
        done = finished_layers(self.path)
        if done > total:
            raise UserError(f"{self.path}: {done} layer files for a model of {total} layers; pass --force to start over")
        if done == total or data_free:
            start = done
        else:
            start = next((s for s in range(done, 0, -1) if (self.path / hidden_file(s)).is_file()), 0)
        for entry in self.path.iterdir():  # stale files: redone layers, older hidden states, partial writes
            stale_layer = entry.name.startswith("layer-") and entry.name >= layer_file(start)
            stale_hidden = entry.name.startswith("hidden-") and entry.name != hidden_file(start)
            if stale_layer or stale_hidden or (entry.name.startswith(".") and ".tmp-" in entry.name):
                entry.unlink(missing_ok=True)
        self.finished = start
        if start == 0:
            return None
        records: dict[str, QuantizedRecord] = {}
        reports: list[LayerReport] = []
        for index in range(start):
            layer_records, report = self._load_layer(index, model, resolved)
            for name, record in layer_records.items():
                method.restore(name, record)
            records.update(layer_records)
            reports.append(report)
        inputs = None
        if start < total and not data_free:
            tensors, meta = _read_safetensors(self.path / hidden_file(start))
            if meta.get("layer") != start or set(tensors) != {"hidden"}:
                raise UserError(f"{self.path / hidden_file(start)}: not the inputs of layer {start}; pass --force to start over")
            inputs = tensors["hidden"]
        log.info("resuming: layers 0-%d restored from %s", start - 1, self.path)
        return ResumePoint(start, inputs, records, reports)

    def _load_layer(
        self, index: int, model: nn.Module, resolved: ResolvedLayers
    ) -> tuple[dict[str, QuantizedRecord], LayerReport]:
        path = self.path / layer_file(index)
        tensors, meta = _read_safetensors(path)
        prefix = f"{resolved.path}.{index}."
        expected = [prefix + name for name in resolved.linear_names(index)]
        try:
            entries = meta["records"]
            if meta["layer"] != index or sorted(e["name"] for e in entries) != sorted(expected):
                raise ValueError(f"holds {sorted(e['name'] for e in entries)}, expected {sorted(expected)}")
            records: dict[str, QuantizedRecord] = {}
            for entry in entries:
                name, descriptor = entry["name"], entry["descriptor"]
                stored = {key: tensors[f"{name}.{key}"] for key in descriptor["tensors"]}
                packed = PackedLinear.from_descriptor(descriptor, stored)
                module = model.get_submodule(name)
                if not isinstance(module, nn.Linear):
                    raise ValueError(f"{name} is not a linear of the model")
                if packed.shape != (module.out_features, module.in_features):
                    raise ValueError(f"{name} is stored as {list(packed.shape)}, the model has {module}")
                own = unpack(packed)
                if not module.weight.is_meta:  # streaming: a finished layer is never read again
                    weight = decode(packed.layout, own, packed.meta)
                    module.weight.data.copy_(weight.to(module.weight.dtype))
                records[name] = QuantizedRecord(
                    dequantized=module.weight.data,
                    layout=packed.layout,
                    tensors=own,
                    meta=packed.meta,
                    bits=BitFigures(**entry["bits"]),
                    loss=entry["loss"],
                    stats=entry["stats"],
                )
            data = meta["report"]
            linears = [LinearReport(**{**r, "shape": tuple(r["shape"])}) for r in data["linears"]]
            report = LayerReport(data["index"], data["seconds"], linears)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise UserError(f"{path}: inconsistent work file ({' '.join(str(error).split())}); pass --force to start over") from None
        return records, report

