"""Evaluation token streams, exactly as the papers' evaluation code builds them (docs/methods-spec.md §1.8).

wikitext2: test rows joined with "\\n\\n"; ptb: test sentences joined with " " (GPTQ's "ptb-new");
c4: the first 1100 validation documents joined with " ", truncated to 256 windows (GPTQ's "c4-new").
Each stream is tokenized once. Whether windows start with BOS follows the one rule in
data/windows.py: for a tokenizer that adds BOS by default (or --bos always), the stream is the pure
text (no special tokens) and each window is BOS + seqlen - 1 text tokens; otherwise (or --bos
never) the stream is encoded with the tokenizer's defaults, as the reference does, and cut into
seqlen-token windows with no per-window BOS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmquant.data.corpora import load_corpus, text_sha256
from llmquant.data.windows import WindowRule, eval_windows, resolve_bos, window_count

C4_DOCUMENTS = 1100
C4_WINDOWS = 256


@dataclass(frozen=True)
class EvalStream:
    dataset: str
    split: str
    source: str
    text_sha256: str
    ids: torch.Tensor  # int64 [tokens]: the stream the windows' text comes from
    rule: WindowRule  # whether each window starts with BOS

    @property
    def bos_token_id(self) -> int | None:
        return self.rule.bos_token_id

    def window_count(self, seqlen: int, max_windows: int | None = None) -> int:
        return window_count(self.ids.numel(), seqlen, max_windows, self.rule.per_window)

    def windows(self, seqlen: int, windows: int) -> torch.Tensor:
        """The first `windows` windows, as the model sees them: [windows, seqlen]."""
        return eval_windows(self.ids, seqlen, windows, self.bos_token_id)

    def protocol_line(self, seqlen: int, windows: int) -> str:
        return (
            f"protocol: dataset={self.dataset} split={self.split} source={self.source} "
            f"sha256={self.text_sha256[:16]} tokens={self.ids.numel()} seqlen={seqlen} windows={windows} "
            f"(non-overlapping, tail dropped, {self.rule.describe(seqlen)}; bos={self.rule.choice})"
        )


def build_eval_stream(
    dataset: str, tokenizer, seqlen: int, data_dir: str | None = None, split: str = "test", bos: str = "auto"
) -> EvalStream:
    rule = resolve_bos(tokenizer, bos)
    if dataset == "c4":
        corpus = load_corpus("c4", "validation", data_dir)
        text = " ".join(corpus.rows[:C4_DOCUMENTS])
        ids = rule.encode(tokenizer, text)[: C4_WINDOWS * rule.text_tokens(seqlen)]
        return EvalStream("c4", "validation", corpus.source, text_sha256(text), ids, rule)
    corpus = load_corpus(dataset, split, data_dir)
    separator = "\n\n" if dataset == "wikitext2" else " "
    text = separator.join(corpus.rows)
    return EvalStream(dataset, corpus.split, corpus.source, text_sha256(text), rule.encode(tokenizer, text), rule)
