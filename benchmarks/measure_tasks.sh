#!/usr/bin/env bash
# Zero-shot accuracy of several models, one `llmquant eval --tasks --json` each (docs/results-tasks.md).
# Usage: benchmarks/measure_tasks.sh LIMIT NAME=MODEL_DIR...   (LIMIT "all": full splits)
# Writes runs/tasks/NAME-limitLIMIT.{json,log}; then: python benchmarks/tasks_table.py runs/tasks/*.json
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-arc_easy,piqa,winogrande,lambada_openai}
LIMIT=$1; shift
mkdir -p runs/tasks
for spec in "$@"; do
  name=${spec%%=*}; dir=${spec#*=}
  start=$(date +%s)
  nice -n 10 "$PY" -m llmquant.cli eval --model "$dir" --tasks "$TASKS" $([ "$LIMIT" = all ] || echo --limit "$LIMIT") \
    --batch-size 8 --json > "runs/tasks/$name-limit$LIMIT.json" 2> "runs/tasks/$name-limit$LIMIT.log"
  echo "$name limit $LIMIT rc=$? $(( $(date +%s) - start ))s"
done
