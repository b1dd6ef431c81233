"""The GGUF export (llama.cpp, Ollama, transformers' `gguf_file=`): one `model.gguf`.

Written with the `gguf` package, for LLaMA-family checkpoints (model_type llama; SmolLM2 is one):

- metadata: the architecture's keys from config.json, as llama.cpp's convert_hf_to_gguf.py writes
  them (context/embedding/feed-forward lengths, heads, KV heads, rope base and dimension, RMS eps);
- tokenizer: copied key by key from the GGUF the model was quantized from when there is one (the P1
  model ships as a GGUF: the same tokens, merges, pre-tokenizer and special ids llama.cpp knows it
  by), else built from tokenizer.json (BPE: tokens, token types, merges, special ids);
- tensors: llama.cpp's names (`blk.N.attn_q.weight`, ...), q_proj and k_proj rows permuted as the
  converter does (`LlamaModel.permute`: whole rows move, each with its scales and zeros), quantized
  linears as the blocks of layouts/uniform/export.py, everything else in its stored precision
  (float32 or float16; bfloat16 as float32, which holds it exactly). A tied lm_head is not written
  (llama.cpp and transformers use token_embd then).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmquant.errors import UserError
from llmquant.formats.checkpoint import Checkpoint
from llmquant.layouts.uniform import export as uniform_export

if TYPE_CHECKING:
    from llmquant.export.plan import ExportLinear

GGUF_FILE = "model.gguf"
ARCHITECTURES = ("llama",)
_FILE_TYPES = {"Q4_0": "MOSTLY_Q4_0", "Q5_0": "MOSTLY_Q5_0", "Q8_0": "MOSTLY_Q8_0", "Q4_1": "MOSTLY_Q4_1"}


def check(checkpoint: Checkpoint, src: Path) -> None:
    """What must hold before anything is decoded: an architecture this writer knows."""
    model_type = checkpoint.config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"{src}: model_type {model_type!r}: the GGUF export writes {', '.join(ARCHITECTURES)} models "
            "(each architecture's tensor names and metadata are llama.cpp's own)"
        )


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (convert_hf_to_gguf.py LlamaModel.permute): within each head, the
    two rotary halves interleaved. Works on any [rows, ...] tensor (codes, scales, zeros, weights)."""
    n = rows.shape[0]
    return rows.reshape(heads, 2, n // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_theta(config: dict[str, Any]) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    parameters = config.get("rope_parameters") or {}
    return float(parameters.get("rope_theta", 10000.0))


def _source_gguf(checkpoint: Checkpoint) -> Path | None:
    """The GGUF file the checkpoint's model was loaded from, when its recipe names one."""
    recipe = (checkpoint.quantization.get("info") or {}).get("recipe") or {}
    model = recipe.get("model")
    if not isinstance(model, str):
        return None
    try:
        from llmquant.models.loading import resolve_model_source

        source = resolve_model_source(model)
    except Exception:  # noqa: BLE001 - no source on this machine: fall back to tokenizer.json
        return None
    if source.kind == "gguf" and source.gguf_file:
        path = Path(source.location) / source.gguf_file
        return path if path.is_file() else None
    return None


def _copy_tokenizer(writer, donor: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(donor))
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main, sub)


def _build_tokenizer(writer, src: Path) -> None:
    """A BPE tokenizer.json as GGUF's gpt2 tokenizer (tokens, types, merges, special ids)."""
    import gguf

    path = src / "tokenizer.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the tokenizer for the GGUF export ({exc})") from None
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{path}: a {model.get('type')} tokenizer; the GGUF export builds BPE tokenizers only")
    vocab: dict[str, int] = dict(model.get("vocab") or {})
    special = set()
    for token in data.get("added_tokens") or []:
        vocab[token["content"]] = token["id"]
        if token.get("special"):
            special.add(token["id"])
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocab.items():
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if index in special else gguf.TokenType.NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([int(t) for t in types])
    writer.add_token_merges(merges)
    config = {}
    config_path = src / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
    for role, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id), ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token = config.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if isinstance(token, str) and token in vocab:
            add(vocab[token])


def _plain_array(tensor: torch.Tensor) -> np.ndarray:
    if tensor.dtype == torch.float16:
        return tensor.numpy()
    return tensor.to(torch.float32).numpy()


def write_gguf(
    checkpoint: Checkpoint, linears: dict[str, "ExportLinear"], src: Path, directory: Path, dtype: torch.dtype
) -> list[str]:
    import gguf

    config = checkpoint.config
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    head_dim = int(config.get("head_dim") or hidden // heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    writer = gguf.GGUFWriter(str(directory / GGUF_FILE), "llama")
    writer.add_name(str(config.get("_name_or_path") or src.name))
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(config["vocab_size"]))
    common = Counter(linear.gguf_type for linear in linears.values()).most_common(1)[0][0]
    writer.add_file_type(int(getattr(gguf.LlamaFileType, _FILE_TYPES[common])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    donor = _source_gguf(checkpoint)
    if donor is not None:
        _copy_tokenizer(writer, donor)
    else:
        _build_tokenizer(writer, src)

    def gguf_name(key: str) -> str:
        base, _, suffix = key.rpartition(".")
        name = names.get_name(base)
        if name is None:
            raise UserError(f"{src}: tensor {key} has no GGUF name for the llama architecture")
        return f"{name}.{suffix}"

    def row_heads(key: str) -> int | None:
        if ".self_attn.q_proj." in key + ".":
            return heads
        if ".self_attn.k_proj." in key + ".":
            return kv_heads
        return None

    entries: list[tuple[str, Any, Any]] = []
    for key, tensor in sorted(checkpoint.plain.items()):
        array = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if (h := row_heads(key)) is not None:
            array = permute_rows(array, h)
        entries.append((gguf_name(key), _plain_array(array.contiguous()), None))
    for name, linear in sorted(linears.items()):
        tensors = linear.tensors
        if (h := row_heads(name + ".weight")) is not None:
            tensors = {k: permute_rows(t, h) if k != "g_idx" else t for k, t in tensors.items()}
        blocks = uniform_export.to_gguf(tensors, linear.meta, linear.gguf_type)
        entries.append((gguf_name(name + ".weight"), blocks, getattr(gguf.GGMLQuantizationType, linear.gguf_type)))
    for name, array, qtype in entries:
        if qtype is None:
            writer.add_tensor(name, array)
        else:
            writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [GGUF_FILE]
