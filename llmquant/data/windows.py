"""Token windows and the BOS rule: the one place that decides whether a window starts with BOS.

The rule (docs/protocol.md, "BOS"): a window starts with the tokenizer's BOS token exactly when the
tokenizer adds one by default; such a window is BOS + (seqlen - 1) text tokens, and the text stream
advances by seqlen - 1 tokens per window. Otherwise a window is seqlen tokens of the stream as the
tokenizer encodes it by default, exactly as the papers' code cuts it. `--bos always|never` (recipe:
`calibration.bos`) overrides the choice; `never` gives the papers' token streams on any tokenizer.

Every window cut in llmquant goes through here: evaluation windows (PPL and KL; data/streams.py,
evaluate/) and calibration windows (data/calibration.py, sampled and saved).

"Adds BOS by default" is observed, not guessed from a model name: a short text is encoded with the
tokenizer's defaults and the rule checks whether the first id is the tokenizer's BOS id. That covers
`add_bos_token`, template post-processors and tokenizers read from GGUF files alike.

With per-window BOS the text is encoded without special tokens (pure text: the single BOS that the
default encoding puts at the start of a whole joined stream is not part of it). Without, the text is
encoded with the tokenizer's defaults, byte for byte as before this rule existed (P1's hashes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from llmquant.errors import UserError

BOS_CHOICES = ("auto", "always", "never")
PROBE_TEXT = "Hello world. The quick brown fox."


def check_bos_choice(choice: str, flag: str = "--bos") -> str:
    if choice not in BOS_CHOICES:
        raise UserError(f"{flag}: expected one of {', '.join(BOS_CHOICES)}, got {choice!r}")
    return choice


def tokenizer_adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's default encoding of a text starts with its BOS token."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer(PROBE_TEXT).input_ids
    return len(ids) > 0 and ids[0] == bos


@dataclass(frozen=True)
class WindowRule:
    """How one tokenizer's text becomes windows under one --bos choice (module docstring)."""

    choice: str  # as asked: auto | always | never
    bos_token_id: int | None  # the id every window starts with; None: no per-window BOS
    tokenizer_adds_bos: bool  # what the tokenizer does by default (what `auto` follows)

    @property
    def per_window(self) -> bool:
        return self.bos_token_id is not None

    def text_tokens(self, seqlen: int) -> int:
        """Text tokens per window of `seqlen` tokens (how far the stream advances per window)."""
        return seqlen - 1 if self.per_window else seqlen

    def encode(self, tokenizer, text: str) -> torch.Tensor:
        """`text` as one int64 token stream: pure text when windows carry BOS, else the tokenizer's
        default encoding (for a tokenizer that adds BOS, one BOS opens the stream)."""
        if self.per_window:
            return tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0].to(torch.int64)
        return tokenizer(text, return_tensors="pt").input_ids[0]

    def window(self, text: torch.Tensor) -> torch.Tensor:
        """One window from its text tokens: BOS + text, or the text itself."""
        if not self.per_window:
            return text
        return torch.cat([torch.tensor([self.bos_token_id], dtype=text.dtype), text])

    def describe(self, seqlen: int) -> str:
        """What the protocol line and the reports say about the windows."""
        if self.per_window:
            return f"BOS + {seqlen - 1} text tokens per window"
        if self.tokenizer_adds_bos:
            return "no per-window BOS (the tokenizer's one BOS opens the stream)"
        return "no per-window BOS"

    def meta(self) -> dict[str, Any]:
        """The resolved choice, for calibration files, llmquant.json and eval's JSON."""
        return {
            "bos": self.choice,
            "bos_per_window": self.per_window,
            "bos_token_id": self.bos_token_id,
            "tokenizer_adds_bos": self.tokenizer_adds_bos,
        }


def resolve_bos(tokenizer, choice: str = "auto") -> WindowRule:
    """The window rule for `tokenizer` under `choice` (auto | always | never)."""
    check_bos_choice(choice)
    adds = tokenizer_adds_bos(tokenizer)
    bos = getattr(tokenizer, "bos_token_id", None)
    if choice == "always" and bos is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise UserError(f"--bos always: the tokenizer of {name} has no BOS token")
    per_window = choice == "always" or (choice == "auto" and adds)
    return WindowRule(choice, int(bos) if per_window else None, adds)


def window_count(tokens: int, seqlen: int, max_windows: int | None = None, bos: bool = False) -> int:
    """Non-overlapping windows in a stream of `tokens` text tokens (tail dropped), at most `max_windows`."""
    n = tokens // (seqlen - 1 if bos else seqlen)
    return min(n, max_windows) if max_windows else n


def eval_window(ids: torch.Tensor, k: int, seqlen: int, bos_token_id: int | None = None) -> torch.Tensor:
    """Window k of a stream [tokens]: ids[k*seqlen : (k+1)*seqlen], or with a BOS id,
    BOS + ids[k*(seqlen-1) : (k+1)*(seqlen-1)]."""
    if bos_token_id is None:
        return ids[k * seqlen : (k + 1) * seqlen]
    step = seqlen - 1
    text = ids[k * step : (k + 1) * step]
    return torch.cat([torch.tensor([bos_token_id], dtype=ids.dtype, device=ids.device), text])


def eval_windows(ids: torch.Tensor, seqlen: int, windows: int, bos_token_id: int | None = None) -> torch.Tensor:
    """The first `windows` evaluation windows of a stream, stacked: [windows, seqlen]."""
    if windows == 0:
        return ids.new_zeros((0, seqlen))
    return torch.stack([eval_window(ids, k, seqlen, bos_token_id) for k in range(windows)])
