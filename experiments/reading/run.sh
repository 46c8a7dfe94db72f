#!/usr/bin/env bash
# One reading experiment of issue 17: the demo recipe with overrides, trained and scored as
# `fusionlm demo` does, then scored again on 500 test samples per task.
#   experiments/reading/run.sh NAME [KEY=VALUE ...]     (NAME=baseline: no override)
# Writes runs/reading/NAME/ (the demo's report, eval500.json/.md, wall.txt).
set -euo pipefail
cd "$(dirname "$0")/../.."
name=$1; shift
out=runs/reading/$name
mkdir -p "$out"
bin=.venv/bin
start=$(date +%s)
if [ $# -gt 0 ]; then $bin/fusionlm demo --out "$out" --set "$@"; else $bin/fusionlm demo --out "$out"; fi
echo "demo wall $(( $(date +%s) - start )) s" > "$out/wall.txt"
$bin/fusionlm eval --checkpoint "$out/run" --per-task 500 --out "$out/eval500.json"
cat "$out/wall.txt"
