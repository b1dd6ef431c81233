"""Calibration sampling and evaluation streams follow the reference procedures exactly."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch

from conftest import byte_tokenizer, tiny_model
from llmquant.data.calibration import CalibrationSet, build_calibration, load_or_build_calibration
from llmquant.data.corpora import load_corpus, wikitext_rows_from_lines
from llmquant.data.streams import build_eval_stream
from llmquant.errors import UserError
from llmquant.evaluate import perplexity, window_count


def reference_stream_windows(ids, nsamples, seqlen, seed):
    """The GPTQ-family loader, verbatim in spirit: global random.seed, randint per window."""
    state = random.getstate()
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        i = random.randint(0, ids.numel() - seqlen - 1)
        out.append(ids[i : i + seqlen])
    random.setstate(state)
    return torch.stack(out)


def reference_document_windows(docs, tokenizer, nsamples, seqlen, seed):
    state = random.getstate()
    random.seed(seed)
    out = []
    for _ in range(nsamples):
        while True:
            i = random.randint(0, len(docs) - 1)
            enc = tokenizer(docs[i], return_tensors="pt").input_ids
            if enc.shape[1] > seqlen:
                break
        i = random.randint(0, enc.shape[1] - seqlen - 1)
        out.append(enc[0, i : i + seqlen])
    random.setstate(state)
    return torch.stack(out)


def test_stream_sampling_matches_reference(text_file):
    tok = byte_tokenizer()
    calib = build_calibration(str(text_file), tok, nsamples=9, seqlen=50, seed=3)
    ids = tok(text_file.read_text(), return_tensors="pt").input_ids[0]
    assert torch.equal(calib.windows, reference_stream_windows(ids, 9, 50, 3))
    assert calib.meta["seed"] == 3 and len(calib.meta["text_sha256"]) == 64


def test_document_sampling_matches_reference(tmp_path):
    tok = byte_tokenizer()
    docs = [("short " * (i % 7)) + ("long text " * (i % 5) * 9) for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    calib = build_calibration(str(path), tok, nsamples=6, seqlen=64, seed=0)
    assert torch.equal(calib.windows, reference_document_windows(docs, tok, 6, 64, 0))


def test_sampling_does_not_touch_the_global_rng(text_file):
    random.seed(123)
    expected = random.random()
    random.seed(123)
    build_calibration(str(text_file), byte_tokenizer(), nsamples=2, seqlen=16, seed=0)
    assert random.random() == expected


def test_no_long_enough_document_is_an_error_not_a_hang(tmp_path):
    path = tmp_path / "tiny.jsonl"
    path.write_text('{"text": "too short"}\n')
    with pytest.raises(UserError, match="too few documents"):
        build_calibration(str(path), byte_tokenizer(), nsamples=1, seqlen=64, seed=0)


def test_calibration_file_round_trip_and_corruption(tmp_path, text_file):
    tok = byte_tokenizer()
    calib = build_calibration(str(text_file), tok, nsamples=4, seqlen=32, seed=1)
    path = tmp_path / "calib.safetensors"
    calib.save(path)
    again = load_or_build_calibration(str(path), tok, 0, 0, 0)
    assert torch.equal(again.windows, calib.windows) and again.meta["seed"] == 1
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the token data
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match="sha256"):
        CalibrationSet.load(path)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="calib.safetensors"):
        CalibrationSet.load(path)


def test_wikitext_rows_from_upstream_lines():
    text = " \n = Title = \n \n Body line . \n"
    assert wikitext_rows_from_lines(text) == ["", " = Title = \n", "", " Body line . \n"]


def test_local_wikitext_test_split(shared_data):
    corpus = load_corpus("wikitext2", "test", shared_data)
    assert len(corpus.rows) == 4358  # the HF split's row count
    assert sum(1 for r in corpus.rows if r == "") == 1467


def test_eval_stream_joins_as_the_reference(shared_data):
    tok = byte_tokenizer()
    stream = build_eval_stream("wikitext2", tok, seqlen=512, data_dir=shared_data)
    rows = load_corpus("wikitext2", "test", shared_data).rows
    assert stream.ids.numel() == len(tok("\n\n".join(rows)).input_ids)
    ptb = build_eval_stream("ptb", tok, seqlen=512, data_dir=shared_data)
    assert ptb.split == "test" and ptb.source.endswith("ptb.test.txt")


def test_perplexity_windows_and_formula():
    model = tiny_model("llama")
    ids = torch.randint(0, 200, (1000,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, seqlen=96)
    assert result.windows == 10 == window_count(1000, 96)  # tail of 40 tokens dropped
    assert result.tokens_evaluated == 960
    # Independent computation: exp of the mean per-window mean NLL, no BOS added per window.
    nlls = []
    with torch.no_grad():
        for k in range(10):
            w = ids[k * 96 : (k + 1) * 96].unsqueeze(0)
            logits = model(w).logits[0, :-1]
            nlls.append(torch.nn.functional.cross_entropy(logits, w[0, 1:]).item())
    assert result.ppl == pytest.approx(math.exp(sum(nlls) / 10), rel=1e-6)
    assert perplexity(model, ids, seqlen=96, max_windows=3).windows == 3
