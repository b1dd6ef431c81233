"""Calibration windows, sampled exactly as the GPTQ-family reference code does (docs/methods-spec.md §1.7).

Stream corpora (WikiText-2, PTB, .txt): the split's rows joined with one space, tokenized once, then
`nsamples` windows at offsets randint(0, tokens - seqlen - 1). Document corpora (C4, .jsonl): per
window, draw random documents until one has more than `seqlen` tokens, then a random window in it.
The reference seeds Python's global `random`; we use a private `random.Random(seed)`, which yields
the same draws without reseeding anything the user's program relies on.

Per-window BOS follows the one rule of data/windows.py: for a tokenizer that adds BOS by default (or
`bos: always`), the text is encoded without special tokens, windows of seqlen - 1 text tokens are
drawn by the same procedure (offsets randint(0, tokens - (seqlen - 1) - 1), documents with more than
seqlen - 1 tokens), and each gets the BOS token in front. Otherwise (or `bos: never`) the windows
are exactly the reference's. The file's metadata records the resolved choice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llmquant.data.corpora import Corpus, load_corpus, text_sha256
from llmquant.data.windows import WindowRule, check_bos_choice, resolve_bos
from llmquant.errors import UserError
from llmquant.safetensors_io import write_safetensors

log = logging.getLogger(__name__)

CALIBRATION_FORMAT = "llmquant-calibration/1"
NO_BOS = WindowRule("never", None, False)  # the reference's windows, for callers that pass no rule


def tokenizer_fingerprint(tokenizer) -> str:
    """Identifies a vocabulary: windows are token ids, meaningless under another tokenizer."""
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


@dataclass
class CalibrationSet:
    windows: torch.Tensor  # int64 [nsamples, seqlen]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.windows.to(torch.int64).numpy().tobytes()).hexdigest()

    def save(self, path: str | Path) -> None:
        meta = {**self.meta, "format": CALIBRATION_FORMAT, "windows_sha256": self.sha256}
        write_safetensors(path, {"input_ids": self.windows}, {"llmquant": json.dumps(meta)})  # atomic

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationSet":
        try:
            with safe_open(str(path), "pt") as handle:
                raw = (handle.metadata() or {}).get("llmquant")
                names = set(handle.keys())
                windows = handle.get_tensor("input_ids") if "input_ids" in names else None
        except (SafetensorError, OSError, ValueError, RuntimeError) as error:
            raise UserError(f"{path}: not a readable calibration file: {' '.join(str(error).split())}") from None
        if raw is None or windows is None:
            raise UserError(f"{path}: not an llmquant calibration file (no input_ids / metadata)")
        try:
            meta = json.loads(raw)
        except ValueError:
            meta = None
        if not isinstance(meta, dict):
            raise UserError(f"{path}: not an llmquant calibration file (its metadata is not a JSON object)")
        if meta.get("format") != CALIBRATION_FORMAT:
            raise UserError(f"{path}: unsupported calibration format {meta.get('format')!r}")
        if windows.dim() != 2 or windows.dtype != torch.int64 or 0 in windows.shape:
            raise UserError(f"{path}: input_ids must be int64 [nsamples, seqlen], got {windows.dtype} {tuple(windows.shape)}")
        result = cls(windows, meta)
        if meta.get("windows_sha256") != result.sha256:
            raise UserError(f"{path}: windows do not match their recorded sha256 (corrupted file?)")
        return result


def sample_stream(
    ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random, rule: WindowRule | None = None
) -> torch.Tensor:
    """`nsamples` windows of a token stream at random offsets; with a per-window-BOS `rule`, windows
    of seqlen - 1 text tokens, each after the BOS token."""
    rule = rule or NO_BOS
    length = rule.text_tokens(seqlen)
    if ids.numel() <= length + 1:
        raise UserError(f"calibration text has {ids.numel()} tokens, fewer than {length} + 2 = {length + 2}")
    starts = [rng.randint(0, ids.numel() - length - 1) for _ in range(nsamples)]
    return torch.stack([rule.window(ids[s : s + length]) for s in starts])


def sample_documents(
    docs: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random, rule: WindowRule | None = None
) -> torch.Tensor:
    rule = rule or NO_BOS
    length = rule.text_tokens(seqlen)
    windows = []
    max_draws = 1000 * nsamples  # the reference loops forever when no document is long enough
    draws = 0
    for _ in range(nsamples):
        while True:
            draws += 1
            if draws > max_draws:
                raise UserError(f"after {max_draws} draws, too few documents have more than {length} tokens")
            ids = rule.encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.numel() > length:
                break
        start = rng.randint(0, ids.numel() - length - 1)
        windows.append(rule.window(ids[start : start + length]))
    return torch.stack(windows)


def build_calibration(
    dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int, data_dir: str | None = None, bos: str = "auto"
) -> CalibrationSet:
    """Samples a calibration set from a named corpus' train split or a local file; `bos` is the
    per-window BOS choice (auto | always | never, data/windows.py)."""
    rule = resolve_bos(tokenizer, bos)
    corpus: Corpus = load_corpus(dataset, "train", data_dir)
    rng = random.Random(seed)
    if corpus.kind == "rows":
        text = " ".join(corpus.rows)
        windows = sample_stream(rule.encode(tokenizer, text), nsamples, seqlen, rng, rule)
        digest = text_sha256(text)
    else:
        windows = sample_documents(corpus.rows, tokenizer, nsamples, seqlen, rng, rule)
        digest = text_sha256("\n".join(corpus.rows))
    meta = {
        "dataset": dataset,
        "source": corpus.source,
        "text_sha256": digest,
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "seed": seed,
        "nsamples": nsamples,
        "seqlen": seqlen,
        **rule.meta(),
        "window_layout": rule.describe(seqlen),
    }
    return CalibrationSet(windows.to(torch.int64), meta)


def load_or_build_calibration(
    dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int, data_dir: str | None = None, bos: str = "auto"
) -> CalibrationSet:
    """A saved calibration file (checked against the tokenizer and the BOS choice) or a freshly sampled set."""
    if not dataset.endswith(".safetensors"):
        return build_calibration(dataset, tokenizer, nsamples, seqlen, seed, data_dir, bos)
    calib = CalibrationSet.load(dataset)
    if calib.meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(f"{dataset}: built with a different tokenizer ({calib.meta.get('tokenizer')!r}) than this model's")
    check_file_bos(dataset, calib, tokenizer, bos)
    return calib


def check_file_bos(path: str, calib: CalibrationSet, tokenizer, bos: str) -> None:
    """A reused file keeps its own windows: it must say whether they start with BOS (a file from before
    the BOS rule has none and is recorded as such), agree with an explicit `bos: always|never`, and,
    if its windows carry BOS, start each with this tokenizer's BOS id. `auto` takes the file as it is."""
    check_bos_choice(bos, "calibration.bos")
    if "bos_per_window" not in calib.meta:  # written before the rule: no per-window BOS was ever added
        calib.meta.update({"bos": None, "bos_per_window": False, "bos_token_id": None})
    per_window = bool(calib.meta["bos_per_window"])
    windows, seqlen = calib.windows, calib.windows.shape[1]
    said = f"BOS + {seqlen - 1} text tokens per window" if per_window else "no per-window BOS"
    calib.meta.setdefault("window_layout", said)
    if bos != "auto" and per_window != (bos == "always"):
        raise UserError(
            f"{path}: its windows have {said}, which contradicts bos: {bos}; "
            f"build a matching file with `llmquant calibrate --bos {bos}` (or use bos: auto to take the file as it is)"
        )
    if per_window:
        bos_id = getattr(tokenizer, "bos_token_id", None)
        if bos_id is None or calib.meta.get("bos_token_id") != bos_id or not bool((windows[:, 0] == bos_id).all()):
            raise UserError(f"{path}: says its windows start with BOS id {calib.meta.get('bos_token_id')}, but they or this tokenizer's BOS ({bos_id}) disagree")
    if bos == "auto":
        expected = resolve_bos(tokenizer, "auto")
        if expected.per_window != per_window:
            log.warning(
                "%s: its windows have %s; this tokenizer's default would be %s (using the file as it is)",
                path, said, expected.describe(seqlen),
            )
