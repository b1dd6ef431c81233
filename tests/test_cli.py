"""The command line end to end on a tiny saved model: exit codes, outputs, JSON, atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer


def llmquant(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "llmquant.cli", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_llama_dir) -> Path:
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(3000)))
    path = root / "recipe.yaml"
    path.write_text(
        f"model: {tiny_llama_dir}\n"
        f"calibration: {{dataset: {corpus}, nsamples: 4, seqlen: 64, seed: 0}}\n"
        "method: {name: gptq, bits: 3, group_size: 32}\n"
        f"output: {root / 'out'}\n"
    )
    return path


def test_quantize_then_eval(recipe, tmp_path):
    out = tmp_path / "q"
    done = llmquant("quantize", "--recipe", str(recipe), "--output", str(out), "--quiet", "--json")
    assert done.returncode == 0, done.stderr
    assert "Loading weights" not in done.stderr  # --quiet silences transformers' own progress bars too
    report = json.loads(done.stdout)
    assert report["bits"]["code"] == 3 and report["parameters"]["quantized"] > 0
    assert len(report["layers"]) == 2 and report["calibration"]["nsamples"] == 4
    assert {"llmquant.json", "config.json"} <= {p.name for p in out.iterdir()}
    assert not list(tmp_path.glob(".q.partial-*"))

    # Refuses to overwrite without --force, before loading anything.
    again = llmquant("quantize", "--recipe", str(recipe), "--output", str(out), "--quiet")
    assert again.returncode == 2 and "already exists" in again.stderr

    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(200)))
    evaluated = llmquant("eval", "--model", str(out), "--ppl", str(text), "--seqlen", "128", "--json", "--quiet")
    assert evaluated.returncode == 0, evaluated.stderr
    result = json.loads(evaluated.stdout)["results"][0]
    assert result["windows"] == len(byte_tokenizer()(text.read_text()).input_ids) // 128
    assert result["ppl"] > 1 and len(result["text_sha256"]) == 64


@pytest.mark.parametrize(
    ("args", "code", "fragment"),
    [
        (["quantize", "--recipe", "missing.yaml"], 2, "recipe not found"),
        (["quantize"], 2, "--recipe"),
        (["eval", "--model", "./nowhere"], 2, "model directory not found"),
        (["eval", "--model", "./nowhere", "--seqlen", "1"], 2, "--seqlen"),
        (["quantize", "--recipe", "x.yaml", "--protocol", "p9"], 2, "--protocol"),
        (["no-such-command"], 2, "No such command"),
    ],
)
def test_user_errors_exit_2_with_one_line(args, code, fragment):
    done = llmquant(*args)
    assert done.returncode == code
    assert fragment in done.stderr
    assert "Traceback" not in done.stderr


def test_bad_recipe_fails_before_loading(tmp_path, tiny_llama_dir):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {tiny_llama_dir}\nmethod: {{name: gptq, bits: 12}}\noutput: {tmp_path / 'o'}\n")
    done = llmquant("quantize", "--recipe", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"error: {bad}: method.bits: Input should be less than or equal to 8"]


def test_calibrate_writes_a_reusable_file(tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "calib.safetensors"
    done = llmquant(
        "calibrate", "--model", str(tiny_llama_dir), "--dataset", str(text_file),
        "--nsamples", "3", "--seqlen", "40", "--seed", "5", "--output", str(out), "--json",
    )
    assert done.returncode == 0, done.stderr
    meta = json.loads(done.stdout)
    assert meta["nsamples"] == 3 and meta["seed"] == 5 and len(meta["windows_sha256"]) == 64
    from llmquant.data.calibration import CalibrationSet

    assert CalibrationSet.load(out).windows.shape == (3, 40)
    assert llmquant("calibrate", "--model", str(tiny_llama_dir), "--output", str(out)).returncode == 2  # exists


def test_methods_lists_every_backend():
    done = llmquant("methods")
    assert done.returncode == 0
    for name in ("rtn", "gptq", "billm", "pbllm", "slim"):
        assert f"{name}  (layouts:" in done.stdout


def test_same_seed_same_weights(recipe, tmp_path):
    """Determinism at the level users see: two runs, identical quantized weights."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        assert llmquant("quantize", "--recipe", str(recipe), "--output", str(out), "--quiet", "--format", "fake").returncode == 0
        outs.append(out)
    from safetensors.torch import load_file

    first, second = (load_file(str(o / "model.safetensors")) for o in outs)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_unquantized_tensors_keep_the_checkpoints_dtype(tmp_path, text_file):
    """Computing in float32 on a CPU must not write the embeddings of an fp16 checkpoint in float32."""
    from safetensors import safe_open

    from conftest import tiny_model
    from llmquant.quantize import run_quantize
    from llmquant.recipe import parse_recipe

    source = tmp_path / "fp16-model"
    tiny_model("llama").half().save_pretrained(source)
    byte_tokenizer().save_pretrained(source)
    recipe = parse_recipe(
        {
            "model": str(source),
            "calibration": {"dataset": str(text_file), "nsamples": 2, "seqlen": 32},
            "method": {"name": "rtn", "bits": 4, "group_size": 32},
            "output": str(tmp_path / "out"),
        }
    )
    out, _ = run_quantize(recipe)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_slice("model.embed_tokens.weight").get_dtype() == "F16"


def test_validate_resolves_protocol_and_set_like_quantize():
    shipped = Path(__file__).resolve().parents[1] / "recipes" / "gptq-w4g128.yaml"
    done = llmquant("validate", "--recipe", str(shipped), "--protocol", "p1", "--set", "calibration.dataset=wikitext2")
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    assert resolved["calibration"] == {"dataset": "wikitext2", "nsamples": 32, "seqlen": 512, "seed": 0, "bos": "auto"}
    bad = llmquant("validate", "--recipe", str(shipped), "--set", "method.bits=99")
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines() == ["error: " + f"{shipped}: method.bits: Input should be less than or equal to 8"]


def test_recipes_that_do_not_fit_the_model_fail_before_any_work(tmp_path, tiny_llama_dir):
    # A SliM allocation with the wrong number of groups: one line naming the linear, exit 2, and no
    # calibration, work directory or output (the method checks every linear before the run starts).
    linear = "model.layers.0.self_attn.q_proj"
    bad = tmp_path / "slim.yaml"
    bad.write_text(
        f"model: {tiny_llama_dir}\ncalibration: {{dataset: c4}}\n"
        f"method: {{name: slim, bits: 2, group_size: 32, allocation: {{{linear}: [2, 2, 2]}}}}\n"
        f"output: {tmp_path / 'o'}\n"
    )
    done = llmquant("quantize", "--recipe", str(bad), "--quiet")
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"error: recipe: method: slim allocation for {linear}: 3 groups given, the linear has 2"
    ]
    assert list(tmp_path.iterdir()) == [bad]

    # A packed checkpoint is not a model to quantize.
    rtn = tmp_path / "rtn.yaml"
    rtn.write_text(f"model: {tiny_llama_dir}\nmethod: {{name: rtn, bits: 4, group_size: 32}}\noutput: {tmp_path / 'q'}\n")
    assert llmquant("quantize", "--recipe", str(rtn), "--quiet").returncode == 0
    again = llmquant("quantize", "--recipe", str(rtn), "--model", str(tmp_path / "q"), "--output", str(tmp_path / "qq"))
    assert again.returncode == 2 and "a packed llmquant checkpoint; quantize needs the full-precision model" in again.stderr
