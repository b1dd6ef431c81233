"""Recipe validation: every bad recipe is one UserError line naming the field, before anything loads."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmquant.errors import UserError
from llmquant.recipe import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def base(tmp_path: Path, model_dir: Path, method: str = "{name: gptq, bits: 3}", extra: str = "") -> str:
    return f"model: {model_dir}\nmethod: {method}\noutput: {tmp_path / 'out'}\n{extra}"


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(recipe):
    parsed = load_recipe(recipe)
    assert parsed.output.startswith("out/")


@pytest.mark.parametrize(
    ("method", "extra", "field"),
    [
        ("{name: gptq, bits: 9}", "", "method.bits"),
        ("{name: gptq, bits: 1}", "", "method.bits"),
        ("{name: gptq, bits: three}", "", "method.bits"),
        ("{name: gptq, bitz: 3}", "", "method.bitz: unknown key"),
        ("{name: gptq, group_size: 0}", "", "method: group_size must be"),
        ("{name: nope}", "", "method.name: unknown method 'nope'"),
        ("{bits: 3}", "", "method.name: required"),
        ("{name: gptq}", "calibration: {nsamples: 0}", "calibration.nsamples"),
        ("{name: gptq}", "calibration: {seqlen: -5}", "calibration.seqlen"),
        ("{name: gptq}", "calibration: {dataset: wikitext103}", "calibration.dataset"),
        ("{name: gptq}", "calibration: {dataset: /no/such/file.txt}", "calibration.dataset: file not found"),
        ("{name: gptq}", "calibration: {nsamples: 4, colour: red}", "calibration.colour: unknown key"),
        ("{name: gptq}", "dtype: float8", "dtype"),
        ("{name: gptq}", "device: tpu", "device"),
        ("{name: gptq}", "flavour: vanilla", "flavour: unknown key"),
    ],
)
def test_bad_recipes_name_the_field(tmp_path, tiny_llama_dir, method, extra, field):
    path = write(tmp_path, base(tmp_path, tiny_llama_dir, method, extra))
    with pytest.raises(UserError) as error:
        load_recipe(path)
    message = str(error.value)
    assert field in message and "\n" not in message and message.startswith(str(path))


def test_missing_model_and_output(tmp_path, tiny_llama_dir):
    with pytest.raises(UserError, match="model: model directory not found"):
        load_recipe(write(tmp_path, f"model: ./missing\nmethod: {{name: rtn}}\noutput: {tmp_path}/o\n"))
    with pytest.raises(UserError, match="output: required"):
        load_recipe(write(tmp_path, f"model: {tiny_llama_dir}\nmethod: {{name: rtn}}\n"))
    with pytest.raises(UserError, match="model file not found"):
        load_recipe(write(tmp_path, f"model: ./x.gguf\nmethod: {{name: rtn}}\noutput: {tmp_path}/o\n"))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [("", "empty"), ("- a\n- b\n", "mapping"), ("model: [unclosed\n", "invalid YAML (line 2"), ("a: b: c\n", "invalid YAML")],
)
def test_malformed_yaml(tmp_path, text, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        load_recipe(write(tmp_path, text))


def test_cli_overrides_win(tmp_path, tiny_llama_dir, text_file):
    path = write(tmp_path, base(tmp_path, tiny_llama_dir))
    parsed = load_recipe(
        path,
        {"calibration.nsamples": 7, "calibration.seqlen": 64, "calibration.dataset": str(text_file), "output": "x"},
    )
    assert (parsed.calibration.nsamples, parsed.calibration.seqlen, parsed.output) == (7, 64, "x")
    assert parsed.calibration.dataset == str(text_file)
    # An override is validated like the recipe itself.
    with pytest.raises(UserError, match="calibration.nsamples"):
        load_recipe(path, {"calibration.nsamples": -1})


# --------------------------------------------------------------------------------------------------
# Defensive YAML (issue #19 items 4 and 6): duplicate keys, alias bombs, size and depth limits


def test_a_duplicate_key_is_refused_not_overridden(tmp_path, tiny_llama_dir):
    # A second `method:` used to replace the first without a word (a gptq recipe became rtn).
    text = base(tmp_path, tiny_llama_dir) + "method: {name: rtn, bits: 3}\n"
    with pytest.raises(UserError, match=r"recipe.yaml: duplicate key 'method' \(line 4; first on line 2\)"):
        load_recipe(write(tmp_path, text))
    nested = base(tmp_path, tiny_llama_dir, method="{name: gptq, bits: 3, bits: 4}")
    with pytest.raises(UserError, match="duplicate key 'bits'"):
        load_recipe(write(tmp_path, nested))


def test_anchors_and_merge_keys_still_work(tmp_path, tiny_llama_dir):
    merged = f"model: {tiny_llama_dir}\noutput: {tmp_path / 'out'}\nmethod: &m {{name: gptq, bits: 3}}\nskip: [*m]\n"
    with pytest.raises(UserError, match="skip.0: Input should be a valid string"):  # the alias expanded, then validated
        load_recipe(write(tmp_path, merged))
    text = (
        f"model: {tiny_llama_dir}\noutput: {tmp_path / 'out'}\n"
        "defaults: &gptq {name: gptq, bits: 3}\n"
        "method: {<<: *gptq, bits: 4}\n"
    )
    with pytest.raises(UserError, match="defaults: unknown key"):
        load_recipe(write(tmp_path, text))  # parsed (aliases and merges fine), then refused by the schema


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path, tiny_llama_dir):
    import time

    levels = ["  a: &a [x, x, x, x, x, x, x, x, x]"]
    for previous, name in zip("abcdefgh", "bcdefghi"):
        levels.append(f"  {name}: &{name} [{', '.join([f'*{previous}'] * 9)}]")
    text = base(tmp_path, tiny_llama_dir) + "junk:\n" + "\n".join(levels) + "\n"  # 9^9 = 387M items
    start = time.perf_counter()
    with pytest.raises(UserError, match=r"recipe.yaml: expands to more than 1,000,000 values"):
        load_recipe(write(tmp_path, text))
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a: &a [*a]\n", "an alias refers to a value that contains it"),
        ("x: " + "[" * 150 + "]" * 150 + "\n", "nested deeper than 100 levels"),
    ],
)
def test_recursive_and_deep_yaml_is_one_user_error(tmp_path, text, message):
    with pytest.raises(UserError, match=message):
        load_recipe(write(tmp_path, text))


def test_a_recipe_larger_than_the_limit_is_refused_unread(tmp_path):
    from llmquant.recipe import MAX_RECIPE_BYTES

    path = tmp_path / "recipe.yaml"
    path.write_text("# " + "x" * MAX_RECIPE_BYTES + "\n")
    with pytest.raises(UserError, match="a recipe is at most 1,048,576"):
        load_recipe(path)


def test_set_values_get_the_same_limits(tmp_path, tiny_llama_dir):
    from llmquant.cli import _parse_sets

    bomb = "[" + ", ".join(["&a [x, x, x, x, x, x, x, x, x]"] + ["*a"] * 8) + "]"
    assert _parse_sets([f"skip={bomb}"])["skip"][1] == ["x"] * 9  # small aliases are fine
    with pytest.raises(UserError, match="--set method: duplicate key 'bits'"):
        _parse_sets(["method={bits: 3, bits: 4}"])
