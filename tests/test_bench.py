"""`llmquant bench` and `eval --kl`: report fields and their consistency, the KL math, CLI errors.

No timing assertions: timings depend on the machine. Tiny models, short prompts, few repetitions.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from typer.testing import CliRunner

from conftest import byte_tokenizer, gptq3_records, tiny_model
from llmquant.cli import app
from llmquant.errors import UserError
from llmquant.bench import BenchSettings, _Slot, format_report, paired_ratios, run_bench
from llmquant.evaluate import Reference, kl_divergence, perplexity, reference_key
from llmquant.formats import save_packed
from llmquant.runtime import load_quantized
from llmquant.runtime.loader import load_model

SMALL = BenchSettings(prompt_tokens=24, new_tokens=4, decode_prompt_tokens=8, warmup=1, repeats=3)


@pytest.fixture(scope="module")
def packed_dir(tmp_path_factory) -> Path:
    """The conftest tiny LLaMA (same seed as tiny_llama_dir), every decoder linear GPTQ 3-bit, packed."""
    model = tiny_model("llama")
    records = gptq3_records(model)
    directory = tmp_path_factory.mktemp("packed")
    save_packed(model, records, directory, {"method": "gptq"})
    byte_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def report(packed_dir, tiny_llama_dir) -> dict:
    return run_bench([str(packed_dir)], str(tiny_llama_dir), dataclasses.replace(SMALL, backend="torch-cached"), "cpu")


def test_bench_report_fields_and_ratios(report, packed_dir, tiny_llama_dir):
    base, (model,) = report["baseline"], report["models"]
    assert report["device"] == "cpu" and report["threads"] >= 1 and report["settings"]["repeats"] == 3
    for record, folder in ((base, tiny_llama_dir), (model, packed_dir)):
        files = sorted(folder.glob("*.safetensors"))
        assert record["bytes_on_disk"] == sum(f.stat().st_size for f in files) > 0
        assert record["files"] == [f.name for f in files]
        assert record["load_seconds"] > 0
        for phase, tokens in (("prefill", 24), ("decode", 4)):
            timing = record[phase]
            repetitions = 4 if record is base else 3  # the baseline also closes the last round
            assert timing["tokens"] == tokens and len(timing["seconds"]["runs"]) == repetitions
            for summary in (timing["seconds"], timing["tokens_per_second"]):
                assert summary["min"] <= summary["median"] <= summary["max"]
            assert sorted(timing["tokens_per_second"]["runs"]) == pytest.approx(sorted(tokens / s for s in timing["seconds"]["runs"]))
        memory = record["memory"]
        assert memory["peak_rss_bytes"] >= memory["rss_before_load_bytes"] > 0
        assert memory["peak_rss_delta_bytes"] == memory["peak_rss_bytes"] - memory["rss_before_load_bytes"]
        assert memory["tensor_bytes"] > 0
    assert model["decode"]["prompt_tokens"] == 8

    # The packed model is the same architecture: same parameter count, fewer bytes, real bit figures.
    assert model["parameters"] == base["parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())
    assert model["packed_linears"] == 14 and model["backend"] == "torch-cached" and base["backend"] is None
    assert model["bits_source"] == "quantization_config" and model["bits"]["code"] == 3 and model["method"] == "gptq"
    assert base["bits"] == {"paper": 32, "code": 32, "storage": 32}
    assert model["memory"]["tensor_bytes"] < base["memory"]["tensor_bytes"]
    assert model["memory"]["decoded_cache_bytes"] > 0 and base["memory"]["decoded_cache_bytes"] == 0

    ratios = model["ratios"]
    assert ratios["bytes_on_disk"] == model["bytes_on_disk"] / base["bytes_on_disk"] < 1
    assert ratios["parameters"] == 1
    for name, get in (
        ("load_seconds", lambda r: r["load_seconds"]),
        ("tensor_bytes", lambda r: r["memory"]["tensor_bytes"]),
    ):
        assert ratios[name] == pytest.approx(get(model) / get(base))
    # Speed ratios: the median of the per-repetition ratios paired with the baseline at that moment.
    paired = model["paired_speed_ratios"]
    assert len(paired["decode"]) == len(paired["prefill"]) == 3 and min(paired["decode"]) > 0
    assert ratios["decode_tokens_per_second"] == statistics.median(paired["decode"])
    assert ratios["prefill_tokens_per_second"] == statistics.median(paired["prefill"])
    assert model["resident_during_rounds"] and base["resident_during_rounds"]
    json.dumps(report)  # serializable as is

    text = "\n".join(format_report(report))
    assert "torch-cached" in text and "decode tok/s" in text and packed_dir.name in text


def _slot(stamps, prefill, decode, prompt_tokens=10):
    return _Slot("x", {}, torch.zeros(1, prompt_tokens), torch.zeros(1, 2), 0, None, prefill, decode, stamps)


def test_paired_ratios_cancel_drift():
    # The machine speeds up steadily: the baseline takes 1.0 s, 0.8 s, 0.6 s, 0.4 s at t = 0, 10, 20, 30.
    # The model, measured between them, is exactly as fast as the baseline at each moment: ratio 1 each
    # time, although its own median (0.7 s) and the baseline's (0.7 s) come from different moments.
    baseline = _slot([0, 10, 20, 30], [1.0, 0.8, 0.6, 0.4], [2.0, 1.6, 1.2, 0.8])
    model = _slot([5, 15, 25], [0.9, 0.7, 0.5], [0.9, 0.7, 0.5])
    paired = paired_ratios(model, baseline)
    assert paired["prefill"] == pytest.approx([1.0, 1.0, 1.0])
    assert paired["decode"] == pytest.approx([2.0, 2.0, 2.0])  # twice as fast as the baseline's decode
    # Outside the bracket (no closing repetition): the nearest baseline repetition.
    assert paired_ratios(_slot([40], [0.2], [0.2]), baseline)["prefill"] == pytest.approx([2.0])


def test_bench_reloads_models_when_memory_is_short(packed_dir, tiny_llama_dir, monkeypatch):
    monkeypatch.setattr("llmquant.bench._free_memory", lambda device: 0)
    settings = BenchSettings(prompt_tokens=16, new_tokens=2, decode_prompt_tokens=4, warmup=1, repeats=2)
    report = run_bench([str(packed_dir)], str(tiny_llama_dir), settings, "cpu")
    (model,) = report["models"]
    assert not model["resident_during_rounds"] and not report["baseline"]["resident_during_rounds"]
    assert len(model["decode"]["seconds"]["runs"]) == 2 and len(report["baseline"]["decode"]["seconds"]["runs"]) == 3
    assert model["ratios"]["decode_tokens_per_second"] > 0


def test_bench_without_baseline_and_per_forward_backend(packed_dir):
    settings = BenchSettings(prompt_tokens=16, new_tokens=2, decode_prompt_tokens=4, warmup=0, repeats=1, backend="torch")
    report = run_bench([str(packed_dir)], None, settings, "cpu")
    (model,) = report["models"]
    assert report["baseline"] is None and model["ratios"] is None
    assert model["backend"] == "torch" and model["memory"]["decoded_cache_bytes"] == 0


def test_the_default_on_a_cpu_keeps_packed_models_packed(packed_dir):
    """backend auto on a CPU: the C kernels (packed memory: only their small index tables beside
    the stored tensors, no decoded weights)."""
    settings = BenchSettings(prompt_tokens=16, new_tokens=2, decode_prompt_tokens=4, warmup=0, repeats=1, static_cache=True)
    report = run_bench([str(packed_dir)], None, settings, "cpu")
    (model,) = report["models"]
    assert report["settings"]["backend"] == "cpu" and model["backend"] == "cpu"
    assert model["memory"]["decoded_cache_bytes"] < model["memory"]["tensor_bytes"] / 100 and model["decode"]["tokens"] == 2


def test_static_decode_generates_what_generate_does():
    from llmquant.bench import static_decode

    model = tiny_model("llama", seed=3)
    prompt = torch.randint(0, 250, (1, 9), generator=torch.Generator().manual_seed(0))
    _, ids = static_decode(model, prompt, 12, torch.device("cpu"), graphs=False)
    expected = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=13, min_new_tokens=13, do_sample=False, pad_token_id=0
    )
    assert torch.equal(ids, expected[:, 9:])


def test_kl_math_against_a_hand_computed_case():
    # Position 0: P = (1/2, 1/4, 1/4), Q = (1/4, 1/2, 1/4): KL = 1/2 ln 2 - 1/4 ln 2 = ln2 / 4; argmaxes differ.
    # Position 1: identical distributions (shifted logits): KL = 0; argmaxes agree.
    ref = torch.tensor([[0.5, 0.25, 0.25], [0.1, 0.7, 0.2]]).log()
    other = torch.tensor([[0.25, 0.5, 0.25], [0.1, 0.7, 0.2]]).log() + 3.0
    kl, agree = kl_divergence(ref, other)
    assert kl.dtype == torch.float64
    assert kl[0].item() == pytest.approx(math.log(2) / 4, abs=1e-6) and kl[1].item() == pytest.approx(0, abs=1e-6)
    assert agree.tolist() == [False, True]
    # A token the reference rules out contributes nothing, even where the other model rules it out too.
    kl, _ = kl_divergence(torch.tensor([[0.0, -math.inf]]), torch.tensor([[0.0, -math.inf]]))
    assert kl.item() == 0
    # Chunking does not change the numbers.
    a, b = torch.randn(50, 17), torch.randn(50, 17)
    assert torch.allclose(kl_divergence(a, b, chunk=7)[0], kl_divergence(a, b)[0])


def test_kl_in_the_ppl_pass(packed_dir, tiny_llama_dir, tmp_path):
    ids = torch.randint(0, 250, (400,), generator=torch.Generator().manual_seed(1))
    fp, _, fp_source = load_model(str(tiny_llama_dir), "float32", "cpu")
    same, _, _ = load_model(str(tiny_llama_dir), "float32", "cpu")
    packed = load_quantized(packed_dir)

    plain = perplexity(packed, ids, seqlen=64)
    assert plain.divergence is None
    result = perplexity(packed, ids, seqlen=64, reference=Reference(fp))
    div = result.divergence
    assert result.ppl == plain.ppl  # the same number with or without --kl
    assert div.positions == 6 * 63 and len(div.window_kl) == 6
    assert div.kl > 0 and 0 <= div.top1 <= 1 and div.kl_median <= div.kl_p99 <= div.kl_max
    assert div.kl == pytest.approx(sum(div.window_kl) / 6)
    assert div.reference_ppl == pytest.approx(perplexity(fp, ids, seqlen=64).ppl, rel=1e-12)

    # The reference against itself: KL 0 and full agreement.
    self_div = perplexity(fp, ids, seqlen=64, reference=Reference(same)).divergence
    assert self_div.kl == 0 and self_div.kl_max == 0 and self_div.top1 == 1

    # The cache: built once, then used, with the same numbers; a damaged file is rebuilt.
    key = reference_key(fp_source, ids, 64, 6, fp, "cpu")
    built = perplexity(packed, ids, seqlen=64, reference=Reference(fp, tmp_path, key)).divergence
    (cache,) = tmp_path.glob("reference-*.safetensors")
    used = perplexity(packed, ids, seqlen=64, reference=Reference(fp, tmp_path, key)).divergence
    assert (built.reference_cache, used.reference_cache) == ("built", "used")
    # The cached run takes the statistics path (the packed model keeps the fp output layer): the same
    # numbers up to float32 rounding (about 1e-5 nats per position at most, far less on average).
    assert (built.computed_from, used.computed_from) == ("logits", "statistics")
    assert built.kl == div.kl and used.top1 == div.top1
    assert used.kl == pytest.approx(div.kl, abs=1e-7) and used.kl_max == pytest.approx(div.kl_max, abs=1e-5)
    assert used.reference_ppl == pytest.approx(div.reference_ppl, rel=1e-6)  # float64 vs float32 NLLs
    assert max(abs(a - b) for a, b in zip(used.window_kl, div.window_kl)) < 1e-6
    cache.write_bytes(b"not a safetensors file")
    assert perplexity(packed, ids, seqlen=64, reference=Reference(fp, tmp_path, key)).divergence.reference_cache == "built"
    other_key = reference_key(fp_source, ids, 64, 5, fp, "cpu")
    assert perplexity(packed, ids, seqlen=64, max_windows=5, reference=Reference(fp, tmp_path, other_key)).divergence.reference_cache == "built"
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 2


def test_kl_from_cached_statistics_matches_the_full_computation(tiny_llama_dir, tmp_path):
    """A clearly different model with the reference's output layer takes the statistics path; one whose
    output layer differs falls back to the cached head inputs; both match the uncached computation."""
    ids = torch.randint(0, 250, (400,), generator=torch.Generator().manual_seed(3))
    fp, _, fp_source = load_model(str(tiny_llama_dir), "float32", "cpu")
    noisy, _, _ = load_model(str(tiny_llama_dir), "float32", "cpu")
    other_head, _, _ = load_model(str(tiny_llama_dir), "float32", "cpu")
    g = torch.Generator().manual_seed(4)
    for name, module in noisy.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            module.weight.data += 2.0 * module.weight.std() * torch.randn(module.weight.shape, generator=g)
    other_head.get_output_embeddings().weight.data.mul_(1.5)  # tied: the embeddings change too
    key = reference_key(fp_source, ids, 64, 6, fp, "cpu")

    # Evaluating the reference itself with save_as_reference writes the cache; its PPL is unchanged.
    saved = perplexity(fp, ids, seqlen=64, save_as_reference=Reference(fp, tmp_path, key))
    assert saved.ppl == perplexity(fp, ids, seqlen=64).ppl and saved.divergence is None
    assert len(list(tmp_path.glob("reference-*.safetensors"))) == 1

    for model, path in ((noisy, "statistics"), (other_head, "logits")):
        full = perplexity(model, ids, seqlen=64, reference=Reference(fp)).divergence
        cached = perplexity(model, ids, seqlen=64, reference=Reference(fp, tmp_path, key)).divergence
        assert (cached.reference_cache, cached.computed_from, full.computed_from) == ("used", path, "logits")
        assert full.kl > 1e-3
        assert cached.kl == pytest.approx(full.kl, rel=1e-5) and cached.top1 == full.top1
        assert cached.kl_median == pytest.approx(full.kl_median, rel=1e-4, abs=1e-6)
        assert cached.reference_ppl == pytest.approx(full.reference_ppl, rel=1e-6)


def test_no_reference_cache_when_the_logits_are_post_processed(tmp_path):
    model = tiny_model("gemma3")
    model.config.final_logit_softcapping = 5.0  # logits = 5 tanh(head / 5): not the output layer's output
    ids = torch.randint(0, 250, (100,), generator=torch.Generator().manual_seed(2))
    div = perplexity(model, ids, seqlen=32, reference=Reference(model, tmp_path, {"test": 1})).divergence
    assert div.reference_cache is None and div.kl == 0 and div.top1 == 1
    assert not list(tmp_path.iterdir())


def invoke(*args: str):
    """The CLI in this process (fast: nothing to import again); exit-code mapping is tested separately."""
    return CliRunner().invoke(app, list(args))


def test_eval_kl_and_bench_cli(packed_dir, tiny_llama_dir, tmp_path, monkeypatch):
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(60)))
    done = invoke(
        "eval", "--model", str(packed_dir), "--ppl", str(text), "--seqlen", "128", "--kl",
        "--reference", str(tiny_llama_dir), "--json", "--quiet",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    (result,) = json.loads(done.stdout)["results"]
    assert result["kl"] > 0 and 0 <= result["top1_agreement"] <= 1 and result["reference"] == str(tiny_llama_dir)
    assert result["kl_positions"] == result["windows"] * 127 and result["reference_ppl"] > 1

    # The reference evaluated on its own stores its cache; a --kl run then uses it (statistics path).
    cache = tmp_path / "kl-cache"
    done = invoke(
        "eval", "--model", str(tiny_llama_dir), "--ppl", str(text), "--seqlen", "128",
        "--reference-cache", str(cache), "--json", "--quiet",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    (saved,) = json.loads(done.stdout)["results"]
    assert saved["saved_reference_cache"] and Path(saved["saved_reference_cache"]).parent == cache
    assert saved["ppl"] == pytest.approx(result["reference_ppl"], rel=1e-6)
    import llmquant.runtime.loader as loading

    loaded_models = []
    real_load_model = loading.load_model
    monkeypatch.setattr(loading, "load_model", lambda spec, *a, **k: loaded_models.append(spec) or real_load_model(spec, *a, **k))
    done = invoke(
        "eval", "--model", str(packed_dir), "--ppl", str(text), "--seqlen", "128", "--kl",
        "--reference", str(tiny_llama_dir), "--reference-cache", str(cache), "--json", "--quiet",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert loaded_models == [str(packed_dir)]  # the statistics answer alone: the reference is never loaded
    monkeypatch.undo()
    (used,) = json.loads(done.stdout)["results"]
    assert (used["reference_cache"], used["kl_computed_from"]) == ("used", "statistics")
    assert used["kl"] == pytest.approx(result["kl"], abs=1e-7) and used["ppl"] == result["ppl"]

    done = invoke(
        "eval", "--model", str(packed_dir), "--ppl", str(text), "--seqlen", "128", "--kl",
        "--reference", str(tiny_llama_dir), "--quiet",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "KL" in done.stdout and "top-1 agreement" in done.stdout

    done = invoke(
        "bench", "--model", str(packed_dir), "--baseline", str(tiny_llama_dir), "--prompt-tokens", "16",
        "--new-tokens", "2", "--warmup", "0", "--repeats", "1", "--device", "cpu", "--quiet",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "decode tok/s" in done.stdout and "ratio" in done.stdout and "backend cpu (packed memory" in done.stdout


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["eval", "--model", "{fp}", "--kl"], "--kl needs --reference"),
        (["eval", "--model", "{fp}", "--reference", "{fp}"], "only applies with --kl"),
        (["bench", "--model", "./nowhere"], "model directory not found: ./nowhere"),
        (["bench", "--model", "{fp}", "--baseline", "./nowhere"], "model directory not found: ./nowhere"),
        (["bench", "--model", "{fp}", "--repeats", "0"], "--repeats"),
        (["bench", "--model", "{fp}", "--device", "gpu"], "--device"),
    ],
)
def test_bad_input_is_a_user_error(args, fragment, tiny_llama_dir):
    done = invoke(*[a.replace("{fp}", str(tiny_llama_dir)) for a in args])
    assert isinstance(done.exception, UserError) and fragment in str(done.exception)
    assert done.stdout == ""


def test_missing_reference_exits_2_with_one_line(tiny_llama_dir):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    args = ["eval", "--model", str(tiny_llama_dir), "--kl", "--reference", "./nowhere"]
    done = subprocess.run([sys.executable, "-m", "llmquant.cli", *args], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == ["error: model directory not found: ./nowhere"]


def _run_all_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_all", Path(__file__).resolve().parents[1] / "benchmarks" / "run_all.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_table_is_regenerated_and_hand_notes_are_kept(tmp_path):
    run_all = _run_all_module()
    row = {
        "label": "gptq-w3g128", "method": "gptq", "calibration": {"dataset": "c4"}, "overrides": [],
        "ppl": 40.0, "kl": 0.25, "top1_agreement": 0.8, "bits": {"paper": 3.0, "code": 3.0, "storage": 3.161},
        "checkpoint_bytes": 2**20, "quantize_seconds": 12.0, "peak_rss_bytes": 2**30,
    }
    baseline = {"ppl": 30.0, "fp16_bytes": 4 * 2**20}
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    run_all.write_results([row], baseline, md, js)
    assert "| gptq-w3g128 | gptq | c4 | 40.00 | +10.00 | 0.2500 | 80.0% | — | 3.000 | 3.000 | 3.161 | 1.0 | 0.25× | 12 | 1.00 | — |" in md.read_text()
    md.write_text(md.read_text() + run_all.NOTES_MARKER + "\nwhat surprised us\n")
    run_all.write_results([{**row, "ppl": 50.0}], baseline, md, js)
    text = md.read_text()
    assert "| 50.00 | +20.00 |" in text and "| 40.00 |" not in text
    assert text.count(run_all.NOTES_MARKER) == 1 and text.endswith("what surprised us\n")
    assert json.loads(js.read_text())["runs"][0]["ppl"] == 50.0


def test_the_zero_shot_column_is_the_mean_acc_over_the_tasks(tmp_path):
    run_all = _run_all_module()

    def entry(task, acc):
        scores = {"acc": {"value": acc, "stderr": 0.05}, "perplexity": {"value": 12.0, "stderr": 1.0}}
        return {"task": task, "scores": scores, "items": 100, "split": "test", "data_sha256": ["ab"], "seconds": 1.0,
                "limit": 100, "num_fewshot": 0}

    fp = run_all.zero_shot([entry("piqa", 0.6), entry("lambada_openai", 0.3)])
    quantized = run_all.zero_shot([entry("piqa", 0.5), entry("lambada_openai", 0.2)])
    assert fp["mean_acc"] == pytest.approx(0.45) and set(fp["tasks"]) == {"piqa", "lambada_openai"}
    assert run_all.zero_shot(None) is None and run_all.zero_shot([]) is None
    row = {
        "label": "rtn-w4g128", "method": "rtn", "calibration": {"dataset": None}, "overrides": [], "ppl": 31.0,
        "bits": {"paper": 4.0, "code": 4.0, "storage": 4.2}, "checkpoint_bytes": 2**20, "quantize_seconds": 3.0,
        "peak_rss_bytes": 2**30, "zero_shot": quantized,
    }
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    run_all.write_results([row], {"ppl": 30.0, "fp16_bytes": 4 * 2**20, "eval": {"zero_shot": fp}}, md, js)
    text = md.read_text()
    assert "| full precision | — | — | 30.00 | — | 0 | 100% | 45.0% |" in text and "| 35.0% | 4.000 |" in text
    assert "mean lm-evaluation-harness `acc` over piqa, lambada_openai (the first 100 documents of each, 0-shot" in text
    assert json.loads(js.read_text())["runs"][0]["zero_shot"]["tasks"]["piqa"]["acc"] == 0.5


def test_a_second_models_table_is_a_section_of_its_own(tmp_path):
    """run_all --model gemma3-270m writes its table between markers; either model's regeneration
    leaves the other's table and the hand-written notes byte for byte."""
    run_all = _run_all_module()
    row = {
        "label": "rtn-w4g128", "method": "rtn", "calibration": {"dataset": None}, "overrides": [],
        "ppl": 31.0, "bits": {"paper": 4.0, "code": 4.0, "storage": 4.2}, "checkpoint_bytes": 2**20,
        "quantize_seconds": 3.0, "peak_rss_bytes": 2**30,
    }
    fp_eval = {"windows": 16, "seqlen": 512, "bos_per_window": True, "window_layout": "BOS + 511 text tokens per window"}
    md, js = tmp_path / "results.md", tmp_path / "results.json"
    run_all.write_results([row], {"ppl": 30.0, "fp16_bytes": 4 * 2**20}, md, js)
    md.write_text(md.read_text() + "\n" + run_all.NOTES_MARKER + "\nnotes\n")
    primary = md.read_text()
    gemma = run_all.MODELS["gemma3-270m"]
    run_all.write_results([row], {"ppl": 28.5, "fp16_bytes": 4 * 2**20, "eval": fp_eval}, md, tmp_path / "g.json", model=gemma)
    text = md.read_text()
    head = primary[: primary.index(run_all.NOTES_MARKER)].rstrip("\n")
    assert text.startswith(head) and text.endswith(run_all.NOTES_MARKER + "\nnotes\n")
    section = text[len(head) : text.index(run_all.NOTES_MARKER)]
    assert "## Gemma-3-270M under protocol P1, evaluated on the first 16 windows only (P1: 128)" in section
    assert "BOS + 511 text tokens per window" in section and "| full precision | — | — | 28.50 |" in section
    run_all.write_results([{**row, "ppl": 35.0}], {"ppl": 30.0, "fp16_bytes": 4 * 2**20}, md, js)  # the primary again
    again = md.read_text()
    assert section in again and "| 35.00 |" in again and again.endswith("notes\n")
    assert run_all.bench_model("/any/where/gemma-3-270m-q4_k_m.gguf") is gemma


def test_method_stats_aggregate_over_linears():
    run_all = _run_all_module()
    report = {"layers": [{"linears": [
        {"shape": [2, 4], "stats": {"bits_histogram": {"1": 1, "2": 2}, "share": 0.5, "cols": {"mean": 2.0, "min": 1, "max": 3}, "mode": "x"}},
        {"shape": [6, 4], "stats": {"bits_histogram": {"2": 1, "3": 1}, "share": 0.1, "cols": {"mean": 4.0, "min": 4, "max": 4}}},
    ]}]}
    stats = run_all.method_stats(report)
    assert stats["bits_histogram"] == {"1": 1, "2": 3, "3": 1}
    assert stats["share"] == pytest.approx({"mean": (0.5 * 8 + 0.1 * 24) / 32, "min": 0.1, "max": 0.5})
    assert stats["cols"] == pytest.approx({"mean": (2.0 * 8 + 4.0 * 24) / 32, "min": 1, "max": 4})
    assert "mode" not in stats
    line = run_all.details_line({"label": "s", "method": "slim", "method_stats": stats})
    assert line == "- `s`: groups at 1 bit: 20.0%, 2 bit: 60.0%, 3 bit: 20.0%"


def _benchmark_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_spread_summary_and_which_differences_exceed_it():
    seeds = _benchmark_module("seeds")

    def row(group, seed, ppl, kl):
        return {"group": group, "recipe": f"{group}.yaml", "extra_overrides": [], "seed": seed, "ppl": ppl, "kl": kl,
                "top1_agreement": 0.5, "bits": {"code": 3.0}}

    rows = [row("a", 0, 100.0, 1.0), row("a", 1, 120.0, 1.2), row("a", 2, 110.0, 1.1),
            row("b", 0, 130.0, 1.15), row("b", 1, 150.0, 1.3), row("b", 2, 140.0, 1.25),
            row("c", 0, 1000.0, 3.0), row("c", 1, 900.0, 2.9)]
    summary = {e["group"]: e for e in seeds.summarize(rows)}
    assert summary["a"]["ppl"] == {"mean": 110.0, "min": 100.0, "max": 120.0, "n": 3}
    assert summary["c"]["seeds"] == [0, 1] and summary["c"]["per_seed"]["1"]["ppl"] == 900.0
    lines = seeds.comparisons(list(summary.values()))
    a_b = next(line for line in lines if "`a` vs `b`" in line)
    # PPL: a's worst (120) beats b's best (130); KL: a's worst 1.2 is not below b's best 1.15.
    assert "PPL: `a` better beyond the spread" in a_b and "KL ranges overlap" in a_b
    assert "within the spread" not in a_b
    a_c = next(line for line in lines if "`a` vs `c`" in line)
    assert "PPL: `a` better" in a_c and "KL: `a` better" in a_c
    text = seeds.table(list(summary.values()), {"ppl": 30.0}, {"finished": "t", "machine": "m", "commit": "x", "threads": "1"})
    assert "| a | — | 0, 1, 2 | 110.00 [100.00, 120.00] |" in text
    assert "Threads per process (OMP_NUM_THREADS): 1;" in text
    overlapping = seeds.comparisons([summary["a"], {**summary["b"], "ppl": {"mean": 115, "min": 105, "max": 125, "n": 3}}])
    assert overlapping == ["- `a` vs `b`: **within the spread** (PPL and KL ranges overlap)"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM and the inherited ru_maxrss are Linux's")
def test_a_run_reports_its_own_peak_not_its_parents():
    """Linux carries ru_maxrss over through fork and execve: a quantize started by a harness holding a
    model would report the harness's size. The reported peak is the child's own (VmHWM)."""
    from llmquant.provenance import current_rss

    ballast = torch.ones(2**30 // 4)  # 1 GiB held by this (parent) process, resident

    parent = current_rss()
    code = "from llmquant.provenance import process_peak_rss; print(process_peak_rss())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert 0 < child < parent - 800 * 2**20, (child, parent)  # the child never held the ballast
    del ballast
