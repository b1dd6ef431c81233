"""transformers integration (llmquant/hf_quantizer.py): after `import llmquant`,
AutoModelForCausalLM.from_pretrained(native_dir) returns the packed model, and save_pretrained of it
writes a native checkpoint that llmquant verifies and loads to the same tensors and logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers

import llmquant
from llmquant.formats.checkpoint import read_checkpoint
from llmquant.runtime.loader import load_quantized, verify_checkpoint
from llmquant.runtime.qlinear import QuantizedLinear, resolve_backend, set_backend
from test_export import TOKENS, logits, quantized_tiny


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf") / "native"
    # Two settings, act-order included, so every stored tensor kind goes through transformers.
    _, records = quantized_tiny(directory, "gptq", {"bits": 3, "group_size": 16, "sym": False, "act_order": True}, seed=4)
    return directory, records


def test_importing_llmquant_does_not_import_transformers():
    code = "import sys, llmquant; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_from_pretrained_returns_the_packed_model(native):
    directory, records = native
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    reference = llmquant.load(directory)
    for name in records:
        module = model.get_submodule(name)
        assert isinstance(module, QuantizedLinear)
        assert module.backend == resolve_backend("auto", torch.device("cpu"))
        assert torch.equal(module.dequantize(), records[name].dequantized)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert not any(t.is_meta for t in model.state_dict().values())
    assert torch.equal(logits(model), logits(reference))
    set_backend(model, "torch")  # the reference backend: the fake-quant model's logits (tests/test_format.py)
    set_backend(reference, "torch")
    assert torch.equal(logits(model), logits(reference))


def test_from_pretrained_in_half_precision(native):
    directory, _ = native
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float16)
    reference = load_quantized(directory, dtype=torch.float16)
    assert model.dtype == torch.float16
    set_backend(model, "torch")
    set_backend(reference, "torch")
    assert torch.equal(logits(model), logits(reference))


def test_save_pretrained_writes_a_native_checkpoint(native, tmp_path):
    directory, _ = native
    model = transformers.AutoModelForCausalLM.from_pretrained(directory)
    model.save_pretrained(tmp_path / "again")
    assert verify_checkpoint(tmp_path / "again")["ok"]
    before, after = read_checkpoint(directory), read_checkpoint(tmp_path / "again")
    assert after.fmt == "packed" and set(after.linears) == set(before.linears)
    for name, linear in before.linears.items():
        assert after.linears[name].descriptor() == linear.descriptor()
        for key, tensor in linear.tensors.items():
            assert torch.equal(after.linears[name].tensors[key], tensor), (name, key)
    assert set(after.plain) == set(before.plain)
    assert all(torch.equal(after.plain[k], before.plain[k]) for k in before.plain)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "again")
    assert torch.equal(logits(reloaded), logits(model))
    with torch.no_grad():
        assert reloaded(TOKENS).logits.isfinite().all()
