#!/usr/bin/env bash
# `make demo`: quantize the built-in SmolLM2-135M with a low-bit recipe under protocol P1 and print
# WikiText-2 perplexity before and after (docs/protocol.md). About 10 minutes on 2 CPU cores.
set -euo pipefail
VENV=${1:-.venv}
LLMQUANT="$VENV/bin/llmquant"
RECIPE=${RECIPE:-recipes/gptq-w3g128.yaml}
OUT=${OUT:-out/demo}

echo "== full-precision SmolLM2-135M (dequantized GGUF), protocol P1"
"$LLMQUANT" eval --model smollm2-135m --protocol p1 --ppl wikitext2
echo
echo "== quantize with $RECIPE (P1 calibration: 32 x 512 tokens)"
"$LLMQUANT" quantize --recipe "$RECIPE" --protocol p1 --output "$OUT" --force
echo
echo "== the packed checkpoint in $OUT, protocol P1"
du -sh "$OUT"/model.safetensors
"$LLMQUANT" eval --model "$OUT" --protocol p1 --ppl wikitext2
