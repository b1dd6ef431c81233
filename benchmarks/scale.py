"""GPU time at real model sizes (issue #17): seconds per decoder layer for gptq, billm, pbllm and slim on a
LLaMA-2-7B-shaped slice and on one LLaMA-2-70B-shaped layer, the projected whole-model time, and the
peak GPU memory per layer. One script, prepared to run in under 8 minutes on one H100/H200.

    python benchmarks/scale.py                       # on the GPU; writes docs/results-scale.json ("gpu")
    python benchmarks/scale.py --smoke               # tiny sizes, runs on a CPU in about a minute
    python benchmarks/scale.py --methods gptq --parts 7b

Shapes (random weights, fp16 on the GPU, as `quantize` computes there):
  7b    hidden 4096, intermediate 11008, 32 heads (MHA), 4 decoder layers; projected x 32 layers
  70b   hidden 8192, intermediate 28672, 64 heads / 8 KV heads (GQA), 1 decoder layer; projected x 80
Calibration: 128 x 2048 random token ids (the time does not depend on the text). Each method runs with
its recipe's settings (recipes/gptq-w3g128.yaml, billm-1bit.yaml, pbllm-10pct.yaml, slim-2bit.yaml)
through llmquant's own SequentialRunner (capture, Hessians, the method, the layer rerun; the finished
layer is moved back to host memory, as in a real run). Seconds per layer: the median over the slice's
layers (the first one includes warm-up and is reported apart). Peak GPU memory: torch's allocator
peak during each layer (the first includes the capture of the calibration inputs).

A time guard (--budget-s, default 420) skips what would start after the budget is spent; skipped
parts are recorded as such. Results are written after every part, so an interrupted run keeps what
it measured.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # llmquant from this checkout even where it is not installed

import torch  # noqa: E402
import yaml  # noqa: E402

RECIPES = {"gptq": "gptq-w3g128", "billm": "billm-1bit", "pbllm": "pbllm-10pct", "slim": "slim-2bit"}
PARTS = {
    "7b": dict(hidden=4096, intermediate=11008, heads=32, kv_heads=32, layers=4, vocab=32000, project=32),
    "70b": dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, layers=1, vocab=32000, project=80),
}
SMOKE_PARTS = {
    "7b": dict(hidden=128, intermediate=344, heads=4, kv_heads=4, layers=2, vocab=512, project=32),
    "70b": dict(hidden=256, intermediate=896, heads=8, kv_heads=2, layers=1, vocab=512, project=80),
}


def method_for(name: str, smoke: bool):
    from llmquant.methods import get_method_class

    fields = yaml.safe_load((ROOT / "recipes" / f"{RECIPES[name]}.yaml").read_text())["method"]
    if smoke and "group_size" in fields and fields["group_size"] not in (-1, None):
        fields["group_size"] = 64
    cls = get_method_class(fields["name"])
    return cls(cls.Config(**fields)), fields


def build(shape: dict, device: torch.device, dtype: torch.dtype):
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=4096, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    model.config.use_cache = False
    return model


def run_part(name: str, part: str, shape: dict, device: torch.device, dtype: torch.dtype, nsamples: int, seqlen: int, smoke: bool) -> dict:
    from llmquant.core.runner import SequentialRunner
    from llmquant.models.layer_maps import resolve_layers

    model = build(shape, device, dtype)
    method, fields = method_for(name, smoke)
    windows = torch.randint(0, shape["vocab"], (nsamples, seqlen), generator=torch.Generator().manual_seed(0))
    peaks: list[int] = []
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)

    def on_layer(report) -> None:
        if cuda:
            torch.cuda.synchronize()
            peaks.append(int(torch.cuda.max_memory_allocated(device)))
            torch.cuda.reset_peak_memory_stats(device)

    start = time.perf_counter()
    runner = SequentialRunner(model, resolve_layers(model), method, device, torch.float32, on_layer_done=on_layer)
    _, reports = runner.run(windows)
    total = time.perf_counter() - start
    seconds = [r.seconds for r in reports]
    steady = seconds[1:] or seconds
    per_layer = statistics.median(steady)
    del model, runner
    if cuda:
        torch.cuda.empty_cache()
    return {
        "method": name,
        "recipe": RECIPES[name],
        "settings": fields,
        "part": part,
        "shape": shape,
        "calibration": [nsamples, seqlen],
        "layer_seconds": seconds,
        "seconds_per_layer": per_layer,
        "first_layer_seconds": seconds[0],
        "projected_model_seconds": per_layer * shape["project"],
        "projected_layers": shape["project"],
        "peak_gpu_bytes_per_layer": peaks or None,
        "wall_seconds": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, CPU-friendly (a check of the script)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--methods", default="gptq,pbllm,billm,slim")
    parser.add_argument("--parts", default="7b,70b")
    parser.add_argument("--nsamples", type=int, default=None, help="default 128 (smoke: 4)")
    parser.add_argument("--seqlen", type=int, default=None, help="default 2048 (smoke: 64)")
    parser.add_argument("--slice-layers", type=int, default=None, help="decoder layers of the 7B slice (default 4)")
    parser.add_argument("--budget-s", type=float, default=420.0, help="start nothing new after this many seconds")
    parser.add_argument("--json", type=Path, default=None, help="default: docs/results-scale.json key 'gpu' (smoke: stdout only)")
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    shapes = {part: dict(shape) for part, shape in (SMOKE_PARTS if args.smoke else PARTS).items()}
    if args.slice_layers:
        shapes["7b"]["layers"] = args.slice_layers
    nsamples = args.nsamples or (4 if args.smoke else 128)
    seqlen = args.seqlen or (64 if args.smoke else 2048)
    from llmquant.provenance import device_name, versions

    results = {
        "device": device_name(device),
        "device_type": device.type,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "versions": versions(),
        "smoke": args.smoke,
        "runs": [],
        "skipped": [],
    }
    target = None if (args.smoke and args.json is None) else (args.json or ROOT / "docs" / "results-scale.json")
    began = time.perf_counter()
    for part in args.parts.split(","):
        for name in args.methods.split(","):
            if time.perf_counter() - began > args.budget_s:
                results["skipped"].append({"method": name, "part": part, "why": f"budget of {args.budget_s:.0f}s spent"})
                continue
            try:
                result = run_part(name, part, shapes[part], device, dtype, nsamples, seqlen, args.smoke)
            except torch.OutOfMemoryError as error:  # type: ignore[attr-defined]
                result = {"method": name, "part": part, "error": f"out of memory: {' '.join(str(error).split())[:200]}"}
                torch.cuda.empty_cache()
            except Exception as error:  # noqa: BLE001 - recorded; the other methods still run in the lease
                result = {"method": name, "part": part, "error": f"{type(error).__name__}: {error}"[:300],
                          "traceback": traceback.format_exc(limit=8)[-3000:]}  # fmt: skip
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            results["runs"].append(result)
            print(json.dumps({k: v for k, v in result.items() if k != "settings"}), flush=True)
            if target is not None:
                data = json.loads(target.read_text()) if target.is_file() else {}
                data["gpu"] = {**results, "elapsed_seconds": time.perf_counter() - began}
                target.write_text(json.dumps(data, indent=1) + "\n")
    print(f"done in {time.perf_counter() - began:.0f}s; skipped: {results['skipped'] or 'nothing'}")


if __name__ == "__main__":
    main()
