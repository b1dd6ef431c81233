"""Declarative maps of where a model's decoder layers and quantizable linears are.

Keyed by `config.model_type` (what transformers itself dispatches on), never by model names or
paths. A map names the decoder-layer list and, per layer, the linears grouped by the input they
read (linears of one group share one Hessian: it is the same X X^T). Anything the map does not
cover falls back to a generic discovery: the ModuleList with num_hidden_layers entries, every
nn.Linear inside a layer, one Hessian each.

Embeddings, norms and lm_head live outside the decoder layers (or are not nn.Linear), so they are
never quantized; `keep` lists linears inside a layer that must stay in full precision too (e.g. a
mixture-of-experts router).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from llmquant.errors import UserError

_LLAMA_LIKE = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


@dataclass(frozen=True)
class LayerMap:
    layers: str  # dotted path of the decoder-layer ModuleList
    input_groups: tuple[tuple[str, ...], ...] | None  # None: discover linears, one group each
    keep: tuple[str, ...] = ()  # glob patterns (relative to a layer) never quantized, e.g. MoE routers


LAYER_MAPS: dict[str, LayerMap] = {
    **{t: LayerMap("model.layers", _LLAMA_LIKE) for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": LayerMap(
        "model.layers",
        (("self_attn.qkv_proj",), ("self_attn.o_proj",), ("mlp.gate_up_proj",), ("mlp.down_proj",)),
    ),
    "opt": LayerMap(
        "model.decoder.layers",
        (
            ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
            ("self_attn.out_proj",),
            ("fc1",),
            ("fc2",),
        ),
    ),
    # Mixture of experts (transformers 5 fuses the experts into one module that holds no nn.Linear):
    # the router and the shared expert's one-output gate decide where tokens go; they stay in full
    # precision, as in every MoE quantizer (GPTQModel's `:!`).
    "qwen2_moe": LayerMap("model.layers", None, keep=("mlp.gate", "mlp.shared_expert_gate")),
    "gpt_neox": LayerMap(
        "gpt_neox.layers",
        (
            ("attention.query_key_value",),
            ("attention.dense",),
            ("mlp.dense_h_to_4h",),
            ("mlp.dense_4h_to_h",),
        ),
    ),
}


@dataclass
class ResolvedLayers:
    """The decoder layers of one model instance and, per layer, its linear groups."""

    path: str
    layers: nn.ModuleList
    groups: list[list[list[str]]]  # [layer][group] -> linear names relative to the layer
    generic: bool  # no layer map for this model type: layers and linears were discovered

    def linear_names(self, index: int) -> list[str]:
        return [name for group in self.groups[index] for name in group]

    def shapes(self) -> dict[str, tuple[int, int]]:
        """Every selected linear's full name -> (out_features, in_features)."""
        out = {}
        for index, layer in enumerate(self.layers):
            for name in self.linear_names(index):
                module = layer.get_submodule(name)
                out[f"{self.path}.{index}.{name}"] = (module.out_features, module.in_features)
        return out


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    for part in dotted.split("."):
        module = getattr(module, part, None)  # type: ignore[assignment]
        if module is None:
            return None
    return module


def _discover_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Generic fallback: the ModuleList with num_hidden_layers entries holding the most parameters."""
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    best: tuple[int, str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (expected is None or len(module) == expected):
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, name, module)
    if best is None:
        raise UserError(f"cannot find the decoder layers of {type(model).__name__}: no ModuleList of {expected} layers")
    return best[1], best[2]


def _linears(layer: nn.Module) -> list[str]:
    return [name for name, module in layer.named_modules() if isinstance(module, nn.Linear)]


def resolve_layers(model: nn.Module, skip: tuple[str, ...] = ()) -> ResolvedLayers:
    """Finds the decoder layers and their quantizable linears.

    skip: glob patterns over full module names (e.g. "*.mlp.down_proj", "model.layers.0.*").
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    layer_map = LAYER_MAPS.get(model_type or "")
    layers = _get(model, layer_map.layers) if layer_map else None
    generic = not isinstance(layers, nn.ModuleList)
    if generic:
        path, layers = _discover_layers(model)
        layer_map = LayerMap(path, None, layer_map.keep if layer_map else ())
    assert layer_map is not None and isinstance(layers, nn.ModuleList)

    groups: list[list[list[str]]] = []
    for index, layer in enumerate(layers):
        present = _linears(layer)
        if layer_map.input_groups is not None and all(n in present for g in layer_map.input_groups for n in g):
            layer_groups = [list(g) for g in layer_map.input_groups]
            mapped = {n for g in layer_groups for n in g}
            # Linears the map does not know (e.g. extra projections in a variant) are still quantized.
            layer_groups += [[n] for n in present if n not in mapped]
        else:
            layer_groups = [[n] for n in present]
        prefix = f"{layer_map.layers}.{index}."

        def wanted(name: str) -> bool:
            if any(fnmatch.fnmatch(name, pattern) for pattern in layer_map.keep):
                return False
            return not any(fnmatch.fnmatch(prefix + name, pattern) for pattern in skip)

        layer_groups = [[n for n in g if wanted(n)] for g in layer_groups]
        groups.append([g for g in layer_groups if g])
    return ResolvedLayers(layer_map.layers, layers, groups, generic)
