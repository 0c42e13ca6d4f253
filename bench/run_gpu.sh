#!/usr/bin/env bash
# The speed suite (`rim bench`) on a lent GPU machine, no registry there: it runs from the source tree. About
# 6 minutes on an H100: the fast-path tests, then latency and training for the real shapes (random weights).
# Results (bench-<shape>-all.json / .md, logs, env.txt) land in $OUT.
#   usage (device tool): bash bench/run_gpu.sh
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/rim-bench}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/env.txt"
timeout 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_train.py tests/test_bench.py > "$OUT/tests.log" 2>&1
echo "tests rc=$?" | tee -a "$OUT/tests.log"
for shape in smollm2-135m llama-3.2-1b gpt2; do
  timeout 150 python3 -m rim.cli bench all --shape "$shape" --out "$OUT" > "$OUT/bench-$shape.log" 2>&1
  echo "$shape rc=$?" | tee -a "$OUT/bench-$shape.log"
done
cat "$OUT"/bench-*-all.md
