"""Checkpoint integrity and fast loading (docs/format.md "Checksums", docs/reliability.md).

Silent corruption (issue #19 item 1): a flipped byte in packed codes or an fp16 scale, a scale set to
65504, another run's model.safetensors copied in: each is refused with one line naming the file and
the tensor, by every reader (load_quantized / llmquant.load, eval's and bench's load_model, pack,
verify). Fast loading (item 2): loading checks structure without decoding a single linear, and
those checks refuse exactly what a decode would.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

import llmquant
from llmquant.errors import UserError
from llmquant.formats import convert, packers, read_checkpoint
from llmquant.formats.checkpoint import HEADER_WEIGHTS_CHECKSUM, RECORDS_FILE, WEIGHTS_CHECKSUM, WEIGHTS_FILE, weights_digest
from llmquant.layouts.base import Reader
from llmquant.layouts import get_layout
from llmquant.quantize import run_quantize
from llmquant.recipe import parse_recipe
from llmquant.runtime import load_quantized
from llmquant.runtime.loader import load_model, pack_checkpoint, verify_checkpoint
from llmquant.safetensors_io import CHECKSUMS_KEY, read_header, recorded_checksums, write_safetensors
from test_format import CASES, SHAPES, build

pytestmark = pytest.mark.usefixtures("one_thread")

Q = "model.layers.0.self_attn.q_proj"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmquant.cli", *args], capture_output=True, text=True, timeout=300,
        env={**__import__("os").environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture(scope="module")
def runs(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Two GPTQ runs of the tiny LLaMA with the same layouts (calibration seeds 0 and 1), packed,
    and the first one as a fake checkpoint."""
    root = tmp_path_factory.mktemp("integrity")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(400)))
    made = {}
    for name, seed, fmt in (("a", 0, "packed"), ("b", 1, "packed"), ("fake", 0, "fake")):
        recipe = parse_recipe(
            {
                "model": str(tiny_llama_dir),
                "calibration": {"dataset": str(corpus), "nsamples": 2, "seqlen": 32, "seed": seed},
                "method": {"name": "gptq", "bits": 3, "group_size": 32},
                "output": str(root / name),
            }
        )
        run_quantize(recipe, fmt=fmt)
        made[name] = root / name
    return made


def copy_of(directory: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    target = tmp_path / name
    shutil.copytree(directory, target)
    return target


def tensor_offset(path: Path, name: str) -> int:
    """Byte offset of a tensor's data in a safetensors file."""
    return read_header(path).entries[name].begin


def poke(path: Path, name: str, edit) -> None:
    """Changes the bytes of one tensor in place (header untouched: what a disk or a copy does)."""
    data = bytearray(path.read_bytes())
    edit(data, tensor_offset(path, name))
    path.write_bytes(bytes(data))


def flip(data: bytearray, at: int) -> None:
    data[at] ^= 0x10


def max_half(data: bytearray, at: int) -> None:
    data[at : at + 2] = struct.pack("<e", 65504.0)


# --------------------------------------------------------------------------------------------------
# What is written


def test_every_file_records_a_checksum_per_tensor_and_is_bound_to_its_owner(runs):
    packed, fake = runs["a"], runs["fake"]
    for path in (packed / WEIGHTS_FILE, fake / WEIGHTS_FILE, fake / RECORDS_FILE):
        header = read_header(path)
        assert set(recorded_checksums(header.metadata)) == set(header.entries)
    config = json.loads((packed / "config.json").read_text())
    assert config["quantization_config"][WEIGHTS_CHECKSUM] == weights_digest(read_header(packed / WEIGHTS_FILE).metadata)
    sidecar = read_header(fake / RECORDS_FILE).metadata
    assert sidecar[HEADER_WEIGHTS_CHECKSUM] == weights_digest(read_header(fake / WEIGHTS_FILE).metadata)
    assert WEIGHTS_CHECKSUM not in json.loads(sidecar["llmquant.quantization_config"])  # the sidecar's copy is unbound
    checkpoint = read_checkpoint(packed)
    assert checkpoint.verified and checkpoint.files[0]["checksums"] == "verified"


def test_convert_rebinds_what_it_writes(runs, tmp_path):
    convert(runs["a"], tmp_path / "fake", "fake")
    convert(tmp_path / "fake", tmp_path / "packed", "packed", dtype="bfloat16")
    for directory in (tmp_path / "fake", tmp_path / "packed"):
        assert read_checkpoint(directory).verified
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"][WEIGHTS_CHECKSUM] != json.loads((runs["a"] / "config.json").read_text())[
        "quantization_config"
    ][WEIGHTS_CHECKSUM]  # bf16 plain tensors: another file, another digest


# --------------------------------------------------------------------------------------------------
# Silent corruption, refused by every reader


CORRUPTIONS = {
    "flipped-code-byte": (f"{Q}.codes", flip),
    "flipped-scale-byte": (f"{Q}.scales", flip),
    "scale-set-to-65504": (f"{Q}.scales", max_half),
    "flipped-embedding-byte": ("model.embed_tokens.weight", flip),
    "flipped-norm-byte": ("model.norm.weight", flip),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_changed_byte_is_refused_naming_the_file_and_the_tensor(runs, tmp_path, corruption):
    directory = copy_of(runs["a"], tmp_path)
    tensor, edit = CORRUPTIONS[corruption]
    poke(directory / WEIGHTS_FILE, tensor, edit)
    for load in (lambda: load_quantized(directory), lambda: llmquant.load(directory), lambda: load_model(str(directory))):
        with pytest.raises(UserError) as caught:
            load()
        assert str(caught.value) == (
            f"{directory / WEIGHTS_FILE}: tensor {tensor}: checksum mismatch "
            "(its bytes changed after it was written: a damaged file)"
        )
    with pytest.raises(UserError, match=f"tensor {tensor}: checksum mismatch"):
        pack_checkpoint(directory, tmp_path / "out", "fake")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("fmt", ["packed", "fake"])
def test_another_runs_weights_copied_in_are_refused(runs, tmp_path, fmt):
    if fmt == "packed":
        directory = copy_of(runs["a"], tmp_path)
        shutil.copy(runs["b"] / WEIGHTS_FILE, directory / WEIGHTS_FILE)  # same layouts, other values
        owner = "config.json"
        loads = [lambda: load_quantized(directory), lambda: load_model(str(directory))]
    else:
        directory = copy_of(runs["fake"], tmp_path)
        convert(runs["b"], tmp_path / "other-fake", "fake")
        shutil.copy(tmp_path / "other-fake" / WEIGHTS_FILE, directory / WEIGHTS_FILE)
        owner = RECORDS_FILE
        loads = [lambda: read_checkpoint(directory), lambda: load_model(str(directory))]
    for load in loads:
        with pytest.raises(UserError) as caught:
            load()
        text = str(caught.value)
        assert text.startswith(f"{directory / WEIGHTS_FILE}: not the file {owner} was written with")
        assert "another checkpoint" in text and "\n" not in text


def test_a_fake_checkpoints_weights_are_verified_before_transformers_loads_them(runs, tmp_path):
    directory = copy_of(runs["fake"], tmp_path)
    poke(directory / WEIGHTS_FILE, f"{Q}.weight", flip)
    with pytest.raises(UserError, match=f"tensor {Q}.weight: checksum mismatch"):
        load_model(str(directory))
    with pytest.raises(UserError, match=f"{Q}.weight differs from its packed record"):  # pack: the more specific check first
        read_checkpoint(directory)


def test_checkpoints_without_checksums_load_with_one_warning_and_verify_refuses_them(runs, tmp_path, caplog):
    """What an llmquant from before the checksums wrote: no llmquant.checksums, no weights_checksum."""
    directory = copy_of(runs["a"], tmp_path)
    path = directory / WEIGHTS_FILE
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != CHECKSUMS_KEY}
    write_safetensors(path, tensors, metadata)
    config = json.loads((directory / "config.json").read_text())
    del config["quantization_config"][WEIGHTS_CHECKSUM]
    (directory / "config.json").write_text(json.dumps(config))
    caplog.set_level("WARNING")
    load_quantized(directory)
    load_quantized(directory)
    warnings = [r for r in caplog.records if "has no checksums" in r.getMessage()]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    with pytest.raises(UserError, match="no checksums recorded .* `llmquant pack` rewrites it with them"):
        verify_checkpoint(directory)
    # ... and re-packing it writes checksums.
    convert(directory, tmp_path / "repacked", "packed")
    assert verify_checkpoint(tmp_path / "repacked")["ok"]


def test_a_file_without_checksums_under_a_config_that_records_them_is_refused(runs, tmp_path):
    directory = copy_of(runs["a"], tmp_path)
    path = directory / WEIGHTS_FILE
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != CHECKSUMS_KEY}
    write_safetensors(path, tensors, metadata)
    with pytest.raises(UserError, match="records no checksums, but config.json records its quantization_config.weights_checksum"):
        load_quantized(directory)


# --------------------------------------------------------------------------------------------------
# llmquant verify


def test_verify_says_ok_or_names_the_first_bad_tensor(runs, tmp_path):
    ok = cli("verify", str(runs["a"]))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith(f"OK {runs['a']} (packed): ") and "checksums verified" in ok.stdout
    report = json.loads(cli("verify", str(runs["fake"]), "--json").stdout)
    assert report["ok"] and report["format"] == "fake" and [f["file"] for f in report["files"]] == [RECORDS_FILE, WEIGHTS_FILE]
    assert report["linears"] == 14 and all(f["checksums"] == "verified" for f in report["files"])

    directory = copy_of(runs["a"], tmp_path)
    poke(directory / WEIGHTS_FILE, f"{Q}.scales", max_half)
    bad = cli("verify", str(directory))
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == [
        f"error: {directory / WEIGHTS_FILE}: tensor {Q}.scales: checksum mismatch (its bytes changed after it was written: a damaged file)"
    ]
    missing = cli("verify", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "checkpoint directory not found" in missing.stderr


# --------------------------------------------------------------------------------------------------
# pack never writes what would not load


def rewrite_consistently(directory: Path, edit) -> None:
    """Edits model.safetensors and records fresh checksums and binding: a checkpoint that is what
    its writer wrote, but wrong (the checksums cannot catch it; the structure checks must)."""
    path = directory / WEIGHTS_FILE
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = {k: v for k, v in (handle.metadata() or {}).items() if k != CHECKSUMS_KEY}
    edit(tensors)
    written = write_safetensors(path, tensors, metadata, checksums=True)
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"][WEIGHTS_CHECKSUM] = weights_digest(written)
    (directory / "config.json").write_text(json.dumps(config))


def test_pack_refuses_a_checkpoint_that_would_not_load_and_writes_nothing(runs, tmp_path):
    directory = copy_of(runs["a"], tmp_path)
    rewrite_consistently(directory, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.int32)}))
    for fmt in ("fake", "packed"):
        with pytest.raises(UserError, match="model.norm.weight is stored as torch.int32, the model needs torch.float"):
            pack_checkpoint(directory, tmp_path / "out", fmt)
    done = cli("pack", "--model", str(directory), "--output", str(tmp_path / "out"), "--format", "fake")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "model.norm.weight is stored as torch.int32" in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no partial directory


# --------------------------------------------------------------------------------------------------
# Fast loading: structure without decoding, and the same verdicts as a decode


def test_loading_decodes_no_linear(runs, monkeypatch):
    def no_decoding(*args, **kwargs):
        raise AssertionError("a linear was unpacked while loading")

    monkeypatch.setattr(packers, "unpack", no_decoding)
    for layout in ("uniform", "mixed", "partial_binary", "binary_residual"):
        monkeypatch.setattr(type(get_layout(layout)), "unpack", no_decoding)
    model = load_quantized(runs["a"])
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()  # decoded at the first forward


@st.composite
def stored_damage(draw):
    """A stored linear of any layout and shape, with one stored tensor changed."""
    case = draw(st.sampled_from(sorted(CASES)))
    rows, cols = draw(st.sampled_from(SHAPES))
    layout, tensors, meta, _, _ = build(case, rows, cols, seed=draw(st.integers(0, 3)))
    packed = packers.pack(layout, tensors, meta)
    name = draw(st.sampled_from(sorted(packed.tensors)))
    tensor = packed.tensors[name]
    kind = draw(st.sampled_from(["drop", "add", "dtype", "values", "remove"]))
    stored = dict(packed.tensors)
    if kind == "drop" and tensor.numel():
        stored[name] = tensor.reshape(-1)[:-1].clone()
    elif kind == "add":
        stored[name] = torch.cat([tensor.reshape(-1), tensor.reshape(-1)[:1] if tensor.numel() else tensor.new_zeros(1)])
    elif kind == "dtype":
        stored[name] = tensor.to(torch.int32 if tensor.dtype != torch.int32 else torch.int16)
    elif kind == "values" and tensor.numel():
        flat = tensor.clone().reshape(-1)
        index = draw(st.integers(0, flat.numel() - 1))
        if flat.dtype.is_floating_point:
            flat[index] = draw(st.floats(-1e4, 1e4))
        else:
            info = torch.iinfo(flat.dtype)
            flat[index] = draw(st.integers(max(info.min, -(2**31)), min(info.max, 2**31 - 1)))
        stored[name] = flat.reshape(tensor.shape)
    elif kind == "remove":
        del stored[name]
    return packers.PackedLinear(packed.layout, packed.shape, packed.meta, stored, packed.encoding)


def _verdict(call) -> bool:
    try:
        call()
    except ValueError:
        return False
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stored_damage())
def test_the_structural_check_refuses_exactly_what_unpacking_refuses(linear):
    """check (what loading runs) and unpack (a decode) agree on every damaged stored linear; the
    codes' values are not checked by either (a code at `bits` bits is always in range)."""
    assert _verdict(lambda: packers.check(linear)) == _verdict(lambda: packers.unpack(linear))


def test_check_stored_reads_every_stored_tensor():
    """check_stored must name every stored tensor (the Reader refuses leftovers), for every layout."""
    for case in sorted(CASES):
        layout, tensors, meta, _, _ = build(case, 33, 100)
        packed = packers.pack(layout, tensors, meta)
        reader = Reader(packed.tensors)
        get_layout(layout).check_stored(reader, packed.meta, packed.encoding, 33, 100)
        reader.finish()
