#!/bin/bash
# A shipped recipe on 1 process and on 2 (contrastive negatives gathered over processes): `fusionlm train llava`, 4 steps per stage, 1 process vs torchrun 2.
cd "$(dirname "$0")/.."
S=""
for i in 0 1 2 3; do S="$S --set stages.$i.steps=4 --set stages.$i.warmup_steps=1"; done
mkdir -p runs && rm -rf runs/one-process runs/two-processes
.venv/bin/fusionlm train llava --out runs/one-process $S --set train.threads=1 > runs/one-process.log 2>&1
OMP_NUM_THREADS=1 .venv/bin/torchrun --nproc-per-node 2 .venv/bin/fusionlm train llava --out runs/two-processes $S --set train.threads=1 > runs/two-processes.log 2>&1
.venv/bin/python - <<'PY'
import json
a=[json.loads(l) for l in open('runs/one-process/metrics.jsonl')]
b=[json.loads(l) for l in open('runs/two-processes/metrics.jsonl')]
print(len(a), len(b))
for x,y in zip(a,b):
    print(x["stage_name"], x["step"], x["loss"], y["loss"], abs(x["loss"]-y["loss"]))
print("max abs diff", max(abs(x["loss"]-y["loss"]) for x,y in zip(a,b)))
PY
