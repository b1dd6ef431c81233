"""Calibration windows, sampled exactly as the GPTQ-family reference code does (docs/methods-spec.md §1.7).

Stream corpora (WikiText-2, PTB, .txt): the split's rows joined with one space, tokenized once, then
`nsamples` windows at offsets randint(0, tokens - seqlen - 1). Document corpora (C4, .jsonl): per
window, draw random documents until one has more than `seqlen` tokens, then a random window in it.
The reference seeds Python's global `random`; we use a private `random.Random(seed)`, which yields
the same draws without reseeding anything the user's program relies on.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from llmquant.data.corpora import Corpus, load_corpus, text_sha256
from llmquant.errors import UserError
from llmquant.safetensors_io import write_safetensors

CALIBRATION_FORMAT = "llmquant-calibration/1"


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


def _encode(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids[0]


def sample_stream(ids: torch.Tensor, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    if ids.numel() <= seqlen + 1:
        raise UserError(f"calibration text has {ids.numel()} tokens, fewer than seqlen + 2 = {seqlen + 2}")
    starts = [rng.randint(0, ids.numel() - seqlen - 1) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])


def sample_documents(docs: list[str], tokenizer, nsamples: int, seqlen: int, rng: random.Random) -> torch.Tensor:
    windows = []
    max_draws = 1000 * nsamples  # the reference loops forever when no document is long enough
    draws = 0
    for _ in range(nsamples):
        while True:
            draws += 1
            if draws > max_draws:
                raise UserError(f"after {max_draws} draws, too few documents have more than {seqlen} tokens")
            ids = _encode(tokenizer, docs[rng.randint(0, len(docs) - 1)])
            if ids.numel() > seqlen:
                break
        start = rng.randint(0, ids.numel() - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    return torch.stack(windows)


def build_calibration(
    dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int, data_dir: str | None = None
) -> CalibrationSet:
    """Samples a calibration set from a named corpus' train split or a local file."""
    corpus: Corpus = load_corpus(dataset, "train", data_dir)
    rng = random.Random(seed)
    if corpus.kind == "rows":
        text = " ".join(corpus.rows)
        windows = sample_stream(_encode(tokenizer, text), nsamples, seqlen, rng)
        digest = text_sha256(text)
    else:
        windows = sample_documents(corpus.rows, tokenizer, nsamples, seqlen, rng)
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
    }
    return CalibrationSet(windows.to(torch.int64), meta)


def load_or_build_calibration(dataset: str, tokenizer, nsamples: int, seqlen: int, seed: int, data_dir: str | None = None) -> CalibrationSet:
    """A saved calibration file (checked against the tokenizer) or a freshly sampled set."""
    if not dataset.endswith(".safetensors"):
        return build_calibration(dataset, tokenizer, nsamples, seqlen, seed, data_dir)
    calib = CalibrationSet.load(dataset)
    if calib.meta.get("tokenizer_fingerprint") != tokenizer_fingerprint(tokenizer):
        raise UserError(f"{dataset}: built with a different tokenizer ({calib.meta.get('tokenizer')!r}) than this model's")
    return calib
