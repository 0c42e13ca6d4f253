#!/usr/bin/env bash
# One short run on a lent GPU machine (no registry there: the project runs from its source tree).
# Runs the test suite on that machine's torch/transformers, then `rim demo` for 3 seeds on CUDA (bf16 autocast)
# and a λ-schedule ablation (RiM with the paper's linear annealing), all in parallel. Results land in $OUT.
#   usage (device tool): bash bench/device_check.sh
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/rim-device}; RUNS=/tmp/rim-runs; mkdir -p "$OUT" "$RUNS"  # only a few files come back from $OUT
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)" | tee -a "$OUT/env.txt"
(git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout here") | tee -a "$OUT/env.txt"
(timeout 420 python3 -m pytest -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1; echo "tests rc=$?" >> "$OUT/tests.log") &
for s in 0 1 2; do
  (python3 -m rim.cli demo --out "$RUNS/demo-s$s" --seed "$s" train.device=auto train.progress=false \
     > "$RUNS/demo-s$s.log" 2>&1; echo "rc=$?" >> "$RUNS/demo-s$s.log") &
  (python3 -c "from rim.demo import run_demo; run_demo('$RUNS/linear-s$s', seed=$s, methods=('rim',), overrides=['train.device=auto', 'train.progress=false', 'stages.grounding.step_weight=linear', 'stages.grounding.anneal_end=0.8'])" \
     > "$RUNS/linear-s$s.log" 2>&1; echo "rc=$?" >> "$RUNS/linear-s$s.log") &
done
wait
# Timings above shared the GPU with 6 processes: re-time seed 0 alone, one method after another.
for m in nocot cot rim; do
  python3 -m rim.cli eval "$RUNS/demo-s0/$m" > "$RUNS/clean-$m.json" 2>> "$RUNS/clean.log"
done
tail -n 30 "$RUNS"/*.log > "$OUT/demo-logs.txt"
python3 - "$RUNS" <<'PY' | tee "$OUT/summary.md"
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for f in sorted(out.glob("*/results.json")):
    for r in json.loads(f.read_text()):
        print(f.parent.name, json.dumps(r))
for f in sorted(out.glob("clean-*.json")):
    r = json.loads(f.read_text())
    print("clean-timing", {k: r[k] for k in ("method", "final_block_accuracy", "ttft_ms", "latency_ms", "device")})
PY
tail -n 3 "$OUT/tests.log"
