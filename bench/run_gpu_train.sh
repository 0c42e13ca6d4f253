#!/usr/bin/env bash
# Issue 17 in one device call of at most 9 minutes: the training suite against the card itself. Jobs run one after
# another, most important first, each under the time left before a hard deadline; after each job its results
# (bench-*.json / .md and its log) are packed into $OUT/bench-results.tar.gz and its table appended to
# $OUT/summary.md, so a call cut short returns every job that finished (3 files in $OUT: env.txt, summary.md and
# the archive; the device returns at most 8).
#
#   here, once:  bash bench/gpu_stage.sh here && bash bench/run_gpu_train.sh stage   # tokenizer + GSM8K data
#   device call: carry [".devcache/smollm2-tokenizer", ".devcache/data"], timeout_s 600:
#                bash bench/run_gpu_train.sh
#   CPU rehearsal (a few minutes): SMALL=tiny-deep BIG=tiny DEADLINE=400 COMPILE="" BENCH_ARGS="--repeats 1
#                --warmup 0" EPOCH_ARGS="--epoch-examples 64 --train-batch 8" SWEEP="2,4" bash bench/run_gpu_train.sh
#
# Jobs: (1) SmolLM2-135M shape, every weight trained: plain eager against RiM's steps, eager and compiled (the
# whole decoder and each block, CUDA graphs and inductor's default), one profiled step per row; (2) Llama-3.2-1B
# shape, every weight trained, with compiled blocks: MFU against the 8192³ bf16 matmul rate measured in the run;
# (3) seconds per epoch of GSM8K train_no_valid for the six methods' recipes (SmolLM2 shape and tokenizer, LoRA
# 128); (4) batch sweep 32..512 on the SmolLM2 shape; (5) Llama-3.2-1B with LoRA rank 128; (6) its batch sweep.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if [ "${1:-}" = stage ]; then  # here: the SmolLM2 tokenizer (from the GGUF) beside the data gpu_stage.sh copied
  python3 -c "from transformers import AutoTokenizer; from rim.models.hub import resolve_model_path; \
AutoTokenizer.from_pretrained(resolve_model_path('smollm2-135m')).save_pretrained('.devcache/smollm2-tokenizer')"
  du -sh .devcache/smollm2-tokenizer .devcache/data
  exit 0
fi
OUT=${OUT:-/tmp/rim-bench}; WORK=${WORK:-/tmp/rim-bench-work}; mkdir -p "$OUT" "$WORK"
SMALL=${SMALL:-smollm2-135m}; BIG=${BIG:-llama-3.2-1b}; SWEEP=${SWEEP:-32,64,128,256,512}
COMPILE=${COMPILE---compile-train reduce-overhead,default --compile-scope decoder,blocks}
TOKENIZER=${TOKENIZER:-.devcache/smollm2-tokenizer}
END=$(( $(date +%s) + ${DEADLINE:-530} ))
export RIM_DATA_DIR=${RIM_DATA_DIR:-$PWD/.devcache/data}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || echo "no GPU"
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  git rev-parse HEAD 2>/dev/null || echo "commit: not a git checkout"; } > "$OUT/env.txt" 2>&1
: > "$OUT/summary.md"

job() {  # job NAME LIMIT_S ARGS...: one rim bench run under min(LIMIT_S, time left), then pack
  local name=$1 limit=$2; shift 2
  local left=$(( END - $(date +%s) - 10 ))
  if [ "$left" -lt 30 ]; then echo "$name: not run, $left s left" | tee -a "$OUT/summary.md"; return; fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout "$limit" python3 -m rim.cli bench "$@" --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  echo "## $name (rc=$?, limit ${limit} s)" >> "$OUT/summary.md"
  cat "$WORK/$name"/*.md >> "$OUT/summary.md" 2>/dev/null
  tail -n 5 "$WORK/$name.log" >> "$OUT/summary.md"
  tar czf "$OUT/bench-results.tar.gz.tmp" -C "$WORK" . && mv "$OUT/bench-results.tar.gz.tmp" "$OUT/bench-results.tar.gz"
}

# shellcheck disable=SC2086
{
job small-train 170 train --shape "$SMALL" --train-mode full $COMPILE --profile ${BENCH_ARGS:-}
job big-train 130 train --shape "$BIG" --train-mode full ${COMPILE:+--compile-train default} --profile ${BENCH_ARGS:-}
job small-epoch 110 epoch --shape "$SMALL" --train-mode lora --tokenizer "$TOKENIZER" ${EPOCH_ARGS:-} ${BENCH_ARGS:-}
job small-sweep 50 sweep --shape "$SMALL" --train-mode full --sweep-batches "$SWEEP" ${BENCH_ARGS:-}
job big-lora 60 train --shape "$BIG" --train-mode lora ${COMPILE:+--compile-train default} ${BENCH_ARGS:-}
job big-sweep 60 sweep --shape "$BIG" --train-mode full --sweep-batches "$SWEEP" ${BENCH_ARGS:-}
}
echo "done at $(( $(date +%s) - END + ${DEADLINE:-530} )) s" | tee -a "$OUT/summary.md"
