"""`llmquant quantize`: recipe -> model + calibration -> sequential runner -> checkpoint + report."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from llmquant.version import __version__
from llmquant.core.parallel import Parallel
from llmquant.core.record import QuantizedRecord, combine
from llmquant.core.refine import LayerRefiner
from llmquant.core.runner import LayerReport, SequentialRunner
from llmquant.data.calibration import CalibrationSet, load_or_build_calibration
from llmquant.devices import resolve_devices, resolve_dtype
from llmquant.errors import UserError
from llmquant.formats import save_fake, save_packed
from llmquant.formats.checkpoint import DEFAULT_MAX_SHARD_BYTES, REPORT_FILE, Streamed, is_packed_checkpoint
from llmquant.layouts.refine import learnable
from llmquant.methods import get_method_class
from llmquant.models.layer_maps import resolve_layers
from llmquant.models.streaming import open_streamed, streamable
from llmquant.models.loading import (  # noqa: F401 - check_finite_weights: quantize's check, used by tests from here
    check_finite_weights,
    load_pretrained,
    load_tokenizer,
    resolve_model_source,
    resolve_save_dtype,
)
from llmquant.output import atomic_output_dir, check_output_path
from llmquant.provenance import peak_memory, versions
from llmquant.recipe import Recipe
from llmquant.resume import WorkDir, check_work_dir, environment, make_fingerprint

log = logging.getLogger(__name__)

STREAMING_CHOICES = ("auto", "on", "off")


def build_report(
    recipe: Recipe,
    source: str,
    calibration: CalibrationSet,
    records: dict[str, QuantizedRecord],
    layers: list[LayerReport],
    total_params: int,
    seconds: dict[str, float],
    summary: dict[str, Any],
    device: torch.device,
) -> dict[str, Any]:
    bits = combine((r.bits, r.numel) for r in records.values())
    quantized = sum(r.numel for r in records.values())
    return {
        "llmquant_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "recipe": recipe.dump(),
        "model_source": source,
        "method": recipe.method.name,
        "seed": recipe.calibration.seed,
        "device": str(device),
        "calibration": {**calibration.meta, "windows_sha256": calibration.sha256},
        "bits": bits.as_dict(),
        "uncalibrated_linears": [r.name for l in layers for r in l.linears if r.tokens == 0],
        "parameters": {"quantized": quantized, "total": total_params},
        "time_seconds": seconds,
        "peak_memory": peak_memory(),
        "versions": versions(),
        "layers": [
            {"index": l.index, "seconds": l.seconds, "linears": [asdict(r) for r in l.linears]} for l in layers
        ],
        "method_summary": summary,
        **({"refine": refine_summary(layers)} if recipe.refine is not None else {}),
    }


def refine_summary(layers: list[LayerReport]) -> dict[str, Any]:
    """The refinement over the whole model (docs/refine.md): layers and linears whose records it
    replaced, and the layers' reconstruction losses before and after (means over layers)."""
    per_layer = [l.linears[0].stats.get("refine") for l in layers if l.linears]
    per_layer = [r for r in per_layer if r]
    linears = [r.stats.get("refine", {}) for l in layers for r in l.linears]
    count = max(len(per_layer), 1)
    return {
        "layers_improved": sum(1 for r in per_layer if r["best_epoch"] > 0),
        "layers": len(per_layer),
        "linears_refined": sum(1 for r in linears if r.get("refined")),
        "mean_loss_before": sum(r["loss_before"] for r in per_layer) / count,
        "mean_loss_after": sum(r["loss_after"] for r in per_layer) / count,
    }


def write_checkpoint(
    model,
    tokenizer,
    records: dict[str, QuantizedRecord],
    directory: Path,
    fmt: str,
    info: dict,
    streamed: Streamed | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """fmt: "packed" (real bits, llmquant's loader; sharded above `max_shard_bytes`) or "fake"
    (plain dequantized HF checkpoint)."""
    if fmt == "packed":
        save_packed(model, records, directory, info, streamed, max_shard_bytes)
    else:
        save_fake(model, records, directory, info, streamed)
    tokenizer.save_pretrained(directory)


def check_calibration_ids(calibration: CalibrationSet, model) -> None:
    vocab = model.get_input_embeddings().num_embeddings
    windows = calibration.windows
    if windows.numel() and (int(windows.min()) < 0 or int(windows.max()) >= vocab):
        raise UserError(
            f"calibration: token ids range over [{int(windows.min())}, {int(windows.max())}], "
            f"the model's vocabulary has {vocab} entries (a calibration file from another tokenizer?)"
        )


def _local_path(spec: Any) -> Path | None:
    """A model source's directory or file, or a calibration dataset's file; None for named ones."""
    if hasattr(spec, "kind"):  # a ModelSource
        if spec.kind == "dir":
            return Path(spec.location)
        return Path(spec.location) / spec.gguf_file if spec.gguf_file else None
    return Path(spec) if isinstance(spec, str) and Path(spec).expanduser().exists() else None


def resolve_calibration_file(recipe: Recipe) -> Recipe:
    """A calibration .safetensors file fixes the windows: the recipe's nsamples/seqlen, when set
    (in the recipe, by a flag or by --protocol), must be the file's, and when not set are taken from
    it (and recorded so). Checked before the model loads; UserError otherwise."""
    cal = recipe.calibration
    if not cal.dataset.endswith(".safetensors"):
        return recipe
    windows = CalibrationSet.load(cal.dataset).windows
    found = {"nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1])}
    for field, value in found.items():
        asked = getattr(cal, field)
        if field in cal.model_fields_set and asked != value:
            raise UserError(
                f"calibration.{field}: {asked}, but {cal.dataset} holds {found['nsamples']} x {found['seqlen']} windows "
                f"(nsamples x seqlen); set calibration.{field} to {value} or leave it out"
            )
    if all(getattr(cal, field) == value for field, value in found.items()):
        return recipe
    log.info("calibration: %s holds %d x %d windows; using them", cal.dataset, found["nsamples"], found["seqlen"])
    updated = cal.model_copy(update=found)
    return recipe.model_copy(update={"calibration": updated})


def run_quantize(
    recipe: Recipe,
    force: bool = False,
    data_dir: str | None = None,
    fmt: str = "packed",
    on_layer_done=None,
    on_start=None,
    resume: bool = False,
    streaming: str = "auto",
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
    on_refine_epoch=None,
) -> tuple[Path, dict[str, Any]]:
    """Quantize and write the checkpoint. Every finished layer is checkpointed into the work
    directory next to the output (llmquant/resume.py); `resume` continues from there, `force`
    replaces an existing output and (without `resume`) discards an unfinished run's work directory.
    on_start(total_layers, finished_layers) and on_layer_done(LayerReport) drive progress displays;
    on_refine_epoch(layer index, epoch, epochs, loss) reports the refinement's epochs (recipe `refine:`).
    `streaming` (auto|on|off): read the decoder layers from the model's files one at a time instead
    of loading the model whole (llmquant/models/streaming.py); auto streams whatever can be.
    A packed checkpoint larger than `max_shard_bytes` is written as shards with an index.
    A recipe device list (`cuda:0,cuda:1`) runs one process per device (llmquant/core/parallel.py);
    this process is rank 0 and the only one that writes."""
    # Everything that can fail cheaply fails before the model loads: the output (free, or replaceable
    # with --force: llmquant's own and holding no input; writable), the work directory, the model's
    # kind, a calibration file's windows.
    source = resolve_model_source(recipe.model)
    inputs = [path for path in (_local_path(source), _local_path(recipe.calibration.dataset)) if path is not None]
    check_output_path(recipe.output, force, inputs)
    check_work_dir(recipe.output, resume, force)
    devices = resolve_devices(recipe.device)
    device = devices[0]
    if source.kind == "dir" and is_packed_checkpoint(source.location):
        raise UserError(f"model {recipe.model}: a packed llmquant checkpoint; quantize needs the full-precision model")
    if streaming not in STREAMING_CHOICES:
        raise UserError(f"--streaming: expected one of {', '.join(STREAMING_CHOICES)}, got {streaming!r}")
    recipe = resolve_calibration_file(recipe)
    with parallel_ranks(devices, recipe, data_dir, streaming) as parallel:
        return _quantize_as_leader(
            recipe, source, inputs, device, parallel, force, data_dir, fmt, on_layer_done, on_start, resume,
            streaming, max_shard_bytes, on_refine_epoch,
        )  # fmt: skip


@dataclass
class Prepared:
    """What every rank builds before the layers run: the model, its layers, the method, the windows."""

    model: Any
    tokenizer: Any
    streamed: Any
    resolved: Any
    method: Any
    calibration: CalibrationSet
    data_free: bool
    save_dtype: torch.dtype
    seconds: dict[str, float]


def prepare(recipe: Recipe, source, device: torch.device, data_dir: str | None, streaming: str) -> Prepared:
    """Model (streamed or whole), tokenizer, layer map, method and calibration windows for `recipe`."""
    start = time.perf_counter()
    compute_dtype = resolve_dtype(recipe.dtype, device)
    streamed = None
    if streaming != "off":
        why_not = streamable(source)
        if why_not is None:
            # A data-free method (RTN, sign) runs no forward pass: nothing outside the layers is read.
            needs_outer = get_method_class(recipe.method.name).needs_calibration or recipe.refine is not None  # refine runs the layers on data
            streamed = open_streamed(source, compute_dtype, lambda m: resolve_layers(m, recipe.skip).path, needs_outer)
            why_not = None if streamed is not None else "its tensor names differ from the model's"
        if streamed is None and streaming == "on":
            raise UserError(f"--streaming on: model {recipe.model} cannot be streamed ({why_not}); use --streaming auto")
        if streamed is None:
            log.info("loading %s whole (not streamed: %s)", source.describe(), why_not)
    if streamed is not None:
        model = streamed.model  # decoder layers on the meta device until the runner reads them
        streamed.check_finite()
    else:
        model = load_pretrained(source, compute_dtype)  # on the CPU; the runner moves layers
        check_finite_weights(model, source.describe())
    tokenizer = load_tokenizer(recipe.model)
    save_dtype = resolve_save_dtype(recipe.save_dtype, source)
    resolved = resolve_layers(model, recipe.skip)
    if resolved.generic:
        log.warning(
            "no layer map for model_type %r: quantizing every nn.Linear of %s, one Hessian each",
            getattr(model.config, "model_type", None),
            resolved.path,
        )
    method_class = get_method_class(recipe.method.name)
    method = method_class(recipe.method)
    try:
        method.check_linears(resolved.shapes())  # a recipe that does not fit the model fails before any work
    except ValueError as error:
        raise UserError(f"recipe: method: {error}") from None
    loaded = time.perf_counter()
    cal = recipe.calibration
    # Refinement learns from the calibration inputs, so a data-free method (RTN) with a `refine:`
    # block loads calibration data and runs the layers like any calibrated method.
    data_free = not method_class.needs_calibration and recipe.refine is None
    if data_free:
        # RTN and sign look at the weights only: no data to load, no forward pass to run.
        log.info("%s needs no calibration data; the recipe's calibration block is not used", recipe.method.name)
        calibration = CalibrationSet(torch.zeros(0, 0, dtype=torch.int64), {"dataset": None, "used": False})
    else:
        calibration = load_or_build_calibration(cal.dataset, tokenizer, cal.nsamples, cal.seqlen, cal.seed, data_dir, cal.bos)
        check_calibration_ids(calibration, model)
    calibrated = time.perf_counter()
    seconds = {"load": loaded - start, "calibration": calibrated - loaded}
    return Prepared(model, tokenizer, streamed, resolved, method, calibration, data_free, save_dtype, seconds)


def _quantize_as_leader(
    recipe, source, inputs, device, parallel, force, data_dir, fmt, on_layer_done, on_start, resume, streaming,
    max_shard_bytes, on_refine_epoch,
) -> tuple[Path, dict[str, Any]]:
    start = time.perf_counter()
    work = None
    try:
        prepared = prepare(recipe, source, device, data_dir, streaming)
        model, tokenizer, streamed, resolved = prepared.model, prepared.tokenizer, prepared.streamed, prepared.resolved
        method, calibration, data_free, save_dtype = prepared.method, prepared.calibration, prepared.data_free, prepared.save_dtype
        if streamed is not None:
            fingerprint = make_fingerprint(recipe.settings(), streamed.identity(), calibration.windows, calibration.sha256)
            work = WorkDir.open_at(recipe.output, fingerprint, environment(device, model.dtype), resume, force)
        else:
            work = WorkDir.open(recipe, model, source.describe(), calibration, device, resume, force)
        resume_point = work.load(model, resolved, method, data_free) if resume else None
    except Exception as error:
        if work is not None:
            work.abandon()
        if parallel is not None:
            parallel.check(error)  # every rank stops, with this message
        raise
    if parallel is not None:
        parallel.check(None)
    loaded = start + prepared.seconds["load"]
    calibrated = loaded + prepared.seconds["calibration"]
    try:
        restored = resume_point.start if resume_point else 0
        if streamed is not None and resume_point is not None:
            for record in resume_point.records.values():  # in the layer files; read back when writing
                record.tensors = {}
                record.dequantized = torch.empty(record.dequantized.shape, dtype=record.dequantized.dtype, device="meta")
        if on_start:
            on_start(len(resolved.layers), restored)
        runner = SequentialRunner(
            model,
            resolved,
            method,
            device,
            getattr(torch, recipe.hessian_dtype),
            on_layer_done=on_layer_done,
            sink=work.save_layer,
            store=streamed,
            refiner=LayerRefiner(recipe.refine, learnable, on_refine_epoch) if recipe.refine is not None else None,
            parallel=parallel,
        )
        records, layers = runner.run(None if data_free else calibration.windows, resume_point)
        if parallel is not None:
            parallel.check(None)  # the other ranks are done; only this one writes
        quantized = time.perf_counter()
        summary = method.summary()
        total_params = sum(p.numel() for p in model.parameters())
        seconds = {**prepared.seconds, "quantize": quantized - calibrated}
        report = build_report(recipe, source.describe(), calibration, records, layers, total_params, seconds, summary, device)
        if parallel is not None:
            report["devices"] = [str(d) for d in resolve_devices(recipe.device)]
        report["resumed_layers"] = restored
        report["streamed"] = streamed is not None
        written_from = None
        if streamed is not None:
            # The packed linears are read back from the work directory and the plain tensors from the
            # model's files, one at a time, as the writer reaches them.
            skip = {f"{name}.weight" for name in records}
            written_from = Streamed(work.stored_linears(len(resolved.layers)), streamed.plain_tensors(skip, save_dtype), save_dtype)
        elif model.dtype != save_dtype:
            model.to(save_dtype)  # unquantized tensors only matter now; records keep their own precision
        with atomic_output_dir(recipe.output, force, inputs) as tmp:
            writing = time.perf_counter()
            # The output path is left out so that the checkpoint's bytes do not depend on where it is written.
            info = {"method": recipe.method.name, "bits": report["bits"], "recipe": recipe.settings()}
            write_checkpoint(model, tokenizer, records, tmp, fmt, info, written_from, max_shard_bytes)
            for filename, data in method.artifacts().items():
                (tmp / filename).write_text(json.dumps(data, indent=1))
            report["time_seconds"]["write"] = time.perf_counter() - writing
            report["time_seconds"]["total"] = time.perf_counter() - start
            report["peak_memory"] = peak_memory()
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2))
    except BaseException:
        work.abandon()  # kept if a layer finished (resumable), else removed
        raise
    work.remove()
    return Path(recipe.output), report


# --------------------------------------------------------------------------------------------------
# More than one device: the other ranks (llmquant/core/parallel.py)


@contextmanager
def parallel_ranks(devices: list[torch.device], recipe: Recipe, data_dir: str | None, streaming: str) -> Iterator[Parallel | None]:
    """None for one device; else ranks 1.. as spawned processes (one per further device), this
    process joined as rank 0, a watcher that ends this process with one line if another rank dies
    outside the exchanges (nothing else could wake a rank blocked in a collective), and everything
    joined and cleaned up after."""
    if len(devices) == 1:
        yield None
        return
    import tempfile
    import threading

    from llmquant.core import parallel as parallel_module

    folder = Path(tempfile.mkdtemp(prefix="llmquant-ranks-"))
    rendezvous = str(folder / "rendezvous")
    context = torch.multiprocessing.get_context("spawn")
    spec = ",".join(str(d) for d in devices)
    workers = [
        context.Process(target=_follower, args=(rank, spec, rendezvous, recipe.dump(), data_dir, streaming, torch.get_num_threads()))
        for rank in range(1, len(devices))
    ]
    for worker in workers:
        worker.start()
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(1.0):
            for rank, worker in enumerate(workers, start=1):
                if worker.exitcode not in (None, 0):
                    # An error every rank meets on its own (a Hessian with NaN in the same layer) ends
                    # rank 0 too, with its own message: give it the time to, before stopping it here.
                    if stop.wait(10.0):
                        return
                    from llmquant.ui import error_line

                    error_line(f"rank {rank} ({devices[rank]}) ended with exit code {worker.exitcode}; stopping the run")
                    os._exit(2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        parallel = parallel_module.init(0, len(devices), devices, rendezvous)
        yield parallel
    finally:
        stop.set()
        parallel_module.finish()
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
        shutil.rmtree(folder, ignore_errors=True)


def _follower(rank: int, spec: str, rendezvous: str, recipe_data: dict, data_dir: str | None, streaming: str, threads: int) -> None:
    """Rank > 0: builds what rank 0 builds and runs the same layers, quantizing its share of the
    linears; writes nothing. An error agreed on with the other ranks ends it quietly (rank 0 reports
    it); anything else is printed and ends it with exit code 1 (rank 0's watcher then stops the run)."""
    import sys

    from llmquant.core import parallel as parallel_module
    from llmquant.recipe import parse_recipe
    from llmquant.ui import setup_logging

    torch.set_num_threads(threads)
    setup_logging(quiet=True)
    devices = resolve_devices(spec)
    parallel = parallel_module.init(rank, len(devices), devices, rendezvous)
    try:
        try:
            recipe = parse_recipe(recipe_data)
            source = resolve_model_source(recipe.model)
            prepared = prepare(recipe, source, devices[rank], data_dir, streaming)
        except Exception as error:
            parallel.check(error)
            raise
        parallel.check(None)  # rank 0 prepared too (or it failed: raised here)
        runner = SequentialRunner(
            prepared.model, prepared.resolved, prepared.method, devices[rank], getattr(torch, recipe.hessian_dtype),
            store=prepared.streamed,
            refiner=LayerRefiner(recipe.refine, learnable, None) if recipe.refine is not None else None,
            parallel=parallel,
        )  # fmt: skip
        runner.run(None if prepared.data_free else prepared.calibration.windows, None)
        parallel.check(None)
    except BaseException as error:
        if not getattr(error, "agreed", False):
            print(f"rank {rank}: {type(error).__name__}: {' '.join(str(error).split())}", file=sys.stderr)
            sys.exit(1)
    finally:
        parallel_module.finish()
