"""The packed format: layout codecs, checkpoints (native and fake), the loader, conversion, errors.

Records of every layout are built from random tensors that follow the layout schema
(tests/layout_cases.py); the tiny-LLaMA tests mix them with real RTN/GPTQ records.
"""

import copy
import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from layout_cases import CASES, build
from llmquant.core.record import QuantizedRecord
from llmquant.errors import UserError
from llmquant.formats import convert, is_packed_checkpoint, packers, save_fake, save_packed
from llmquant.runtime import load_quantized
from llmquant.formats.checkpoint import RECORDS_FILE, WEIGHTS_FILE
from llmquant.methods import available_methods, get_method_class
from llmquant.runtime import QuantizedLinear, available_backends, register_backend, set_backend
from llmquant.layouts import decode
from llmquant.layouts.partial_binary import partial_binary_bits
from llmquant.runtime.qlinear import torch_backend

SHAPES = [(1, 7), (130, 257), (33, 100)]  # 257, 100, 7: not multiples of 8 or of any group size


def check_round_trip(layout, tensors, meta):
    packed = packers.pack(layout, tensors, meta)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in packed.tensors.values())
    unpacked = packers.unpack(packed)
    assert set(unpacked) == set(tensors)
    for key in tensors:
        assert unpacked[key].dtype == tensors[key].dtype, key
        assert torch.equal(unpacked[key], tensors[key]), key
    assert torch.equal(packers.dequantize(packed), decode(layout, tensors, meta))
    return packed


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_exact_and_storage_matches_the_rules(case, shape):
    layout, tensors, meta, expected_bytes, figure = build(case, *shape)
    packed = check_round_trip(layout, tensors, meta)
    assert packed.nbytes == expected_bytes
    numel = shape[0] * shape[1]
    if numel >= 3000:  # smaller layers round to whole bytes by more than 1%
        assert packed.nbytes * 8 / numel == pytest.approx(figure.storage, rel=0.01)


@pytest.mark.parametrize(
    "case", ["uniform-3bit", "mixed-1to4", "partial_binary-4bit-0.02", "partial_binary-8bit-0.3", "binary_residual"]
)
def test_round_trip_at_model_scale(case):
    layout, tensors, meta, expected_bytes, figure = build(case, 576, 1536)
    packed = check_round_trip(layout, tensors, meta)
    assert packed.nbytes == expected_bytes
    assert packed.nbytes * 8 / (576 * 1536) == pytest.approx(figure.storage, rel=0.01)


@pytest.mark.parametrize("method", sorted(available_methods()))
def test_every_registered_method_packs_exactly_into_its_storage_figure(method):
    """The contract seen from the methods' side: their records round-trip, and their own storage
    figure is the packed size (the hand-built records above check the rules independently)."""
    g = torch.Generator().manual_seed(2)
    weight, inputs = torch.randn(48, 160, generator=g), torch.randn(256, 160, generator=g)
    cls = get_method_class(method)
    backend = cls(cls.Config())
    observer = backend.observer("w", weight.clone(), 2 * inputs.T @ inputs / 256)
    if observer is not None:
        for chunk in inputs.split(64):
            observer.update(chunk, chunk @ weight.T)
    record = backend.quantize("w", weight.clone(), 2 * inputs.T @ inputs / 256, observer)
    packed = check_round_trip(record.layout, record.tensors, record.meta)
    assert torch.equal(packers.dequantize(packed), record.dequantized)
    assert packed.nbytes * 8 / weight.numel() == pytest.approx(record.bits.storage, rel=0.01)


def test_partial_binary_picks_the_smaller_index():
    formats = {}
    for share in (0.02, 0.3):
        layout, tensors, meta, _, _ = build(f"partial_binary-3bit-{share}", 130, 257)
        packed = packers.pack(layout, tensors, meta)
        formats[share] = packed.encoding["index_format"]
        salient = int(tensors["salient_mask"].sum())
        assert formats[share] == partial_binary_bits(130, 257, salient, 3, 64).index_format
        index = {"salient_cols", "salient_row_ends"} if formats[share] == "csr" else {"salient_mask"}
        assert index <= set(packed.tensors)
    assert formats == {0.02: "csr", 0.3: "bitmap"}


def test_unused_elements_do_not_matter_and_come_back_as_zero():
    layout, tensors, meta, _, _ = build("partial_binary-4bit-0.3", 40, 50)
    noisy = dict(tensors, signs=torch.rand(40, 50) < 0.5)  # signs at salient positions are never read
    packed = packers.pack(layout, noisy, meta)
    assert torch.equal(packers.dequantize(packed), decode(layout, noisy, meta))
    assert torch.equal(packers.unpack(packed)["signs"], noisy["signs"] & ~tensors["salient_mask"])

    layout, tensors, meta, _, _ = build("binary_residual", 40, 50)
    noisy = dict(tensors, signs2=torch.rand(40, 50) < 0.5, sparse_mask=torch.rand(40, 50) < 0.5)
    packed = packers.pack(layout, noisy, meta)
    assert torch.equal(packers.dequantize(packed), decode(layout, noisy, meta))
    unpacked = packers.unpack(packed)
    salient = tensors["salient_columns"]
    assert torch.equal(unpacked["signs2"], noisy["signs2"] & salient)
    assert torch.equal(unpacked["sparse_mask"], noisy["sparse_mask"] & ~salient)


def test_records_that_break_their_layout_are_refused_at_pack_time():
    layout, tensors, meta, _, _ = build("uniform-3bit-sym", 8, 64)
    with pytest.raises(ValueError, match="symmetric"):
        packers.pack(layout, dict(tensors, zeros=tensors["zeros"] - 1), meta)
    with pytest.raises(ValueError, match="outside"):
        packers.pack(layout, dict(tensors, codes=tensors["codes"] | 8), meta)
    layout, tensors, meta, _, _ = build("mixed-1to4", 8, 64)
    with pytest.raises(ValueError, match="integers"):
        packers.pack(layout, dict(tensors, zeros=tensors["zeros"] + 0.25), meta)
    with pytest.raises(ValueError, match="unknown layout"):
        packers.pack("ternary", tensors, meta)
    with pytest.raises(ValueError, match=r"meta\['group_size'\] must be an integer"):
        packers.pack(layout, tensors, dict(meta, group_size=32.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["uniform-4bit-g_idx", "mixed-1to4", "partial_binary-5bit-0.02", "binary_residual"])
def test_quantized_linear_matches_a_linear_holding_the_decoded_weight(case, dtype):
    layout, tensors, meta, _, _ = build(case, 24, 40)
    packed = packers.pack(layout, tensors, meta)
    bias = torch.randn(24).to(dtype)
    module = QuantizedLinear(packed, bias)
    reference = torch.nn.Linear(40, 24, dtype=dtype)
    reference.weight.data = decode(layout, tensors, meta).to(dtype)
    reference.bias.data = bias
    x = torch.randn(3, 5, 40).to(dtype)
    assert torch.equal(module(x), reference(x))
    assert module.nbytes == packed.nbytes


CALLS = []


def recording_backend(module, x):
    CALLS.append(module.layout)
    return torch_backend(module, x)


register_backend("test-recording", recording_backend)


def test_backends_are_chosen_per_module_by_name():
    layout, tensors, meta, _, _ = build("mixed-1to4", 8, 16)
    model = torch.nn.Sequential(QuantizedLinear(packers.pack(layout, tensors, meta)), torch.nn.ReLU())
    x = torch.randn(2, 16)
    expected = model(x)
    CALLS.clear()
    assert set(available_backends()) >= {"torch", "test-recording"}
    assert set_backend(model, "test-recording") == 1
    assert torch.equal(model(x), expected) and CALLS == ["mixed"]
    with pytest.raises(ValueError, match="unknown backend 'no-such-kernel'"):
        set_backend(model, "no-such-kernel")
    with pytest.raises(ValueError, match="already registered"):
        register_backend("torch", recording_backend)


def test_casting_the_module_does_not_round_its_stored_parameters():
    layout, tensors, meta, _, _ = build("partial_binary-8bit-0.3", 24, 40)
    packed = packers.pack(layout, tensors, meta)
    module = QuantizedLinear(packed)
    weight = module.dequantize()
    module.to(torch.bfloat16)  # converts floating-point buffers: fp16 scales held as fp16 would be rounded
    assert torch.equal(module.dequantize(), weight)
    assert all(torch.equal(module.packed().tensors[k], t) for k, t in packed.tensors.items())


# --------------------------------------------------------------------------------------------------
# A tiny LLaMA with tied embeddings: every layout, real RTN and GPTQ records, some linears left alone


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng():  # seeded weights without reseeding everyone else's generator
        torch.manual_seed(0)
        return LlamaForCausalLM(config).eval()


def method_record(method, config, name, weight, g):
    inputs = torch.randn(256, weight.shape[1], generator=g)
    hessian = 2 * inputs.T @ inputs / inputs.shape[0]
    cls = get_method_class(method)
    return cls(cls.Config(**config)).quantize(name, weight.detach().float().clone(), hessian)


def hand_record(case, weight, g):
    builder, kwargs = CASES[case]
    layout, tensors, meta, _, figure = builder(*weight.shape, g, **kwargs)
    return QuantizedRecord(decode(layout, tensors, meta), layout, tensors, meta, figure)


def quantize_tiny(model):
    g = torch.Generator().manual_seed(1)
    plan = {
        "model.layers.0.self_attn.q_proj": ("rtn", {"bits": 4, "group_size": 32}),
        "model.layers.0.self_attn.k_proj": ("gptq", {"bits": 3, "group_size": 16, "sym": True, "act_order": True}),
        "model.layers.0.self_attn.v_proj": ("gptq", {"bits": 2, "group_size": -1}),
        "model.layers.0.self_attn.o_proj": "mixed-1to4",
        "model.layers.0.mlp.gate_proj": "partial_binary-6bit-0.02",
        "model.layers.0.mlp.up_proj": "partial_binary-3bit-0.3",
        "model.layers.0.mlp.down_proj": "binary_residual",
        "model.layers.1.self_attn.q_proj": ("rtn", {"bits": 8, "group_size": 64}),
        "model.layers.1.mlp.gate_proj": ("gptq", {"bits": 4, "group_size": 32}),
        "model.layers.1.mlp.down_proj": "mixed-2and8",
    }
    records = {}
    for name, how in plan.items():
        weight = model.get_submodule(name).weight
        if isinstance(how, str):
            records[name] = hand_record(how, weight, g)
        else:
            records[name] = method_record(*how, name, weight, g)
    return records


def fake_quant(model, records, dtype):
    """The reference: the same model with the decoded weights in ordinary nn.Linear modules."""
    fake = copy.deepcopy(model).to(dtype)
    for name, record in records.items():
        fake.get_submodule(name).weight.data = record.dequantized.to(dtype)
    return fake


@pytest.fixture(scope="module")
def tiny():
    model = tiny_llama()
    return model, quantize_tiny(model)


@pytest.fixture(scope="module")
def native_dir(tiny, tmp_path_factory):
    model, records = tiny
    directory = tmp_path_factory.mktemp("packed")
    save_packed(model, records, directory, {"method": "mixed-test", "recipe_hash": "abc"})
    return directory


@pytest.fixture(scope="module")
def fake_dir(tiny, tmp_path_factory):
    model, records = tiny
    directory = tmp_path_factory.mktemp("fake")
    save_fake(model, records, directory, {"method": "mixed-test"})
    return directory


TOKENS = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(5))


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def test_native_checkpoint_contents(tiny, native_dir):
    model, records = tiny
    config = json.loads((native_dir / "config.json").read_text())
    quantization = config["quantization_config"]
    assert quantization["quant_method"] == "llmquant" and quantization["format_version"] == 1
    assert quantization["modules"] == {name: r.layout for name, r in records.items()}
    assert set(quantization["bits"]) == {"paper", "code", "storage"}
    assert quantization["info"] == {"method": "mixed-test", "recipe_hash": "abc"}
    assert is_packed_checkpoint(native_dir)
    with safe_open(str(native_dir / WEIGHTS_FILE), "pt") as file:
        keys = set(file.keys())
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys  # tied: stored once
    assert not any(f"{name}.weight" in keys for name in records)
    assert "model.layers.1.mlp.up_proj.weight" in keys  # not quantized: stored as is


def test_packed_model_gives_the_fake_quant_logits_exactly(tiny, native_dir):
    model, records = tiny
    loaded = load_quantized(native_dir)
    assert loaded.dtype == torch.float32
    for name, record in records.items():
        module = loaded.get_submodule(name)
        assert isinstance(module, QuantizedLinear) and module.layout == record.layout
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(p.is_meta for p in loaded.parameters())
    assert torch.equal(logits(loaded), logits(fake_quant(model, records, torch.float32)))


def test_cached_backend_gives_the_same_logits(native_dir):
    loaded = load_quantized(native_dir)
    reference = logits(loaded)
    assert set_backend(loaded, "torch-cached") > 0
    assert torch.equal(logits(loaded), reference)
    assert torch.equal(logits(loaded), reference)  # second call uses the kept weights


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_models_in_both_formats_agree(tiny, dtype, tmp_path):
    model, records = tiny
    half = copy.deepcopy(model).to(dtype)
    for fmt in ("packed", "fake"):
        (tmp_path / fmt).mkdir()
    save_packed(half, records, tmp_path / "packed", {})
    save_fake(half, records, tmp_path / "fake")
    loaded = load_quantized(tmp_path / "packed")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "fake")
    assert loaded.dtype == plain.dtype == dtype
    for name in records:
        decoded = loaded.get_submodule(name).dequantize().to(dtype)
        assert torch.equal(decoded, plain.get_submodule(name).weight)
    assert torch.equal(logits(loaded), logits(plain))


def test_fake_checkpoint_loads_with_plain_transformers(tiny, fake_dir):
    model, records = tiny
    config = json.loads((fake_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert not is_packed_checkpoint(fake_dir) and (fake_dir / RECORDS_FILE).is_file()
    plain = AutoModelForCausalLM.from_pretrained(fake_dir)
    assert torch.equal(logits(plain), logits(fake_quant(model, records, torch.float32)))


def test_convert_both_ways(tiny, native_dir, fake_dir, tmp_path):
    model, records = tiny
    reference = logits(fake_quant(model, records, torch.float32))
    (native_dir / "tokenizer.json").write_text("{}")  # other files travel along
    try:
        convert(native_dir, tmp_path / "fake", "fake")
    finally:
        (native_dir / "tokenizer.json").unlink()
    assert (tmp_path / "fake" / "tokenizer.json").is_file()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "fake")), reference)

    convert(fake_dir, tmp_path / "native", "packed")
    assert is_packed_checkpoint(tmp_path / "native")
    assert torch.equal(logits(load_quantized(tmp_path / "native")), reference)
    # Re-packing reproduces the very same stored tensors.
    original, repacked = (safe_open(str(d / WEIGHTS_FILE), "pt") for d in (native_dir, tmp_path / "native"))
    assert set(original.keys()) == set(repacked.keys())
    assert all(torch.equal(original.get_tensor(k), repacked.get_tensor(k)) for k in original.keys())
    assert original.metadata() == repacked.metadata()

    convert(tmp_path / "fake", tmp_path / "native-bf16", "packed", dtype="bf16")
    loaded = load_quantized(tmp_path / "native-bf16")
    assert loaded.dtype == torch.bfloat16
    assert loaded.model.embed_tokens.weight.dtype == torch.bfloat16


def test_convert_replaces_an_existing_output_only_when_forced(native_dir, tmp_path):
    # (issue #19 item 5: --force replaces only llmquant's own outputs; it used to replace any directory.)
    out = tmp_path / "out"
    convert(native_dir, out, "packed")  # an earlier output of llmquant
    with pytest.raises(UserError, match="already exists"):
        convert(native_dir, out, "fake")
    assert not (out / RECORDS_FILE).exists()
    convert(native_dir, out, "fake", force=True)
    assert (out / RECORDS_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no partial directory left behind

    (out / "notes.txt").write_text("mine")  # the user's file inside llmquant's output
    with pytest.raises(UserError, match="replaces only llmquant's own outputs: it holds notes.txt"):
        convert(native_dir, out, "packed", force=True)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "stale.txt").write_text("old")
    with pytest.raises(UserError, match="has no valid llmquant-manifest.json"):
        convert(native_dir, foreign, "fake", force=True)
    assert (out / "notes.txt").is_file() and (foreign / "stale.txt").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "out"]


# --------------------------------------------------------------------------------------------------
# Damaged and foreign files: one UserError, one line, naming the file


def damaged_copy(native_dir, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(native_dir, directory)
    return directory


def rewrite_weights(directory, edit):
    """Rewrite model.safetensors after edit(tensors, header) changed them in place."""
    path = directory / WEIGHTS_FILE
    with safe_open(str(path), "pt") as file:
        tensors = {key: file.get_tensor(key) for key in file.keys()}
        header = file.metadata()
    edit(tensors, header)
    save_file(tensors, str(path), metadata=header)


def edit_descriptor(name, change):
    def edit(tensors, header):
        linears = json.loads(header["llmquant.linears"])
        change(linears[name])
        header["llmquant.linears"] = json.dumps(linears)

    return edit


def edit_config(directory, change):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


Q = "model.layers.0.self_attn.q_proj"


def truncate(directory):
    path = directory / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])


def shorten_codes(directory):
    def edit(tensors, header):
        tensors[f"{Q}.codes"] = tensors[f"{Q}.codes"][:-1].clone()

    rewrite_weights(directory, edit)


DAMAGES = {
    "truncated": (truncate, "model.safetensors: not a readable safetensors file"),
    "garbage": (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x08" + b"x" * 64), "not a readable safetensors"),
    "config-not-json": (lambda d: (d / "config.json").write_text("{"), "config.json: not valid JSON"),
    "config-version": (
        lambda d: edit_config(d, lambda c: c["quantization_config"].update(format_version=2)),
        "format_version 2 is not supported",
    ),
    "header-version": (
        lambda d: rewrite_weights(d, lambda t, h: h.update({"llmquant.format_version": "7"})),
        "model.safetensors: llmquant format_version '7' is not supported",
    ),
    "unknown-layout": (
        lambda d: rewrite_weights(d, edit_descriptor(Q, lambda desc: desc.update(layout="ternary"))),
        f"{Q}: unknown layout 'ternary'",
    ),
    "descriptor-meta": (
        lambda d: rewrite_weights(d, edit_descriptor(Q, lambda desc: desc["meta"].update(bits="4"))),
        f"{Q}: meta['bits'] must be an integer in [1, 8], got '4'",
    ),
    "short-stored-tensor": (shorten_codes, f"{Q}: stored tensor 'codes' should be torch.uint8"),
    "descriptor-shape": (
        lambda d: rewrite_weights(d, edit_descriptor(Q, lambda desc: desc.update(shape=[64, 32]))),
        f"{Q}: stored tensor",
    ),
    "config-intermediate-size": (
        lambda d: edit_config(d, lambda c: c.update(intermediate_size=80)),
        "model.layers.0.mlp.down_proj is packed as 64x96, but config.json makes it Linear(in_features=80",
    ),
    "config-vocab": (
        lambda d: edit_config(d, lambda c: c.update(vocab_size=100)),
        "model.embed_tokens.weight has shape [128, 64], config.json needs [100, 64]",
    ),
    "missing-tensor": (
        lambda d: rewrite_weights(d, lambda t, h: t.pop("model.norm.weight")),
        "tensor model.norm.weight (1 missing in all) is missing",
    ),
    "modules-disagree": (
        lambda d: edit_config(d, lambda c: c["quantization_config"]["modules"].pop(Q)),
        f"quantization_config.modules says {Q} is None",
    ),
    "unknown-model-type": (
        lambda d: edit_config(d, lambda c: c.update(model_type="no-such-model")),
        "model_type 'no-such-model' is not known",
    ),
    "no-config": (lambda d: (d / "config.json").unlink(), "config.json: cannot read"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoints_raise_one_clear_user_error(native_dir, tmp_path, damage):
    directory = damaged_copy(native_dir, tmp_path)
    apply, message = DAMAGES[damage]
    apply(directory)
    with pytest.raises(UserError) as caught:
        load_quantized(directory)
    text = str(caught.value)
    assert message in text
    assert "\n" not in text and str(directory) in text


def test_fake_and_plain_checkpoints_are_refused_where_they_cannot_be_used(tiny, fake_dir, tmp_path):
    model, records = tiny
    with pytest.raises(UserError, match="not a packed checkpoint"):
        load_quantized(fake_dir)
    plain_dir = tmp_path / "plain"
    model.save_pretrained(plain_dir)
    with pytest.raises(UserError, match=f"plain checkpoint without {RECORDS_FILE}"):
        convert(plain_dir, tmp_path / "out", "packed")
    with pytest.raises(UserError, match="unknown checkpoint format"):
        convert(fake_dir, tmp_path / "out", "gguf")


def test_fake_weights_edited_after_saving_are_not_silently_repacked(fake_dir, tmp_path):
    directory = damaged_copy(fake_dir, tmp_path)
    rewrite_weights(directory, lambda t, h: t[f"{Q}.weight"].mul_(1.5))
    with pytest.raises(UserError, match=f"{Q}.weight differs from its packed record"):
        convert(directory, tmp_path / "out", "packed")


def test_writer_refuses_records_that_do_not_fit_the_model(tiny, tmp_path):
    model, records = tiny
    record = records[Q]
    with pytest.raises(ValueError, match="no nn.Linear"):
        save_packed(model, {"model.layers.0.self_attn": record}, tmp_path, {})
    with pytest.raises(ValueError, match="record of shape"):
        save_packed(model, {"model.layers.0.mlp.gate_proj": record}, tmp_path, {})
    lm_head = hand_record("uniform-4bit", model.lm_head.weight, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="tied to model.embed_tokens.weight"):
        save_packed(model, {"lm_head": lm_head}, tmp_path, {})


def test_csr_index_at_exactly_256_columns():
    """8-bit column indices of a 256-wide layer: unpacked as uint8, where `>= 256` once compared
    with 0 and refused every valid record (found by benchmarks/kernel_speed.py's random records)."""
    layout, tensors, meta, _, _ = build("partial_binary-8bit-0.02", 128, 256)
    packed = check_round_trip(layout, tensors, meta)
    assert packed.encoding["index_format"] == "csr"
