"""Shared fixtures: tiny random transformers models with a real byte-level tokenizer, built in code.

No hub access: every model is made from a transformers config here, saved with save_pretrained,
and loaded back the way a user's model directory would be.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VOCAB = 256 + 2  # one token per byte, plus two specials


def byte_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A real tokenizer (one token per byte, no BOS) that handles any text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<unk>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def bos_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """The byte tokenizer plus a BOS token that its default encoding puts first, as Gemma's (and
    LLaMA-3's, Mistral's) tokenizers do: `<bos>` has id VOCAB, through a template post-processor."""
    from tokenizers import processors

    tok = byte_tokenizer()._tokenizer
    bos = VOCAB
    tok.add_special_tokens(["<bos>"])
    assert tok.token_to_id("<bos>") == bos
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")


def tiny_config(arch: str, layers: int = 2):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, tie_word_embeddings=True)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common)
    if arch == "gemma3":
        return transformers.Gemma3TextConfig(
            **common,
            head_dim=16,
            sliding_window=8,
            layer_types=["sliding_attention"] * (layers - 1) + ["full_attention"],
        )
    if arch == "opt":
        return transformers.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            ffn_dim=96,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
        )
    raise ValueError(arch)


def tiny_model(arch: str = "llama", layers: int = 2, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, layers))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny random LLaMA model directory with its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Runs a module's tests with one torch thread (thread count changes float reductions)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data not available")
    return SHARED_DATA


@pytest.fixture()
def text_file(tmp_path) -> Path:
    """A small real-text file (WikiText-2 test head when available, else generated prose)."""
    source = SHARED_DATA / "wikitext-2-raw" / "wiki.test.raw"
    text = source.read_text()[:20000] if source.is_file() else " ".join(f"sentence {i} about things." for i in range(2000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Without CUDA, Triton kernels run in Triton's CPU interpreter; it is chosen when triton is first
# imported, so it must be set before any test imports a kernel module.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def gptq3_records(model) -> dict:
    """Every decoder linear of `model` quantized with GPTQ 3-bit, groups of 32, on a seeded random
    Hessian per linear (no calibration run): records for save_packed / save_fake."""
    from llmquant.methods import get_method_class

    gptq = get_method_class("gptq")
    method = gptq(gptq.Config(bits=3, group_size=32))
    g = torch.Generator().manual_seed(0)
    records = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            x = torch.randn(128, module.in_features, generator=g)
            records[name] = method.quantize(name, module.weight.detach().float().clone(), 2 * x.T @ x / 128)
    return records
