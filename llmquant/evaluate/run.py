"""`llmquant eval` as a library command: load the model (and, for KL, its reference), cut each
dataset into the protocol's windows, evaluate, and return the JSON-able results. The CLI parses
flags and prints; everything else is here."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmquant.data.windows import check_bos_choice
from llmquant.devices import check_device, check_dtype, resolve_device, resolve_dtype
from llmquant.errors import NumericalError, UserError
from llmquant.evaluate.ppl import PerplexityResult, perplexity
from llmquant.evaluate.reference import Reference, reference_key
from llmquant.evaluate.tasks import TaskSettings, evaluate_tasks
from llmquant.models.loading import ModelSource, check_finite_weights, checkpoint_dtype, load_tokenizer, resolve_model_source
from llmquant.recipe import DEFAULT_PROTOCOL, get_protocol



@dataclass(frozen=True)
class EvalSettings:
    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int | None = None  # None: the protocol's
    max_windows: int | None = None  # None: the protocol's
    protocol: str | None = None  # p0 (the default) or p1
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # Packed linears: "auto" = the Triton kernels on CUDA, else each weight decoded once and kept
    # ("torch-cached": the same numbers as decoding every forward, at dense memory and dense speed).
    backend: str = "auto"
    reference: str | None = None  # KL against this model (any --model form)
    reference_cache: str | Path | None = None
    bos: str = "auto"  # per-window BOS: auto (when the tokenizer adds one), always, never (data/windows.py)
    # Zero-shot tasks through lm-eval (evaluate/tasks.py), after the PPL datasets, on the same loaded model.
    tasks: tuple[str, ...] = ()
    num_fewshot: int = 0
    limit: float | None = None
    batch_size: int = 1

    def task_settings(self) -> TaskSettings:
        return TaskSettings(self.tasks, self.num_fewshot, self.limit, self.batch_size, self.data_dir, self.bos)

    def windows(self) -> tuple[int, int | None]:
        """(seqlen, max_windows) after the protocol's presets; UserError for bad values."""
        preset = get_protocol(self.protocol or DEFAULT_PROTOCOL)
        assert preset is not None
        seqlen = self.seqlen or preset.eval_seqlen
        max_windows = self.max_windows if self.max_windows is not None else preset.eval_windows
        if seqlen < 2:
            raise UserError(f"--seqlen: must be at least 2, got {seqlen}")
        if max_windows is not None and max_windows <= 0:
            raise UserError(f"--max-windows: must be positive, got {max_windows}")
        return seqlen, max_windows

    def check(self) -> None:
        """Everything that can be checked before a model loads."""
        for flag, check, value in (("--device", check_device, self.device), ("--dtype", check_dtype, self.dtype)):
            try:
                check(value)
            except ValueError as error:
                raise UserError(f"{flag}: {error}") from None
        check_bos_choice(self.bos)
        self.windows()
        if not self.datasets and not self.tasks:
            raise UserError("nothing to evaluate: name --ppl datasets, --tasks, or both")
        if self.tasks:
            self.task_settings().check()
        elif self.limit is not None or self.num_fewshot or self.batch_size != 1:
            raise UserError("--limit, --num-fewshot and --batch-size apply to --tasks only")
        if self.reference is not None:
            resolve_model_source(self.reference)  # a wrong path fails before anything loads
        from llmquant.runtime.qlinear import BACKEND_CHOICES, available_backends

        if self.backend not in {*BACKEND_CHOICES, *available_backends()}:
            raise UserError(f"--backend: expected one of {', '.join(BACKEND_CHOICES)}, got {self.backend!r}")


def load_dtype(name: str, device: torch.device, source: ModelSource) -> str:
    """The dtype `load_model` will give this model (what a reference cache is keyed on), without loading it."""
    resolved = resolve_dtype(name, device)
    if resolved == "auto":  # a GPU: the checkpoint's own dtype, as transformers resolves it
        resolved = checkpoint_dtype(source) or "auto"
    return str(resolved)


def logits_width(model: nn.Module) -> int | None:
    head = model.get_output_embeddings()
    return getattr(head, "out_features", None) if head is not None else getattr(model.config, "vocab_size", None)


def run_eval(
    model: str,
    settings: EvalSettings,
    on_protocol: Callable[[str], None] | None = None,
    progress: Callable[[str, int], Callable[[int, int], None]] | None = None,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    on_task: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """PPL of `model` on each dataset (and with `settings.reference`, KL and top-1 agreement against
    it, over the same windows), then its accuracy on each of `settings.tasks`. Returns {"model",
    "backend", "results": [one entry per dataset], "tasks": [one entry per task]}.

    on_protocol(line) is called with the backend line (for a packed model) and before each dataset
    or task is evaluated, progress(label, total) returns the per-window (per-request) callback,
    on_result(entry) is called after each dataset, on_task(entry) after each task."""
    from llmquant.data.streams import build_eval_stream
    from llmquant.runtime.loader import load_model
    from llmquant.runtime.qlinear import BACKEND_MEMORY, resolve_backend, set_backend

    settings.check()
    seqlen, max_windows = settings.windows()
    target = resolve_device(settings.device)
    backend = resolve_backend(settings.backend, target, dense_on_cpu=True)
    lm, tokenizer, source = load_model(model, settings.dtype, settings.device)
    lm.to(target)
    packed = set_backend(lm, backend)
    if packed and on_protocol:
        on_protocol(f"packed linears: {packed}, backend {backend} ({BACKEND_MEMORY.get(backend, 'registered backend')})")
    ref_loader = ref_source = ref_dtype = None
    if settings.reference is not None:
        reference = settings.reference
        ref_source = resolve_model_source(reference)
        other_vocabulary = UserError(f"--reference {reference}: its vocabulary differs from the model's; KL needs the same one")
        if load_tokenizer(reference).get_vocab() != tokenizer.get_vocab():
            raise other_vocabulary
        ref_dtype = load_dtype(settings.dtype, target, ref_source)
        loaded: list[nn.Module] = []

        def ref_loader() -> nn.Module:
            # Called only when the reference cache cannot answer alone (both models are then
            # resident), at most once for all datasets.
            if not loaded:
                ref_lm = load_model(reference, settings.dtype, settings.device)[0].to(target)
                if logits_width(ref_lm) != logits_width(lm):
                    raise other_vocabulary
                set_backend(ref_lm, backend)
                loaded.append(ref_lm)
            return loaded[0]

    results = []
    for dataset in settings.datasets:
        stream = build_eval_stream(dataset, tokenizer, seqlen, settings.data_dir, bos=settings.bos)
        n = stream.window_count(seqlen, max_windows)
        if n == 0:
            raise UserError(f"{dataset}: {stream.ids.numel()} tokens is less than one window of {stream.rule.text_tokens(seqlen)}")
        bos_id = stream.bos_token_id
        _check_vocabulary(stream.ids[: n * stream.rule.text_tokens(seqlen)], lm, dataset, source)
        if on_protocol:
            on_protocol(stream.protocol_line(seqlen, n))
        ref = saving = None
        if ref_loader is not None:
            ref = Reference(ref_loader, settings.reference_cache, reference_key(ref_source, stream.ids, seqlen, n, ref_dtype, target, bos_id))
        elif settings.reference_cache is not None:
            own_dtype = load_dtype(settings.dtype, target, source)  # keyed as a later --reference run will key it
            saving = Reference(lm, settings.reference_cache, reference_key(source, stream.ids, seqlen, n, own_dtype, target, bos_id))
        on_window = progress(f"eval {dataset}", n) if progress else None
        try:
            result = perplexity(lm, stream.ids, seqlen, max_windows, target, on_window, ref, saving, bos_id)
        except NumericalError:
            check_finite_weights(lm, source.describe())  # a NaN/Inf weight is the input's fault (exit 2), named
            raise
        entry = _entry(stream, seqlen, result, ref_source)
        if saving is not None:
            entry["saved_reference_cache"] = str(saving.cache_path) if saving.status == "built" else None
        results.append(entry)
        if on_result:
            on_result(entry)
    tasks = evaluate_tasks(lm, tokenizer, settings.task_settings(), on_protocol, progress, on_task) if settings.tasks else []
    report: dict[str, Any] = {"model": source.describe(), "backend": backend if packed else None, "results": results}
    if settings.tasks:
        report["tasks"] = tasks
    return report


def _check_vocabulary(ids: torch.Tensor, lm: nn.Module, dataset: str, source: ModelSource) -> None:
    """Token ids beyond the model's embedding table (a tokenizer larger than the model's vocabulary)
    would fail inside the forward; UserError before it."""
    embeddings = lm.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None)
    if vocab is not None and ids.numel() and int(ids.max()) >= vocab:
        raise UserError(
            f"{dataset}: the tokenizer of {source.describe()} gives token id {int(ids.max())}, but the model's vocabulary "
            f"has {vocab} entries (tokenizer and model do not match)"
        )


def _entry(stream, seqlen: int, result: PerplexityResult, ref_source: ModelSource | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "dataset": stream.dataset,
        "split": stream.split,
        "source": stream.source,
        "text_sha256": stream.text_sha256,
        "tokens": stream.ids.numel(),
        "seqlen": seqlen,
        "windows": result.windows,
        "window_layout": stream.rule.describe(seqlen),
        **stream.rule.meta(),
        "ppl": result.ppl,
        "seconds": result.seconds,
    }
    div = result.divergence
    if div is not None and ref_source is not None:
        entry.update(
            {
                "reference": ref_source.describe(),
                "reference_ppl": div.reference_ppl,
                "kl": div.kl,
                "kl_median": div.kl_median,
                "kl_p99": div.kl_p99,
                "kl_max": div.kl_max,
                "top1_agreement": div.top1,
                "kl_positions": div.positions,
                "kl_window_means": div.window_kl,
                "reference_cache": div.reference_cache,
                "kl_computed_from": div.computed_from,
            }
        )
    return entry
