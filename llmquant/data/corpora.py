"""Text corpora: WikiText-2, PTB, C4 from the Hugging Face hub, a local directory, or a local file.

Local directories follow the layout of the project's shared data (see docs/protocol.md):
    wikitext-2-raw/wiki.{train,valid,test}.raw   rows of wikitext-2-raw-v1, one per line
    wikitext-2/wiki.train.tokens                 fallback for the raw train split (same line structure)
    ptb/ptb.{train,valid,test}.txt
    c4/c4_sample.jsonl                           C4 train documents (`text` field)
    c4/c4-validation.00000-of-00008.json.gz      C4 validation shard (evaluation)
A directory is used when given (`--data-dir`) or set in LLMQUANT_DATA; otherwise `datasets` loads
the standard hub datasets.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from llmquant.errors import UserError

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Corpus:
    """Rows (WikiText/PTB) or documents (C4, .jsonl) of one split, plus where they came from."""

    name: str
    split: str
    rows: list[str]
    source: str  # file path or hub dataset id
    kind: str  # "rows" (joined into one stream) or "documents" (sampled one at a time)


def data_dir_from(explicit: str | os.PathLike | None) -> Path | None:
    value = explicit if explicit is not None else os.environ.get("LLMQUANT_DATA")
    if not value:
        return None
    path = Path(value).expanduser()
    if not path.is_dir():
        raise UserError(f"data directory not found: {value}")
    return path


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def wikitext_rows_from_lines(text: str) -> list[str]:
    """Rows of the HF wikitext-2-raw-v1 dataset from the upstream file: a blank line " \\n" is the
    empty row, any other line is its row including the newline (the data README, `LLMQUANT_DATA`/README.md)."""
    lines = text.splitlines(keepends=True)
    return ["" if line == " \n" else line for line in lines]


def _read_jsonl(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    docs = []
    with opener(path, "rt", encoding="utf-8") as handle:  # type: ignore[operator]
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: invalid JSON line: {error.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise UserError(f"{path}:{number}: expected an object with a string 'text' field")
            docs.append(record["text"])
    if not docs:
        raise UserError(f"{path}: no documents")
    return docs


def load_file(path: str | os.PathLike) -> Corpus:
    """Any local .txt (one stream) or .jsonl/.json(.gz) (documents with a `text` field)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"file not found: {path}")
    if file.name.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return Corpus(file.stem, "file", _read_jsonl(file), str(file), "documents")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    return Corpus(file.stem, "file", [text], str(file), "rows")


def _local(name: str, split: str, root: Path) -> Corpus:
    if name == "wikitext2":
        short = {"train": "train", "validation": "valid", "test": "test"}[split]
        raw = root / "wikitext-2-raw" / f"wiki.{short}.raw"
        if not raw.is_file() and split == "train":
            raw = root / "wikitext-2" / "wiki.train.tokens"
            if raw.is_file():
                log.warning("wikitext2 train: raw split not in %s, using the tokenized release %s", root, raw)
        if not raw.is_file():
            raise UserError(f"wikitext2 {split}: {raw} not found")
        return Corpus(name, split, wikitext_rows_from_lines(raw.read_text(encoding="utf-8")), str(raw), "rows")
    if name == "ptb":
        short = {"train": "train", "validation": "valid", "test": "test"}[split]
        file = root / "ptb" / f"ptb.{short}.txt"
        if not file.is_file():
            raise UserError(f"ptb {split}: {file} not found")
        # ptb_text_only rows are the stripped lines of these files.
        rows = [line.strip() for line in file.read_text(encoding="utf-8").splitlines()]
        return Corpus(name, split, rows, str(file), "rows")
    if name == "c4":
        candidates = {
            "train": ["c4/c4-train.00000-of-01024.json.gz", "c4/c4_sample.jsonl"],
            "validation": ["c4/c4-validation.00000-of-00008.json.gz"],
        }.get(split, [])
        for relative in candidates:
            if (root / relative).is_file():
                return Corpus(name, split, _read_jsonl(root / relative), str(root / relative), "documents")
        raise UserError(f"c4 {split}: none of {', '.join(candidates) or 'no file'} in {root}")
    raise UserError(f"unknown dataset {name!r}; known: wikitext2, ptb, c4")


def _hub(name: str, split: str) -> Corpus:
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            data = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return Corpus(name, split, list(data["text"]), "wikitext/wikitext-2-raw-v1", "rows")
        if name == "ptb":
            data = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return Corpus(name, split, list(data["sentence"]), "ptb_text_only", "rows")
        if name == "c4":
            shard = {"train": "en/c4-train.00000-of-01024.json.gz", "validation": "en/c4-validation.00000-of-00008.json.gz"}
            if split not in shard:
                raise UserError(f"c4 has no {split} split here (train, validation)")
            data = load_dataset("allenai/c4", data_files={split: shard[split]}, split=split)
            return Corpus(name, split, list(data["text"]), f"allenai/c4:{shard[split]}", "documents")
    except UserError:
        raise
    except Exception as error:  # the hub raises many kinds (connection, missing config, ...)
        raise UserError(
            f"cannot load {name} ({split}) from the Hugging Face hub: {str(error).splitlines()[0]}; "
            "offline? pass --data-dir or set LLMQUANT_DATA to a local copy"
        ) from None
    raise UserError(f"unknown dataset {name!r}; known: wikitext2, ptb, c4")


def load_corpus(name_or_path: str, split: str, data_dir: str | os.PathLike | None = None) -> Corpus:
    """A named corpus split (local directory if configured, else the hub) or a local file."""
    if name_or_path not in ("wikitext2", "ptb", "c4"):
        return load_file(name_or_path)
    root = data_dir_from(data_dir)
    return _local(name_or_path, split, root) if root else _hub(name_or_path, split)
