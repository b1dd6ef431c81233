"""Exports (llmquant/export, layouts/uniform/export.py) read back by the third parties' own readers:
compressed-tensors' decompressor and compressor, transformers' from_pretrained (compressed-tensors),
gguf's reader and transformers' `gguf_file=` loader. GPTQ: transformers needs optimum + gptqmodel
to read it, and gptqmodel 7.7 needs torch >= 2.14.1 (this project pins 2.13), so the GPTQ files are
read by `gptq_v2_dequantize` below, a transcription of GPTQModel 7.7.0's `dequantize_weight`
(gptqmodel/nn_modules/qlinear/__init__.py: the 2/4/8-bit shift-and-mask and the 3-bit word
interleave) that shares no code with llmquant's bit packing.

Exact means: the reader's weights equal llmquant's decode (at the reader's dtype: compressed-tensors
dequantizes in the scales' fp16, and s * (c - z) rounded once to fp16 is what the fp16 fake-quant
model holds), and the logits equal the fake-quant model's at that dtype.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from conftest import byte_tokenizer, tiny_config
from llmquant.core.record import QuantizedRecord
from llmquant.formats import packers
from llmquant.formats.checkpoint import read_checkpoint, save_packed
from llmquant.layouts import decode
from llmquant.layouts.uniform import export as uniform_export
from llmquant.methods import get_method_class
from layout_cases import CASES, build
from test_fuzz import run_cli

TOKENS = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(3))


def quantized_tiny(directory: Path, method: str, config: dict, hand: dict | None = None, seed: int = 0):
    """A tiny LLaMA (64 wide, 96 MLP, 2 KV heads of 16) with every decoder linear quantized by
    `method` (hand-made records of other layouts for the names in `hand`), saved packed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    cls = get_method_class(method)
    g = torch.Generator().manual_seed(seed + 1)
    records = {}
    for name, module in model.named_modules():
        if not (isinstance(module, torch.nn.Linear) and ".layers." in name):
            continue
        weight = module.weight.detach().float().clone()
        if hand and name in hand:
            layout, tensors, meta, _, figure = build(hand[name], *weight.shape, seed=seed)
            records[name] = QuantizedRecord(decode(layout, tensors, meta), layout, tensors, meta, figure)
            continue
        inputs = torch.randn(128, weight.shape[1], generator=g)
        records[name] = cls(cls.Config(**config)).quantize(name, weight, 2 * inputs.T @ inputs / 128)
    directory.mkdir(parents=True)
    save_packed(model, records, directory, {"method": method})
    byte_tokenizer().save_pretrained(directory)
    return model, records


def fake_quant(src: Path, directory: Path, dtype):
    """The fake-quant model (`llmquant pack --format fake`), loaded by transformers at `dtype`."""
    code, err = run_cli("pack", "--model", str(src), "--output", str(directory), "--format", "fake", "--quiet")
    assert code == 0, err
    return transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=dtype).eval()


@pytest.fixture(scope="module")
def rtn4(tmp_path_factory):
    """Asymmetric 4-bit g32 (RTN)."""
    directory = tmp_path_factory.mktemp("exp") / "rtn4"
    model, records = quantized_tiny(directory, "rtn", {"bits": 4, "group_size": 32, "sym": False})
    return directory, model, records


@pytest.fixture(scope="module")
def gptq3(tmp_path_factory):
    """Asymmetric 3-bit g32 (GPTQ)."""
    directory = tmp_path_factory.mktemp("exp") / "gptq3"
    model, records = quantized_tiny(directory, "gptq", {"bits": 3, "group_size": 32, "sym": False})
    return directory, model, records


def export(src: Path, dst: Path, fmt: str, *extra: str) -> dict:
    code, err = run_cli("pack", "--model", str(src), "--output", str(dst), "--format", fmt, "--quiet", *extra)
    assert code == 0, err
    return json.loads((dst / "llmquant-export.json").read_text())


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


# --------------------------------------------------------------------------------------------------
# compressed-tensors


def ct_scheme(directory: Path, group: str = "group_0"):
    from compressed_tensors.quantization import QuantizationScheme

    config = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    spec = config["config_groups"][group]
    return QuantizationScheme(targets=spec["targets"], weights=spec["weights"]), config


def module_tensors(tensors: dict, name: str) -> dict:
    return {key[len(name) + 1 :]: t for key, t in tensors.items() if key.startswith(name + ".") and key.count(".") == name.count(".") + 1}


@pytest.mark.parametrize("widen", [False, True])
def test_compressed_tensors_reads_back_exactly(rtn4, tmp_path, widen):
    """Asymmetric 4-bit as is, and widened to symmetric 5-bit: compressed-tensors' decompressor gives
    llmquant's decode, and its own compressor, fed the decoded weights and our scales/zeros, writes
    the same words (zero points packed along the rows with the +2^(b-1) offset)."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    src, _, records = rtn4
    summary = export(src, tmp_path / "ct", "compressed-tensors", *(["--sym-widen"] if widen else []))
    scheme, config = ct_scheme(tmp_path / "ct")
    assert scheme.weights.num_bits == (5 if widen else 4) and scheme.weights.symmetric == widen
    assert config["ignore"] == ["lm_head"] and config["config_groups"]["group_0"]["targets"] == ["Linear"]
    assert all(entry["widened"] == widen for entry in summary["linears"].values())
    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    checkpoint = read_checkpoint(src)
    for name, linear in checkpoint.linears.items():
        mine = module_tensors(stored, name)
        weight = PackedQuantizationCompressor.decompress(dict(mine), scheme)["weight"]
        expected = packers.dequantize(linear).half()
        assert weight.dtype == torch.float16 and torch.equal(weight, expected), name
        assert torch.equal(expected.float(), records[name].dequantized.half().float())
        # compressed-tensors' own writer: its quantize() of the decoded weight with our parameters.
        tensors = packers.unpack(linear)
        offset = 1 << (scheme.weights.num_bits - 1)
        state = {"weight": expected, "weight_scale": tensors["scales"]}
        if not widen:
            state["weight_zero_point"] = (tensors["zeros"].to(torch.int16) - offset).to(torch.int8)
        theirs = PackedQuantizationCompressor.compress(state, scheme)
        assert set(theirs) == set(mine) - {"bias"}
        for key in theirs:
            assert torch.equal(theirs[key], mine[key]), (name, key)


def test_transformers_loads_the_compressed_tensors_export(rtn4, tmp_path):
    """from_pretrained of the export: dequantized at load (asymmetric and symmetric) the weights are
    llmquant's; the compressed model (decompressed at its first forward) gives the fp16 fake-quant
    logits exactly (symmetric: transformers 5.25 builds the asymmetric compressed modules with an
    unpacked zero-point parameter and refuses the packed one compressed-tensors writes)."""
    from transformers import CompressedTensorsConfig

    src, model, records = rtn4
    export(src, tmp_path / "asym", "compressed-tensors")
    export(src, tmp_path / "sym", "compressed-tensors", "--sym-widen")
    for kind in ("asym", "sym"):
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / kind, dtype=torch.float16, quantization_config=CompressedTensorsConfig(dequantize=True)
        )
        for name, record in records.items():
            assert torch.equal(loaded.get_submodule(name).weight, record.dequantized.half()), (kind, name)
    compressed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sym", dtype=torch.float16)
    assert hasattr(compressed.model.layers[0].self_attn.q_proj, "weight_packed")
    assert torch.equal(logits(compressed), logits(fake_quant(src, tmp_path / "fake", torch.float16)))


# --------------------------------------------------------------------------------------------------
# GPTQ (v2)


def gptq_v2_dequantize(qweight, qzeros, scales, g_idx, bits, in_features):
    """GPTQModel 7.7.0 `dequantize_weight` (v2 zeros: no +1), transcribed; fp32 result [out, in]."""
    maxq = (1 << bits) - 1
    if bits in (2, 4, 8):
        pack = 32 // bits
        shifts = torch.arange(0, 32, bits, dtype=torch.int32)
        zeros = (qzeros.unsqueeze(2).expand(-1, -1, pack) >> shifts.unsqueeze(0)) & maxq
        zeros = zeros.reshape(qzeros.shape[0], -1)[:, : scales.shape[1]]
        weight = (qweight.unsqueeze(1).expand(-1, pack, -1) >> shifts.unsqueeze(-1)) & maxq
    else:  # 3 bits: 32 values in 3 words, values 10 and 21 straddle words
        shifts = torch.tensor(
            [[0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0], [0, 1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31], [0, 2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0]],
            dtype=torch.int32,
        )
        zeros = qzeros.reshape(qzeros.shape[0], qzeros.shape[1] // 3, 3, 1).expand(-1, -1, -1, 12)
        zeros = zeros >> shifts.reshape(1, 1, 3, 12)
        zeros[:, :, 0, 10] = (zeros[:, :, 0, 10] & 0x3) | ((zeros[:, :, 1, 0] << 2) & 0x4)
        zeros[:, :, 1, 11] = (zeros[:, :, 1, 11] & 0x1) | ((zeros[:, :, 2, 0] << 1) & 0x6)
        zeros = zeros & 0x7
        zeros = torch.cat([zeros[:, :, 0, :11], zeros[:, :, 1, 1:12], zeros[:, :, 2, 1:11]], dim=2).reshape(scales.shape)
        weight = qweight.reshape(qweight.shape[0] // 3, 3, 1, qweight.shape[1]).expand(-1, -1, 12, -1)
        weight = (weight >> shifts.reshape(1, 3, 12, 1)) & 0x7
        weight[:, 0, 10] = (weight[:, 0, 10] & 0x3) | ((weight[:, 1, 0] << 2) & 0x4)
        weight[:, 1, 11] = (weight[:, 1, 11] & 0x1) | ((weight[:, 2, 0] << 1) & 0x6)
        weight = weight & 0x7
        weight = torch.cat([weight[:, 0, :11], weight[:, 1, 1:12], weight[:, 2, 1:11]], dim=1)
    weight = weight.reshape(-1, weight.shape[-1])[:in_features]
    g = g_idx.long()
    return (scales[g].float() * (weight.float() - zeros[g].float())).T


@pytest.mark.parametrize("which", ["rtn4", "gptq3", "gptq3-widened"])
def test_gptq_v2_export_reads_back_exactly(which, rtn4, gptq3, tmp_path):
    src, _, records = rtn4 if which == "rtn4" else gptq3
    widen = which.endswith("widened")
    export(src, tmp_path / "gptq", "gptq", *(["--sym-widen"] if widen else []))
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    bits = 4 if which != "gptq3" else 3
    assert config["quant_method"] == "gptq" and config["checkpoint_format"] == "gptq_v2"
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (bits, 32, widen, False)
    stored = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, record in records.items():
        rows, cols = record.dequantized.shape
        t = module_tensors(stored, name)
        assert t["qweight"].shape == (cols * bits // 32, rows) and t["qzeros"].shape == (cols // 32, rows * bits // 32)
        weight = gptq_v2_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, cols)
        assert torch.equal(weight, record.dequantized), name
        if widen:  # symmetric v2 zeros are 2^(b-1) everywhere, stored explicitly
            zeros = gptq_v2_dequantize(t["qweight"] * 0, t["qzeros"], torch.ones_like(t["scales"]), t["g_idx"], bits, cols)
            assert bool((zeros == -8).all())


def test_gptq_export_of_act_order_keeps_g_idx(tmp_path):
    src = tmp_path / "act"
    _, records = quantized_tiny(src, "gptq", {"bits": 4, "group_size": 32, "sym": True, "act_order": True})
    export(src, tmp_path / "gptq", "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert config["desc_act"] is True
    stored = load_file(str(tmp_path / "gptq" / "model.safetensors"))
    for name, record in records.items():
        t = module_tensors(stored, name)
        assert torch.equal(t["g_idx"], record.tensors["g_idx"].int())
        assert torch.equal(gptq_v2_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, t["g_idx"].numel()), record.dequantized)


# --------------------------------------------------------------------------------------------------
# Refusals: one line naming the linear, exit 2, nothing written


def refused(src: Path, dst: Path, fmt: str, *extra: str) -> str:
    code, err = run_cli("pack", "--model", str(src), "--output", str(dst), "--format", fmt, *extra)
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert not dst.exists() and not any(p.name.startswith(f".{dst.name}") for p in dst.parent.iterdir())
    return " ".join(lines[0].split())


def test_refusals_name_the_linear_and_the_reason(rtn4, gptq3, tmp_path):
    rtn, gptq = rtn4[0], gptq3[0]
    message = refused(gptq, tmp_path / "o", "compressed-tensors")
    assert "asymmetric 3-bit" in message and "--sym-widen" in message and "model.layers." in message
    assert "holds it exactly" in refused(rtn, tmp_path / "o", "gguf", "--gguf-type", "q4_0")
    assert "--allow-approximate" in refused(rtn, tmp_path / "o", "gguf", "--gguf-type", "q4_1")
    assert "--sym-widen" in refused(rtn, tmp_path / "o", "packed", "--sym-widen")
    g64 = tmp_path / "g64"  # the MLP's 96 columns leave a 32-column last group
    quantized_tiny(g64, "rtn", {"bits": 4, "group_size": 64, "sym": True})
    for fmt in ("compressed-tensors", "gptq"):
        message = refused(g64, tmp_path / "o", fmt)
        assert "model.layers.0.mlp.down_proj: group size 64 does not divide in_features 96" in message
    w5 = tmp_path / "w5"
    quantized_tiny(w5, "rtn", {"bits": 5, "group_size": 32, "sym": True})
    assert "5-bit: GPTQ kernels read 2, 3, 4, 8 bits" in refused(w5, tmp_path / "o", "gptq")


@pytest.mark.parametrize("case", ["mixed-1to4", "partial_binary-3bit-0.3", "binary_residual"])
def test_layouts_without_an_exact_home_are_refused_naming_theirs(case, tmp_path):
    src = tmp_path / "src"
    quantized_tiny(src, "rtn", {"bits": 4, "group_size": 32}, hand={"model.layers.1.mlp.up_proj": case})
    layout = case.split("-")[0]
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        message = refused(src, tmp_path / "o", fmt)
        assert message.startswith(f"error: model.layers.1.mlp.up_proj: the {layout} layout has no exact home in {fmt}")
        assert "native and fake" in message


def test_gptq_needs_one_setting_and_every_decoder_linear(tmp_path):
    src = tmp_path / "mixedbits"
    torch.manual_seed(0)
    quantized_tiny(src, "rtn", {"bits": 4, "group_size": 32}, hand={"model.layers.1.mlp.up_proj": "uniform-2bit"})
    message = refused(src, tmp_path / "o", "gptq")
    assert "differs from" in message and "compressed-tensors holds several" in message
    export(src, tmp_path / "ct", "compressed-tensors", "--sym-widen")  # several config groups instead
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    assert len(config["config_groups"]) == 2


# --------------------------------------------------------------------------------------------------
# GGUF


GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def gguf_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every linear's weight as gguf's own reader dequantizes it, under llmquant's module names, in
    llama.cpp's q/k row order; with each tensor's type name."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    found = {}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if parts[0] != "blk" or parts[2] not in GGUF_NAMES.values():
            continue
        module = {v: k for k, v in GGUF_NAMES.items()}[parts[2]]
        prefix = "self_attn" if module.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
        weight = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        found[f"model.layers.{parts[1]}.{prefix}.{module}"] = (weight, tensor.tensor_type.name)
    return found


@pytest.mark.parametrize(
    "method, config, qtype",
    [
        ("rtn", {"bits": 3, "group_size": 32, "sym": False}, "Q4_0"),  # c - z in [-7, 7]
        ("rtn", {"bits": 4, "group_size": 32, "sym": False}, "Q5_0"),  # [-15, 15]
        ("gptq", {"bits": 4, "group_size": -1, "sym": True}, "Q4_0"),  # per-row scales, q = c
        ("rtn", {"bits": 8, "group_size": 64, "sym": True}, "Q8_0"),  # [-128, 127]
    ],
)
def test_gguf_export_reads_back_exactly(method, config, qtype, tmp_path):
    from llmquant.export.gguf import permute_rows

    src = tmp_path / "src"
    _, records = quantized_tiny(src, method, config)
    summary = export(src, tmp_path / "gguf", "gguf")
    weights = gguf_weights(tmp_path / "gguf" / "model.gguf")
    assert set(weights) == set(records)
    for name, record in records.items():
        expected = record.dequantized
        if name.endswith("q_proj"):
            expected = permute_rows(expected, 4)  # llama.cpp's rotary row order (heads=4, kv heads=2)
        elif name.endswith("k_proj"):
            expected = permute_rows(expected, 2)
        weight, found = weights[name]
        assert found == qtype and summary["linears"][name]["gguf_type"] == qtype
        assert torch.equal(weight, expected), name
        assert summary["linears"][name]["max_abs_delta"] == 0.0


def test_transformers_loads_the_gguf_export_exactly(gptq3, tmp_path):
    """transformers' gguf_file= loader (which reverses the q/k permutation): the decoded weights,
    and the logits of llmquant's packed model (reference backend) at float32."""
    import llmquant
    from llmquant.runtime.qlinear import set_backend

    src, _, records = gptq3
    export(src, tmp_path / "gguf", "gguf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file="model.gguf", dtype=torch.float32)
    for name, record in records.items():
        assert torch.equal(model.get_submodule(name).weight, record.dequantized), name
    native = llmquant.load(src)
    set_backend(native, "torch")
    assert torch.equal(logits(model), logits(native))


def test_gguf_q4_1_only_with_allow_approximate_and_its_error_reported(rtn4, tmp_path):
    from llmquant.export.gguf import permute_rows

    src, _, records = rtn4
    summary = export(src, tmp_path / "q41", "gguf", "--gguf-type", "q4_1", "--allow-approximate")
    weights = gguf_weights(tmp_path / "q41" / "model.gguf")
    deltas = []
    for name, record in records.items():
        weight, found = weights[name]
        assert found == "Q4_1"
        heads = 4 if name.endswith("q_proj") else 2 if name.endswith("k_proj") else None
        expected = permute_rows(record.dequantized, heads) if heads else record.dequantized
        delta = float((weight - expected).abs().max())
        assert delta == pytest.approx(summary["linears"][name]["max_abs_delta"], abs=0)
        deltas.append(delta)
    assert max(deltas) > 0  # m = -s*z rounded to fp16: not exact, and said so
