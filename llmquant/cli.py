"""The `llmquant` command line. Thin: parse, validate, call the library, print.

Exit codes: 0 ok, 1 internal error (a bug), 2 invalid input or a refusal of the machine (out of memory,
disk full), 3 numerical failure, 130 interrupted.
Human-readable progress and logs go to stderr; results (and `--json`) go to stdout. Every failure,
a usage error included, is one `error:` line. Every command takes --json and --quiet; those that
read corpora take --data-dir.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from llmquant.data.windows import check_bos_choice
from llmquant.devices import check_device, check_dtype
from llmquant.errors import LLMQuantError, UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Post-training quantization of LLMs to 1-4 bits: RTN, GPTQ, BiLLM, PB-LLM, SliM-LLM.",
)
log = logging.getLogger("llmquant")

DataDir = Annotated[
    Optional[str], typer.Option("--data-dir", help="local corpora directory (default: $LLMQUANT_DATA, else the HF hub)")
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="no progress, info logs or transformers' load reports; errors still print")]
Json = Annotated[bool, typer.Option("--json", help="print the result as JSON on stdout")]
Force = Annotated[
    bool,
    typer.Option("--force", help="replace an existing output, if llmquant wrote it (never a directory holding other files, never an input)"),
]
Protocol = Annotated[Optional[str], typer.Option("--protocol", help="p0 (papers: 128x2048) or p1 (CPU: 32x512 / 128x512 eval)")]
Bos = Annotated[
    Optional[str],
    typer.Option(
        "--bos",
        help="per-window BOS: auto (BOS + seqlen-1 text tokens exactly when the tokenizer adds BOS by default), "
        "always, never (the papers' token streams)",
    ),
]
Sets = Annotated[
    Optional[list[str]], typer.Option("--set", help="override any recipe field: --set method.fidelity=paper (repeatable)")
]


def _recipe_overrides(protocol: Optional[str], sets: Optional[list[str]], **flags: object) -> dict[str, object]:
    """What quantize and validate apply to a recipe: the protocol's calibration size, then the flags
    given (field path -> value; None = not given), then the --set pairs, which win over both.
    load_recipe ignores None values, so a protocol that sets nothing leaves the recipe as it is."""
    from llmquant.recipe import get_protocol

    preset = get_protocol(protocol)
    overrides: dict[str, object] = {
        "calibration.nsamples": preset.nsamples if preset else None,
        "calibration.seqlen": preset.seqlen if preset else None,
    }
    overrides.update({path: value for path, value in flags.items() if value is not None})
    return {**overrides, **_parse_sets(sets or [])}


def _parse_sets(items: list[str]) -> dict[str, object]:
    """--set a.b=VALUE pairs; VALUE is read as YAML (so 3, 0.5, true, [0.9, 1.1] keep their types),
    with the recipe's limits (no duplicate keys, no alias bombs)."""
    from llmquant.recipe import safe_yaml

    parsed: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
        parsed[key.strip()] = safe_yaml(value, f"--set {key.strip()}")
    return parsed


def _print_json(data: dict) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _check_flag(flag: str, check, value: str) -> None:
    """One vocabulary for flags and recipes (llmquant/devices.py); a bad value is one line, exit 2."""
    try:
        check(value)
    except ValueError as error:
        raise UserError(f"{flag}: {error}") from None


MaxShardSize = Annotated[
    Optional[str],
    typer.Option(
        help="a packed checkpoint larger than this is written as shards with model.safetensors.index.json "
        "(like transformers: e.g. 5GB, 500MB, or bytes; 'none' for one file); default 5GB"
    ),
]
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def _shard_bytes(text: str | None) -> int | None:
    """--max-shard-size in bytes (None: no sharding); UserError for anything else."""
    from llmquant.formats.checkpoint import DEFAULT_MAX_SHARD_BYTES

    if text is None:
        return DEFAULT_MAX_SHARD_BYTES
    if text.strip().lower() == "none":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).upper() if match else ""
    if not match or unit not in _SIZE_UNITS or float(match.group(1)) * _SIZE_UNITS[unit] < 1:
        raise UserError(f"--max-shard-size: expected a size such as 5GB, 500MB or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


@app.command()
def quantize(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="recipe YAML")],
    model: Annotated[Optional[str], typer.Option(help="override recipe.model")] = None,
    output: Annotated[Optional[str], typer.Option(help="override recipe.output")] = None,
    nsamples: Annotated[Optional[int], typer.Option(help="override calibration.nsamples")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="override calibration.seqlen")] = None,
    seed: Annotated[Optional[int], typer.Option(help="override calibration.seed")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="override calibration.dataset")] = None,
    device: Annotated[
        Optional[str], typer.Option(help="override recipe.device (auto, cpu, cuda:N; cuda:0,cuda:1,...: one process per device)")
    ] = None,
    bos: Bos = None,
    protocol: Protocol = None,
    set_: Sets = None,
    data_dir: DataDir = None,
    fmt: Annotated[str, typer.Option("--format", help="packed (real bits) or fake (dequantized fp checkpoint)")] = "packed",
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="replace an existing output directory if llmquant wrote it (never one holding other files, never "
            "the input model); without --resume, also discard an unfinished run",
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume",
            help="continue an interrupted run from its work directory (.OUTPUT.work next to the output); "
            "starts from layer 0 if there is none",
        ),
    ] = False,
    streaming: Annotated[
        str,
        typer.Option(
            help="auto: read the decoder layers from a local model's safetensors one at a time (the model is "
            "never held in memory) when it can be, else load it whole; on: refuse what cannot be streamed; off"
        ),
    ] = "auto",
    max_shard_size: MaxShardSize = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
    quiet: Quiet = False,
) -> None:
    """Quantize a model with a recipe and write a checkpoint plus llmquant.json.

    Every finished decoder layer is checkpointed next to the output; after a crash, the same command
    with --resume continues and writes a checkpoint identical to an uninterrupted run's."""
    from llmquant.quantize import run_quantize
    from llmquant.recipe import load_recipe
    from llmquant.ui import progress

    from llmquant.formats import FORMATS

    if fmt not in FORMATS:
        raise UserError(f"--format: expected packed or fake, got {fmt!r}")
    if bos is not None:
        check_bos_choice(bos)
    overrides = _recipe_overrides(
        protocol,
        set_,
        **{
            "model": model,
            "output": output,
            "device": device,
            "calibration.nsamples": nsamples,
            "calibration.seqlen": seqlen,
            "calibration.seed": seed,
            "calibration.dataset": dataset,
            "calibration.bos": bos,
        },
    )
    if streaming not in ("auto", "on", "off"):
        raise UserError(f"--streaming: expected auto, on or off, got {streaming!r}")
    shard_bytes = _shard_bytes(max_shard_size)
    parsed = load_recipe(recipe, overrides)
    with progress(quiet) as bar:
        task = bar.add_task("quantizing layers", total=None)

        def on_start(layers: int, done: int = 0) -> None:
            bar.update(task, total=layers, completed=done)

        def on_layer(report) -> None:
            measured = [r for r in report.linears if r.relative_error is not None]
            worst = max(measured, key=lambda r: r.relative_error, default=None)
            if worst is None:
                log.info("layer %d: %.1fs", report.index, report.seconds)
            else:
                log.info(
                    "layer %d: %.1fs, mean rel. output error %.4f (worst %s %.4f)",
                    report.index,
                    report.seconds,
                    report.mean_relative_error,
                    ".".join(worst.name.rsplit(".", 2)[-2:]),
                    worst.relative_error,
                )
            bar.advance(task)

        refining: dict[str, int] = {}

        def on_refine_epoch(index: int, epoch: int, epochs: int, loss: float) -> None:
            if "task" not in refining:
                refining["task"] = bar.add_task("refining", total=epochs)
            bar.update(refining["task"], description=f"refining layer {index}", total=epochs, completed=epoch)
            log.info("layer %d: refinement epoch %d/%d, reconstruction loss %.6g", index, epoch, epochs, loss)

        out, report = run_quantize(
            parsed, force, data_dir, fmt, on_layer_done=on_layer, on_start=on_start, resume=resume,
            streaming=streaming, max_shard_bytes=shard_bytes, on_refine_epoch=on_refine_epoch,
        )  # fmt: skip
    if as_json:
        _print_json(report)
    else:
        bits = report["bits"]
        typer.echo(
            f"wrote {out} ({report['method']}): bits/weight paper {bits['paper']:.3f}, code {bits['code']:.3f}, "
            f"storage {bits['storage']:.3f}; quantize {report['time_seconds']['quantize']:.1f}s, "
            f"peak RSS {report['peak_memory']['rss_bytes'] / 2**30:.2f} GiB"
            + (f", peak GPU {report['peak_memory']['cuda_bytes'] / 2**30:.2f} GiB" if "cuda_bytes" in report["peak_memory"] else "")
        )


@app.command()
def calibrate(
    model: Annotated[str, typer.Option(help="model whose tokenizer cuts the windows")],
    output: Annotated[Path, typer.Option(help="calibration file to write (.safetensors)")],
    dataset: Annotated[str, typer.Option(help="wikitext2 | ptb | c4 | a .txt/.jsonl file")] = "c4",
    nsamples: Annotated[Optional[int], typer.Option(help="windows to sample (default 128, p1: 32)")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="tokens per window (default 2048, p1: 512)")] = None,
    seed: Annotated[int, typer.Option(help="seed of the window sampler")] = 0,
    bos: Bos = None,
    protocol: Protocol = None,
    data_dir: DataDir = None,
    force: Force = False,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Sample and save a seeded calibration set that `quantize` can reuse (calibration.dataset: FILE)."""
    from llmquant.data.calibration import build_calibration
    from llmquant.models.loading import load_tokenizer
    from llmquant.output import check_output_path
    from llmquant.recipe import CalibrationConfig, get_protocol
    from llmquant.safetensors_io import not_llmquant_file

    if output.suffix != ".safetensors":
        raise UserError(f"--output: must end in .safetensors, got {output}")
    preset = get_protocol(protocol)
    check_bos_choice(bos or "auto")
    try:
        cfg = CalibrationConfig(  # 0 is a value, not "use the default"
            dataset=dataset,
            nsamples=nsamples if nsamples is not None else (preset.nsamples if preset else 128),
            seqlen=seqlen if seqlen is not None else (preset.seqlen if preset else 2048),
            seed=seed,
            bos=bos or "auto",
        )
    except ValueError as error:
        raise UserError(f"calibrate: {_field_error(error)}") from None
    check_output_path(output, force, inputs=[model, dataset], kind="file", ours=not_llmquant_file)
    tokenizer = load_tokenizer(model)
    calib = build_calibration(cfg.dataset, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed, data_dir, cfg.bos)
    output.parent.mkdir(parents=True, exist_ok=True)
    calib.save(output)
    meta = {**calib.meta, "windows_sha256": calib.sha256, "output": str(output)}
    if as_json:
        _print_json(meta)
    else:
        typer.echo(
            f"wrote {output}: {cfg.nsamples} x {cfg.seqlen} tokens ({calib.meta['window_layout']}; bos={cfg.bos}) "
            f"from {calib.meta['source']} (seed {cfg.seed}, sha256 {calib.sha256[:16]})"
        )


@app.command("eval")
def evaluate(
    model: Annotated[str, typer.Option(help="model directory (fp, fake-quant or packed), hub id, .gguf, or alias")],
    ppl: Annotated[
        Optional[list[str]],
        typer.Option(help="dataset(s): wikitext2, ptb, c4 or a .txt/.jsonl file (default wikitext2, none with --tasks alone)"),
    ] = None,
    tasks: Annotated[
        Optional[list[str]],
        typer.Option(
            "--tasks",
            help="zero-shot tasks through lm-evaluation-harness, comma-separated: piqa,arc_easy,arc_challenge,winogrande,"
            "boolq,lambada_openai,openbookqa (local data in --data-dir/tasks), any lm-eval task (hub); 'default' = those seven",
        ),
    ] = None,
    num_fewshot: Annotated[int, typer.Option("--num-fewshot", help="--tasks: few-shot examples per prompt")] = 0,
    limit: Annotated[
        Optional[float], typer.Option("--limit", help="--tasks: only the first N documents per task (a fraction if < 1; smoke runs)")
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="--tasks: requests per forward")] = 1,
    seqlen: Annotated[Optional[int], typer.Option(help="window length (default 2048, p1: 512)")] = None,
    max_windows: Annotated[Optional[int], typer.Option(help="evaluate only the first N windows (p1: 128)")] = None,
    bos: Bos = None,
    protocol: Protocol = None,
    data_dir: DataDir = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float16, bfloat16, float32")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="print results as JSON on stdout")] = False,
    backend: Annotated[
        str,
        typer.Option(
            help="packed linears: auto (Triton kernels on CUDA; on a CPU torch-cached: each weight decoded once, "
            "dense memory), torch (decode every forward, packed memory), torch-cached, triton"
        ),
    ] = "auto",
    kl: Annotated[
        bool, typer.Option("--kl", help="also KL divergence and top-1 agreement against --reference, same windows")
    ] = False,
    reference: Annotated[
        Optional[str], typer.Option(help="--kl: the reference model (usually the full-precision one); any --model form")
    ] = None,
    reference_cache: Annotated[
        Optional[Path],
        typer.Option(
            help="directory of reference caches: with --kl, read (or build) the reference's; without, store this "
            "model's, for later --kl runs that use it as --reference"
        ),
    ] = None,
    quiet: Quiet = False,
) -> None:
    """Perplexity under the papers' protocol (docs/protocol.md), with the protocol printed; with --kl,
    KL divergence from a reference model and top-1 agreement over the same windows; with --tasks,
    zero-shot task accuracy through lm-evaluation-harness (docs/tasks.md)."""
    from llmquant.evaluate import EvalSettings, run_eval
    from llmquant.evaluate.tasks import parse_task_list, result_line
    from llmquant.ui import progress

    if kl and reference is None:
        raise UserError("--kl needs --reference (the model to compare against, e.g. the full-precision directory)")
    if reference is not None and not kl:
        raise UserError("--reference only applies with --kl")
    task_names = parse_task_list(tasks or [])
    settings = EvalSettings(
        datasets=tuple(ppl) if ppl else (() if task_names else ("wikitext2",)),
        tasks=task_names,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        seqlen=seqlen,
        max_windows=max_windows,
        protocol=protocol,
        data_dir=data_dir,
        device=device,
        dtype=dtype,
        backend=backend,
        reference=reference,
        reference_cache=reference_cache,
        bos=bos or "auto",
    )
    settings.check()  # every flag, before anything loads

    def on_result(entry: dict) -> None:
        if as_json:
            return
        name = entry["dataset"]
        typer.echo(f"{name}: ppl {entry['ppl']:.4f}  ({entry['windows']} windows, {entry['seconds']:.1f}s)")
        if "kl" in entry:
            typer.echo(
                f"{name}: KL {entry['kl']:.5f} nats (median {entry['kl_median']:.5f}, p99 {entry['kl_p99']:.4f}, "
                f"max {entry['kl_max']:.3f}), top-1 agreement {entry['top1_agreement']:.2%} over {entry['kl_positions']} "
                f"positions; reference ppl {entry['reference_ppl']:.4f}"
            )

    def on_task(entry: dict) -> None:
        if not as_json:
            typer.echo(result_line(entry))

    with progress(quiet) as bar:

        def window_progress(label: str, total: int):
            task = bar.add_task(label, total=total)
            return lambda done, total: bar.update(task, completed=done, total=total)

        report = run_eval(
            model,
            settings,
            on_protocol=None if as_json else typer.echo,
            progress=window_progress,
            on_result=on_result,
            on_task=on_task,
        )
    if as_json:
        _print_json(report)


@app.command()
def bench(
    model: Annotated[
        list[str], typer.Option(help="model to measure: directory (fp, fake-quant or packed), .gguf, alias; repeatable")
    ],
    baseline: Annotated[
        Optional[str], typer.Option(help="full-precision model measured first, in the same run; ratios are model / baseline")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    dtype: Annotated[str, typer.Option(help="compute dtype: auto (float32 on CPU), float16, bfloat16, float32")] = "auto",
    prompt_tokens: Annotated[int, typer.Option(help="prefill: tokens of the prompt")] = 512,
    new_tokens: Annotated[int, typer.Option(help="decode: greedy steps timed (batch 1, KV cache)")] = 128,
    warmup: Annotated[int, typer.Option(help="unmeasured repetitions first")] = 1,
    repeats: Annotated[int, typer.Option(help="measured repetitions (median, min, max reported)")] = 3,
    backend: Annotated[
        str,
        typer.Option(
            help="packed linears: auto (Triton kernels on CUDA, else torch), torch (decode every forward, packed "
            "memory), torch-cached (decode once, dense memory), triton"
        ),
    ] = "auto",
    static_cache: Annotated[
        bool, typer.Option("--static-cache", help="decode with a static KV cache and a plain greedy loop (both models)")
    ] = False,
    cuda_graphs: Annotated[
        bool,
        typer.Option("--cuda-graphs", help="with a static cache, replay each decode step as a CUDA graph (CUDA only)"),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON on stdout")] = False,
    quiet: Quiet = False,
) -> None:
    """Size, bits, load time, memory, prefill and decode tokens/s of each model and a baseline, side by side."""
    from llmquant.bench import BenchSettings, format_report, run_bench

    _check_flag("--dtype", check_dtype, dtype)
    _check_flag("--device", check_device, device)
    settings = BenchSettings(
        prompt_tokens=prompt_tokens,
        new_tokens=new_tokens,
        warmup=warmup,
        repeats=repeats,
        backend=backend,
        dtype=dtype,
        static_cache=static_cache,
        cuda_graphs=cuda_graphs,
    )
    report = run_bench(model, baseline, settings, device, on_step=None if quiet else log.info)
    if as_json:
        _print_json(report)
    else:
        for line in format_report(report):
            typer.echo(line)


@app.command()
def train(
    model: Annotated[str, typer.Option(help="packed PB-LLM checkpoint to start from (partial_binary linears)")],
    output: Annotated[Path, typer.Option(help="directory to write (a packed checkpoint again)")],
    dataset: Annotated[str, typer.Option(help="training text: wikitext2 | ptb | c4 | a .txt/.jsonl file (its train split)")] = "wikitext2",
    steps: Annotated[int, typer.Option(help="optimizer steps (one batch of windows each)")] = 200,
    batch_size: Annotated[int, typer.Option("--batch-size", help="windows per step")] = 1,
    seqlen: Annotated[int, typer.Option(help="tokens per window")] = 512,
    lr: Annotated[float, typer.Option(help="AdamW learning rate of the latent weights and mu (peak of the schedule)")] = 1e-4,
    warmup: Annotated[float, typer.Option(help="share of the steps with a linear warm-up; cosine decay to 0 after")] = 0.05,
    seed: Annotated[int, typer.Option(help="seed of the window sampler")] = 0,
    save_every: Annotated[int, typer.Option("--save-every", help="steps between resumable state saves")] = 25,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N")] = "auto",
    bos: Annotated[Optional[str], typer.Option(help="per-window BOS: auto (the tokenizer's default), always, never")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue an interrupted run from its last saved step")] = False,
    force: Force = False,
    max_shard_size: MaxShardSize = None,
    data_dir: DataDir = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """PB-LLM's quantization-aware training: salient weights frozen at 8 bits, the binarized weights trained
    through a straight-through sign with the paper's per-channel optimal scale, next-token loss on a text
    corpus. Writes a packed partial_binary checkpoint again; --resume continues an interrupted run (same bytes)."""
    from llmquant.train import TrainSettings, run_train
    from llmquant.ui import progress

    _check_flag("--device", check_device, device)
    if bos is not None:
        check_bos_choice(bos)
    settings = TrainSettings(
        model=model, output=str(output), dataset=dataset, steps=steps, batch_size=batch_size, seqlen=seqlen, lr=lr,
        warmup=warmup, seed=seed, save_every=save_every, device=device, bos=bos or "auto",
    )
    settings.check()
    with progress(quiet) as bar:
        task = bar.add_task("training", total=steps)

        def on_start(total: int, done: int) -> None:
            bar.update(task, total=total, completed=done)

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step, description=f"training (loss {loss:.3f})")

        out, report = run_train(
            settings, force=force, resume=resume, data_dir=data_dir, on_start=on_start, on_step=on_step,
            max_shard_bytes=_shard_bytes(max_shard_size),
        )
    if as_json:
        _print_json(report)
    else:
        typer.echo(
            f"wrote {out}: {report['trained_linears']} PB-LLM linears trained for {report['steps']} steps "
            f"({report['tokens']:,} tokens), loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}; "
            f"{report['time_seconds']['train']:.0f}s, peak RSS {report['peak_memory']['rss_bytes'] / 2**30:.2f} GiB"
        )


@app.command()
def pack(
    model: Annotated[str, typer.Option(help="llmquant checkpoint directory")],
    output: Annotated[Path, typer.Option(help="directory to write")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="packed (native, real bits), fake (plain dequantized HF checkpoint), or an export for serving "
            "engines: compressed-tensors, gptq (v2 zero points), gguf (uniform layout only; exact)",
        ),
    ],
    dtype: Annotated[
        Optional[str], typer.Option(help="dtype of the unquantized tensors (and fake weights): float16, bfloat16, float32")
    ] = None,
    sym_widen: Annotated[
        bool,
        typer.Option(
            "--sym-widen", help="exports: store asymmetric b-bit linears as symmetric (b+1)-bit, exactly (e.g. 3 -> 4 for Marlin)"
        ),
    ] = False,
    gguf_type: Annotated[
        str,
        typer.Option("--gguf-type", help="gguf: auto (the smallest exact type per linear: q4_0, q5_0, q8_0), or q4_0, q5_0, q8_0, q4_1"),
    ] = "auto",
    allow_approximate: Annotated[
        bool, typer.Option("--allow-approximate", help="gguf: allow q4_1 (zero points re-rounded); measure its KL with `llmquant eval`")
    ] = False,
    force: Force = False,
    max_shard_size: MaxShardSize = None,
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Re-encode a checkpoint: packed <-> fake-quant, or export it for a serving engine (see docs/format.md,
    "Which layout goes where").

    The source is checked as strictly as loading it (checksums, structure, the model of its config.json, every
    linear decoded); nothing is written from a broken one, nor when the target cannot hold a linear exactly."""
    from llmquant.export import EXPORT_FORMATS
    from llmquant.formats import FORMATS
    from llmquant.runtime.loader import pack_checkpoint

    if fmt not in FORMATS + EXPORT_FORMATS:
        raise UserError(f"--format: expected one of {', '.join(FORMATS + EXPORT_FORMATS)}, got {fmt!r}")
    if dtype is not None:
        _check_flag("--dtype", lambda name: check_dtype(name, allow_auto=False), dtype)
    if fmt in FORMATS and (sym_widen or gguf_type != "auto" or allow_approximate):
        raise UserError("--sym-widen, --gguf-type and --allow-approximate apply to the export formats, not to " + fmt)
    if not Path(model).is_dir():
        raise UserError(f"model directory not found: {model}")
    if fmt in FORMATS:
        pack_checkpoint(model, output, fmt, dtype=dtype, force=force, max_shard_bytes=_shard_bytes(max_shard_size))
        summary = {"model": model, "output": str(output), "format": fmt}
    else:
        from llmquant.devices import resolve_dtype
        from llmquant.export import export_checkpoint

        resolved = resolve_dtype(dtype) if dtype is not None else None
        summary = export_checkpoint(
            model, output, fmt, sym_widen=sym_widen, dtype=resolved, gguf_type=gguf_type,
            allow_approximate=allow_approximate, force=force,
        )
    if as_json:
        _print_json(summary)
    else:
        size = f", {summary['bytes'] / 2**20:.1f} MiB" if "bytes" in summary else ""
        typer.echo(f"wrote {output} ({fmt}{size})")


@app.command()
def verify(
    checkpoint: Annotated[Path, typer.Argument(help="llmquant checkpoint directory (packed, or fake with its sidecar)")],
    as_json: Json = False,
    quiet: Quiet = False,
) -> None:
    """Check a checkpoint's integrity; prints OK, or the first problem (exit 2).

    Every tensor against its recorded checksum, the weights file against its config.json (or sidecar), the structure of every packed linear and the model of
    config.json, every linear decoded."""
    from llmquant.runtime.loader import verify_checkpoint

    report = verify_checkpoint(checkpoint)
    if as_json:
        _print_json(report)
    else:
        typer.echo(
            f"OK {checkpoint} ({report['format']}): {report['tensors']} tensors in {len(report['files'])} file(s), "
            f"{report['bytes'] / 2**20:.1f} MiB, checksums verified, {report['linears']} packed linears decoded "
            f"({report['seconds']:.2f}s)"
        )


@app.command()
def methods(as_json: Json = False, quiet: Quiet = False) -> None:
    """List the quantization methods and their recipe fields."""
    from llmquant.methods import available_methods

    if as_json:
        _print_json(
            {
                name: {
                    "layouts": list(cls.layouts),
                    "fields": {
                        field: {"default": info.default, "description": info.description}
                        for field, info in cls.Config.model_fields.items()
                        if field != "name"
                    },
                }
                for name, cls in available_methods().items()
            }
        )
        return
    for name, cls in available_methods().items():
        typer.echo(f"{name}  (layouts: {', '.join(cls.layouts)})")
        for field, info in cls.Config.model_fields.items():
            if field == "name":
                continue
            desc = f"  {info.description}" if info.description else ""
            typer.echo(f"    {field} = {info.default!r}{desc}")


@app.command()
def validate(
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="recipe YAML")],
    protocol: Protocol = None,
    set_: Sets = None,
    as_json: Annotated[bool, typer.Option("--json", help="the resolved recipe is always printed as JSON")] = False,
    quiet: Quiet = False,
) -> None:
    """Validate a recipe (with the same --protocol and --set overrides quantize takes) without loading
    anything; prints the resolved recipe as JSON."""
    from llmquant.recipe import load_recipe

    _print_json(load_recipe(recipe, _recipe_overrides(protocol, set_)).dump())


def _field_error(error: Exception) -> str:
    """A pydantic error of a flag-built config as `--flag: reason`."""
    errors = error.errors() if hasattr(error, "errors") else []
    if not errors:
        return " ".join(str(error).split())
    first = errors[0]
    flag = "--" + "-".join(str(part) for part in first["loc"]).replace("_", "-")
    return f"{flag}: {' '.join(first['msg'].removeprefix('Value error, ').split())}"


def _click_exceptions():
    try:
        from typer._click import exceptions  # typer >= 0.2x vendors click
    except ImportError:  # pragma: no cover - older typer: click itself
        from click import exceptions
    return exceptions


OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")
OOM_ADVICE = (
    "quantize --streaming on (one decoder layer in memory at a time), fewer calibration windows "
    "(--nsamples), a smaller --batch-size, or a device with more memory"
)


def _out_of_memory(error: BaseException) -> str | None:
    """The one line for an out-of-memory failure, or None if `error` is something else."""
    text = " ".join(str(error).split())
    if not isinstance(error, MemoryError) and not any(marker in text.lower() for marker in OOM_MARKERS):
        return None
    first = text.split(". ")[0][:200] if text else type(error).__name__
    return f"out of memory: {first}; try {OOM_ADVICE}"


def main() -> None:
    from llmquant.ui import error_line, setup_logging, stderr

    setup_logging(quiet="--quiet" in sys.argv or "-q" in sys.argv)
    clicks = _click_exceptions()
    try:
        code = app(standalone_mode=False)  # usage errors come back here, to be printed as one line
    except clicks.NoArgsIsHelpError as error:
        typer.echo(error.format_message(), err=True)
        sys.exit(2)
    except clicks.ClickException as error:  # unknown command or option, bad or missing value
        error_line(error.format_message())
        sys.exit(error.exit_code if error.exit_code else 2)
    except typer.Abort:
        stderr.print("interrupted")
        sys.exit(130)
    except LLMQuantError as error:
        error_line(error)
        sys.exit(error.exit_code)
    except (MemoryError, RuntimeError) as error:
        # Out of memory (a torch.OutOfMemoryError on a GPU, the CPU allocator's RuntimeError, a
        # MemoryError): the machine refused, the user's to fix; anything else is a bug, re-raised.
        message = _out_of_memory(error)
        if message is None:
            raise
        error_line(message)
        sys.exit(2)
    except OSError as error:  # the machine refused (disk full, permissions, read-only): the user's to fix
        where = f"{error.filename}: " if error.filename else ""
        error_line(f"{where}{error.strerror or error}")
        sys.exit(2)
    except KeyboardInterrupt:
        stderr.print("interrupted")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
