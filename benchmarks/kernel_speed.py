"""Speed of the fused low-bit kernels against fp16 cuBLAS, on one GPU, in a few minutes; writes JSON.

    python benchmarks/kernel_speed.py --output kernels.json            # on a CUDA machine
    python benchmarks/kernel_speed.py --smoke --output smoke.json      # the same code on a CPU, tiny shapes,
                                                                  # Triton's interpreter (checks the script)

1. Kernels: for each layout setting below and each matrix shape of LLaMA-2-7B (4096x4096,
   11008x4096, 4096x11008) and -70B (8192x8192, 28672x8192) at 1, 16 and 512 tokens: the time of
   `packed_matmul` (the triton backend's whole forward: launch, split-K sum, cast) and of
   `F.linear` with the fp16 weight (cuBLAS), CUDA events, warm-up, median of --runs runs, and the
   speed ratio fp16 / packed. Each packed result is checked against the decoded weight first.
   The packed tensors are random but valid records of each layout (speed does not depend on the
   values); `--tiles` then times decode tile alternatives per layout (tiles_section).
2. End to end: a LLaMA-7B-shaped model with random weights, greedy decoding of --new-tokens tokens
   at batch 1 with a static KV cache and every step replayed as a CUDA graph (bench's own loop,
   `llmquant.bench.static_decode`), fp16 against the same model with every decoder linear packed
   (uniform 2-bit g128 and the other layouts), plus the resident GPU memory of each.

Every section is guarded: a failure is recorded in the JSON with its message and the script goes on.
The JSON is rewritten after every measurement; --kernels-budget-s and --budget-s are time guards
(what would start after them is recorded as skipped), so a run inside a lease always leaves results.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # llmquant from this checkout even where it is not installed

SHAPES_7B = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (out_features, in_features)
SHAPES_70B = [(8192, 8192), (28672, 8192)]
TOKENS = [1, 16, 512]
# (label, layout, how to build it)
SETTINGS = [
    ("uniform-2bit-g128", "uniform", {"bits": 2, "group_size": 128}),
    ("uniform-3bit-g128", "uniform", {"bits": 3, "group_size": 128}),
    ("uniform-4bit-g128", "uniform", {"bits": 4, "group_size": 128}),
    ("slim-2bit-g128", "mixed", {"widths": (1, 2, 3), "group_size": 128}),
    ("pbllm-10pct", "partial_binary", {"salient_share": 0.1, "high_bit": 8, "group_size": 4096}),
    ("billm-1bit", "binary_residual", {"blocksize": 128, "salient_share": 0.05}),
]


def random_record(layout: str, rows: int, cols: int, device, generator, **kw):
    """Tensors of a valid record of `layout` (random values), on `device`."""
    import torch

    def randint(high, shape):
        return torch.randint(0, high, shape, device=device, generator=generator, dtype=torch.int64).to(torch.uint8)

    def small(shape):
        return (torch.rand(shape, device=device, generator=generator) * 0.02 + 0.001).half()

    if layout == "uniform":
        bits, gs = kw["bits"], kw["group_size"]
        groups = -(-cols // gs)
        tensors = {"codes": randint(1 << bits, (rows, cols)), "scales": small((rows, groups)), "zeros": randint(1 << bits, (rows, groups))}
        return tensors, {"bits": bits, "group_size": gs, "sym": False}
    if layout == "mixed":
        gs, widths = kw["group_size"], torch.tensor(kw["widths"], dtype=torch.uint8, device=device)
        groups = -(-cols // gs)
        group_bits = widths[torch.randint(0, len(widths), (groups,), device=device, generator=generator)]
        column_bits = group_bits.repeat_interleave(gs)[:cols].to(torch.int64)
        codes = (torch.rand(rows, cols, device=device, generator=generator) * (1 << column_bits)).floor().to(torch.uint8)
        zeros = (torch.rand(rows, groups, device=device, generator=generator) * (1 << group_bits.to(torch.int64))).floor()
        zeros = torch.where(group_bits == 1, torch.zeros_like(zeros), zeros).half()
        tensors = {"codes": codes, "group_bits": group_bits, "scales": small((rows, groups)), "zeros": zeros}
        return tensors, {"group_size": gs, "target_bits": 2}
    if layout == "partial_binary":
        gs = min(kw["group_size"], cols)
        groups = -(-cols // gs)
        mask = torch.rand(rows, cols, device=device, generator=generator) < kw["salient_share"]
        hb = kw["high_bit"]
        tensors = {
            "salient_mask": mask,
            "signs": (torch.rand(rows, cols, device=device, generator=generator) < 0.5) & ~mask,
            "salient_codes": randint(1 << hb, (rows, cols)) * mask,
            "high_scales": small((rows,)),
            "high_zeros": randint(1 << hb, (rows,)),
            "alpha": small((rows, groups)),
            "mu": small((rows, groups)),
        }
        return tensors, {"high_bit": hb, "group_size": gs}
    if layout == "binary_residual":
        bs = kw["blocksize"]
        blocks = -(-cols // bs)
        columns = torch.rand(cols, device=device, generator=generator) < kw["salient_share"]
        salient = columns.unsqueeze(0).expand(rows, cols)
        tensors = {
            "salient_columns": columns,
            "sparse_mask": (torch.rand(rows, cols, device=device, generator=generator) < 0.2) & ~salient,
            "signs": torch.rand(rows, cols, device=device, generator=generator) < 0.5,
            "signs2": (torch.rand(rows, cols, device=device, generator=generator) < 0.5) & salient,
            "params": small((rows, blocks, 8)),
        }
        return tensors, {"blocksize": bs}
    raise ValueError(layout)


def packed_module(layout, rows, cols, device, seed=0, **kw):
    """A QuantizedLinear of a random record, packed by the layout's own codec on `device` (the
    checkpoint writer's `packers.pack` would round-trip every tensor through the CPU)."""
    import torch

    from llmquant.formats.packers import PackedLinear
    from llmquant.layouts import get_layout
    from llmquant.runtime import QuantizedLinear

    generator = torch.Generator(device=device).manual_seed(seed)
    tensors, meta = random_record(layout, rows, cols, device, generator, **kw)
    stored, encoding = get_layout(layout).pack(tensors, meta, rows, cols)
    module = QuantizedLinear(PackedLinear(layout, (rows, cols), meta, {k: v.contiguous() for k, v in stored.items()}, encoding))
    module.backend = "triton"
    return module


class Timer:
    """Median milliseconds of `fn` over `runs` runs after `warmup`: CUDA events on a GPU."""

    def __init__(self, device, warmup: int, runs: int):
        self.device, self.warmup, self.runs = device, warmup, runs

    def __call__(self, fn) -> float:
        import torch

        for _ in range(self.warmup):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(self.runs):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(self.runs):
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def kernel_section(args, device, results):
    import torch
    import torch.nn.functional as F

    from llmquant.layouts.kernel_base import launch_config, packed_matmul
    from llmquant.runtime.kernels import prepared

    timer = Timer(device, args.warmup, args.runs)
    shapes = [(96, 160), (200, 128)] if args.smoke else SHAPES_7B + ([] if args.no_70b else SHAPES_70B)
    tokens_list = [1, 16] if args.smoke else TOKENS
    # Shapes outside, settings inside: if the time guard stops the section, every layout has the
    # shapes measured so far.
    for rows, cols in shapes:
        for label, layout, kw in SETTINGS:
            entry = {"setting": label, "layout": layout, "shape": [rows, cols]}
            if args.elapsed() > args.kernels_budget_s:
                entry["skipped"] = f"time guard: {args.kernels_budget_s:.0f} s spent"
                results["kernels"].append(entry)
                continue
            try:
                module = packed_module(layout, rows, cols, device, **kw)
                weight = module.dequantize().to(device, torch.float16)
                kernel = prepared(module)
                entry["packed_bytes"] = module.nbytes
                entry["resident_bytes"] = module.resident_bytes
                entry["fp16_bytes"] = rows * cols * 2
                entry["bits_per_weight_resident"] = module.resident_bytes * 8 / (rows * cols)
                for tokens in tokens_list:
                    x = torch.randn(tokens, cols, device=device, dtype=torch.float16)
                    y = packed_matmul(x, kernel, None)
                    ref = F.linear(x, weight)
                    scale = (x.abs().float() @ weight.abs().float().T).max().item()
                    err = (y.float() - ref.float()).abs().max().item()
                    packed_ms = timer(lambda: packed_matmul(x, kernel, None))
                    fp16_ms = timer(lambda: F.linear(x, weight))
                    row = {
                        "tokens": tokens,
                        "config": list(launch_config(tokens, rows, cols, device, kernel.tiles)),
                        "packed_ms": packed_ms,
                        "fp16_ms": fp16_ms,
                        "speedup_vs_fp16": fp16_ms / packed_ms,
                        "max_error_over_magnitude": err / max(scale, 1e-12),
                    }
                    entry.setdefault("runs", []).append(row)
                    print(f"{label:18s} {rows:>5}x{cols:<5} {tokens:>3} tok: packed {packed_ms:.4f} ms, fp16 {fp16_ms:.4f} ms, "
                          f"x{fp16_ms / packed_ms:.2f}", flush=True)
                del module, weight, kernel
            except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                entry["error"] = f"{type(error).__name__}: {error}"
                entry["traceback"] = traceback.format_exc(limit=6)
                print(f"{label} {rows}x{cols}: FAILED {entry['error']}", flush=True)
            results["kernels"].append(entry)
            args.save(results)
            if device.type == "cuda":
                torch.cuda.empty_cache()


def tiles_section(args, device, results):
    """Decode tile alternatives per layout at one token on 4096x4096 (11008x4096 too unless the guard
    stops it): BLOCK_N x BLOCK_K x num_warps around the layouts' TILES, split-K by launch_config's rule,
    one stage. Data for tuning `TILES` (llmquant/layouts/<layout>/kernels.py) on the hardware."""
    import torch

    from llmquant.layouts.kernel_base import launch_config, packed_matmul
    from llmquant.layouts.kernel_weights import Tiles
    from llmquant.runtime.kernels import prepared

    timer = Timer(device, args.warmup, args.runs)
    shapes = [(96, 160)] if args.smoke else [(4096, 4096), (11008, 4096)]
    found = results.setdefault("tiles", [])
    for rows, cols in shapes:
        for label, layout, kw in SETTINGS:
            if args.elapsed() > args.tiles_budget_s:
                found.append({"setting": label, "shape": [rows, cols], "skipped": f"time guard: {args.tiles_budget_s:.0f} s spent"})
                continue
            module = packed_module(layout, rows, cols, device, **kw)
            kernel = prepared(module)
            x = torch.randn(1, cols, device=device, dtype=torch.float16)
            timings = []
            for block_n in (16, 32, 64):
                for block_k in (64, 128):
                    for warps in (4, 8):
                        split = launch_config(1, rows, cols, device, Tiles(decode=(block_n, block_k, warps)))[3]
                        config = (16, block_n, block_k, split, warps, 1)
                        try:
                            timings.append({"config": list(config), "ms": timer(lambda: packed_matmul(x, kernel, None, config))})
                        except Exception as error:  # noqa: BLE001 - a refused tile is data too
                            timings.append({"config": list(config), "error": f"{type(error).__name__}: {error}"[:200]})
            shipped = list(launch_config(1, rows, cols, device, kernel.tiles))
            found.append({"setting": label, "shape": [rows, cols], "shipped": shipped,
                          "timings": sorted(timings, key=lambda r: r.get("ms", float("inf")))})  # fmt: skip
            best = found[-1]["timings"][0]
            print(f"tiles {label:18s} {rows}x{cols}: best {best.get('config')} {best.get('ms', float('nan')):.4f} ms (shipped {shipped})", flush=True)
            args.save(results)
            del module, kernel


def end_to_end_section(args, device, results):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmquant.bench import static_decode

    if args.smoke:
        config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=4, vocab_size=512, max_position_embeddings=1024)  # fmt: skip
    else:
        config = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                             num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)  # fmt: skip
    graphs = device.type == "cuda"
    prompt = torch.randint(0, config.vocab_size, (1, 16), device=device)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.float16).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    linears = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    runs = {}

    def measure(label):
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        static_decode(model, prompt, 8, device, graphs=graphs)  # warm-up: compile, prepare, capture
        seconds = [static_decode(model, prompt, args.new_tokens, device, graphs=graphs)[0] for _ in range(3)]
        entry = {
            "tokens_per_second": args.new_tokens / statistics.median(seconds),
            "runs_seconds": seconds,
            "cuda_graphs": graphs,
        }
        if device.type == "cuda":
            entry["allocated_bytes"] = int(torch.cuda.memory_allocated())
            entry["peak_bytes"] = int(torch.cuda.max_memory_allocated())
        # A kernel the GPU refuses falls back to the torch backend (runtime/kernels.py): then these
        # are not the kernel's figures, and the entry says so.
        entry["linears_not_on_triton"] = sum(1 for m in model.modules() if getattr(m, "backend", "triton") != "triton")
        runs[label] = entry
        print(f"e2e {label}: {entry['tokens_per_second']:.1f} tok/s", flush=True)

    try:
        measure("fp16")
    except Exception as error:  # noqa: BLE001
        runs["fp16"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)}
    shapes = {name: (module.out_features, module.in_features) for name, module in linears}
    for name, module in linears:
        module.weight = None  # the fp16 copies go, so each memory figure below is the packed model's
    del linears
    for label, layout, kw in SETTINGS:
        if args.elapsed() > args.budget_s:
            runs[label] = {"skipped": f"time guard: {args.budget_s:.0f} s spent"}
            continue
        try:
            for index, (name, (rows, cols)) in enumerate(shapes.items()):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, None)  # free the previous setting's module first
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                setattr(model.get_submodule(parent), child, packed_module(layout, rows, cols, device, seed=index, **kw))
            measure(label)
        except Exception as error:  # noqa: BLE001
            runs[label] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)}
            print(f"e2e {label}: FAILED {runs[label]['error']}", flush=True)
        results["end_to_end"] = {"partial": True, "runs": runs}
        args.save(results)
    if "fp16" in runs and "tokens_per_second" in runs["fp16"]:
        for label, entry in runs.items():
            if label != "fp16" and "tokens_per_second" in entry:
                entry["speedup_vs_fp16"] = entry["tokens_per_second"] / runs["fp16"]["tokens_per_second"]
    results["end_to_end"] = {"model": "LLaMA-7B shape, random weights" if not args.smoke else "tiny", "new_tokens": args.new_tokens, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", type=Path, default=Path("kernels.json"))
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--no-70b", action="store_true", help="skip the 70B shapes")
    parser.add_argument("--tiles", action="store_true", help="also time decode tile alternatives per layout (after the end-to-end run)")
    parser.add_argument("--tiles-budget-s", type=float, default=float("inf"), help="start no new tile sweep after this many seconds")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--kernels-budget-s", type=float, default=float("inf"),
                        help="start no new kernel measurement after this many seconds (a time guard for a lease)")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="start no new end-to-end setting after this many seconds")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes: checks the script")
    args = parser.parse_args()
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        args.runs, args.warmup, args.new_tokens = 2, 1, 4
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    results = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else platform.processor() or "cpu",
        "smoke": args.smoke,
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "kernels": [],
    }
    try:
        import triton

        results["versions"]["triton"] = triton.__version__
    except ImportError:
        pass
    started = time.perf_counter()
    args.elapsed = lambda: time.perf_counter() - started

    def save(partial: dict) -> None:  # after every entry: a run stopped by its lease keeps what it measured
        args.output.write_text(json.dumps({**partial, "seconds": args.elapsed()}, indent=1))

    args.save = save
    kernel_section(args, device, results)
    if not args.skip_e2e:
        try:
            end_to_end_section(args, device, results)
        except Exception as error:  # noqa: BLE001
            results["end_to_end"] = {"error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc(limit=8)}
    if args.tiles:
        try:
            tiles_section(args, device, results)
        except Exception as error:  # noqa: BLE001
            results["tiles_error"] = f"{type(error).__name__}: {error}"
    results["seconds"] = time.perf_counter() - started
    args.output.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output} in {results['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
