"""More than one device (`--device cpu,cpu`, gloo): the same bytes as one device, errors agreed on.

Each test spawns one extra process (rank 1) that imports torch and llmquant: a few seconds each."""

from __future__ import annotations

import json

import pytest
import torch

from llmquant.devices import check_devices
from llmquant.errors import NumericalError, UserError
from llmquant.quantize import run_quantize
from llmquant.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("parallel") / "corpus.txt"
    path.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(400)))
    return path


def recipe(model_dir, corpus, output, device, method, refine=None):
    data = {
        "model": str(model_dir),
        "calibration": {"dataset": str(corpus), "nsamples": 4, "seqlen": 32, "seed": 0},
        "method": method,
        "output": str(output),
        "device": device,
    }
    if refine:
        data["refine"] = refine
    return parse_recipe(data)


def same_checkpoint(a, b):
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    config = [json.loads((d / "config.json").read_text()) for d in (a, b)]
    for c in config:  # the recipe record names the devices it ran on; everything else is equal
        c["quantization_config"]["info"]["recipe"].pop("device")
        c["quantization_config"].pop("weights_checksum")
    assert config[0] == config[1]


@pytest.mark.parametrize(
    "method, refine",
    [
        # observers and the method's allocation state (SliM-LLM's search; its records are uniform ones too)
        ({"name": "slim", "bits": 2, "group_size": 16}, None),
        # every linear exchanged twice: after the method, and after rank 0's refinement
        ({"name": "gptq", "bits": 2, "group_size": 16}, {"epochs": 1}),
    ],
    ids=["slim", "gptq-refined"],
)
def test_two_ranks_give_the_bytes_of_one(tiny_llama_dir, corpus, tmp_path, method, refine):
    one, two = tmp_path / "one", tmp_path / "two"
    run_quantize(recipe(tiny_llama_dir, corpus, one, "cpu", method, refine))
    _, report = run_quantize(recipe(tiny_llama_dir, corpus, two, "cpu,cpu", method, refine))
    assert report["devices"] == ["cpu", "cpu"]
    same_checkpoint(one, two)
    if method["name"] == "slim":  # rank 0's method saw every linear (its own and, via restore, rank 1's)
        assert (one / "allocation.json").read_text() == (two / "allocation.json").read_text()
    # every linear's report, whichever rank computed it
    assert [x["name"] for layer in report["layers"] for x in layer["linears"]] == [
        x["name"] for layer in json.loads((one / "llmquant.json").read_text())["layers"] for x in layer["linears"]
    ]


def test_an_error_on_every_rank_is_rank_zeros_one_line(tmp_path, corpus):
    from conftest import byte_tokenizer, tiny_model

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = float("nan")
    model_dir = tmp_path / "nan-model"
    model.save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    with pytest.raises(UserError, match="NaN"):
        run_quantize(recipe(model_dir, corpus, tmp_path / "out", "cpu,cpu", {"name": "gptq", "bits": 3, "group_size": 16}))
    assert not (tmp_path / "out").exists()


def test_a_numerical_error_in_one_ranks_linear_reaches_every_rank(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    # Rank 0 computes the layer's linears 0, 2, 4, ...: fail its second one; rank 1 must learn of it.
    from llmquant.methods.gptq import GPTQ

    original = GPTQ.quantize

    def fails_on_v_proj(self, name, weight, hessian, observer=None):
        if name.endswith("layers.1.self_attn.v_proj"):
            raise NumericalError(f"{name}: made to fail")
        return original(self, name, weight, hessian, observer)

    monkeypatch.setattr(GPTQ, "quantize", fails_on_v_proj)  # rank 0 only: rank 1 is another process
    with pytest.raises(NumericalError, match="made to fail"):
        run_quantize(recipe(tiny_llama_dir, corpus, tmp_path / "out", "cpu,cpu", {"name": "gptq", "bits": 3, "group_size": 16}))


@pytest.mark.parametrize(
    "spec, ok",
    [("cuda:0,cuda:1", True), ("cpu,cpu", True), ("cuda:0", True), ("cuda:0,cuda:0", False), ("cuda,cuda:1", False),
     ("auto,cpu", False), ("cpu,cuda:0", False), ("cuda:0,,cuda:1", False)],
)
def test_device_lists(spec, ok):
    if ok:
        assert check_devices(spec) == spec
    else:
        with pytest.raises(ValueError):
            check_devices(spec)
