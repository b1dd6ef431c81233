"""Evaluation token streams, exactly as the papers' evaluation code builds them (docs/methods-spec.md §1.8).

wikitext2: test rows joined with "\\n\\n"; ptb: test sentences joined with " " (GPTQ's "ptb-new");
c4: the first 1100 validation documents joined with " ", truncated to 256 windows (GPTQ's "c4-new").
Each stream is tokenized once, with the tokenizer's default special tokens (as the reference does:
one BOS at the very start for tokenizers that add one, none per window).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmquant.data.corpora import load_corpus, text_sha256

C4_DOCUMENTS = 1100
C4_WINDOWS = 256


@dataclass(frozen=True)
class EvalStream:
    dataset: str
    split: str
    source: str
    text_sha256: str
    ids: torch.Tensor  # int64 [tokens]

    def protocol_line(self, seqlen: int, windows: int) -> str:
        return (
            f"protocol: dataset={self.dataset} split={self.split} source={self.source} "
            f"sha256={self.text_sha256[:16]} tokens={self.ids.numel()} seqlen={seqlen} windows={windows} "
            "(non-overlapping, tail dropped, no per-window BOS)"
        )


def build_eval_stream(dataset: str, tokenizer, seqlen: int, data_dir: str | None = None, split: str = "test") -> EvalStream:
    if dataset == "c4":
        corpus = load_corpus("c4", "validation", data_dir)
        text = " ".join(corpus.rows[:C4_DOCUMENTS])
        ids = tokenizer(text, return_tensors="pt").input_ids[0][: C4_WINDOWS * seqlen]
        return EvalStream("c4", "validation", corpus.source, text_sha256(text), ids)
    corpus = load_corpus(dataset, split, data_dir)
    separator = "\n\n" if dataset == "wikitext2" else " "
    text = separator.join(corpus.rows)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    return EvalStream(dataset, corpus.split, corpus.source, text_sha256(text), ids)
