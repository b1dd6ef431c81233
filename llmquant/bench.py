"""`llmquant bench`: size, memory and speed of models and their baseline, side by side, in one process.

Phase 1, for each model, one after another (the baseline first), in the same process and on the
same device:

- size: parameter count (a packed linear counts its rows x columns, so a packed model and its fp
  original have the same count), bytes on disk (every *.safetensors in the directory; the file for a
  .gguf), the three bit figures (config.json `quantization_config` of a packed checkpoint, else
  `llmquant.json`, else the stored dtype's width for a plain checkpoint);
- load: wall time of `load_model` + moving to the device + choosing the backend, measured after a
  throwaway load of the same model (so imports, first-use initialisation and a cold page cache are
  charged to no model: every load is a warm one);
- memory: RSS before loading, after loading, and the peak while loading and warming it up (Linux: the
  kernel's peak-RSS counter, reset before each model through /proc/self/clear_refs; elsewhere the
  process peak, which then includes every earlier model); the exact bytes of the model's tensors;
  on CUDA the allocator's peak;
- warm-up: `warmup` unmeasured repetitions (the full prefill and at most WARMUP_DECODE_STEPS decode
  steps: every step runs the same code).

Phase 2, the timing, in `repeats` rounds (after one unmeasured baseline repetition, when there is a
warm-up: a GPU lowers its clocks while phase 1 loads models): each round times one repetition of
the baseline and then of every model; a closing baseline repetition ends the last round. Per model the median, min and max
over its repetitions are reported. The speed ratios do not divide two medians taken minutes apart:
each repetition of a model is divided by the baseline's speed at that moment, interpolated between
the baseline repetitions that bracket it, and the median of those paired ratios is reported. On a
shared or thermally throttled machine the speed drifts by tens of percent over a long run (the
session that wrote this saw 25% on this project's 2-core CPU); pairing cancels drift slower than a
round. Models stay loaded between rounds while memory allows (else each is reloaded, unmeasured).

What a repetition times:
- prefill: one forward of a fixed `prompt_tokens`-token prompt with a KV cache (logits of the last
  position only, as generation does);
- decode: greedy generation with `use_cache=True`, batch 1, from the first `decode_prompt_tokens`
  tokens of the same prompt; the time of exactly `new_tokens` decode steps is measured, from the
  first generated token (which the prompt's forward produces) to the last.

Size and memory ratios are model / baseline. Packed models run through QuantizedLinear with
the "torch-cached" backend by default (each weight decoded once, then kept: the speed of the
dequantized model at the memory of an unpacked one); `backend="torch"` decodes on every forward.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmquant.errors import UserError
from llmquant.formats.checkpoint import CONFIG_FILE, REPORT_FILE, is_packed_checkpoint
from llmquant.provenance import (
    current_rss,
    device_name,
    peak_rss,
    process_peak_rss,
    release_memory,
    reset_peak_rss,
    versions,
)

log = logging.getLogger(__name__)

# The fixed prompt: plain prose, repeated until it is long enough for the tokenizer at hand.
BENCH_TEXT = (
    "The history of the river valley is written in its stones. Long before the first farmers cut terraces "
    "into the hillsides, the water carried sand and gravel from the mountains and laid them down in broad "
    "fans where the current slowed. Each flood added a layer, and each dry season let the grasses take "
    "root again. When people arrived they found fertile soil, fish in the shallows and timber on the "
    "slopes, and they built their houses above the highest mark the water had left on the cliffs."
)


@dataclass(frozen=True)
class BenchSettings:
    prompt_tokens: int = 512
    new_tokens: int = 128
    decode_prompt_tokens: int = 16
    warmup: int = 1
    repeats: int = 3
    # Packed linears: auto = the Triton kernels on CUDA, the packed PyTorch reference ("torch",
    # packed memory) elsewhere; "torch-cached" decodes each weight once and keeps it (dense memory).
    backend: str = "auto"
    dtype: str = "auto"
    load_warmup: bool = True  # load (and free) each model once before its measured load
    static_cache: bool = False  # decode with a static KV cache and our own greedy loop (static_decode)
    cuda_graphs: bool = False  # ... with the one-token step captured in a CUDA graph (implies static_cache)

    def check(self) -> None:
        for name in ("prompt_tokens", "new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')}: must be at least 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise UserError(f"--warmup: must be 0 or more, got {self.warmup}")
        from llmquant.runtime.qlinear import BACKEND_CHOICES, available_backends

        if self.backend not in {*BACKEND_CHOICES, *available_backends()}:
            raise UserError(f"--backend: expected one of {', '.join(BACKEND_CHOICES)}, got {self.backend!r}")


# --------------------------------------------------------------------------------------------------
# Memory


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once: tied weights count once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (tensor.device, tensor.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def decoded_cache_bytes(model: nn.Module) -> int:
    """Bytes the backends of packed linears keep beside the stored tensors: the torch-cached
    backend's decoded weights, the triton backend's index tables."""
    from llmquant.runtime.qlinear import QuantizedLinear

    return sum(t.nbytes for m in model.modules() if isinstance(m, QuantizedLinear) for t in m.cache_tensors())


def count_parameters(model: nn.Module) -> int:
    """Parameters of the model as a full-precision model would count them: a packed linear counts
    rows x columns (its bias is a parameter already); tied weights count once."""
    from llmquant.runtime.qlinear import QuantizedLinear

    plain = sum(p.numel() for p in model.parameters())
    packed = sum(m.out_features * m.in_features for m in model.modules() if isinstance(m, QuantizedLinear))
    return plain + packed


# --------------------------------------------------------------------------------------------------
# What is on disk


def checkpoint_info(source) -> dict[str, Any]:
    """Bits (with where they come from), method and quantization cost, from the files alone."""
    info: dict[str, Any] = {"bits": None, "bits_source": None, "method": None, "quantize": None}
    if source.kind != "dir":
        return info
    directory = Path(source.location)
    config = _read_json(directory / CONFIG_FILE) or {}
    report = _read_json(directory / REPORT_FILE)
    quantization = config.get("quantization_config")
    if is_packed_checkpoint(directory) and isinstance(quantization, dict):
        info["bits"], info["bits_source"] = quantization.get("bits"), "quantization_config"
        info["method"] = (quantization.get("info") or {}).get("method")
    elif isinstance(report, dict) and isinstance(report.get("bits"), dict):
        info["bits"], info["bits_source"] = report["bits"], "llmquant.json"
    else:
        dtype = config.get("dtype") or config.get("torch_dtype")
        width = {"float16": 16, "bfloat16": 16, "float32": 32, "float64": 64}.get(str(dtype))
        if width is not None:
            info["bits"], info["bits_source"] = {"paper": width, "code": width, "storage": width}, f"dtype {dtype}"
    if isinstance(report, dict):
        info["method"] = info["method"] or report.get("method")
        info["quantize"] = {"time_seconds": report.get("time_seconds"), "peak_memory": report.get("peak_memory")}
    return info


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------
# Timing


def summarize(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": list(values)}


def fixed_prompt(tokenizer, tokens: int) -> torch.Tensor:
    """The first `tokens` token ids of BENCH_TEXT (repeated as needed), shape [1, tokens]."""
    text = BENCH_TEXT
    ids = tokenizer(text).input_ids
    while len(ids) < tokens:
        text = f"{text} {BENCH_TEXT}"
        ids = tokenizer(text).input_ids
    return torch.tensor([ids[:tokens]], dtype=torch.long)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_keyword(model: nn.Module) -> str:
    """transformers 5.x names the KV-cache argument `cache` (and deprecates `past_key_values`)."""
    import inspect

    try:
        return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    except (TypeError, ValueError):
        return "past_key_values"


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@torch.inference_mode()
def time_prefill(model: nn.Module, prompt: torch.Tensor, device: torch.device) -> float:
    extra = {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    _synchronize(device)
    start = time.perf_counter()
    model(prompt, use_cache=True, **extra)
    _synchronize(device)
    return time.perf_counter() - start


@torch.inference_mode()
def time_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device, pad_token_id: int) -> float:
    """Seconds for exactly `new_tokens` greedy decode steps (after the first generated token)."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):  # called once per generated token
            _synchronize(device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    total = new_tokens + 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the model's sampling defaults do not apply to greedy decoding
        output = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=total,
            min_new_tokens=total,  # never stop at an end-of-sequence token
            do_sample=False,
            num_beams=1,
            use_cache=True,
            pad_token_id=pad_token_id,
            stopping_criteria=StoppingCriteriaList([Stamp()]),
        )
    generated = output.shape[1] - prompt.shape[1]
    if generated != total or len(stamps) != total:
        raise RuntimeError(f"decode: generated {generated} tokens ({len(stamps)} steps seen), expected {total}")
    return stamps[-1] - stamps[0]


@torch.inference_mode()
def static_decode(
    model: nn.Module, prompt: torch.Tensor, new_tokens: int, device: torch.device, graphs: bool
) -> tuple[float, torch.Tensor]:
    """Greedy decoding with a static KV cache: (seconds for `new_tokens` steps after the first
    generated token, the generated ids [1, new_tokens + 1]).

    With `graphs` (CUDA), the one-token step is captured once in a CUDA graph and replayed, so the
    time is the GPU's, not Python's: what a serving engine does, and the only fair way to compare
    low-bit kernels with cuBLAS at batch 1. The same loop runs the baseline and the packed model."""
    from transformers import StaticCache

    length = prompt.shape[1]
    cache = StaticCache(config=model.config, max_cache_len=length + new_tokens + 2)
    cache_arg = _cache_keyword(model)
    positions = torch.arange(length, device=device)
    logits = model(prompt, **{cache_arg: cache}, cache_position=positions, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    generated = [token]
    step_token, step_position = token.clone(), torch.tensor([length], device=device)

    def step() -> torch.Tensor:
        return model(step_token, **{cache_arg: cache}, cache_position=step_position, use_cache=True).logits

    if graphs:
        # Warm up on a side stream (first-use work: kernel compilation, index tables), then capture.
        # The warm-up steps write the KV slot of position `length`, which the first replay rewrites.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                step()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_logits = step()
        run = lambda: (graph.replay(), graph_logits)[1]  # noqa: E731
    else:
        run = step
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = run()
        token = logits[:, -1:].argmax(-1)
        generated.append(token)
        step_token.copy_(token)
        step_position += 1
    _synchronize(device)
    return time.perf_counter() - start, torch.cat(generated, dim=1)


# --------------------------------------------------------------------------------------------------
# Loading and warming up each model, then the timing rounds


# The warm-up's decode runs this many steps at most: every step runs the same code, so a few steps
# trigger every first-use cost (the torch-cached decode of each weight happens at the first forward).
WARMUP_DECODE_STEPS = 16


@dataclass
class _Slot:
    """One model of the run: its record (filled in phase 1), its prompts, and the model while resident."""

    spec: str
    record: dict[str, Any]
    prompt: torch.Tensor
    decode_prompt: torch.Tensor
    pad: int
    model: nn.Module | None
    prefill: list[float]
    decode: list[float]
    stamps: list[float]  # perf_counter at the middle of each measured repetition


def _load(spec: str, settings: BenchSettings, device: torch.device):
    from llmquant.runtime.loader import load_model
    from llmquant.runtime.qlinear import set_backend

    model, tokenizer, source = load_model(spec, settings.dtype, str(device))
    model.to(device)
    packed_linears = set_backend(model, settings.backend)  # resolved by run_bench
    _synchronize(device)
    return model, tokenizer, source, packed_linears


def _free_memory(device: torch.device) -> int | None:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - unknown: never keep models resident
        return None


def prepare(spec: str, settings: BenchSettings, device: torch.device, on_step: Callable[[str], None]) -> _Slot:
    """Phase 1 for one model: load it (timed, after a throwaway load), measure its memory, and warm it
    up; returns its slot with the model still loaded."""
    from llmquant.models.loading import resolve_model_source

    source = resolve_model_source(spec)
    if settings.load_warmup:
        # A throwaway load first: imports, first-use initialisation and a cold page cache are then
        # charged to no model, whichever is measured first.
        on_step(f"warm-up load of {source.describe()}")
        warm = _load(spec, settings, device)[0]
        del warm
    release_memory()
    scoped = reset_peak_rss()
    rss_before = current_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    on_step(f"loading {source.describe()}")
    start = time.perf_counter()
    model, tokenizer, source, packed_linears = _load(spec, settings, device)
    load_seconds = time.perf_counter() - start
    rss_loaded = current_rss()
    loaded_bytes = tensor_bytes(model)
    cuda_loaded = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else None

    prompt = fixed_prompt(tokenizer, settings.prompt_tokens).to(device)
    decode_prompt = prompt[:, : min(settings.decode_prompt_tokens, settings.prompt_tokens)]
    limit = getattr(model.config, "max_position_embeddings", None)
    longest = max(prompt.shape[1], decode_prompt.shape[1] + settings.new_tokens + 1)
    if isinstance(limit, int) and longest > limit:
        raise UserError(f"{source.describe()}: the benchmark needs {longest} positions, the model has {limit}")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    pad = pad if pad is not None else 0
    slot = _Slot(spec, {}, prompt, decode_prompt, pad, model, [], [], [])
    for run in range(settings.warmup):
        on_step(f"{Path(source.describe()).name}: warm-up {run + 1}/{settings.warmup}")
        _warm_up(slot, model, WARMUP_DECODE_STEPS, settings, device)

    from llmquant.runtime.qlinear import QuantizedLinear

    # Linears whose kernel the device refused during the warm-up run on the reference backend
    # instead (runtime/kernels.py); their speed is not the chosen backend's.
    fell_back = sum(1 for m in model.modules() if isinstance(m, QuantizedLinear) and m.backend != settings.backend)
    peak = peak_rss() if scoped else None
    memory = {
        "rss_before_load_bytes": rss_before,
        "rss_after_load_bytes": rss_loaded,
        "load_rss_delta_bytes": rss_loaded - rss_before,
        "rss_after_warmup_bytes": current_rss(),
        "peak_rss_bytes": peak if peak is not None else process_peak_rss(),
        "peak_rss_scope": "model" if peak is not None else "process",
        "tensor_bytes": loaded_bytes,
        "decoded_cache_bytes": decoded_cache_bytes(model),
    }
    memory["peak_rss_delta_bytes"] = memory["peak_rss_bytes"] - rss_before
    if device.type == "cuda":
        memory["cuda_after_load_bytes"] = cuda_loaded
        memory["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
    files = source.files((".safetensors",))
    record = {
        "model": source.describe(),
        "name": Path(source.describe()).name,
        "dtype": str(model.dtype).removeprefix("torch."),
        "parameters": count_parameters(model),
        "bytes_on_disk": sum(path.stat().st_size for path in files) if files else None,
        "files": [path.name for path in files],
        **checkpoint_info(source),
        "packed_linears": packed_linears,
        "backend": settings.backend if packed_linears else None,
        "backend_fallbacks": fell_back,
        "load_seconds": load_seconds,
        "memory": memory,
    }
    slot.record = record
    return slot


def _warm_up(slot: _Slot, model: nn.Module, decode_steps: int, settings: BenchSettings, device: torch.device) -> None:
    """An unmeasured repetition: the full prefill and at most `decode_steps` decode steps."""
    time_prefill(model, slot.prompt, device)
    _decode(model, slot, min(settings.new_tokens, decode_steps), settings, device)


def _decode(model: nn.Module, slot: _Slot, steps: int, settings: BenchSettings, device: torch.device) -> float:
    if settings.static_cache or settings.cuda_graphs:
        return static_decode(model, slot.decode_prompt, steps, device, graphs=settings.cuda_graphs)[0]
    return time_decode(model, slot.decode_prompt, steps, device, slot.pad)


def _model_of(slot: _Slot, settings: BenchSettings, device: torch.device) -> nn.Module:
    """The slot's resident model, or a fresh load of it, warmed up unmeasured (first-use costs)."""
    if slot.model is not None:
        return slot.model
    model = _load(slot.spec, settings, device)[0]
    _warm_up(slot, model, WARMUP_DECODE_STEPS, settings, device)
    return model


def time_once(slot: _Slot, settings: BenchSettings, device: torch.device) -> None:
    """One measured repetition (prefill, then decode) of a slot, reloading its model if it was freed."""
    model = _model_of(slot, settings, device)
    start = time.perf_counter()
    slot.prefill.append(time_prefill(model, slot.prompt, device))
    slot.decode.append(_decode(model, slot, settings.new_tokens, settings, device))
    slot.stamps.append((start + time.perf_counter()) / 2)
    if slot.model is None:
        del model
        release_memory()


def _rewarm(slot: _Slot, settings: BenchSettings, device: torch.device) -> None:
    """One unmeasured full-length repetition (before the rounds: brings a GPU's clocks back up)."""
    model = _model_of(slot, settings, device)
    _warm_up(slot, model, settings.new_tokens, settings, device)
    if slot.model is None:
        del model
        release_memory()


def finish_record(slot: _Slot, settings: BenchSettings) -> dict[str, Any]:
    record = slot.record
    tokens = slot.prompt.shape[1]
    record["prefill"] = {
        "tokens": tokens,
        "seconds": summarize(slot.prefill),
        "tokens_per_second": summarize([tokens / s for s in slot.prefill]),
    }
    record["decode"] = {
        "tokens": settings.new_tokens,
        "prompt_tokens": slot.decode_prompt.shape[1],
        "seconds": summarize(slot.decode),
        "tokens_per_second": summarize([settings.new_tokens / s for s in slot.decode]),
    }
    return record


def paired_ratios(slot: _Slot, baseline: _Slot) -> dict[str, list[float]]:
    """Per repetition of `slot`: its tokens/s over the baseline's at the same moment, linearly
    interpolated between the baseline repetitions that bracket it (the baseline opens every round
    and closes the last), so that a machine getting faster or slower during the run cancels out."""
    out: dict[str, list[float]] = {"prefill": [], "decode": []}
    for kind in ("prefill", "decode"):
        mine, theirs = getattr(slot, kind), getattr(baseline, kind)
        for stamp, seconds in zip(slot.stamps, mine):
            after = next((i for i, t in enumerate(baseline.stamps) if t >= stamp), len(baseline.stamps) - 1)
            before = max(after - 1, 0)
            t0, t1 = baseline.stamps[before], baseline.stamps[after]
            w = 0.0 if t1 == t0 else min(max((stamp - t0) / (t1 - t0), 0.0), 1.0)
            base_seconds = theirs[before] * (1 - w) + theirs[after] * w
            out[kind].append(base_seconds / seconds)  # tokens/s ratio = inverse time ratio (same token counts)
    return out


RATIOS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "parameters": lambda r: r["parameters"],
    "bytes_on_disk": lambda r: r["bytes_on_disk"],
    "tensor_bytes": lambda r: r["memory"]["tensor_bytes"],
    "load_seconds": lambda r: r["load_seconds"],
    "load_rss_delta_bytes": lambda r: r["memory"]["load_rss_delta_bytes"],
    "peak_rss_delta_bytes": lambda r: r["memory"]["peak_rss_delta_bytes"],
}


def ratios(model: dict[str, Any], baseline: dict[str, Any], paired: dict[str, list[float]]) -> dict[str, float | None]:
    """model / baseline for each figure in RATIOS (None where either side is missing or the baseline
    is 0); the speed ratios are the medians of the paired per-repetition ratios."""
    out: dict[str, float | None] = {}
    for name, get in RATIOS.items():
        mine, theirs = get(model), get(baseline)
        out[name] = mine / theirs if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and theirs > 0 else None
    out["prefill_tokens_per_second"] = statistics.median(paired["prefill"])
    out["decode_tokens_per_second"] = statistics.median(paired["decode"])
    return out


def run_bench(
    models: list[str],
    baseline: str | None = None,
    settings: BenchSettings | None = None,
    device: str = "auto",
    on_step: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure the baseline (if any) and each model in this process; returns the JSON report.

    Phase 1, one model after another (baseline first): load, memory, warm-up; the model stays
    resident while the free memory after it is at least twice its tensors (else it is freed and
    reloaded for each of its repetitions). Phase 2: `repeats` rounds, each timing one repetition of
    the baseline and then of every model, and a closing baseline repetition; speed ratios pair each
    repetition with the baseline's at the same moment (paired_ratios)."""
    from llmquant.devices import resolve_device
    from llmquant.models.loading import context_length, resolve_model_source

    from dataclasses import replace

    from llmquant.runtime.qlinear import resolve_backend

    settings = settings or BenchSettings()
    settings.check()
    target = resolve_device(device)
    if settings.cuda_graphs and target.type != "cuda":
        raise UserError(f"--cuda-graphs: needs a CUDA device, the benchmark runs on {target}")
    settings = replace(settings, backend=resolve_backend(settings.backend, target))
    step = on_step or (lambda _msg: None)
    specs = [*([baseline] if baseline else []), *models]
    longest = max(settings.prompt_tokens, min(settings.decode_prompt_tokens, settings.prompt_tokens) + settings.new_tokens + 1)
    for spec in specs:
        source = resolve_model_source(spec)  # a wrong path fails before anything loads
        limit = context_length(source)  # and so does a benchmark longer than the model's context
        if limit is not None and longest > limit:
            raise UserError(
                f"{source.describe()}: the benchmark needs {longest} positions (--prompt-tokens {settings.prompt_tokens}, "
                f"--new-tokens {settings.new_tokens}), the model has {limit}"
            )
    report: dict[str, Any] = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": str(target),
        "device_name": device_name(target),
        "threads": torch.get_num_threads(),
        "settings": asdict(settings),
        "order": (
            "load + warm-up of each model in turn (baseline first); then rounds of one repetition of the baseline "
            "and of every model, and a closing baseline repetition; speed ratios paired per repetition"
        ),
        "versions": versions(),
        "baseline": None,
        "models": [],
    }
    slots: list[_Slot] = []
    for spec in specs:
        slot = prepare(spec, settings, target, step)
        free = _free_memory(target)
        footprint = slot.record["memory"]["tensor_bytes"] + slot.record["memory"]["decoded_cache_bytes"]
        if free is None or free < 2 * footprint:
            slot.model = None
            release_memory()
        slot.record["resident_during_rounds"] = slot.model is not None
        slots.append(slot)
    if baseline and settings.warmup:
        # Phase 1 left the device idle while models loaded: a GPU drops its clocks meanwhile (on an
        # H100 here, the first timed repetition after loading ran at a third of the speed). One
        # unmeasured baseline repetition brings it back before the first bracketing measurement.
        step("re-warming the device with the baseline")
        _rewarm(slots[0], settings, target)
    for round_index in range(settings.repeats):
        for slot in slots:
            step(f"round {round_index + 1}/{settings.repeats}: {slot.record['name']}")
            time_once(slot, settings, target)
    if baseline:
        step("closing baseline repetition")
        time_once(slots[0], settings, target)
    records = [finish_record(slot, settings) for slot in slots]
    if baseline:
        report["baseline"] = records[0]
        for slot, record in zip(slots[1:], records[1:]):
            paired = paired_ratios(slot, slots[0])
            record["paired_speed_ratios"] = paired
            record["ratios"] = ratios(record, records[0], paired)
            report["models"].append(record)
    else:
        for record in records:
            record["ratios"] = None
            report["models"].append(record)
    for slot in slots:
        slot.model = None
    release_memory()
    return report


# --------------------------------------------------------------------------------------------------
# Human-readable report


def _mib(value: int | None) -> str:
    return "—" if value is None else f"{value / 2**20:.1f} MiB"


def _bits(bits: dict[str, Any] | None) -> str:
    if not bits:
        return "—"
    return "/".join(f"{bits[k]:g}" if float(bits[k]).is_integer() else f"{bits[k]:.3f}" for k in ("paper", "code", "storage"))


def _rate(summary: dict[str, Any]) -> str:
    return f"{summary['median']:.1f} [{summary['min']:.1f}–{summary['max']:.1f}]"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def format_report(report: dict[str, Any]) -> list[str]:
    s = report["settings"]
    lines = [
        f"bench on {report['device']} ({report['device_name']}, {report['threads']} threads); "
        f"prefill: one forward of {s['prompt_tokens']} tokens; decode: {s['new_tokens']} greedy steps after a "
        f"{min(s['decode_prompt_tokens'], s['prompt_tokens'])}-token prompt, batch 1, KV cache; "
        f"{s['warmup']} warm-up + {s['repeats']} rounds of one run per model, median [min–max]; "
        "speed ratios: median of each run over the baseline's at that moment",
    ]
    if any(m["packed_linears"] for m in [*([report["baseline"]] if report["baseline"] else []), *report["models"]]):
        from llmquant.runtime.qlinear import BACKEND_MEMORY

        lines.append(f"packed linears run with backend {s['backend']} ({BACKEND_MEMORY.get(s['backend'], 'registered backend')})")
        for m in report["models"]:
            if m.get("backend_fallbacks"):
                lines.append(f"{m['name']}: {m['backend_fallbacks']} linears fell back to the torch backend (their kernel cannot run here)")
    if s.get("static_cache") or s.get("cuda_graphs"):
        lines.append("decode: static KV cache, greedy loop" + (", one-token step replayed as a CUDA graph" if s.get("cuda_graphs") else ""))
    base = report["baseline"]
    rows = [
        ("method", lambda r: r.get("method") or "—", None),
        ("dtype", lambda r: r["dtype"], None),
        ("parameters", lambda r: f"{r['parameters']:,}", "parameters"),
        ("bits paper/code/storage", lambda r: _bits(r["bits"]), None),
        ("bytes on disk", lambda r: _mib(r["bytes_on_disk"]), "bytes_on_disk"),
        ("tensors in memory", lambda r: _mib(r["memory"]["tensor_bytes"]), "tensor_bytes"),
        ("load s", lambda r: f"{r['load_seconds']:.2f}", "load_seconds"),
        ("RSS +load", lambda r: _mib(r["memory"]["load_rss_delta_bytes"]), "load_rss_delta_bytes"),
        ("peak RSS +warm-up", lambda r: _mib(r["memory"]["peak_rss_delta_bytes"]), "peak_rss_delta_bytes"),
        ("prefill tok/s", lambda r: _rate(r["prefill"]["tokens_per_second"]), "prefill_tokens_per_second"),
        ("decode tok/s", lambda r: _rate(r["decode"]["tokens_per_second"]), "decode_tokens_per_second"),
    ]
    for record in report["models"]:
        columns = [("", "baseline" if base else "", record["name"], "ratio" if base else "")]
        for label, get, ratio in rows:
            columns.append(
                (label, get(base) if base else "", get(record), _ratio(record["ratios"][ratio]) if base and ratio else "")
            )
        widths = [max(len(c[i]) for c in columns) for i in range(4)]
        lines.append("")
        lines += ["  ".join(c[i].ljust(widths[i]) for i in range(4)).rstrip() for c in columns]
    return lines

