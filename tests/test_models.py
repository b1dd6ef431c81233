"""Layer maps and the sequential runner on tiny random models of several architectures."""

from __future__ import annotations

import pytest
import torch

from conftest import VOCAB, tiny_model
from llmquant.core.runner import SequentialRunner, capture_layer_inputs
from llmquant.methods import get_method_class
from llmquant.models import layer_maps
from llmquant.models.layer_maps import resolve_layers

ARCHS = ["llama", "qwen2", "opt", "gemma3"]


def layer_by_layer(model, windows):
    """Runs the captured layer-0 inputs through every layer alone, with the captured arguments."""
    resolved = resolve_layers(model)
    captured = capture_layer_inputs(model, resolved.layers, windows)
    hidden = captured.hidden
    with torch.no_grad():
        for index, layer in enumerate(resolved.layers):
            outs = []
            for s in range(hidden.shape[0]):
                out = layer(hidden[s : s + 1], **captured.layer_kwargs[index])
                outs.append(out[0] if captured.returns_tuple else out)
            hidden = torch.cat(outs)
    return hidden


def last_layer_output(model, windows):
    seen = {}
    resolved = resolve_layers(model)
    hook = resolved.layers[-1].register_forward_hook(
        lambda m, i, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o)
    )
    with torch.no_grad():
        model(windows, use_cache=False)
    hook.remove()
    return seen["out"]


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_by_layer_equals_model_forward(arch):
    model = tiny_model(arch, layers=3)
    windows = torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(1))
    # Gemma3's sliding window (8) is shorter than the windows: per-layer masks must be captured.
    assert torch.allclose(layer_by_layer(model, windows), last_layer_output(model, windows), atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_maps_group_linears_that_share_an_input(arch):
    model = tiny_model(arch)
    resolved = resolve_layers(model)
    assert not resolved.generic
    groups = resolved.groups[0]
    assert len(groups) == 4
    assert len(groups[0]) == 3  # q, k, v read the same normalised hidden states
    names = resolved.linear_names(0)
    expected = 6 if arch == "opt" else 7  # OPT's MLP has no gate projection
    assert len(names) == expected and len(set(names)) == expected


def test_generic_fallback_finds_the_same_linears(monkeypatch):
    model = tiny_model("llama")
    mapped = resolve_layers(model)
    monkeypatch.setattr(layer_maps, "LAYER_MAPS", {})
    generic = resolve_layers(model)
    assert generic.generic and generic.path == "model.layers"
    assert sorted(generic.linear_names(1)) == sorted(mapped.linear_names(1))
    assert all(len(g) == 1 for g in generic.groups[1])


def test_skip_patterns_leave_linears_in_full_precision():
    model = tiny_model("llama")
    resolved = resolve_layers(model, skip=("*.mlp.down_proj", "model.layers.0.self_attn.*"))
    assert "mlp.down_proj" not in resolved.linear_names(1)
    assert not any(n.startswith("self_attn") for n in resolved.linear_names(0))
    assert "self_attn.q_proj" in resolved.linear_names(1)


def run_method(model, name, **cfg):
    resolved = resolve_layers(model)
    cls = get_method_class(name)
    windows = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(2))
    runner = SequentialRunner(model, resolved, cls(cls.Config(name=name, **cfg)), torch.device("cpu"))
    return runner.run(windows)


def test_runner_quantizes_every_linear_and_chains_quantized_outputs():
    model = tiny_model("llama", layers=2)
    original = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    records, reports = run_method(model, "gptq", bits=3, group_size=32)
    assert len(records) == 14 and [r.index for r in reports] == [0, 1]
    for name, record in records.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight, record.dequantized)
        assert not torch.equal(weight, original[name])
        assert record.bits.code == 3
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # untouched, still tied
    for report in reports:
        for linear in report.linears:
            assert 0 < linear.relative_error < 0.5


def test_moe_routers_stay_in_full_precision():
    import transformers

    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config)
    linears = {n for n, m in model.model.layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    assert "mlp.shared_expert_gate" in linears  # a one-output nn.Linear that routes tokens ...
    resolved = resolve_layers(model)
    names = set(resolved.linear_names(0))
    assert "mlp.shared_expert_gate" not in names and "mlp.gate" not in names  # ... is kept (LayerMap.keep)
    assert {"self_attn.q_proj", "mlp.shared_expert.down_proj"} <= names
    assert resolved.shapes()["model.layers.1.self_attn.q_proj"] == (32, 32)
