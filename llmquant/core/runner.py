"""The sequential layer-by-layer runner, method-agnostic (the GPTQ reference's `llama_sequential`).

1. Capture: every decoder layer's forward is swapped for a recorder and the calibration windows run
   through the model. Only the embeddings compute; the recorders keep layer 0's input hidden states
   and each layer's real call arguments (rotary position embeddings, masks, per-layer variants such
   as Gemma3's sliding-window layers), exactly as the installed transformers passes them. Nothing is
   rebuilt by hand, so new transformers releases and architectures keep working.
2. Per decoder layer, on the compute device: run the inputs through the full-precision layer and
   accumulate one Hessian per group of linears sharing an input; give methods that ask for it a
   second pass (SliM-LLM's allocation search); quantize each linear through the method backend;
   rerun the layer with its quantized weights to produce the next layer's inputs. So layer i is
   calibrated on the outputs of the already-quantized layers 0..i-1.

The runner knows nothing about files. Resuming (llmquant/resume.py) goes through two hooks: a
`ResumePoint` (the first layer to run, the hidden states that feed it, the finished layers' records
and reports) and a `LayerSink` called after every layer with that layer's records and the hidden
states that feed the next one, before the progress callback.

Numerical guards: a Hessian with NaN/Inf, a quantized weight with NaN/Inf, or a layer whose outputs
(the next layer's inputs) hold NaN/Inf stop the run with a NumericalError naming the module. A
linear that saw no calibration tokens (an expert no token was routed to) is quantized with the
identity as its Hessian (no error feedback, i.e. round-to-nearest on the method's own grid), logged,
and reported with `tokens: 0`. Damping escalations are reported per linear (`damping`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from llmquant.core.gptq import relative_output_error
from llmquant.core.hessian import HessianAccumulator, record_damping
from llmquant.core.method import Method, Observer
from llmquant.core.record import QuantizedRecord
from llmquant.core.parallel import Parallel
from llmquant.core.refine import LayerRefiner, refine_layer
from llmquant.errors import NumericalError
from llmquant.models.layer_maps import ResolvedLayers

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the last recorder: nothing after the decoder layers is needed during capture."""


@dataclass
class LinearReport:
    name: str
    shape: tuple[int, int]
    seconds: float
    loss: float
    relative_error: float | None  # ||WX - QX||^2 / ||WX||^2 on the calibration inputs; None without data
    bits: dict[str, float]
    stats: dict[str, Any] = field(default_factory=dict)
    tokens: int = -1  # calibration tokens the linear saw; 0 = uncalibrated (identity Hessian); -1 = data-free method
    damping: float | None = None  # percdamp actually used when Cholesky needed more than asked


@dataclass
class LayerReport:
    index: int
    seconds: float
    linears: list[LinearReport]

    @property
    def mean_relative_error(self) -> float | None:
        errors = [r.relative_error for r in self.linears if r.relative_error is not None]
        return sum(errors) / len(errors) if errors else None


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class CapturedInputs:
    hidden: torch.Tensor  # [nsamples, seqlen, hidden] inputs of the current layer
    layer_kwargs: list[dict[str, Any]]  # per layer, the keyword arguments it is called with
    returns_tuple: bool  # whether decoder layers return (hidden, ...) rather than a tensor


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def capture_layer_inputs(model: nn.Module, layers: nn.ModuleList, windows: torch.Tensor) -> CapturedInputs:
    """Runs the windows through the embeddings only, recording what each decoder layer receives."""
    n_layers = len(layers)
    hidden: list[torch.Tensor] = []
    layer_kwargs: list[dict[str, Any] | None] = [None] * n_layers
    returns_tuple = False

    def recorder(index: int) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            states = args[0] if args else kwargs.pop("hidden_states")
            if args[1:]:
                raise RuntimeError("decoder layers called with extra positional arguments are not supported")
            if index == 0:
                hidden.append(states.detach())
            if layer_kwargs[index] is None:
                layer_kwargs[index] = kwargs
            if index == n_layers - 1:
                raise _StopForward
            return (states,) if returns_tuple else states

        return forward

    device = _model_device(model)
    # Layer 0 for real, once, to learn whether layers return a tensor or a tuple.
    first: dict[str, Any] = {}

    def stop_at_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
        first["hidden"] = args[0] if args else kwargs["hidden_states"]
        first["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(stop_at_first, with_kwargs=True)
    try:
        with torch.no_grad():
            model(windows[:1].to(device), use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    with torch.no_grad():
        returns_tuple = isinstance(layers[0](first["hidden"], **first["kwargs"]), tuple)

    for index, layer in enumerate(layers):
        layer.forward = recorder(index)  # instance attribute shadows the class method
    try:
        with torch.no_grad():
            for window in windows:
                try:
                    model(window.unsqueeze(0).to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        for layer in layers:
            del layer.forward
    return CapturedInputs(torch.cat(hidden, dim=0), [k or {} for k in layer_kwargs], returns_tuple)


@dataclass
class ResumePoint:
    """Where a resumed run continues: layers < start are done (their weights already hold the
    dequantized values); `inputs` are the hidden states that feed layer `start`, saved verbatim
    (recomputing them is not bit-identical); records/reports are those of the finished layers."""

    start: int
    inputs: torch.Tensor | None  # None when start == number of layers
    records: dict[str, QuantizedRecord]
    reports: list[LayerReport]


class LayerSink(Protocol):
    """Called after each layer: its report, its records (name -> record, tensors on the CPU), and the
    hidden states that feed the next layer (None after the last layer)."""

    def __call__(
        self, report: LayerReport, records: dict[str, QuantizedRecord], next_inputs: torch.Tensor | None
    ) -> None: ...


class LayerStore(Protocol):
    """Where decoder layers live between uses (streaming quantization, llmquant/models/streaming.py):
    `materialize` reads layer `index` into host memory before the runner uses it (a no-op when it
    is there), `release` hands its memory back after the sink has saved the layer's records,
    `release_outer` hands back the weights outside the layers once the layer inputs are captured."""

    def materialize(self, index: int, layer: nn.Module) -> None: ...

    def release_outer(self) -> None: ...

    def release(self, index: int, layer: nn.Module) -> None: ...


class SequentialRunner:
    """Quantizes every selected linear of every decoder layer with one method backend."""

    def __init__(
        self,
        model: nn.Module,
        resolved: ResolvedLayers,
        method: Method,
        device: torch.device,
        hessian_dtype: torch.dtype = torch.float32,
        on_layer_done: Callable[[LayerReport], None] | None = None,
        sink: LayerSink | None = None,
        store: LayerStore | None = None,
        refiner: LayerRefiner | None = None,
        parallel: Parallel | None = None,
    ):
        self.parallel = parallel  # more than one device (core/parallel.py); None: this process alone
        self.model = model
        self.resolved = resolved
        self.method = method
        self.device = device
        self.hessian_dtype = hessian_dtype
        self.on_layer_done = on_layer_done
        self.sink = sink
        self.store = store
        self.refiner = refiner

    def run(
        self, windows: torch.Tensor | None, resume: ResumePoint | None = None
    ) -> tuple[dict[str, QuantizedRecord], list[LayerReport]]:
        """`windows` None: the method needs no data (Method.needs_calibration False); no forward runs."""
        layers = self.resolved.layers
        start = resume.start if resume else 0
        records: dict[str, QuantizedRecord] = dict(resume.records) if resume else {}
        reports: list[LayerReport] = list(resume.reports) if resume else []
        if self.parallel is not None:
            # Rank 0 alone reads the work directory: the others learn where to start, and from what.
            saved = resume.inputs if resume is not None and start > 0 else None
            start, saved = self.parallel.share((start, saved) if self.parallel.leader else None, 0)
            if not self.parallel.leader and start > 0:
                resume = ResumePoint(start, saved, {}, [])
        if start >= len(layers):
            return records, reports
        if windows is None:
            self._run_data_free(start, records, reports)
            return records, reports
        if self.store is not None:
            self.store.materialize(0, layers[0])  # capture runs layer 0 once (what it returns)
        captured = capture_layer_inputs(self.model, layers, windows)
        if self.store is not None:
            self.store.release_outer()
            if start > 0:
                self.store.release(0, layers[0])
        inputs = captured.hidden.to(self.device)
        captured.hidden = None  # type: ignore[assignment]  # `inputs` is the only copy from here on
        if resume is not None and start > 0:
            assert resume.inputs is not None
            if resume.inputs.shape != inputs.shape:
                raise ValueError(f"resume: saved inputs of shape {tuple(resume.inputs.shape)}, expected {tuple(inputs.shape)}")
            inputs = resume.inputs.to(self.device, inputs.dtype)
        for index in range(start, len(layers)):
            layer = layers[index]
            begin = time.perf_counter()
            if self.store is not None:
                self.store.materialize(index, layer)
            layer.to(self.device)
            kwargs = to_device(captured.layer_kwargs[index], self.device)
            layer_records: dict[str, QuantizedRecord] = {}
            refine = None
            if self.refiner is not None:
                # The full-precision layer's outputs on this layer's (quantized-model) inputs: the
                # targets of the block-wise reconstruction.
                used = self.refiner.config.windows or inputs.shape[0]
                targets = self._forward(layer, inputs[:used], kwargs, captured.returns_tuple)
                refine = (targets, captured.returns_tuple)
            linear_reports = self._quantize_layer(index, layer, inputs, kwargs, layer_records, refine)
            refine = None
            inputs = self._forward(layer, inputs, kwargs, captured.returns_tuple)
            if self.parallel is not None:  # every rank goes on from rank 0's exact hidden states
                inputs = self.parallel.share_tensor(inputs.contiguous(), 0)
            last = index == len(layers) - 1
            if not last and not bool(torch.isfinite(inputs).all()):
                raise NumericalError(
                    f"{self.resolved.path}.{index}: the layer's outputs (the next layer's inputs) contain NaN/Inf "
                    "(an activation overflowed?); compute in float32 (`--set dtype=float32`)"
                )
            if self.device.type != "cpu":
                layer.to("cpu")
            prefix = f"{self.resolved.path}.{index}."
            for name, record in layer_records.items():
                # The records keep the model's own (CPU) weight tensor, not the compute-device copy.
                record.dequantized = layer.get_submodule(name.removeprefix(prefix)).weight.data
            self._finish_layer(index, begin, linear_reports, layer_records, None if last else inputs, records, reports)
            self._release(index, layer, layer_records)
        return records, reports

    def _release(self, index: int, layer: nn.Module, layer_records: dict[str, QuantizedRecord]) -> None:
        """Streaming: after the sink saved the layer, its weights and its records' tensors leave
        memory; the records keep their figures and a meta-device stand-in of the weight's shape."""
        if self.store is None:
            return
        for record in layer_records.values():
            record.dequantized = torch.empty(record.dequantized.shape, dtype=record.dequantized.dtype, device="meta")
            record.tensors = {}
        self.store.release(index, layer)

    def _finish_layer(
        self,
        index: int,
        begin: float,
        linear_reports: list[LinearReport],
        layer_records: dict[str, QuantizedRecord],
        next_inputs: torch.Tensor | None,
        records: dict[str, QuantizedRecord],
        reports: list[LayerReport],
    ) -> None:
        """The end of every layer, with or without data: collect, hand to the sink, report progress."""
        records.update(layer_records)
        report = LayerReport(index, time.perf_counter() - begin, linear_reports)
        reports.append(report)
        if self.sink:
            self.sink(report, layer_records, next_inputs)
        if self.on_layer_done:
            self.on_layer_done(report)

    @torch.no_grad()
    def _run_data_free(self, start: int, records: dict[str, QuantizedRecord], reports: list[LayerReport]) -> None:
        """Every selected linear through the method with hessian=None, layer by layer (so progress,
        checkpointing and resuming work as for calibrated methods)."""
        layers = self.resolved.layers
        for index in range(start, len(layers)):
            begin = time.perf_counter()
            prefix = f"{self.resolved.path}.{index}."
            layer_records: dict[str, QuantizedRecord] = {}
            linear_reports = []
            if self.store is not None:
                self.store.materialize(index, layers[index])
            for name in (n for group in self.resolved.groups[index] for n in group):
                module = layers[index].get_submodule(name)
                t0 = time.perf_counter()
                weight = module.weight.detach().to(self.device, torch.float32, copy=True)
                record = self.method.quantize(prefix + name, weight, None)
                _install(prefix + name, module, record)
                layer_records[prefix + name] = record
                linear_reports.append(
                    LinearReport(
                        prefix + name, tuple(weight.shape), time.perf_counter() - t0, record.loss, None,
                        record.bits.as_dict(), record.stats,
                    )
                )  # fmt: skip
            self._finish_layer(index, begin, linear_reports, layer_records, None, records, reports)
            self._release(index, layers[index], layer_records)

    @torch.no_grad()
    def _forward(self, layer: nn.Module, inputs: torch.Tensor, kwargs: dict, returns_tuple: bool) -> torch.Tensor:
        outputs = torch.empty_like(inputs)
        for s in range(inputs.shape[0]):
            out = layer(inputs[s : s + 1], **kwargs)
            outputs[s : s + 1] = out[0] if returns_tuple else out
        return outputs

    @torch.no_grad()
    def _quantize_layer(
        self,
        index: int,
        layer: nn.Module,
        inputs: torch.Tensor,
        kwargs: dict,
        records: dict[str, QuantizedRecord],
        refine: tuple[torch.Tensor, bool] | None = None,
    ) -> list[LinearReport]:
        prefix = f"{self.resolved.path}.{index}."
        groups = self.resolved.groups[index]
        modules: dict[str, nn.Linear] = {n: layer.get_submodule(n) for g in groups for n in g}  # type: ignore[misc]

        # Pass 1: Hessians, one per group of linears that read the same input.
        accumulators = {}
        captures = []
        for group in groups:
            first = modules[group[0]]
            acc = HessianAccumulator(first.in_features, self.device, self.hessian_dtype)
            accumulators[tuple(group)] = acc
            captures.append((first, acc.add_batch))
        accumulate_linear_inputs(layer, inputs, kwargs, captures)
        # One H per group, shared by its linears (every consumer below gets its own clone or only reads)
        hessians = {n: accumulators[tuple(g)].finalize(prefix + g[0]) for g in groups for n in g}
        tokens = {n: accumulators[tuple(g)].tokens for g in groups for n in g}
        for group in groups:
            acc = accumulators[tuple(group)]
            if acc.tokens == 0:
                # No data: the identity makes every method fall back to its grid without error
                # feedback (GPTQ-style updates vanish), instead of treating all columns as dead.
                log.warning(
                    "%s: saw no calibration tokens; quantized without calibration (identity Hessian)",
                    ", ".join(prefix + n for n in group),
                )
                identity = torch.eye(acc.columns, device=self.device, dtype=self.hessian_dtype)
                for n in group:
                    hessians[n] = identity.clone()

        # With more than one device, linear number i of the layer is this rank's if owner(i) is it.
        parallel = self.parallel
        mine = {n for i, n in enumerate(modules) if parallel is None or parallel.owner(i) == parallel.rank}

        # Pass 2, only for methods that ask: per-sequence inputs and full-precision outputs.
        observers: dict[str, Observer] = {}
        damping: dict[str, list[tuple[str, float, float]]] = {n: [] for n in modules}
        for name, module in modules.items():
            if name not in mine:
                continue
            with record_damping() as seen:
                obs = self.method.observer(prefix + name, module.weight.detach().float().clone(), hessians[name].clone())
            damping[name] += seen
            if obs is not None:
                observers[name] = obs
        if observers:
            hooks = [(modules[n], _feed(obs)) for n, obs in observers.items()]
            _run_with_hooks(layer, inputs, kwargs, hooks)

        # Quantize every linear (this rank's, with several devices) with its own copy of W and H.
        by_name: dict[str, LinearReport] = {}
        fp_weights: dict[str, torch.Tensor] = {}
        failure: BaseException | None = None
        for name, module in modules.items():
            if name not in mine and refine is None:
                continue
            weight = module.weight.detach().float().clone()
            if refine is not None:
                fp_weights[name] = weight  # every rank: rank 0 refines every linear
            if name not in mine:
                continue
            t0 = time.perf_counter()
            hessian = hessians[name]
            try:
                with record_damping() as seen:
                    record = self.method.quantize(prefix + name, weight.clone(), hessian.clone(), observers.get(name))
                damping[name] += seen
                computed = _install(prefix + name, module, record)
            except Exception as error:  # with other ranks waiting, every rank must learn of it (below)
                if parallel is None:
                    raise
                failure = error
                break
            relative = relative_output_error(weight, computed, hessian)
            seconds = time.perf_counter() - t0
            records[prefix + name] = record
            by_name[name] = LinearReport(
                prefix + name,
                tuple(weight.shape),
                seconds,
                record.loss,
                relative,
                record.bits.as_dict(),
                record.stats,
                tokens=tokens[name],
                damping=max((used for _, _, used in damping[name]), default=None),
            )
        if parallel is not None:
            parallel.check(failure)
            for position, (name, module) in enumerate(modules.items()):
                self._exchange(parallel, parallel.owner(position), prefix + name, module, records, by_name, name)
        reports = [by_name[name] for name in modules]
        if refine is not None:
            if parallel is None or parallel.leader:
                self._refine_layer(index, layer, inputs, kwargs, refine, modules, fp_weights, hessians, records, reports)
            if parallel is not None:  # rank 0 refined; everyone installs its records
                reports = [self._exchange(parallel, 0, prefix + n, m, records, by_name, n) for n, m in modules.items()]
        return reports

    def _exchange(
        self,
        parallel: Parallel,
        src: int,
        full_name: str,
        module: nn.Module,
        records: dict[str, QuantizedRecord],
        by_name: dict[str, LinearReport],
        name: str,
    ) -> LinearReport:
        """One linear's record and report from rank `src` to every rank: installed in the model, kept
        in `records`, and (on the ranks that did not compute it) handed to the method's `restore`, as
        a resume does, so its cross-linear state (SliM-LLM's allocation) is complete on rank 0."""
        record, report = parallel.share((records[full_name], by_name[name]) if parallel.rank == src else None, src)
        if parallel.rank != src:
            _install(full_name, module, record)
            records[full_name] = record
            self.method.restore(full_name, record)
            by_name[name] = report
        return by_name[name]

    def _refine_layer(
        self,
        index: int,
        layer: nn.Module,
        inputs: torch.Tensor,
        kwargs: dict,
        refine: tuple[torch.Tensor, bool],
        modules: dict[str, nn.Linear],
        fp_weights: dict[str, torch.Tensor],
        hessians: dict[str, torch.Tensor],
        records: dict[str, QuantizedRecord],
        reports: list[LinearReport],
    ) -> None:
        """The refinement engine on the layer just quantized (llmquant/core/refine.py): installs the
        records it kept and updates their reports (output error, bits, stats["refine"])."""
        assert self.refiner is not None
        targets, returns_tuple = refine
        prefix = f"{self.resolved.path}.{index}."
        refiner = self.refiner
        on_epoch = None
        if refiner.on_epoch is not None:
            callback = refiner.on_epoch

            def on_epoch(epoch: int, epochs: int, loss: float) -> None:
                callback(index, epoch, epochs, loss)

        local = {name: records[prefix + name] for name in modules}
        result = refine_layer(
            layer, local, fp_weights, inputs, targets, kwargs, returns_tuple, refiner.config, refiner.factory, index, on_epoch
        )
        by_name = {r.name: r for r in reports}
        for name, module in modules.items():
            report = by_name[prefix + name]
            record = result.records.get(name)
            if record is not None:
                computed = _install(prefix + name, module, record)
                records[prefix + name] = record
                report.relative_error = relative_output_error(fp_weights[name], computed, hessians[name])
                report.bits = record.bits.as_dict()
                report.stats = dict(record.stats)
            report.stats["refine"] = {**result.stats(), "refined": record is not None}


def _install(name: str, module: nn.Module, record: QuantizedRecord) -> torch.Tensor:
    """Puts a record's weight into the model: checks it is finite, copies it into the linear, and
    keeps the record's tensors on the CPU with the model's weight as its dequantized values.
    Returns the method's own dequantized weight (float32, for the output-error figure)."""
    if not bool(torch.isfinite(record.dequantized).all()):
        raise NumericalError(f"{name}: the quantized weight contains NaN/Inf (a weight or scale out of float16 range?)")
    computed = record.dequantized
    module.weight.data.copy_(computed.to(module.weight.device, module.weight.dtype))
    record.tensors = {k: v.cpu() for k, v in record.tensors.items()}
    record.dequantized = module.weight.data
    return computed


def _feed(observer: Observer) -> Callable:
    """A forward hook handing a linear's (input, full-precision output) to an observer, per sequence."""

    def hook(module: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        x = inp[0].reshape(-1, inp[0].shape[-1]).float()
        observer.update(x, out.reshape(-1, out.shape[-1]).float())

    return hook


@torch.no_grad()
def accumulate_linear_inputs(
    layer: nn.Module, inputs: torch.Tensor, kwargs: dict, captures: list[tuple[nn.Module, Callable[[torch.Tensor], None]]]
) -> None:
    """Hands each module's input to its function (a Hessian accumulator), for every calibration sequence.

    Nothing after the last captured input is needed, so once every module has been seen the rest
    of the layer is skipped (in a LLaMA layer: the down_proj product and the residual add, a quarter
    of the layer's weights). That only holds if each module runs once per forward: the first
    sequence runs in full and counts the calls; a module called more or less often (shared
    weights, an expert no token reached) keeps every later sequence running in full too."""
    calls = {id(module): 0 for module, _ in captures}
    stop_early = [False]

    def hook_for(fn: Callable[[torch.Tensor], None]) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs_: dict) -> None:
            fn(args[0] if args else kwargs_["input"])
            calls[id(module)] += 1
            if stop_early[0] and all(count == 1 for count in calls.values()):
                raise _StopForward

        return hook

    handles = [module.register_forward_pre_hook(hook_for(fn), with_kwargs=True) for module, fn in captures]
    try:
        for s in range(inputs.shape[0]):
            for key in calls:
                calls[key] = 0
            try:
                layer(inputs[s : s + 1], **kwargs)
            except _StopForward:
                pass
            if s == 0:
                stop_early[0] = all(count == 1 for count in calls.values())
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def _run_with_hooks(layer: nn.Module, inputs: torch.Tensor, kwargs: dict, hooks: list[tuple[nn.Module, Callable]]) -> None:
    """Runs every calibration sequence through `layer` with temporary forward hooks."""
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        for s in range(inputs.shape[0]):
            layer(inputs[s : s + 1], **kwargs)
    finally:
        for handle in handles:
            handle.remove()
