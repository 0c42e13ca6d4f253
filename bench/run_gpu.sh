#!/usr/bin/env bash
# The speed suite (`rim bench`) on a lent GPU machine, no registry there: it runs from the source tree. Results
# (bench-<shape>-<suite>.json / .md, logs, env.txt) land in $OUT.
#
#   bash bench/run_gpu.sh                         # the fast-path tests, then SmolLM2-135M and GPT-2 (up to 17 min)
#   bash bench/run_gpu.sh llama-3.2-1b            # one shape per call where a call is limited to 10 minutes
#   BENCH_ARGS="--repeats 5" SHAPE_TIMEOUT=250 bash bench/run_gpu.sh smollm2-135m llama-3.2-1b
#   TESTS=1 SUITE=train SHAPE_TIMEOUT=400 BENCH_ARGS="--repeats 5" bash bench/run_gpu.sh smollm2-135m
#                                                 # the tests too, and only the training half of the suite
#
# Every shape runs the suite in one process, so each ratio is measured side by side: latency of every method
# (dynamic KV cache, plus static cache and compiled decoding steps for No-CoT and RiM), all K readouts against K
# decodes, and the training step (all weights trainable, as the H200 check): plain HF against RiM with
# full, supervised and fused logits, then compiled in reduce-overhead (CUDA graphs) and then the default mode,
# each with the whole decoder at once and with each block on its own; one more step of each training row runs
# under torch.profiler (kernels, kernel time, the fraction of the step the GPU was busy). The tests include
# training through CUDA graphs on the GPU against eager training.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/rim-bench}; mkdir -p "$OUT"
SUITE=${SUITE:-all}
shapes=("$@")
if [ ${#shapes[@]} -eq 0 ]; then
  shapes=(smollm2-135m gpt2)
  TESTS=1
fi
if [ -n "${TESTS:-}" ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/env.txt"
  timeout "${TESTS_TIMEOUT:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/test_fast_train.py \
    tests/test_bench.py tests/test_generate_fast.py > "$OUT/tests.log" 2>&1
  echo "tests rc=$?" | tee -a "$OUT/tests.log"
fi
for shape in "${shapes[@]}"; do
  timeout "${SHAPE_TIMEOUT:-400}" python3 -m rim.cli bench "$SUITE" --shape "$shape" --train-mode full \
    --compile-train reduce-overhead,default --compile-scope decoder,blocks --profile \
    --static-cache --compile ${BENCH_ARGS:-} --out "$OUT" > "$OUT/bench-$shape.log" 2>&1
  echo "$shape rc=$?" | tee -a "$OUT/bench-$shape.log"
  cat "$OUT/bench-$shape-$SUITE.md" 2>/dev/null
done
