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
