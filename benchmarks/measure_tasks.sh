#!/usr/bin/env bash
# Zero-shot accuracy of several models, one `llmquant eval --tasks T --json` per (model, task), so a
# long run leaves every finished task behind and each task's wall time is its own (docs/results-tasks.md).
# Usage: benchmarks/measure_tasks.sh LIMIT NAME=MODEL_DIR...   (LIMIT "all": full splits)
# TASKS (comma-separated) picks the tasks; BATCH the batch size (default 16).
# Writes runs/tasks/NAME-limitLIMIT-TASK.{json,log} (a finished one is skipped);
# then: python benchmarks/tasks_table.py runs/tasks/*.json   (merges each model's tasks)
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
TASKS=${TASKS:-arc_easy,piqa,winogrande,lambada_openai}
BATCH=${BATCH:-16}
LIMIT=$1; shift
mkdir -p runs/tasks
for spec in "$@"; do
  name=${spec%%=*}; dir=${spec#*=}
  for task in ${TASKS//,/ }; do
    out="runs/tasks/$name-limit$LIMIT-$task"
    [ -s "$out.json" ] && { echo "$name $task: done before"; continue; }
    start=$(date +%s)
    "$PY" -m llmquant.cli eval --model "$dir" --tasks "$task" $([ "$LIMIT" = all ] || echo --limit "$LIMIT") \
      --batch-size "$BATCH" --json > "$out.json.partial" 2> "$out.log" && mv "$out.json.partial" "$out.json"
    echo "$name $task limit $LIMIT rc=$? $(( $(date +%s) - start ))s"
  done
done
