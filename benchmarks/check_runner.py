"""Does the runner's replay of captured layer arguments reproduce a real model's own forward?

tests/test_models.py checks this on tiny random configs; this script checks it on a real model
(issue #20: Gemma-3-270M's 18 layers mix sliding-window and global attention). It cuts a few
WikiText-2 evaluation windows under the BOS rule (use a seqlen longer than the model's sliding window,
or sliding-window layers attend like global ones), captures the decoder layers' inputs and keyword
arguments exactly as `quantize` does (core/runner.capture_layer_inputs), runs the layers one by one
with those arguments, and compares the last layer's output with the one the model's own forward
produces (a hook on the last layer), and the logits computed from both.

    python benchmarks/check_runner.py --model gemma3-270m --windows 1 --seqlen 1024   # Gemma's sliding window: 512
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--bos", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("LLMQUANT_DATA", str(ROOT.parent / "shared" / "data"))

    from llmquant.core.runner import capture_layer_inputs
    from llmquant.data.streams import build_eval_stream
    from llmquant.models.layer_maps import resolve_layers
    from llmquant.models.loading import load_pretrained, load_tokenizer, resolve_model_source

    started = time.perf_counter()
    model = load_pretrained(resolve_model_source(args.model), torch.float32)
    tokenizer = load_tokenizer(args.model)
    stream = build_eval_stream("wikitext2", tokenizer, args.seqlen, bos=args.bos)
    windows = stream.windows(args.seqlen, args.windows)
    resolved = resolve_layers(model)
    layers = resolved.layers
    kinds = list(getattr(model.config, "layer_types", None) or [None] * len(layers))

    captured = capture_layer_inputs(model, layers, windows)
    hidden = captured.hidden
    with torch.no_grad():
        for index, layer in enumerate(layers):
            outs = []
            for s in range(hidden.shape[0]):
                out = layer(hidden[s : s + 1], **captured.layer_kwargs[index])
                outs.append(out[0] if captured.returns_tuple else out)
            hidden = torch.cat(outs)

    seen = {}
    hook = layers[-1].register_forward_hook(lambda m, i, o: seen.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        logits = model(windows, use_cache=False).logits
    hook.remove()
    own = seen["out"]
    with torch.no_grad():
        replay_logits = model.lm_head(model.model.norm(hidden)) if hasattr(model, "lm_head") else None
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if replay_logits is not None and softcap:
        replay_logits = torch.tanh(replay_logits / softcap) * softcap
    report = {
        "model": args.model,
        "model_type": model.config.model_type,
        "layers": len(layers),
        "attention_types": {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)},
        "sliding_window": getattr(model.config, "sliding_window", None),
        "windows": list(windows.shape),
        "window_layout": stream.rule.describe(args.seqlen),
        "first_ids": windows[:, :3].tolist(),
        "last_layer_max_abs_diff": (hidden - own).abs().max().item(),
        "last_layer_max_abs": own.abs().max().item(),
        "logits_max_abs_diff": None if replay_logits is None else (replay_logits - logits).abs().max().item(),
        "argmax_agreement": None if replay_logits is None else (replay_logits.argmax(-1) == logits.argmax(-1)).double().mean().item(),
        "seconds": time.perf_counter() - started,
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
