#!/usr/bin/env bash
# One reading experiment of issue 17: the demo recipe with overrides, trained and scored as
# `fusionlm demo` does, then scored again on 500 test samples per task.
#   [RECIPE=experiments/reading/X.yaml] experiments/reading/run.sh NAME [KEY=VALUE ...]
# Writes runs/reading/NAME/ (the demo's report, eval500.json/.md, wall.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; shift
out=runs/reading/$name
mkdir -p "$out"
bin=.venv/bin
start=$(date +%s)
# RECIPE=path.yaml: a recipe of experiments/reading/ instead of the shipped demo recipe.
$bin/python -c 'import sys; from fusionlm.demo import run_demo; run_demo(sys.argv[1], sys.argv[3:], recipe=sys.argv[2])' \
  "$out" "${RECIPE:-demo}" "$@"
echo "demo wall $(( $(date +%s) - start )) s" > "$out/wall.txt"
$bin/fusionlm eval --checkpoint "$out/run" --per-task 500 --out "$out/eval500.json"
cat "$out/wall.txt"
