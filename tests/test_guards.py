"""The last tracebacks and silent overrides (issue #19 items 3-5), each one line and its documented
exit code (docs/reliability.md): unwritable outputs found before any work, rich markup in
user-supplied text, numbers that are not numbers in eval, BiLLM beyond float16, calibration
sizes that were silently replaced, and --force that replaced what was not llmquant's.

Read-only places: this suite runs as root, which ignores permission bits (a chmod 0o500 directory
is writable to root). The tests use what stops root too: a path below a regular file, /proc, and an
immutable directory (`chattr +i`, where the filesystem supports it; skipped elsewhere).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from conftest import byte_tokenizer, tiny_config, tiny_model
from test_fuzz import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error_line(stderr: str) -> str:
    """The stderr of a failed run: exactly one `error:` line and no traceback; returns its message."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0].removeprefix("error: ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("guards") / "corpus.txt"
    path.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(300)))
    return path


def write_recipe(path: Path, model: Path, corpus: Path, output: Path, method: str = "{name: gptq, bits: 3, group_size: 32}", extra: str = "") -> Path:
    path.write_text(
        f"model: {model}\ncalibration: {{dataset: {corpus}, nsamples: 2, seqlen: 32}}\nmethod: {method}\noutput: {output}\n{extra}"
    )
    return path


@pytest.fixture()
def no_model_loads(monkeypatch):
    """Fails the test if a model starts loading (the checks under test must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr("llmquant.quantize.load_pretrained", refuse)
    monkeypatch.setattr("llmquant.data.calibration.build_calibration", refuse)


# --------------------------------------------------------------------------------------------------
# Output paths: checked before any work, one line, exit 2


def chattr(flag: str, path: Path) -> bool:
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_immutable_parent_directory_is_one_line_before_any_work(tmp_path, tiny_llama_dir, corpus, no_model_loads):
    frozen = tmp_path / "frozen"
    frozen.mkdir()
    if not chattr("+i", frozen):
        pytest.skip("chattr +i is not available on this filesystem")
    try:
        recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, frozen / "q")
        code, stderr = run_cli("quantize", "-r", str(recipe), "--quiet")
        assert code == 2
        assert one_error_line(stderr) == f"output {frozen / 'q'}: cannot write in {frozen} (Operation not permitted)"
        code, stderr = run_cli("calibrate", "--model", str(tiny_llama_dir), "--dataset", str(corpus), "--output", str(frozen / "c.safetensors"))
        assert code == 2 and "cannot write in" in one_error_line(stderr)
    finally:
        chattr("-i", frozen)
    assert list(frozen.iterdir()) == []


@pytest.mark.parametrize("where", ["below-a-file", "proc"])
def test_unwritable_output_paths_are_one_line_before_any_work(tmp_path, tiny_llama_dir, corpus, no_model_loads, where):
    if where == "below-a-file":
        (tmp_path / "a-file").write_text("x")
        output, expected = tmp_path / "a-file" / "q", f"{tmp_path / 'a-file'} is a file, not a directory"
    else:
        if not Path("/proc/self").exists():
            pytest.skip("no /proc")
        output, expected = Path("/proc/llmquant-test-output"), "cannot write in /proc"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, output)
    code, stderr = run_cli("quantize", "-r", str(recipe), "--quiet")
    assert code == 2 and expected in one_error_line(stderr)
    code, stderr = run_cli("pack", "--model", str(tiny_llama_dir), "--output", str(output), "--format", "fake")
    assert code == 2 and expected in one_error_line(stderr)


def test_an_error_while_writing_is_one_line(tmp_path, tiny_llama_dir, corpus, monkeypatch):
    """What the machine refuses mid-write (a disk full, a permission) is the user's to fix: one line, exit 2."""

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "q" / "model.safetensors"))

    monkeypatch.setattr("llmquant.quantize.write_checkpoint", disk_full)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, tmp_path / "q", method="{name: rtn, bits: 4, group_size: 32}")
    code, stderr = run_cli("quantize", "-r", str(recipe), "--quiet")
    assert code == 2
    assert one_error_line(stderr) == f"{tmp_path / 'q' / 'model.safetensors'}: No space left on device"
    # No output and no partial directory; the finished layers are kept for --resume.
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.work", "r.yaml"]


@pytest.mark.parametrize(
    "failure",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.11 GiB total capacity)"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried to allocate 4294967296 bytes."),
        MemoryError(),
    ],
)
def test_out_of_memory_is_one_line_with_what_to_do(tmp_path, tiny_llama_dir, corpus, monkeypatch, failure):
    def exhausted(*args, **kwargs):
        raise failure

    monkeypatch.setattr("llmquant.quantize.run_quantize", exhausted)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, tmp_path / "q", method="{name: rtn, bits: 4, group_size: 32}")
    code, stderr = run_cli("quantize", "-r", str(recipe), "--quiet")
    line = one_error_line(stderr)
    assert code == 2 and line.startswith("out of memory") and "--streaming on" in line


def test_other_runtime_errors_stay_bugs(tmp_path, tiny_llama_dir, corpus, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr("llmquant.quantize.run_quantize", broken)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, tmp_path / "q", method="{name: rtn, bits: 4, group_size: 32}")
    with pytest.raises(RuntimeError, match="shapes"):
        run_cli("quantize", "-r", str(recipe), "--quiet")


# --------------------------------------------------------------------------------------------------
# Rich markup in what the user wrote


def test_markup_in_user_input_is_printed_literally(tmp_path, tiny_llama_dir, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, tmp_path / "q", extra='"[/bold]": 1\n')
    code, stderr = run_cli("validate", "-r", str(recipe))
    assert code == 2 and one_error_line(stderr) == f'{recipe}: "[/bold]": unknown key'
    code, stderr = run_cli("eval", "--model", str(tmp_path / "no[/]where"))
    assert code == 2 and one_error_line(stderr) == f"model directory not found: {tmp_path / 'no[/]where'}"
    # relative, missing, and no hub id either: said as a missing path (not as huggingface_hub's id rules)
    code, stderr = run_cli("eval", "--model", "no[/]such")
    assert code == 2 and one_error_line(stderr) == "model not found: no[/]such is no file or directory here, nor a Hugging Face hub id (owner/name)"
    code, stderr = run_cli("eval", "--model", "./x", "--device", "[red]cuda")
    assert code == 2 and "[red]cuda" in one_error_line(stderr)


def test_progress_labels_with_markup_do_not_crash_the_bar():
    from llmquant.ui import _EscapedProgress

    with _EscapedProgress(disable=True) as bar:
        bar.add_task("eval data[/]set.txt", total=2)


def test_plain_progress_prints_a_line_every_few_percent_and_at_the_end():
    import io

    from llmquant.ui import PlainProgress

    out = io.StringIO()
    with PlainProgress(stream=out, step=0.25, interval=1e9) as bar:
        task = bar.add_task("eval wiki[/]", total=8)
        for done in range(1, 9):
            bar.update(task, completed=done)
    lines = out.getvalue().splitlines()
    assert [line.split(":")[1].split()[0] for line in lines] == ["1/8", "3/8", "5/8", "7/8", "8/8"]
    assert lines[-1].startswith("eval wiki[/]: 8/8 (100%), 0:00:0")


# --------------------------------------------------------------------------------------------------
# eval: numbers that are not numbers, a vocabulary smaller than the tokenizer's


def save(model, path: Path) -> Path:
    model.save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


def test_eval_of_a_loss_beyond_a_float_is_exit_3(tmp_path, corpus):
    config = tiny_config("llama")
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3e4)  # logits ~ 1e4: mean NLL in the thousands, e^NLL overflows
    save(model, tmp_path / "m")
    code, stderr = run_cli("eval", "--model", str(tmp_path / "m"), "--ppl", str(corpus), "--seqlen", "64", "--max-windows", "2", "--quiet")
    assert code == 3
    message = one_error_line(stderr)
    assert message.startswith("the mean NLL is ") and "its perplexity e^" in message and "not a finite number" in message


def test_eval_of_a_model_with_a_nan_weight_names_the_tensor(tmp_path, corpus):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[3, 5] = float("nan")
    save(model, tmp_path / "m")
    code, stderr = run_cli("eval", "--model", str(tmp_path / "m"), "--ppl", str(corpus), "--seqlen", "64", "--max-windows", "2", "--quiet")
    assert code == 2
    assert one_error_line(stderr) == f"model {tmp_path / 'm'}: tensor model.layers.1.self_attn.o_proj.weight contains NaN/Inf"


def test_eval_of_a_vocabulary_smaller_than_the_tokenizers_is_exit_2(tmp_path, corpus):
    config = tiny_config("llama")
    config.vocab_size = 100
    import transformers

    save(transformers.AutoModelForCausalLM.from_config(config).eval(), tmp_path / "m")
    code, stderr = run_cli("eval", "--model", str(tmp_path / "m"), "--ppl", str(corpus), "--seqlen", "64", "--quiet")
    assert code == 2
    message = one_error_line(stderr)
    assert "but the model's vocabulary has 100 entries (tokenizer and model do not match)" in message


def test_eval_of_a_damaged_embedding_names_the_tensor(tmp_path, tiny_llama_dir, corpus):
    from llmquant.safetensors_io import read_header

    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, tmp_path / "q", method="{name: rtn, bits: 4, group_size: 32}")
    assert run_cli("quantize", "-r", str(recipe), "--quiet")[0] == 0
    path = tmp_path / "q" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[read_header(path).entries["model.embed_tokens.weight"].begin + 1] ^= 0x40  # an exponent bit
    path.write_bytes(bytes(data))
    code, stderr = run_cli("eval", "--model", str(tmp_path / "q"), "--ppl", str(corpus), "--seqlen", "64", "--quiet")
    assert code == 2
    assert one_error_line(stderr) == f"{path}: tensor model.embed_tokens.weight: checksum mismatch (its bytes changed after it was written: a damaged file)"


# --------------------------------------------------------------------------------------------------
# quantize: BiLLM beyond float16, calibration sizes


def test_billm_on_a_weight_beyond_float16_is_a_named_exit_3_like_gptq(tmp_path, corpus):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] = 1e7  # its group scale or alpha exceeds float16 (65504)
    save(model, tmp_path / "m")
    for method in ("{name: billm, blocksize: 32}", "{name: gptq, bits: 3, group_size: 32}"):
        recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "m", corpus, tmp_path / "q", method=method)
        code, stderr = run_cli("quantize", "-r", str(recipe), "--quiet")
        assert code == 3, stderr
        assert one_error_line(stderr).startswith("model.layers.0.self_attn.q_proj: the quantized weight contains NaN/Inf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "r.yaml"]


@pytest.mark.parametrize(("flag", "message"), [("--nsamples", "nsamples"), ("--seqlen", "seqlen")])
def test_calibrate_refuses_zero_instead_of_using_the_default(tmp_path, tiny_llama_dir, corpus, flag, message):
    out = tmp_path / "c.safetensors"
    code, stderr = run_cli("calibrate", "--model", str(tiny_llama_dir), "--dataset", str(corpus), "--nsamples", "2", "--seqlen", "32", flag, "0", "--output", str(out))
    assert code == 2 and one_error_line(stderr) == f"calibrate: {flag}: Input should be greater than {0 if flag == '--nsamples' else 'or equal to 8'}"
    assert not out.exists()


def test_a_calibration_file_never_silently_overrides_the_recipe(tmp_path, tiny_llama_dir, corpus):
    from llmquant.quantize import run_quantize
    from llmquant.recipe import load_recipe

    calib = tmp_path / "c.safetensors"
    assert run_cli("calibrate", "--model", str(tiny_llama_dir), "--dataset", str(corpus), "--nsamples", "2", "--seqlen", "32", "--output", str(calib))[0] == 0
    asked = tmp_path / "asked.yaml"
    asked.write_text(f"model: {tiny_llama_dir}\ncalibration: {{dataset: {calib}, nsamples: 8, seqlen: 32}}\nmethod: {{name: gptq, bits: 3, group_size: 32}}\noutput: {tmp_path / 'q'}\n")
    code, stderr = run_cli("quantize", "-r", str(asked), "--quiet")
    assert code == 2
    assert one_error_line(stderr) == (
        f"calibration.nsamples: 8, but {calib} holds 2 x 32 windows (nsamples x seqlen); set calibration.nsamples to 2 or leave it out"
    )
    code, stderr = run_cli("quantize", "-r", str(asked), "--quiet", "--protocol", "p1")  # p1 asks 32 x 512
    assert code == 2 and "calibration.nsamples: 32, but" in one_error_line(stderr)
    # Not asked: the file's windows are used, and the recipe recorded with the checkpoint says so.
    unasked = tmp_path / "unasked.yaml"
    unasked.write_text(f"model: {tiny_llama_dir}\ncalibration: {{dataset: {calib}}}\nmethod: {{name: gptq, bits: 3, group_size: 32}}\noutput: {tmp_path / 'q'}\n")
    _, report = run_quantize(load_recipe(unasked))
    assert report["recipe"]["calibration"] | {"dataset": None} == {"dataset": None, "nsamples": 2, "seqlen": 32, "seed": 0, "bos": "auto"}
    assert report["calibration"]["nsamples"] == 2


# --------------------------------------------------------------------------------------------------
# --force replaces only llmquant's own outputs, never an input


def test_force_never_replaces_a_directory_holding_other_files(tmp_path, tiny_llama_dir, corpus, no_model_loads):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("my notes")
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, precious)
    code, stderr = run_cli("quantize", "-r", str(recipe), "--force", "--quiet")
    assert code == 2
    assert one_error_line(stderr) == (
        f"output {precious} exists and --force replaces only llmquant's own outputs: it has no valid "
        "llmquant-manifest.json, so llmquant did not write it (or an older llmquant did)"
    )
    assert (precious / "notes.txt").read_text() == "my notes"


def test_force_never_replaces_the_input_model(tmp_path, corpus, no_model_loads):
    model = save(tiny_model("llama"), tmp_path / "m")
    before = sorted(p.name for p in model.iterdir())
    recipe = write_recipe(tmp_path / "r.yaml", model, corpus, tmp_path / "unused")
    code, stderr = run_cli("quantize", "-r", str(recipe), "--model", str(model), "--output", str(model), "--force", "--quiet")
    assert code == 2 and one_error_line(stderr) == f"output {model} is an input of this run ({model}); choose another output"
    code, stderr = run_cli("quantize", "-r", str(recipe), "--output", str(tmp_path), "--force", "--quiet")
    assert code == 2 and "holds an input of this run" in one_error_line(stderr)
    assert sorted(p.name for p in model.iterdir()) == before


def test_force_replaces_llmquants_own_output(tmp_path, tiny_llama_dir, corpus):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_llama_dir, corpus, tmp_path / "q", method="{name: rtn, bits: 4, group_size: 32}")
    assert run_cli("quantize", "-r", str(recipe), "--quiet")[0] == 0
    manifest = json.loads((tmp_path / "q" / "llmquant-manifest.json").read_text())
    assert "model.safetensors" in manifest["files"] and "config.json" in manifest["files"]
    code, stderr = run_cli("quantize", "-r", str(recipe), "--quiet", "--force", "--set", "method.bits=3")
    assert code == 0, stderr
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["bits"]["code"] == 3
    # A calibration file: --force replaces llmquant's own, never another file.
    other = tmp_path / "weights.safetensors"
    shutil.copy(tiny_llama_dir / "model.safetensors", other)
    code, stderr = run_cli("calibrate", "--model", str(tiny_llama_dir), "--dataset", str(corpus), "--nsamples", "2", "--seqlen", "32", "--output", str(other), "--force")
    assert code == 2 and "its header has no llmquant metadata" in one_error_line(stderr)
    assert other.read_bytes() == (tiny_llama_dir / "model.safetensors").read_bytes()
