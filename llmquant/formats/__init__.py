"""Checkpoint formats (docs/format.md): the stored form of a linear (packers) and checkpoints
(checkpoint: write, read, convert). The layouts' codecs are in llmquant/layouts/; loading a packed
checkpoint into a runnable model is llmquant/runtime/loader.py."""

from llmquant.formats.checkpoint import FORMATS, convert, is_packed_checkpoint, read_checkpoint, save_fake, save_packed
from llmquant.formats.packers import PackedLinear

__all__ = ["FORMATS", "PackedLinear", "convert", "is_packed_checkpoint", "read_checkpoint", "save_fake", "save_packed"]
