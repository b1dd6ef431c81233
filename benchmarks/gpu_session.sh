#!/usr/bin/env bash
# Every owed GPU figure in one ~9.5-minute call (a lease gives 15 minutes of device time, start included):
#   1. benchmarks/kernel_speed.py  fused kernels vs cuBLAS fp16 at LLaMA-2-7B/70B shapes, then a
#      LLaMA-7B-shaped model decoding end to end (CUDA graphs) fp16 vs packed, then decode tile
#      alternatives per layout (data for tuning each layout's TILES)          -> kernels.json
#   2. benchmarks/scale.py         s/layer of gptq, pbllm, billm, slim at 7B/70B shapes -> scale.json
#      with benchmarks/kernel_check.py beside it (compiled kernels vs the reference on every
#      test case; its GPU work is microseconds, its compiles use spare CPU cores)       -> check.json
# Each script rewrites its JSON after every measurement and has a time guard, so a stopped run
# keeps what it measured. Usage (on the GPU machine, from the repository root):
#   OUT=dir benchmarks/gpu_session.sh          SMOKE=1 OUT=/tmp/x benchmarks/gpu_session.sh  (CPU check)
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-runs/gpu}
PY=${PY:-python3}
TOTAL=${TOTAL:-570}  # seconds for the whole session, guards included
# The device image lacks pydantic (llmquant's recipes need it; scale.py stopped on it on 2026-12-04).
# Before the call, here: echo /.whl/ >> .git/info/exclude; python3 -m pip download --no-deps
#   --only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_17_x86_64
#   -d .whl pydantic pydantic-core annotated-types typing-inspection   and carry ".whl".
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
mkdir -p "$OUT"
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
smoke=${SMOKE:+--smoke}

{ nvidia-smi 2>&1 | head -15; "$PY" -c "import torch, triton, transformers, platform
print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'python', platform.python_version())
print('device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"; } 2>&1 | tee "$OUT/env.txt"

timeout 330 "$PY" benchmarks/kernel_speed.py $smoke --output "$OUT/kernels.json" --runs 30 --warmup 5 \
  --kernels-budget-s 120 --budget-s 220 --tiles --tiles-budget-s 290 2>&1 | tee "$OUT/kernels.log"
echo "kernel_speed done at $(elapsed) s"

left=$(( TOTAL - $(elapsed) ))
timeout $(( left > 60 ? left - 30 : 30 )) "$PY" benchmarks/kernel_check.py $smoke --output "$OUT/check.json" --processes 8 \
  > "$OUT/check.log" 2>&1 &
check=$!
scale_args=(--json "$OUT/scale.json" --slice-layers 3 --budget-s $(( left > 150 ? left - 100 : 30 )))
[ -n "$smoke" ] && scale_args+=(--smoke)
if "$PY" -c "import pydantic" 2>/dev/null; then
  timeout "$left" "$PY" benchmarks/scale.py "${scale_args[@]}" 2>&1 | tee "$OUT/scale.log" | cut -c1-400
else
  echo "scale.py skipped: pydantic is missing (carry its wheels: see the top of this script)" | tee "$OUT/scale.log"
fi
wait "$check"
tail -25 "$OUT/check.log"
echo "gpu session done at $(elapsed) s"
