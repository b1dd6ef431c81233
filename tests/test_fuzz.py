"""Property-based tests (hypothesis) of every loader of user input: recipes, packed and fake
checkpoints, calibration files and the model directory to quantize.

The property is the same everywhere: whatever the input, the loader either succeeds or raises one
UserError whose message is one line (the CLI prints it and exits 2) — never another exception (a
traceback, exit 1). Damage that is detectable (NaN/Inf, wrong shapes or dtypes, truncation) must be
detected; a changed byte inside tensor data is caught by the checksums (tests/test_integrity.py).
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import struct
import subprocess
import sys
import tempfile
from contextlib import redirect_stderr
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from llmquant.data.calibration import CalibrationSet
from llmquant.errors import UserError
from llmquant.formats import read_checkpoint
from llmquant.runtime import load_quantized
from llmquant.safetensors_io import write_safetensors
from llmquant.runtime.loader import load_model
from llmquant.quantize import check_calibration_ids, check_finite_weights, run_quantize
from llmquant.recipe import Recipe, load_recipe, parse_recipe

FUZZ = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def one_line_user_error(call):
    """Runs call(); returns its result, or None after checking that it raised a one-line UserError."""
    try:
        return call()
    except UserError as error:
        assert "\n" not in str(error).strip(), str(error)
        return None


# Byte-identical comparisons need one thread count for every run (docs/reliability.md).
pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------------------
# Recipes

SCALARS = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12)
VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8
)
TOP_KEYS = ["model", "calibration", "method", "skip", "output", "dtype", "save_dtype", "device", "hessian_dtype"]
METHOD_KEYS = ["name", "bits", "group_size", "percdamp", "blocksize", "sym", "act_order", "salient_fraction", "high_bit",
               "allocation", "sqc_range", "sqc_grid", "fidelity", "split_points", "max_salient_columns"]
CALIBRATION_KEYS = ["dataset", "nsamples", "seqlen", "seed"]


def write_recipe(text: str | bytes) -> Path:
    path = Path(tempfile.mkdtemp()) / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return path


@FUZZ
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_any_text_is_a_recipe_or_one_user_error(text):
    path = write_recipe(text)
    try:
        result = one_line_user_error(lambda: load_recipe(path))
    finally:
        shutil.rmtree(path.parent)
    assert result is None or isinstance(result, Recipe)


@st.composite
def recipe_mappings(draw, base: dict):
    """A valid recipe with random fields replaced, removed or added, at every level."""
    data = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.sampled_from(["top", "method", "calibration"]))
        node = data if where == "top" else data.setdefault(where, {})
        if not isinstance(node, dict):
            node = data
        keys = {"top": TOP_KEYS, "method": METHOD_KEYS, "calibration": CALIBRATION_KEYS}[where]
        key = draw(st.sampled_from(keys) | st.text(min_size=1, max_size=8))
        action = draw(st.sampled_from(["set", "delete"]))
        if action == "delete":
            node.pop(key, None)
        else:
            node[key] = draw(VALUES | st.sampled_from(["gptq", "slim", "billm", "~nobody/x.txt", "x.safetensors", "-1", "auto"]))
    return data


@pytest.fixture(scope="module")
def valid_recipe(tiny_llama_dir, tmp_path_factory) -> dict:
    corpus = tmp_path_factory.mktemp("fuzz") / "corpus.txt"
    corpus.write_text("some calibration text " * 50)
    return {
        "model": str(tiny_llama_dir),
        "calibration": {"dataset": str(corpus), "nsamples": 2, "seqlen": 16, "seed": 0},
        "method": {"name": "gptq", "bits": 3, "group_size": 32},
        "output": str(corpus.parent / "out"),
    }


@FUZZ
@given(data=st.data())
def test_mutated_recipes_are_valid_or_one_user_error(valid_recipe, data):
    mapping = data.draw(recipe_mappings(valid_recipe))
    path = write_recipe(yaml.safe_dump(mapping))
    try:
        result = one_line_user_error(lambda: load_recipe(path))
    finally:
        shutil.rmtree(path.parent)
    assert result is None or isinstance(result, Recipe)
    # The same data as --set overrides (dotted keys) on top of the valid recipe.
    overrides = {f"{k}.{kk}" if isinstance(v, dict) else k: vv for k, v in mapping.items() for kk, vv in (v.items() if isinstance(v, dict) else [(None, v)])}
    path = write_recipe(yaml.safe_dump(valid_recipe))
    try:
        one_line_user_error(lambda: load_recipe(path, overrides))
    finally:
        shutil.rmtree(path.parent)


@FUZZ
@given(st.dictionaries(st.sampled_from(TOP_KEYS) | st.text(max_size=6), VALUES, max_size=6))
def test_random_mappings_are_one_user_error(mapping):
    assert one_line_user_error(lambda: parse_recipe(mapping)) is None or "model" in mapping


# --------------------------------------------------------------------------------------------------
# Damaging safetensors files


@st.composite
def byte_damage(draw, size: int):
    """(kind, argument): truncation, overwritten bytes, a wrong header length, or trailing garbage."""
    kind = draw(st.sampled_from(["truncate", "overwrite", "header-length", "append"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1))
    if kind == "overwrite":
        return kind, draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(0, 255)), min_size=1, max_size=8))
    if kind == "header-length":
        return kind, draw(st.integers(0, 2**64 - 1) | st.integers(0, 4 * size))
    return kind, draw(st.binary(min_size=1, max_size=64))


def apply_byte_damage(path: Path, damage) -> None:
    data = bytearray(path.read_bytes())
    kind, arg = damage
    if kind == "truncate":
        data = data[:arg]
    elif kind == "overwrite":
        for position, value in arg:
            data[position] = value
    elif kind == "header-length":
        data[:8] = struct.pack("<Q", arg)
    else:
        data += arg
    path.write_bytes(bytes(data))


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


@st.composite
def tensor_edit(draw, keys: list[str]):
    """(key, kind): NaN/Inf in a float tensor, a wrong shape, or a wrong dtype."""
    return draw(st.sampled_from(keys)), draw(st.sampled_from(["nan", "inf", "-inf", "drop-last", "flatten", "add-dim", "dtype"]))


def apply_tensor_edit(path: Path, edit) -> tuple[bool, bool]:
    """Rewrites the file with one tensor edited: (applied, must be detected by a full loader)."""
    tensors, metadata = read_all(path)
    key, kind = edit
    tensor = tensors[key]
    if kind in ("nan", "inf", "-inf"):
        if not tensor.is_floating_point() or tensor.numel() == 0:
            return False, False
        tensor = tensor.clone()
        tensor.view(-1)[tensor.numel() // 2] = float(kind)
    elif kind == "drop-last":
        if tensor.dim() == 0 or tensor.shape[0] < 2:
            return False, False
        tensor = tensor[:-1].clone()
    elif kind == "flatten":
        if tensor.dim() < 2:
            return False, False
        tensor = tensor.reshape(-1).clone()
    elif kind == "add-dim":
        tensor = tensor.unsqueeze(0).clone()
    else:
        tensor = tensor.to(torch.int32 if tensor.is_floating_point() or tensor.dtype == torch.bool else torch.float32)
    tensors[key] = tensor
    write_safetensors(path, tensors, metadata)
    return True, kind != "dtype"


@pytest.fixture(scope="module")
def checkpoints(tiny_llama_dir, valid_recipe, tmp_path_factory) -> dict[str, Path]:
    """A native (packed) and a fake checkpoint of the tiny LLaMA, 2-bit GPTQ."""
    root = tmp_path_factory.mktemp("fuzz-ckpt")
    made = {}
    for fmt in ("packed", "fake"):
        recipe = parse_recipe({**valid_recipe, "method": {"name": "gptq", "bits": 2, "group_size": 32}, "output": str(root / fmt)})
        run_quantize(recipe, fmt=fmt)
        made[fmt] = root / fmt
    return made


def damaged_copy(source: Path) -> Path:
    target = Path(tempfile.mkdtemp()) / "ckpt"
    shutil.copytree(source, target)
    return target


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["packed", "fake"]))
def test_damaged_checkpoint_bytes_load_or_give_one_user_error(checkpoints, data, fmt):
    directory = damaged_copy(checkpoints[fmt])
    try:
        name = data.draw(st.sampled_from(["model.safetensors", "llmquant-records.safetensors"] if fmt == "fake" else ["model.safetensors"]))
        path = directory / name
        damage = data.draw(byte_damage(path.stat().st_size))
        apply_byte_damage(path, damage)
        loaded = one_line_user_error(lambda: load_quantized(directory) if fmt == "packed" else read_checkpoint(directory))
        if damage[0] in ("truncate", "append") or (damage[0] == "header-length" and damage[1] != struct.unpack("<Q", checkpoints[fmt].joinpath(name).read_bytes()[:8])[0]):
            assert loaded is None, f"undetected damage {damage}"
    finally:
        shutil.rmtree(directory.parent)


@FUZZ
@given(data=st.data(), fmt=st.sampled_from(["packed", "fake"]))
def test_damaged_checkpoint_tensors_are_detected(checkpoints, data, fmt):
    directory = damaged_copy(checkpoints[fmt])
    try:
        path = directory / data.draw(st.sampled_from(["model.safetensors", "llmquant-records.safetensors"] if fmt == "fake" else ["model.safetensors"]))
        keys = sorted(read_all(path)[0])
        edit = data.draw(tensor_edit(keys))
        _, must_fail = apply_tensor_edit(path, edit)
        if fmt == "fake":  # read_checkpoint checks the records and NaN/Inf; shapes of plain tensors are transformers' job
            must_fail = must_fail and (edit[1] in ("nan", "inf", "-inf") or path.name != "model.safetensors")
        loaded = one_line_user_error(lambda: load_quantized(directory) if fmt == "packed" else read_checkpoint(directory))
        if must_fail:
            assert loaded is None, f"undetected edit {edit}"
    finally:
        shutil.rmtree(directory.parent)


@FUZZ
@given(key=st.sampled_from(["model_type", "hidden_size", "num_hidden_layers", "vocab_size", "quantization_config", "intermediate_size", "dtype"]), value=VALUES)
def test_damaged_checkpoint_configs_load_or_give_one_user_error(checkpoints, key, value):
    directory = damaged_copy(checkpoints["packed"])
    try:
        config = json.loads((directory / "config.json").read_text())
        config[key] = value
        (directory / "config.json").write_text(json.dumps(config))
        one_line_user_error(lambda: load_quantized(directory))
    finally:
        shutil.rmtree(directory.parent)


# --------------------------------------------------------------------------------------------------
# Calibration files


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fuzz-calib") / "calib.safetensors"
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    CalibrationSet(windows, {"dataset": "x", "seed": 0, "nsamples": 3, "seqlen": 16}).save(path)
    return path


@FUZZ
@given(data=st.data())
def test_damaged_calibration_files_load_or_give_one_user_error(calibration_file, data):
    directory = Path(tempfile.mkdtemp())
    path = directory / "calib.safetensors"
    shutil.copy(calibration_file, path)
    try:
        if data.draw(st.booleans()):
            apply_byte_damage(path, data.draw(byte_damage(path.stat().st_size)))
            one_line_user_error(lambda: CalibrationSet.load(path))
        else:
            tensors, metadata = read_all(path)
            choice = data.draw(st.sampled_from(["edit", "metadata"]))
            if choice == "edit":
                applied, _ = apply_tensor_edit(path, data.draw(tensor_edit(sorted(tensors))))
                assume(applied)
            else:
                write_safetensors(path, tensors, {"llmquant": data.draw(st.text(max_size=30) | VALUES.map(json.dumps))})
            assert one_line_user_error(lambda: CalibrationSet.load(path)) is None  # edits break the sha256
    finally:
        shutil.rmtree(directory)


@FUZZ
@given(low=st.integers(-(2**40), 300), high=st.integers(0, 2**40))
def test_calibration_ids_outside_the_vocabulary_are_refused(low, high):
    class Embeddings:
        num_embeddings = 258

    class Model:
        def get_input_embeddings(self):
            return Embeddings()

    windows = torch.tensor([[low, high]])
    ok = one_line_user_error(lambda: check_calibration_ids(CalibrationSet(windows), Model()) or True)
    assert bool(ok) == (0 <= low < 258 and high < 258)


# --------------------------------------------------------------------------------------------------
# The model directory to quantize


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_model_directories_load_or_give_one_user_error(tiny_llama_dir, data):
    directory = damaged_copy(tiny_llama_dir)
    try:
        path = directory / "model.safetensors"
        if data.draw(st.booleans()):
            damage = data.draw(byte_damage(path.stat().st_size))
            apply_byte_damage(path, damage)
            must_fail = damage[0] in ("truncate", "append")
        else:
            keys = sorted(read_all(path)[0])
            edit = data.draw(tensor_edit(keys))
            _, must_fail = apply_tensor_edit(path, edit)
        loaded = one_line_user_error(lambda: load_model(str(directory), "auto", "cpu"))
        if loaded is not None:
            # transformers loads NaN/Inf happily; quantize refuses them before any work (exit 2).
            model, _, source = loaded
            loaded = one_line_user_error(lambda: check_finite_weights(model, source.describe()) or loaded)
        if must_fail:
            assert loaded is None
    finally:
        shutil.rmtree(directory.parent)


# --------------------------------------------------------------------------------------------------
# The command line: exit 2 and one line, no traceback, no output


def run_cli(*args: str) -> tuple[int, str]:
    """llmquant's main() in this process (cheap, no interpreter start): exit code and stderr."""
    from llmquant import cli

    buffer = io.StringIO()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    argv = sys.argv
    sys.argv = ["llmquant", *args]
    try:
        with redirect_stderr(buffer):
            try:
                cli.main()
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        root.handlers[:] = handlers
        root.setLevel(level)
    return code, buffer.getvalue()


@FUZZ
@given(data=st.data())
def test_cli_on_damaged_checkpoints_exits_2_with_one_line_and_no_output(checkpoints, data):
    directory = damaged_copy(checkpoints["packed"])
    out = directory.parent / "out"
    try:
        path = directory / "model.safetensors"
        if data.draw(st.booleans()):
            apply_byte_damage(path, data.draw(byte_damage(path.stat().st_size)))
        else:
            apply_tensor_edit(path, data.draw(tensor_edit(sorted(read_all(path)[0]))))
        code, stderr = run_cli("pack", "--model", str(directory), "--output", str(out), "--format", "fake")
        assert code in (0, 2), stderr
        if code == 2:
            assert [line for line in stderr.splitlines() if line.startswith("error:")] and not out.exists()
            assert sorted(p.name for p in out.parent.iterdir()) == ["ckpt"]  # no partial directory either
    finally:
        shutil.rmtree(directory.parent)


def test_cli_on_a_garbage_recipe_exits_2_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"model: [unclosed\n\xff\xfe method: {")
    done = subprocess.run([sys.executable, "-m", "llmquant.cli", "quantize", "-r", str(recipe)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error:") and len(done.stderr.strip().splitlines()) == 1
    assert "Traceback" not in done.stderr
