"""PB-LLM quantization-aware training (`llmquant train`): the QAT layer, the loop, resume, the output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from llmquant import train as train_module
from llmquant.errors import UserError
from llmquant.formats.checkpoint import read_checkpoint
from llmquant.formats.packers import unpack
from llmquant.layouts.partial_binary.qat import PartialBinaryQAT
from llmquant.quantize import run_quantize
from llmquant.recipe import parse_recipe
from llmquant.runtime.loader import load_quantized
from llmquant.train import TrainSettings, install_qat, learning_rate_factor, run_train
from test_fuzz import run_cli


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("qat") / "corpus.txt"
    path.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(400)))
    return path


@pytest.fixture(scope="module")
def pbllm_dir(tiny_llama_dir, corpus, tmp_path_factory):
    output = tmp_path_factory.mktemp("qat-src") / "pbllm"
    recipe = parse_recipe(
        {
            "model": str(tiny_llama_dir),
            "calibration": {"dataset": str(corpus), "nsamples": 4, "seqlen": 32, "seed": 0},
            "method": {"name": "pbllm", "salient_fraction": 0.1},
            "output": str(output),
        }
    )
    run_quantize(recipe)
    return output


def settings(src, out, corpus, **changes) -> TrainSettings:
    base = dict(model=str(src), output=str(out), dataset=str(corpus), steps=12, batch_size=2, seqlen=32, lr=1e-2, save_every=4)
    return TrainSettings(**{**base, **changes})


def test_step_zero_is_the_checkpoint(pbllm_dir):
    model = load_quantized(pbllm_dir, dtype=torch.float32)
    before = {n: m.dequantize() for n, m in model.named_modules() if hasattr(m, "dequantize") and getattr(m, "layout", "") == "partial_binary"}
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = model(input_ids=ids).logits
    modules = install_qat(model)
    assert set(modules) == set(before) and len(modules) == 14
    for name, module in modules.items():
        assert torch.equal(module.weight().detach(), before[name])
        tensors, _ = module.export()
        source = unpack(read_checkpoint(pbllm_dir).linears[name])
        for key, value in source.items():  # untrained, the export is the stored record itself
            assert torch.equal(tensors[key], value), (name, key)
    assert torch.equal(model(input_ids=ids).logits, logits)


def test_gradients_reach_every_latent_and_mu(pbllm_dir):
    model = load_quantized(pbllm_dir, dtype=torch.float32)
    modules = install_qat(model)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, module in modules.items():
        assert module.latent.grad is not None and module.latent.grad[~module.salient_mask].abs().sum() > 0, name
        assert module.latent.grad[module.salient_mask].abs().sum() == 0, name  # salient weights are frozen
        assert module.mu.grad is not None and module.mu.grad.abs().sum() > 0, name


def test_alpha_is_the_per_channel_optimum_for_the_signs():
    gen = torch.Generator().manual_seed(3)
    rows, cols = 4, 24
    mask = torch.rand(rows, cols, generator=gen) < 0.2
    tensors = {
        "salient_mask": mask,
        "signs": torch.rand(rows, cols, generator=gen) < 0.5,
        "salient_codes": torch.randint(0, 256, (rows, cols), generator=gen).to(torch.uint8) * mask,
        "high_scales": torch.full((rows,), 0.01, dtype=torch.float16),
        "high_zeros": torch.full((rows,), 128, dtype=torch.uint8),
        "alpha": torch.full((rows, 2), 0.5, dtype=torch.float16),
        "mu": torch.zeros(rows, 2, dtype=torch.float16),
    }
    module = PartialBinaryQAT(tensors, {"high_bit": 8, "group_size": 12})
    with torch.no_grad():
        module.latent.copy_(torch.randn(rows, cols, generator=gen))
    _, alpha, mu = module.quantizer()
    for r in range(rows):
        for g in range(2):
            cols_g = slice(12 * g, 12 * g + 12)
            binary = ~mask[r, cols_g]
            centered = module.latent[r, cols_g][binary] - mu[r, g]
            # argmin over a of sum (centered - a sign(centered))^2 is mean |centered|
            want = centered.abs().mean().half().float()
            assert alpha[r, g].item() == pytest.approx(want.item(), rel=1e-3)


def test_learning_rate_schedule():
    factors = [learning_rate_factor(s, 100, 0.05) for s in range(100)]
    assert factors[:5] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert factors[5] == 1.0 and factors[-1] < 0.001 and all(a >= b for a, b in zip(factors[5:], factors[6:]))


def test_training_lowers_the_loss_and_writes_a_packed_pbllm_checkpoint(pbllm_dir, corpus, tmp_path):
    out = tmp_path / "qat"
    steps = []
    output, report = run_train(settings(pbllm_dir, out, corpus, steps=24), on_step=lambda s, loss: steps.append(s))
    assert steps == list(range(1, 25))
    assert report["loss_last"] < report["loss_first"]
    assert report["trained_linears"] == 14
    assert not train_module.work_dir_for(out).exists()  # the work directory goes once the output is written
    source, trained = read_checkpoint(pbllm_dir), read_checkpoint(out)
    assert trained.quantization["bits"] == source.quantization["bits"]  # same salient set: same bits
    assert trained.quantization["info"]["qat"]["steps"] == 24
    changed_signs = 0
    for name, linear in trained.linears.items():
        assert linear.layout == "partial_binary"
        new, old = unpack(linear), unpack(source.linears[name])
        for key in ("salient_mask", "salient_codes", "high_scales", "high_zeros"):
            assert torch.equal(new[key], old[key]), (name, key)
        binary = ~old["salient_mask"]
        changed_signs += int((new["signs"] != old["signs"])[binary].sum())
    assert changed_signs > 0
    for key, tensor in load_file(pbllm_dir / "model.safetensors").items():  # plain tensors untouched
        if ".mlp." not in key and ".self_attn." not in key:
            assert torch.equal(load_file(out / "model.safetensors")[key], tensor)
    model = load_quantized(out, dtype=torch.float32)
    assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    assert json.loads((out / "llmquant.json").read_text())["command"] == "train"


def test_the_trained_model_is_exactly_the_written_checkpoint(pbllm_dir, corpus, tmp_path, monkeypatch):
    kept = {}
    original = train_module.rewrite_packed

    def capture(src, checkpoint, dst, linears, info, **kwargs):
        kept.update(linears)
        return original(src, checkpoint, dst, linears, info, **kwargs)

    monkeypatch.setattr(train_module, "rewrite_packed", capture)
    installed = {}
    monkeypatch.setattr(train_module, "install_qat", lambda model: installed.update(install_qat(model)) or installed)
    run_train(settings(pbllm_dir, tmp_path / "qat", corpus, steps=8))
    model = load_quantized(tmp_path / "qat", dtype=torch.float32)
    for name, module in installed.items():
        assert torch.equal(model.get_submodule(name).dequantize(), module.weight().detach()), name


class Crash(Exception):
    pass


def test_runs_are_deterministic_and_resume_to_the_same_bytes(pbllm_dir, corpus, tmp_path, monkeypatch):
    first, second, resumed = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    run_train(settings(pbllm_dir, first, corpus))
    run_train(settings(pbllm_dir, second, corpus))
    for name in ("model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    save = train_module.save_state

    def save_then_crash(work, step, *args):
        save(work, step, *args)
        if step == 8:
            raise Crash

    with monkeypatch.context() as patch:
        patch.setattr(train_module, "save_state", save_then_crash)
        with pytest.raises(Crash):
            run_train(settings(pbllm_dir, resumed, corpus))
    assert (train_module.work_dir_for(resumed) / train_module.STATE_FILE).is_file()
    assert not resumed.exists()
    with pytest.raises(UserError, match="--resume"):
        run_train(settings(pbllm_dir, resumed, corpus))
    with pytest.raises(UserError, match="different run"):
        run_train(settings(pbllm_dir, resumed, corpus, lr=2e-2), resume=True)
    seen = []
    run_train(settings(pbllm_dir, resumed, corpus), resume=True, on_start=lambda total, done: seen.append(done))
    assert seen == [8]
    for name in ("model.safetensors", "config.json"):
        assert (first / name).read_bytes() == (resumed / name).read_bytes()


def test_refusals_before_any_work(pbllm_dir, tiny_llama_dir, corpus, tmp_path):
    with pytest.raises(UserError, match="PB-LLM"):
        gptq = tmp_path / "gptq"
        run_quantize(parse_recipe({
            "model": str(tiny_llama_dir), "calibration": {"dataset": str(corpus), "nsamples": 2, "seqlen": 32},
            "method": {"name": "rtn", "bits": 4, "group_size": 16}, "output": str(gptq),
        }))
        run_train(settings(gptq, tmp_path / "x", corpus))
    with pytest.raises(UserError, match="--steps"):
        run_train(settings(pbllm_dir, tmp_path / "x", corpus, steps=0))
    with pytest.raises(UserError, match="--warmup"):
        run_train(settings(pbllm_dir, tmp_path / "x", corpus, warmup=1.0))
    with pytest.raises(UserError, match="different from"):
        run_train(settings(pbllm_dir, pbllm_dir, corpus))
    with pytest.raises(UserError, match="not a packed|quantization_config"):
        run_train(settings(tiny_llama_dir, tmp_path / "x", corpus))
    assert not (tmp_path / "x").exists()


def test_cli(pbllm_dir, corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    capsys.readouterr()
    code, stderr = run_cli(
        "train", "--model", str(pbllm_dir), "--output", str(out), "--dataset", str(corpus), "--steps", "4",
        "--batch-size", "1", "--seqlen", "32", "--lr", "0.01", "--json", "--quiet",
    )
    assert code == 0, stderr
    report = json.loads(capsys.readouterr().out)
    assert report["steps"] == 4 and (out / "model.safetensors").is_file()
    code, stderr = run_cli("train", "--model", str(pbllm_dir), "--output", str(tmp_path / "y"), "--steps", "0")
    assert code == 2 and stderr.strip().startswith("error:") and "--steps" in stderr and len(stderr.strip().splitlines()) == 1
