"""YAML recipe -> typed, validated `Recipe`. Nothing heavy happens before this succeeds.

Every problem is reported as one `UserError` line that names the recipe field, e.g.
    recipe.yaml: method.bits: Input should be less than or equal to 8

YAML is parsed defensively (`safe_yaml`): a recipe is at most MAX_RECIPE_BYTES, a key may appear
once per mapping (a second `method:` used to replace the first without a word), and anchors and
aliases may not expand past MAX_YAML_NODES values (an alias "bomb" of nested anchors otherwise
expands to billions of items before validation sees it). The expanded size is computed on the
parsed node graph, where an alias is a reference, so the check itself is cheap.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmquant.core.refine import RefineConfig
from llmquant.devices import check_devices
from llmquant.errors import UserError
from llmquant.methods import MethodConfig, available_methods, get_method_class

NAMED_DATASETS = ("wikitext2", "ptb", "c4")

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; SliM allocations for a 70B model ~100 KB
MAX_YAML_NODES = 1_000_000  # values after expanding aliases (scalars, lists, mappings)
MAX_YAML_DEPTH = 100


class _RecipeLoader(yaml.SafeLoader):
    """SafeLoader whose documents are checked (duplicate keys, alias expansion, depth) before any
    Python object is built from them."""


def _check_node(node: yaml.Node, source: str) -> None:
    """Duplicate keys and the expanded size of a composed YAML document; UserError."""
    sizes: dict[int, int] = {}  # id(node) -> values it expands to (an alias is the node it names)
    open_nodes: set[int] = set()  # the nodes being sized: meeting one again is a recursive alias

    def size(current: yaml.Node, depth: int) -> int:
        known = sizes.get(id(current))
        if known is not None:
            return known
        if id(current) in open_nodes:
            raise UserError(f"{source}: an alias refers to a value that contains it (line {current.start_mark.line + 1})")
        if depth > MAX_YAML_DEPTH:
            raise UserError(f"{source}: nested deeper than {MAX_YAML_DEPTH} levels")
        open_nodes.add(id(current))
        total = 1
        if isinstance(current, yaml.MappingNode):
            seen: dict[tuple[str, str], int] = {}
            for key, value in current.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if (key.tag, key.value) in seen:
                        line = key.start_mark.line + 1
                        raise UserError(
                            f"{source}: duplicate key {key.value!r} (line {line}; first on line {seen[(key.tag, key.value)]})"
                        )
                    seen[(key.tag, key.value)] = key.start_mark.line + 1
                total += size(key, depth + 1) + size(value, depth + 1)
        elif isinstance(current, yaml.SequenceNode):
            for item in current.value:
                total += size(item, depth + 1)
        if total > MAX_YAML_NODES:
            raise UserError(f"{source}: expands to more than {MAX_YAML_NODES:,} values (aliases of aliases?); refused")
        open_nodes.discard(id(current))
        sizes[id(current)] = total
        return total

    size(node, 0)


def safe_yaml(text: str, source: str) -> Any:
    """Parses YAML text like yaml.safe_load, refusing duplicate keys, alias expansion beyond
    MAX_YAML_NODES values and nesting deeper than MAX_YAML_DEPTH (UserError naming `source`)."""
    loader = None
    try:
        loader = _RecipeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _check_node(node, source)
        return loader.construct_document(node)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"{source}: invalid YAML{where}: {problem}") from None
    except RecursionError:
        raise UserError(f"{source}: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


@dataclass(frozen=True)
class Protocol:
    """A measurement protocol (docs/protocol.md): the calibration size and the evaluation windows."""

    nsamples: int  # calibration windows
    seqlen: int  # calibration window length
    eval_seqlen: int  # evaluation window length
    eval_windows: int | None  # evaluate only the first N windows (None: all)


# The presets --protocol applies. P0 is the papers' setting, P1 the same procedure on a 2-core CPU.
PROTOCOLS: dict[str, Protocol] = {"p0": Protocol(128, 2048, 2048, None), "p1": Protocol(32, 512, 512, 128)}
DEFAULT_PROTOCOL = "p0"


def get_protocol(name: str | None) -> Protocol | None:
    """The preset called `name` (any case); None for None; UserError for an unknown one."""
    if name is None:
        return None
    if name.lower() not in PROTOCOLS:
        raise UserError(f"--protocol: expected one of {', '.join(PROTOCOLS)}, got {name!r}")
    return PROTOCOLS[name.lower()]


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dataset: str = Field("c4", description="wikitext2 | ptb | c4 | a .txt/.jsonl file | a calibration .safetensors")
    nsamples: int = Field(128, gt=0, le=100_000)
    seqlen: int = Field(2048, ge=8, le=1_000_000)
    seed: int = Field(0, ge=0)
    bos: Literal["auto", "always", "never"] = Field(
        "auto",
        description="per-window BOS: auto = BOS + seqlen-1 text tokens exactly when the tokenizer adds BOS by default; "
        "always; never (the papers' token streams)",
    )

    @field_validator("dataset")
    @classmethod
    def _known_or_existing(cls, value: str) -> str:
        if value in NAMED_DATASETS:
            return value
        if not value.endswith((".txt", ".jsonl", ".json", ".safetensors")):
            raise ValueError(f"must be one of {', '.join(NAMED_DATASETS)} or a .txt/.jsonl/.safetensors file, got {value!r}")
        if not Path(value).expanduser().is_file():
            raise ValueError(f"file not found: {value}")
        return value


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="HF directory, hub id, .gguf file, or a built-in alias (smollm2-135m, gemma3-270m)")
    calibration: CalibrationConfig = CalibrationConfig()
    method: MethodConfig
    skip: tuple[str, ...] = Field((), description="glob patterns of linear module names kept in full precision")
    output: str
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="compute dtype; auto = float32 on CPU, the checkpoint's dtype on GPU"
    )
    save_dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="dtype of the unquantized tensors written; auto = the checkpoint's own (fp16 for GGUF)"
    )
    device: str = "auto"
    hessian_dtype: Literal["float32", "float64"] = "float32"
    refine: RefineConfig | None = Field(
        None, description="gradient refinement of every quantized layer after its method (llmquant/core/refine.py)"
    )

    @field_validator("model")
    @classmethod
    def _model_exists(cls, value: str) -> str:
        from llmquant.models.loading import check_model_spec

        check_model_spec(value)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        return check_devices(value)

    def dump(self) -> dict[str, Any]:
        """JSON-able form (method block included) for llmquant.json."""
        data = self.model_dump(mode="json")
        data["method"] = self.method.model_dump(mode="json")
        if data.get("refine") is None:
            # Recipes without refinement keep the settings (checkpoint record, resume fingerprint)
            # they had before the block existed.
            data.pop("refine", None)
        return data

    def settings(self) -> dict[str, Any]:
        """`dump()` without `output`: what the result depends on (the checkpoint's recipe record and
        the resume fingerprint), so that the same recipe written elsewhere gives the same bytes."""
        return {key: value for key, value in self.dump().items() if key != "output"}


def _loc_part(part: Any) -> str:
    """A field path element; odd keys (spaces, newlines, empty) are quoted so the error stays one line."""
    text = str(part)
    return text if re.fullmatch(r"[\w\-]+", text) else json.dumps(text)


def _format_error(source: str, error: ValidationError, prefix: str = "") -> UserError:
    first = error.errors()[0]
    loc = ".".join(_loc_part(part) for part in ([prefix] if prefix else []) + list(first["loc"]))
    msg = " ".join(first["msg"].removeprefix("Value error, ").split())
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required field is missing"
    return UserError(f"{source}: {loc}: {msg}")


def _parse_method(source: str, block: Any) -> MethodConfig:
    if not isinstance(block, dict):
        raise UserError(f"{source}: method: expected a mapping with at least 'name'")
    name = block.get("name")
    if name is None:
        raise UserError(f"{source}: method.name: required field is missing")
    try:
        cls = get_method_class(str(name))
    except KeyError:
        raise UserError(
            f"{source}: method.name: unknown method {name!r}; available: {', '.join(available_methods())}"
        ) from None
    try:
        return cls.Config.model_validate(dict(block))
    except ValidationError as error:
        raise _format_error(source, error, prefix="method") from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a YAML mapping at the top level, got {type(data).__name__}")
    data = dict(data)
    if "method" not in data:
        raise UserError(f"{source}: method: required field is missing")
    method = _parse_method(source, data.pop("method"))
    try:
        return Recipe.model_validate({**data, "method": method})
    except ValidationError as error:
        raise _format_error(source, error) from None


def load_recipe(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Recipe:
    """Reads and validates a recipe; `overrides` are CLI flags in dotted form ({"calibration.seed": 1})."""
    file = Path(path)
    if not file.is_file():
        raise UserError(f"recipe not found: {path}")
    try:
        if file.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"{path}: {file.stat().st_size:,} bytes; a recipe is at most {MAX_RECIPE_BYTES:,}")
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read: {error}") from None
    data = safe_yaml(text, str(path))
    if data is None:
        raise UserError(f"{path}: the recipe is empty")
    return parse_recipe(apply_overrides(data, overrides or {}), source=str(path))


def apply_overrides(data: Any, overrides: dict[str, Any]) -> Any:
    if not isinstance(data, dict):
        return data
    data = json.loads(json.dumps(data, default=str))  # deep copy of plain YAML data
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            child = node.get(key)
            if not isinstance(child, dict):
                child = {}
                node[key] = child
            node = child
        node[leaf] = value
    return data
