"""`llmquant train`: PB-LLM's quantization-aware training, from a packed PB-LLM checkpoint to a packed one.

Every `partial_binary` linear becomes a PartialBinaryQAT module (llmquant/layouts/partial_binary/qat.py:
salient mask and 8-bit salient weights frozen, latent weights behind a straight-through sign, the
paper's per-channel optimal alpha computed from them, mu trained); every other tensor stays frozen.
The loss is the model's next-token loss on windows of a text corpus (a named corpus' train split or a
local .txt/.jsonl, sampled with the seed exactly as calibration windows are), one batch per step:
AdamW, a linear warm-up then a cosine decay to zero (the paper's schedule). The output is a packed
checkpoint again, with the same layouts and bit figures (the salient set does not change) and the
training settings and losses in `quantization_config.info.qat`.

Resume: every `save_every` steps the trainable state (latents, mu, AdamW's moments and step) is
written to the work directory `.NAME.work/train-state.safetensors` (temporary name, fsync, rename),
next to a fingerprint of the run (source checkpoint, settings, windows, version). `--resume`
continues from it; the result is byte-identical to an uninterrupted run on the same machine.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from llmquant.data.calibration import build_calibration
from llmquant.devices import resolve_device
from llmquant.errors import UserError
from llmquant.formats.checkpoint import DEFAULT_MAX_SHARD_BYTES, read_checkpoint, rewrite_packed
from llmquant.formats.packers import pack, unpack
from llmquant.layouts.partial_binary.qat import PartialBinaryQAT
from llmquant.output import check_output_path
from llmquant.provenance import peak_memory, versions
from llmquant.resume import WORK_VERSION, WorkDir, check_work_dir, environment, work_dir_for
from llmquant.runtime.loader import load_model
from llmquant.runtime.qlinear import QuantizedLinear
from llmquant.safetensors_io import write_safetensors
from llmquant.version import __version__

log = logging.getLogger(__name__)

STATE_FILE = "train-state.safetensors"
STATE_KEY = "llmquant.train"
TRAINED_LAYOUT = "partial_binary"


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides the result (and so the resume fingerprint), plus where it goes."""

    model: str  # a packed checkpoint holding partial_binary linears (PB-LLM)
    output: str
    dataset: str = "wikitext2"
    steps: int = 200
    batch_size: int = 1
    seqlen: int = 512
    lr: float = 1e-4
    warmup: float = 0.05  # share of the steps with a linear warm-up (the paper's 5%)
    seed: int = 0
    save_every: int = 25
    device: str = "auto"
    bos: str = "auto"

    def check(self) -> None:
        """One-line errors before anything loads."""
        if self.steps < 1:
            raise UserError(f"--steps must be at least 1, got {self.steps}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.seqlen < 2:
            raise UserError(f"--seqlen must be at least 2 (one token predicts the next), got {self.seqlen}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0 <= self.warmup < 1:
            raise UserError(f"--warmup is a share of the steps in [0, 1), got {self.warmup}")
        if self.save_every < 1:
            raise UserError(f"--save-every must be at least 1, got {self.save_every}")

    def result_settings(self) -> dict[str, Any]:
        """What the fingerprint and the output record: not where it goes, not how often it saves."""
        data = asdict(self)
        for key in ("model", "output", "save_every"):
            data.pop(key)
        return data


def learning_rate_factor(step: int, steps: int, warmup: float) -> float:
    """Linear warm-up over the first warmup * steps steps, then cosine decay to 0 at the last step."""
    warm = int(warmup * steps)
    if step < warm:
        return (step + 1) / warm
    span = max(steps - warm, 1)
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / span))


def install_qat(model: nn.Module) -> dict[str, PartialBinaryQAT]:
    """Swap every partial_binary QuantizedLinear for a trainable PartialBinaryQAT (same device)."""
    targets = {name: m for name, m in model.named_modules() if isinstance(m, QuantizedLinear) and m.layout == TRAINED_LAYOUT}
    installed = {}
    for name, module in targets.items():
        packed = module.packed()
        qat = PartialBinaryQAT(unpack(packed), packed.meta, module.bias).to(module.blob.device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, qat)
        installed[name] = qat
    return installed


def trainable(modules: dict[str, PartialBinaryQAT]) -> list[tuple[str, nn.Parameter]]:
    """The trained parameters in a fixed order: each linear's latent, then its mu."""
    return [(f"{name}.{p}", getattr(m, p)) for name, m in sorted(modules.items()) for p in ("latent", "mu")]


# --------------------------------------------------------------------------------------------------
# The resumable state


def save_state(work: Path, step: int, losses: list[float], params: list[tuple[str, nn.Parameter]], optimizer) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for index, (name, param) in enumerate(params):
        tensors[f"param.{name}"] = param.detach().cpu().contiguous()
        state = optimizer.state.get(param, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state:
                tensors[f"{key}.{name}"] = state[key].detach().cpu().contiguous()
        if "step" in state:
            tensors[f"adam_step.{name}"] = torch.as_tensor(state["step"]).detach().cpu().reshape(1).float()
    # write_safetensors writes a temporary name, fsyncs and renames: a kill leaves the previous state
    write_safetensors(work / STATE_FILE, tensors, {STATE_KEY: json.dumps({"step": step, "losses": losses})})


def load_state(work: Path, params: list[tuple[str, nn.Parameter]], optimizer) -> tuple[int, list[float]]:
    """Restores the parameters and AdamW's state in place; returns (next step, losses so far)."""
    from safetensors import safe_open

    path = work / STATE_FILE
    with safe_open(str(path), "pt") as handle:
        meta = json.loads((handle.metadata() or {})[STATE_KEY])
        names = set(handle.keys())
        with torch.no_grad():
            for name, param in params:
                if f"param.{name}" not in names:
                    raise UserError(f"{path}: no state for {name}; pass --force to start over")
                param.copy_(handle.get_tensor(f"param.{name}"))
                if f"exp_avg.{name}" in names:
                    optimizer.state[param] = {
                        "step": handle.get_tensor(f"adam_step.{name}").reshape(()),
                        "exp_avg": handle.get_tensor(f"exp_avg.{name}").to(param.device),
                        "exp_avg_sq": handle.get_tensor(f"exp_avg_sq.{name}").to(param.device),
                    }
    return int(meta["step"]), [float(x) for x in meta["losses"]]


# --------------------------------------------------------------------------------------------------
# The command


def run_train(
    settings: TrainSettings,
    force: bool = False,
    resume: bool = False,
    data_dir: str | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
) -> tuple[Path, dict[str, Any]]:
    """Train, write the packed checkpoint to settings.output; returns (output, report)."""
    settings.check()
    source = Path(settings.model)
    if not source.is_dir():
        raise UserError(f"model directory not found: {settings.model}")
    output = Path(settings.output)
    if output.resolve() == source.resolve():
        raise UserError(f"{output}: train needs an output different from its --model")
    check_output_path(output, force, inputs=[source])  # before anything expensive
    check_work_dir(output, resume, force)
    checkpoint = read_checkpoint(source, packed_only=True)
    layouts = {linear.layout for linear in checkpoint.linears.values()}
    if TRAINED_LAYOUT not in layouts:
        raise UserError(
            f"{source}: no {TRAINED_LAYOUT} linears ({', '.join(sorted(layouts)) or 'none'}); "
            "train starts from a PB-LLM checkpoint (e.g. recipes/pbllm-10pct.yaml)"
        )
    started = time.perf_counter()
    device = resolve_device(settings.device)
    model, tokenizer, _ = load_model(str(source), "float32", "cpu")
    model.to(device)
    modules = install_qat(model)
    for param in model.parameters():
        param.requires_grad_(False)
    params = trainable(modules)
    for _, param in params:
        param.requires_grad_(True)
    windows = build_calibration(
        settings.dataset, tokenizer, settings.steps * settings.batch_size, settings.seqlen, settings.seed, data_dir, settings.bos
    )
    optimizer = torch.optim.AdamW([p for _, p in params], lr=settings.lr, betas=(0.9, 0.999), weight_decay=0.0)
    fingerprint = _fingerprint(settings, checkpoint.quantization, windows.sha256)
    work = WorkDir.open_at(output, fingerprint, environment(device, torch.float32), resume, force)
    try:
        step, losses = 0, []
        if resume and (work.path / STATE_FILE).is_file():
            step, losses = load_state(work.path, params, optimizer)
            log.info("resuming training at step %d of %d", step, settings.steps)
        if on_start:
            on_start(settings.steps, step)
        model.train(False)  # no dropout: the same windows give the same gradients (determinism, resume)
        batches = windows.windows.to(device).split(settings.batch_size)
        while step < settings.steps:
            for group in optimizer.param_groups:
                group["lr"] = settings.lr * learning_rate_factor(step, settings.steps, settings.warmup)
            batch = batches[step]
            loss = model(input_ids=batch, labels=batch).loss
            if not torch.isfinite(loss):
                from llmquant.errors import NumericalError

                raise NumericalError(f"training loss is {loss.item()} at step {step}; try a smaller --lr")
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step += 1
            if on_step:
                on_step(step, losses[-1])
            if step % settings.save_every == 0 or step == settings.steps:
                save_state(work.path, step, losses, params, optimizer)
        train_seconds = time.perf_counter() - started
        linears = dict(checkpoint.linears)
        for name, module in modules.items():
            tensors, meta = module.export()
            linears[name] = pack(TRAINED_LAYOUT, tensors, meta)
        window = max(1, len(losses) // 10)
        info = {
            "qat": {
                **settings.result_settings(),
                "dataset_source": windows.meta.get("source"),
                "windows_sha256": windows.sha256,
                "trained_linears": len(modules),
                "trained_parameters": sum(p.numel() for _, p in params),
                "loss_first": sum(losses[:window]) / window,
                "loss_last": sum(losses[-window:]) / window,
                "from": str(source),
            }
        }
        report = _report(settings, source, output, modules, params, losses, info, train_seconds, started)
        rewrite_packed(source, checkpoint, output, linears, info, force=force, report=report, max_shard_bytes=max_shard_bytes)
    except BaseException:
        if (work.path / STATE_FILE).is_file():
            work.close()  # kept: --resume continues from the last saved step
        else:
            work.remove()
        raise
    work.remove()
    report["time_seconds"]["total"] = time.perf_counter() - started
    return output, report


def _report(settings, source, output, modules, params, losses, info, train_seconds, started) -> dict[str, Any]:
    return {
        "command": "train",
        "model": str(source),
        "output": str(output),
        "settings": settings.result_settings(),
        "trained_linears": len(modules),
        "trained_parameters": info["qat"]["trained_parameters"],
        "steps": settings.steps,
        "tokens": settings.steps * settings.batch_size * settings.seqlen,
        "loss_first": info["qat"]["loss_first"],
        "loss_last": info["qat"]["loss_last"],
        "losses": losses,
        "time_seconds": {"train": train_seconds, "total": time.perf_counter() - started},
        "peak_memory": peak_memory(),
        "versions": versions(),
        "llmquant": __version__,
    }


def _fingerprint(settings: TrainSettings, quantization: dict[str, Any], windows_sha256: str) -> dict[str, Any]:
    import hashlib

    components = {
        "settings": settings.result_settings(),
        "source_weights": quantization.get("weights_checksum"),
        "windows_sha256": windows_sha256,
        "llmquant": __version__,
        "kind": "train",
    }
    digest = hashlib.sha256(json.dumps(components, sort_keys=True).encode()).hexdigest()
    return {"version": WORK_VERSION, "sha256": digest, "components": components}


__all__ = ["TrainSettings", "install_qat", "learning_rate_factor", "run_train", "work_dir_for"]
