"""Host memory of streaming quantization (issue #17): a random-weight LLaMA-shaped model, stored as
fp16 safetensors shards, whose float32 weights are >= 3x the memory cap the runs are held under,
quantized with RTN and with GPTQ through the real CLI in a capped subprocess.

    python benchmarks/scale_memory.py                     # 0.81B parameters, cap 1.0 GiB, writes
                                                          # docs/results-scale.json ("cpu_memory")
    python benchmarks/scale_memory.py --smoke             # a tiny model, seconds (a check of the script)

The model (LLaMA-shaped: hidden 1024, intermediate 2816, 16 heads / 4 KV heads, vocabulary 32000,
untied head; `--layers` decoder layers, 66 by default: 0.81B parameters, 3.2 GB in float32) is written
one tensor at a time, never held in memory. Narrow layers and many of them: the streamed peak does
not depend on the number of layers, while GPTQ's time grows with the square of the width, and this
has to run on a busy 2-core machine. The cap is RLIMIT_DATA (`prlimit --data`): since Linux 4.7 it bounds every private
writable mapping, i.e. all of torch's host allocations, so a run over the cap fails with an
allocation error instead of being measured. Peak RSS is the run's own (VmHWM in its report,
`peak_memory.rss_bytes`). The figure it is judged against is

    budget = one decoder layer in float32 + the input embeddings in float32 + activations
             (the hidden states feeding the layer and those it produces: 2 x nsamples x seqlen x hidden x 4 B)

and, since a Python process holding torch and transformers has a floor of its own before it reads
any weight, two floors are reported: `floor` (the peak RSS of the same command on a 2-layer model of
64-wide layers: the interpreter, modules imported on first use, tokenizer, calibration text) and
`baseline` (an interpreter that only imports torch, transformers and llmquant). `peak - floor` is
what the model's size made the run hold. GPTQ runs with a small calibration set
(--nsamples/--seqlen, 4 x 128 by default) to keep the 2-core CPU's time in minutes: its activations
are small, its Hessians (hidden^2 and intermediate^2 floats) are not, and they are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # llmquant from this checkout even where it is not installed

from llmquant.safetensors_io import write_safetensors  # noqa: E402

FULL = dict(hidden=1024, intermediate=2816, heads=16, kv_heads=4, vocab=32000, layers=66)
SMOKE = dict(hidden=64, intermediate=160, heads=4, kv_heads=2, vocab=512, layers=3)


def byte_tokenizer():
    """One token per byte (ids < 258), enough to cut calibration windows; no hub access."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<unk>"] = len(vocab)
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def layer_shapes(s: dict) -> dict[str, tuple[int, ...]]:
    h, i, head_dim = s["hidden"], s["intermediate"], s["hidden"] // s["heads"]
    kv = s["kv_heads"] * head_dim
    return {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }


def make_model(directory: Path, s: dict, seed: int = 0) -> dict:
    """Writes config.json, one fp16 shard per decoder layer (+ one for the embeddings/head) with
    model.safetensors.index.json, and a byte tokenizer. Returns the model's sizes."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    config = transformers.LlamaConfig(
        vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
        num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
        max_position_embeddings=2048, tie_word_embeddings=False, dtype="float16",
    )  # fmt: skip
    config.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    generator = torch.Generator().manual_seed(seed)

    def rand(shape: tuple[int, ...], name: str) -> torch.Tensor:
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            return torch.ones(shape, dtype=torch.float16)
        scale = 0.02 if len(shape) == 2 else 1.0
        return (torch.randn(shape, generator=generator) * scale).to(torch.float16)

    shards: list[dict[str, tuple[int, ...]]] = [
        {"model.embed_tokens.weight": (s["vocab"], s["hidden"]), "model.norm.weight": (s["hidden"],), "lm_head.weight": (s["vocab"], s["hidden"])}
    ]
    shards += [{f"model.layers.{k}.{n}": shape for n, shape in layer_shapes(s).items()} for k in range(s["layers"])]
    weight_map, params = {}, 0
    reuse = (directory / "model.safetensors.index.json").is_file()  # written by an earlier run: same seed, same bytes
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        params += sum(torch.Size(shape).numel() for shape in shard.values())
        if not reuse:
            write_safetensors(directory / name, {key: rand(shape, key) for key, shape in shard.items()}, {"format": "pt"})
        weight_map.update({key: name for key in shard})
    total = params * 2
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    layer_params = sum(torch.Size(shape).numel() for shape in layer_shapes(s).values())
    return {
        "parameters": params,
        "fp32_bytes": params * 4,
        "fp16_file_bytes": total,
        "layer_fp32_bytes": layer_params * 4,
        "embeddings_fp32_bytes": s["vocab"] * s["hidden"] * 4,
    }


def baseline_rss(cap: int | None) -> int:
    """Peak RSS of an interpreter that imports what a quantize run imports, and nothing else."""
    code = (
        "import torch, transformers, llmquant.quantize, llmquant.cli;"
        "from transformers import LlamaForCausalLM;"
        "from llmquant.provenance import process_peak_rss;"
        "print(process_peak_rss())"
    )
    out = subprocess.run(_capped(cap) + [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=_env())
    return int(out.stdout.strip().splitlines()[-1])


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _capped(cap: int | None) -> list[str]:
    return ["prlimit", f"--data={cap}", "--"] if cap else []


def quantize(
    model_dir: Path, out: Path, method: str, cap: int | None, nsamples: int, seqlen: int, corpus: Path, streaming: str,
    layers: int, quantized_layers: int | None,
) -> dict:
    recipe = out.parent / f"{method}.yaml"
    skip = [f"model.layers.{k}.*" for k in range(quantized_layers or layers, layers)]
    calibration = f"calibration: {{dataset: {corpus}, nsamples: {nsamples}, seqlen: {seqlen}, seed: 0}}\n"
    body = {"rtn": "method: {name: rtn, bits: 3, group_size: 128}\n", "gptq": "method: {name: gptq, bits: 3, group_size: 128}\n"}[method]
    recipe.write_text(f"model: {model_dir}\noutput: {out}\ndevice: cpu\n{calibration}{body}skip: {json.dumps(skip)}\n")
    command = _capped(cap) + [
        sys.executable, "-m", "llmquant.cli", "quantize", "--recipe", str(recipe), "--json", "--quiet",
        "--streaming", streaming, "--force",
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=_env())
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"method": method, "streaming": streaming, "ok": False, "exit": done.returncode, "error": " | ".join(tail), "seconds": seconds}
    report = json.loads(done.stdout)
    return {
        "method": method,
        "streaming": streaming,
        "ok": True,
        "streamed": report.get("streamed"),
        "peak_rss_bytes": report["peak_memory"]["rss_bytes"],
        "seconds": seconds,
        "time_seconds": report["time_seconds"],
        "output_bytes": sum(p.stat().st_size for p in out.iterdir() if p.name.endswith(".safetensors")),
        "output_files": sorted(p.name for p in out.iterdir() if p.name.endswith(".safetensors")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script in seconds")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--cap-gib", type=float, default=None, help="RLIMIT_DATA of the runs (default 1.0; smoke: none)")
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--methods", default="rtn,gptq")
    parser.add_argument(
        "--quantized-layers", type=int, default=None,
        help="quantize the linears of the first N layers only (the rest are read, run and written in full precision): "
        "the busy 2-core machine cannot quantize every layer in reasonable time; the streamed peak is per layer",
    )
    parser.add_argument("--also-whole", action="store_true", help="also try --streaming off under the cap (expected to fail)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the model and outputs go (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here (default: docs/results-scale.json, key cpu_memory; smoke: stdout only)")
    args = parser.parse_args()
    shape = dict(SMOKE if args.smoke else FULL)
    if args.layers:
        shape["layers"] = args.layers
    cap = None if (args.smoke and args.cap_gib is None) else int((args.cap_gib or 1.0) * 2**30)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="llmquant-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "model"
    corpus = work / "corpus.txt"
    corpus.write_text(" ".join(f"The number {i} is followed by {i + 1}." for i in range(4000)))
    start = time.perf_counter()
    sizes = make_model(model_dir, shape)
    made = time.perf_counter() - start
    base = baseline_rss(cap)
    activations = 2 * args.nsamples * args.seqlen * shape["hidden"] * 4
    budget = sizes["layer_fp32_bytes"] + sizes["embeddings_fp32_bytes"] + activations
    # The floor of a run: the same command on a model with almost no weights (SMOKE shape). It holds
    # what the import-only baseline misses: modules imported on first use, the tokenizer, the corpus.
    floor_dir = work / "floor-model"
    make_model(floor_dir, dict(SMOKE, layers=2))
    runs = []
    for method in args.methods.split(","):
        floor = quantize(floor_dir, work / f"out-{method}-floor", method, None, args.nsamples, args.seqlen, corpus, "auto", 2, None)
        modes = ["auto", "off"] if args.also_whole else ["auto"]
        for mode in modes:
            result = quantize(
                model_dir, work / f"out-{method}-{mode}", method, cap, args.nsamples, args.seqlen, corpus, mode,
                shape["layers"], args.quantized_layers,
            )
            if result["ok"]:
                result["peak_over_budget"] = result["peak_rss_bytes"] / budget
                result["peak_minus_baseline_over_budget"] = (result["peak_rss_bytes"] - base) / budget
                if floor["ok"]:
                    result["floor_rss_bytes"] = floor["peak_rss_bytes"]
                    result["peak_minus_floor_over_budget"] = (result["peak_rss_bytes"] - floor["peak_rss_bytes"]) / budget
            runs.append(result)
            print(json.dumps(result), flush=True)
    figures = {
        "model": {**shape, **sizes, "seconds_to_write": made},
        "cap_bytes": cap,
        "fp32_over_cap": sizes["fp32_bytes"] / cap if cap else None,
        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen},
        "quantized_layers": args.quantized_layers or shape["layers"],
        "budget": {
            "layer_fp32_bytes": sizes["layer_fp32_bytes"],
            "embeddings_fp32_bytes": sizes["embeddings_fp32_bytes"],
            "activations_bytes": activations,
            "total_bytes": budget,
        },
        "baseline_rss_bytes": base,
        "gptq_largest_hessian_bytes": shape["intermediate"] ** 2 * 4,
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    print(json.dumps(figures, indent=1))
    if not args.smoke or args.json:
        target = args.json or ROOT / "docs" / "results-scale.json"
        data = json.loads(target.read_text()) if target.is_file() else {}
        data["cpu_memory"] = figures
        target.write_text(json.dumps(data, indent=1) + "\n")


if __name__ == "__main__":
    main()
