"""Streaming quantization (issue #17): the decoder layers are read from the model's safetensors one at
a time, and the checkpoint is written from files; the bytes are those of a run on the whole model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from llmquant.errors import UserError
from llmquant.models.layer_maps import resolve_layers
from llmquant.models.loading import load_pretrained, resolve_model_source
from llmquant.models.streaming import StreamedModel, open_streamed
from llmquant.quantize import run_quantize
from llmquant.recipe import parse_recipe
from llmquant.resume import WorkDir, model_identity

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "corpus.txt"
    path.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(300)))
    return path


def model_dir(root: Path, arch: str, shard: str | None = None, layers: int = 3) -> Path:
    path = root / f"{arch}-{shard or 'single'}"
    if not path.exists():
        model = tiny_model(arch, layers=layers, seed=3)
        model.to(torch.float16).save_pretrained(path, max_shard_size=shard) if shard else model.to(torch.float16).save_pretrained(path)
        byte_tokenizer().save_pretrained(path)
    return path


def recipe(source: Path, corpus: Path, output: Path, method: str = "gptq"):
    fields = {"rtn": {"bits": 3, "group_size": 32}, "gptq": {"bits": 2, "group_size": 16}, "slim": {"bits": 2, "group_size": 16}}
    return parse_recipe(
        {
            "model": str(source),
            "calibration": {"dataset": str(corpus), "nsamples": 2, "seqlen": 24, "seed": 1},
            "method": {"name": method, **fields[method]},
            "output": str(output),
        }
    )


def digest(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.name != "llmquant.json"
    }


@pytest.mark.parametrize(
    ("arch", "method", "fmt", "shard"),
    [
        ("llama", "gptq", "packed", None),
        ("llama", "rtn", "fake", "40KB"),
        ("qwen2", "slim", "packed", "40KB"),
        ("gemma3", "gptq", "fake", None),
    ],
)
def test_streamed_run_writes_the_bytes_of_a_whole_model_run(tmp_path_factory, corpus, arch, method, fmt, shard):
    root = tmp_path_factory.getbasetemp() / "stream-models"
    root.mkdir(exist_ok=True)
    source = model_dir(root, arch, shard)
    if shard:
        assert (source / "model.safetensors.index.json").is_file()
    out = tmp_path_factory.mktemp("out")
    whole, whole_report = run_quantize(recipe(source, corpus, out / "whole", method), fmt=fmt, streaming="off")
    streamed, report = run_quantize(recipe(source, corpus, out / "streamed", method), fmt=fmt, streaming="on")
    assert report["streamed"] and not whole_report["streamed"]
    assert digest(streamed) == digest(whole)


def test_streamed_model_matches_the_loaded_model(tmp_path):
    source = resolve_model_source(str(model_dir(tmp_path, "gemma3", "40KB")))
    loaded = load_pretrained(source, torch.float32)
    streamed = open_streamed(source, torch.float32, lambda m: resolve_layers(m).path)
    assert isinstance(streamed, StreamedModel)
    model = streamed.model
    layers = resolve_layers(model).layers
    # Outside the layers: in memory and equal (non-persistent buffers included); layers on meta.
    for name, buffer in loaded.named_buffers():
        assert torch.equal(model.get_buffer(name).cpu(), buffer) or name.startswith(resolve_layers(model).path), name
    assert all(p.is_meta for p in layers.parameters())
    assert streamed.identity() == model_identity(source.describe(), loaded)
    streamed.materialize(1, layers[1])
    expected = resolve_layers(loaded).layers[1].state_dict()
    for name, tensor in layers[1].state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    streamed.release(1, layers[1])
    assert all(p.is_meta for p in layers.parameters())


def test_at_most_one_layer_is_in_memory_and_resume_works(tmp_path, corpus, monkeypatch):
    source = model_dir(tmp_path, "llama", layers=4)
    reference, _ = run_quantize(recipe(source, corpus, tmp_path / "ref"), streaming="on")
    held = []

    original = StreamedModel.materialize

    def counting(self, index, layer):
        original(self, index, layer)
        layers = resolve_layers(self.model).layers
        held.append(sum(1 for l in layers if not next(l.parameters()).is_meta))

    class Crash(Exception):
        pass

    save_layer = WorkDir.save_layer

    def save_then_crash(self, report, records, next_inputs):
        save_layer(self, report, records, next_inputs)
        if report.index == 1:
            raise Crash

    monkeypatch.setattr(StreamedModel, "materialize", counting)
    monkeypatch.setattr(WorkDir, "save_layer", save_then_crash)
    with pytest.raises(Crash):
        run_quantize(recipe(source, corpus, tmp_path / "out"), streaming="on")
    assert max(held) == 1
    monkeypatch.setattr(WorkDir, "save_layer", save_layer)
    out, report = run_quantize(recipe(source, corpus, tmp_path / "out"), resume=True, streaming="on")
    assert report["resumed_layers"] == 2 and max(held) == 1
    assert digest(out) == digest(reference)


def test_streaming_on_refuses_what_cannot_be_streamed(tmp_path, corpus):
    source = tmp_path / "no-safetensors"
    source.mkdir()
    tiny_model("llama").config.save_pretrained(source)  # a directory without safetensors weights
    with pytest.raises(UserError, match="cannot be streamed"):
        run_quantize(recipe(source, corpus, tmp_path / "out"), streaming="on")


# --------------------------------------------------------------------------------------------------
# Sharded output


def test_sharded_checkpoints_load_verify_and_pack(tmp_path, corpus):
    from llmquant.formats.checkpoint import INDEX_FILE
    from llmquant.runtime.loader import load_quantized, pack_checkpoint, verify_checkpoint

    source = model_dir(tmp_path, "qwen2")
    single, _ = run_quantize(recipe(source, corpus, tmp_path / "single"))
    sharded, _ = run_quantize(recipe(source, corpus, tmp_path / "sharded"), max_shard_bytes=20_000)
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (sharded / "model.safetensors").exists() and (sharded / INDEX_FILE).is_file()
    verify_checkpoint(sharded)
    ids = torch.arange(12).unsqueeze(0)
    expected = load_quantized(single)(ids).logits
    assert torch.equal(load_quantized(sharded)(ids).logits, expected)
    # pack: sharded -> fake -> packed in one file gives the single-file checkpoint's bytes.
    pack_checkpoint(sharded, tmp_path / "fake", "fake")
    pack_checkpoint(tmp_path / "fake", tmp_path / "repacked", "packed")
    assert digest(tmp_path / "repacked")["model.safetensors"] == digest(single)["model.safetensors"]
    pack_checkpoint(single, tmp_path / "resharded", "packed", max_shard_bytes=20_000)
    assert {k: v for k, v in digest(tmp_path / "resharded").items() if k.startswith("model")} == {
        k: v for k, v in digest(sharded).items() if k.startswith("model")
    }
    # A shard from another checkpoint, or a missing one, is refused in one line.
    other, _ = run_quantize(recipe(source, corpus, tmp_path / "other", "rtn"), max_shard_bytes=20_000)
    victim = sharded / shards[-1]  # holds quantized linears (the first one only the embeddings)
    saved = victim.read_bytes()
    victim.write_bytes(sorted(other.glob("model-*.safetensors"))[-1].read_bytes())
    with pytest.raises(UserError, match="not those config.json was written with|places in|no shard holds"):
        load_quantized(sharded)
    victim.unlink()
    with pytest.raises(UserError, match="missing"):
        load_quantized(sharded)
    victim.write_bytes(saved)
    load_quantized(sharded)


def test_cli_shards_verifies_and_refuses_bad_sizes(tmp_path, corpus):
    import os
    import subprocess
    import sys

    def llmquant(*args: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        return subprocess.run([sys.executable, "-m", "llmquant.cli", *args], capture_output=True, text=True, env=env, timeout=300)

    source = model_dir(tmp_path, "llama")
    path = tmp_path / "rtn.yaml"
    path.write_text(f"model: {source}\nmethod: {{name: rtn, bits: 3, group_size: 32}}\noutput: {tmp_path / 'q'}\n")
    bad = llmquant("quantize", "--recipe", str(path), "--max-shard-size", "lots", "--quiet")
    assert bad.returncode == 2 and "--max-shard-size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    done = llmquant("quantize", "--recipe", str(path), "--max-shard-size", "20KB", "--streaming", "on", "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["streamed"] is True
    assert (tmp_path / "q" / "model.safetensors.index.json").is_file()
    checked = llmquant("verify", str(tmp_path / "q"))
    assert checked.returncode == 0, checked.stderr
