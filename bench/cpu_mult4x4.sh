#!/usr/bin/env bash
# The CPU-sized real-data comparison (issue 3): No-CoT, CoT and RiM on iCoT 4x4 multiplication with a tiny model
# trained from scratch, selected on valid (best/), scored on the 1,000-problem test split. About 20 min on 2 idle cores.
#   usage: bash bench/cpu_mult4x4.sh [runs/cpu]
set -euo pipefail
RUNS=${1:-runs/cpu}
export RIM_DATA_DIR=${RIM_DATA_DIR:-../shared/data} TOKENIZERS_PARALLELISM=false
for m in nocot cot rim; do
  /usr/bin/time -f "$m train wall %e s" rim train configs/cpu/mult4x4_$m.yaml output_dir=$RUNS/mult4x4_$m train.progress=false
  rim eval $RUNS/mult4x4_$m --checkpoint best > $RUNS/mult4x4_$m.json
done
python3 - "$RUNS" <<'PY'
import json, sys, pathlib
runs = pathlib.Path(sys.argv[1])
print("| method | final-block acc. | any-block acc. | generated tokens | TTFT (ms) | latency (ms) | n |")
print("|---|---|---|---|---|---|---|")
for m in ("nocot", "cot", "rim"):
    r = json.loads((runs / f"mult4x4_{m}.json").read_text())
    anyb = "-" if r["any_block_accuracy"] is None else f"{100 * r['any_block_accuracy']:.1f}"
    print(f"| {m} | {100 * r['final_block_accuracy']:.1f} | {anyb} | {r['generated_tokens']:.1f} | "
          f"{r['ttft_ms']:.2f} | {r['latency_ms']:.2f} | {r['n']} |")
PY
