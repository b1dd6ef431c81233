"""Reliability (docs/reliability.md): resume after a crash is bit-identical, identical runs give
identical bytes, numerical failures stop with a named module, outputs appear only when complete.

In-process runs here use one torch thread (fast on a busy 2-core machine); runs are only compared
with runs made the same way (in-process with in-process, CLI with CLI): the thread configuration is
part of what bit-identity needs (docs/reliability.md, "Determinism").
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import byte_tokenizer, tiny_model
from llmquant.core.hessian import inverse_cholesky_upper, record_damping
from llmquant.core.runner import SequentialRunner
from llmquant.errors import NumericalError, UserError
from llmquant.runtime import load_quantized
from llmquant.methods import get_method_class
from llmquant.models.layer_maps import ResolvedLayers
from llmquant.runtime.loader import load_model
from llmquant.output import atomic_output_dir
from llmquant.quantize import run_quantize
from llmquant.recipe import parse_recipe
from llmquant.resume import WorkDir, check_work_dir, work_dir_for

VOLATILE = {"created", "time_seconds", "peak_memory", "resumed_layers"}


# Byte-identical comparisons need one thread count for every run (docs/reliability.md).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("rel") / "corpus.txt"
    path.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(400)))
    return path


METHODS = {
    "rtn": {"bits": 3, "group_size": 32},
    "sign": {"group_size": 32},
    "gptq": {"bits": 2, "group_size": 16},
    "slim": {"bits": 2, "group_size": 16},
    "billm": {"blocksize": 32},
    "pbllm": {},
}


def recipe(model_dir, corpus, output, method="gptq", **method_fields):
    fields = {**METHODS[method], **method_fields}
    return parse_recipe(
        {
            "model": str(model_dir),
            "calibration": {"dataset": str(corpus), "nsamples": 3, "seqlen": 32, "seed": 1},
            "method": {"name": method, **fields},
            "output": str(output),
        }
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def stable_report(directory: Path) -> dict:
    """llmquant.json without the fields that legitimately differ between runs (times, memory)."""
    report = json.loads((directory / "llmquant.json").read_text())
    for key in VOLATILE:
        report.pop(key, None)
    report["recipe"].pop("output")
    for layer in report["layers"]:
        layer.pop("seconds")
        for linear in layer["linears"]:
            linear.pop("seconds")
    return report


def assert_same_checkpoint(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "llmquant.json":
            assert sha256(a / name) == sha256(b / name), name
    assert stable_report(a) == stable_report(b)


class Crash(Exception):
    """Stands in for a crash (in-process): raised right after a layer was checkpointed."""


def crash_after(monkeypatch, layer: int) -> None:
    """Wraps the work directory's layer sink: layer `layer` is checkpointed, then the run crashes."""
    save_layer = WorkDir.save_layer

    def save_then_crash(self, report, records, next_inputs):
        save_layer(self, report, records, next_inputs)
        if report.index == layer:
            raise Crash(report.index)

    monkeypatch.setattr(WorkDir, "save_layer", save_then_crash)


# --------------------------------------------------------------------------------------------------
# Resume


@pytest.mark.parametrize(
    ("method", "fmt", "layer"),
    [("rtn", "packed", 0), ("gptq", "packed", 1), ("slim", "packed", 0), ("slim", "fake", 0), ("billm", "fake", 0), ("pbllm", "packed", 0)],
)
def test_resume_after_a_crash_is_bit_identical(tiny_llama_dir, corpus, tmp_path, monkeypatch, method, fmt, layer):
    reference = tmp_path / "reference"
    run_quantize(recipe(tiny_llama_dir, corpus, reference, method), fmt=fmt)

    out = tmp_path / "out"
    crash_after(monkeypatch, layer)
    with pytest.raises(Crash):
        run_quantize(recipe(tiny_llama_dir, corpus, out, method), fmt=fmt)
    work = work_dir_for(out)
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))
    assert (work / "layer-0000.safetensors").is_file() and (work / "fingerprint.json").is_file()
    if layer == 1 or method == "rtn":  # the last layer, or a data-free method: no hidden states to keep
        assert not list(work.glob("hidden-*"))
    else:
        assert (work / "hidden-0001.safetensors").is_file()

    monkeypatch.undo()
    progress = []
    _, report = run_quantize(
        recipe(tiny_llama_dir, corpus, out, method), fmt=fmt, resume=True, on_start=lambda n, done: progress.append((n, done))
    )
    assert progress == [(2, layer + 1)] and report["resumed_layers"] == layer + 1
    assert_same_checkpoint(reference, out)
    assert not work.exists()


@pytest.mark.parametrize("method", ["rtn", "sign"])
def test_data_free_methods_load_no_data_and_run_no_forward(tiny_llama_dir, corpus, tmp_path, monkeypatch, method):
    """RTN and sign look at the weights only: no calibration data is loaded, the model is never run,
    and each weight is exactly the method's own quantization of it."""
    monkeypatch.setattr("llmquant.quantize.load_or_build_calibration", lambda *a: pytest.fail("calibration data loaded"))
    monkeypatch.setattr("llmquant.core.runner.capture_layer_inputs", lambda *a: pytest.fail("a forward pass ran"))
    out = tmp_path / "out"
    _, report = run_quantize(recipe(tiny_llama_dir, corpus, out, method))
    assert report["calibration"] == {"dataset": None, "used": False, "windows_sha256": report["calibration"]["windows_sha256"]}
    linears = [r for layer in report["layers"] for r in layer["linears"]]
    assert linears and all(r["relative_error"] is None and r["tokens"] == -1 for r in linears)
    assert report["uncalibrated_linears"] == []
    fp, _, _ = load_model(str(tiny_llama_dir), "float32", "cpu")
    quantized = load_quantized(out)
    cls = get_method_class(method)
    backend = cls(recipe(tiny_llama_dir, corpus, out, method).method)
    name = "model.layers.1.mlp.down_proj"
    expected = backend.quantize(name, fp.get_submodule(name).weight.detach().float().clone(), None).dequantized
    # (up to the float16 rounding of scales and zero points in the packed file)
    assert (quantized.get_submodule(name).dequantize().float() - expected).abs().max() < 1e-3


def test_a_crash_while_writing_the_checkpoint_resumes_without_requantizing(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    run_quantize(recipe(tiny_llama_dir, corpus, reference, "slim"))
    out = tmp_path / "out"

    def broken_writer(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("llmquant.quantize.write_checkpoint", broken_writer)
    with pytest.raises(OSError):
        run_quantize(recipe(tiny_llama_dir, corpus, out, "slim"))
    assert not out.exists() and not list(tmp_path.glob(".out.*-*"))  # no output, no partial directory
    monkeypatch.undo()
    ran = []
    _, report = run_quantize(recipe(tiny_llama_dir, corpus, out, "slim"), resume=True, on_layer_done=ran.append)
    assert ran == [] and report["resumed_layers"] == 2
    assert_same_checkpoint(reference, out)


@pytest.mark.parametrize("killed", ["writing layer 1", "between layer 0 and its hidden states"])
def test_a_kill_in_the_middle_of_a_checkpoint_is_harmless(tiny_llama_dir, corpus, tmp_path, monkeypatch, killed):
    reference = tmp_path / "reference"
    run_quantize(recipe(tiny_llama_dir, corpus, reference, "gptq"))
    out = tmp_path / "out"
    crash_after(monkeypatch, 0)
    with pytest.raises(Crash):
        run_quantize(recipe(tiny_llama_dir, corpus, out, "gptq"))
    monkeypatch.undo()
    work = work_dir_for(out)
    if killed == "writing layer 1":  # what a kill during write_safetensors leaves: a temporary name
        (work / ".layer-0001.safetensors.tmp-4242").write_bytes(b"\0" * 100)
        expected = 1
    else:  # layer-0000 renamed into place, hidden-0001 not yet: layer 0 must be redone
        (work / "hidden-0001.safetensors").unlink()
        expected = 0
    _, report = run_quantize(recipe(tiny_llama_dir, corpus, out, "gptq"), resume=True)
    assert report["resumed_layers"] == expected
    assert_same_checkpoint(reference, out)


def test_work_directory_is_refused_without_resume_and_discarded_with_force(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after(monkeypatch, 0)
    with pytest.raises(Crash):
        run_quantize(recipe(tiny_llama_dir, corpus, out))
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"unfinished run .* \(1 layer\(s\) done\); pass --resume .* or --force"):
        run_quantize(recipe(tiny_llama_dir, corpus, out))
    _, report = run_quantize(recipe(tiny_llama_dir, corpus, out), force=True)
    assert report["resumed_layers"] == 0 and not work_dir_for(out).exists()


def test_resume_refuses_a_work_directory_of_another_run(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after(monkeypatch, 0)
    with pytest.raises(Crash):
        run_quantize(recipe(tiny_llama_dir, corpus, out, bits=2))
    monkeypatch.undo()
    with pytest.raises(UserError, match=r"different run: recipe differs \(method.bits: 2 -> 3\)"):
        run_quantize(recipe(tiny_llama_dir, corpus, out, bits=3), resume=True)
    other = parse_recipe({**recipe(tiny_llama_dir, corpus, out).dump(), "calibration": {"dataset": str(corpus), "nsamples": 3, "seqlen": 32, "seed": 2}})
    with pytest.raises(UserError, match=r"calibration.seed: 1 -> 2.*calibration differs \(windows_sha256"):
        run_quantize(other, resume=True)
    # Another model with the same config at another path: both the path and the weights differ.
    moved = tmp_path / "other-model"
    tiny_model("llama", seed=3).save_pretrained(moved)
    byte_tokenizer().save_pretrained(moved)
    with pytest.raises(UserError, match=r"model differs \(.*weights_sample_sha256"):
        run_quantize(recipe(moved, corpus, out), resume=True)
    assert (work_dir_for(out) / "layer-0000.safetensors").is_file()  # refusing never deletes


def test_resume_without_a_work_directory_starts_from_layer_0(tiny_llama_dir, corpus, tmp_path):
    _, report = run_quantize(recipe(tiny_llama_dir, corpus, tmp_path / "out"), resume=True)
    assert report["resumed_layers"] == 0


def test_a_work_directory_is_used_by_one_process_at_a_time(tmp_path):
    fingerprint = {"version": 1, "sha256": "x", "components": {}}
    first = WorkDir.open_at(tmp_path / "out", fingerprint, {}, resume=False, force=False)
    try:
        with pytest.raises(UserError, match="in use by another llmquant process"):
            WorkDir.open_at(tmp_path / "out", fingerprint, {}, resume=True, force=False)
        with pytest.raises(UserError, match="in use by another llmquant process"):
            check_work_dir(tmp_path / "out", resume=False, force=True)
    finally:
        first.remove()


def test_damaged_work_files_are_one_clear_error(tiny_llama_dir, corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    crash_after(monkeypatch, 1)
    with pytest.raises(Crash):
        run_quantize(recipe(tiny_llama_dir, corpus, out))
    monkeypatch.undo()
    layer = work_dir_for(out) / "layer-0000.safetensors"
    layer.write_bytes(layer.read_bytes()[:-7])
    with pytest.raises(UserError, match=r"layer-0000.safetensors: unreadable .*pass --force to start over"):
        run_quantize(recipe(tiny_llama_dir, corpus, out), resume=True)


# --------------------------------------------------------------------------------------------------
# The command line: a killed process (os._exit and a real SIGKILL), then --resume


# The command line with the same thread configuration as this module's in-process runs, so that an
# uninterrupted in-process run is the reference for the killed-and-resumed CLI runs.
CLI = [sys.executable, "-c", "import torch; torch.set_num_threads(1); from llmquant.cli import main; main()"]
KILL_SWITCH = [sys.executable, str(Path(__file__).with_name("kill_switch.py"))]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300, env={**cli_env(), **(env or {})})


def cli_env() -> dict:
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def cli_recipe(tmp_path_factory, tiny_llama_dir, corpus) -> Path:
    path = tmp_path_factory.mktemp("cli-rel") / "recipe.yaml"
    path.write_text(
        f"model: {tiny_llama_dir}\n"
        f"calibration: {{dataset: {corpus}, nsamples: 3, seqlen: 32, seed: 1}}\n"
        "method: {name: slim, bits: 2, group_size: 16}\n"
        f"output: {path.parent / 'unused'}\n"
    )
    return path


@pytest.fixture(scope="module")
def cli_reference(cli_recipe, tmp_path_factory) -> Path:
    """An uninterrupted run of the same recipe, in this process."""
    from llmquant.recipe import load_recipe

    out = tmp_path_factory.mktemp("cli-ref") / "q"
    run_quantize(load_recipe(cli_recipe, {"output": str(out)}))
    return out


def test_killed_processes_resume_to_identical_bytes(cli_recipe, cli_reference, tmp_path):
    """Killed after layer 0 (os._exit, no cleanup), then a resume is SIGKILLed after the last layer
    (before the checkpoint is written), then a second resume only writes: same bytes as a run that
    was never interrupted."""
    out, work = tmp_path / "q", tmp_path / ".q.work"
    args = ("quantize", "-r", str(cli_recipe), "--output", str(out), "--quiet")
    killed = subprocess.run([*KILL_SWITCH, "exit", "0", *args], capture_output=True, text=True, timeout=300, env=cli_env())
    assert killed.returncode == 137
    assert not out.exists() and (work / "layer-0000.safetensors").is_file() and (work / "hidden-0001.safetensors").is_file()

    refused = cli(*args)
    assert refused.returncode == 2 and "pass --resume to continue it" in refused.stderr
    assert "Traceback" not in refused.stderr

    process = subprocess.Popen([*KILL_SWITCH, "pause", "1", *args, "--resume"], env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert any("paused after layer 1" in line for line in process.stderr)  # stops reading at the marker
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert not out.exists() and not list(tmp_path.glob(".q.partial-*"))
    assert sorted(p.name for p in work.iterdir()) == ["fingerprint.json", "layer-0000.safetensors", "layer-0001.safetensors", "lock"]

    resumed = cli(*args, "--resume", "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_layers"] == 2
    assert_same_checkpoint(cli_reference, out)
    assert not work.exists()


# --------------------------------------------------------------------------------------------------
# Determinism


@pytest.mark.parametrize("method", ["gptq", "slim", "billm"])
def test_the_same_recipe_twice_gives_identical_bytes(tiny_llama_dir, corpus, tmp_path, method):
    first, second = tmp_path / "a", tmp_path / "nested" / "b"  # different places, same bytes
    run_quantize(recipe(tiny_llama_dir, corpus, first, method))
    run_quantize(recipe(tiny_llama_dir, corpus, second, method))
    assert_same_checkpoint(first, second)


# --------------------------------------------------------------------------------------------------
# Numerics


def overflowing_model_dir(path: Path) -> Path:
    """Finite weights whose layer-0 MLP overflows float32: gate * up ~ 1e48."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].mlp.gate_proj.weight.mul_(1e25)
        model.model.layers[0].mlp.up_proj.weight.mul_(1e25)
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_a_hessian_with_inf_stops_naming_the_module_with_exit_3(tmp_path, corpus):
    model_dir = overflowing_model_dir(tmp_path / "model")
    out = tmp_path / "q"
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(
        f"model: {model_dir}\ncalibration: {{dataset: {corpus}, nsamples: 2, seqlen: 16}}\n"
        f"method: {{name: gptq, bits: 4, group_size: 32}}\noutput: {out}\n"
    )
    done = cli("quantize", "-r", str(recipe_file), "--quiet")
    assert done.returncode == 3, done.stderr
    assert "model.layers.0.mlp.down_proj: the Hessian contains NaN/Inf" in done.stderr
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "r.yaml"]  # no output, partial or work dir


def test_nan_in_the_input_model_is_a_user_error(tmp_path, corpus):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer().save_pretrained(tmp_path / "m")
    with pytest.raises(UserError, match=r"tensor model.layers.1.self_attn.o_proj.weight contains NaN/Inf"):
        run_quantize(recipe(tmp_path / "m", corpus, tmp_path / "q"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


class ToyLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(16, 16, bias=False)
        self.unused = nn.Linear(16, 16, bias=False)  # an expert no token is routed to

    def forward(self, hidden_states, **kwargs):
        return hidden_states + 0.1 * self.a(hidden_states)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(2, 16)
        self.layers = nn.ModuleList([ToyLayer(), ToyLayer()])
        with torch.no_grad():
            self.embed.weight[0] = 0.0  # token 0 -> zeros, token 1 -> ones: H of layer 0 is
            self.embed.weight[1] = 1.0  # exactly the all-ones matrix (singular, pivot exactly 0)

    def forward(self, input_ids, use_cache=False):
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden)
        return hidden


def toy_run(method: str, **fields):
    torch.manual_seed(0)
    model = Toy()
    resolved = ResolvedLayers("layers", model.layers, [[["a"], ["unused"]]] * 2, generic=True)
    cls = get_method_class(method)
    windows = torch.tensor([[0, 1] * 4, [1, 0] * 4])
    return model, SequentialRunner(model, resolved, cls(cls.Config(name=method, **fields)), torch.device("cpu")).run(windows)


def test_linears_without_calibration_tokens_fall_back_to_round_to_nearest(caplog):
    caplog.set_level(logging.WARNING)
    model, (records, reports) = toy_run("gptq", bits=3, group_size=8, percdamp=0.0)
    _, (rtn_records, _) = toy_run("rtn", bits=3, group_size=8)
    linears = {r.name: r for layer in reports for r in layer.linears}
    assert linears["layers.0.unused"].tokens == 0 and linears["layers.0.a"].tokens == 16
    assert "layers.0.unused: saw no calibration tokens" in caplog.text
    for layer in (0, 1):
        name = f"layers.{layer}.unused"
        assert torch.equal(records[name].dequantized, rtn_records[name].dequantized)  # GPTQ with H = I is RTN
    # Layer 0's `a` sees the all-ones Hessian: percdamp 0 cannot factor it, the damping escalates.
    assert linears["layers.0.a"].damping == pytest.approx(1e-4)
    assert "Hessian not positive definite; Cholesky needed damping 0.0001 (asked 0)" in caplog.text


def test_damping_escalates_until_cholesky_succeeds(caplog):
    caplog.set_level(logging.WARNING)
    hessian = torch.ones(8, 8)
    with record_damping() as seen:
        upper, used = inverse_cholesky_upper(hessian, percdamp=0.0, name="model.layers.4.mlp.up_proj")
    assert used == pytest.approx(1e-4) and torch.isfinite(upper).all()
    assert seen == [("model.layers.4.mlp.up_proj", 0.0, used)]
    assert "model.layers.4.mlp.up_proj: Hessian not positive definite" in caplog.text
    with pytest.raises(NumericalError, match="model.layers.4.mlp.up_proj: the Hessian contains NaN/Inf"):
        inverse_cholesky_upper(torch.full((4, 4), float("inf")), name="model.layers.4.mlp.up_proj")


def test_a_quantized_weight_with_inf_is_a_named_numerical_error():
    model = Toy()
    with torch.no_grad():
        model.layers[1].a.weight[0, 0] = 1e30  # far beyond float16: the fitted scale overflows
    resolved = ResolvedLayers("layers", model.layers, [[["a"]]] * 2, generic=True)
    cls = get_method_class("rtn")
    runner = SequentialRunner(model, resolved, cls(cls.Config(name="rtn", bits=4)), torch.device("cpu"))
    with pytest.raises(NumericalError, match=r"layers.1.a: the quantized weight contains NaN/Inf"):
        runner.run(torch.tensor([[0, 1] * 4]))


# --------------------------------------------------------------------------------------------------
# Atomic outputs


def test_leftovers_of_killed_runs_are_cleaned_and_never_look_finished(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.partial-{int(dead.stdout)}"
    (stale / "sub").mkdir(parents=True)
    with atomic_output_dir(tmp_path / "out") as partial:
        (partial / "config.json").write_text("{}")
        assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(RuntimeError):
        with atomic_output_dir(tmp_path / "again") as partial:
            (partial / "config.json").write_text("{}")
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
