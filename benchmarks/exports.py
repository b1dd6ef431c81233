"""Exports of real checkpoints, read back by the third parties' readers (issue #14).

For each native checkpoint given (SmolLM2-135M quantized under P1, say) and each export format:
whether `llmquant pack --format F` writes it or refuses (and why), the export's size, the reader
used, the max |weight the reader decodes - llmquant's decode| and the KL of the export's logits
against the native model's over the first --windows WikiText-2 test windows of 512 tokens (P1's
eval windows; P1 itself uses 128). Then the transformers round trip of the native checkpoint:
from_pretrained (after `import llmquant`), its logits against llmquant.load's, save_pretrained,
llmquant's verify of the result and the stored tensors compared.

Readers: compressed-tensors' decompressor (weights) and transformers' from_pretrained (logits);
GPTQ: transformers reads it only through optimum + gptqmodel, and gptqmodel 7.7 needs
torch >= 2.14.1 (this project pins 2.13), so the weights are read by the transcription of
GPTQModel 7.7.0's dequantize_weight in tests/test_export.py, and the logits are those of the fp32
model holding them; GGUF: gguf's reader (gguf.quants.dequantize) and transformers' gguf_file=.

    python benchmarks/exports.py --native /tmp/smol/gptq-w4g64 --native /tmp/smol/gptq-w3g32 \
        --json docs/exports.json --windows 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the GPTQ reader transcription lives with the tests

import llmquant  # noqa: E402  (registers the transformers integration)
import transformers  # noqa: E402
from llmquant.errors import UserError  # noqa: E402
from llmquant.evaluate.ppl import kl_divergence  # noqa: E402
from llmquant.export import export_checkpoint  # noqa: E402
from llmquant.export.gguf import permute_rows  # noqa: E402
from llmquant.formats import packers  # noqa: E402
from llmquant.formats.checkpoint import read_checkpoint  # noqa: E402
from llmquant.models.loading import load_tokenizer  # noqa: E402
from llmquant.data.streams import build_eval_stream  # noqa: E402
from llmquant.runtime.loader import load_quantized, verify_checkpoint  # noqa: E402
from llmquant.runtime.qlinear import set_backend  # noqa: E402

SEQLEN = 512
EXPORTS = [
    ("compressed-tensors", []),
    ("compressed-tensors", ["sym_widen"]),
    ("gptq", []),
    ("gptq", ["sym_widen"]),
    ("gguf", []),
]


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix in (".safetensors", ".gguf"))


@torch.no_grad()
def all_logits(model, windows: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(w.unsqueeze(0)).logits[0].float() for w in windows])


def kl_against(reference: torch.Tensor, logits: torch.Tensor) -> dict:
    kl, agree = kl_divergence(reference, logits)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1_agreement": float(agree.float().mean()),
            "logits_identical": bool(torch.equal(reference, logits))}


def native_model(directory: Path, dtype: torch.dtype):
    model = load_quantized(directory, dtype=dtype)
    set_backend(model, "torch-cached")  # the reference backend's numbers, decoded once
    return model


def ct_read(native, out: Path, windows, reference_fp16) -> dict:
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file
    from transformers import CompressedTensorsConfig

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    stored = load_file(str(out / "model.safetensors"))
    delta = 0.0
    schemes = {}
    for group in config["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for target in group["targets"]:
            schemes[target] = scheme
    for name, linear in native.linears.items():
        scheme = schemes.get("Linear") or schemes[f"re:^{name.replace('.', chr(92) + '.')}$"]
        tensors = {k[len(name) + 1 :]: t for k, t in stored.items() if k.startswith(name + ".") and k.count(".") == name.count(".") + 1}
        weight = PackedQuantizationCompressor.decompress(tensors, scheme)["weight"]
        delta = max(delta, float((weight.float() - packers.dequantize(linear).half().float()).abs().max()))
    symmetric = all(g["weights"]["symmetric"] for g in config["config_groups"].values())
    extra = {} if symmetric else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16, **extra)
    return {
        "reader": "compressed-tensors PackedQuantizationCompressor.decompress (weights, fp16: its scales' dtype); "
        + "transformers from_pretrained " + ("(compressed, decompressed at the first forward)" if symmetric else "(dequantize=True: transformers 5.25 cannot build the asymmetric compressed modules)")
        + ", logits at float16 against the native model at float16",
        "max_abs_delta_weight": delta,
        **kl_against(reference_fp16(), all_logits(model, windows)),
    }


def gptq_read(native, out: Path, windows, reference_fp32, src: Path) -> dict:
    from safetensors.torch import load_file
    from test_export import gptq_v2_dequantize

    config = json.loads((out / "config.json").read_text())["quantization_config"]
    stored = load_file(str(out / "model.safetensors"))
    model = native_model(src, torch.float32)
    delta = 0.0
    for name, linear in native.linears.items():
        t = {k[len(name) + 1 :]: v for k, v in stored.items() if k.startswith(name + ".") and k.count(".") == name.count(".") + 1}
        weight = gptq_v2_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], config["bits"], linear.shape[1])
        delta = max(delta, float((weight - packers.dequantize(linear)).abs().max()))
        parent, _, child = name.rpartition(".")
        dense = torch.nn.Linear(linear.shape[1], linear.shape[0], bias=False)
        dense.weight.data = weight
        setattr(model.get_submodule(parent), child, dense)
    return {
        "reader": "GPTQModel 7.7.0 dequantize_weight (v2 zeros), transcribed in tests/test_export.py; logits of the fp32 "
        "model holding its weights (transformers needs optimum + gptqmodel, which needs torch >= 2.14.1)",
        "max_abs_delta_weight": delta,
        **kl_against(reference_fp32(), all_logits(model, windows)),
    }


def gguf_read(native, out: Path, windows, reference_fp32) -> dict:
    import gguf
    from gguf.quants import dequantize

    config = native.config
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
             "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    tensors = {t.name: t for t in gguf.GGUFReader(str(out / "model.gguf")).tensors}
    delta, types = 0.0, set()
    for name, linear in native.linears.items():
        layer, kind = name.split(".")[2], name.split(".")[-1]
        tensor = tensors[f"blk.{layer}.{names[kind]}.weight"]
        types.add(tensor.tensor_type.name)
        weight = torch.from_numpy(dequantize(tensor.data, tensor.tensor_type).copy()).float()
        expected = packers.dequantize(linear)
        if kind in ("q_proj", "k_proj"):
            expected = permute_rows(expected, heads if kind == "q_proj" else kv)
        delta = max(delta, float((weight - expected).abs().max()))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, gguf_file="model.gguf", dtype=torch.float32)
    return {
        "reader": "gguf GGUFReader + gguf.quants.dequantize (weights); transformers from_pretrained(gguf_file=) (logits, fp32)",
        "gguf_types": sorted(types),
        "max_abs_delta_weight": delta,
        **kl_against(reference_fp32(), all_logits(model, windows)),
    }


def round_trip(src: Path, windows, reference, work: Path) -> dict:
    """from_pretrained as a user calls it (transformers' default dtype: the checkpoint's), against the
    native model at that dtype."""
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    seconds = time.perf_counter() - start
    quantized = set(read_checkpoint(src).linears)
    kinds = {type(m).__name__ for n, m in model.named_modules() if n in quantized}
    backend = next(m.backend for m in model.modules() if hasattr(m, "backend"))
    set_backend(model, "torch-cached")
    result = {"from_pretrained_seconds": seconds, "module_types": sorted(kinds), "default_backend": backend,
              "dtype": str(model.dtype), **kl_against(reference(model.dtype)(), all_logits(model, windows))}
    model.save_pretrained(work / "resaved")
    result["save_pretrained_verify_ok"] = verify_checkpoint(work / "resaved")["ok"]
    before, after = read_checkpoint(src), read_checkpoint(work / "resaved")
    result["stored_tensors_identical"] = all(
        torch.equal(after.linears[n].tensors[k], t) for n, l in before.linears.items() for k, t in l.tensors.items()
    ) and all(torch.equal(after.plain[k], t) for k, t in before.plain.items())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--native", action="append", required=True, help="native llmquant checkpoint (repeatable)")
    parser.add_argument("--windows", type=int, default=8, help="WikiText-2 test windows of 512 tokens for the KL")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"windows": args.windows, "seqlen": SEQLEN, "torch": torch.__version__, "transformers": transformers.__version__,
               "checkpoints": {}}
    for native_dir in map(Path, args.native):
        native = read_checkpoint(native_dir)
        tokenizer = load_tokenizer(str(native_dir))
        stream = build_eval_stream("wikitext2", tokenizer, SEQLEN, args.data_dir)
        windows = stream.windows(SEQLEN, args.windows)
        cache: dict = {}

        def reference(dtype):
            def get():
                if dtype not in cache:
                    cache[dtype] = all_logits(native_model(native_dir, dtype), windows)
                return cache[dtype]
            return get

        entry = {"native_bytes": size_of(native_dir), "exports": []}
        print(f"== {native_dir} ({entry['native_bytes'] / 2**20:.1f} MiB native)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for fmt, flags in EXPORTS:
                label = fmt + ("+sym-widen" if flags else "")
                out = work / label
                row = {"format": fmt, "sym_widen": bool(flags)}
                start = time.perf_counter()
                try:
                    summary = export_checkpoint(native_dir, out, fmt, sym_widen=bool(flags))
                except UserError as error:
                    row["refused"] = str(error)
                    print(f"  {label:30s} refused: {error}", flush=True)
                    entry["exports"].append(row)
                    continue
                row["export_seconds"] = time.perf_counter() - start
                row["bytes"] = size_of(out)
                row["as"] = sorted({v["as"] for v in summary["linears"].values()})
                if fmt == "compressed-tensors":
                    row.update(ct_read(native, out, windows, reference(torch.float16)))
                elif fmt == "gptq":
                    row.update(gptq_read(native, out, windows, reference(torch.float32), native_dir))
                else:
                    row.update(gguf_read(native, out, windows, reference(torch.float32)))
                print(f"  {label:30s} {row['bytes'] / 2**20:7.1f} MiB  max|dW|={row['max_abs_delta_weight']:.3g}  "
                      f"KL={row['kl_mean']:.3g}  identical logits={row['logits_identical']}", flush=True)
                entry["exports"].append(row)
                shutil.rmtree(out)
            entry["transformers_round_trip"] = round_trip(native_dir, windows, reference, work)
            print(f"  from_pretrained round trip: {entry['transformers_round_trip']}", flush=True)
        results["checkpoints"][str(native_dir)] = entry
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
