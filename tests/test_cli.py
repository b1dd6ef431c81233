"""The command line end to end on a tiny saved model: exit codes, outputs, JSON, atomic writes."""

from __future__ import annotations

import json
import os
import shutil
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


# --------------------------------------------------------------------------------------------------
# One interface (issue #19 item 7)


def test_every_command_takes_json_and_quiet_and_documents_every_flag():
    import typer

    from llmquant.cli import app

    group = typer.main.get_command(app)
    commands = group.commands
    assert {"quantize", "calibrate", "eval", "bench", "pack", "verify", "methods", "validate"} <= set(commands)
    for name, command in commands.items():
        options = {opt for param in command.params for opt in getattr(param, "opts", [])}
        assert {"--json", "--quiet"} <= options, name
        for param in command.params:
            assert (getattr(param, "help", None) or "").strip(), f"{name} {param.name}: no help text"
    for name in ("quantize", "calibrate", "eval"):  # the commands that read corpora
        assert "--data-dir" in {opt for param in commands[name].params for opt in getattr(param, "opts", [])}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "--modle", "x"], "No such option: --modle (Possible options: --model)"),
        (["quantize", "--recipe"], "Option '--recipe' requires an argument."),
        (["eval", "--model", "x", "--seqlen", "many"], "Invalid value for '--seqlen'"),
        (["calibrate", "--model", "x", "--output", "c.safetensors", "--quiet", "--nsamples", "-"], "Invalid value for '--nsamples'"),
    ],
)
def test_usage_errors_are_one_error_line(args, message):
    done = llmquant(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr


def test_quiet_silences_transformers_load_report_and_progress(tmp_path, tiny_llama_dir, text_file):
    """A model with a tensor transformers does not expect: it prints a LOAD REPORT (a warning) unless --quiet."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(tiny_llama_dir, model)
    tensors = load_file(str(model / "model.safetensors"))
    tensors["model.extra.weight"] = torch.zeros(3)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    args = ("eval", "--model", str(model), "--ppl", str(text_file), "--seqlen", "64", "--max-windows", "3")
    loud, quiet = llmquant(*args), llmquant(*args, "--quiet")
    assert loud.returncode == quiet.returncode == 0
    assert "LOAD REPORT" in loud.stderr and "LOAD REPORT" not in quiet.stderr
    assert quiet.stderr.strip() == ""


def test_progress_reaches_logs_and_pipes_as_plain_lines(tmp_path, tiny_llama_dir, text_file):
    done = llmquant("eval", "--model", str(tiny_llama_dir), "--ppl", str(text_file), "--seqlen", "64", "--max-windows", "40")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"eval {text_file}: ")]
    assert len(lines) >= 10 and lines[-1].startswith(f"eval {text_file}: 40/40 (100%)")  # every 5%, and at the end
    assert "\x1b[" not in done.stderr and "━" not in done.stderr  # no terminal bar drawn into the log


def test_bench_checks_the_context_before_loading(tiny_llama_dir):
    done = llmquant("bench", "--model", str(tiny_llama_dir), "--prompt-tokens", "100000")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {tiny_llama_dir}: the benchmark needs 100000 positions (--prompt-tokens 100000, --new-tokens 128), "
        "the model has 512"
    ]


def test_pack_calibrate_methods_validate_speak_json_and_keep_quiet(recipe, tmp_path, tiny_llama_dir, text_file):
    out = tmp_path / "q"
    assert llmquant("quantize", "--recipe", str(recipe), "--output", str(out), "--quiet", "--set", "method.name=rtn").returncode == 0
    packed = llmquant("pack", "--model", str(out), "--output", str(tmp_path / "f"), "--format", "fake", "--json", "--quiet")
    assert packed.returncode == 0 and json.loads(packed.stdout)["format"] == "fake" and packed.stderr == ""
    calib = llmquant(
        "calibrate", "--model", str(tiny_llama_dir), "--dataset", str(text_file), "--nsamples", "2", "--seqlen", "16",
        "--output", str(tmp_path / "c.safetensors"), "--quiet", "--json",
    )
    assert calib.returncode == 0 and json.loads(calib.stdout)["nsamples"] == 2
    listed = json.loads(llmquant("methods", "--json").stdout)
    assert listed["gptq"]["fields"]["bits"]["default"] == 4 and "uniform" in listed["gptq"]["layouts"]
